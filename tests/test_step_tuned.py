"""Step-Tuned SGD against ALGORITHMS.md §5, computed independently in float64 NumPy loops."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_adaptive_lr import StepTunedSGD

N_IN, N_OUT, BATCH = 5, 3, 8


# ----------------------------------------------------------------------------- the problem


def make_problem(n_batches: int, seed: int = 0):
    """A stream of mini-batches of noisy linear least squares, and a starting point."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(N_IN, N_OUT))
    data = []
    for _ in range(n_batches):
        x = rng.normal(size=(BATCH, N_IN))
        data.append((x, x @ w_true + 0.3 * rng.normal(size=(BATCH, N_OUT))))
    return data, [rng.normal(size=(N_IN, N_OUT)) * 0.5, rng.normal(size=(N_OUT,)) * 0.5]


def grads_at(params, batch):
    """Gradient of f = mean((xW + c − y)²), by hand."""
    (w, c), (x, y) = params, batch
    r = x @ w + c - y
    scale = 2.0 / r.size
    return [scale * x.T @ r, scale * r.sum(axis=0)]


def vdot(xs, ys) -> float:
    return float(sum(np.sum(a * b) for a, b in zip(xs, ys)))


# ----------------------------------------------------------------------------- the reference


def reference(data, params, groups, *, beta, nu, bounds, delta, same_batch, has_grad=None):
    """ALGORITHMS.md §5, literally, with its two readings of B'.

    ``groups``: list of (lr, weight_decay, parameter indices).  ``same_batch``: B' = B (one batch
    per iteration), else B' = the next mini-batch (two batches per iteration).  ``has_grad[j][i]``
    says whether parameter i has a gradient for batch j; a parameter without a gradient at one of the
    two half-steps takes the other and stays out of that iteration's G, Δx and Δg (the documented rule).

    Returns the final parameters and, per ``step()`` call, (effective lrs per group, gain, curvature).
    """
    x = [p.copy() for p in params]
    big_g = [np.zeros_like(p) for p in x]
    gamma, curvature = 1.0, float("nan")
    lr_of = {i: lr for lr, _, idx in groups for i in idx}
    wd_of = {i: wd for _, wd, idx in groups for i in idx}
    n = len(x)
    has_grad = has_grad or [[True] * n for _ in data]
    records = []
    iterations = len(data) if same_batch else len(data) // 2
    for k in range(iterations):
        ja, jb = (k, k) if same_batch else (2 * k, 2 * k + 1)
        eta = {i: lr_of[i] * gamma / (k + 1) ** (0.5 + delta) for i in range(n)}
        etas = [lr * gamma / (k + 1) ** (0.5 + delta) for lr, _, _ in groups]
        # first half-step at x_k on B
        g_a = [g + wd_of[i] * x[i] for i, g in enumerate(grads_at(x, data[ja]))]
        x_half = [x[i] - eta[i] * g_a[i] if has_grad[ja][i] else x[i] for i in range(n)]
        if not same_batch:
            records.append((etas, gamma, curvature))
        # second half-step at x_{k+1/2} on B'
        g_b = [g + wd_of[i] * x_half[i] for i, g in enumerate(grads_at(x_half, data[jb]))]
        x_new = [x_half[i] - eta[i] * g_b[i] if has_grad[jb][i] else x_half[i] for i in range(n)]
        both = [i for i in range(n) if has_grad[ja][i] and has_grad[jb][i]]
        dx = [x_half[i] - x[i] for i in both]
        for i in both:
            big_g[i] = beta * big_g[i] + (1 - beta) * (g_b[i] - g_a[i])
        g_hat = [big_g[i] / (1 - beta ** (k + 1)) for i in both]
        curvature = vdot(g_hat, dx)
        gamma = vdot(dx, dx) / curvature if curvature > 0 else nu
        gamma = min(max(gamma, bounds[0]), bounds[1])
        x = x_new
        records.append((etas, gamma, curvature))
    return x, records


def run_torch(data, params, groups, *, same_batch, foreach, has_grad=None, **options):
    """The package's optimizer on the same problem, in float64."""
    tensors = [nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in params]
    opt = StepTunedSGD(
        [{"params": [tensors[i] for i in idx], "lr": lr, "weight_decay": wd} for lr, wd, idx in groups],
        same_batch=same_batch,
        foreach=foreach,
        **options,
    )
    records = []

    def loss_on(j):
        x, y = (torch.tensor(a) for a in data[j])
        return ((x @ tensors[0] + tensors[1] - y) ** 2).mean()

    def drop_missing(j):
        for i, t in enumerate(tensors):
            if has_grad is not None and not has_grad[j][i]:
                t.grad = None

    for j in range(len(data)):
        if same_batch:
            def closure(j=j):
                opt.zero_grad()
                loss = loss_on(j)
                loss.backward()
                drop_missing(j)
                return loss
            opt.step(closure)
        else:
            opt.zero_grad()
            loss = loss_on(j)
            loss.backward()
            drop_missing(j)
            opt.step(loss=loss)
        records.append(
            (
                [g["effective_lr"] for g in opt.param_groups],
                opt.param_groups[0]["gain"],
                opt.param_groups[0]["curvature"],
            )
        )
    return [t.detach().numpy() for t in tensors], records, opt


