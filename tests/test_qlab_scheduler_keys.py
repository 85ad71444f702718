"""QLAB's bounds live in param-group keys of its own, where no scheduler writes.

torch's ``OneCycleLR`` writes its schedule's ``max_lr``, ``min_lr`` (and ``initial_lr``) into every
param group at construction and reads them back at every step.  QLAB kept the bounds of its fitted
rate (the options ``min_lr``, ``max_lr``) under those names: under OneCycleLR the fitted rate was
silently capped at the schedule's peak and floored at its final rate, and a user who "repaired" the
keys changed the schedule instead.  The bounds are now kept as ``qlab_min_lr`` and ``qlab_max_lr``
(the options keep their names); state dicts saved with the old keys continue with their numbers.

The problems are quadratics in float64 along whose first step the fit is exact: ``½·h·‖x‖²`` on
SGD (the fitted rate is ``1/h``) and ``½‖x‖²`` on Adam with ``eps = 0`` (whose first direction is
``sign(g)``: the fitted rate is ``|x|``), so that the fitted rate lies above the schedule's peak
(0.1) or between its floor (4e-7) and QLAB's (1e-6).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr import QLAB
from lightning_adaptive_lr.optim.qlab import BOUND_KEYS, MAX_LR_KEY, MIN_LR_KEY

#: OneCycleLR's peak, and what it writes: ``initial_lr = peak/25``, ``min_lr = initial_lr/1e4``.
PEAK, STEPS = 0.1, 10
SCHEDULE_MIN_LR = PEAK / 25 / 1e4
#: The bounds a QLAB built with the defaults keeps.
DEFAULT_MIN_LR, DEFAULT_MAX_LR = 1e-6, 10.0

#: Per base, the options under which only ``min_lr``/``max_lr`` bound the fitted rate, and per bound
#: the starting point, the curvature h and the rate the fit finds on the first step.
SGD_OPTIONS = {"max_growth": math.inf}
ADAM_OPTIONS = {"max_growth": math.inf, "max_lr_scale": math.inf, "eps": 0.0}
FITS = {
    # ½·h·‖x‖² along −η·g: the fitted rate is 1/h.
    ("sgd", "max"): ([1.0, 1.0], 0.5, 2.0),
    ("sgd", "min"): ([1.0, 1.0], 2e6, 5e-7),
    # ½·‖x‖² along −η·sign(g) (Adam's first step, eps = 0): the fitted rate is |x|.
    ("adam", "max"): ([1.0, 1.0], 1.0, 1.0),
    ("adam", "min"): ([5e-7, 5e-7], 1.0, 5e-7),
}
#: The rate QLAB's own bounds make of each fit: the fit itself above the peak, QLAB's floor below.
EXPECTED = {"max": lambda fit: fit, "min": lambda fit: DEFAULT_MIN_LR}


def quadratic(start: list[float], h: float | list[float]) -> tuple[nn.Parameter, Callable[[], torch.Tensor]]:
    """A float64 parameter at ``start`` and the loss ``½·Σ h·x²`` (the probe too: no mini-batch)."""
    x = nn.Parameter(torch.tensor(start, dtype=torch.float64))
    curvature = torch.as_tensor(h, dtype=torch.float64)
    return x, lambda: 0.5 * (curvature * x**2).sum()


def qlab_step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> None:
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    opt.step(loss=loss, probe=loss_fn)


def number(value: Any) -> float:
    return float(value)  # a capturable step keeps its records as 0-d tensors


def one_cycle(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.OneCycleLR:
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PEAK, total_steps=STEPS)


def assert_schedule_keys(group: dict[str, Any]) -> None:
    """The keys OneCycleLR wrote are still its own."""
    assert group["max_lr"] == PEAK and group["min_lr"] == pytest.approx(SCHEDULE_MIN_LR, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# OneCycleLR: QLAB's bounds stay the constructor's.


@pytest.mark.parametrize("bound", ["max", "min"])
@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
@pytest.mark.parametrize("base", ["sgd", "adam"], ids=["sgd-plain", "adam-anchored"])
def test_one_cycle_does_not_bound_the_fitted_rate(base: str, capturable: bool, bound: str) -> None:
    """A fitted rate above the schedule's peak is not capped there, and one between the schedule's
    final rate and QLAB's ``min_lr`` is raised to QLAB's."""
    start, h, fit = FITS[base, bound]
    x, loss_fn = quadratic(start, h)
    options = SGD_OPTIONS if base == "sgd" else ADAM_OPTIONS
    opt = QLAB([x], base=base, lr=PEAK, capturable=capturable, **options)
    one_cycle(opt)
    group = opt.param_groups[0]
    assert (group[MIN_LR_KEY], group[MAX_LR_KEY]) == (DEFAULT_MIN_LR, DEFAULT_MAX_LR)
    qlab_step(opt, loss_fn)
    assert number(group["fitted_lr"]) == pytest.approx(fit, rel=1e-9)  # the problem is what it claims
    assert number(group["effective_lr"]) == pytest.approx(EXPECTED[bound](fit), rel=1e-9)
    assert (group[MIN_LR_KEY], group[MAX_LR_KEY]) == (DEFAULT_MIN_LR, DEFAULT_MAX_LR)
    assert_schedule_keys(group)


def lr_schedule(steps: int = STEPS) -> list[float]:
    """OneCycleLR's rates on a plain ``torch.optim.SGD``: its ``lr`` before each step."""
    sgd = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=PEAK)
    schedule = one_cycle(sgd)
    rates = []
    for _ in range(steps):
        rates.append(sgd.param_groups[0]["lr"])
        sgd.step()
        schedule.step()
    return rates


