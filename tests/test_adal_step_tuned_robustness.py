"""Issue 13 for AdaL and Step-Tuned SGD: no silent failure.

* A finite input never leaves a non-finite value in the parameters or the state: a step whose
  outcome would overflow the parameters' dtype is skipped (parameters and state untouched).
* torch's schedulers at their defaults, momentum cycling included, and Lightning's
  ``LearningRateMonitor(log_momentum=True)``: Step-Tuned SGD exposes its β as ``momentum``, AdaL
  its β1 as ``betas[0]``; both follow what the scheduler writes.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from lightning_adaptive_lr import AdaL, StepTunedSGD
from lightning_adaptive_lr.optim.adal import AdaLScalars, adal_scalars

TRANSFORMS = ("l1", "tensor_l1", "none")
EPS_MODES = ("preconditioner", "denominator")


# ----------------------------------------------------------------------------- helpers


def tiny_problem(dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Linear(8, 4).to(dtype)
    x = torch.randn(16, 8).to(dtype)
    y = torch.randn(16, 4).to(dtype)
    return model, x, y


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """Gradients of the mean squared error in ``.grad``, multiplied by ``factor`` (a finite spike)."""
    model.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if factor != 1.0:
        for p in model.parameters():
            p.grad.mul_(factor)
    return loss.detach()


def quiet_step(opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
    """``opt.step(...)`` with the skip warning silenced (skips are asserted through the counter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return opt.step(*args, **kwargs)


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Parameters, per-parameter state and param groups (without the parameters), deep-copied."""
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": copy.deepcopy({i: dict(opt.state[p]) for i, p in enumerate(model.parameters()) if p in opt.state}),
        "groups": copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
    }


def equal(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested snapshots (NaN equals NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal(u, v) for u, v in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def assert_untouched_but_counted(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Everything equal except the skip counters: ``skipped_steps`` went up by one in every group."""
    for g_before, g_after in zip(before["groups"], after["groups"], strict=True):
        assert g_after["skipped_steps"] == g_before["skipped_steps"] + 1
    groups = [{k: v for k, v in g.items() if "skip" not in k} for g in after["groups"]]
    expected = [{k: v for k, v in g.items() if "skip" not in k} for g in before["groups"]]
    assert equal(after["params"], before["params"])
    assert equal(after["state"], before["state"])
    assert equal(groups, expected)


def all_finite(model: nn.Module, opt: torch.optim.Optimizer) -> bool:
    """Parameters, every floating state tensor and every float state number are finite."""
    tensors = [p.detach() for p in model.parameters()]
    numbers: list[float] = []
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                tensors.append(value)
            elif isinstance(value, float):
                numbers.append(value)
    for group in opt.param_groups:
        for key in ("gamma", "half_step_lr", "first_half_avg_dot", "first_half_sqnorm", "gain", "effective_lr"):
            if isinstance(group.get(key), float):
                numbers.append(group[key])
    return all(bool(torch.isfinite(t).all()) for t in tensors) and all(math.isfinite(v) for v in numbers)


# ----------------------------------------------------------------------------- AdaL: the step's outcome


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("factor", [1e20, 1e25, 1e30])
def test_adal_huge_finite_gradient_is_skipped_and_leaves_everything_finite(factor, transform, eps_mode, foreach):
    """Before: ĝ² (ṽ) and the eps term overflow float32: inf/NaN in the state and the parameters."""
    model, x, y = tiny_problem()
    opt = AdaL(model.parameters(), lr=1e-2, transform=transform, eps_mode=eps_mode, foreach=foreach)
    for _ in range(2):
        backward(model, x, y)
        quiet_step(opt)
    before = snapshot(model, opt)
    backward(model, x, y, factor)
    quiet_step(opt)
    assert_untouched_but_counted(before, snapshot(model, opt))
    for _ in range(3):  # training goes on from where it was
        backward(model, x, y)
        quiet_step(opt)
    assert all_finite(model, opt)
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert opt.param_groups[0]["step"] == 5


@pytest.mark.parametrize("transform", ("l1", "tensor_l1"))
@pytest.mark.parametrize("eps_mode", EPS_MODES)
def test_adal_float64_scale_whose_square_overflows_is_skipped(transform, eps_mode):
    """Before: s² = inf on the host (float64), so Λ2 = inf, and NaN reached the parameters."""
    model, x, y = tiny_problem(torch.float64)
    opt = AdaL(model.parameters(), transform=transform, eps_mode=eps_mode)
    backward(model, x, y)
    quiet_step(opt)
    before = snapshot(model, opt)
    backward(model, x, y, 1e155)  # ‖g‖₁ ≈ 1e155: finite; its square is not
    quiet_step(opt)
    assert_untouched_but_counted(before, snapshot(model, opt))
    backward(model, x, y)
    quiet_step(opt)
    assert all_finite(model, opt)


@pytest.mark.parametrize("transform", ("l1", "tensor_l1"))
def test_adal_float16_gradient_whose_square_overflows_is_skipped(transform):
    """Before: a float16 gradient entry of 280 (280² > 65504) stored ṽ = inf."""
    model, x, y = tiny_problem(torch.float16)
    opt = AdaL(model.parameters(), transform=transform)
    for _ in range(2):
        backward(model, x, y)
        quiet_step(opt)
    before = snapshot(model, opt)
    model.zero_grad()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.01)
    model.weight.grad[0, 0] = 280.0
    quiet_step(opt)
    assert_untouched_but_counted(before, snapshot(model, opt))
    backward(model, x, y)
    quiet_step(opt)
    assert all_finite(model, opt)


