"""QLAB against docs/algorithms.md §2: exact line searches on quadratics, an independent float64 loop,
the torch.optim bases, the safeguards, the probe intake and QLAB.wrap."""

from __future__ import annotations

import copy
import functools
import io
import math
import numbers
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import least_squares_loss_and_grads, make_least_squares, vdot
from lightning_adaptive_lr import QLAB
from lightning_adaptive_lr.optim import AdaptiveLROptimizer, AdaptiveOptimizer
from lightning_adaptive_lr.optim.qlab import QLABWrapper, qlab_rate, qlab_step_factor

BASES = ("sgd", "sgdm", "adam", "adamw")
#: Options under which no bound of QLAB decides anything (the pure quadratic fit).
UNBOUNDED = {"min_lr": 0.0, "max_lr": 1e12, "min_trial_lr": 1e-300, "max_growth": float("inf"), "max_lr_scale": None}


# ---------------------------------------------------------------------------------------------
# Quadratics: f(x) = ½ xᵀAx, split over two parameter tensors.


def spd_matrix(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.linspace(0.5, 6.0, n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


class Quadratic:
    """f(x) = ½ xᵀAx with x = (first, second): two parameter tensors of shapes (3,) and (2, 2)."""

    def __init__(self, seed: int = 0) -> None:
        self.a = spd_matrix(7, seed)
        gen = torch.Generator().manual_seed(seed + 100)
        start = torch.randn(7, generator=gen, dtype=torch.float64)
        self.params = [nn.Parameter(start[:3].clone()), nn.Parameter(start[3:].reshape(2, 2).clone())]

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def loss(self) -> torch.Tensor:
        x = torch.cat([p.reshape(-1) for p in self.params])
        return 0.5 * x @ self.a @ x

    def backward(self) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        value = self.loss()
        value.backward()
        return value.detach()


def test_sgd_is_steepest_descent_with_exact_line_search() -> None:
    for foreach in (True, False):
        problem = Quadratic(seed=1)
        opt = QLAB(problem.params, base="sgd", lr=0.05, foreach=foreach, **UNBOUNDED)
        for _ in range(12):
            x = problem.flat()
            g = problem.a @ x
            exact = float(g @ g / (g @ problem.a @ g))
            loss = problem.backward()
            opt.step(loss=loss, probe=problem.loss)
            expected = x - exact * g
            assert torch.linalg.norm(problem.flat() - expected) <= 1e-10 * torch.linalg.norm(expected)
            group = opt.param_groups[0]
            assert group["effective_lr"] == pytest.approx(exact, rel=1e-10)
            assert group["lr"] == group["effective_lr"]


def test_recorded_quantities_mean_what_they_say() -> None:
    problem = Quadratic(seed=2)
    rate = 0.03
    opt = QLAB(problem.params, base="sgd", lr=rate, **UNBOUNDED)
    x = problem.flat()
    g = problem.a @ x
    loss = problem.backward()
    opt.step(loss=loss, probe=problem.loss)
    group = opt.param_groups[0]
    trial = x - rate * g
    assert group["directional_derivative"] == pytest.approx(float(-rate * g @ g), rel=1e-12)
    assert group["curvature"] == pytest.approx(float(0.5 * rate**2 * g @ problem.a @ g), rel=1e-8)
    assert group["trial_loss"] == pytest.approx(float(0.5 * trial @ problem.a @ trial), rel=1e-12)
    assert group["fitted_lr"] == pytest.approx(float(g @ g / (g @ problem.a @ g)), rel=1e-8)
    assert group["effective_lr"] == group["fitted_lr"]  # no bound binds here


def adam_direction(ms, vs, g, k, betas, eps):
    """One Adam moment update in float64 (in place) and the direction m̂/(√v̂ + eps)."""
    beta1, beta2 = betas
    ms.mul_(beta1).add_((1 - beta1) * g)
    vs.mul_(beta2).add_((1 - beta2) * g * g)
    return (ms / (1 - beta1**k)) / ((vs / (1 - beta2**k)).sqrt() + eps)


@pytest.mark.parametrize("base", ["adam", "adamw"])
def test_adam_step_lands_on_the_minimizer_along_its_direction(base: str) -> None:
    problem = Quadratic(seed=3)
    wd, betas, eps = 0.05, (0.8, 0.95), 1e-8
    opt = QLAB(problem.params, base=base, lr=0.01, betas=betas, eps=eps, weight_decay=wd, **UNBOUNDED)
    m, v = torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for k in range(1, 11):
        x = problem.flat()
        g = problem.a @ x
        coupled = g + wd * x if base == "adam" else g
        d = adam_direction(m, v, coupled, k, betas, eps)
        if base == "adamw":
            d = d + wd * x
        loss = problem.backward()
        opt.step(loss=loss, probe=problem.loss)
        # The exact minimizer of f along −d: s* = ⟨g, d⟩ / ⟨d, A d⟩ (a descent direction here).
        s_star = float(g @ d / (d @ problem.a @ d))
        assert s_star > 0
        expected = x - s_star * d
        assert torch.linalg.norm(problem.flat() - expected) <= 1e-9 * torch.linalg.norm(expected)
        gradient_there = problem.a @ problem.flat()
        assert abs(float(gradient_there @ d)) <= 1e-9 * float(torch.linalg.norm(gradient_there) * torch.linalg.norm(d))


# ---------------------------------------------------------------------------------------------
# An independent float64 loop, straight from docs/algorithms.md §2, on noisy least squares.

STEPS = 30


def reference_qlab(data, params, groups, base, momentum, betas, eps, min_lr, max_lr, min_trial_lr, max_growth):
    """docs/algorithms.md §2 on the built-in bases, literally.  ``groups``: list of (lr, wd, indices)."""
    beta1, beta2 = betas
    x = [p.copy() for p in params]
    buffers = [None] * len(x)
    m = [np.zeros_like(p) for p in x]
    v = [np.zeros_like(p) for p in x]
    rates = [lr for lr, _, _ in groups]
    events = {"fallback": 0, "min_lr": 0, "max_lr": 0, "floor": 0, "growth": 0}
    history = []
    for k, batch in enumerate(data, start=1):
        f, g = least_squares_loss_and_grads(x, batch)
        delta = [None] * len(x)
        trial_rates = []
        for j, (_, wd, indices) in enumerate(groups):
            eta = max(rates[j], min_trial_lr)
            events["floor"] += eta > rates[j]
            trial_rates.append(eta)
            for i in indices:
                gi = g[i] + wd * x[i] if base in ("sgd", "sgdm", "adam") else g[i]
                if base == "sgd":
                    d = gi
                elif base == "sgdm":
                    buffers[i] = gi.copy() if buffers[i] is None else momentum * buffers[i] + gi
                    d = buffers[i]
                else:
                    m[i] = beta1 * m[i] + (1 - beta1) * gi
                    v[i] = beta2 * v[i] + (1 - beta2) * gi**2
                    d = (m[i] / (1 - beta1**k)) / (np.sqrt(v[i] / (1 - beta2**k)) + eps)
                    if base == "adamw":
                        d = d + wd * x[i]
                delta[i] = -eta * d
        f_trial, _ = least_squares_loss_and_grads([xi + di for xi, di in zip(x, delta)], batch)
        a1 = vdot(g, delta)
        a2 = f_trial - f - a1
        t = -a1 / (2 * a2) if (a1 < 0 and a2 > 0) else 1.0
        events["fallback"] += not (a1 < 0 and a2 > 0)
        for j, (_, _, indices) in enumerate(groups):
            eta = trial_rates[j]
            events["growth"] += t > max_growth
            proposed = min(t, max_growth) * eta
            events["min_lr"] += proposed < min_lr
            events["max_lr"] += proposed > max_lr
            new = min(max(proposed, min_lr), max_lr)
            for i in indices:
                x[i] = x[i] + (new / eta) * delta[i]
            rates[j] = new
        history.append((list(rates), f_trial, a1, a2))
    return x, history, events


REFERENCE_OPTIONS = {
    "momentum": 0.8,
    "betas": (0.85, 0.97),
    "eps": 1e-8,
    "min_lr": 0.004,
    "max_lr": 0.12,
    "min_trial_lr": 0.01,
    "max_growth": 1.5,
}


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("base", BASES)
def test_matches_reference_loop(base: str, foreach: bool) -> None:
    data, start = make_least_squares(STEPS, seed=4)
    lr_w, wd_w, lr_c = 0.05, 0.02, 0.006  # lr_c starts below the trial floor
    groups = [(lr_w, wd_w, [0]), (lr_c, 0.0, [1])]
    expected, history, events = reference_qlab(data, start, groups, base, **REFERENCE_OPTIONS)

    w, c = (nn.Parameter(torch.tensor(p)) for p in start)
    opt = QLAB(
        [{"params": [w], "lr": lr_w, "weight_decay": wd_w}, {"params": [c], "lr": lr_c}],
        base=base,
        foreach=foreach,
        max_lr_scale=None,  # the plain rule on every base (the anchored one: tests/test_qlab_scale.py)
        **REFERENCE_OPTIONS,
    )
    for (x, y), (rates, f_trial, a1, a2) in zip(data, history):
        x, y = torch.tensor(x), torch.tensor(y)

        def loss_at_current_params() -> torch.Tensor:
            return ((x @ w + c - y) ** 2).mean()

        opt.zero_grad()
        loss = loss_at_current_params()
        loss.backward()
        opt.step(loss=loss, probe=loss_at_current_params)
        for group, rate in zip(opt.param_groups, rates):
            assert group["effective_lr"] == pytest.approx(rate, rel=1e-10)
            assert group["lr"] == group["effective_lr"]
            assert group["trial_loss"] == pytest.approx(f_trial, rel=1e-10)
            assert group["directional_derivative"] == pytest.approx(a1, rel=1e-10)
            assert group["curvature"] == pytest.approx(a2, rel=1e-8, abs=1e-13)
    for p, e in zip((w, c), expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-10, atol=1e-12)
    # The run exercises the bounds it claims to check.
    assert events["floor"] > 0 and events["max_lr"] + events["min_lr"] + events["growth"] > 0


# ---------------------------------------------------------------------------------------------
# The bases are torch.optim's: with the rate pinned (min_lr = max_lr) QLAB is the torch optimizer.


def torch_counterpart(base: str, params, lr: float, wd: float) -> torch.optim.Optimizer:
    """``"sgdm"`` is torch's SGD with momentum, dampening 0 and no Nesterov (its defaults)."""
    if base == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    if base == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=wd)
    if base == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)