def set_lr(group: dict[str, Any], lr: float) -> None:
    """Write ``lr`` as a scheduler does (in place into a capturable group's tensor)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


#: The group entries OneCycleLR writes before each step: the rate and the cycled momentum.
SCHEDULED = ("lr", "momentum", "betas")


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
@pytest.mark.parametrize("base", ["sgd", "adam"], ids=["sgd-plain", "adam-anchored"])
def test_one_cycle_run_is_the_run_with_its_rates_set_by_hand(base: str, capturable: bool) -> None:
    """Under OneCycleLR the run is the one with the same rates (and momenta) written by hand, without
    the scheduler's keys in the groups, step for step and bit for bit; the rates OneCycleLR writes are
    its schedule on a plain SGD; after the run its ``min_lr``/``max_lr`` are still its own.  The
    fitted rates lie above the peak (h ≤ 2 on SGD), so bounds read from the scheduler's keys would
    change the run."""
    # min_trial_lr below the schedule's last rate (4e-7), which the trial then follows
    options = {**(SGD_OPTIONS if base == "sgd" else ADAM_OPTIONS), "min_trial_lr": 1e-7}
    runs: list[tuple[torch.Tensor, list[dict[str, Any]], list[float]]] = []
    for scheduled in (True, False):
        x, loss_fn = quadratic([1.0, -0.7, 0.4], [0.5, 1.0, 2.0])
        opt = QLAB([x], base=base, lr=PEAK, capturable=capturable, **options)
        schedule = one_cycle(opt) if scheduled else None
        group = opt.param_groups[0]
        written, effective = [], []
        for i in range(STEPS):
            if schedule is None:  # what OneCycleLR wrote in the scheduled run, written by hand
                set_lr(group, runs[0][1][i]["lr"])
                group.update({key: value for key, value in runs[0][1][i].items() if key != "lr"})
            written.append({key: number(group[key]) if key == "lr" else group[key] for key in SCHEDULED if key in group})
            qlab_step(opt, loss_fn)
            effective.append(number(group["effective_lr"]))
            if schedule is not None:
                schedule.step()
        if scheduled:
            assert_schedule_keys(group)
        else:
            assert not {"max_lr", "min_lr", "initial_lr"} & set(group)
        runs.append((x.detach().clone(), written, effective))
    (x_scheduled, written, effective), (x_by_hand, _, effective_by_hand) = runs
    assert [entries["lr"] for entries in written] == lr_schedule()  # OneCycleLR's schedule, untouched by QLAB
    assert max(effective) > PEAK  # the run exercises what it checks
    assert effective == effective_by_hand
    assert torch.equal(x_scheduled, x_by_hand)


def test_changing_a_bound_leaves_the_schedule_alone() -> None:
    """The bound is changed in QLAB's key: the fitted rate follows it, OneCycleLR's rates do not."""
    expected = lr_schedule()
    x, loss_fn = quadratic([1.0, 1.0], 0.5)
    opt = QLAB([x], base="sgd", lr=PEAK, min_trial_lr=1e-7, **SGD_OPTIONS)  # the schedule ends at 4e-7
    schedule = one_cycle(opt)
    group = opt.param_groups[0]
    group[MAX_LR_KEY] = 1.5
    rates = []
    for _ in range(STEPS):
        rates.append(group["lr"])
        qlab_step(opt, loss_fn)
        if len(rates) == 1:
            assert group["effective_lr"] == pytest.approx(1.5, rel=1e-12)  # the fit (2.0) capped at 1.5
        schedule.step()
    assert rates == expected
    assert_schedule_keys(group)


#: Every scheduler of torch.optim.lr_scheduler that writes into the param groups, momentum cycling on.
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "OneCycleLR": one_cycle,
    "CyclicLR": lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=PEAK / 10, max_lr=PEAK, step_size_up=3),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "LinearLR": lambda opt: torch.optim.lr_scheduler.LinearLR(opt),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
}


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("base", ["sgdm", "adam"])
def test_no_torch_scheduler_writes_the_bounds(base: str, scheduler: str) -> None:
    """The keys torch's schedulers add to a param group (``initial_lr``, OneCycleLR's ``max_lr`` and
    ``min_lr``, the momentum cyclers' ``base_momentum``/``max_momentum``) are not QLAB's, and a run
    under each keeps QLAB's bounds as they were built."""
    x, loss_fn = quadratic([1.0, -0.7, 0.4], [0.5, 1.0, 2.0])
    opt = QLAB([x], base=base, lr=PEAK, min_lr=1e-5, max_lr=3.0, min_trial_lr=1e-7)  # OneCycleLR ends at 4e-7
    before = set(opt.param_groups[0])
    schedule = SCHEDULERS[scheduler](opt)
    added = set(opt.param_groups[0]) - before
    assert not added & set(BOUND_KEYS.values())
    for _ in range(STEPS):
        qlab_step(opt, loss_fn)
        schedule.step(1.0) if scheduler == "ReduceLROnPlateau" else schedule.step()
    group = opt.param_groups[0]
    assert (group[MIN_LR_KEY], group[MAX_LR_KEY]) == (1e-5, 3.0)