@pytest.mark.parametrize("eps_mode", EPS_MODES)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("dtype, factor", [(torch.float32, 1e6), (torch.float16, 30.0), (torch.bfloat16, 1e6)])
def test_adal_large_gradients_that_fit_are_not_skipped(dtype, factor, transform, eps_mode):
    """The guard judges the outcome, not the input: a large spike whose step is representable is taken."""
    model, x, y = tiny_problem(dtype)
    opt = AdaL(model.parameters(), lr=1e-2, transform=transform, eps_mode=eps_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for k in range(8):
            backward(model, x, y, factor if k == 3 else 1.0)
            opt.step()
    assert opt.param_groups[0]["skipped_steps"] == 0
    assert all_finite(model, opt)


def test_adal_step_fits_on_floats():
    """The guard as a pure rule: within range, a gradient whose square overflows, a huge eps term."""
    from lightning_adaptive_lr.optim.adal import adal_step_fits

    largest = torch.finfo(torch.float32).max
    cap = 1.0 / math.sqrt(torch.finfo(torch.float32).tiny)
    options = {"betas": (0.9, 0.999), "eps_in_denominator": False, "cap": cap}
    options.update(largest=largest, largest_work=largest)

    def rule(scale: float, eps: float = 1e-8) -> AdaLScalars:
        return adal_scalars(
            scale, 0.0, 0.0, 1, lr=1e-3, betas=(0.9, 0.999), eps=eps, eps_in_denominator=False, floor=0.0
        )

    assert adal_step_fits(rule(10.0), 1.0, **options)
    assert not adal_step_fits(rule(10.0), 1e20, **options)  # ṽ would hold (1e20)² = inf
    assert not adal_step_fits(rule(1e30), 1e18, **options)  # lr·eps·m̂ ≈ 1e-11·1e30·1e18
    assert not adal_step_fits(rule(1e30, eps=1e30), 1.0, **options)  # eps·σ itself overflows
    inf_average = AdaLScalars(1.0, math.inf, 0.1, 0.0, True, -0.0, 0.0)
    assert not adal_step_fits(inf_average, 1.0, **options)


# ----------------------------------------------------------------------------- Step-Tuned: the step's outcome


def set_grads(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        p.grad = values[name].to(p.dtype).clone()


@pytest.mark.parametrize("same_batch", [False, True], ids=["next-batch", "same-batch"])
def test_step_tuned_huge_gradient_at_a_first_half_step_is_skipped(same_batch):
    """‖g_a‖² overflows the work dtype: the gate skips (x_k restored with same_batch)."""
    model, x, y = tiny_problem()
    opt = StepTunedSGD(model.parameters(), lr=0.1, same_batch=same_batch)
    calls = []

    def closure(factor: float = 1.0):
        calls.append(None)
        return backward(model, x, y, factor if len(calls) % 2 == 1 else 1.0)

    for _ in range(2):
        if same_batch:
            quiet_step(opt, closure)
        else:
            closure()
            quiet_step(opt)
    before = snapshot(model, opt)
    if same_batch:
        calls.clear()
        quiet_step(opt, lambda: closure(1e30))
    else:
        backward(model, x, y, 1e30)
        quiet_step(opt)
    after = snapshot(model, opt)
    assert equal(after["params"], before["params"])
    assert after["groups"][0]["skipped_steps"] == 1
    assert all_finite(model, opt)


@pytest.mark.parametrize("same_batch", [False, True], ids=["next-batch", "same-batch"])
def test_step_tuned_huge_gradient_at_a_second_half_step_writes_nothing_non_finite(same_batch):
    """‖g_b‖ is not read (it would cost a pass); a ×1e30 g_b is still a finite SGD step."""
    model, x, y = tiny_problem()
    opt = StepTunedSGD(model.parameters(), lr=0.1, same_batch=same_batch)
    calls = []

    def closure():
        calls.append(None)
        return backward(model, x, y, 1e30 if len(calls) == 4 else 1.0)

    for _ in range(2 if same_batch else 4):
        if same_batch:
            quiet_step(opt, closure)
        else:
            closure()
            quiet_step(opt)
    assert all_finite(model, opt)


@pytest.mark.parametrize("same_batch", [False, True], ids=["next-batch", "same-batch"])
def test_step_tuned_float16_opposite_gradients_do_not_overflow_the_average(same_batch):
    """Before: g_a − g_b = 8e4 overflowed float16 and stored D = inf (every later step skipped)."""
    model, _, _ = tiny_problem(torch.float16)
    opt = StepTunedSGD(model.parameters(), lr=0.1, same_batch=same_batch)
    small = {name: torch.full_like(p, 0.01) for name, p in model.named_parameters()}
    big_a, big_b = copy.deepcopy(small), copy.deepcopy(small)
    big_a["weight"][0, 0], big_b["weight"][0, 0] = 4e4, -4e4
    if same_batch:
        before = snapshot(model, opt)
        grads = iter([big_a, big_b])
        quiet_step(opt, lambda: set_grads(model, next(grads)))
        assert_untouched_but_counted(before, snapshot(model, opt))
    else:
        set_grads(model, big_a)
        quiet_step(opt)  # the first half-step is representable
        before = snapshot(model, opt)
        set_grads(model, big_b)
        quiet_step(opt)
        assert_untouched_but_counted(before, snapshot(model, opt))
        set_grads(model, small)
        quiet_step(opt)  # a representable g_b completes the iteration
        assert opt.param_groups[0]["iteration"] == 1
    assert all_finite(model, opt)


def test_step_tuned_gain_that_would_not_be_finite_is_skipped():
    """Before: in float64, ‖g_a‖² − ⟨g_b, g_a⟩ and η²‖g_a‖² overflowed and the gain γ became NaN."""
    model, _, _ = tiny_problem(torch.float64)
    opt = StepTunedSGD(model.parameters(), lr=10.0)
    huge = {name: torch.full_like(p, 3e152) for name, p in model.named_parameters()}
    set_grads(model, huge)
    quiet_step(opt)
    before = snapshot(model, opt)
    set_grads(model, {name: -g for name, g in huge.items()})
    quiet_step(opt)
    assert_untouched_but_counted(before, snapshot(model, opt))
    assert all_finite(model, opt)


# ----------------------------------------------------------------------------- schedulers

STEPS = 24


def cycling(schedule: str, lr: float) -> Any:
    """OneCycleLR at its defaults, or CyclicLR with a cycle short enough to show in a short run."""
    if schedule == "CyclicLR":
        return lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=lr / 10, max_lr=lr, step_size_up=4)
    return schedulers(lr)[schedule]


def schedulers(lr: float) -> dict[str, Any]:
    """Each scheduler at its defaults (only the arguments it requires are given)."""
    lr_scheduler = torch.optim.lr_scheduler
    return {
        "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=5),
        "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
        "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=STEPS),
        "CyclicLR": lambda opt: lr_scheduler.CyclicLR(opt, base_lr=lr / 10, max_lr=lr),
        "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt),
    }


OPTIMIZERS = {
    "AdaL": (lambda params: AdaL(params, lr=3e-2), 3e-2),
    "StepTunedSGD": (lambda params: StepTunedSGD(params, lr=0.3), 0.3),
}
SCHEDULED = [(o, s) for o in OPTIMIZERS for s in schedulers(1.0)]


def train(make_opt, make_scheduler=None, before_step=None) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    model, x, y = tiny_problem()
    opt = make_opt(model.parameters())
    scheduler = make_scheduler(opt) if make_scheduler else None
    losses = []
    for k in range(STEPS):
        loss = backward(model, x[k // 2 % 2 :: 2], y[k // 2 % 2 :: 2])  # one batch per Step-Tuned iteration
        if before_step is not None:
            before_step(opt, k)
        opt.step()
        losses.append(float(loss))
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(float(loss))
        elif scheduler is not None:
            scheduler.step()
    return model, opt, losses


@pytest.mark.parametrize("name, schedule", SCHEDULED, ids=[f"{o}-{s}" for o, s in SCHEDULED])
def test_schedulers_at_their_defaults(name, schedule):
    """Before: OneCycleLR and CyclicLR (cycle_momentum=True) raised on StepTunedSGD."""
    make_opt, lr = OPTIMIZERS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model, opt, losses = train(make_opt, schedulers(lr)[schedule])
    assert all_finite(model, opt)
    assert opt.param_groups[0]["skipped_steps"] == 0
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("schedule", ["OneCycleLR", "CyclicLR"])
def test_step_tuned_follows_the_scheduled_momentum(schedule):
    """The momentum a scheduler writes is the β of that step: same trajectory as writing ``beta`` by hand."""
    make_opt, lr = OPTIMIZERS["StepTunedSGD"]
    seen: list[tuple[float, float]] = []

    def record(opt, k):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))

    model, opt, _ = train(make_opt, cycling(schedule, lr), record)
    assert len({m for _, m in seen}) > 3  # the momentum was cycled
    assert opt.param_groups[0]["beta"] == seen[-1][1]  # the last step's β (the scheduler has moved on)

    def replay(opt, k):
        for group in opt.param_groups:
            group["lr"], group["beta"] = seen[k]

    by_hand, _, _ = train(make_opt, None, replay)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), by_hand.parameters()))

    def lr_only(opt, k):
        for group in opt.param_groups:
            group["lr"] = seen[k][0]

    fixed_beta, _, _ = train(make_opt, None, lr_only)  # β matters: the cycled one gives another trajectory
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fixed_beta.parameters()))