def assert_records_match(got, expected):
    assert len(got) == len(expected)
    for (lrs, gain, curv), (lrs_ref, gain_ref, curv_ref) in zip(got, expected):
        np.testing.assert_allclose(lrs, lrs_ref, rtol=1e-10, atol=0)
        assert gain == pytest.approx(gain_ref, rel=1e-10, abs=0)
        if np.isnan(curv_ref):
            assert np.isnan(curv)
        else:
            assert curv == pytest.approx(curv_ref, rel=1e-9, abs=1e-13)


LAYOUTS = {
    "one-group": lambda lr, wd: [(lr, wd, [0, 1])],
    "two-groups": lambda lr, wd: [(lr, wd, [0]), (lr * 0.4, wd * 3.0, [1])],
}
OPTIONS = dict(beta=0.9, nu=2.0, bounds=(0.5, 2.0), delta=0.001)


def torch_options(options):
    return {"beta": options["beta"], "nu": options["nu"], "gain_bounds": options["bounds"], "delta": options["delta"]}


# ----------------------------------------------------------------------------- reference tests


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize(
    "same_batch,weight_decay,layout",
    list(itertools.product([False, True], [0.0, 0.05], ["one-group", "two-groups"])),
)
def test_matches_reference(same_batch, weight_decay, layout, foreach):
    """≥ 30 iterations on a stream of mini-batches, both readings of B', at 1e-10."""
    iterations = 32
    data, params = make_problem(iterations if same_batch else 2 * iterations)
    groups = LAYOUTS[layout](0.3, weight_decay)
    expected, expected_records = reference(data, params, groups, same_batch=same_batch, **OPTIONS)
    got, records, opt = run_torch(data, params, groups, same_batch=same_batch, foreach=foreach, **torch_options(OPTIONS))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert_records_match(records, expected_records)
    assert opt.state["global"]["iteration"] == iterations
    # The run must exercise the gain's regimes: clipped above, clipped below and in between.
    gains = [gain for _, gain, _ in expected_records]
    assert min(gains) == 0.5 and any(0.5 < g < 2.0 for g in gains)


def test_missing_gradients_follow_the_documented_rule():
    """A parameter without a gradient at one half-step takes the other and stays out of the gain."""
    data, params = make_problem(40, seed=3)
    has_grad = [[True, True] for _ in data]
    for j in (2, 7, 12, 13, 21, 30):  # first halves, second halves, and a whole iteration
        has_grad[j][1] = False
    has_grad[16][0] = False
    groups = LAYOUTS["two-groups"](0.3, 0.05)
    expected, expected_records = reference(data, params, groups, same_batch=False, has_grad=has_grad, **OPTIONS)
    for foreach in (True, False):
        got, records, _ = run_torch(
            data, params, groups, same_batch=False, foreach=foreach, has_grad=has_grad, **torch_options(OPTIONS)
        )
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        assert_records_match(records, expected_records)
    # ... and the rule matters: ignoring the gaps gives another trajectory.
    plain, _ = reference(data, params, groups, same_batch=False, **OPTIONS)
    assert not np.allclose(plain[1], expected[1], rtol=1e-6)