# ---------------------------------------------------------------------------------------------
# QLAB.wrap: the bounds passed to wrap, whichever side the scheduler was attached to.


def wrapped(kind: str, x: nn.Parameter, **options: Any) -> torch.optim.Optimizer:
    if kind == "SGD":
        return torch.optim.SGD([x], lr=PEAK, **options)
    return torch.optim.Adam([x], lr=PEAK, eps=0.0, **options)


@pytest.mark.parametrize("bound", ["max", "min"])
@pytest.mark.parametrize("attached", ["to-the-base-before-wrap", "to-the-wrapper"])
@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_wrap_with_one_cycle_keeps_its_bounds(kind: str, attached: str, bound: str) -> None:
    """``QLAB.wrap(torch.optim.SGD/Adam)`` under OneCycleLR: attached to the wrapped optimizer before
    wrapping (what ``AdaptiveLRCallback(qlab=True)`` meets: the groups already hold the schedule's
    keys) or to the wrapper; the bounds are the ones given to ``wrap`` (its defaults here)."""
    start, h, fit = FITS["sgd" if kind == "SGD" else "adam", bound]
    x, loss_fn = quadratic(start, h)
    base = wrapped(kind, x)
    options = {"max_growth": math.inf, "max_lr_scale": math.inf}
    if attached == "to-the-base-before-wrap":
        schedule = one_cycle(base)
        opt = QLAB.wrap(base, **options)
    else:
        opt = QLAB.wrap(base, **options)
        schedule = one_cycle(opt)
    group = opt.param_groups[0]
    assert (group[MIN_LR_KEY], group[MAX_LR_KEY]) == (DEFAULT_MIN_LR, DEFAULT_MAX_LR)
    qlab_step(opt, loss_fn)
    schedule.step()
    assert group["fitted_lr"] == pytest.approx(fit, rel=1e-6)
    assert group["effective_lr"] == pytest.approx(EXPECTED[bound](fit), rel=1e-6)
    assert_schedule_keys(group)
    assert group["lr"] == lr_schedule(2)[1]


@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_wrap_under_one_cycle_follows_the_schedule(kind: str) -> None:
    """The wrapper's run under OneCycleLR: the rates it writes are its schedule on a plain SGD, and
    the fitted rates above the peak are taken (up to ``max_lr`` given to wrap)."""
    x, loss_fn = quadratic([1.0, -0.7, 0.4], [0.5, 1.0, 2.0])
    opt = QLAB.wrap(wrapped(kind, x), max_growth=math.inf, max_lr_scale=math.inf, max_lr=1.5)
    schedule = one_cycle(opt)
    rates, effective = [], []
    for _ in range(STEPS):
        rates.append(opt.param_groups[0]["lr"])
        qlab_step(opt, loss_fn)
        effective.append(opt.param_groups[0]["effective_lr"])
        schedule.step()
    assert rates == lr_schedule()
    assert PEAK < max(effective) <= 1.5
    assert_schedule_keys(opt.param_groups[0])


