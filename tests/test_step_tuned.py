"""Step-Tuned SGD against docs/algorithms.md §5, computed independently in float64 NumPy loops."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import least_squares_loss_and_grads, make_least_squares, vdot
from lightning_adaptive_lr import StepTunedSGD
from lightning_adaptive_lr.optim.step_tuned import step_tuned_curvature, step_tuned_gain, step_tuned_step_size


# ----------------------------------------------------------------------------- the reference


def reference(data, params, groups, *, beta, nu, bounds, delta, same_batch, has_grad=None):
    """docs/algorithms.md §5, literally, with its two readings of B'.

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
        g_a = [g + wd_of[i] * x[i] for i, g in enumerate(least_squares_loss_and_grads(x, data[ja])[1])]
        x_half = [x[i] - eta[i] * g_a[i] if has_grad[ja][i] else x[i] for i in range(n)]
        if not same_batch:
            records.append((etas, gamma, curvature))
        # second half-step at x_{k+1/2} on B'
        g_b = [g + wd_of[i] * x_half[i] for i, g in enumerate(least_squares_loss_and_grads(x_half, data[jb])[1])]
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
    data, params = make_least_squares(iterations if same_batch else 2 * iterations)
    groups = LAYOUTS[layout](0.3, weight_decay)
    expected, expected_records = reference(data, params, groups, same_batch=same_batch, **OPTIONS)
    got, records, opt = run_torch(data, params, groups, same_batch=same_batch, foreach=foreach, **torch_options(OPTIONS))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert_records_match(records, expected_records)
    assert opt.param_groups[0]["iteration"] == iterations
    # The run must exercise the gain's regimes: clipped above, clipped below and in between.
    gains = [gain for _, gain, _ in expected_records]
    assert min(gains) == 0.5 and any(0.5 < g < 2.0 for g in gains)


def test_missing_gradients_follow_the_documented_rule():
    """A parameter without a gradient at one half-step takes the other and stays out of the gain."""
    data, params = make_least_squares(40, seed=3)
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
        gamma_k = opt.param_groups[0]["gamma"]
        eta = opt.param_groups[0]["lr"] * gamma_k / (opt.param_groups[0]["iteration"] + 1) ** 0.501
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
    """Parameters, and the optimizer's state: per parameter, and the values its param groups keep."""
    params = [p.detach().clone() for p in model.parameters()]
    saved = opt.state_dict()
    state = {}
    for key, value in saved["state"].items():
        for name, item in value.items():
            state[(key, name)] = item.clone() if isinstance(item, torch.Tensor) else list(item) if isinstance(item, list) else item
    for i, group in enumerate(saved["param_groups"]):
        for name, item in group.items():
            if name != "params":
                state[("group", i, name)] = item
    return params, state


def shared(opt, name):
    """An optimizer-wide value (every param group holds it, equally)."""
    values = {group[name] for group in opt.param_groups}
    assert len(values) == 1, (name, values)
    return values.pop()


def uncount_skip(snap) -> None:
    """Take one skipped step off a snapshot's counters (every param group counts it)."""
    for key in snap[1]:
        if key[0] == "group" and key[2] in ("skipped_steps", "consecutive_skips"):
            snap[1][key] -= 1


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
    assert shared(opt, "phase") == 1
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
    assert shared(resumed, "phase") == 1
    for batch in data[7:]:
        half_step(resumed_model, resumed, batch)
    assert_same(snapshot(model, opt), snapshot(resumed_model, resumed))
    assert shared(opt, "iteration") == 10


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
    uncount_skip(after)
    assert_same(before, after)
    assert shared(opt, "skipped_steps") == 1
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
    uncount_skip(after)
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
    gain = shared(opt, "gamma")
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


# ----------------------------------------------------------------------------- the scalar rules, on floats


def test_scalar_rules_on_floats():
    assert step_tuned_step_size(0.3, 2.0, 0, 0.0) == pytest.approx(0.6)
    assert step_tuned_step_size(0.3, 0.5, 3, 0.001) == pytest.approx(0.15 / 4**0.501, rel=1e-15)
    # Two groups: Δx = −η·g_a per group, so ‖Δx‖² = Σ η²‖g_a‖² and
    # ⟨Ĝ, Δx⟩ = Σ η(β⟨D, g_a⟩ + (1−β)(‖g_a‖² − ⟨g_b, g_a⟩))/(1 − β^(k+1)).
    lrs, avg_dots, sqnorms, cross_dots = [0.1, 0.2], [1.0, -2.0], [3.0, 5.0], [0.5, 1.0]
    curvature, dx_sqnorm = step_tuned_curvature(lrs, avg_dots, sqnorms, cross_dots, beta=0.9, iteration=1)
    assert curvature == pytest.approx((0.1 * (0.9 * 1.0 + 0.1 * 2.5) + 0.2 * (0.9 * -2.0 + 0.1 * 4.0)) / (1 - 0.81))
    assert dx_sqnorm == pytest.approx(0.01 * 3.0 + 0.04 * 5.0)
    bounds = (0.5, 2.0)
    assert step_tuned_gain(2.0, 2.5, nu=1.25, bounds=bounds) == 1.25  # Barzilai–Borwein, inside the bounds
    assert step_tuned_gain(1.0, 9.0, nu=1.25, bounds=bounds) == 2.0  # clipped above
    assert step_tuned_gain(1.0, 0.1, nu=1.25, bounds=bounds) == 0.5  # clipped below
    assert step_tuned_gain(0.0, 1.0, nu=1.25, bounds=bounds) == 1.25  # not positive: ν
    assert step_tuned_gain(-3.0, 1.0, nu=3.0, bounds=bounds) == 2.0  # ν is clipped too


# ----------------------------------------------------------------------------- state layout


