"""MoMo and MoMo-Adam outside the paper's assumptions (issue 13): no silent failure.

* a loss below the lower bound ``lb`` lowers it (``2·m − lb``), counts and warns, instead of a step
  size of 0 for ever;
* a finite input whose step would write a non-finite value (a gradient spike overflowing ``‖d‖²``
  or Adam's ``v`` in the parameters' precision) is skipped with state and parameters untouched,
  on every path (foreach, per-tensor, compiled);
* ``momentum`` in MoMo's param groups (what torch's momentum-cycling schedulers and Lightning's
  monitor use) is the β a step uses; MoMo-Adam's ``betas[0]`` likewise;
* MoMo-Adam trains float16 parameters.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_adaptive_lr import MoMo, MoMoAdam

pytestmark = pytest.mark.usefixtures("one_thread")


OFFSET = -5.0  # the loss is mse − 5: negative near its minimum (about −4.9)


def regression_data(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 6, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(6, 1, generator=gen, dtype=torch.float64) + 0.3 * torch.randn(256, 1, generator=gen, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def network(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1)).to(dtype)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).mean() + OFFSET


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    x, y = regression_data(next(model.parameters()).dtype)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, 256, (32,), generator=gen)
        opt.zero_grad()
        loss = loss_of(model, x[rows], y[rows])
        loss.backward()
        opt.step(loss=loss)
        losses.append(float(loss.detach()))
    return losses


# ---------------------------------------------------------------------------------------------- lb


@pytest.mark.parametrize("estimate_lb", [False, True], ids=["fixed-lb", "estimate-lb"])
@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_a_loss_below_lb_lowers_it_warns_once_and_training_goes_on(cls, estimate_lb):
    """Before: τ = 0 at every step once the loss average was below lb, silently (the loss stayed
    near where it crossed 0).  Now lb follows the loss down and the run trains on."""
    model = network()
    opt = cls(model.parameters(), lr=1.0 if cls is MoMo else 1e-2, lb=0.0, estimate_lb=estimate_lb)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, opt, 300)
    about_lb = [str(w.message) for w in caught if "below the lower bound" in str(w.message)]
    assert len(about_lb) == 1, [str(w.message) for w in caught]
    assert "lb=" in about_lb[0] and "estimate_lb" in about_lb[0] and "lb_fraction" in about_lb[0]
    group = opt.param_groups[0]
    assert group["lb_lowered"] >= 1 and group["skipped_steps"] == 0
    with torch.no_grad():
        final = float(loss_of(model, *regression_data()))
    assert final < -4.0  # from -0.8 (the first loss): the minimum is about -4.9
    rho = 1.0 - 0.9 ** group["step"] if cls is MoMoAdam else 1.0
    assert all(g["lb"] == group["lb"] <= group["loss_avg"] / rho for g in opt.param_groups)  # below the losses
    assert group["lb"] > -6.0  # and not far below
    assert float(group["current_lb"]) >= group["lb"]


@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_the_lowered_bound_lies_as_far_below_the_loss_average_as_it_fell_below_lb(cls):
    """Without ``estimate_lb``: lb ← 2m − lb (m the bias-corrected loss average, here the first
    loss); that step is the one an optimizer given this bound from the start takes."""
    x, y = regression_data()
    model, twin = network(), network()
    opt = cls(model.parameters(), lr=10.0, lb=0.5)
    loss = loss_of(model, x[:32], y[:32])
    loss.backward()
    with pytest.warns(RuntimeWarning, match="below the lower bound"):
        opt.step(loss=loss)
    expected = 2.0 * float(loss.detach()) - 0.5
    group = opt.param_groups[0]
    assert group["lb"] == pytest.approx(expected, rel=1e-12) and group["lb_lowered"] == 1
    assert float(group["current_lb"]) == pytest.approx(expected, rel=1e-12)

    reference = cls(twin.parameters(), lr=10.0, lb=expected)
    twin_loss = loss_of(twin, x[:32], y[:32])
    twin_loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid bound: nothing to lower, no warning
        reference.step(loss=twin_loss)
    assert reference.param_groups[0]["lb_lowered"] == 0
    assert float(reference.param_groups[0]["tau"]) == pytest.approx(float(group["tau"]), rel=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_lowered_bound_rule_on_floats():
    from lightning_adaptive_lr.optim.momo import momo_lowered_bound

    assert momo_lowered_bound(-0.5, 1.0, 0.0) == -1.0  # m = -0.5 fell 0.5 below lb = 0
    assert momo_lowered_bound(0.3, 0.5, 1.0) == pytest.approx(0.2)  # m = f̄/ρ = 0.6
    assert momo_lowered_bound(0.5, 1.0, 0.5) is None  # at lb: the paper's update
    assert momo_lowered_bound(2.0, 1.0, 0.0) is None


# ---------------------------------------------------------------------------------------------- lb=None

def test_following_bound_rule_on_floats():
    from lightning_adaptive_lr.optim.momo import momo_following_bound

    assert momo_following_bound(2.0, 0.95) == pytest.approx(1.9)
    assert momo_following_bound(-2.0, 0.5) == pytest.approx(-3.0)  # always below m
    assert momo_following_bound(3.0, 0.0) == 0.0  # fraction 0: the paper's lb = 0


@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_lb_none_follows_the_lowest_loss_average(cls):
    """``lb=None``: after each step the bound in use is ``φ·m_min`` (a positive loss), ``m_min`` the
    lowest bias-corrected loss average so far, computed here from the losses handed over."""
    x, y = regression_data()
    model = network()
    fraction = 0.8
    opt = cls(model.parameters(), lr=0.05, lb=None, lb_fraction=fraction)
    beta = 0.9
    avg, lowest = 0.0, float("inf")
    for k in range(1, 16):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        if cls is MoMo and k == 1:  # without bias correction MoMo's average starts at the first loss
            avg, rho = loss.item(), 1.0
        else:
            avg, rho = beta * avg + (1 - beta) * loss.item(), (1 - beta**k) if cls is MoMoAdam else 1.0
        lowest = min(lowest, avg / rho)
        group = opt.param_groups[0]
        assert group["lower_bound"] == pytest.approx(fraction * lowest, rel=1e-12)
        assert group["loss_min"] == pytest.approx(lowest, rel=1e-12)
        assert group["lb"] is None
    # set_lower_bound gives a number: the paper's rule from then on.
    opt.set_lower_bound(0.0)
    assert opt.param_groups[0]["lb"] == 0.0 and opt.param_groups[0]["current_lb"] == 0.0


@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_lb_none_resumes_bit_identically(cls):
    runs = []
    for reload in (False, True):
        model = network()
        opt = cls(model.parameters(), lr=0.05, lb=None)
        train(model, opt, 5, seed=1)
        if reload:
            state = copy.deepcopy(opt.state_dict())
            opt = cls(model.parameters(), lr=0.05, lb=None)
            opt.load_state_dict(state)
        train(model, opt, 5, seed=2)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_lb_none_is_refused_where_a_number_is_meant():
    with pytest.raises(ValueError, match="lb_fraction"):
        MoMo([nn.Parameter(torch.zeros(2))], lb=None, lb_fraction=1.0)
    with pytest.raises(ValueError, match="`lb`"):
        MoMoAdam([nn.Parameter(torch.zeros(2))], lb=float("nan"))


# ---------------------------------------------------------------------------------------------- outcome gate

#: The step's bodies: on the CPU ``foreach`` runs one tensor at a time like ``foreach=False`` unless
#: ``single_tensor_on_cpu`` is off (``multi-tensor``: the body accelerators run).
PATHS = {"foreach": {}, "per-tensor": {"foreach": False}, "multi-tensor": {}, "compiled": {"compiled": True}}


@pytest.fixture
def body(request, monkeypatch):
    """The ``path`` parameter's constructor options, with the multi-tensor body forced for ``multi-tensor``."""
    path = request.node.callspec.params["path"]
    if path == "multi-tensor":
        for cls in (MoMo, MoMoAdam):
            monkeypatch.setattr(cls, "single_tensor_on_cpu", False)
    return PATHS[path]