@pytest.mark.parametrize("same_batch", [False, True], ids=["next-batch", "same-batch"])
@pytest.mark.parametrize("curvature", ["positive-definite", "indefinite"])
def test_exact_gradients_give_the_clipped_barzilai_borwein_gain(same_batch, curvature):
    """On a quadratic with exact gradients and beta=0, γ = clip(‖Δx‖²/⟨HΔx, Δx⟩) or ν."""
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    eigenvalues = np.array([0.3, 0.7, 1.2, 2.0, 3.5, 6.0])
    if curvature == "indefinite":
        eigenvalues[:2] = [-1.5, -0.4]
    h = q @ np.diag(eigenvalues) @ q.T
    b = rng.normal(size=6)
    x = nn.Parameter(torch.tensor(rng.normal(size=6)))
    h_t, b_t = torch.tensor(h), torch.tensor(b)
    bounds, nu = (0.5, 2.0), 1.25
    opt = StepTunedSGD([x], lr=0.3, beta=0.0, nu=nu, gain_bounds=bounds, same_batch=same_batch)

    def loss_fn():
        return 0.5 * x @ h_t @ x - b_t @ x

    seen = []
    for _ in range(30):
        x_k = x.detach().clone().numpy()
        gamma_k = opt.state["global"]["gain"] if opt.state else 1.0
        eta = opt.param_groups[0]["lr"] * gamma_k / (opt.state["global"]["iteration"] + 1 if opt.state else 1) ** 0.501
        if same_batch:
            def closure():
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss
            opt.step(closure)
        else:
            for _ in range(2):  # the "next" mini-batch is the full batch again
                opt.zero_grad()
                loss_fn().backward()
                opt.step()
        dx = -eta * (h @ x_k - b)  # the first half-step, exact gradient
        dx_h_dx = dx @ h @ dx
        expected = dx @ dx / dx_h_dx if dx_h_dx > 0 else nu
        expected = min(max(expected, bounds[0]), bounds[1])
        assert opt.param_groups[0]["gain"] == pytest.approx(expected, rel=1e-10)
        assert opt.param_groups[0]["curvature"] == pytest.approx(dx_h_dx, rel=1e-9, abs=1e-15)
        seen.append("nu" if dx_h_dx <= 0 else "clipped" if expected in bounds else "bb")
    if curvature == "indefinite":
        assert "nu" in seen
    else:
        assert "bb" in seen


# ----------------------------------------------------------------------------- resume, skip, errors


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def tiny_batches(n: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)) for _ in range(n)]


def half_step(model, opt, batch, *, poison: str = "") -> None:
    x, y = batch
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if poison == "grad":
        model[0].weight.grad[0, 0] = float("inf")
    elif poison == "loss":
        loss = loss * float("nan")
    opt.step(loss=loss)


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {}
    for key, value in opt.state_dict()["state"].items():
        for name, item in value.items():
            state[(key, name)] = item.clone() if isinstance(item, torch.Tensor) else list(item) if isinstance(item, list) else item
    return params, state


def assert_same(a, b):
    (params_a, state_a), (params_b, state_b) = a, b
    for x, y in zip(params_a, params_b, strict=True):
        assert torch.equal(x, y)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        x, y = state_a[key], state_b[key]
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, key


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_resume_between_the_two_half_steps_is_bit_identical(weight_decay, foreach):
    data = tiny_batches(20)
    model = tiny_model()
    opt = StepTunedSGD(model.parameters(), lr=0.2, weight_decay=weight_decay, foreach=foreach)
    for batch in data[:7]:  # an odd number: the state is saved after a first half-step
        half_step(model, opt, batch)
    assert opt.state["global"]["phase"] == 1
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for batch in data[7:]:
        half_step(model, opt, batch)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = tiny_model(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = StepTunedSGD(resumed_model.parameters(), lr=0.2, weight_decay=weight_decay, foreach=foreach)
    resumed.load_state_dict(saved["opt"])
    assert resumed.state["global"]["phase"] == 1
    for batch in data[7:]:
        half_step(resumed_model, resumed, batch)
    assert_same(snapshot(model, opt), snapshot(resumed_model, resumed))
    assert opt.state["global"]["iteration"] == 10


@pytest.mark.parametrize("poison", ["grad", "loss"])
@pytest.mark.parametrize("at", [4, 5], ids=["at-first-half", "at-second-half"])
def test_a_skipped_half_step_changes_nothing(poison, at):
    """Params and state untouched, the phase kept: the run then equals one that never saw the batch."""
    data = tiny_batches(12)
    model, reference_model = tiny_model(), tiny_model()
    opt = StepTunedSGD(model.parameters(), lr=0.2, weight_decay=1e-2)
    reference_opt = StepTunedSGD(reference_model.parameters(), lr=0.2, weight_decay=1e-2)
    for batch in data[:at]:
        half_step(model, opt, batch)
        half_step(reference_model, reference_opt, batch)
    before = snapshot(model, opt)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        half_step(model, opt, data[at], poison=poison)
    after = snapshot(model, opt)
    after[1][("global", "skipped_steps")] -= 1
    assert_same(before, after)
    assert opt.state["global"]["skipped_steps"] == 1
    for batch in data[at + 1 :]:
        half_step(model, opt, batch)
        half_step(reference_model, reference_opt, batch)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(a, b)


def test_same_batch_skip_restores_the_first_half_step():
    """With same_batch, a non-finite second gradient undoes the first half-step exactly."""
    data = tiny_batches(4)
    model = tiny_model()
    opt = StepTunedSGD(model.parameters(), lr=0.2, same_batch=True)
    calls = 0

    def closure_for(batch, poison_second=False):
        def closure():
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(batch[0]), batch[1])
            loss.backward()
            if poison_second and calls % 2 == 0:
                model[2].bias.grad[0] = float("nan")
            return loss
        return closure

    for batch in data[:3]:
        opt.step(closure_for(batch))
    assert calls == 6  # twice per step
    before = snapshot(model, opt)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        returned = opt.step(closure_for(data[3], poison_second=True))
    assert isinstance(returned, torch.Tensor) and torch.isfinite(returned)
    after = snapshot(model, opt)
    after[1][("global", "skipped_steps")] -= 1
    assert_same(before, after)