@pytest.mark.parametrize("schedule", ["OneCycleLR", "CyclicLR"])
def test_adal_follows_the_scheduled_beta1(schedule):
    """OneCycleLR and CyclicLR cycle ``betas[0]``; AdaL reads it at every step."""
    make_opt, lr = OPTIMIZERS["AdaL"]
    seen: list[tuple[float, tuple[float, float]]] = []

    def record(opt, k):
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]))

    model, _, _ = train(make_opt, cycling(schedule, lr), record)
    assert len({b[0] for _, b in seen}) > 3

    def replay(opt, k):
        for group in opt.param_groups:
            group["lr"], group["betas"] = seen[k]

    by_hand, _, _ = train(make_opt, None, replay)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), by_hand.parameters()))


def test_step_tuned_momentum_and_beta_stay_one_option():
    """``momentum`` mirrors ``beta``: either may be written, both read the value used; groups agree."""
    model, x, y = tiny_problem()
    opt = StepTunedSGD(model.parameters(), lr=0.1, beta=0.8)
    assert opt.defaults["momentum"] == opt.param_groups[0]["momentum"] == 0.8
    opt.param_groups[0]["beta"] = 0.7  # written by hand: taken
    backward(model, x, y)
    opt.step()
    assert opt.param_groups[0]["momentum"] == opt.param_groups[0]["beta"] == 0.7
    opt.param_groups[0]["momentum"] = 0.6  # written by a scheduler: taken
    backward(model, x, y)
    opt.step()
    assert opt.param_groups[0]["momentum"] == opt.param_groups[0]["beta"] == 0.6
    opt.param_groups[0]["momentum"] = 1.0
    backward(model, x, y)
    with pytest.raises(ValueError, match="momentum"):
        opt.step()

    two = StepTunedSGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    two.param_groups[0]["momentum"], two.param_groups[1]["momentum"] = 0.8, 0.85
    backward(model, x, y)
    with pytest.raises(ValueError, match="momentum"):
        two.step()