def tiny_network(dtype: torch.dtype) -> nn.Module:
    """The compiled tests' network (tests/test_compiled_step.py): its kernels are compiled once."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def least_squares_step(model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator, scale_grads=None) -> None:
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(8, 4, generator=gen).to(dtype), torch.randn(8, 2, generator=gen).to(dtype)
    opt.zero_grad()
    loss = (model(x) - y).float().pow(2).mean()
    loss.backward()
    if scale_grads is not None:
        for p in model.parameters():
            scale_grads(p.grad)
            assert torch.isfinite(p.grad).all()  # a finite input
    opt.step(loss=loss.detach())


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list, dict, dict]:
    counters = ("skipped_steps", "consecutive_skips")
    params = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in opt.state[p].items()}
    shared = {k: copy.deepcopy(v) for k, v in opt.param_groups[0].items() if k in type(opt).group_state and k not in counters}
    return params, state, shared


def assert_skipped_and_untouched(model: nn.Module, opt: torch.optim.Optimizer, before: tuple[list, dict, dict]) -> None:
    params, state, shared = snapshot(model, opt)
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(params, before[0]))
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)
    assert shared == before[2]
    assert all(torch.isfinite(t).all() for t in (*params, *state.values()))


OVERFLOWS = [
    # MoMo: ‖d‖² overflows in the parameters' precision (before: τ = 0 then for hundreds of steps)
    pytest.param(MoMo, torch.float32, 1e25, id="MoMo-float32-x1e25"),
    pytest.param(MoMo, torch.float64, 1e160, id="MoMo-float64-x1e160"),
    # MoMo-Adam: v = β2·v + (1−β2)·g² overflows (before: v = inf stored, τ = 0 for ever)
    pytest.param(MoMoAdam, torch.float32, 1e25, id="MoMoAdam-float32-x1e25"),
    pytest.param(MoMoAdam, torch.float64, 1e160, id="MoMoAdam-float64-x1e160"),
]


@pytest.mark.parametrize(
    ("cls", "dtype", "factor", "path"),
    # compiled: float32 only (compilation is slow)
    [(*case.values, path) for case in OVERFLOWS for path in PATHS if path != "compiled" or case.values[1] == torch.float32],
    ids=[f"{case.id}-{path}" for case in OVERFLOWS for path in PATHS if path != "compiled" or case.values[1] == torch.float32],
)
def test_a_finite_gradient_whose_step_would_overflow_is_skipped(cls, dtype, factor, path, body):
    model = tiny_network(dtype)
    opt = cls(model.parameters(), **body)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        least_squares_step(model, opt, gen)
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="skipped"):
        least_squares_step(model, opt, gen, scale_grads=lambda g: g.mul_(factor))
    assert_skipped_and_untouched(model, opt, before)
    least_squares_step(model, opt, gen)  # and the next step is a normal one
    assert opt.param_groups[0]["skipped_steps"] == 1 and float(opt.param_groups[0]["tau"]) > 0.0
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before[0]))


@pytest.mark.parametrize("path", list(PATHS))
def test_momo_adam_skips_a_step_whose_second_moment_overflows_float16(path, body):
    """Gradients up to 3e4 are finite in float16; (1 − β2)·g² = 9e5 is not."""
    model = tiny_network(torch.float16)
    opt = MoMoAdam(model.parameters(), **body)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        least_squares_step(model, opt, gen)
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="skipped"):
        least_squares_step(model, opt, gen, scale_grads=lambda g: g.mul_(3e4 / float(g.abs().max())))
    assert_skipped_and_untouched(model, opt, before)


# ---------------------------------------------------------------------------------------------- float16


@pytest.mark.parametrize("eps", [1e-4, 1e-8])
@pytest.mark.parametrize("path", ["foreach", "per-tensor", "multi-tensor", "compiled"])
def test_momo_adam_trains_float16_parameters(path, eps, body):
    """Before: a TypeError (and in release 0.1, NaN parameters at the first step).  Adam's
    intermediates of 16-bit tensors are float32 now; ``eps = 1e-8``, 0 in float16, works too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).half()
    opt = MoMoAdam(model.parameters(), lr=1e-2, eps=eps, **body)
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(1)).half()
    y = 2 * x[:, :1] - x[:, 1:2]
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (model(x) - y).float().pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
        losses.append(float(loss.detach()))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.param_groups[0]["skipped_steps"] == 0
    assert losses[-1] < 0.1 * losses[0]
    assert all(t.dtype == torch.float16 for s in opt.state.values() for t in s.values())


