"""AdaL against docs/algorithms.md §4, computed independently in float64 NumPy loops, and against Adam."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import least_squares_loss_and_grads, make_least_squares
from lightning_adaptive_lr import AdaL
from lightning_adaptive_lr.optim.adal import adal_rate, adal_scalars

STEPS = 35


def reference_adal(data, params, groups, betas, eps, transform, eps_mode, lr_decay):
    """docs/algorithms.md §4, literally.  ``groups``: list of (lr, wd, parameter indices).

    Returns the final parameters and, per step and group, (η_k, recorded gradient scale).
    """
    beta1, beta2 = betas
    x = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in x]
    v = [np.zeros_like(p) for p in x]
    records = []
    for k, batch in enumerate(data, start=1):
        g = least_squares_loss_and_grads(x, batch)[1]
        if transform == "l1":
            total = sum(np.abs(gi).sum() for gi in g)
            scales = [total] * len(g)
        elif transform == "tensor_l1":
            scales = [np.abs(gi).sum() for gi in g]
        else:
            scales = [1.0] * len(g)
        g_hat = [s * gi for s, gi in zip(scales, g)]
        m = [beta1 * mi + (1 - beta1) * gi for mi, gi in zip(m, g_hat)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g_hat)]
        m_hat = [mi / (1 - beta1**k) for mi in m]
        v_hat = [vi / (1 - beta2**k) for vi in v]
        for lr, wd, indices in groups:
            eta = lr / math.sqrt(k) if lr_decay == "inv_sqrt" else lr
            for i in indices:
                x[i] = x[i] * (1 - eta * wd)
                if eps_mode == "preconditioner":
                    x[i] = x[i] - eta * m_hat[i] * (1 / np.sqrt(v_hat[i]) + eps)
                else:
                    x[i] = x[i] - eta * m_hat[i] / (np.sqrt(v_hat[i]) + eps)
            recorded = float(np.mean([scales[i] for i in indices])) if transform == "tensor_l1" else scales[0]
            records.append((eta, recorded))
    return x, records


def run_adal(make_optimizer, data, params, groups, dtype=torch.float64):
    """The package's optimizer on the same problem; groups as (lr, wd, indices)."""
    tensors = [nn.Parameter(torch.tensor(p, dtype=dtype)) for p in params]
    opt = make_optimizer(
        [{"params": [tensors[i] for i in idx], "lr": lr, "weight_decay": wd} for lr, wd, idx in groups]
    )
    records = []
    for x_np, y_np in data:
        x, y = torch.tensor(x_np, dtype=dtype), torch.tensor(y_np, dtype=dtype)
        opt.zero_grad()
        loss = ((x @ tensors[0] + tensors[1] - y) ** 2).mean()
        loss.backward()
        opt.step()
        records.extend((group["effective_lr"], group["grad_scale"]) for group in opt.param_groups)
    return [t.detach().numpy() for t in tensors], records, opt


TWO_GROUPS = [(1e-2, 0.0, [0]), (4e-3, 0.05, [1])]


def assert_matches_reference(got, expected, got_records, expected_records):
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.array(got_records, dtype=float), np.array(expected_records), rtol=1e-10, atol=0)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_defaults_match_reference(foreach):
    data, params = make_least_squares(STEPS)
    groups = [(1e-3, 0.0, [0, 1])]
    expected, expected_records = reference_adal(
        data, params, groups, (0.9, 0.999), 1e-8, "l1", "preconditioner", "none"
    )
    got, records, _ = run_adal(lambda g: AdaL(g, foreach=foreach), data, params, groups)
    assert_matches_reference(got, expected, records, expected_records)
    assert max(np.abs(a - b).max() for a, b in zip(expected, params)) > 1e-2  # it really moved