def to_release_0_1(state_dict):
    """The same state in release 0.1's layout: shared values and the pending half-step in ``state["global"]``."""
    groups = state_dict["param_groups"]
    first = groups[0]
    legacy = {key: first[key] for key in ("step", "skipped_steps", "iteration", "phase")}
    legacy.update(gain=first["gamma"], curvature=first["curvature"])
    if first["phase"] == 1:
        legacy.update(
            half_step_lrs=[g["half_step_lr"] for g in groups],
            first_half_members=sorted(k for k, s in state_dict["state"].items() if s["first_grad_pending"]),
            first_half_avg_dots=[g["first_half_avg_dot"] for g in groups],
            first_half_sqnorms=[g["first_half_sqnorm"] for g in groups],
        )
    moved = {*StepTunedSGD.group_state, "half_step_lr", "first_half_avg_dot", "first_half_sqnorm"}
    state = {k: {n: v for n, v in s.items() if n != "first_grad_pending"} for k, s in state_dict["state"].items()}
    return {
        "state": {**state, "global": legacy},
        "param_groups": [{k: v for k, v in g.items() if k not in moved} for g in groups],
    }


def two_groups(model: nn.Module) -> StepTunedSGD:
    params = list(model.parameters())
    return StepTunedSGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.2, weight_decay=1e-2)


@pytest.mark.parametrize("saved_after", [7, 8], ids=["between-half-steps", "between-iterations"])
def test_release_0_1_state_dict_resumes_exactly(saved_after):
    """A state dict in the old layout (``state["global"]``) loads and continues bit for bit, also mid-iteration.

    Parameter 1 misses its gradient at the 7th call (a first half-step): the pending iteration's
    members matter.
    """
    data = tiny_batches(16)
    model = tiny_model()
    opt = two_groups(model)

    def run(m, o, batches, offset):
        for j, batch in enumerate(batches, start=offset):
            x, y = batch
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if j == 6:
                m[0].bias.grad = None
            o.step()

    run(model, opt, data[:saved_after], 0)
    legacy = to_release_0_1(opt.state_dict())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": legacy}, buffer)
    run(model, opt, data[saved_after:], saved_after)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = tiny_model(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed = two_groups(resumed_model)
    resumed.load_state_dict(saved["opt"])
    assert all(isinstance(key, torch.Tensor) for key in resumed.state)
    assert shared(resumed, "phase") == saved_after % 2
    run(resumed_model, resumed, data[saved_after:], saved_after)
    assert_same(snapshot(model, opt), snapshot(resumed_model, resumed))


@pytest.mark.parametrize("same_batch", [False, True], ids=["next-batch", "same-batch"])
def test_state_initialization_creates_the_state_and_moves_nothing(same_batch):
    """torch.distributed.checkpoint's first step (zero grads, lr = 0, no closure): the full state, no step.

    The keys of ``state[p]`` are then those every later step has (what a distributed checkpoint's
    template needs), and the run continues as a fresh optimizer's.
    """
    data = tiny_batches(5)
    model, fresh_model = tiny_model(), tiny_model()
    opt = StepTunedSGD(model.parameters(), lr=0.2, same_batch=same_batch)
    fresh = StepTunedSGD(fresh_model.parameters(), lr=0.2, same_batch=same_batch)
    before = snapshot(model, opt)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    opt.param_groups[0]["lr"] = 0.2
    opt.zero_grad()
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert {k: v for k, v in after[1].items() if k[0] == "group" and k[2] in StepTunedSGD.group_state} == {
        k: v for k, v in before[1].items() if k[0] == "group" and k[2] in StepTunedSGD.group_state
    }  # no step counted
    assert opt.param_groups[0]["effective_lr"] == 0.0 and opt.param_groups[0]["gain"] == 1.0  # recorded: no step
    keys = {name for key, name in (k for k in after[1] if k[0] != "group")}
    assert keys == ({"neg_grad_diff_avg"} if same_batch else {"neg_grad_diff_avg", "first_grad", "first_grad_pending"})
    assert len(opt.state) == len(list(model.parameters()))
    assert all(not t.any() for k, t in after[1].items() if isinstance(t, torch.Tensor))

    for batch in data:
        for m, o in ((model, opt), (fresh_model, fresh)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = nn.functional.mse_loss(m(batch[0]), batch[1])
                loss.backward()
                return loss
            if same_batch:
                o.step(closure)
            else:
                closure()
                o.step()
        assert all(set(state) == keys for state in opt.state.values())
    assert_same(snapshot(model, opt), snapshot(fresh_model, fresh))


@pytest.mark.parametrize("saved_after", [3, 4], ids=["between-half-steps", "between-iterations"])
def test_distributed_checkpoint_resumes_exactly(tmp_path, saved_after):
    """``torch.distributed.checkpoint``: save, then load into a new optimizer's template (as sharded strategies do)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    data = tiny_batches(10)
    model = tiny_model()
    opt = StepTunedSGD(model.parameters(), lr=0.2, weight_decay=1e-2)
    for batch in data[:saved_after]:
        half_step(model, opt, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dcp warns that no process group is initialized
        dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
        resumed_model = tiny_model(seed=99)
        resumed_model.load_state_dict(model.state_dict())
        resumed = StepTunedSGD(resumed_model.parameters(), lr=0.2, weight_decay=1e-2)
        template = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
        dcp.load(template, checkpoint_id=tmp_path)
        set_optimizer_state_dict(resumed_model, resumed, template["optim"])
    assert shared(resumed, "phase") == saved_after % 2
    for batch in data[saved_after:]:
        half_step(model, opt, batch)
        half_step(resumed_model, resumed, batch)
    assert_same(snapshot(model, opt), snapshot(resumed_model, resumed))
