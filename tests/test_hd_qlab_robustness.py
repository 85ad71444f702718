"""HierarchicalHD and QLAB outside their assumptions (issue 13).

* A finite input never leaves a non-finite value in the parameters or the state: a step that
  would is skipped, with parameters and state untouched (HierarchicalHD: a gradient ×1e25 in
  float32, gradients of ~5e4 in float16; QLAB: a trial step that overflows).
* HierarchicalHD recovers from a single gradient spike (``max_rate_growth``), and its rates stay
  relative to the scheduled ``lr`` under torch's schedulers (``reference_lr``).
* QLAB with ``lr = 0`` freezes a group; an ``lr`` set below ``min_trial_lr`` is warned about once.
* Momentum-cycling schedulers act on the momentum the base rule uses; the Adam bases train in
  float16.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_adaptive_lr import QLAB, HierarchicalHD

# ---------------------------------------------------------------------------- problems


def regression(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tanh network on a fixed full batch (the same every call): model and its loss function."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 1)).to(dtype)
    x = torch.randn(256, 20)
    y = x[:, :3].sum(1, keepdim=True).sin()
    x, y = x.to(dtype), y.to(dtype)

    def loss() -> torch.Tensor:
        return nn.functional.mse_loss(model(x).float(), y.float())

    return model, loss


def backward(opt: torch.optim.Optimizer, loss_fn) -> torch.Tensor:
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])


def assert_all_finite(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        assert torch.isfinite(p).all()
    for state in opt.state.values():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all(), name
            elif isinstance(value, float):
                assert math.isfinite(value), name
    for group in opt.param_groups:
        for name, value in group.items():
            if isinstance(value, float):
                assert math.isfinite(value), name


def assert_untouched(model: nn.Module, opt: torch.optim.Optimizer, before) -> None:
    params, state = before
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    after = opt.state_dict()["state"]
    assert after.keys() == state.keys()
    for key, entries in state.items():
        for name, value in entries.items():
            other = after[key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


# ---------------------------------------------------------------------------- HierarchicalHD: the step's outcome


@pytest.mark.parametrize("base", ["sgd", "sgdn", "adam"])
@pytest.mark.parametrize(("at", "factor"), [(4, 1e25), (4, 1e30), (20, 1e25), (20, 1e30), (20, 1e37)])
def test_hd_finite_gradient_never_leaves_a_non_finite_value(base: str, at: int, factor: float) -> None:
    """A finite gradient ×1e25 (float32): before, the learned rate (+ c·⟨g, s⟩) times the gradient
    overflowed the parameters; now such a step is skipped untouched, or its outcome is finite."""
    model, loss_fn = regression()
    opt = HierarchicalHD(model.parameters(), base=base)
    for _ in range(at):
        backward(opt, loss_fn)
        opt.step()
    before = snapshot(model, opt)
    backward(opt, loss_fn)
    for p in model.parameters():
        p.grad.mul_(factor)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step()
    assert_all_finite(model, opt)
    if opt.param_groups[0]["skipped_steps"]:
        assert_untouched(model, opt, before)


@pytest.mark.parametrize("base", ["sgd", "sgdn", "adam"])
def test_hd_float16_parameters_with_large_gradients(base: str) -> None:
    """float16 parameters with gradients of 5e4 (finite in float16): before, NaN parameters (or a
    TypeError for Adam); now every step is checked and a step that would overflow is skipped."""
    model, loss_fn = regression(dtype=torch.float16)
    opt = HierarchicalHD(model.parameters(), base=base)
    for t in range(8):
        backward(opt, loss_fn)
        if t >= 5:
            for p in model.parameters():
                p.grad.copy_(torch.sign(p.grad) * 5e4)
        before = snapshot(model, opt)
        skipped = opt.param_groups[0]["skipped_steps"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        assert_all_finite(model, opt)
        if opt.param_groups[0]["skipped_steps"] > skipped:
            assert_untouched(model, opt, before)


def test_hd_adam_trains_in_float16() -> None:
    """Small gradients whose squares underflow float16: Adam's v is kept in float32, so the
    direction is not g/eps (before: a TypeError refused float16)."""
    torch.manual_seed(0)
    model = nn.Linear(20, 10).half()
    x, y = torch.randn(64, 20).half(), torch.randint(0, 10, (64,))
    x[:, 3] = 0  # a dead input: gradients exactly 0 (0/0 if eps were 0 in float16)

    def loss_fn() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x).float(), y)

    for opt in (
        HierarchicalHD(model.parameters(), base="adam", lr=1e-2),
        QLAB(model.parameters(), base="adam", lr=1e-2),
    ):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
        first = loss_fn().item()
        for _ in range(100):
            loss = backward(opt, loss_fn)
            opt.step(loss=loss, probe=loss_fn) if isinstance(opt, QLAB) else opt.step()
        assert opt.param_groups[0]["skipped_steps"] == 0
        assert_all_finite(model, opt)
        assert loss_fn().item() < 0.5 * first
        assert all(st["exp_avg_sq"].dtype == torch.float32 for st in opt.state.values())
        state = copy.deepcopy(opt.state_dict())
        opt.load_state_dict(state)  # torch would cast the state to float16
        assert all(st["exp_avg_sq"].dtype == torch.float32 for st in opt.state.values())


# ---------------------------------------------------------------------------- HierarchicalHD: one spike


def spiked_run(
    base: str, steps: int, *, at: int = 10, factor: float = 100.0, **kwargs
) -> tuple[HierarchicalHD, float, float]:
    model, loss_fn = regression()
    opt = HierarchicalHD(model.parameters(), base=base, **kwargs)
    before = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for t in range(steps):
            loss = backward(opt, loss_fn)
            if t == at:
                before = loss.item()
                for p in model.parameters():
                    p.grad.mul_(factor)
            opt.step()
    return opt, before, loss_fn().item()


@pytest.mark.parametrize("base", ["sgd", "sgdn"])
def test_hd_recovers_from_one_gradient_spike(base: str) -> None:
    """One gradient ×100 at step 10 with the defaults: before, the rate jumped from 0 to ~8000·lr
    after the overshoot and the run diverged (490 of the next 500 steps skipped, loss inf); with
    ``max_rate_growth`` the rate can at most double per step and the run recovers."""
    opt, before, final = spiked_run(base, 300)
    assert opt.param_groups[0]["skipped_steps"] == 0
    assert final < 0.1 * before


def test_hd_rate_growth_cap_leaves_normal_runs_unchanged() -> None:
    """Without a spike the default cap never binds on this run: bit for bit the run without it."""
    runs = []
    for growth in (2.0, math.inf):
        model, loss_fn = regression()
        opt = HierarchicalHD(model.parameters(), max_rate_growth=growth)
        for _ in range(100):
            backward(opt, loss_fn)
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
        # The rate did grow a lot (from lr): the warm-up steps are not capped.
        assert opt.param_groups[0]["global_rate_multiple"] > 50
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_hd_rate_growth_rule() -> None:
    from lightning_adaptive_lr.optim.hypergradient import hd_rate

    assert hd_rate(1.0, 100.0, 1.0, growth=2.0) == 2.0  # at most ×2
    assert hd_rate(3.0, 100.0, 1.0, growth=2.0) == 6.0
    assert hd_rate(0.0, 100.0, 1.0, growth=2.0) == 2.0  # from below 1: up to 2 (× lr)
    assert hd_rate(3.0, -100.0, 1.0, growth=2.0) == 0.0  # decreases are not capped
    assert hd_rate(1.0, 100.0, 1.0, growth=2.0, low=5.0) == 5.0  # the bounds win
    assert hd_rate(1.0, 0.5, 1.0, growth=2.0) == 1.5  # below the cap: the plain rule


def test_hd_tensor_level_rates_obey_the_growth_cap_on_a_spike() -> None:
    """The "unit" and "param" rates are capped on the steps the screen flags (a ×100 gradient spike):
    there each rate ends at most ``max_rate_growth·max(ρ, 1)``, and the cap binds somewhere."""
    model, loss_fn = regression(1)
    opt = HierarchicalHD(model.parameters(), base="sgd", levels=("global", "unit", "param"))
    capped = False
    for t in range(14):
        old = {p: {k: opt.state[p][k].clone() for k in ("hd_rate_unit", "hd_rate_param")} for p in opt.state}
        backward(opt, loss_fn)
        spike = t in (10, 11)
        if spike:  # the rates would jump
            for p in model.parameters():
                p.grad.mul_(100.0)
        opt.step()
        if not spike:
            continue
        for p, rates in old.items():
            for key, before in rates.items():
                ceiling = 2.0 * before.clamp(min=1.0)
                after = opt.state[p][key]
                assert (after <= ceiling).all(), key
                capped |= bool((after == ceiling).any())
    assert capped, "the cap never bound: the test would not notice it missing"


def test_hd_recorded_and_stored_options() -> None:
    opt = HierarchicalHD([nn.Parameter(torch.zeros(2))])
    assert opt.defaults["max_rate_growth"] == 2.0
    with pytest.raises(ValueError, match="max_rate_growth"):
        HierarchicalHD([nn.Parameter(torch.zeros(2))], max_rate_growth=1.0)
    with pytest.raises(ValueError, match="max_rate_growth"):
        HierarchicalHD([nn.Parameter(torch.zeros(2))], max_rate_growth=float("nan"))


# ---------------------------------------------------------------------------- HierarchicalHD: schedulers

STEPS = 100

HD_SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=30),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=STEPS),
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=10),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=2),
}


@pytest.mark.parametrize("base", ["sgd", "sgdn", "adam"])
@pytest.mark.parametrize("scheduler", HD_SCHEDULERS)
def test_hd_rates_stay_relative_to_the_scheduled_lr(base: str, scheduler: str) -> None:
    """Before, the hypergradient step was scaled by (lr/initial_lr)², and OneCycleLR's and
    CyclicLR's initial_lr is their smallest rate: the rate blew up (7e27) and the loss went to inf.
    Now no rate moves by more than Baydin's step at the largest scheduled lr."""
    model, loss_fn = regression(2)
    opt = HierarchicalHD(model.parameters(), base=base, lr=0.01)
    sched = HD_SCHEDULERS[scheduler](opt)
    first = loss_fn().item()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a skipped step fails the test
        for _ in range(STEPS):
            loss = backward(opt, loss_fn)
            opt.step()
            group = opt.param_groups[0]
            assert group["effective_lr"] <= 1e3 * group["lr"]
            sched.step(loss.item()) if scheduler == "ReduceLROnPlateau" else sched.step()
    assert_all_finite(model, opt)
    assert loss_fn().item() < first
    assert opt.param_groups[0]["hd_reference_lr"] >= opt.param_groups[0]["lr"]