OPTION_GRID = list(
    itertools.product(["l1", "tensor_l1", "none"], ["preconditioner", "denominator"], [1e-8, 0.1], ["none", "inv_sqrt"])
)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("transform,eps_mode,eps,lr_decay", OPTION_GRID)
def test_options_match_reference(transform, eps_mode, eps, lr_decay, foreach):
    """Every option, two param groups (their own lr and weight decay), 35 steps."""
    data, params = make_least_squares(STEPS, seed=1)
    betas = (0.8, 0.99)
    expected, expected_records = reference_adal(data, params, TWO_GROUPS, betas, eps, transform, eps_mode, lr_decay)
    got, records, _ = run_adal(
        lambda g: AdaL(
            g, betas=betas, eps=eps, transform=transform, eps_mode=eps_mode, lr_decay=lr_decay, foreach=foreach
        ),
        data,
        params,
        TWO_GROUPS,
    )
    assert_matches_reference(got, expected, records, expected_records)


def test_each_option_changes_the_trajectory():
    """The reference grid is discriminating: flipping any one option moves the result far beyond 1e-10."""
    data, params = make_least_squares(STEPS, seed=1)
    base = dict(transform="l1", eps_mode="preconditioner", eps=0.1, lr_decay="none")
    flips = [
        {"transform": "tensor_l1"},
        {"transform": "none"},
        {"eps_mode": "denominator"},
        {"lr_decay": "inv_sqrt"},
    ]

    def final(**options):
        x, _ = reference_adal(data, params, TWO_GROUPS, (0.8, 0.99), **options)
        return np.concatenate([p.ravel() for p in x])

    reference = final(**base)
    for flip in flips:
        assert np.abs(final(**{**base, **flip}) - reference).max() > 1e-4, flip


def adam_pair(weight_decay: float, foreach: bool, seed: int = 0):
    torch.manual_seed(seed)
    models = [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    adal = AdaL(
        models[0].parameters(),
        lr=1e-2,
        weight_decay=weight_decay,
        transform="none",
        eps_mode="denominator",
        foreach=foreach,
    )
    torch_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    adam = torch_cls(models[1].parameters(), lr=1e-2, weight_decay=weight_decay, foreach=True)
    return models, (adal, adam)


def train_pair(models, optimizers, steps: int, skip_grad=None):
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
        for model, opt in zip(models, optimizers):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if skip_grad is not None and step < skip_grad[1]:
                list(model.parameters())[skip_grad[0]].grad = None
            opt.step()


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["Adam", "AdamW"])
def test_no_transform_with_eps_in_denominator_is_adam(weight_decay, foreach):
    models, optimizers = adam_pair(weight_decay, foreach)
    train_pair(models, optimizers, 30)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(models[0][0].weight, adam_pair(weight_decay, foreach)[0][0][0].weight)  # it trained


def test_late_parameter_gets_adams_bias_correction():
    """A parameter whose gradient first arrives at step 6 starts its own bias correction, as in Adam."""
    models, optimizers = adam_pair(0.0, True)
    train_pair(models, optimizers, 20, skip_grad=(0, 5))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    first = next(iter(models[0].parameters()))
    assert optimizers[0].state[first]["step"] == 15
    assert optimizers[0].param_groups[0]["step"] == 20


def first_step(grad: list[float], **kwargs) -> np.ndarray:
    """The displacement of one AdaL step from x = 0 with the given gradient (float64)."""
    p = nn.Parameter(torch.zeros(len(grad), dtype=torch.float64))
    opt = AdaL([p], lr=1.0, **kwargs)
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    return p.detach().numpy().copy()


def adam_first_step(grad: list[float], eps: float) -> np.ndarray:
    p = nn.Parameter(torch.zeros(len(grad), dtype=torch.float64))
    opt = torch.optim.Adam([p], lr=1.0, eps=eps)
    p.grad = torch.tensor(grad, dtype=torch.float64)
    opt.step()
    return p.detach().numpy().copy()