def test_same_batch_needs_a_closure_and_says_so():
    model = tiny_model()
    opt = StepTunedSGD(model.parameters(), same_batch=True)
    assert opt.calls_closure_twice
    assert not StepTunedSGD(model.parameters()).calls_closure_twice
    with pytest.raises(AttributeError):
        opt.calls_closure_twice = False  # read-only
    x, y = tiny_batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match=r"closure.*twice.*same_batch=False"):
        opt.step()
    with pytest.raises(ValueError, match="closure"):
        opt.step(loss=torch.tensor(1.0))


def test_same_batch_evaluates_the_closure_at_both_points():
    """The second closure call sees x_{k+1/2} = x_k − η_k·g_a."""
    data = tiny_batches(1)
    model = tiny_model()
    opt = StepTunedSGD(model.parameters(), lr=0.2, same_batch=True)
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(data[0][0]), data[0][1])
        loss.backward()
        seen[-1].append([p.grad.clone() for p in model.parameters()])
        return loss

    opt.step(closure)
    assert len(seen) == 2
    *x_k, g_a = seen[0]
    *x_half, _ = seen[1]
    for a, b, g in zip(x_half, x_k, g_a):
        torch.testing.assert_close(a, b - 0.2 * g, rtol=0, atol=1e-7)


def test_lr_change_between_the_half_steps_applies_from_the_next_iteration():
    model = nn.Linear(3, 1).double()
    opt = StepTunedSGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randn(5, 1, generator=gen, dtype=torch.float64))
        for _ in range(3)
    ]

    def backward(batch):
        opt.zero_grad()
        nn.functional.mse_loss(model(batch[0]), batch[1]).backward()

    backward(batches[0])
    opt.step()
    eta_0 = opt.param_groups[0]["effective_lr"]
    opt.param_groups[0]["lr"] = 1.0
    backward(batches[1])
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for p, x, g in zip(model.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), x - eta_0 * g, rtol=0, atol=1e-15)
    assert opt.param_groups[0]["effective_lr"] == eta_0
    backward(batches[2])
    opt.step()
    gain = opt.state["global"]["gain"]
    assert opt.param_groups[0]["effective_lr"] == pytest.approx(1.0 * gain / 2**0.501, rel=1e-12)


@pytest.mark.parametrize("same_batch", [False, True], ids=["next-batch", "same-batch"])
def test_one_device_to_host_read_per_step(monkeypatch, same_batch):
    reads = 0
    original = torch.Tensor.tolist

    def counting_tolist(self):
        nonlocal reads
        reads += 1
        return original(self)

    model = tiny_model()
    opt = StepTunedSGD(model.parameters(), weight_decay=1e-2, same_batch=same_batch)
    data = tiny_batches(4)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() called during step"))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("float() called during step"))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("bool() called during step"))
    for step, (x, y) in enumerate(data, start=1):
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        if same_batch:
            opt.step(closure)
        else:
            loss = closure()
            opt.step(loss=loss)
        assert reads == step  # both half-steps read the device once


def test_invalid_arguments_name_the_argument():
    params = [nn.Parameter(torch.zeros(2))]
    for bad, name in [
        ({"lr": -1.0}, "lr"),
        ({"nu": 0.0}, "nu"),
        ({"beta": 1.0}, "beta"),
        ({"gain_bounds": (0.0, 2.0)}, r"gain_bounds\[0\]"),
        ({"gain_bounds": (2.0, 1.0)}, r"gain_bounds\[1\]"),
        ({"gain_bounds": 2.0}, "gain_bounds"),
        ({"delta": 0.5}, "delta"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"same_batch": 1}, "same_batch"),
    ]:
        with pytest.raises(ValueError, match=name):
            StepTunedSGD(params, **bad)


def test_shared_options_must_agree_across_groups():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        StepTunedSGD([{"params": [a]}, {"params": [b], "beta": 0.5}])
    with pytest.raises(ValueError, match="same_batch"):
        StepTunedSGD([{"params": [a]}, {"params": [b], "same_batch": True}])