# ---------------------------------------------------------------------------------------------
# Per-group bounds, and the constructor's checks.


def test_a_param_group_keeps_its_own_bounds_under_qlab_keys() -> None:
    """A group given with ``min_lr``/``max_lr`` keeps them as its ``qlab_min_lr``/``qlab_max_lr``
    (not under the names OneCycleLR overwrites), also a group added later and one added through
    the wrapper."""
    a, b, c = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    opt = QLAB([{"params": [a], "max_lr": 2.0}, {"params": [b], "min_lr": 1e-3}], base="sgd", max_lr=5.0)
    opt.add_param_group({"params": [c], "min_lr": 1e-4, "max_lr": 0.5})
    bounds = [(g[MIN_LR_KEY], g[MAX_LR_KEY]) for g in opt.param_groups]
    assert bounds == [(DEFAULT_MIN_LR, 2.0), (1e-3, 5.0), (1e-4, 0.5)]
    assert not any({"min_lr", "max_lr"} & set(g) for g in opt.param_groups)
    one_cycle(opt)
    assert [(g[MIN_LR_KEY], g[MAX_LR_KEY]) for g in opt.param_groups] == bounds

    d = nn.Parameter(torch.zeros(1))
    wrapper = QLAB.wrap(torch.optim.SGD([a], lr=0.1), max_lr=3.0)
    wrapper.add_param_group({"params": [d], "max_lr": 0.25})
    bounds = [(g[MIN_LR_KEY], g[MAX_LR_KEY]) for g in wrapper.param_groups]
    assert bounds == [(DEFAULT_MIN_LR, 3.0), (DEFAULT_MIN_LR, 0.25)]


def test_invalid_bounds_are_still_refused() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    for bad in ({"min_lr": -1.0}, {"max_lr": 0.0}, {"max_lr": float("nan")}, {"min_lr": 1.0, "max_lr": 0.1}):
        with pytest.raises(ValueError, match="min_lr" if "min_lr" in bad else "max_lr"):
            QLAB(params, **bad)
        with pytest.raises(ValueError, match="min_lr" if "min_lr" in bad else "max_lr"):
            QLAB.wrap(torch.optim.SGD(params, lr=0.1), **bad)
    opt = QLAB(params, min_lr=1e-4, max_lr=2.0)
    assert (opt.defaults[MIN_LR_KEY], opt.defaults[MAX_LR_KEY]) == (1e-4, 2.0)
    assert not {"min_lr", "max_lr"} & set(opt.defaults)


# ---------------------------------------------------------------------------------------------
# State dicts saved with the old keys.


def with_old_keys(state_dict: dict[str, Any], *, class_name: bool = True) -> dict[str, Any]:
    """``state_dict`` as saved before the bounds had their own keys: under ``min_lr``/``max_lr``
    (and, ``class_name=False``, without the saving class, as release 0.1 saved it)."""
    out = copy.deepcopy(state_dict)
    for group in out["param_groups"]:
        for option, key in BOUND_KEYS.items():
            group[option] = group.pop(key)
        if not class_name:
            group.pop("optimizer")
    return out


def make_qlab(x: nn.Parameter, **options: Any) -> QLAB:
    return QLAB([x], base="sgd", lr=PEAK, max_growth=math.inf, **options)


def make_wrap(x: nn.Parameter, **options: Any) -> torch.optim.Optimizer:
    return QLAB.wrap(torch.optim.SGD([x], lr=PEAK), max_growth=math.inf, **options)


@pytest.mark.parametrize("class_name", [True, False], ids=["class-recorded", "release-0.1"])
@pytest.mark.parametrize("make", [make_qlab, make_wrap], ids=["QLAB", "QLAB.wrap(SGD)"])
def test_a_state_dict_with_the_old_keys_continues_with_its_bounds(make: Callable[..., Any], class_name: bool) -> None:
    """Saved with ``min_lr=1e-3, max_lr=0.3`` (the fit, 0.5 to 2, is capped at 0.3 at every step)
    under the old keys, loaded into an optimizer built with the defaults: the run continues as the
    saving one does, bit for bit, with the saved bounds."""
    x, loss_fn = quadratic([1.0, -0.7, 0.4], [0.5, 1.0, 2.0])
    saving = make(x, min_lr=1e-3, max_lr=0.3)
    for _ in range(3):
        qlab_step(saving, loss_fn)
    old = with_old_keys(saving.state_dict(), class_name=class_name)
    y, loss_y = quadratic(x.tolist(), [0.5, 1.0, 2.0])
    loading = make(y)
    loading.load_state_dict(old)
    for group in loading.param_groups:
        assert (group[MIN_LR_KEY], group[MAX_LR_KEY]) == (1e-3, 0.3)
    for _ in range(3):
        qlab_step(saving, loss_fn)
        qlab_step(loading, loss_y)
        assert saving.param_groups[0]["effective_lr"] == loading.param_groups[0]["effective_lr"] == 0.3
    assert torch.equal(x, y)
    # saved again, the state dict holds the bounds under QLAB's keys (and loads again)
    saved_again = loading.state_dict()
    assert (saved_again["param_groups"][0][MIN_LR_KEY], saved_again["param_groups"][0][MAX_LR_KEY]) == (1e-3, 0.3)
    make(nn.Parameter(y.detach().clone())).load_state_dict(saved_again)