def make_mlp(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def regression_batches(n: int, dtype: torch.dtype = torch.float64, seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 2, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(10, 4, generator=gen)
        out.append((x.to(dtype), torch.sin(x @ w).to(dtype)))
    return out


def train(model: nn.Module, opt: torch.optim.Optimizer, data, *, qlab: bool = True) -> None:
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        if qlab:
            opt.step(loss=loss, probe=lambda: nn.functional.mse_loss(model(x), y))
        else:
            opt.step()


@pytest.mark.parametrize("base", BASES)
def test_pinned_rate_is_the_torch_optimizer(base: str) -> None:
    lr, wd = 0.05, 0.01
    data = regression_batches(12)
    reference_model = make_mlp(0)
    train(reference_model, torch_counterpart(base, reference_model.parameters(), lr, wd), data, qlab=False)
    model = make_mlp(0)
    opt = QLAB(model.parameters(), base=base, lr=lr, betas=(0.9, 0.99), weight_decay=wd, min_lr=lr, max_lr=lr)
    train(model, opt, data)
    for a, b in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("base", BASES)
def test_wrap_follows_the_builtin_base(base: str) -> None:
    lr, wd = 0.05, 0.01
    data = regression_batches(15)
    builtin_model = make_mlp(1)
    builtin = QLAB(builtin_model.parameters(), base=base, lr=lr, betas=(0.9, 0.99), weight_decay=wd)
    train(builtin_model, builtin, data)
    wrapped_model = make_mlp(1)
    wrapped = QLAB.wrap(torch_counterpart(base, wrapped_model.parameters(), lr, wd))
    train(wrapped_model, wrapped, data)
    for a, b in zip(builtin_model.parameters(), wrapped_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    for key in ("lr", "effective_lr", "fitted_lr", "trial_loss", "directional_derivative", "curvature"):
        assert wrapped.param_groups[0][key] == pytest.approx(builtin.param_groups[0][key], rel=1e-6)
    assert {group["fitted_lr"] for group in wrapped.param_groups} != {lr}  # the fit ran
    # The plain rule writes the fitted rate into lr; the anchored one (the Adam bases' default) keeps
    # lr, and the rate used stays within max_lr_scale·lr.
    anchored = base in ("adam", "adamw")
    rates = {group["effective_lr"] for group in wrapped.param_groups}
    assert {group["lr"] for group in wrapped.param_groups} == ({lr} if anchored else rates)
    assert (wrapped.param_groups[0]["max_lr_scale"] is None) is not anchored
    if anchored:
        assert max(rates) <= wrapped.param_groups[0]["max_lr_scale"] * lr


# ---------------------------------------------------------------------------------------------
# The probe.


def test_probe_is_called_once_per_step_at_the_trial_point_without_grad() -> None:
    for make in (
        lambda ps: QLAB(ps, base="sgd", lr=0.02, **UNBOUNDED),
        lambda ps: QLAB.wrap(torch.optim.SGD(ps, lr=0.02), **UNBOUNDED),
    ):
        problem = Quadratic(seed=4)
        opt = make(problem.params)
        seen = []

        def probe() -> torch.Tensor:
            seen.append((problem.flat(), torch.is_grad_enabled()))
            return problem.loss()

        for step in range(1, 6):
            x = problem.flat()
            rate = opt.param_groups[0]["lr"]
            loss = problem.backward()
            opt.step(loss=loss, probe=probe)
            assert len(seen) == step
            where, grad_enabled = seen[-1]
            assert not grad_enabled
            torch.testing.assert_close(where, x - rate * (problem.a @ x), rtol=1e-12, atol=1e-14)


def test_missing_probe_names_the_fixes() -> None:
    problem = Quadratic()
    opt = QLAB(problem.params)
    loss = problem.backward()
    before = problem.flat()
    with pytest.raises(RuntimeError, match=r"probe=.*set_probe.*AdaptiveLRCallback"):
        opt.step(loss=loss)
    assert torch.equal(problem.flat(), before)


def test_set_probe_is_used_until_replaced_and_probe_argument_wins() -> None:
    problem = Quadratic(seed=5)
    opt = QLAB(problem.params, lr=0.02, **UNBOUNDED)
    calls = {"registered": 0, "given": 0}

    def registered() -> torch.Tensor:
        calls["registered"] += 1
        return problem.loss()

    def given() -> torch.Tensor:
        calls["given"] += 1
        return problem.loss()

    opt.set_probe(registered)
    for _ in range(3):
        opt.step(loss=problem.backward())
    opt.step(loss=problem.backward(), probe=given)
    assert calls == {"registered": 3, "given": 1}
    opt.set_probe(None)
    with pytest.raises(RuntimeError, match="probe"):
        opt.step(loss=problem.backward())
    assert QLAB.requires_probe is True


def test_probe_loss_is_averaged_across_ranks_unless_reduced(monkeypatch) -> None:
    """The probe's value goes through the same cross-rank average as the loss (a stand-in here)."""
    averaged = []

    def stand_in(self, value: torch.Tensor) -> torch.Tensor:
        averaged.append(float(value))
        return value

    monkeypatch.setattr(QLAB, "_average_across_ranks", stand_in)
    problem = Quadratic(seed=6)
    opt = QLAB(problem.params, lr=0.02)
    loss = problem.backward()
    opt.step(loss=loss, probe=lambda: torch.tensor(123.0))
    assert averaged == [float(loss), 123.0]

    averaged.clear()
    opt.set_probe(lambda: torch.tensor(456.0), reduced=True)
    opt.set_loss(problem.backward(), reduced=True)
    opt.step()
    assert averaged == []
    assert opt.param_groups[0]["trial_loss"] == 456.0


def test_failing_probe_leaves_the_parameters_where_they_were() -> None:
    problem = Quadratic(seed=7)
    opt = QLAB(problem.params, lr=0.02)
    before = problem.flat()

    def probe() -> torch.Tensor:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(loss=problem.backward(), probe=probe)
    torch.testing.assert_close(problem.flat(), before, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# The safeguards.


def test_step_factor() -> None:
    assert qlab_step_factor(-2.0, 4.0) == 0.25
    assert qlab_step_factor(0.0, 4.0) == 1.0  # not a descent direction
    assert qlab_step_factor(1.0, 4.0) == 1.0
    assert qlab_step_factor(-2.0, 0.0) == 1.0  # no positive curvature
    assert qlab_step_factor(-2.0, -1.0) == 1.0
    assert qlab_step_factor(-2.0, float("nan")) == 1.0
    assert qlab_step_factor(-2.0, float("inf")) == 1.0


def test_bounded_rate() -> None:
    bounds = {"max_growth": 2.0, "min_lr": 0.01, "max_lr": 1.0}
    assert qlab_rate(0.25, 0.4, **bounds) == 0.1  # inside the bounds: t*·η
    assert qlab_rate(5.0, 0.1, **bounds) == 0.2  # at most max_growth trial steps
    assert qlab_rate(1e-6, 0.4, **bounds) == 0.01  # min_lr
    assert qlab_rate(1.5, 0.9, **bounds) == 1.0  # max_lr
    assert qlab_rate(float("inf"), 0.1, **{**bounds, "max_growth": float("inf")}) == 1.0


def one_parameter_step(opt_factory, grad: float, loss: float, trial_loss: float, start: float = 1.0):
    """A step on one scalar parameter with a chosen gradient, loss and probe value."""
    p = nn.Parameter(torch.tensor([start], dtype=torch.float64))
    opt = opt_factory([p])
    p.grad = torch.tensor([grad], dtype=torch.float64)
    opt.step(loss=loss, probe=lambda: trial_loss)
    return p, opt


def test_ascent_direction_keeps_the_rate() -> None:
    """Momentum can point uphill: a1 = ⟨g, Δ⟩ ≥ 0 keeps the rate and the trial point."""
    p = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))
    opt = QLAB([p], base="sgdm", lr=0.1, momentum=0.9, **UNBOUNDED)
    p.grad = torch.tensor([1.0], dtype=torch.float64)
    opt.step(loss=1.0, probe=lambda: 0.85)  # a1 = −0.1, a2 = −0.05: kept as well
    assert opt.param_groups[0]["lr"] == 0.1 and p.item() == pytest.approx(-0.1)
    p.grad = torch.tensor([-0.1], dtype=torch.float64)  # buffer 0.9·1 − 0.1 = 0.8 > 0: uphill for g < 0
    opt.step(loss=1.0, probe=lambda: 0.5)
    group = opt.param_groups[0]
    assert group["directional_derivative"] == pytest.approx(0.008)
    assert group["effective_lr"] == group["lr"] == group["fitted_lr"] == 0.1
    assert p.item() == pytest.approx(-0.1 - 0.1 * 0.8)


def test_non_positive_curvature_keeps_the_rate() -> None:
    # f(x) = −½x² at x = 1: g = −1, Δ = +η, f̃ = −½(1 + η)², a2 = −η²/2 < 0.
    eta = 0.1
    p, opt = one_parameter_step(
        lambda ps: QLAB(ps, lr=eta, **UNBOUNDED), grad=-1.0, loss=-0.5, trial_loss=-0.5 * (1 + eta) ** 2
    )
    group = opt.param_groups[0]
    assert group["curvature"] == pytest.approx(-(eta**2) / 2)
    assert group["lr"] == eta and p.item() == pytest.approx(1 + eta)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_trial_loss_keeps_the_rate_and_skips_nothing(bad: float) -> None:
    p, opt = one_parameter_step(lambda ps: QLAB(ps, lr=0.1, **UNBOUNDED), grad=1.0, loss=0.5, trial_loss=bad)
    assert opt.param_groups[0]["lr"] == 0.1 and p.item() == pytest.approx(0.9)
    assert opt.param_groups[0]["skipped_steps"] == 0 and opt.param_groups[0]["step"] == 1


def test_rate_is_clamped_to_its_bounds() -> None:
    # f(x) = ½·h·x² at x = 1, g = h: the exact rate is 1/h.
    for h, bounds, expected in ((100.0, {"min_lr": 0.05}, 0.05), (0.5, {"max_lr": 0.5}, 0.5)):
        options = {**UNBOUNDED, **bounds}
        eta = 0.1
        p, opt = one_parameter_step(
            lambda ps: QLAB(ps, lr=eta, **options), grad=h, loss=0.5 * h, trial_loss=0.5 * h * (1 - eta * h) ** 2
        )
        group = opt.param_groups[0]
        assert group["fitted_lr"] == pytest.approx(1 / h)
        assert group["effective_lr"] == group["lr"] == pytest.approx(expected)
        assert p.item() == pytest.approx(1 - expected * h)


def test_growth_is_capped() -> None:
    h, eta = 0.5, 0.1  # the exact rate 2.0 is 20 trial steps away
    p, opt = one_parameter_step(
        lambda ps: QLAB(ps, lr=eta, **{**UNBOUNDED, "max_growth": 3.0}),
        grad=h,
        loss=0.5 * h,
        trial_loss=0.5 * h * (1 - eta * h) ** 2,
    )
    assert opt.param_groups[0]["fitted_lr"] == pytest.approx(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.3)
    assert p.item() == pytest.approx(1 - 0.3 * h)


def test_trial_floor_sets_the_trial_point_not_the_step() -> None:
    problem = Quadratic(seed=8)
    floor = 0.01
    opt = QLAB(problem.params, lr=1e-9, **{**UNBOUNDED, "min_trial_lr": floor})
    x = problem.flat()
    g = problem.a @ x
    seen = []

    def probe() -> torch.Tensor:
        seen.append(problem.flat())
        return problem.loss()

    opt.step(loss=problem.backward(), probe=probe)
    torch.testing.assert_close(seen[0], x - floor * g, rtol=1e-12, atol=1e-14)
    exact = float(g @ g / (g @ problem.a @ g))
    assert opt.param_groups[0]["lr"] == pytest.approx(exact, rel=1e-10)


def test_trial_floor_rescues_the_fit_from_rounding() -> None:
    """In float32 a trial step of 1e-7 changes the loss by less than its rounding: the fit is noise.

    With the floor the rate found is the exact line search's, within float32 accuracy."""
    problem = Quadratic(seed=9)
    a32 = problem.a.float()
    params = [nn.Parameter(p.detach().float()) for p in problem.params]

    def loss() -> torch.Tensor:
        x = torch.cat([p.reshape(-1) for p in params])
        return 0.5 * x @ a32 @ x

    x = torch.cat([p.detach().reshape(-1) for p in params]).double()
    g = problem.a @ x
    exact = float(g @ g / (g @ problem.a @ g))
    results = {}
    for floor in (1e-12, 1e-2):
        for p, q in zip(params, problem.params):
            p.data.copy_(q.detach().float())
            p.grad = None
        opt = QLAB(params, lr=1e-7, **{**UNBOUNDED, "min_trial_lr": floor})
        value = loss()
        value.backward()
        opt.step(loss=value, probe=loss)
        results[floor] = opt.param_groups[0]["lr"]
    assert results[1e-2] == pytest.approx(exact, rel=1e-3)
    assert results[1e-12] != pytest.approx(exact, rel=0.1)


def test_non_finite_gradient_skips_the_whole_step_without_probing() -> None:
    for make in (lambda ps: QLAB(ps, base="adam"), lambda ps: QLAB.wrap(torch.optim.Adam(ps, lr=0.01))):
        model = make_mlp(2)
        opt = make(list(model.parameters()))
        data = regression_batches(4)
        train(model, opt, data[:3])
        params_before = [p.detach().clone() for p in model.parameters()]
        state_before = copy.deepcopy(opt.state_dict())
        x, y = data[3]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        next(iter(model.parameters())).grad[0, 0] = float("inf")
        calls = []
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            opt.step(loss=loss, probe=lambda: calls.append(1))
        assert calls == []
        for a, b in zip(params_before, model.parameters()):
            assert torch.equal(a, b)
        state_after = opt.state_dict()
        assert [g["skipped_steps"] for g in state_after["param_groups"]] == [1] * len(state_after["param_groups"])
        for group in state_after["param_groups"]:
            group["skipped_steps"] = group["consecutive_skips"] = 0
        assert_equal_nested(state_before, state_after)


def assert_equal_nested(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_nested(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_nested(x, y)
    else:
        both_nan = all(isinstance(v, numbers.Real) and math.isnan(v) for v in (a, b))
        assert a == b or both_nan  # NaN equals nothing, itself included


# ---------------------------------------------------------------------------------------------
# QLAB.wrap on an optimizer QLAB has no built-in base for.


def make_wrapped(params, foreach: bool | None = None) -> QLABWrapper:
    return QLAB.wrap(torch.optim.RAdam(params, lr=0.01, weight_decay=1e-3, foreach=foreach), max_growth=2.0)


def test_wrap_shares_param_groups_with_the_base() -> None:
    model = make_mlp(3)
    base = torch.optim.RAdam(model.parameters(), lr=0.01)
    opt = QLAB.wrap(base)
    assert opt.param_groups is base.param_groups
    assert isinstance(opt, AdaptiveLROptimizer) and opt.requires_probe and opt.base_optimizer is base
    extra = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "lr": 0.002})
    assert len(base.param_groups) == 2 and base.param_groups[1]["betas"] == (0.9, 0.999)
    assert base.param_groups[1]["min_trial_lr"] == opt.defaults["min_trial_lr"]


def test_scheduler_on_the_base_sets_the_next_trial_rate() -> None:
    problem = Quadratic(seed=10)
    base = torch.optim.SGD(problem.params, lr=0.02)
    opt = QLAB.wrap(base, **UNBOUNDED)
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda epoch: 0.5)  # sets lr = 0.01 each step
    seen = []

    def probe() -> torch.Tensor:
        seen.append(problem.flat())
        return problem.loss()

    for _ in range(3):
        loss = problem.backward()
        opt.step(loss=loss, probe=probe)
        scheduler.step()
    x = problem.flat()
    g = problem.a @ x
    opt.step(loss=problem.backward(), probe=probe)
    torch.testing.assert_close(seen[-1], x - 0.01 * g, rtol=1e-12, atol=1e-14)


def test_wrap_foreach_matches_per_tensor() -> None:
    # In float64: torch's RAdam itself rounds differently on its two paths, and the fit's
    # curvature (a difference of nearly equal losses) would magnify float32 rounding.
    results = []
    data = regression_batches(15)
    for foreach in (True, False):
        model = make_mlp(4)
        train(model, make_wrapped(model.parameters(), foreach=foreach), data)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_wrap_state_dict_resumes_bit_identically() -> None:
    data = regression_batches(16)
    model = make_mlp(5)
    opt = make_wrapped(model.parameters())
    train(model, opt, data[:8])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, data[8:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = make_mlp(99)
    resumed_model.load_state_dict(saved["model"])
    resumed = make_wrapped(resumed_model.parameters())
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups is resumed.base_optimizer.param_groups
    assert resumed.param_groups[0]["step"] == 8
    train(resumed_model, resumed, data[8:])
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert_equal_nested(opt.state_dict(), resumed.state_dict())


def test_wrap_deepcopy_and_pickle_continue_identically() -> None:
    data = regression_batches(12)
    model = make_mlp(6)
    opt = make_wrapped(model.parameters())
    train(model, opt, data[:6])
    for clone in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        model_copy, opt_copy = clone((model, opt))
        assert opt_copy.param_groups is opt_copy.base_optimizer.param_groups
        assert opt_copy.param_groups[0]["params"][0] is next(model_copy.parameters())
        train(model_copy, opt_copy, data[6:])
        reference_model, reference_opt = copy.deepcopy((model, opt))
        train(reference_model, reference_opt, data[6:])
        for a, b in zip(model_copy.parameters(), reference_model.parameters()):
            assert torch.equal(a, b)
        assert opt_copy.base_optimizer.state_dict()["state"][0]["step"] == 12


def test_wrap_leaves_parameters_without_gradient_alone() -> None:
    model = make_mlp(7)
    unused = nn.Parameter(torch.randn(3, dtype=torch.float64))
    before = unused.detach().clone()
    opt = make_wrapped([*model.parameters(), unused])
    train(model, opt, regression_batches(4))
    assert torch.equal(unused, before)
    assert unused not in opt.state and unused not in opt.base_optimizer.state


def test_invalid_arguments() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    for bad in (
        {"base": "rmsprop"},
        {"lr": -0.1},
        {"momentum": 1.0},
        {"betas": (0.9, 1.0)},
        {"eps": -1.0},
        {"weight_decay": -1.0},
        {"min_lr": -1.0},
        {"max_lr": 0.0},
        {"min_lr": 1.0, "max_lr": 0.1},
        {"min_trial_lr": 0.0},
        {"max_growth": 0.5},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QLAB(params, **bad)
    base = torch.optim.SGD(params, lr=0.1)
    for bad in ({"min_lr": -1.0}, {"max_lr": float("nan")}, {"min_trial_lr": 0.0}, {"max_growth": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QLAB.wrap(base, **bad)
    with pytest.raises(ValueError, match="optimizer"):
        QLAB.wrap(QLAB(params))
    with pytest.raises(ValueError, match="optimizer"):
        QLAB.wrap(params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="base"):
        QLAB([{"params": params}, {"params": [nn.Parameter(torch.zeros(1))], "base": "adam"}])


def test_probe_registered_inside_the_closure_is_used() -> None:
    """Lightning's closure runs the hooks where the callback registers this step's probe."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = QLAB(model.parameters(), base="sgd", lr=0.1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    calls = []

    def probe():
        calls.append(1)
        return torch.nn.functional.mse_loss(model(x), y)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.set_probe(probe)
        return loss

    opt.step(closure)
    assert calls == [1]
    opt.set_probe(None)
    with pytest.raises(RuntimeError, match="probe"):
        opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))


# ---------------------------------------------------------------------------------------------
# State layout: keyed by parameters only; torch.distributed.checkpoint's state initialization.


#: Every built-in base (with weight decay: it moves the parameters even where the gradient is 0) and
#: QLAB.wrap on torch optimizers with per-parameter state.
MAKERS = {
    **{base: functools.partial(QLAB, base=base, lr=0.05, weight_decay=0.1) for base in BASES},
    "wrap(Adam)": lambda ps: QLAB.wrap(torch.optim.Adam(ps, lr=0.01)),
    "wrap(AdamW)": lambda ps: QLAB.wrap(torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1)),
    "wrap(SGD-M)": lambda ps: QLAB.wrap(torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_is_keyed_by_parameters_and_step_counts_live_in_the_groups(name: str) -> None:
    model = make_mlp(8)
    opt = MAKERS[name](list(model.parameters()))
    train(model, opt, regression_batches(3))
    saved = opt.state_dict()
    assert all(isinstance(key, int) for key in saved["state"])
    assert all(isinstance(key, torch.Tensor) for key in opt.state)
    assert [(g["step"], g["skipped_steps"]) for g in saved["param_groups"]] == [(3, 0)] * len(saved["param_groups"])


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_initialization_creates_the_state_without_moving(name: str) -> None:
    """torch.distributed.checkpoint steps a fresh optimizer with zero gradients, every lr 0, no loss, no probe."""
    model = make_mlp(9)
    opt = MAKERS[name](list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    adam = {"step", "exp_avg", "exp_avg_sq"}
    expected = {"sgd": set(), "sgdm": {"momentum_buffer"}, "wrap(SGD-M)": {"momentum_buffer"}}.get(name, adam)
    for p in model.parameters():
        assert set(opt.state[p]) == expected


@pytest.mark.parametrize("name", list(MAKERS))
def test_distributed_checkpoint_state_dict_round_trip(name: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    data = regression_batches(8)
    make = MAKERS[name]
    model = make_mlp(10)
    opt = make(list(model.parameters()))
    fresh = get_optimizer_state_dict(model, opt)  # initializes the state of a fresh optimizer
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), make_mlp(10).parameters()))
    assert all(isinstance(key, str) for key in fresh["state"])
    train(model, opt, data[:4])
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt))

    resumed_model = make_mlp(99)
    resumed_model.load_state_dict(model.state_dict())
    resumed = make(list(resumed_model.parameters()))
    set_optimizer_state_dict(resumed_model, resumed, saved)
    assert resumed.param_groups[0]["step"] == 4
    train(model, opt, data[4:])
    train(resumed_model, resumed, data[4:])
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# QLAB.wrap: the contract, its name, groups added to the wrapped optimizer, an optimizer of this package.


def test_wrap_satisfies_the_contract_and_shows_what_it_wraps() -> None:
    model = make_mlp(11)
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = QLAB.wrap(base)
    assert isinstance(opt, AdaptiveLROptimizer) and isinstance(opt, torch.optim.Optimizer)
    assert opt.requires_loss and opt.requires_probe and not opt.calls_closure_twice
    assert opt.state is base.state
    assert repr(opt).startswith("QLAB.wrap(SGD) (") and "Parameter Group 0" in repr(opt)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"QLAB\.wrap\(SGD\)\.step\(\) needs the mini-batch loss and a probe"):
        opt.step(loss=1.0)


def test_group_added_to_the_wrapped_optimizer_directly_joins_the_fit() -> None:
    model = make_mlp(12)
    first, second = list(model[0].parameters()), list(model[2].parameters())
    base = torch.optim.SGD(first, lr=0.05)
    opt = QLAB.wrap(base, max_growth=3.0)
    data = regression_batches(4)
    train(model, opt, data[:2])
    base.add_param_group({"params": second, "lr": 0.02})
    train(model, opt, data[2:])
    late = opt.param_groups[1]
    assert late["max_growth"] == 3.0 and late["step"] == opt.param_groups[0]["step"] == 4
    assert "effective_lr" in late and late["lr"] != 0.02


class PlainSGD(AdaptiveOptimizer):
    """A gradient-only optimizer of this package's kind: it keeps ``step`` and ``skipped_steps`` in its groups."""

    requires_loss = False

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    def _update(self, loss) -> None:
        for group in self.param_groups:
            params, grads = self._params_and_grads(group)
            for p, g in zip(params, grads):
                p.add_(g, alpha=-group["lr"])
        self._set_shared(step=self._shared("step") + 1)


def test_wrap_of_an_optimizer_of_this_package_counts_each_step_once() -> None:
    model = make_mlp(13)
    opt = QLAB.wrap(PlainSGD(model.parameters(), lr=0.05))
    data = regression_batches(5)
    train(model, opt, data[:4])
    assert opt.param_groups[0]["step"] == 4 and opt.base_optimizer._shared("step") == 4
    x, y = data[4]
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt.step(loss=float("nan"), probe=lambda: 0.0)
    assert (opt.param_groups[0]["step"], opt.param_groups[0]["skipped_steps"]) == (4, 1)


def test_wrap_loads_the_release_0_1_layout_of_a_wrapped_optimizer_of_this_package() -> None:
    """Release 0.1: ``state["global"]`` held the wrapper's scalars, ``state["base_global"]`` the wrapped optimizer's."""
    data = regression_batches(8)
    model = make_mlp(14)
    opt = QLAB.wrap(PlainSGD(model.parameters(), lr=0.05))
    train(model, opt, data[:4])
    saved = copy.deepcopy(opt.state_dict())
    scalars = ("step", "skipped_steps")
    legacy = {
        "state": {
            **saved["state"],
            "global": {"step": 4, "skipped_steps": 1},
            "base_global": {"step": 4, "skipped_steps": 2},
        },
        "param_groups": [{k: v for k, v in g.items() if k not in scalars} for g in saved["param_groups"]],
    }
    resumed_model = make_mlp(99)
    resumed_model.load_state_dict(model.state_dict())
    resumed = QLAB.wrap(PlainSGD(resumed_model.parameters(), lr=0.05))
    resumed.load_state_dict(legacy)
    assert all(isinstance(key, int) for key in resumed.state_dict()["state"])
    assert [(g["step"], g["skipped_steps"]) for g in resumed.param_groups] == [(4, 3)] * len(resumed.param_groups)
    train(model, opt, data[4:])
    train(resumed_model, resumed, data[4:])
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert resumed.param_groups[0]["step"] == 8