def test_reference_lr_rule() -> None:
    from lightning_adaptive_lr.optim.hypergradient import rate_step_factor, reference_lr

    assert reference_lr(0.05, 0.1, None, None) == 0.1  # decaying schedules: initial_lr, as before
    assert reference_lr(0.004, 0.004, 0.1, None) == 0.1  # OneCycleLR: the max_lr it records
    assert reference_lr(0.4, 0.04, None, 0.2) == 0.4  # CyclicLR rising: the current lr
    assert reference_lr(0.2, 0.04, None, 0.4) == 0.4  # falling: the largest lr seen
    assert reference_lr(0.1, None, None, None) == 0.1  # no scheduler: Baydin's step exactly
    # The applied rate lr·ρ moves by β·(lr/lr_ref)²·⟨g, s⟩ ≤ β·⟨g, s⟩.
    for lr, ref in ((0.4, 0.4), (0.004, 0.1)):
        assert lr * rate_step_factor(lr, ref, 1.0) == pytest.approx((lr / ref) ** 2)


# ---------------------------------------------------------------------------- momentum-cycling schedulers


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: HierarchicalHD(ps, base="sgdn", lr=0.01),
        lambda ps: QLAB(ps, base="sgdm", lr=0.01),
    ],
    ids=["HierarchicalHD-sgdn", "QLAB-sgdm"],
)
def test_cycled_momentum_is_the_momentum_the_base_uses(make) -> None:
    """OneCycleLR cycles `betas[0]` when the defaults have `betas`: before, the SGD bases kept
    Adam's unused `betas`, so the cycled value never reached their momentum."""
    model, loss_fn = regression(3)
    opt = make(model.parameters())
    assert "betas" not in opt.defaults
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=10)
    seen = []
    for _ in range(5):
        loss = backward(opt, loss_fn)
        seen.append(opt.param_groups[0]["momentum"])
        opt.step(loss=loss, probe=loss_fn) if isinstance(opt, QLAB) else opt.step()
        sched.step()
    assert len(set(seen)) > 1  # the scheduler cycled it