# ---------------------------------------------------------------------------------------------- momentum schedules


def beta_of_last_step(opt: torch.optim.Optimizer, loss_avg_before: float, loss: float) -> float:
    """The β the last step averaged the loss with: ``f̄ = β·f̄_before + (1 − β)·f``."""
    return (opt.param_groups[0]["loss_avg"] - loss) / (loss_avg_before - loss)


def scheduled_momentum(opt: torch.optim.Optimizer) -> float:
    group = opt.param_groups[0]
    return group["betas"][0] if isinstance(opt, MoMoAdam) else group["momentum"]


def two_groups(model: nn.Module) -> list[dict]:
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 0.5}]


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_momentum_cycling_schedulers_set_the_beta_each_step_uses(cls, scheduler):
    """torch's schedulers with ``cycle_momentum=True`` (their default) write ``momentum`` (MoMo;
    before: they refused MoMo, which had no such key) or ``betas[0]`` (MoMo-Adam); the loss
    average of each step shows the β it used."""
    model = tiny_network(torch.float64)
    opt = cls(two_groups(model), lr=1e-2)
    if scheduler == "OneCycleLR":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[1e-2, 0.5], total_steps=12)
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3)
    gen = torch.Generator().manual_seed(1)
    used, scheduled = [], []
    for step in range(12):
        expected, before = scheduled_momentum(opt), opt.param_groups[0]["loss_avg"]
        x, y = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
        if cls is MoMo:  # the value used, in both keys
            assert all(g["beta"] == g["momentum"] == opt.param_groups[0]["beta_used"] == expected for g in opt.param_groups)
        if step > 0 or cls is MoMoAdam:  # MoMo's first step starts the average at the loss itself
            used.append(beta_of_last_step(opt, before, float(loss.detach())))
            scheduled.append(expected)
        sched.step()
    assert len(set(scheduled)) > 3  # it did cycle
    assert used == pytest.approx(scheduled, rel=1e-9)