def test_step_tuned_old_state_dict_gets_its_momentum():
    """A state dict saved before ``momentum`` existed loads with ``momentum`` = ``beta``."""
    model, x, y = tiny_problem()
    opt = StepTunedSGD(model.parameters(), lr=0.1, beta=0.8)
    backward(model, x, y)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["momentum"]
    fresh = StepTunedSGD(model.parameters(), lr=0.1)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["momentum"] == fresh.param_groups[0]["beta"] == 0.8


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_learning_rate_monitor_logs_the_momentum_used(name):
    """Before: the monitor found no ``momentum`` on StepTunedSGD and logged 0."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning_helpers import Classifier, loader, trainer
    from test_lightning_monitor import MemoryLogger

    make_opt, lr = OPTIMIZERS[name]
    used: list[float] = []  # the β (StepTunedSGD) or β1 (AdaL) each step used, read right after it

    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        group = opt.param_groups[0]
        used.append(group["betas"][0] if "betas" in group else group["beta"])

    class Scheduled(Classifier):
        def configure_optimizers(self) -> Any:
            opt = make_opt(self.parameters())
            opt.register_step_post_hook(after_step)
            cycle = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=16)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": cycle, "interval": "step"}}

    logger = MemoryLogger()
    fit = trainer(
        max_steps=16, logger=logger, log_every_n_steps=1, callbacks=[LearningRateMonitor(log_momentum=True)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit.fit(Scheduled(lambda p: None), loader(n=256, batch_size=16))
    logged = [value for _, row in logger.calls for key, value in row.items() if key.endswith("-momentum")]
    assert len(logged) == len(used) == 16
    assert logged == pytest.approx(used, rel=0, abs=0)
    assert len(set(used)) > 3


# ----------------------------------------------------------------------------- complex parameters

WIDE = (0.05, 20.0)
COMPLEX_CASES = {
    "AdaL": lambda ps: AdaL(ps, lr=1e-2),
    "AdaL-tensor_l1-denominator-per-tensor": lambda ps: AdaL(
        ps, lr=1e-2, transform="tensor_l1", eps_mode="denominator", foreach=False
    ),
    "AdaL-none-wd": lambda ps: AdaL(ps, lr=1e-2, transform="none", weight_decay=0.1),
    # wide gain bounds: a gain clipped at every iteration would hide how it was estimated
    "StepTunedSGD": lambda ps: StepTunedSGD(ps, lr=0.1, gain_bounds=WIDE),
    "StepTunedSGD-wd-per-tensor": lambda ps: StepTunedSGD(
        ps, lr=0.1, weight_decay=0.1, gain_bounds=WIDE, foreach=False
    ),
    "StepTunedSGD-same_batch": lambda ps: StepTunedSGD(ps, lr=0.1, gain_bounds=WIDE, same_batch=True),
}


def complex_run(make_opt, as_complex: bool, steps: int = 12) -> torch.Tensor:
    """A complex least-squares fit, with a complex parameter or with its real pairs; returns the real pairs."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, dtype=torch.complex128, generator=gen)
    b = torch.randn(6, dtype=torch.complex128, generator=gen)
    z0 = torch.randn(3, dtype=torch.complex128, generator=gen)
    extra = torch.randn(2, dtype=torch.float64, generator=gen)  # a real parameter beside it
    if as_complex:
        p = nn.Parameter(z0.clone())
        value = lambda: p
    else:
        p = nn.Parameter(torch.view_as_real(z0).clone())
        value = lambda: torch.view_as_complex(p)
    w = nn.Parameter(extra.clone())
    opt = make_opt([p, w])

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (a @ value() - b).abs().pow(2).mean() + (w - 1).pow(2).sum() * value().abs().pow(2).mean()
        loss.backward()
        return loss.detach()

    for _ in range(steps):
        if getattr(opt, "calls_closure_twice", False):
            opt.step(closure)
        else:
            closure()
            opt.step()
    pairs = torch.view_as_real(p.detach()) if as_complex else p.detach()
    return torch.cat([pairs.reshape(-1), w.detach()])


@pytest.mark.parametrize("name", list(COMPLEX_CASES))
def test_complex_parameters_follow_the_real_pair_problem(name):
    """A complex parameter is optimized as its real pairs (torch.optim's convention).

    Before: AdaL raised in ``clamp`` (complex ṽ); Step-Tuned SGD paired its two half-steps by the
    identity of a fresh real view, so no parameter ever entered the gain.
    """
    make_opt = COMPLEX_CASES[name]
    as_complex = complex_run(make_opt, True)
    as_pairs = complex_run(make_opt, False)
    torch.testing.assert_close(as_complex, as_pairs, rtol=1e-12, atol=1e-14)