# ---------------------------------------------------------------------------- QLAB: lr = 0, the trial floor


def test_qlab_lr_zero_freezes_the_group() -> None:
    """``lr = 0`` (accepted like torch.optim's): the group does not move, its ``lr`` stays 0, its
    buffers are updated as torch.optim's are; with no moving group nothing is probed."""
    model, loss_fn = regression(4)
    opt = QLAB(model.parameters(), base="sgdm", lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def probe() -> torch.Tensor:
        calls.append(1)
        return loss_fn()

    loss = backward(opt, loss_fn)
    opt.step(loss=loss, probe=probe)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    group = opt.param_groups[0]
    assert (group["lr"], group["effective_lr"], group["step"], calls) == (0.0, 0.0, 1, [])
    assert all("momentum_buffer" in opt.state[p] for p in model.parameters())

    # One frozen group beside a moving one: only the moving one moves and fits its rate.
    model, loss_fn = regression(4)
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    for opt in (
        QLAB([{"params": first, "lr": 0.0}, {"params": rest}], base="adam", lr=0.01),
        QLAB.wrap(torch.optim.SGD([{"params": first, "lr": 0.0}, {"params": rest}], lr=0.05)),
    ):
        frozen = [p.detach().clone() for p in first]
        moving = [p.detach().clone() for p in rest]
        loss = backward(opt, loss_fn)
        opt.step(loss=loss, probe=loss_fn)
        assert all(torch.equal(a, b) for a, b in zip(first, frozen))
        assert not all(torch.equal(a, b) for a, b in zip(rest, moving))
        assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[0]["effective_lr"] == 0.0
        assert opt.param_groups[1]["lr"] > 0.0


def test_qlab_warns_once_when_the_lr_is_set_below_the_trial_floor() -> None:
    """A schedule below ``min_trial_lr`` does not change the step (the trial runs at the floor
    and the fit chooses the step): said once, not silently ignored."""
    model, loss_fn = regression(5)
    opt = QLAB(model.parameters(), base="sgd", lr=0.1, min_trial_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1e-3)  # lr = 1e-4 from the next step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            loss = backward(opt, loss_fn)
            opt.step(loss=loss, probe=loss_fn)
            sched.step()
    floor = [w for w in caught if issubclass(w.category, UserWarning) and "min_trial_lr" in str(w.message)]
    assert len(floor) == 1
    assert "lr=0 freezes" in str(floor[0].message)


def test_qlab_rates_the_fit_writes_below_the_floor_are_not_warned_about() -> None:
    model, loss_fn = regression(5)
    opt = QLAB(model.parameters(), base="sgd", lr=1.0, min_lr=1e-8, min_trial_lr=1.0)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(4):
            loss = backward(opt, loss_fn)
            opt.step(loss=loss, probe=loss_fn)
            rates.append(opt.param_groups[0]["lr"])
    assert min(rates) < 1.0  # the fit's own rate went below the floor


# ---------------------------------------------------------------------------- QLAB: the trial step's outcome


def _qlab_overflow_cases():
    def big_rate(base):
        return lambda ps: QLAB(ps, base=base, lr=1e24, max_lr=1e30)

    return {
        # float32: a finite gradient (~1e15) at a (scheduled) rate of 1e24: x − η·g overflows.
        "sgd-float32": (big_rate("sgd"), torch.float32, 1e15),
        "sgd-wd-float32": (
            lambda ps: QLAB(ps, base="sgd", lr=1e24, max_lr=1e30, weight_decay=1e-3),
            torch.float32,
            1e15,
        ),
        "sgdm-float32": (big_rate("sgdm"), torch.float32, 1e15),
        # float16: gradients of 3e4 at the default max_lr: the trial or the fitted step exceeds 65504.
        "sgd-float16": (lambda ps: QLAB(ps, base="sgd", lr=5.0), torch.float16, 3e4),
        "sgdm-float16": (lambda ps: QLAB(ps, base="sgdm", lr=3.0), torch.float16, 3e4),
        "adam-float16": (lambda ps: QLAB(ps, base="adam", lr=1e5, max_lr=1e6), torch.float16, 3e4),
        "wrap-SGD-float16": (lambda ps: QLAB.wrap(torch.optim.SGD(ps, lr=5.0)), torch.float16, 3e4),
    }


@pytest.mark.parametrize("name", list(_qlab_overflow_cases()))
def test_qlab_overflowing_trial_step_is_skipped_untouched(name: str) -> None:
    make, dtype, size = _qlab_overflow_cases()[name]
    model, loss_fn = regression(6, dtype=dtype)
    opt = make(model.parameters())
    loss = backward(opt, loss_fn)
    for p in model.parameters():
        p.grad.copy_(torch.where(p.grad >= 0, size, -size).to(dtype))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="outcome"):
        opt.step(loss=loss, probe=loss_fn)
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert_untouched(model, opt, before)
    assert_all_finite(model, opt)
