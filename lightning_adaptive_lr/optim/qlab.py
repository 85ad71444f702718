r"""QLAB: the step size from a quadratic fit of the loss along the update (docs/algorithms.md §2).

Fu and Wu, "QLAB: Quadratic Loss Approximation-Based Optimal Learning Rate for Deep Learning"
(2023), published at AAAI 2024 as "QLABGrad: a Hyperparameter-Free and Convergence-Guaranteed
Scheme for Deep Learning".

Each step, the base rule (SGD, SGD with momentum, Adam, AdamW from :mod:`._directions`, or any
``torch.optim`` optimizer through :meth:`QLAB.wrap`) takes its normal step with its current rate
η; that displacement Δ is the search direction.  Along it, ``φ(t) = L(x + t·Δ)`` is fitted by the
quadratic through ``φ(0) = f``, ``φ'(0) = ⟨g, Δ⟩`` and one extra loss value ``φ(1) = f̃`` (the
*probe*, a forward pass without backward on the same mini-batch), and the parameters move to its
minimum::

    a1 = ⟨g, Δ⟩,   a2 = f̃ − f − a1,   t* = −a1 / (2·a2)   (if a1 < 0 < a2, else t* = 1)
    η' = clamp(min(t*, max_growth)·η, min_lr, max_lr),   x ← x + (η'/η)·Δ

With the plain rule (``max_lr_scale=None``: the SGD bases' default) η' becomes the base rule's
rate for the next step, so ``param_groups[i]["lr"]`` holds the rate the next trial step will use.
With the anchored rule (``max_lr_scale=c``: the Adam bases' default, ``c = 1``) ``lr`` stays the
user's (or the scheduler's) rate a, the upper bound becomes ``min(max_lr, c·a)``, and the group
keeps the multiplier ``lr_scale = η'/a`` for the next trial step.  The base rule's buffers
(momentum, Adam moments) are updated exactly once per step, by the trial step.  The scalar rules
are :func:`qlab_step_factor` and :func:`qlab_rate`.

Outside the method's assumptions (docs/algorithms.md §2.5), all [package]: ``lr = 0`` freezes a
group; an ``lr`` set between 0 and ``min_trial_lr`` does not change the step and is warned about
once; a step whose trial or fitted point (or the base rule's buffers) would not be finite is
skipped untouched, checked on copies where a host-side screen asks for it.

``capturable=True`` (the built-in bases) runs the same rules with every decision on the device
(:meth:`QLAB._device_step`): the scalar rules take 0-d tensors as well as numbers.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._base import (
    BETAS,
    DEFAULT_MAX_CONSECUTIVE_SKIPS,
    FLAG,
    FRACTION,
    LEGACY_GLOBAL,
    NONNEGATIVE,
    POSITIVE,
    AdaptiveOptimizer,
    LossClosure,
    _constructor_options,
    check_flag,
    checked,
    one_of,
    real_number,
    runtime_options,
    written_into,
)
from ._adam_compiled import run_adam_step
from ._compiled import ensure_inductor_works, run_with_table
from ._directions import (
    adam_denominators,
    adam_directions,
    adam_moments_,
    momentum_,
    with_l2,
)
from ._protocol import Probe
from ._reduce import accumulation_dtype, dot, sqnorm, tensor_extrema, work_dtype
from ._scalars import Scalar, safe_div, smax, smin, where
from ._sgd_compiled import heavy_ball_step
from ._tensorlists import add_scaled_, clone, copy_, subtract_

__all__ = ["QLAB", "QLABWrapper", "qlab_rate", "qlab_step_factor"]

BASES = ("sgd", "sgdm", "adam", "adamw")
#: The built-in bases whose direction is preconditioned per coordinate (``max_lr_scale="auto"``).
ADAPTIVE_BASES = ("adam", "adamw")

# Defaults of the bounds, chosen by measurement (see the QLAB docstring and docs/benchmarks.md).
DEFAULT_MIN_LR = 1e-6
DEFAULT_MAX_LR = 10.0
DEFAULT_MIN_TRIAL_LR = 1e-3
DEFAULT_MAX_GROWTH = 2.0
#: ``max_lr_scale="auto"``: on an adaptive base (Adam, AdamW; a wrapped Adam-like torch optimizer)
#: the fitted rate stays at most this many times the group's ``lr``; on the others the plain
#: rule (``None``).  Chosen by measurement (the QLAB docstring and docs/benchmarks.md).
DEFAULT_ADAPTIVE_MAX_LR_SCALE = 1.0
AUTO = "auto"
#: The torch optimizers whose step is preconditioned per coordinate, so that their ``lr`` is the
#: size of a step in every coordinate (``max_lr_scale="auto"`` anchors QLAB's rate to it).
ADAPTIVE_TORCH_OPTIMIZERS: tuple[type[Optimizer], ...] = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "Adadelta", "RMSprop", "SparseAdam", "Adafactor")
    if hasattr(torch.optim, name)
)

#: Param-group key of the anchored rule's multiplier: the next trial rate is ``lr·lr_scale``.
LR_SCALE = "lr_scale"

#: Param-group keys of the bounds of the fitted rate (the options ``min_lr`` and ``max_lr``): QLAB's
#: own, because torch's ``OneCycleLR`` writes its schedule's ``min_lr`` and ``max_lr`` into every
#: param group and reads them back at every step (under those names QLAB's bounds would become the
#: schedule's, and a repaired bound would change the schedule).
MIN_LR_KEY = "qlab_min_lr"
MAX_LR_KEY = "qlab_max_lr"
#: The options kept in the param groups under another key: option name → group key.  State dicts
#: saved before the keys existed hold the bounds under the option names (:meth:`_QLABFit._convert_legacy`).
BOUND_KEYS = {"min_lr": MIN_LR_KEY, "max_lr": MAX_LR_KEY}

#: Key under which a release-0.1 state dict of ``QLAB.wrap`` kept the ``state["global"]`` of a
#: wrapped optimizer of this package (its own ``"global"`` held the wrapper's scalars).
LEGACY_BASE_GLOBAL = "base_" + LEGACY_GLOBAL

_PROBE_FIXES = (
    "pass both as `optimizer.step(loss=loss, probe=probe)`, where `probe()` returns the same "
    "mini-batch's loss at the current parameters without backward (or register the probe once with "
    "`optimizer.set_probe(probe)`), or, in Lightning, add `lightning_adaptive_lr.AdaptiveLRCallback()` "
    "to the Trainer's callbacks"
)


# --------------------------------------------------------------------------- the scalar rules


def qlab_step_factor(a1: Scalar, a2: Scalar) -> Scalar:
    """The factor ``t*`` of the quadratic fit, with the authors' fallback (docs/algorithms.md §2).

    ``a1 = ⟨g, Δ⟩`` is the slope and ``a2 = f̃ − f − a1`` the curvature term of
    ``φ(t) ≈ f + a1·t + a2·t²``.  Its minimum ``t* = −a1 / (2·a2)`` is used only when the
    direction descends (``a1 < 0``) and the fit is convex (``a2 > 0``); otherwise, and when
    either is not finite, the rate is kept (``t* = 1``).  Works on floats and on 0-d tensors
    (the ``capturable`` step's).

    >>> qlab_step_factor(-2.0, 4.0)
    0.25
    >>> qlab_step_factor(-2.0, -1.0)  # concave along Δ: keep the rate
    1.0
    """
    usable = (a1 < 0.0) & (a2 > 0.0) & _finite(a1) & _finite(a2)
    return where(usable, safe_div(-a1, 2.0 * a2), 1.0)


def qlab_rate(t_star: Scalar, rate: Scalar, *, max_growth: float, min_lr: float, max_lr: Scalar) -> Scalar:
    """The bounded new rate ``η' = clamp(min(t*, max_growth)·η, min_lr, max_lr)`` (floats or 0-d tensors).

    >>> qlab_rate(0.25, 0.4, max_growth=2.0, min_lr=1e-6, max_lr=10.0)
    0.1
    >>> qlab_rate(50.0, 0.1, max_growth=2.0, min_lr=1e-6, max_lr=10.0)  # at most two trial steps
    0.2
    """
    return smin(smax(smin(t_star, max_growth) * rate, min_lr), max_lr)


def _finite(value: Scalar) -> bool | Tensor:
    """Whether ``value`` (a float or a tensor) is finite."""
    return torch.isfinite(value) if isinstance(value, Tensor) else math.isfinite(value)


# --------------------------------------------------------------------------- the base rules' directions


def _uses_foreach(group: dict[str, Any]) -> bool:
    # Wrapped torch optimizers keep ``foreach=None`` ("torch decides"); only an explicit False
    # asks for the per-tensor path.
    return group.get("foreach") is not False


def _base_direction(
    group: dict[str, Any],
    state: defaultdict[Tensor, dict[str, Any]],
    params: list[Tensor],
    grads: list[Tensor],
    rate: float = 0.0,
) -> list[Tensor]:
    """The built-in base rule's unit-rate direction ``d``, its buffers updated once, and the trial
    step ``x ← x − rate·d`` (none at rate 0).

    ``sgd``: ``g + wd·x``; ``sgdm``: torch SGD's heavy-ball buffer of ``g + wd·x``; ``adam``:
    ``m̂/(√v̂ + eps)`` of ``g + wd·x``; ``adamw``: ``m̂/(√v̂ + eps) + wd·x``.  With ``compiled`` the
    buffers, the direction and the step of ``sgdm``, ``adam`` and ``adamw`` are one loop per tensor.
    """
    base, wd, foreach = group["base"], group["weight_decay"], _uses_foreach(group)
    if base == "sgdm" and group.get("compiled") and rate != 0.0:
        return _heavy_ball_trial(group, state, params, grads, rate)
    if base in ("adam", "adamw"):
        coupled = with_l2(params, grads, wd if base == "adam" else 0.0, foreach=foreach)
        decoupled = wd if base == "adamw" else 0.0  # x(1 − η·wd) − η·m̂/(√v̂ + eps)
        return _adam_direction(group, [state[p] for p in params], params, coupled, decoupled, rate)
    directions = with_l2(params, grads, wd, foreach=foreach)
    if base == "sgdm":
        directions = momentum_([state[p] for p in params], directions, group["momentum"], foreach=foreach)
    if rate != 0.0:
        add_scaled_(params, directions, -rate, foreach=foreach)
    return directions


def _adam_direction(
    group: dict[str, Any],
    states: list[dict[str, Any]],
    params: list[Tensor],
    grads: list[Tensor],
    decoupled: float,
    rate: float,
) -> list[Tensor]:
    """New tensors ``m̂/(√v̂ + eps) + decoupled·x`` after the moment updates, with per-parameter step
    counts (as torch's Adam), and the trial step ``x ← x − rate·d``."""
    beta1, beta2 = group["betas"]
    foreach = _uses_foreach(group)
    for state, p in zip(states, params):
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # v in at least float32: in float16 the squares of small gradients underflow to 0 and
            # the direction m̂/(√v̂ + eps) becomes g/eps.
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=work_dtype(p.dtype), memory_format=torch.preserve_format)
        state["step"] = int(state["step"]) + 1  # a number also where a capturable step kept a device count
    avgs, sq_avgs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
    bias1 = [1.0 - beta1 ** s["step"] for s in states]
    # m̂/(√v̂ + eps) = m / (bc1·(√v/√bc2 + eps)): both corrections go into the denominator, whose
    # memory then receives the quotient (one new tensor per parameter and step).
    roots = [math.sqrt(1.0 - beta2 ** s["step"]) / b1 for s, b1 in zip(states, bias1)]
    shifts = [group["eps"] * b1 for b1 in bias1]
    if group.get("compiled"):  # the same math and the step in one loop per tensor (optim/_adam_compiled.py)
        table = [(1.0 - beta1, 1.0 - beta2, r, e, -rate, decoupled) for r, e in zip(roots, shifts)]
        return run_adam_step("QLAB", params, avgs, sq_avgs, grads, table)
    adam_moments_(avgs, sq_avgs, grads, 1.0 - beta1, 1.0 - beta2, foreach=foreach)
    denominators = adam_denominators(sq_avgs, roots, shifts, foreach=foreach)
    directions = adam_directions(avgs, denominators, foreach=foreach, out=denominators)
    if decoupled != 0:
        add_scaled_(directions, params, decoupled, foreach=foreach)
    if rate != 0.0:
        add_scaled_(params, directions, -rate, foreach=foreach)
    return directions


def _heavy_ball_trial(
    group: dict[str, Any], state: defaultdict[Tensor, dict[str, Any]], params: list[Tensor], grads: list[Tensor], rate: float
) -> list[Tensor]:
    """The ``"sgdm"`` base's buffer update and the trial step ``x ← x − η·b`` in one compiled loop per
    tensor (optim/_sgd_compiled.py); returns the buffers (the directions).  A new buffer starts at
    zeros, so that it becomes ``g + wd·x``, the copy :func:`_base_direction` starts it with."""
    buffers = []
    for p in params:
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buffers.append(state[p]["momentum_buffer"])
    row = (group["momentum"], rate, group["weight_decay"])
    run_with_table("QLAB", heavy_ball_step, (params, grads, buffers), [row] * len(params))
    return buffers


# --------------------------------------------------------------------------- the device-side step

#: One param group with its parameters that have a gradient, and those gradients.
Group = tuple[dict[str, Any], list[Tensor], list[Tensor]]


@dataclass
class _DeviceTrial:
    """One param group's part of a ``capturable`` step (:meth:`QLAB._device_step`).

    The base rule's new buffers (``buffers``, by state key) are formed next to the state and
    stored only where the step is taken; ``directions`` are the unit-rate directions ``d``, along
    which the trial step is ``x ← x − η·d`` (zeros once the gate has refused the step).
    """

    group: dict[str, Any]
    lr: Scalar  # the group's lr: the plain rule's rate (a device tensor), the anchored rule's anchor
    scale: Scalar  # the anchored rule's lr_scale (a device tensor); 1 under the plain rule
    rate: Tensor  # η, 0-d: 0 for a frozen group
    params: list[Tensor]
    grads: list[Tensor]
    directions: list[Tensor]
    buffers: dict[str, list[Tensor]]


def _on_device(value: Scalar, device: torch.device) -> Tensor:
    """``value`` as a 0-d :func:`~._reduce.accumulation_dtype` tensor on ``device``: itself when it is
    one (a ``capturable`` step then writes it in place), a number by a fill kernel (no host copy)."""
    dtype = accumulation_dtype(device)
    if not isinstance(value, Tensor):
        return torch.full((), float(value), dtype=dtype, device=device)
    if (value.dim(), value.dtype, value.device) == (0, dtype, device):
        return value
    return value.detach().to(device=device, dtype=dtype).reshape(())


def _count_on_device(value: Any, device: torch.device) -> Tensor:
    """A per-parameter count as an int64 0-d tensor on ``device``: itself when it is one, else converted
    (a number of the default step, or the float32 tensor ``torch.optim`` loads it as into a
    ``capturable`` param group)."""
    if not isinstance(value, Tensor):
        return torch.full((), int(value), dtype=torch.int64, device=device)
    if (value.dim(), value.dtype, value.device) == (0, torch.int64, device):
        return value
    return value.detach().to(device=device, dtype=torch.int64).reshape(())


def _refuse_compiled(owner: str, group: dict[str, Any]) -> None:
    """``ValueError`` for a param group that asks for both ``compiled`` and ``capturable``."""
    if group.get("compiled") and group.get("capturable"):
        raise ValueError(
            f"{owner}: `compiled` cannot be combined with `capturable=True`: the compiled trial-step kernels "
            "(optim/_sgd_compiled.py, optim/_adam_compiled.py) write the base rule's buffers and the parameters "
            "whatever the step's outcome, so a step the device refuses could not leave them untouched. Use "
            "capturable=True with compiled=False (the device-side step), or compiled=True without capturable."
        )


def _device_adam_direction(
    group: dict[str, Any], states: list[dict[str, Any]], params: list[Tensor], grads: list[Tensor]
) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
    """:func:`_adam_direction` for a ``capturable`` step: the moments updated on copies
    (:func:`~._directions.adam_moments_`), the bias corrections from the per-parameter counts on the
    device (``k = count + 1``), and ``d = m̂/(√v̂ + eps)`` (+ ``wd·x`` for ``"adamw"``); returns the
    directions and the new moments by state key."""
    (beta1, beta2), foreach = group["betas"], _uses_foreach(group)
    device = params[0].device
    k = torch.stack([s["step"].to(device) for s in states]).to(accumulation_dtype(device)) + 1
    bias1 = 1.0 - torch.pow(beta1, k)
    roots = torch.sqrt(1.0 - torch.pow(beta2, k)) / bias1
    shifts = group["eps"] * bias1
    avgs = clone([s["exp_avg"] for s in states], foreach=foreach)
    sq_avgs = clone([s["exp_avg_sq"] for s in states], foreach=foreach)
    adam_moments_(avgs, sq_avgs, grads, 1.0 - beta1, 1.0 - beta2, foreach=foreach)
    # √v/root + shift = (1 − β1^k)·(√v̂ + eps), as adam_denominators forms it from numbers
    denominators = [v.sqrt().div_(r.to(v.device)).add_(s.to(v.device)) for v, r, s in zip(sq_avgs, roots, shifts)]
    directions = adam_directions(avgs, denominators, foreach=foreach, out=denominators)
    if group["base"] == "adamw" and group["weight_decay"] != 0:
        add_scaled_(directions, params, group["weight_decay"], foreach=foreach)
    return directions, {"exp_avg": avgs, "exp_avg_sq": sq_avgs}


def _device_slope(trials: list[_DeviceTrial], grad_sqnorms: list[Tensor], device: torch.device) -> Tensor:
    """``a1 = ⟨g, Δ⟩ = −Σ η·⟨g, d⟩`` as a partial sum (the gate completes it over shards); the
    ``"sgd"`` base without weight decay (``d = g``) takes the group's ‖g‖²."""
    slope = torch.zeros((), dtype=accumulation_dtype(device), device=device)
    for trial, grad_sqnorm in zip(trials, grad_sqnorms):
        plain = trial.group["base"] == "sgd" and trial.group["weight_decay"] == 0
        slope = slope - trial.rate * (grad_sqnorm if plain else dot(trial.grads, trial.directions, device))
    return slope


def _outcome_range(trials: list[_DeviceTrial], device: torch.device) -> Tensor:
    """``[min, max]`` over every value a ``capturable`` step could write: the points from ``x`` to the
    longest step the fit may take (``x − η_max·d``, :func:`_longest_rate`, in the parameters' dtype),
    the directions and the new buffers: the test of :meth:`QLAB._trial_is_finite`, taken at every
    step (the host-side screen that decides when the default step takes it needs a read)."""
    lows, highs = [], []
    for trial in trials:
        reach = -_longest_rate(trial.group, trial.rate, trial.lr)
        others = [values for values in trial.buffers.values() if values is not trial.directions]
        for i, (p, d) in enumerate(zip(trial.params, trial.directions)):
            point = torch.addcmul(p, d, reach).to(p.dtype)
            low, high = tensor_extrema([point, d, *(values[i] for values in others)], device)
            lows.append(low)
            highs.append(high)
    return torch.stack([torch.stack(lows).min(), torch.stack(highs).max()])


def _move_on_device(trials: list[_DeviceTrial], steps: list[Tensor]) -> None:
    """``x ← x + step·d`` per group, ``step`` a 0-d tensor (computed in ``x``'s arithmetic type and
    rounded once, as ``add_scaled_`` with a number)."""
    for trial, step in zip(trials, steps):
        for p, d in zip(trial.params, trial.directions):
            p.addcmul_(d, step)


def _kept(group: dict[str, Any], key: str, ok: Tensor, value: Tensor) -> Tensor:
    """``value`` where the step is taken (``ok``), else the group's record ``key`` as it was (NaN
    where there is none yet: the first step was skipped)."""
    previous = group.get(key)
    return torch.where(ok, value, math.nan if previous is None else previous)


# --------------------------------------------------------------------------- the trial step and the fit


@dataclass
class _Trial:
    """One param group's part of the trial step: ``Δ = −scale·d`` over ``params``.

    Moving from the trial point ``x + Δ`` to the fitted point ``x + (η'/η)·Δ`` is
    ``x ← x − (η' − η)·(scale/η)·d``.  The built-in bases keep their direction ``d``
    (``scale = η``); the wrapper keeps ``d = x − x_trial`` itself (``scale = 1``).
    """

    group: dict[str, Any]
    rate: float  # η: the rate of the trial step
    scale: float
    params: list[Tensor]
    directions: list[Tensor]
    anchor: float = 0.0  # the group's lr when the step began (the anchored rule's reference)

    def move(self, new_rate: float) -> None:
        """From the trial point to ``x + (new_rate/η)·Δ``."""
        alpha = -(new_rate - self.rate) * (self.scale / self.rate)
        if alpha != 0.0:
            add_scaled_(self.params, self.directions, alpha, foreach=_uses_foreach(self.group))


def _scale_cap(group: dict[str, Any]) -> float | None:
    """The group's resolved ``max_lr_scale``: ``None`` for the plain rule (also for a group of a
    state dict saved before the option existed, until its optimizer fills it in)."""
    cap = group.get("max_lr_scale")
    return None if cap is None or cap == AUTO else float(cap)


def _anchored(group: dict[str, Any]) -> bool:
    """Whether the group's ``lr`` is the anchor (``max_lr_scale`` set) rather than the fitted rate."""
    return _scale_cap(group) is not None


def _trial_rate(group: dict[str, Any], lr: Scalar, scale: Scalar = 1.0) -> Scalar:
    """η: the rate of the group's trial step; 0 for a group whose ``lr`` is 0: it is frozen
    (nothing of it moves, as in ``torch.optim``).

    Plain rule: ``lr`` (the last fitted rate, or what a scheduler wrote), floored at
    ``min_trial_lr``.  Anchored (``max_lr_scale`` set): ``lr·scale`` (``scale``: the group's
    ``lr_scale``), floored at ``min(min_trial_lr, lr)``, so the floor never lifts a trial above the
    rate the user gave.  The floor moves the trial point only.  ``lr`` and ``scale`` are the
    group's numbers as floats (:func:`_host_rates`) or 0-d tensors (the ``capturable`` step's)."""
    if _anchored(group):
        rate = smax(lr * scale, smin(group["min_trial_lr"], lr))
    else:
        rate = smax(lr, group["min_trial_lr"])
    return where(lr == 0.0, 0.0, rate)


def _host_rates(group: dict[str, Any]) -> tuple[float, float]:
    """The group's ``lr`` and, under the anchored rule, its ``lr_scale`` (1 otherwise), as floats."""
    lr = float(group["lr"])
    return lr, float(group.get(LR_SCALE, 1.0)) if _anchored(group) else 1.0


def _upper_rate(group: dict[str, Any], anchor: Scalar) -> Scalar:
    """The upper bound of the group's fitted rate: ``max_lr``, and ``max_lr_scale·anchor`` when set."""
    cap = _scale_cap(group)
    return group[MAX_LR_KEY] if cap is None else smin(group[MAX_LR_KEY], cap * anchor)


def _longest_rate(group: dict[str, Any], rate: Scalar, anchor: Scalar | None = None) -> Scalar:
    """The largest rate the fit can give a group tried at ``rate`` (:func:`qlab_rate`'s bounds);
    ``anchor``: the group's ``lr`` (read from the group when not given)."""
    upper = _upper_rate(group, float(group["lr"]) if anchor is None else anchor)
    longest = smax(rate, smin(smax(group["max_growth"] * rate, group[MIN_LR_KEY]), upper))
    return where(rate == 0.0, 0.0, longest)


def _below_floor(group: dict[str, Any], lr: Scalar) -> bool | Tensor:
    """Whether a plain-rule group's ``lr`` (a float or a 0-d tensor) was set between 0 and its
    ``min_trial_lr`` by a scheduler or by hand (it is not the rate the fit wrote, ``effective_lr``).
    Never under the anchored rule, whose floor never lifts the trial above ``lr``."""
    if _anchored(group):
        return False
    effective = group.get("effective_lr")
    set_outside = True if effective is None else lr != effective
    return (0.0 < lr) & (lr < group["min_trial_lr"]) & set_outside


def _may_overflow(
    groups: Sequence[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
    rates: Sequence[float],
    grad_sqnorms: Sequence[float],
) -> bool:
    """The screen of the step's outcome, on the host: whether some parameter is float16 (whose
    range ordinary gradients exceed), or some group's longest possible step comes within 2⁻¹⁰ of
    the largest number of its parameters' dtype.  The step is bounded by ``η_max·‖g‖/(1 − μ)`` (a
    heavy-ball buffer sums about ``1/(1 − μ)`` gradients) or, for Adam's ``m̂/(√v̂ + eps)``, by
    about ``η_max/√(1 − β2)``: a screen, not a proof (the parameters themselves are assumed well
    inside the range)."""
    for (group, params, _), rate, sqnorm_ in zip(groups, rates, grad_sqnorms):
        dtypes = {p.dtype for p in params}
        if torch.float16 in dtypes:
            return True
        momentum = 0.0 if group.get("base") == "sgd" else float(group.get("momentum", 0.0))
        direction = math.sqrt(sqnorm_) / max(1.0 - momentum, 1e-3)
        if "betas" in group:
            direction = max(direction, 1.0 / math.sqrt(max(1.0 - float(group["betas"][1]), 1e-12)))
        if _longest_rate(group, rate) * direction > min(torch.finfo(d).max for d in dtypes) / 1024.0:
            return True
    return False


def _set_lr(group: dict[str, Any], rate: float) -> None:
    """Write the next rate, in place where the group keeps it as a tensor (capturable optimizers)."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(rate)
    else:
        group["lr"] = rate


def _checked_bounds(owner: str, values: dict[str, Any]) -> dict[str, Any]:
    """QLAB's rate bounds from a constructor's ``values``, validated and as floats, by param-group
    key: ``min_lr`` and ``max_lr`` under :data:`BOUND_KEYS`."""
    bounds = checked(owner, values, min_lr=NONNEGATIVE, max_lr=POSITIVE, min_trial_lr=POSITIVE)
    if bounds["min_lr"] > bounds["max_lr"]:
        raise ValueError(
            f"{owner}: `min_lr` must not exceed `max_lr`, got min_lr={values['min_lr']!r} > max_lr={values['max_lr']!r}"
        )
    max_growth = real_number(values["max_growth"])
    if max_growth is None or not max_growth >= 1.0:  # inf allowed: no growth limit
        raise ValueError(f"{owner}: `max_growth` must be a number in [1, inf], got {values['max_growth']!r}")
    own = {BOUND_KEYS.get(name, name): value for name, value in bounds.items()}
    return {**own, "max_growth": max_growth, "max_lr_scale": _checked_scale_cap(owner, values["max_lr_scale"])}


def _take_bounds(group: dict[str, Any]) -> None:
    """A param group given with its own bounds under the option names (``{"params": ..., "min_lr":
    0.01}``): moved, in place, to QLAB's keys (:data:`BOUND_KEYS`; a value given there wins)."""
    for option, key in BOUND_KEYS.items():
        if option in group:
            group.setdefault(key, group.pop(option))


def _with_own_bounds(group: dict[str, Any]) -> dict[str, Any]:
    """A saved param group (or one of an optimizer pickled) from before the bounds had their own
    keys: ``min_lr`` and ``max_lr`` copied to :data:`BOUND_KEYS`, so that it continues with the same
    bounds.  The old keys stay: a scheduler may own them (``OneCycleLR`` reads them at every step)."""
    missing = {key: group[option] for option, key in BOUND_KEYS.items() if key not in group and option in group}
    return {**group, **missing} if missing else group


def _checked_scale_cap(owner: str, value: Any) -> float | str | None:
    """``max_lr_scale``: ``"auto"``, ``None`` or a number in [1, inf] (as a float)."""
    if value is None or (isinstance(value, str) and value == AUTO):
        return value
    number_ = real_number(value)
    if number_ is None or not number_ >= 1.0:
        raise ValueError(
            f"{owner}: `max_lr_scale` must be 'auto', None (the plain rule) or a number in [1, inf], got {value!r}"
        )
    return number_


def _resolved_scale_cap(value: float | str | None, adaptive: bool) -> float | None:
    """``"auto"`` → :data:`DEFAULT_ADAPTIVE_MAX_LR_SCALE` on an adaptive base, else ``None``."""
    if isinstance(value, str):
        return DEFAULT_ADAPTIVE_MAX_LR_SCALE if adaptive else None
    return value


def _fitted_points_are_finite(trials: list[_Trial], starts: list[list[Tensor]]) -> bool:
    """Whether every point from ``x`` (``starts``) to the longest step the fit may take along the
    wrapped optimizer's displacement (``directions = x − x_trial``) is finite."""
    extrema: list[Tensor] = []
    for trial, start in zip(trials, starts):
        reach = _longest_rate(trial.group, trial.rate) / trial.rate
        for x, d in zip(start, trial.directions):
            extrema.extend(tensor_extrema([torch.add(x, d, alpha=-reach), d], x.device))
    if not extrema:
        return True
    device = extrema[0].device
    return bool(torch.isfinite(torch.stack([e.to(device) for e in extrema])).all())


class _QLABFit(AdaptiveOptimizer):
    """What :class:`QLAB` and :class:`QLABWrapper` share: the probe intake and the fit.

    A subclass's ``_update`` takes the trial step (one :class:`_Trial` per param group), then hands
    the trials and the slope ``a1 = ⟨g, Δ⟩`` to :meth:`_fit_and_move`.
    """

    requires_loss: ClassVar[bool] = True
    #: The step needs a loss-only re-evaluation at the trial point (the callback checks this).
    requires_probe: ClassVar[bool] = True

    def _init_transient(self) -> None:
        super()._init_transient()
        self._active_probe: tuple[Probe, bool] | None = None
        self._warned_floor = False
        #: Whether the step being taken was given a loss (see :meth:`_is_state_initialization`).
        self._loss_given = True
        #: ``capturable``: ``(index, lr)`` of the first group found with an ``lr`` below its trial
        #: floor, on the device, for :meth:`QLAB.sync_warnings` to report (NaN: none yet).
        self._floor_record: Tensor | None = None

    def _resolve_loss(self, loss: Tensor | float | None, closure_loss: Any) -> tuple[Tensor | float | None, bool]:
        value, reduced = super()._resolve_loss(loss, closure_loss)
        self._loss_given = value is not None
        return value, reduced

    def _is_state_initialization(self) -> bool:
        """:meth:`~._base.AdaptiveOptimizer._is_state_initialization`; for a ``capturable`` step that
        was given a loss, ``False`` without looking (``torch.distributed.checkpoint`` gives none, and
        the test reads the device's ``lr`` and gradients)."""
        if self._capturable and self._loss_given:
            return False
        return super()._is_state_initialization()

    def _adaptive_base(self, group: dict[str, Any]) -> bool:  # pragma: no cover - abstract
        """Whether the group's base rule is preconditioned per coordinate (``max_lr_scale="auto"``)."""
        raise NotImplementedError

    def _resolve_scale_cap(self, group: dict[str, Any]) -> None:
        """Validate a group's own ``max_lr_scale`` and resolve ``"auto"`` for its base."""
        if "max_lr_scale" in group:
            value = _checked_scale_cap(self._name, group["max_lr_scale"])
            group["max_lr_scale"] = _resolved_scale_cap(value, self._adaptive_base(group))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._resolve_scale_cap(param_group)
        super().add_param_group(param_group)
        self._start_multiplier(self.param_groups[-1])

    @staticmethod
    def _start_multiplier(group: dict[str, Any]) -> None:
        """An anchored group holds ``lr_scale`` from the start (the state layout a step writes)."""
        if _anchored(group):
            group.setdefault(LR_SCALE, 1.0)

    def _convert_legacy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A state dict saved before ``max_lr_scale`` existed continues under the plain rule it was
        saved with (its ``lr`` is a fitted rate, not an anchor): its groups get ``None``.  One saved
        before the bounds had their own keys holds them as ``min_lr`` and ``max_lr``: they are
        copied to :data:`BOUND_KEYS` (the run continues with the bounds it had; the old keys stay
        for a scheduler that owns them).  Both before the check (:meth:`_check_compatible`)."""
        groups = state_dict.get("param_groups")
        if isinstance(groups, (list, tuple)) and all(isinstance(g, dict) for g in groups):
            groups = [_with_own_bounds(g if "max_lr_scale" in g else {**g, "max_lr_scale": None}) for g in groups]
            state_dict = {**state_dict, "param_groups": groups}
        return super()._convert_legacy(state_dict)

    def _option_names(self) -> set[str]:
        """:meth:`~._base.AdaptiveOptimizer._option_names` with ``min_lr`` and ``max_lr``, which the
        groups keep under :data:`BOUND_KEYS`: the options by which a state dict without the class
        name (saved before the keys existed, so holding the bounds under these names) is told to
        be QLAB's, by this optimizer (:meth:`_check_compatible`) and by the others."""
        taken = _constructor_options(type(self))  # as the base class finds the others
        return super()._option_names() | {o for o, key in BOUND_KEYS.items() if o in taken and key in self.defaults}

    def _check_compatible(self, state_dict: dict[str, Any]) -> None:
        """:meth:`~._base.AdaptiveOptimizer._check_compatible`, the bounds a group holds under
        :data:`BOUND_KEYS` counting as the options ``min_lr`` and ``max_lr`` (:meth:`_option_names`)."""
        groups = state_dict.get("param_groups")
        if isinstance(groups, (list, tuple)) and all(isinstance(g, dict) for g in groups):
            named = [{**{option: g[key] for option, key in BOUND_KEYS.items() if key in g}, **g} for g in groups]
            state_dict = {**state_dict, "param_groups": named}  # a group's own min_lr/max_lr (a scheduler's) kept
        super()._check_compatible(state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # pickled before the bounds had their own keys: the groups and the defaults get them
        _take_bounds(self.defaults)
        for group in self.param_groups:
            group.update(_with_own_bounds(group))

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: LossClosure | None = None,
        *,
        loss: Tensor | float | None = None,
        probe: Probe | None = None,
    ) -> Any:
        """Perform one optimization step.

        Args:
            closure: optional; re-evaluates the model, calls ``backward()`` and returns the loss.
                Called exactly once.
            loss: the loss of the mini-batch whose gradient is in ``.grad`` (takes precedence
                over :meth:`set_loss` and over the closure's return value).
            probe: returns that mini-batch's loss at the current parameters without backward; it
                is called once, at the trial point.  Takes precedence over :meth:`set_probe`.

        Returns:
            The closure's return value if a closure was given, else ``loss``.
        """
        # The registered probe is looked up only after the closure has run: in Lightning the
        # closure runs the hooks in which the callback registers the probe of this very step.
        self._active_probe = None if probe is None else (probe, False)
        try:
            return super().step(closure, loss=loss)
        finally:
            self._active_probe = None

    def _require_probe(self) -> tuple[Probe, bool]:
        """This step's probe: ``probe=`` if given, else the registered one; a clear error if neither."""
        active = self._active_probe or self._registered_probe
        if active is None:
            raise RuntimeError(f"{self._name}.step() needs the mini-batch loss and a probe: {_PROBE_FIXES}.")
        return active

    def _probe_at_trial_point(self, device: torch.device) -> Tensor:
        """f̃: the probe's loss at the trial point, as a 0-d tensor averaged across ranks."""
        probe, reduced = self._require_probe()
        with torch.no_grad():
            value = probe()
        if value is None:
            raise RuntimeError(f"{self._name}: the probe returned None; it must return the loss")
        return self._loss_tensor(value, reduced, device)

    def _warn_below_floor(self) -> None:
        """Warn once when a group's ``lr`` was set (by a scheduler or by hand) between 0 and its
        ``min_trial_lr``: the trial step then runs at ``min_trial_lr`` and the fit chooses the step,
        so that ``lr`` has no effect (``lr = 0`` freezes the group).  A rate the fit itself wrote
        (``effective_lr``) may lie below the floor without a warning."""
        if self._warned_floor:
            return
        for i, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            if _below_floor(group, lr):
                self._warn_floor(i, lr, stacklevel=6)
                return

    def _warn_floor(self, index: int, lr: float, stacklevel: int) -> None:
        """The warning of :meth:`_warn_below_floor`, about param group ``index`` and its ``lr``."""
        self._warned_floor = True
        warnings.warn(
            f"{self._name}: param group {index} has lr={lr:g}, below "
            f"min_trial_lr={self.param_groups[index]['min_trial_lr']:g}: the trial step runs at min_trial_lr and "
            "the quadratic fit chooses the step, so an lr (or a schedule) below the floor has no effect on it (lr=0 "
            "freezes a group). Lower `min_trial_lr` for the trial rate to follow it. This warning is shown once.",
            UserWarning,
            stacklevel=stacklevel,
        )

    def _fit_and_move(
        self,
        trials: list[_Trial],
        frozen: list[dict[str, Any]],
        loss: float,
        slope: Tensor,
        device: torch.device,
        undo: Callable[[], None] | None = None,
    ) -> bool:
        """Probe the trial point, fit the quadratic, move every group to its fitted point, record.

        ``frozen`` groups (``lr = 0``) did not move: they are recorded at rate 0.  Without a moving
        group nothing is probed.  A slope that is not finite means the trial step overflowed: the
        parameters are put back (``undo``; by default the move back along Δ) and the step counts
        as skipped; returns ``False`` then.
        """
        f_trial, a1, a2 = loss, 0.0, 0.0
        put_back = undo or (lambda: [trial.move(0.0) for trial in trials])
        if trials:
            try:
                trial_loss = self._probe_at_trial_point(device)
            except BaseException:
                put_back()  # back to where the step started (the buffers keep their update)
                raise
            # The step's second device-to-host read (the first is the gate): t* decides every
            # group's rate, which must be a number in param_groups.  The probe's forward pass has
            # just run on the device, so this read waits for little more than that pass.
            # (Under sharding the slope is a partial sum: completed here, in the same read.)
            f_trial, a1 = self._completed(torch.stack([trial_loss, slope.to(trial_loss)]), ("same", "sum")).tolist()
            if not math.isfinite(a1):
                put_back()
                self._skip_step("outcome", ["the trial step"])
                return False
            a2 = f_trial - loss - a1
        t_star = qlab_step_factor(a1, a2)
        for group in frozen:
            self._record(
                group, effective_lr=0.0, fitted_lr=0.0, trial_loss=f_trial, directional_derivative=a1, curvature=a2
            )
        for trial in trials:
            group = trial.group
            new_rate = qlab_rate(
                t_star,
                trial.rate,
                max_growth=group["max_growth"],
                min_lr=group[MIN_LR_KEY],
                max_lr=_upper_rate(group, trial.anchor),
            )
            trial.move(new_rate)
            if _anchored(group):  # lr stays the user's (or the scheduler's): the multiplier is kept
                group[LR_SCALE] = new_rate / trial.anchor
            else:
                _set_lr(group, new_rate)
            self._record(
                group,
                effective_lr=new_rate,
                fitted_lr=t_star * trial.rate,
                trial_loss=f_trial,
                directional_derivative=a1,
                curvature=a2,
            )
        return True

    def _record_unfitted(
        self, groups: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], device: torch.device | None = None
    ) -> None:
        """The state-initialization step's records: every key a fitted step writes, at rest (t* = 1);
        written into 0-d tensors on ``device`` when it is given (``capturable``)."""
        for group, _, _ in groups:
            lr, scale = _host_rates(group)
            rate = lr * scale
            records = {"effective_lr": rate, "fitted_lr": rate, "trial_loss": 0.0}
            records.update(directional_derivative=0.0, curvature=0.0)
            if device is None:
                self._record(group, **records)
            else:
                self._record_on_device(group, **{key: _on_device(value, device) for key, value in records.items()})

    def _with_grads(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        """The param groups that have parameters with a gradient, with those and their gradients."""
        groups = [(group, *self._params_and_grads(group)) for group in self.param_groups]
        return [(group, params, grads) for group, params, grads in groups if params]


class QLAB(_QLABFit):
    r"""QLAB: a base rule whose learning rate is set each step by a quadratic fit of the loss.

    Fu and Wu, "QLAB: Quadratic Loss Approximation-Based Optimal Learning Rate for Deep
    Learning", 2023 (AAAI 2024 as QLABGrad).  docs/algorithms.md §2.

    Each step costs one extra forward pass without backward on the same mini-batch (the *probe*),
    evaluated at the trial point ``x + Δ``, where ``Δ`` is the base rule's step with its current
    rate ``η = param_groups[i]["lr"]``.  With ``a1 = ⟨g, Δ⟩`` and ``a2 = f̃ − f − a1`` the step is
    ``x ← x + (η'/η)·Δ``, ``η' = clamp(min(t*, max_growth)·η, min_lr, max_lr)``,
    ``t* = −a1/(2·a2)`` (:func:`qlab_step_factor`, :func:`qlab_rate`), and ``η'`` is the next
    step's rate (written to ``param_groups[i]["lr"]``).  One ``t*`` serves every param group (the
    fit is along the whole model's displacement), so groups keep the ratio of their rates, up to
    the bounds.  An lr scheduler therefore sets the next *trial* rate; the fit then chooses the step.

    **On adaptive bases: the anchored rule** [package] (``max_lr_scale``, docs/algorithms.md
    §2.5).  The fit is greedy on one mini-batch: along Adam's direction the batch's own quadratic
    keeps its minimum far beyond the rate at which training goes best, so the plain rule, which
    lets η double each step up to ``max_lr``, carries Adam 10–100× above its good rates (and on a
    CNN into divergence).  A fit that *shortens* the step, on the other hand, says the step
    overshoots on the very batch it was measured on.  With ``max_lr_scale=c`` the group's ``lr``
    is the anchor a, which QLAB never writes (a scheduler or the user moves it, chainable or not);
    the group keeps a multiplier s (``lr_scale``, 1 at the start) and each step::

        η  = max(a·s, min(min_trial_lr, a))          (the floor never lifts a trial above a)
        η' = clamp(min(t*, max_growth)·η, min_lr, min(max_lr, c·a)),   s ← η'/a

    ``"auto"`` (the default) is ``c = 1`` on ``"adam"``, ``"adamw"`` and on wrapped
    :data:`ADAPTIVE_TORCH_OPTIMIZERS` (Adam, AdamW, RAdam, NAdam, Adamax, Adagrad, Adadelta,
    RMSprop, ...): ``lr`` is a ceiling, and QLAB only shortens a step that overshoots.  On
    ``"sgd"``, ``"sgdm"`` and any other wrapped optimizer it is ``None``: the plain rule above, in
    which ``lr`` holds the fitted rate (the paper's rule; pass ``max_lr_scale=None`` to get it on
    Adam).  ``c = inf`` keeps ``lr`` as the anchor without bounding the rate by it.  Measured on
    the digits MLP and CNN and on two character-level language models (docs/benchmarks.md).

    **Schedules and lr = 0** [package].  Plain rule: a scheduled ``lr`` at or above
    ``min_trial_lr`` is the next trial rate.  One below the floor (but above 0) has no effect on
    the step: the trial runs at ``min_trial_lr`` and the fit chooses the step, as for any rate; this
    is warned about once (a rate the fit itself wrote below the floor is not).  Anchored rule: the
    scheduled ``lr`` is the anchor, and the bound follows it (no warning: the floor never lifts a
    trial above it).  ``lr = 0`` freezes the group, as in
    ``torch.optim``: it does not move, its ``lr`` stays 0, its buffers are updated; a step in
    which no group moves calls no probe.

    **The step's outcome** [package].  A screen on the host (the longest step the fit may take,
    ``η_max·‖g‖/(1 − momentum)``, near the range of the parameters' dtype; any float16 parameter)
    decides whether the base rule's step is first taken on copies, up to that longest step; if
    anything it would write is not finite, the step is skipped with parameters and state
    untouched.  A trial step whose slope ``a1`` is still not finite is moved back and skipped.
    Adam's ``exp_avg_sq`` is kept in at least float32 (in float16 the squares of small gradients
    underflow to 0, and the direction becomes ``g/eps``).

    [reconstructed] The displacement formulation (the fit is along the base rule's own step, which
    makes QLAB work on top of any optimizer) and the safeguards:

    * ``a1 ≥ 0`` (not a descent direction), ``a2 ≤ 0`` (no positive curvature along Δ), or a
      non-finite probe loss: the rate is kept (``t* = 1``; the parameters stay at the trial
      point), as the authors' code does.  Only the step's own loss and gradient can skip a step.
    * ``η'`` is clamped to ``[min_lr, max_lr]``.
    * ``t*`` is capped at ``max_growth`` (this option is this package's addition): the quadratic
      is fitted on ``[0, 1]`` and is not to be trusted far beyond it.  When the loss is nearly
      linear up to the trial point (``a2 ≈ 0⁺``), ``t*`` is huge; without the cap such a step can
      be many trial steps long and diverge.
    * The trial step uses ``max(η, min_trial_lr)``: when η is tiny, ``a2`` is the difference of
      nearly equal losses and drowns in float rounding, which would make the rate collapse for
      good.  The authors' code starts the trial rate at 0.1 and caps it at 0.5.
    * The authors' released code fits along ``g/‖g‖∞`` but steps along ``g``, which collapses the
      rate when ``‖g‖∞ < 0.5``; here the fit and the step use the same Δ.
    * ``a1`` uses the gradient in ``.grad`` and the fit uses the losses handed in: weight decay
      shapes the direction Δ but is not part of the fitted function.  To fit a regularized
      objective, put the regularizer in the loss (and its gradient in ``.grad``) instead.

    The base rules (:mod:`._directions`), each exactly its ``torch.optim`` counterpart at the
    rate used:

    * ``"sgd"``: ``torch.optim.SGD(lr, weight_decay=wd)``; ``Δ = −η·(g + wd·x)``.
    * ``"sgdm"``: ``torch.optim.SGD(lr, momentum=momentum, dampening=0, nesterov=False,
      weight_decay=wd)``: the heavy-ball buffer ``b ← momentum·b + (g + wd·x)`` (``b = g + wd·x``
      at the first step), ``Δ = −η·b``.  Without dampening the buffer is about ``1/(1−momentum)``
      times the gradient; the fit absorbs that scale into η.
    * ``"adam"``: ``torch.optim.Adam(lr, betas, eps, weight_decay=wd)`` (L2 added to the gradient);
      ``Δ = −η·m̂/(√v̂ + eps)`` with per-parameter bias corrections.
    * ``"adamw"``: ``torch.optim.AdamW(lr, betas, eps, weight_decay=wd)``;
      ``Δ = −η·(m̂/(√v̂ + eps) + wd·x)``.

    Every Δ is linear in η, so ``x + (η'/η)·Δ`` is the base rule's step at rate ``η'``.  To put
    QLAB on another optimizer, use :meth:`QLAB.wrap`.

    The step needs the mini-batch loss and a probe: ``step(loss=loss, probe=probe)``, a probe
    registered with :meth:`set_probe`, or, in Lightning,
    :class:`~lightning_adaptive_lr.AdaptiveLRCallback` (which also restores BatchNorm statistics
    and replays dropout for the probe).  The probe is called exactly once per step, under
    ``torch.no_grad()``, at the trial point.

    The defaults of the bounds were chosen by measurement (an MLP on scikit-learn's digits, every
    base, with and without each bound; the numbers are in docs/benchmarks.md):

    * ``max_growth=2``: the cap that mattered.  It never hurt where the fit is stable (sgd) and
      it kept sgdm, adam and adamw from the overlong steps that ``a2 ≈ 0⁺`` proposes (an adamw run
      without it diverged).
    * ``max_lr=10``: above every rate the fit chose there; single fits above it came only from
      ``a2 ≈ 0⁺``, which ``max_growth`` already caps.  A last guard that decides nothing on a
      well-scaled problem; a cap near the authors' 0.5 made sgd clearly worse.
    * ``min_trial_lr=1e-3``: started at a tiny rate, sgd's fit drowned in the float32 rounding of
      the losses without a floor (or with a lower one) and the rate stayed stuck; from 1e-3 up the
      run followed the same path as one started at 0.1.  The floor moves only the trial point,
      never the step.
    * ``min_lr=1e-6``: below every rate the fit chose; it keeps the rate positive after a step
      with ``t* ≈ 0``.

    Args:
        params: parameters or param groups.  Groups may differ in every option but ``base``.
        base: the base rule, one of ``"sgd"``, ``"sgdm"``, ``"adam"``, ``"adamw"``.
        lr: the first trial rate η (the authors start at 0.1); afterwards the fitted rate.  0
            freezes the group (see above).
        momentum: the heavy-ball coefficient of ``"sgdm"``, in [0, 1).
        betas: Adam's ``(β1, β2)``, each in [0, 1) (``"adam"``, ``"adamw"``).
        eps: Adam's denominator term, outside the square root.
        weight_decay: coupled L2 for ``"sgd"``, ``"sgdm"``, ``"adam"``; decoupled for ``"adamw"``.
        min_lr: lower bound of the fitted rate η' (kept in the param groups as ``qlab_min_lr``).
        max_lr: upper bound of the fitted rate η' (kept in the param groups as ``qlab_max_lr``).
        min_trial_lr: lower bound of the trial step's rate (the step taken is still η').
        max_growth: upper bound of ``t*``: the step is at most this many trial steps long.
        max_lr_scale: ``"auto"`` (default), ``None`` (the plain rule) or a number c in [1, inf]:
            the anchored rule, in which ``lr`` stays the rate you (or your scheduler) set and
            the fitted rate stays at most ``c·lr`` (see above).  ``"auto"``: 1 for ``"adam"`` and
            ``"adamw"``, ``None`` for ``"sgd"`` and ``"sgdm"``.  A param group may set its own.
        foreach: use the multi-tensor (``torch._foreach_*``) path; ``False`` updates tensor by tensor.
        average_across_ranks: average the loss and the probe's loss across ``torch.distributed``
            ranks (one collective each per step) so replicas stay identical.
        compiled: the base rule's update as one ``torch.compile``\ d (TorchInductor) loop per
            tensor: for ``"adam"``/``"adamw"`` the moments, the direction and the trial step
            (:mod:`._adam_compiled`: 8 parameter-sized accesses instead of about 20), for
            ``"sgdm"`` the buffer and the trial step (:mod:`._sgd_compiled`: 5 instead of 8, 11 with
            weight decay); the fit, the probe and the move are unchanged.  No effect on ``"sgd"``,
            whose trial step is one pass already.  Compiles once per set of parameter shapes at the
            first step; a missing compiler raises before any state changes.
        capturable: keep every decision of the step on the device (docs/algorithms.md, "The
            device-side step"): the gate, the fit (``a1``, ``a2``, ``t*``), the bounds, the rate the
            step writes (``lr`` under the plain rule, ``lr_scale`` under the anchored one) and the
            records are 0-d device tensors, every branch a ``torch.where``, the state is updated
            in place (the base rule's buffers exist from the first step on, Adam's counts as int64
            tensors), and a step whose loss, gradient or outcome is not finite leaves parameters
            and state untouched.  The outcome is checked at every step on the device (the range
            of every point up to the longest step the fit may take, of the direction and of the
            buffers), not screened on the host.  The probe is called at every step, also at one
            that is skipped (at the unchanged parameters; its value unused), and its tensor is
            never read.  Skips and the trial-floor warning are reported by :meth:`sync_warnings`
            (which :class:`~lightning_adaptive_lr.AdaptiveLRMonitor` calls when it logs).  Other
            hyperparameters are read as Python numbers at each call: a graph keeps the values it
            was captured with, and torch's schedulers write a tensor ``lr`` in place.  Not with
            ``compiled=True``, nor through :meth:`QLAB.wrap` (``ValueError``).
        max_consecutive_skips: raise after this many skipped steps in a row (see
            :class:`~lightning_adaptive_lr.optim._base.AdaptiveOptimizer`).

    After each step every param group holds ``effective_lr`` (η', the rate used and, up to the
    trial floor, the next trial rate), ``fitted_lr`` (``t*·η`` before ``max_growth`` and the
    bounds), ``trial_loss`` (f̃), ``directional_derivative`` (a1) and ``curvature`` (a2); a1 and a2
    are over the whole model.  Under the anchored rule also ``lr_scale`` (η'/``lr``; kept in the
    state dict: a resume continues with it).  A state dict saved before ``max_lr_scale`` existed
    continues under the plain rule it was saved with, whatever the loading optimizer's option (its
    ``lr`` is a fitted rate); set ``param_groups[i]["max_lr_scale"]`` after loading to anchor to it.
    Every param group also holds ``step`` and ``skipped_steps`` (equal in all groups); ``state[p]``
    holds the base rule's buffers under ``torch.optim``'s names (``momentum_buffer``; ``step``,
    ``exp_avg``, ``exp_avg_sq``).

    The bounds ``min_lr`` and ``max_lr`` are kept in every param group as ``qlab_min_lr`` and
    ``qlab_max_lr`` (change them there; a param group given with its own ``min_lr``/``max_lr``
    keeps them under those keys), not under their option names: ``OneCycleLR`` writes its
    schedule's ``min_lr`` and ``max_lr`` into every param group and reads them back at each step,
    and QLAB reads only its own keys, so neither moves the other's numbers.  A state dict saved
    before these keys existed holds the bounds as ``min_lr`` and ``max_lr``: they are taken as
    ``qlab_min_lr`` and ``qlab_max_lr`` and the run continues with the bounds it had (the old
    keys stay, for a scheduler that owns them).

    Example:
        >>> import torch
        >>> from lightning_adaptive_lr import QLAB
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> def probe():  # the same mini-batch's loss at the current parameters, no backward
        ...     return torch.nn.functional.mse_loss(model(x), y)
        >>> opt = QLAB(model.parameters(), base="sgd", lr=0.1)
        >>> loss = torch.nn.functional.mse_loss(model(x), y)
        >>> loss.backward()
        >>> _ = opt.step(loss=loss, probe=probe)
        >>> opt.param_groups[0]["step"], opt.param_groups[0]["lr"] == opt.param_groups[0]["effective_lr"]
        (1, True)

        On Adam (the anchored rule): ``lr`` stays yours and bounds the rate used.

        >>> opt = QLAB(model.parameters(), base="adam", lr=1e-3)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     loss = probe()
        ...     loss.backward()
        ...     _ = opt.step(loss=loss, probe=probe)
        >>> group = opt.param_groups[0]
        >>> group["max_lr_scale"], group["lr"], group["effective_lr"] <= 1e-3
        (1.0, 0.001, True)
        >>> group["lr_scale"] == group["effective_lr"] / group["lr"]
        True
    """

    shared_options = ("base", "capturable")
    #: The ``capturable`` gate's values computed from the step's outcome: the slope a1 and the range
    #: of every value the step could write (completed over shards as a ``[min, max]`` pair).
    outcome_scalars: ClassVar[frozenset[str]] = frozenset({"directional_derivative", "trial_step"})
    gate_ranges: ClassVar[frozenset[str]] = AdaptiveOptimizer.gate_ranges | {"trial_step"}

    def _adaptive_base(self, group: dict[str, Any]) -> bool:
        return group.get("base", self.defaults["base"]) in ADAPTIVE_BASES

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_lr: float = DEFAULT_MIN_LR,
        max_lr: float = DEFAULT_MAX_LR,
        min_trial_lr: float = DEFAULT_MIN_TRIAL_LR,
        max_growth: float = DEFAULT_MAX_GROWTH,
        max_lr_scale: float | Literal["auto"] | None = AUTO,
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
        compiled: bool = False,
        capturable: bool = False,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        name = type(self).__name__
        defaults = checked(
            name, locals(), base=one_of(*BASES), lr=NONNEGATIVE, momentum=FRACTION, betas=BETAS, eps=NONNEGATIVE,
            weight_decay=NONNEGATIVE, compiled=FLAG, capturable=FLAG,
        )  # fmt: skip
        defaults.update(_checked_bounds(name, locals()))
        defaults["max_lr_scale"] = _resolved_scale_cap(defaults["max_lr_scale"], base in ADAPTIVE_BASES)
        if base in ("sgd", "sgdm"):
            # torch's momentum-cycling schedulers (OneCycleLR, CyclicLR) and Lightning's
            # LearningRateMonitor read `betas` when the defaults have it, else `momentum`: only the
            # Adam bases keep `betas`, so that they act on the momentum the base uses.
            del defaults["betas"]
        super().__init__(params, defaults, **runtime_options(locals()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its own ``min_lr``/``max_lr``, if given, are kept as its
        :data:`BOUND_KEYS` (``qlab_min_lr``/``qlab_max_lr``)."""
        _refuse_compiled(self._name, {**self.defaults, **param_group})
        _take_bounds(param_group)
        super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The state dict; a ``capturable`` plain-rule group's ``lr`` (a device tensor after the first
        step) is saved as the number it holds (one read), as a fresh optimizer holds it:
        ``torch.distributed.checkpoint`` loads into the layout of a fresh optimizer, whose ``lr`` it
        sets aside while it lays out the state.  The next step makes it a device tensor again."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:  # torch's copies of the groups
            if group.get("capturable") and not _anchored(group) and isinstance(group["lr"], Tensor):
                group["lr"] = group["lr"].item()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to its parameter's dtype; Adam's v is kept in at least
        # float32 (a 16-bit v loses the squares of small gradients): put it back with its own dtype.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            if "exp_avg_sq" in saved:
                self.state[p]["exp_avg_sq"] = saved["exp_avg_sq"].detach().clone().to(device=p.device)

    @classmethod
    def wrap(cls, optimizer: Optimizer, *, capturable: bool = False, **options: Any) -> QLABWrapper:
        """Put QLAB on top of an existing optimizer instance (``torch.optim.RAdam``, your own, ...).

        The result, ``QLAB.wrap(RAdam)``, shares ``optimizer.param_groups`` (the same list and
        dicts) and ``optimizer.state``, so an lr scheduler attached to either acts on both, and
        ``param_groups[i]["lr"]`` is the rate the next trial step uses.  Each step snapshots the
        parameters that have a gradient, calls ``optimizer.step()`` once (its buffers are updated
        exactly once), takes ``Δ = x_trial − x`` as the direction, probes the loss at ``x_trial``
        and moves to ``x + (η'/η)·Δ``.  The snapshot costs one copy of those parameters.

        The wrapped optimizer must step without a closure and without a loss, and leave
        parameters without a gradient alone (as ``torch.optim`` optimizers do).  Its groups'
        ``foreach`` flag also chooses the wrapper's own kernels (anything but ``False``: foreach).
        Step through the wrapper only: stepping the wrapped optimizer directly bypasses QLAB.

        Args:
            optimizer: the base optimizer.  ``QLAB.wrap(torch.optim.SGD(...))`` and
                ``QLAB.wrap(torch.optim.Adam(...))`` follow the same trajectories as
                ``QLAB(base="sgd"/"sgdm"/"adam")`` with the same settings.
            options: keyword-only ``min_lr``, ``max_lr``, ``min_trial_lr``, ``max_growth``,
                ``max_lr_scale``, ``average_across_ranks``, ``max_consecutive_skips``, as for
                :class:`QLAB` (with its defaults); see :class:`QLABWrapper`.  ``max_lr_scale="auto"``
                anchors the rate to the wrapped optimizer's ``lr`` when it is one of
                :data:`ADAPTIVE_TORCH_OPTIMIZERS` (``QLAB.wrap(torch.optim.Adam(...))``: at most
                1× its ``lr``), else it is the plain rule; pass a number to anchor any other.
            capturable: refused (``ValueError``): the wrapped optimizer's ``step()`` runs whatever the
                step's outcome, so a step skipped on the device could not be undone.  Use
                ``QLAB(params, base=..., capturable=True)`` with a built-in base.

        Example:
            >>> import torch
            >>> from lightning_adaptive_lr import QLAB
            >>> model = torch.nn.Linear(3, 1)
            >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
            >>> base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            >>> opt = QLAB.wrap(base)
            >>> opt.param_groups is base.param_groups
            True
            >>> loss = torch.nn.functional.mse_loss(model(x), y)
            >>> loss.backward()
            >>> _ = opt.step(loss=loss, probe=lambda: torch.nn.functional.mse_loss(model(x), y))
            >>> repr(opt).startswith("QLAB.wrap(SGD)"), "momentum_buffer" in base.state[model.weight]
            (True, True)
        """
        check_flag("QLAB.wrap", "capturable", capturable)
        if capturable:
            raise ValueError(
                "QLAB.wrap: `capturable=True` is not supported: the wrapped optimizer's step() runs (and writes its "
                "buffers and the parameters) whatever the step's outcome, so a step refused on the device could not "
                "be undone. Use QLAB(params, base='sgd' | 'sgdm' | 'adam' | 'adamw', capturable=True) for a "
                "device-side step, or QLAB.wrap(optimizer) without `capturable`."
            )
        return QLABWrapper(optimizer, **options)

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        groups = self._with_grads()
        if not groups:
            return
        if self._is_state_initialization():
            # torch.distributed.checkpoint lays out the state (lr = 0, zero gradients, no loss, no
            # probe): the base rule's buffers are created; nothing moves, there is nothing to fit.
            # A capturable optimizer's layout is the one its steps write: device tensors.
            if self._capturable:
                self._device_layout(groups, loss.device)
            else:
                for group, params, grads in groups:
                    _base_direction(group, self.state, params, grads)
            self._record_unfitted(groups, loss.device if self._capturable else None)
            return
        self._require_probe()  # before anything changes
        if self._capturable:
            self._device_step(loss, groups)
            return
        self._host_group_state()  # the counts of a capturable optimizer's state dict: numbers again
        self._warn_below_floor()
        device = loss.device
        if any(group.get("compiled") and group["base"] != "sgd" for group, _, _ in groups):
            ensure_inductor_works("QLAB", device)  # a missing compiler: a clear error before any state changes
        values = self._gate(loss=loss, grad_sqnorms=torch.stack([sqnorm(grads, device) for _, _, grads in groups]))
        if values is None:
            return
        rates = [_trial_rate(group, *_host_rates(group)) for group, _, _ in groups]
        # The outcome, before anything is written: screened on the host, and where the screen asks
        # for it the base rule's step is taken on copies, up to the longest step the fit may choose.
        if _may_overflow(groups, rates, values["grad_sqnorms"]) and not self._agree(self._trial_is_finite(groups, rates)):
            self._skip_step("outcome", ["the trial step"])
            return

        trials, frozen = [], []
        slope = torch.zeros((), dtype=accumulation_dtype(device), device=device)
        for (group, params, grads), grad_sqnorm, rate in zip(groups, values["grad_sqnorms"], rates):
            directions = _base_direction(group, self.state, params, grads, rate)  # and the trial step Δ = −η·d
            if rate == 0.0:  # lr = 0: the buffers are updated (as torch.optim's), nothing moves
                frozen.append(group)
                continue
            # d = g: ⟨g, d⟩ is the gate's ‖g‖² (not when sharded: there the slope stays a partial sum)
            if group["base"] == "sgd" and group["weight_decay"] == 0 and self._layout is None:
                slope = slope - rate * grad_sqnorm
            else:
                slope = slope - rate * dot(grads, directions, device)
            trials.append(_Trial(group, rate, rate, params, directions, float(group["lr"])))
        if self._fit_and_move(trials, frozen, values["loss"], slope, device):
            self._set_shared(step=self._shared("step") + 1)

    def _trial_is_finite(
        self, groups: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], rates: list[float]
    ) -> bool:
        """Whether the base rule's buffers and every point up to the longest step the fit may take
        (:func:`_longest_rate`) are finite: the base rule's step taken on copies, tensor by tensor."""
        extrema: list[Tensor] = []
        for (group, params, grads), rate in zip(groups, rates):
            alone = {**group, "foreach": False}
            longest = _longest_rate(group, rate)
            for p, g in zip(params, grads):
                x = p.detach().clone()
                state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
                state[x] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.state.get(p, {}).items()}
                (d,) = _base_direction(alone, state, [x], [g])
                buffers = [v for v in state[x].values() if isinstance(v, Tensor)]
                extrema.extend(tensor_extrema([x.add_(d, alpha=-longest), d, *buffers], p.device))
        device = extrema[0].device
        return bool(torch.isfinite(torch.stack([e.to(device) for e in extrema])).all())

    # ------------------------------------------------------------------ the device-side step

    def _device_step(self, loss: Tensor, groups: list[Group]) -> None:
        """``capturable``: the step with every decision on the device (no host read).  The base rule's
        new buffers and directions are formed next to the state; the gate takes the loss, ‖g‖², the
        slope a1 and the range of everything the step could write (:func:`_outcome_range`); then the
        trial step, the probe, the fit and the move, every value kept only ``where`` the gate's
        values are all finite (``ok``).  The probe is called also when the step is refused (at the
        unchanged parameters; its value is not used)."""
        for group in self.param_groups:
            _refuse_compiled(self._name, group)
        device = loss.device
        self._device_group_state(device)
        self._record_below_floor(device)
        trials = [self._device_trial(group, params, grads, device) for group, params, grads in groups]
        grad_sqnorms = [sqnorm(grads, device) for _, _, grads in groups]
        values, ok = self._device_gate(
            loss=loss,
            grad_sqnorms=torch.stack(grad_sqnorms),
            directional_derivative=_device_slope(trials, grad_sqnorms, device),
            trial_step=_outcome_range(trials, device),
        )
        self._store_on_device(trials, ok)
        for trial in trials:  # a refused step moves nothing, whatever its directions hold
            trial.directions = [torch.where(ok, d, 0.0) for d in trial.directions]
        _move_on_device(trials, [-trial.rate for trial in trials])  # the trial point x + Δ, Δ = −η·d
        try:
            trial_loss = self._probe_at_trial_point(device)
        except BaseException:
            _move_on_device(trials, [trial.rate for trial in trials])  # back to x (the buffers keep their update)
            raise
        self._fit_on_device(trials, values, ok, trial_loss)
        self._count_device_step(ok)

    def _device_layout(self, groups: list[Group], device: torch.device) -> None:
        """The state a ``capturable`` step writes, at its starting values (the state initialization of
        ``torch.distributed.checkpoint``): the shared counts, the rate state and the base rule's
        buffers on the device (the checkpoint code then puts back the ``lr`` it set aside)."""
        self._device_group_state(device)
        for group, params, _ in groups:
            self._rates_on_device(group, device)
            if group["base"] != "sgd":
                for p in params:
                    self._buffers_on_device(group, p)

    def _device_trial(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], device: torch.device
    ) -> _DeviceTrial:
        """A group's rate state (:meth:`_rates_on_device`), trial rate η and base-rule direction."""
        lr, scale = self._rates_on_device(group, device)
        rate = _on_device(_trial_rate(group, lr, scale), device)
        directions, buffers = self._device_direction(group, params, grads)
        return _DeviceTrial(group, lr, scale, rate, params, grads, directions, buffers)

    @staticmethod
    def _rates_on_device(group: dict[str, Any], device: torch.device) -> tuple[Scalar, Scalar]:
        """The group's ``lr`` and ``lr_scale`` for a ``capturable`` step, the one the step writes as a
        0-d tensor on ``device`` (made at the first step, then written in place): ``lr`` under the
        plain rule (the fitted rate), ``lr_scale`` under the anchored rule, whose ``lr`` is the anchor
        the user (or a scheduler) sets and stays as it is."""
        if _anchored(group):
            group[LR_SCALE] = _on_device(group.get(LR_SCALE, 1.0), device)
            return group["lr"], group[LR_SCALE]
        group["lr"] = _on_device(group["lr"], device)
        return group["lr"], 1.0

    def _device_direction(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """:func:`_base_direction` for a ``capturable`` step, without the trial step: the unit-rate
        direction and the base rule's new buffers by state key, formed on copies next to the state."""
        base, foreach = group["base"], _uses_foreach(group)
        coupled = with_l2(params, grads, 0.0 if base == "adamw" else group["weight_decay"], foreach=foreach)
        if base == "sgd":
            return coupled, {}
        states = [self._buffers_on_device(group, p) for p in params]
        if base == "sgdm":
            copies = clone([state["momentum_buffer"] for state in states], foreach=foreach)
            beside = [{"momentum_buffer": b} for b in copies]  # the buffers updated on copies
            buffers = momentum_(beside, coupled, group["momentum"], foreach=foreach)
            return buffers, {"momentum_buffer": buffers}
        return _device_adam_direction(group, states, params, coupled)

    def _buffers_on_device(self, group: dict[str, Any], p: Tensor) -> dict[str, Any]:
        """``state[p]`` with the base rule's buffers there from the first step on (``capturable``),
        so that every step writes them in place: zeros, where each starts (``μ·0 + g`` is the copy
        ``torch.optim.SGD`` starts its buffer with), and Adam's count an int64 0-d tensor."""
        state = self.state[p]
        if group["base"] == "sgdm" and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["base"] in ADAPTIVE_BASES:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                wide = work_dtype(p.dtype)  # as the default step keeps Adam's v
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=wide, memory_format=torch.preserve_format)
            state["step"] = _count_on_device(state.get("step", 0), p.device)
        return state

    def _store_on_device(self, trials: list[_DeviceTrial], ok: Tensor) -> None:
        """The base rule's new buffers into the state, in place, ``where`` the step is taken; Adam's
        counts advance with it."""
        taken = ok.to(torch.int64)
        for trial in trials:
            for key, values in trial.buffers.items():
                for p, value in zip(trial.params, values):
                    old = self.state[p][key]
                    old.copy_(torch.where(ok, value, old))
            if trial.group["base"] in ADAPTIVE_BASES:
                for p in trial.params:
                    self.state[p]["step"].add_(taken)

    def _fit_on_device(
        self, trials: list[_DeviceTrial], values: dict[str, Tensor], ok: Tensor, trial_loss: Tensor
    ) -> None:
        """:meth:`_fit_and_move` on the device: ``t*`` from the gate's loss and slope and the probe's
        loss (:func:`qlab_step_factor`), then per group the bounded rate (:func:`qlab_rate`), the move
        from the trial point to the fitted one, the rate kept for the next step and the records, each
        ``where`` the step is taken (a frozen group stays, its rate 0)."""
        loss, a1 = values["loss"], values["directional_derivative"]
        moving = torch.stack([trial.rate != 0.0 for trial in trials]).any()  # else the host path probes nothing
        f_trial = torch.where(moving, trial_loss, loss)
        a2 = torch.where(moving, f_trial - loss - a1, 0.0)
        t_star = qlab_step_factor(a1, a2)
        for trial in trials:
            group, frozen = trial.group, trial.rate == 0.0
            taken = ok & ~frozen
            upper = _upper_rate(group, trial.lr)
            bounded = qlab_rate(
                t_star, trial.rate, max_growth=group["max_growth"], min_lr=group[MIN_LR_KEY], max_lr=upper
            )
            new_rate = torch.where(frozen, 0.0, bounded)
            # from the trial point x + Δ to x + (η′/η)·Δ: a further −(η′ − η)·d
            _move_on_device([trial], [torch.where(taken, trial.rate - new_rate, 0.0)])
            if _anchored(group):  # lr stays the user's (or the scheduler's): the multiplier is kept
                group[LR_SCALE] = written_into(trial.scale, where(taken, new_rate / trial.lr, trial.scale))
            else:
                group["lr"] = written_into(trial.lr, torch.where(taken, new_rate, trial.lr))
            records = {
                "effective_lr": new_rate,
                "fitted_lr": torch.where(frozen, 0.0, t_star * trial.rate),
                "trial_loss": f_trial,
                "directional_derivative": a1,
                "curvature": a2,
            }
            self._record_on_device(group, **{key: _kept(group, key, ok, value) for key, value in records.items()})

    def _record_below_floor(self, device: torch.device) -> None:
        """:meth:`_warn_below_floor`'s test on the device (``capturable``), kept for
        :meth:`sync_warnings`: ``(index, lr)`` of the first group whose ``lr`` was set below its trial
        floor (NaN while none was), written in place."""
        if self._warned_floor:
            return
        record = self._floor_record
        if record is None:
            record = torch.full((2,), math.nan, dtype=accumulation_dtype(device), device=device)
        for i, group in enumerate(self.param_groups):
            below = _below_floor(group, group["lr"])
            if below is False:
                continue
            entry = torch.stack([_on_device(float(i), device), _on_device(group["lr"], device)])
            record = where(below & torch.isnan(record[0]), entry, record)
        self._floor_record = written_into(self._floor_record, record)

    def sync_warnings(self) -> None:
        """:meth:`~._base.AdaptiveOptimizer.sync_warnings`, and the warning that an ``lr`` was set below
        ``min_trial_lr`` (:meth:`_warn_below_floor`), which a ``capturable`` step keeps on the device."""
        super().sync_warnings()
        record = self._floor_record
        if not self._capturable or record is None or self._warned_floor:
            return
        index, lr = record.tolist()
        if not math.isnan(index):
            self._warn_floor(int(index), lr, stacklevel=3)


class QLABWrapper(_QLABFit):
    """``QLAB.wrap(optimizer)``: QLAB on top of an existing optimizer instance (see :meth:`QLAB.wrap`).

    Holds the wrapped optimizer as ``base_optimizer`` and shares its ``param_groups`` and
    ``state``: its groups gain the keys ``qlab_min_lr``, ``qlab_max_lr`` (the options ``min_lr``
    and ``max_lr``, see :class:`QLAB`), ``min_trial_lr``, ``max_growth``,
    ``max_lr_scale``, ``average_across_ranks``, ``step``, ``skipped_steps`` and the recorded
    quantities (``lr_scale`` under the anchored rule, which sets the wrapped optimizer's ``lr`` to
    the trial rate for its step only and puts the anchor back right after), so that
    :meth:`state_dict` is the wrapped optimizer's own state dict and :meth:`load_state_dict`
    restores both and resumes bit for bit.  It shows itself as ``QLAB.wrap(SGD)``,
    ``QLAB.wrap(RAdam)``, ...

    When the wrapped optimizer is one of this package's, its groups already hold ``step`` and
    ``skipped_steps``: the wrapper then leaves ``step`` to it (they count the same steps) and adds
    its own skips to ``skipped_steps``.

    A group whose ``lr`` is 0 is left to the wrapped optimizer's step at rate 0 (frozen).  The
    wrapped optimizer's step cannot be taken on copies: where the screen asks for it (see
    :class:`QLAB`), the starting point is kept until the trial point and the longest fitted step
    are known to be finite, and put back otherwise (the step is then skipped; the wrapped
    optimizer's own buffers keep that step's update, as when the probe raises).
    """

    def __init__(  # noqa: D107 - built by QLAB.wrap, which documents the arguments
        self,
        optimizer: Optimizer,
        *,
        min_lr: float = DEFAULT_MIN_LR,
        max_lr: float = DEFAULT_MAX_LR,
        min_trial_lr: float = DEFAULT_MIN_TRIAL_LR,
        max_growth: float = DEFAULT_MAX_GROWTH,
        max_lr_scale: float | Literal["auto"] | None = AUTO,
        average_across_ranks: bool = True,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        owner = "QLAB.wrap"
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"{owner}: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, _QLABFit):
            raise ValueError(f"{owner}: `optimizer` is already a QLAB optimizer")
        own = _checked_bounds(owner, locals())
        self.base_optimizer = optimizer
        own["max_lr_scale"] = _resolved_scale_cap(own["max_lr_scale"], self._adaptive_base({}))
        # Registers the wrapped optimizer's own group dicts (see add_param_group), which gain
        # QLAB's options; then the wrapper holds the wrapped optimizer's list and state themselves.
        super().__init__(
            optimizer.param_groups,
            {**optimizer.defaults, **own},
            average_across_ranks=average_across_ranks,
            max_consecutive_skips=max_consecutive_skips,
        )
        self._share_base()

    def _adaptive_base(self, group: dict[str, Any]) -> bool:
        return isinstance(self.base_optimizer, ADAPTIVE_TORCH_OPTIMIZERS)

    @property
    def _capturable(self) -> bool:
        """Never: the wrapper steps on the host.  (The wrapped optimizer's groups may hold its own
        ``capturable`` option, ``torch.optim.Adam(capturable=True)``'s, which is not this one.)"""
        return False

    def _share_base(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @property
    def _name(self) -> str:
        return f"QLAB.wrap({type(self.base_optimizer).__name__})"

    def __repr__(self) -> str:
        return f"{self._name} ({super().__repr__().partition(' (')[2]}"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["base_optimizer"] = self.base_optimizer  # the shared list and state stay shared
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group to the wrapped optimizer (with its defaults), then QLAB's options (its own
        ``min_lr``/``max_lr``, if given, kept as its ``qlab_min_lr``/``qlab_max_lr``).

        The wrapped optimizer's groups at construction keep their ``min_lr``/``max_lr``, if any, as
        they are: they are not QLAB's (``OneCycleLR`` writes them), which takes the bounds passed to
        :meth:`QLAB.wrap`."""
        if any(param_group is group for group in self.base_optimizer.param_groups):
            super().add_param_group(param_group)  # one of the wrapped optimizer's groups, at construction
            return
        _take_bounds(param_group)
        self.base_optimizer.add_param_group(param_group)
        self._adopt(self.param_groups[-1])

    def _adopt(self, group: dict[str, Any]) -> None:
        """Give a group of the wrapped optimizer QLAB's options and the optimizer-wide state."""
        self._resolve_scale_cap(group)
        for key in self.group_state:
            group.setdefault(key, self.param_groups[0][key])
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._start_multiplier(group)

    @property
    def _base_counts_steps(self) -> bool:
        return isinstance(self.base_optimizer, AdaptiveOptimizer)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict (its groups hold this wrapper's options and scalars)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped optimizer and this wrapper, also from a release-0.1 state dict.

        Release 0.1 kept this wrapper's scalars in ``state["global"]`` and those of a wrapped
        optimizer of this package in ``state["base_global"]``.
        """
        legacy = state_dict.get("state", {}).get(LEGACY_GLOBAL)
        converted = self._convert_legacy(state_dict)  # this wrapper's scalars → the groups
        state = dict(converted["state"])
        if LEGACY_BASE_GLOBAL in state:  # the wrapped optimizer converts its own
            state[LEGACY_GLOBAL] = state.pop(LEGACY_BASE_GLOBAL)
        self.base_optimizer.load_state_dict({**converted, "state": state})
        self._share_base()  # torch's load_state_dict builds new groups and a new state
        if legacy is not None and self._base_counts_steps:
            self._set_shared(skipped_steps=self._shared("skipped_steps") + legacy.get("skipped_steps", 0))

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        for group in self.param_groups:  # groups added to the wrapped optimizer directly
            self._adopt(group)
        groups = self._with_grads()
        if not groups:
            return
        if self._is_state_initialization():
            # torch.distributed.checkpoint lays out the state: the wrapped optimizer's own step at
            # lr = 0 creates its buffers without moving anything.
            self.base_optimizer.step()
            self._record_unfitted(groups)
            return
        self._require_probe()  # before anything changes
        self._warn_below_floor()
        device = loss.device
        # The gate: the step's one synchronization before anything changes (the base included).
        values = self._gate(loss=loss, grad_sqnorms=torch.stack([sqnorm(grads, device) for _, _, grads in groups]))
        if values is None:
            return
        rates = [_trial_rate(group, *_host_rates(group)) for group, _, _ in groups]
        # The wrapped optimizer's step cannot be tried on copies: where the screen asks for it, the
        # starting point is kept until the trial point and the longest fitted step are known finite.
        exact = _may_overflow(groups, rates, values["grad_sqnorms"])

        trials, frozen, grads = [], [], []
        for (group, params, grads_), rate in zip(groups, rates):
            if rate == 0.0:  # lr = 0: the wrapped optimizer's step leaves the group where it is
                frozen.append(group)
                continue
            anchor = float(group["lr"])
            _set_lr(group, rate)
            trials.append(_Trial(group, rate, 1.0, params, clone(params, foreach=_uses_foreach(group)), anchor))
            grads.append(grads_)
        try:
            self.base_optimizer.step()
        finally:  # anchored groups: lr is the user's again (the trial rate was the wrapped step's only)
            for trial in trials:
                if _anchored(trial.group):
                    _set_lr(trial.group, trial.anchor)
        starts = [clone(trial.directions, foreach=_uses_foreach(trial.group)) for trial in trials] if exact else []
        slope = torch.zeros((), dtype=accumulation_dtype(device), device=device)
        for trial, grads_ in zip(trials, grads):
            subtract_(trial.directions, trial.params, foreach=_uses_foreach(trial.group))  # x − x_trial = −Δ
            slope = slope - dot(grads_, trial.directions, device)

        def put_back() -> None:
            for trial, start in zip(trials, starts):
                copy_(trial.params, start, foreach=_uses_foreach(trial.group))

        if exact and not self._agree(_fitted_points_are_finite(trials, starts)):
            put_back()
            self._skip_step("outcome", ["the trial step"])
            return
        if not self._fit_and_move(trials, frozen, values["loss"], slope, device, put_back if exact else None):
            return
        if not self._base_counts_steps:
            self._set_shared(step=self._shared("step") + 1)