def test_transform_amplifies_eps_dominated_coordinates_when_the_gradient_is_large():
    # ‖g‖₁ ≈ 100: the tiny coordinate's ĝ = 1e-7 dwarfs eps, so AdaL takes a near-full step there,
    # where Adam's step is eps-dominated: 1e-9/(1e-9 + 1e-8) ≈ 0.09.
    grad = [100.0, 1e-9]
    adam = adam_first_step(grad, eps=1e-8)
    adal = first_step(grad, eps=1e-8, eps_mode="denominator")
    s = 100.0 + 1e-9
    np.testing.assert_allclose(adam, [-100 / (100 + 1e-8), -1e-9 / (1e-9 + 1e-8)], rtol=1e-12)
    np.testing.assert_allclose(adal, [-1.0 / (1.0 + 1e-8 / (100 * s)), -(1e-9 * s) / (1e-9 * s + 1e-8)], rtol=1e-12)
    assert abs(adal[1]) > 9 * abs(adam[1])


def test_transform_shrinks_steps_when_the_gradient_is_small():
    # ‖g‖₁ = 2e-5: ĝ = 2e-10 is below eps, so AdaL's step shrinks to ≈ 0.02 where Adam's stays ≈ 1.
    grad = [1e-5, -1e-5]
    adam = adam_first_step(grad, eps=1e-8)
    adal = first_step(grad, eps=1e-8, eps_mode="denominator")
    ghat = 2e-5 * 1e-5
    np.testing.assert_allclose(adal, [-ghat / (ghat + 1e-8), ghat / (ghat + 1e-8)], rtol=1e-12)
    assert np.all(np.abs(adam) > 0.99) and np.all(np.abs(adal) < 0.03)


def test_preconditioner_eps_adds_a_momentum_step_that_grows_with_the_scale():
    # First step: m̂ = ĝ, v̂ = ĝ², so x moves by −(sign(g) + eps·ĝ).
    grad = [3.0, -1.0]
    s = 4.0
    got = first_step(grad, eps=0.01)
    np.testing.assert_allclose(got, [-(1 + 0.01 * s * 3.0), 1 + 0.01 * s * 1.0], rtol=1e-12)


def two_steps(optimizer_factory, grads):
    p = nn.Parameter(torch.zeros(len(grads[0]), dtype=torch.float64))
    opt = optimizer_factory([p])
    steps = []
    for g in grads:
        before = p.detach().clone()
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        steps.append((p.detach() - before).numpy())
    return steps