def test_an_old_state_dict_saved_under_one_cycle_continues_with_both() -> None:
    """Saved under OneCycleLR by the old code, the groups' ``min_lr``/``max_lr`` are the schedule's:
    the run continues with those numbers as its bounds (as it ran), and the schedule, loaded after the
    optimizer, continues with its keys (which stay in the groups)."""
    x, loss_fn = quadratic([1.0, -0.7, 0.4], [0.5, 1.0, 2.0])
    opt = make_qlab(x)
    schedule = one_cycle(opt)
    for _ in range(3):
        qlab_step(opt, loss_fn)
        schedule.step()
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:  # the old code's groups: one min_lr/max_lr, the schedule's
        for key in BOUND_KEYS.values():
            del group[key]
    y, loss_y = quadratic(x.tolist(), [0.5, 1.0, 2.0])
    loading = make_qlab(y)
    resumed = one_cycle(loading)
    loading.load_state_dict(old)
    resumed.load_state_dict(schedule.state_dict())
    group = loading.param_groups[0]
    assert (group[MIN_LR_KEY], group[MAX_LR_KEY]) == (group["min_lr"], group["max_lr"]) == (SCHEDULE_MIN_LR, PEAK)
    for _ in range(3):
        rate = group["lr"]
        qlab_step(loading, loss_y)
        assert group["effective_lr"] <= PEAK  # the old run's cap, kept
        resumed.step()
        assert group["lr"] != rate  # the schedule goes on
    assert_schedule_keys(group)


def test_old_and_class_less_state_dicts_are_told_apart() -> None:
    """A QLAB state dict with the old keys and no class name (release 0.1) is still recognized as
    QLAB's: QLAB loads it, another optimizer refuses it naming QLAB; another optimizer's is refused."""
    x, loss_fn = quadratic([1.0, -0.7, 0.4], [0.5, 1.0, 2.0])
    opt = make_qlab(x)
    qlab_step(opt, loss_fn)
    for state_dict in (with_old_keys(opt.state_dict(), class_name=False), with_old_keys(opt.state_dict())):
        make_qlab(nn.Parameter(x.detach().clone())).load_state_dict(copy.deepcopy(state_dict))
        with pytest.raises(ValueError, match="QLAB"):
            lalr.MoMo([nn.Parameter(x.detach().clone())]).load_state_dict(copy.deepcopy(state_dict))
    momo = lalr.MoMo([nn.Parameter(x.detach().clone())])
    with pytest.raises(ValueError, match="MoMo"):
        make_qlab(x).load_state_dict(momo.state_dict())
    class_less = copy.deepcopy(momo.state_dict())
    for group in class_less["param_groups"]:
        group.pop("optimizer")
    with pytest.raises(ValueError, match="MoMo"):
        make_qlab(x).load_state_dict(class_less)


def test_an_optimizer_pickled_with_the_old_keys_gets_them() -> None:
    """An optimizer pickled before the keys existed (groups and defaults with ``min_lr``/``max_lr``)
    steps with its bounds after unpickling."""
    x, loss_fn = quadratic([1.0, 1.0], 0.5)
    opt = make_qlab(x, max_lr=1.5)
    state = opt.__getstate__()
    for mapping in (state["defaults"], *state["param_groups"]):
        for option, key in BOUND_KEYS.items():
            mapping[option] = mapping.pop(key)
    restored = QLAB.__new__(QLAB)
    restored.__setstate__(state)
    assert (restored.defaults[MIN_LR_KEY], restored.defaults[MAX_LR_KEY]) == (DEFAULT_MIN_LR, 1.5)
    qlab_step(restored, loss_fn)
    assert restored.param_groups[0]["effective_lr"] == pytest.approx(1.5, rel=1e-12)