def test_momo_groups_hold_momentum_equal_to_beta():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = MoMo([{"params": [a]}, {"params": [b], "lr": 0.5}], beta=0.8)
    assert opt.defaults["momentum"] == 0.8  # where torch's schedulers and Lightning's monitor look
    assert [(g["beta"], g["momentum"]) for g in opt.param_groups] == [(0.8, 0.8), (0.8, 0.8)]
    assert MoMo([{"params": [a], "momentum": 0.5}]).param_groups[0]["beta"] == 0.5
    assert MoMo([{"params": [a], "beta": 0.5}]).param_groups[0]["momentum"] == 0.5
    with pytest.raises(ValueError, match="momentum"):
        MoMo([{"params": [a], "beta": 0.5, "momentum": 0.6}])


@pytest.mark.parametrize(
    ("changed", "expected"), [({"beta": 0.5}, 0.5), ({"momentum": 0.7}, 0.7), ({"beta": 0.5, "momentum": 0.7}, 0.7)]
)
@pytest.mark.parametrize("steps_before", [0, 2])
def test_a_change_of_beta_or_momentum_is_used_and_momentum_wins(changed, expected, steps_before):
    """Between steps either key may change (``momentum``: schedulers); if both did, ``momentum`` wins."""
    model = tiny_network(torch.float64)
    opt = MoMo(two_groups(model), lr=1e-2, bias_correction=True)  # the first step averages too
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps_before):
        least_squares_step(model, opt, gen)
    for group in opt.param_groups:
        group.update(changed)
    before = opt.param_groups[0]["loss_avg"]
    x, y = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)
    opt.zero_grad()
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    opt.step(loss=loss)
    assert beta_of_last_step(opt, before, float(loss.detach())) == pytest.approx(expected, rel=1e-9)
    assert all(g["beta"] == g["momentum"] == expected for g in opt.param_groups)