@pytest.mark.parametrize("eps_mode", ["preconditioner", "denominator"])
def test_transform_acts_through_the_moving_averages(eps_mode):
    """Without eps, Adam ignores a constant rescaling: AdaL equals Adam while ‖g‖₁ stays the same
    and departs from it at the first step where ‖g‖₁ changes (the averages then weight steps by ‖g‖₁)."""
    same_norm = [[1.0, -2.0], [-2.0, 1.0], [0.5, 2.5]]  # ‖g‖₁ = 3 every step
    new_norm = [[1.0, -2.0], [-2.0, 1.0], [5.0, 25.0]]  # ‖g‖₁ = 30 at step 3
    adam = lambda ps: torch.optim.Adam(ps, lr=1.0, eps=0.0)  # noqa: E731
    adal = lambda ps: AdaL(ps, lr=1.0, eps=0.0, eps_mode=eps_mode)  # noqa: E731
    for a, b in zip(two_steps(adal, same_norm), two_steps(adam, same_norm)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    got, ref = two_steps(adal, new_norm), two_steps(adam, new_norm)
    for a, b in zip(got[:2], ref[:2]):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert np.abs(got[2] - ref[2]).max() > 1e-2
    # Step 3 by hand: the averages see ĝ₃ = 30·g₃ against ĝ₁,₂ = 3·g₁,₂.
    beta1, beta2 = 0.9, 0.999
    g_hat = [3.0 * np.array(new_norm[0]), 3.0 * np.array(new_norm[1]), 30.0 * np.array(new_norm[2])]
    m = sum((1 - beta1) * beta1 ** (2 - j) * g for j, g in enumerate(g_hat)) / (1 - beta1**3)
    v = sum((1 - beta2) * beta2 ** (2 - j) * g * g for j, g in enumerate(g_hat)) / (1 - beta2**3)
    np.testing.assert_allclose(got[2], -m / np.sqrt(v), rtol=1e-12)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("transform", ["l1", "tensor_l1", "none"])
@pytest.mark.parametrize("eps_mode,eps", list(itertools.product(["preconditioner", "denominator"], [1e-8, 0.0])))
def test_always_zero_coordinate_stays_finite_and_unchanged(transform, eps_mode, eps, foreach):
    """Where g is always 0, m̂ = v̂ = 0: the step there must be exactly 0 (never 0·∞ = NaN)."""
    dead = 2
    data, params = make_least_squares(STEPS, seed=3, dead_feature=dead)
    groups = [(1e-2, 0.0, [0, 1])]
    got, _, opt = run_adal(
        lambda g: AdaL(g, eps=eps, transform=transform, eps_mode=eps_mode, foreach=foreach),
        data[:30],
        params,
        groups,
        dtype=torch.float32,
    )
    w = got[0]
    assert np.all(np.isfinite(w)) and np.all(np.isfinite(got[1]))
    np.testing.assert_array_equal(w[dead], params[0][dead].astype(np.float32))
    assert np.abs(np.delete(w, dead, axis=0) - np.delete(params[0], dead, axis=0)).min() > 1e-3  # the rest moved
    for state in opt.state.values():
        assert torch.isfinite(state["grad_avg"]).all() and torch.isfinite(state["grad_avg_sq"]).all()


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
def test_underflowed_second_moment_gives_a_bounded_step(foreach):
    """A float32 gradient of 1e-23 has a nonzero first moment but a second moment g² = 0
    (underflow): m̂/√v̂ is mathematically 1 on the first step and must stay bounded instead of
    becoming ~1e15."""
    p = nn.Parameter(torch.zeros(2))
    opt = AdaL([p], lr=1e-2, eps=0.0, transform="none", foreach=foreach)
    p.grad = torch.tensor([1.0, 1e-23])
    opt.step()
    state = opt.state[p]
    assert state["grad_avg"][1] != 0 and state["grad_avg_sq"][1] == 0  # the case under test
    assert torch.isfinite(p).all()
    assert p[0].item() == pytest.approx(-1e-2, rel=1e-6)
    assert abs(p[1].item()) <= 1e-2


def test_records_step_size_and_scale_per_group():
    a, b, c = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    opt = AdaL([{"params": [a, c]}, {"params": [b], "lr": 0.5}], lr=0.2, transform="tensor_l1", lr_decay="inv_sqrt")
    for k in (1, 2, 3, 4):
        a.grad = torch.tensor([1.0, -2.0, 3.0])
        b.grad = torch.tensor([0.5, 0.25])
        c.grad = torch.tensor([-4.0])
        opt.step()
        assert opt.param_groups[0]["effective_lr"] == pytest.approx(0.2 / math.sqrt(k))
        assert opt.param_groups[1]["effective_lr"] == pytest.approx(0.5 / math.sqrt(k))
    assert opt.param_groups[0]["grad_scale"] == pytest.approx((6.0 + 4.0) / 2)  # the mean over the group's tensors
    assert opt.param_groups[1]["grad_scale"] == pytest.approx(0.75)
    # "l1": every group records the one global norm; "none": 1.
    for transform, expected in (("l1", 10.75), ("none", 1.0)):
        other = AdaL([{"params": [a, c]}, {"params": [b]}], transform=transform)
        other.step()  # the gradients set above
        assert other.param_groups[0]["grad_scale"] == other.param_groups[1]["grad_scale"] == pytest.approx(expected)


def test_non_finite_gradient_skips_the_step():
    p = nn.Parameter(torch.ones(3))
    opt = AdaL([p], lr=0.1)
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    before = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)})
    p.grad = torch.tensor([1.0, float("nan"), 3.0])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    assert torch.equal(p, before[0])
    assert all(torch.equal(opt.state[p][k], v) for k, v in before[1].items())
    shared = {key: opt.param_groups[0][key] for key in AdaL.group_state}
    assert opt.state[p]["step"] == 1 and shared == {"step": 1, "skipped_steps": 1, "consecutive_skips": 1}


def test_transform_must_be_shared_by_groups():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="transform"):
        AdaL([{"params": [a]}, {"params": [b], "transform": "none"}])
    AdaL([{"params": [a]}, {"params": [b], "eps_mode": "denominator", "lr_decay": "inv_sqrt"}])  # per group: fine


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"transform": "l2"}, "transform"),
        ({"eps_mode": "inside"}, "eps_mode"),
        ({"lr_decay": "cosine"}, "lr_decay"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaL([nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("transform", ["l1", "tensor_l1", "none"])
def test_one_device_to_host_read_per_step(monkeypatch, transform):
    """The scale is read by the gate itself (with a given loss): one synchronization, nothing else."""
    monkeypatch.setattr(AdaL, "host_scalars_on_cpu", False)
    reads = 0
    original = torch.Tensor.tolist

    def counting_tolist(self):
        nonlocal reads
        reads += 1
        return original(self)

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = AdaL([{"params": model[0].parameters()}, {"params": model[1].parameters()}], transform=transform)
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() called during step"))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("float() called during step"))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("bool() called during step"))
    opt.step(loss=loss)
    assert reads == 1


def test_mixed_dtypes_keep_each_tensor_its_own_scale():
    """The multi-tensor path buckets tensors by dtype; each must still get its own ‖g‖₁ (tensor_l1)."""
    results = []
    for foreach in (True, False):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(4, dtype=dtype)) for dtype in (torch.float32, torch.float64, torch.float32)]
        opt = AdaL(params, lr=0.1, eps=0.5, transform="tensor_l1", foreach=foreach)
        for step in range(5):
            for i, p in enumerate(params):
                p.grad = (p.detach() - i) * (i + 1.0) * (step + 1)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("eps_mode", ["preconditioner", "denominator"])
@pytest.mark.parametrize("transform", ["l1", "tensor_l1"])
def test_all_zero_gradients_leave_parameters_in_place(transform, eps_mode, foreach):
    """ĝ = 0 for a whole tensor (its own ‖g‖₁ is 0, or the model's is): no step, no NaN, and the
    tensor starts moving normally once its gradient is nonzero."""
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = AdaL([a, b], lr=0.1, transform=transform, eps_mode=eps_mode, foreach=foreach)
    for step in range(6):
        a.grad = torch.zeros(3) if step < 3 else torch.tensor([1.0, -1.0, 2.0])
        b.grad = torch.zeros(2) if transform == "l1" and step < 3 else torch.tensor([0.5, -0.5])
        opt.step()
        if step < 3:
            assert torch.equal(a, torch.ones(3))
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert opt.param_groups[0]["skipped_steps"] == 0
    assert (a - 1).abs().min() > 0.1  # three full steps of ≈ lr once the gradient arrived


# ----------------------------------------------------------------------------- the scalar rule, on floats


def test_scalar_rule_is_adam_on_the_scaled_gradient():
    """The factored moments (m = Λ1·m̃, v = Λ2·ṽ) give m̂/(√v̂ + eps) and m̂·(1/√v̂ + eps) of Adam on ĝ = s·g."""
    beta1, beta2, eps, lr = 0.8, 0.99, 1e-3, 0.1
    scales = [3.0, 0.5, 7.0, 0.0, 2.0]
    grads = [1.5, -0.2, 0.7, 4.0, -1.1]
    for eps_in_denominator in (False, True):
        m = v = 0.0  # Adam's moments of ĝ, by the book
        m_t = v_t = lam1 = lam2 = 0.0  # the factored ones
        for k, (s, g) in enumerate(zip(scales, grads), start=1):
            m = beta1 * m + (1 - beta1) * s * g
            v = beta2 * v + (1 - beta2) * (s * g) ** 2
            m_hat, v_hat = m / (1 - beta1**k), v / (1 - beta2**k)
            if eps_in_denominator:
                expected = -lr * m_hat / (math.sqrt(v_hat) + eps)
            else:
                expected = -lr * m_hat * (1 / math.sqrt(v_hat) + eps)
            r = adal_scalars(
                s, lam1, lam2, k, lr=lr, betas=(beta1, beta2), eps=eps, eps_in_denominator=eps_in_denominator, floor=0.0
            )
            lam1, lam2 = r.scale_avg, r.scale_sq_avg
            m_t += r.avg_weight * (g - m_t)
            v_t = (1 - r.sq_weight) * v_t + r.sq_weight * g * g
            assert r.moves
            if eps_in_denominator:
                got = r.step_size * m_t / (math.sqrt(v_t) + r.shift)
            else:
                got = r.step_size * m_t * (1 / math.sqrt(v_t) + r.shift)
            assert got == pytest.approx(expected, rel=1e-12)
            assert lam1 * m_t == pytest.approx(m, rel=1e-12) and lam2 * v_t == pytest.approx(v, rel=1e-12)


def test_scalar_rule_keeps_a_tensor_without_scale_still_and_floors_eps():
    still = adal_scalars(0.0, 0.0, 0.0, 3, lr=1.0, betas=(0.9, 0.999), eps=1e-8, eps_in_denominator=True, floor=1e-19)
    assert (still.moves, still.step_size, still.avg_weight, still.sq_weight) == (False, 0.0, 0.0, 0.0)
    huge = adal_scalars(1e30, 0.0, 0.0, 1, lr=1.0, betas=(0.9, 0.999), eps=1e-8, eps_in_denominator=True, floor=1e-19)
    assert huge.moves and huge.shift == 1e-19  # eps/σ = 1e-38 would round to 0 in float32
    assert adal_rate(0.3, 9, "inv_sqrt") == pytest.approx(0.1) and adal_rate(0.3, 9, "none") == 0.3


# ----------------------------------------------------------------------------- distributed checkpoints


@pytest.mark.parametrize("transform", ["l1", "tensor_l1"])
def test_state_initialization_creates_the_state_and_moves_nothing(transform):
    """torch.distributed.checkpoint's first step (zero grads, lr = 0): full state at its start, no step counted."""
    models, _ = adam_pair(0.0, True)
    opt = AdaL(models[0].parameters(), lr=1e-2, transform=transform)
    fresh = AdaL(models[1].parameters(), lr=1e-2, transform=transform)
    before = [p.detach().clone() for p in models[0].parameters()]
    for p in models[0].parameters():
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    opt.param_groups[0]["lr"] = 1e-2
    assert all(torch.equal(p, b) for p, b in zip(models[0].parameters(), before))
    assert opt.param_groups[0]["step"] == 0 and len(opt.state) == len(before)
    assert (opt.param_groups[0]["effective_lr"], opt.param_groups[0]["grad_scale"]) == (0.0, 0.0)  # recorded: no step
    for p in models[0].parameters():
        state = opt.state[p]
        assert (state["step"], state["scale_avg"], state["scale_sq_avg"]) == (0, 0.0, 0.0)
        assert not state["grad_avg"].any() and not state["grad_avg_sq"].any()
    train_pair(models, (opt, fresh), 5)  # ... and the run is the one a fresh optimizer takes
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["state"].keys() == fresh.state_dict()["state"].keys()