@pytest.mark.parametrize(
    ("cls", "key", "values"),
    [(MoMo, "momentum", [0.9, 0.8]), (MoMo, "momentum", [1.0, 1.0]), (MoMoAdam, "betas", [(0.9, 0.999), (0.8, 0.999)])],
    ids=["MoMo-groups-differ", "MoMo-out-of-range", "MoMoAdam-groups-differ"],
)
def test_a_shared_momentum_set_apart_per_group_or_out_of_range_is_refused(cls, key, values):
    """Before: the first group's value was used for every group (or β = 1 froze the averages), silently."""
    model = tiny_network(torch.float64)
    opt = cls(two_groups(model), lr=1e-2)
    for group, value in zip(opt.param_groups, values):
        group[key] = value
    model(torch.ones(2, 4, dtype=torch.float64)).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=key):
        opt.step(loss=1.0)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_state_dict_without_momentum_loads_with_momentum_equal_to_beta():
    """State dicts saved before ``momentum`` existed (release 0.1 included) get it back from ``beta``."""
    model = tiny_network(torch.float64)
    opt = MoMo(model.parameters(), beta=0.8)
    gen = torch.Generator().manual_seed(1)
    least_squares_step(model, opt, gen)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["momentum"], group["beta_used"], group["lb_lowered"]
    twin = MoMo(tiny_network(torch.float64).parameters(), beta=0.8)
    twin.load_state_dict(state)
    assert [(g["beta"], g["momentum"]) for g in twin.param_groups] == [(0.8, 0.8)]


# ---------------------------------------------------------------------------------------------- the eager bodies


@pytest.mark.parametrize("path", ["multi-tensor", "per-tensor"])
@pytest.mark.parametrize(
    "options",
    [{"estimate_lb": True, "weight_decay": 0.05, "lb": 0.2}, {"bias_correction": True, "weight_decay": 0.0, "lb": 0.0}],
    ids=["estimate-lb-wd", "bias-correction"],
)
@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_both_eager_bodies_follow_the_float64_reference(cls, options, path, body):
    """The multi-tensor body (what accelerators run; the CPU runs one tensor at a time) is the
    paper's update too (tests/test_momo.py's reference loops, two param groups)."""
    from conftest import make_least_squares
    from test_momo import group_layouts, reference_momo, reference_momo_adam, run_torch

    data, params = make_least_squares(35, seed=1)
    lb, wd = options["lb"], options["weight_decay"]
    bias_correction, estimate_lb = options.get("bias_correction", False), options.get("estimate_lb", False)
    if cls is MoMo:
        groups = group_layouts(0.7, wd)["two-groups"]
        expected = reference_momo(data, params, groups, 0.9, bias_correction, estimate_lb, lb)
        got = run_torch(
            lambda g: MoMo(g, lb=lb, bias_correction=bias_correction, estimate_lb=estimate_lb, **body), data, params, groups
        )
    else:
        groups = group_layouts(0.05, wd)["two-groups"]
        expected = reference_momo_adam(data, params, groups, (0.9, 0.999), 1e-8, estimate_lb, lb, False)
        got = run_torch(lambda g: MoMoAdam(g, lb=lb, estimate_lb=estimate_lb, **body), data, params, groups)
    for a, b in zip(got[0], expected[0]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-10, atol=1e-12)
    assert got[2] == pytest.approx(expected[2], rel=1e-10, abs=1e-12)
