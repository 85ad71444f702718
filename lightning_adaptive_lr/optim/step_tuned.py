r"""Step-Tuned SGD: SGD whose step size is tuned online by a stochastic Barzilai–Borwein gain.

Castera, Bolte, Févotte, Pauwels. "Second-order step-size tuning of SGD for non-convex
optimization." Neural Processing Letters, 2022 (arXiv:2103.03570).  docs/algorithms.md §5.

Iteration ``k = 0, 1, …`` is two half-steps that share one step size::

    η_k     = lr·γ_k / (k+1)^(1/2+δ)                                   (step_tuned_step_size)
    x_{k+½} = x_k − η_k·g_a,          g_a = ∇f_B(x_k)
    x_{k+1} = x_{k+½} − η_k·g_b,      g_b = ∇f_B'(x_{k+½})
    Δx = x_{k+½} − x_k,   G ← β·G + (1−β)·(g_b − g_a),   Ĝ = G / (1 − β^(k+1))
    γ_{k+1} = clip(‖Δx‖² / ⟨Ĝ, Δx⟩  if ⟨Ĝ, Δx⟩ > 0  else ν,   m̃, M̃)   (step_tuned_gain)

The base direction is plain SGD's (with coupled L2, :func:`~._directions.with_l2`).

How the scalars are obtained without a second device-to-host read.  Since ``Δx = −η_k·g_a`` (per
param group), the gain needs only scalars that exist before the parameters move::

    ‖Δx‖²     = Σ_groups η² · ‖g_a‖²
    ⟨Ĝ, Δx⟩   = Σ_groups η · (β·⟨D, g_a⟩ + (1−β)·(‖g_a‖² − ⟨g_b, g_a⟩)) / (1 − β^(k+1))

(:func:`step_tuned_curvature`), where ``D = −G`` is what is stored (the average of ``g_a − g_b``:
one fused ``lerp`` updates it).  ``‖g_a‖²`` and ``⟨D, g_a⟩`` are read by the gate of the first
half-step (they also tell whether ``g_a`` is finite), ``⟨g_b, g_a⟩`` by the gate of the second (a
non-finite entry of ``g_b`` makes it non-finite whatever ``g_a`` holds there), so every ``step()``
reads the device exactly once and the gain and step sizes stay Python floats.  The same floats
decide whether a half-step's outcome is representable (:func:`step_tuned_fits`) before anything
moves.

With ``capturable=True`` nothing is read: the same rules run on 0-d device tensors, and the gate's
decision and the outcome checks become one 0-d bool ``ok`` that every update is taken ``where``.  A
skipped half-step is taken again at the next call, so which half is due (``phase``) is a device
value too: each call takes both halves' sums, the gate reads those of the half due, and the second
half's sums over ``g_a`` are taken again from ``first_grad`` (per parameter, masked by its pending
mark) instead of being carried over from the first half on the host.  With ``same_batch=True`` a
call is a whole iteration: its first half-step is taken at once and undone ``where`` ``ok`` is false.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._base import (
    DEFAULT_MAX_CONSECUTIVE_SKIPS,
    FLAG,
    FRACTION,
    LEGACY_GLOBAL,
    NONNEGATIVE,
    POSITIVE,
    AdaptiveOptimizer,
    LossClosure,
    check_range,
    checked,
    number,
    runtime_options,
)
from ._compiled import ensure_inductor_works, run_with_table
from ._directions import with_l2
from ._reduce import accumulation_dtype, dot, sqnorm, tensor_dots, tensor_extrema, work_dtype
from ._scalars import Scalar, safe_div, smax, smin, where
from ._sgd_compiled import difference_average_step, kept_step
from ._tensorlists import add_scaled_, clone, copy_, exponential_average_, subtract_

__all__ = ["StepTunedSGD", "step_tuned_curvature", "step_tuned_fits", "step_tuned_gain", "step_tuned_step_size"]

#: ``state[p]``: the running average of ``g_a − g_b`` (that is −G in docs/algorithms.md §5).
DIFF_AVG = "neg_grad_diff_avg"
#: ``state[p]`` (``same_batch=False``): ``g_a`` (with weight decay), kept for the second half-step.
FIRST_GRAD = "first_grad"
#: ``state[p]`` (``same_batch=False``): whether ``first_grad`` is this iteration's ``g_a``, i.e.
#: whether the parameter took the pending first half-step (``first_grad`` is scratch otherwise).
FIRST_GRAD_PENDING = "first_grad_pending"
#: Param-group keys that hold a value only between the two half-steps (``None`` otherwise): the
#: group's ``η_k``, and the first half-step's ``⟨D, g_a⟩`` and ``‖g_a‖²`` over the group.
PENDING = ("half_step_lr", "first_half_avg_dot", "first_half_sqnorm")
#: The outcome checks of a ``capturable`` half-step, as its skip record names them.
OUTCOMES = ("first half-step", "curvature, gain", "second half-step")


# --------------------------------------------------------------------------- the scalar rules


def step_tuned_step_size(lr: float, gain: Scalar, iteration: Scalar, delta: float) -> Scalar:
    """``η_k = lr·γ_k/(k+1)^(1/2+δ)``.  Works on numbers and on 0-d tensors (``k`` then a float tensor).

    >>> step_tuned_step_size(0.1, 2.0, 3, 0.0)
    0.1
    """
    return lr * gain / (iteration + 1) ** (0.5 + delta)


def step_tuned_curvature(
    lrs: Sequence[Scalar],
    avg_dots: Sequence[Scalar],
    sqnorms: Sequence[Scalar],
    cross_dots: Sequence[Scalar],
    *,
    beta: float,
    iteration: Scalar,
) -> tuple[Scalar, Scalar]:
    """``(⟨Ĝ, Δx⟩, ‖Δx‖²)`` of iteration ``k`` from per-group sums (module docstring).

    Per group: ``η_k``, ``⟨D, g_a⟩`` (D before this iteration's update), ``‖g_a‖²`` and
    ``⟨g_b, g_a⟩``, over the parameters that took both half-steps.  Works on numbers and on 0-d
    tensors (``k`` then a float tensor).

    >>> step_tuned_curvature([0.5], [0.0], [4.0], [1.0], beta=0.0, iteration=0)
    (1.5, 1.0)
    """
    rho = 1.0 - beta ** (iteration + 1)
    curvature = sum(
        lr * (beta * a + (1.0 - beta) * (q - c)) for lr, a, q, c in zip(lrs, avg_dots, sqnorms, cross_dots)
    ) / rho
    dx_sqnorm = sum(lr * lr * q for lr, q in zip(lrs, sqnorms))
    return curvature, dx_sqnorm


def step_tuned_gain(curvature: Scalar, dx_sqnorm: Scalar, *, nu: float, bounds: tuple[float, float]) -> Scalar:
    """``γ_{k+1} = clip(‖Δx‖²/⟨Ĝ, Δx⟩ if ⟨Ĝ, Δx⟩ > 0 else ν, m̃, M̃)``.  Numbers or 0-d tensors.

    >>> step_tuned_gain(1.5, 1.0, nu=2.0, bounds=(0.5, 2.0))
    0.6666666666666666
    >>> step_tuned_gain(-1.0, 1.0, nu=2.0, bounds=(0.5, 1.5))
    1.5
    """
    low, high = bounds
    gain = where(curvature > 0, safe_div(dx_sqnorm, curvature), nu)
    return smin(smax(gain, low), high)


def step_tuned_fits(lr: Scalar, grad_bounds: Sequence[Scalar], largest: float) -> bool | Tensor:
    """Whether a half-step ``x − η·g`` (and, given two gradients, ``g_a − g_b``) stays finite.

    ``grad_bounds`` bound the entries of the gradients the step writes from: ``[|g_a|]`` for a
    first half-step, ``[|g_a|, |g_b|]`` for a second one; ``largest`` is the dtype's largest number
    ``F``.  For parameters within ``±F/2``, ``x − η·g`` stays finite when ``η·|g| ≤ F/2`` (always
    when ``η ≤ 1/2``), and the difference that enters the average when ``|g_a| + |g_b| ≤ F`` (the
    average itself is a convex combination: computed in float32 for 16-bit dtypes, it cannot
    overflow).  Numbers give a bool, 0-d tensors a 0-d bool tensor.

    >>> step_tuned_fits(0.1, [4e4, 4e4], 65504.0), step_tuned_fits(0.1, [4e4, 1.0], 65504.0)
    (False, True)
    """
    reachable = _every([(lr <= 0.5) | (lr * bound <= largest / 2) for bound in grad_bounds])
    return reachable & (_total(grad_bounds) <= largest)


def _every(flags: Sequence[bool | Tensor]) -> bool | Tensor:
    """``all(flags)``: a bool for bools, a 0-d bool tensor for 0-d bool tensors (nothing read)."""
    if flags and isinstance(flags[0], Tensor):
        return torch.stack(list(flags)).all()
    return all(flags)


def _total(values: Sequence[Scalar]) -> Scalar:
    """``Σ values``: exactly rounded for numbers (``math.fsum``), a 0-d tensor for tensors."""
    if any(isinstance(v, Tensor) for v in values):
        return sum(values)
    return math.fsum(values)


def _sqrt(value: Scalar) -> Scalar:
    return torch.sqrt(value) if isinstance(value, Tensor) else math.sqrt(value)


# --------------------------------------------------------------------------- the bodies


def _first_half_step(params: list[Tensor], grads: list[Tensor], lr: float, *, foreach: bool) -> None:
    """``x_{k+½} = x_k − η_k·g_a``."""
    add_scaled_(params, grads, -lr, foreach=foreach)


def _second_half_step(
    params: list[Tensor],
    grads: list[Tensor],
    lr: float,
    diff_avgs: list[Tensor],
    firsts: list[Tensor],
    seconds: list[Tensor],
    beta: float,
    *,
    foreach: bool,
) -> None:
    """``x_{k+1} = x_{k+½} − η_k·g_b``; ``D ← β·D + (1−β)·(g_a − g_b)`` over the pairs (``firsts`` become scratch)."""
    add_scaled_(params, grads, -lr, foreach=foreach)
    subtract_(firsts, seconds, foreach=foreach)
    exponential_average_(diff_avgs, firsts, 1.0 - beta, foreach=foreach)


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class _Half:
    """One param group's parameters that have a gradient at this half-step."""

    group: dict[str, Any]
    params: list[Tensor]
    #: ``g + weight_decay·x`` (the ``.grad`` tensors themselves when there is no weight decay).
    grads: list[Tensor]


@dataclass
class _Pairs:
    """One param group's parameters that have a gradient at both half-steps of the iteration."""

    params: list[Tensor]
    second: list[Tensor]
    first: list[Tensor]


def _split(items: Sequence[Tensor], index: Sequence[int]) -> list[Tensor]:
    """``items[i]`` for ``i`` in ``index``."""
    return [items[i] for i in index]


def _key(p: Tensor) -> int:
    """What pairs a tensor of one half-step with its other half: the identity of the parameter it stands
    for (a complex parameter's real view is a new tensor at every step)."""
    return id(AdaptiveOptimizer._parameter_of(p))


def _pairs(half: _Half, first_of: dict[int, Tensor]) -> _Pairs:
    """The group's parameters with a gradient at both half-steps: ``(x, g_b, g_a)``.

    ``first_of`` maps :func:`_key` of a parameter to its ``g_a``.
    """
    pairs = _Pairs([], [], [])
    for p, g in zip(half.params, half.grads):
        first = first_of.get(_key(p))
        if first is not None:
            pairs.params.append(p)
            pairs.second.append(g)
            pairs.first.append(first)
    return pairs


def _loss(loss: Tensor | None) -> dict[str, Tensor]:
    """The gate's ``loss`` entry, when there is a loss."""
    return {} if loss is None else {"loss": loss}


def _largest(params: list[Tensor]) -> float:
    """The largest finite number of every dtype among ``params`` (the smallest of their maxima)."""
    return min(torch.finfo(dtype).max for dtype in {p.dtype for p in params})


def _refuse_on_device(owner: str, options: dict[str, Any]) -> None:
    """Refuse, naming what to use instead, the options a ``capturable`` step does not support."""
    if not options.get("capturable"):
        return
    if options.get("compiled"):
        raise ValueError(
            f"{owner}: `compiled` and `capturable` cannot both be True: the compiled half-step "
            "kernels (optim/_sgd_compiled.py) take their step sizes as Python numbers and have no flag to "
            "keep a skipped half-step's values on the device. Use capturable=True alone (the device-side "
            "step) or compiled=True alone (the fused kernels, one device-to-host read per step)."
        )


def _masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """``Σ values[i]`` over ``mask[i]``: a non-finite value outside the mask does not count."""
    return torch.where(mask, values, 0.0).sum()


def _flags(flags: list[Tensor], device: torch.device) -> Tensor:
    """0-d bool tensors as one vector (empty for none)."""
    return torch.stack(flags) if flags else torch.zeros(0, dtype=torch.bool, device=device)


def _as_flag(value: bool | Tensor, device: torch.device) -> Tensor:
    """``value`` as a 0-d bool tensor on ``device``: itself if it is one, else made without reading it (a
    state dict loaded into ``torch.optim`` casts a 0-d state tensor to the parameter's float dtype)."""
    if isinstance(value, Tensor):
        return value if (value.dtype, value.device) == (torch.bool, device) else (value != 0).to(device)
    return torch.full((), bool(value), dtype=torch.bool, device=device)  # a fill kernel: nothing copied


def _as_number(value: float | Tensor, device: torch.device) -> Tensor:
    """``value`` as a 0-d :func:`~._reduce.accumulation_dtype` tensor on ``device`` (itself if it is one)."""
    dtype = accumulation_dtype(device)
    if isinstance(value, Tensor):
        return value if (value.dtype, value.device) == (dtype, device) else value.to(device=device, dtype=dtype)
    return torch.full((), float(value), dtype=dtype, device=device)


def _descended(p: Tensor, g: Tensor, rate: Tensor) -> Tensor:
    """``x − η·g`` for a ``capturable`` step: ``η`` (a 0-d tensor) in the parameters' dtype and one
    rounding of the result (on ``copy_`` into ``p``), as the default step's add."""
    wide = work_dtype(p.dtype)
    return p.to(wide) - g.to(wide) * rate.to(p.dtype).to(wide)


def _or_zero(value: float | None) -> float:
    """A group's pending sum, 0 for a group added between the two half-steps (it has no first half)."""
    return 0.0 if value is None else value


# --------------------------------------------------------------------------- the optimizer


class StepTunedSGD(AdaptiveOptimizer):
    r"""Step-Tuned SGD: SGD with a step size tuned by a stochastic Barzilai–Borwein gain.

    Castera, Bolte, Févotte, Pauwels, "Second-order step-size tuning of SGD for non-convex
    optimization", Neural Processing Letters, 2022.  See docs/algorithms.md §5 and the module
    docstring for the update.  One scalar gain ``γ`` (``γ_0 = 1``) for the whole model rescales a
    step size ``lr/(k+1)^(1/2+δ)`` that decays with the iteration count ``k``; the gain is the
    inverse of a curvature estimate along the last displacement, clipped to ``gain_bounds``, or
    ``nu`` where the estimate says the loss is locally concave.  Gradient-only: no loss is needed
    (a loss, when given, is still checked, so that a non-finite loss skips the step).

    **Which mini-batch the second half-step uses [reconstructed].**  Each iteration takes two
    half-steps, the second at the midpoint ``x_{k+½}``.  The paper's footnote says that computing a
    second gradient on the same mini-batch, as stochastic BFGS does, "would double the computational
    cost"; we read it as: the second gradient comes from the **next** mini-batch.

    * ``same_batch=False`` (default): every ``step()`` is one half-step on its own mini-batch — odd
      calls take first half-steps, even calls second half-steps followed by the gain update — so a
      step costs what an SGD step costs (one forward and backward; no extra model evaluation).  It
      works in any loop, including Lightning's automatic optimization.  One iteration ``k`` spans
      two calls, so ``(k+1)`` counts pairs of calls.
    * ``same_batch=True``: the second gradient is taken on the same mini-batch (``B' = B``, as some
      third-party ports do).  ``step(closure)`` then calls the closure **twice** (at ``x_k`` and at
      ``x_{k+½}``); the closure must zero the gradients, re-evaluate the model, call ``backward()``
      and return the loss, as for ``torch.optim.LBFGS``.  For plain PyTorch loops only:
      :attr:`calls_closure_twice` lets a training framework refuse it, and Lightning must never run
      its closure twice.  Costs two forward and backward passes per step.

    **Parameters that miss a gradient.**  Parameters whose ``.grad`` is ``None`` are left alone.
    A parameter with a gradient at only one of the two half-steps of an iteration takes that
    half-step, but stays out of that iteration's gain (its ``G`` and its share of ``Δx`` are not
    counted).  The step size ``η_k`` is fixed when the first half-step is taken: a change of
    ``lr`` (a scheduler) between the two half-steps applies from the next iteration.

    Args:
        params: parameters or param groups.  Groups may differ in ``lr`` and ``weight_decay``.
        lr: the base step size ``α`` (the paper tunes it; 0.1 is a common SGD start).  The step
            actually taken is ``lr·γ/(k+1)^(1/2+δ)`` with ``γ`` in ``gain_bounds``, so it decays;
            larger values than for constant-rate SGD are usual.
        nu: the gain used where the curvature estimate ``⟨Ĝ, Δx⟩`` is not positive (paper: 2).
        beta: decay of the running average ``G`` of gradient differences, in [0, 1) (paper: 0.9).
            ``beta=0`` gives the plain (stochastic) Barzilai–Borwein gain.  Also held as
            ``momentum`` in every param group (see "Schedulers" below).
        gain_bounds: ``(m̃, M̃)``, the interval the gain is clipped to, ``0 < m̃ ≤ M̃`` (paper: (0.5, 2)).
        delta: ``δ`` in [0, 1/2): the decay exponent is ``1/2 + δ`` (paper: 0.001).
        weight_decay: coupled L2 penalty: ``g + weight_decay·x`` is used as the gradient at both
            half-steps (so it enters ``Δg`` and the gain too).
        same_batch: take the second half-step on the same mini-batch (closure called twice), see above.
            With ``capturable=True`` too, the whole iteration's decisions stay on the device (see
            ``capturable``).
        foreach: use the multi-tensor (``torch._foreach_*``) path; ``False`` updates tensor by tensor.
        compiled: run each half-step's element-wise work as one ``torch.compile``\ d (TorchInductor)
            loop per tensor (:mod:`._sgd_compiled`): the first half-step keeps ``g_a`` and moves the
            parameters in 4 parameter-sized accesses instead of 5; the second moves them and updates
            the average of ``g_a − g_b`` in 6 instead of 9.  The reductions, the gate and the gain
            are unchanged.  Compiles once per set of parameter shapes at the first steps; needs a
            working Inductor (a C++ compiler on CPU, Triton on GPU), else ``step()`` raises a
            RuntimeError naming the cause before any state changes.
        capturable: keep every decision of the step on the device (docs/algorithms.md, "The
            device-side step"): the gate, the fits checks, ``η``, the curvature, the gain and the
            half-step's ``phase`` are 0-d device tensors, a half-step whose values are not finite or
            whose outcome would not fit is undone with ``torch.where``, and the state is updated in
            place, so the step never waits for the host and can be captured in a CUDA graph (after a
            few eager steps).  Since a skipped half-step is taken again at the next call, which half
            comes next is a device value: each call computes both halves' sums (five per-tensor
            reductions instead of two or three, tensor by tensor whatever ``foreach``) and keeps the
            one ``phase`` says.  Skips are counted on the device and reported by
            :meth:`sync_warnings`.  Hyperparameters are read as Python numbers at each call: a graph
            keeps the values it was captured with.  With ``same_batch=True`` one ``step(closure)``
            is one whole iteration, so no ``phase`` is kept: it takes the first half-step (keeping
            copies of ``x_k`` and ``g_a``), calls the closure again, and the gate over both
            gradients and losses, the outcome checks and the gain decide on the device; the second
            half-step and the average are written ``where`` the iteration is taken, and elsewhere
            the parameters get ``x_k`` back bit for bit (the closure must then read nothing either:
            no ``.item()``).  A state saved between the two half-steps of a ``same_batch=False`` run
            is refused when its ``phase`` is a Python number (a default step's); one held on the
            device is not read.  Not with ``compiled=True`` (its kernels take host numbers): the
            constructor refuses it.
        average_across_ranks: average a given loss across ``torch.distributed`` ranks (one collective)
            before the finiteness check, so that all replicas skip the same steps.
        max_consecutive_skips: raise after this many skipped steps in a row (``None``: never);
            see :class:`~._base.AdaptiveOptimizer`.

    **Schedulers.**  ``lr`` schedulers act on ``lr`` (a change between the two half-steps applies
    from the next iteration, as said above).  β, the momentum-like coefficient, is also exposed as
    ``param_groups[i]["momentum"]``, the key that torch's ``OneCycleLR`` and ``CyclicLR`` cycle
    (``cycle_momentum=True``, their default) and that Lightning's
    ``LearningRateMonitor(log_momentum=True)`` logs.  The two keys are one option: at each step, a
    value written into ``momentum`` (by a scheduler) becomes β, else one written into ``beta``;
    both then hold the β used.  β is shared by all groups, so a scheduler must write every group
    alike (its default); differing values raise ``ValueError`` naming the key.  Cycling β between
    0.85 and 0.95 (``OneCycleLR``'s defaults) only changes how much the curvature estimate is
    smoothed; the bias correction ``1 − β^(k+1)`` uses the current β.

    **Finite steps only.**  A half-step is skipped (parameters and state untouched, counted in
    ``skipped_steps``) when the loss or a gradient sum the gate reads is not finite (``‖g_a‖²``
    overflows the work dtype for ``|g_a| ≳ 1.8e19`` in float32), and also when its outcome would not
    be: a gain or curvature that overflows float64, or a half-step that :func:`step_tuned_fits`
    refuses (``|g_a| ≤ ‖g_a‖``; for float16 parameters the gate also reads the float16 gradients'
    range, so that ``g_a − g_b`` cannot overflow the average).  Elsewhere the size of ``g_b`` is not
    read (that would cost a pass over the gradients): there a finite ``g_b`` can make a second
    half-step non-finite only with entries of the order of the dtype's largest number
    (``F/(2·max(1, η))``, about 1e38 in float32).

    After each step every param group holds ``effective_lr`` (``η_k``, the step size of the
    half-step just taken), ``gain`` (the current ``γ``: ``γ_{k+1}`` after a second half-step) and
    ``curvature`` (``⟨Ĝ, Δx⟩`` of the last completed iteration; NaN before the first).

    State.  Every param group holds, equal in all groups, ``step`` (half-steps taken; iterations
    with ``same_batch``), ``skipped_steps``, ``iteration`` (``k``), ``phase`` (1 between the two
    half-steps) and ``gamma`` (``γ_k``, the gain the next half-step uses; recorded as ``gain``);
    and, of its own, what the second half-step needs: ``half_step_lr`` (its ``η_k``),
    ``first_half_avg_dot`` and ``first_half_sqnorm`` (its ``⟨D, g_a⟩`` and ``‖g_a‖²``), ``None``
    outside an iteration.  ``state[p]`` holds ``neg_grad_diff_avg`` (the running average of
    ``g_a − g_b``, i.e. ``−G``: stored with this sign so that one fused ``lerp`` updates it) and,
    without ``same_batch``, ``first_grad`` (``g_a``; scratch after the second half-step) and
    ``first_grad_pending`` (whether ``first_grad`` is the pending iteration's ``g_a``).  The keys
    of ``state[p]`` do not change from the first step on, which distributed checkpoints need.
    With ``capturable=True`` the shared numbers are 0-d tensors on the parameters' device (counts
    int64, ``gamma`` float64), as are the groups' pending values (+inf: none) and records, and
    ``first_grad_pending`` is a 0-d bool tensor; every parameter with a gradient has its state from
    its first step on (zeros where that step was skipped).  State dicts move between the two modes.
    Extra memory: two parameter-sized buffers (with ``same_batch``, one, plus copies of ``x_k``
    and ``g_a`` during the step).

    Cost of the optimizer's own work per pair of calls: five element-wise passes (two parameter
    updates, keeping ``g_a``, and two to update ``G``) and three reductions (``‖g_a‖²``,
    ``⟨D, g_a⟩``, ``⟨g_b, g_a⟩``), against SGD's two element-wise passes; keeping ``G`` and ``g_a``
    is what the method needs, so this is its floor with PyTorch's in-place multi-tensor kernels;
    ``compiled=True`` fuses them into one pass per half-step (see ``compiled`` above).

    Example:
        >>> import torch
        >>> from lightning_adaptive_lr import StepTunedSGD
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = StepTunedSGD(model.parameters(), lr=0.1)
        >>> for _ in range(2):  # one iteration: a first and a second half-step
        ...     optimizer.zero_grad()
        ...     model(torch.ones(4, 3)).pow(2).mean().backward()
        ...     optimizer.step()
        >>> optimizer.param_groups[0]["iteration"], optimizer.param_groups[0]["phase"]
        (1, 0)
        >>> 0.5 <= optimizer.param_groups[0]["gain"] <= 2.0
        True
    """

    requires_loss = False
    shared_options = ("nu", "beta", "momentum", "gain_bounds", "delta", "same_batch", "capturable")
    group_state = {**AdaptiveOptimizer.group_state, "iteration": 0, "phase": 0, "gamma": 1.0}
    #: The ``capturable`` step's outcome checks, named in its skip record (:meth:`_device_outcome`).
    outcome_scalars = frozenset(OUTCOMES)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        nu: float = 2.0,
        beta: float = 0.9,
        gain_bounds: tuple[float, float] = (0.5, 2.0),
        delta: float = 0.001,
        weight_decay: float = 0.0,
        same_batch: bool = False,
        *,
        foreach: bool = True,
        compiled: bool = False,
        capturable: bool = False,
        average_across_ranks: bool = True,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        name = type(self).__name__
        if not (isinstance(gain_bounds, (tuple, list)) and len(gain_bounds) == 2):
            raise ValueError(f"{name}: `gain_bounds` must be a pair (low, high), got {gain_bounds!r}")
        check_range(name, "gain_bounds[0]", gain_bounds[0], 0.0, None, low_open=True)
        check_range(name, "gain_bounds[1]", gain_bounds[1], gain_bounds[0], None)
        defaults = checked(
            name, locals(), lr=NONNEGATIVE, nu=POSITIVE, beta=FRACTION, delta=number(0.0, 0.5, high_open=True),
            weight_decay=NONNEGATIVE, same_batch=FLAG, compiled=FLAG, capturable=FLAG,
        )  # fmt: skip
        _refuse_on_device(name, defaults)
        defaults.update(
            gain_bounds=(float(gain_bounds[0]), float(gain_bounds[1])),
            momentum=defaults["beta"],  # the key torch's schedulers and Lightning's monitor read
            **dict.fromkeys(PENDING),  # per group, not shared: a group added later has none pending
        )
        #: the β of the last step (tells which of ``beta`` and ``momentum`` was written since)
        self._applied_beta: float | None = defaults["beta"]
        super().__init__(params, defaults, **runtime_options(locals()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group that gives one of ``beta`` and ``momentum`` gets the other; one that gives neither, the current β.

        (Both keys are one option: see "Schedulers" in the class docstring.)
        """
        for key, other in (("beta", "momentum"), ("momentum", "beta")):
            if key in param_group:
                param_group.setdefault(other, param_group[key])
        if self.param_groups:
            for key in ("beta", "momentum"):
                param_group.setdefault(key, self.param_groups[0][key])
        _refuse_on_device(self._name, {**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _sync_momentum(self) -> None:
        """β for this step: ``momentum`` where it was written (by a scheduler), else ``beta``; both then hold it.

        β is shared by all param groups: values that differ between groups raise ``ValueError``.
        """
        groups = self.param_groups
        first = groups[0]["beta"]
        if all(group.setdefault("momentum", group["beta"]) == group["beta"] == first for group in groups):
            return
        applied = getattr(self, "_applied_beta", None)  # None after unpickling: `momentum` wins
        key = "beta" if all(group["momentum"] == applied for group in groups) else "momentum"
        values = [group[key] for group in groups]
        if any(v != values[0] for v in values):
            raise ValueError(
                f"{type(self).__name__}: `{key}` (β, the average of gradient differences) is shared by all param "
                f"groups, got {values!r}: a scheduler that cycles momentum must give every group the same value"
            )
        check_range(type(self).__name__, key, values[0], 0.0, 1.0, high_open=True)
        value = float(values[0])
        self._applied_beta = value
        for group in groups:
            group["beta"] = group["momentum"] = value

    @property
    def calls_closure_twice(self) -> bool:
        """Whether ``step(closure)`` calls the closure twice (``same_batch=True``).

        Training loops that must not re-run their closure (Lightning's automatic optimization)
        read this to refuse the setting with an explanation.
        """
        return bool(self.param_groups[0]["same_batch"])

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: LossClosure | None = None, *, loss: Tensor | float | None = None) -> Any:  # type: ignore[override]
        """Take one half-step (default) or, with ``same_batch=True``, one whole iteration.

        Args:
            closure: re-evaluates the model, calls ``backward()`` and returns the loss.  Optional and
                called once by default; required and called twice with ``same_batch=True``.
            loss: the loss whose gradient is in ``.grad`` (optional: only checked for finiteness).

        Returns:
            The (first) closure's return value if a closure was given, else ``loss``.
        """
        self._sync_momentum()
        if not self.calls_closure_twice:
            return super().step(closure, loss=loss)
        if closure is None:
            if self._is_state_initialization():
                self._create_state()
                return loss
            raise ValueError(
                f"{type(self).__name__}(same_batch=True) takes both half-steps on the same mini-batch, so "
                "`step()` needs a closure: `optimizer.step(closure)`, where the closure zeroes the gradients, "
                "evaluates the model, calls backward() and returns the loss (it is called twice, at x_k and at "
                "x_{k+1/2}). Lightning's automatic optimization cannot do this; use same_batch=False (the "
                "default), where each step() is one half-step on its own mini-batch."
            )
        skipped = self._shared("skipped_steps")
        result = self._same_batch_step(closure, loss)
        self._end_run_of_skips(skipped)
        return result

    def _update(self, loss: Tensor | None) -> None:
        if self._is_state_initialization():  # torch.distributed.checkpoint laying out the state
            self._create_state()
            return
        if self._capturable:
            self._device_half(loss)
            return
        self._host_state()
        self._ensure_compiler()
        if self._shared("phase") == 0:
            self._first_half(loss)
        else:
            self._second_half(loss)

    # ------------------------------------------------------------------ the two modes

    def _first_half(self, loss: Tensor | None) -> None:
        """Odd calls (``same_batch=False``): ``x_{k+½} = x_k − η_k·g_a``; keep ``g_a`` for the second."""
        halves = self._gather()
        if not any(h.params for h in halves):
            return
        sums = self._first_half_sums([h.params for h in halves], [h.grads for h in halves])
        values = self._gate(**sums, **_loss(loss))
        if values is None:
            return
        lrs = self._step_sizes()
        if not self._first_fits(halves, lrs, values["sqnorms"]):
            self._skip_step("outcome", ("first half-step",))
            return
        for half, lr, avg_dot, sq in zip(halves, lrs, values["avg_dots"], values["sqnorms"]):
            buffers = self._keep_first_grads(half)
            into = [i for i, b in enumerate(buffers) if b is not None]  # g_a still to be copied there
            targets, foreach = [buffers[i] for i in into], half.group["foreach"]
            if half.group["compiled"] and into:  # the copy and the step in one loop per tensor
                columns = (_split(half.params, into), _split(half.grads, into), targets)
                run_with_table(self._name, kept_step, columns, [(lr,)] * len(into))
                others = [i for i, b in enumerate(buffers) if b is None]
                _first_half_step(_split(half.params, others), _split(half.grads, others), lr, foreach=foreach)
            else:
                copy_(targets, _split(half.grads, into), foreach=foreach)
                _first_half_step(half.params, half.grads, lr, foreach=foreach)
            half.group.update(half_step_lr=lr, first_half_avg_dot=avg_dot, first_half_sqnorm=sq)
        self._set_shared(step=self._shared("step") + 1, phase=1)
        # `curvature` is only a record: a first half-step repeats the last completed iteration's.
        self._record_all(lrs, self.param_groups[0].get("curvature", math.nan))

    def _second_half(self, loss: Tensor | None) -> None:
        """Even calls: ``x_{k+1} = x_{k+½} − η_k·g_b``, then the running average and the gain."""
        halves = self._gather()
        if not any(h.params for h in halves):
            return
        kept = self._pending_first_grads()
        pairs = [_pairs(h, {i: state[FIRST_GRAD] for i, state in kept.items()}) for h in halves]
        matched = len(kept) == sum(len(h.params) for h in halves) == sum(len(p.params) for p in pairs)
        values = self._gate(**self._pair_sums(halves, pairs, matched), **self._float16_range(halves), **_loss(loss))
        if values is None:
            return
        now = self._step_sizes()  # for groups added between the two half-steps
        lrs = [now[i] if g["half_step_lr"] is None else g["half_step_lr"] for i, g in enumerate(self.param_groups)]
        if matched:  # the sums the first half-step read are the ones the gain needs
            avg_dots = [_or_zero(g["first_half_avg_dot"]) for g in self.param_groups]
            sqnorms = [_or_zero(g["first_half_sqnorm"]) for g in self.param_groups]
        else:
            avg_dots, sqnorms = values["paired_avg_dots"], values["paired_sqnorms"]
        curvature, gain = self._next_gain(lrs, avg_dots, sqnorms, values["cross_dots"])
        if not self._second_fits(halves, lrs, sqnorms, values, curvature, gain):
            return
        self._second_halves(halves, pairs, lrs)
        for state in kept.values():
            state[FIRST_GRAD_PENDING] = False
        for group in self.param_groups:
            group.update(dict.fromkeys(PENDING))
        self._end_iteration(lrs, curvature, gain)

    def _same_batch_step(self, closure: LossClosure, loss: Tensor | float | None) -> Any:
        """``same_batch=True``: both half-steps on the closure's mini-batch, in one call.

        The first half-step is taken before anything is read from the device; the one gate at the
        end checks both gradients (and losses), and a skipped step puts the saved ``x_k`` back.
        ``capturable``: the same with every decision on the device (:meth:`_device_same_batch_step`).
        """
        if not self._capturable:
            self._host_state()
        phase = self._shared("phase")
        if not isinstance(phase, Tensor) and phase != 0:  # a device-held phase is not read
            raise RuntimeError(
                f"{type(self).__name__}(same_batch=True) was given a state saved between the two half-steps of "
                "a same_batch=False run; finish that iteration with same_batch=False first."
            )
        if self._capturable:
            return self._device_same_batch_step(closure, loss)
        self._ensure_compiler()
        first_loss, losses, firsts, first_grads = self._same_batch_first(closure, loss)
        if not any(h.params for h in firsts):
            return first_loss
        first_sums = self._first_half_sums([h.params for h in firsts], first_grads)
        saved = [clone(h.params, foreach=h.group["foreach"]) for h in firsts]
        lrs = self._step_sizes()
        for half, grads, lr in zip(firsts, first_grads, lrs):
            _first_half_step(half.params, grads, lr, foreach=half.group["foreach"])

        halves, pairs, matched = self._same_batch_second(closure, losses, firsts, first_grads)
        values = self._gate(
            **losses, **first_sums, **self._pair_sums(halves, pairs, matched), **self._float16_range(halves)
        )
        if values is not None:
            if matched:
                avg_dots, sqnorms = values["avg_dots"], values["sqnorms"]
            else:
                avg_dots, sqnorms = values["paired_avg_dots"], values["paired_sqnorms"]
            curvature, gain = self._next_gain(lrs, avg_dots, sqnorms, values["cross_dots"])
            if not self._first_fits(firsts, lrs, values["sqnorms"]):
                self._skip_step("outcome", ("first half-step",))
                values = None
            elif not self._second_fits(halves, lrs, sqnorms, values, curvature, gain):
                values = None
        if values is None:  # skipped: x_k back
            for half, x_k in zip(firsts, saved):
                copy_(half.params, x_k, foreach=half.group["foreach"])
            return first_loss
        self._second_halves(halves, pairs, lrs)
        self._end_iteration(lrs, curvature, gain)
        return first_loss

    def _same_batch_first(
        self, closure: LossClosure, loss: Tensor | float | None
    ) -> tuple[Any, dict[str, Tensor], list[_Half], list[list[Tensor]]]:
        """The first closure call of a ``same_batch`` step: its return value, the gate's loss
        (averaged across ranks), the gathered halves and ``g_a``, kept past the second call."""
        with torch.enable_grad():
            first_loss = closure()
        value, reduced = self._resolve_loss(loss, first_loss)
        losses = {} if value is None else {"loss": self._loss_tensor(value, reduced, self._device())}
        firsts = self._gather()
        # g_a must outlive the second closure call, which overwrites `.grad`; with weight decay the
        # effective gradients are new tensors already.
        first_grads = [
            h.grads if h.group["weight_decay"] != 0 else clone(h.grads, foreach=h.group["foreach"]) for h in firsts
        ]
        return first_loss, losses, firsts, first_grads

    def _same_batch_second(
        self, closure: LossClosure, losses: dict[str, Tensor], firsts: list[_Half], first_grads: list[list[Tensor]]
    ) -> tuple[list[_Half], list[_Pairs], bool]:
        """The second closure call of a ``same_batch`` step (its loss added to ``losses``): the
        gathered halves, their pairs with ``g_a`` and whether every parameter has both gradients."""
        with torch.enable_grad():
            second_loss = closure()
        if second_loss is not None:
            losses["second_loss"] = self._loss_tensor(second_loss, False, self._device())
        halves = self._gather()
        first_of = {_key(p): g for h, grads in zip(firsts, first_grads) for p, g in zip(h.params, grads)}
        pairs = [_pairs(h, first_of) for h in halves]
        matched = [_key(p) for h in halves for p in h.params] == list(first_of)
        return halves, pairs, matched

    # ------------------------------------------------------------------ the device-side step (capturable)

    def _device_same_batch_step(self, closure: LossClosure, loss: Tensor | float | None) -> Any:
        """``capturable`` and ``same_batch``: :meth:`_same_batch_step` with every decision on the device.

        The first half-step is taken, as there, before anything is known; the gate over both
        gradients and losses, the outcome checks and the gain are then 0-d device tensors, and the
        second half-step, the average of ``g_a − g_b`` and the numbers (:meth:`_device_bookkeeping`,
        a second half whose first was this call's) are written ``where`` the iteration is taken;
        elsewhere every parameter gets its saved ``x_k`` back and the state keeps its bits.
        """
        first_loss, losses, firsts, first_grads = self._same_batch_first(closure, loss)
        if not any(h.params for h in firsts):
            return first_loss
        device = self._device()
        self._device_group_state(device)
        self._device_pending_state(firsts, device)
        first_sums = self._first_half_sums([h.params for h in firsts], first_grads)
        saved = {_key(p): (p, x) for h in firsts for p, x in zip(h.params, clone(h.params, foreach=h.group["foreach"]))}
        lrs = self._step_sizes()
        for half, grads, lr in zip(firsts, first_grads, lrs):
            for p, g in zip(half.params, grads):
                p.copy_(_descended(p, g, lr))

        halves, pairs, matched = self._same_batch_second(closure, losses, firsts, first_grads)
        self._device_pending_state(halves, device)
        values, finite = self._device_gate(
            OUTCOMES, **losses, **first_sums, **self._pair_sums(halves, pairs, matched), **self._float16_range(halves)
        )
        prefix = "" if matched else "paired_"
        avg_dots, sqnorms = values[prefix + "avg_dots"], values[prefix + "sqnorms"]
        options = self.param_groups[0]
        curvature, dx_sqnorm = step_tuned_curvature(
            lrs, avg_dots, sqnorms, values["cross_dots"], beta=options["beta"], iteration=self._iteration()
        )
        gain = step_tuned_gain(curvature, dx_sqnorm, nu=options["nu"], bounds=options["gain_bounds"])
        gain_finite = torch.isfinite(curvature) & torch.isfinite(dx_sqnorm)
        second_fits: bool | Tensor = True
        if "float16_range" in values:
            second_fits = self._float16_fits(halves, lrs, sqnorms, values["float16_range"])
        first_fits = _as_flag(self._first_fits(firsts, lrs, values["sqnorms"]), device)
        ok = self._device_outcome(  # in the order of the default step's checks (OUTCOMES)
            finite, ~first_fits, first_fits & ~gain_finite, first_fits & gain_finite & ~_as_flag(second_fits, device)
        )

        weight = 1.0 - options["beta"]
        for half, pair, lr in zip(halves, pairs, lrs):
            for p, g_b, g_a in zip(pair.params, pair.second, pair.first):
                avg = self.state[p][DIFF_AVG]
                avg.copy_(torch.where(ok, torch.lerp(avg, g_a - g_b, weight), avg))
            for p, g in zip(half.params, half.grads):
                x_k = saved.pop(_key(p), (p, p))[1]  # a parameter without g_a is still at x_k
                p.copy_(torch.where(ok, _descended(p, g, lr), x_k))
        for p, x_k in saved.values():  # g_a only: the first half-step is kept where the step is
            p.copy_(torch.where(ok, p, x_k))
        not_first = torch.zeros((), dtype=torch.bool, device=device)  # a fill kernel: nothing copied
        self._device_bookkeeping(values, lrs, lrs, curvature, gain, not_first, ok)
        return first_loss

    def _device_half(self, loss: Tensor | None) -> None:
        """``capturable``: the half-step ``phase`` says, with every decision on the device (no host read).

        A skipped half-step is taken again at the next call, so ``phase`` is a device value: both
        halves' sums are taken (:meth:`_device_sums`) and the gate reads the ones of the half due;
        the state, the parameters and the numbers are replaced ``where`` that half is taken.
        """
        halves = self._gather()
        if not any(h.params for h in halves):
            return
        device = self._device()
        self._device_group_state(device)
        self._device_pending_state(halves, device)
        first = self._shared("phase") == 0
        values, finite = self._device_gate(OUTCOMES, **self._device_sums(halves, first), **_loss(loss))
        now = self._step_sizes()
        kept = [where(torch.isinf(g["half_step_lr"]), lr, g["half_step_lr"]) for g, lr in zip(self.param_groups, now)]
        paired = (values["paired_avg_dots"], values["paired_sqnorms"], values["cross_dots"])
        curvature, dx_sqnorm = step_tuned_curvature(
            kept, *paired, beta=self.param_groups[0]["beta"], iteration=self._iteration()
        )
        options = self.param_groups[0]
        gain = step_tuned_gain(curvature, dx_sqnorm, nu=options["nu"], bounds=options["gain_bounds"])
        second_fits = True
        if "float16_range" in values:
            second_fits = self._float16_fits(halves, kept, values["paired_sqnorms"], values["float16_range"])
        gain_finite = torch.isfinite(curvature) & torch.isfinite(dx_sqnorm)
        ok = self._device_outcome(  # in the order of the default step's checks (OUTCOMES)
            finite,
            first & ~_as_flag(self._first_fits(halves, now, values["sqnorms"]), device),
            ~first & ~gain_finite,
            ~first & gain_finite & ~_as_flag(second_fits, device),
        )
        rates = [torch.where(first, lr, lr_kept) for lr, lr_kept in zip(now, kept)]
        self._device_move(halves, rates, first, ok)
        self._device_bookkeeping(values, now, rates, curvature, gain, first, ok)

    def _device_sums(self, halves: list[_Half], first: Tensor) -> dict[str, Tensor]:
        """The gate's values of the half-step ``first`` says (the other half's are 0).

        First half: per group ``⟨D, g⟩`` and ``‖g‖²``, as :meth:`_first_half_sums`.  Second half: per
        group, over the parameters whose ``first_grad`` is pending, ``⟨g, g_a⟩``, ``⟨D, g_a⟩`` and
        ``‖g_a‖²`` (the first half's sums again: the same numbers when every parameter took both
        halves), and ``‖g‖²`` over the others; the float16 gradients' range where there are some.
        """
        device = self._device()
        firsts, seconds = {"avg_dots": [], "sqnorms": []}, {"cross_dots": [], "paired_avg_dots": [], "paired_sqnorms": []}
        alone = []
        for half in halves:
            states = [self.state[p] for p in half.params]
            avgs, kept = [s[DIFF_AVG] for s in states], [s[FIRST_GRAD] for s in states]
            pending = _flags([s[FIRST_GRAD_PENDING] for s in states], device)
            squares = tensor_dots(half.grads, half.grads, device)
            firsts["avg_dots"].append(dot(avgs, half.grads, device))
            firsts["sqnorms"].append(squares.sum())
            seconds["cross_dots"].append(_masked_sum(tensor_dots(half.grads, kept, device), pending))
            seconds["paired_avg_dots"].append(_masked_sum(tensor_dots(avgs, kept, device), pending))
            seconds["paired_sqnorms"].append(_masked_sum(tensor_dots(kept, kept, device), pending))
            alone.append(_masked_sum(squares, ~pending))
        sums = {name: torch.where(first, torch.stack(parts), 0.0) for name, parts in firsts.items()}
        sums.update((name, torch.where(first, 0.0, torch.stack(parts))) for name, parts in seconds.items())
        sums["unpaired_sqnorm"] = torch.where(first, 0.0, torch.stack(alone).sum())
        sums.update((name, torch.where(first, 0.0, value)) for name, value in self._float16_range(halves).items())
        return sums

    def _device_move(self, halves: list[_Half], rates: list[Tensor], first: Tensor, ok: Tensor) -> None:
        """Where ``ok``: ``x ← x − η·g``; a first half keeps ``g`` as ``g_a`` and marks it pending; a
        second half updates ``D`` from the pending ``g_a − g`` (left in ``first_grad``, as scratch) and
        clears every pending mark.  Elsewhere every tensor keeps its bits."""
        weight = 1.0 - self.param_groups[0]["beta"]
        taken_first, taken_second = ok & first, ok & ~first
        current = set()
        for half, rate in zip(halves, rates):
            for p, g in zip(half.params, half.grads):
                state = self.state[p]
                kept, avg, pending = state[FIRST_GRAD], state[DIFF_AVG], state[FIRST_GRAD_PENDING]
                difference = kept - g
                paired = taken_second & pending
                avg.copy_(torch.where(paired, torch.lerp(avg, difference, weight), avg))
                kept.copy_(torch.where(taken_first, g, torch.where(paired, difference, kept)))
                pending.copy_(torch.where(ok, first, pending))
                p.copy_(torch.where(ok, _descended(p, g, rate), p))
                current.add(_key(p))
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in current and p in self.state and FIRST_GRAD_PENDING in self.state[p]:
                    pending = self.state[p][FIRST_GRAD_PENDING]
                    pending.copy_(pending & ~taken_second)

    def _device_bookkeeping(
        self,
        values: dict[str, Tensor],
        now: list[Tensor],
        rates: list[Tensor],
        curvature: Tensor,
        gain: Tensor,
        first: Tensor,
        ok: Tensor,
    ) -> None:
        """The numbers after the half-step, kept where it is skipped: a first half stores its ``η_k``
        and sums in the groups and sets ``phase``; a second half sets ``γ``, ``k`` and ``phase`` back
        (the groups' pending values become +inf, "none"); the records; the step and skip counts.  A
        ``same_batch`` step is a second half (``first`` false) after the first of the same call."""
        taken_second = ok & ~first
        gamma = torch.where(taken_second, gain, self._shared("gamma"))
        for i, (group, lr, rate) in enumerate(zip(self.param_groups, now, rates)):
            pending = (lr, values["avg_dots"][i], values["sqnorms"][i])
            for key, value in zip(PENDING, pending):
                self._record_on_device(group, **{key: torch.where(ok, torch.where(first, value, math.inf), group[key])})
            self._record_on_device(
                group,
                effective_lr=torch.where(ok, rate, group["effective_lr"]),
                gain=torch.where(ok, gamma, group["gain"]),
                curvature=torch.where(taken_second, curvature, group["curvature"]),
            )
        phase = self._shared("phase")
        self._set_shared_on_device(
            gamma=gamma,
            iteration=self._shared("iteration") + taken_second.to(torch.int64),
            phase=torch.where(ok, first.to(phase.dtype), phase),  # 1 after a first half, 0 after a second
        )
        self._count_device_step(ok)

    def _device_pending_state(self, halves: list[_Half], device: torch.device) -> None:
        """``capturable``: every parameter with a gradient has its state (zeros, nothing pending, from
        its first step on, skipped or not), the pending marks are 0-d bool tensors on ``device``, and the
        groups' pending values and records 0-d tensors (a pending value +inf: none; no records yet:
        ``η`` 0, the gain ``γ``, the curvature NaN).  Done where they are not yet (the first step, a
        state dict saved by the default step)."""
        for half in halves:
            for p in half.params:
                self._diff_avg(p)
                if not half.group["same_batch"]:  # the same_batch state is the average alone
                    self.state[p].setdefault(FIRST_GRAD, torch.zeros_like(p, memory_format=torch.preserve_format))
        missing = {**dict.fromkeys(PENDING, math.inf), "effective_lr": 0.0, "gain": None, "curvature": math.nan}
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state is not None and DIFF_AVG in state and not group["same_batch"]:
                    state[FIRST_GRAD_PENDING] = _as_flag(state.get(FIRST_GRAD_PENDING, False), device)
            for key, none in missing.items():
                value = group.get(key)
                value = self._shared("gamma").clone() if value is None and none is None else value  # not γ itself
                group[key] = _as_number(none if value is None else value, device)

    def _host_state(self) -> None:
        """The default step after a ``capturable`` one (a state dict it saved): the numbers it keeps as
        device tensors back to Python numbers (+inf pending values: ``None``; marks: bools)."""
        if not isinstance(self._shared("step"), Tensor):
            return
        self._host_group_state()
        for group in self.param_groups:
            for key in (*PENDING, "effective_lr", "gain", "curvature"):
                value = group.get(key)
                if isinstance(value, Tensor):
                    number = value.item()
                    group[key] = None if key in PENDING and number == math.inf else number
            for p in group["params"]:
                state = self.state.get(p)
                if state is not None and isinstance(state.get(FIRST_GRAD_PENDING), Tensor):
                    state[FIRST_GRAD_PENDING] = bool(state[FIRST_GRAD_PENDING])

    # ------------------------------------------------------------------ pieces shared by both modes

    def _step_sizes(self) -> list[Scalar]:
        """``η_k`` for every param group (:func:`step_tuned_step_size`; 0-d tensors when ``capturable``)."""
        gamma, k, delta = self._shared("gamma"), self._iteration(), self.param_groups[0]["delta"]
        return [step_tuned_step_size(group["lr"], gamma, k, delta) for group in self.param_groups]

    def _iteration(self) -> Scalar:
        """``k``: an int, or (``capturable``) a 0-d tensor in the dtype of ``γ``, for the float rules."""
        k = self._shared("iteration")
        return k.to(self._shared("gamma").dtype) if isinstance(k, Tensor) else k

    def _gather(self) -> list[_Half]:
        """Every group's parameters that have a gradient, with their effective gradients."""
        halves = []
        for group in self.param_groups:
            params, grads = self._params_and_grads(group)
            halves.append(_Half(group, params, with_l2(params, grads, group["weight_decay"], foreach=group["foreach"])))
        return halves

    def _first_half_sums(self, params: list[list[Tensor]], firsts: list[list[Tensor]]) -> dict[str, Tensor]:
        """Per group ``⟨D, g_a⟩`` and ``‖g_a‖²`` (the latter is also ``g_a``'s finiteness check)."""
        sums = [self._curvature_sums(ps, gs) for ps, gs in zip(params, firsts)]
        return {"avg_dots": torch.stack([a for a, _ in sums]), "sqnorms": torch.stack([q for _, q in sums])}

    def _curvature_sums(self, params: list[Tensor], firsts: list[Tensor]) -> tuple[Tensor, Tensor]:
        """``⟨D, g_a⟩`` (a parameter without ``D`` yet counts 0: ``G_0 = 0``) and ``‖g_a‖²``."""
        device = self._device()
        avgs, grads = [], []
        for p, g in zip(params, firsts):
            state = self.state.get(p)
            if state is not None and DIFF_AVG in state:
                avgs.append(state[DIFF_AVG])
                grads.append(g)
        return dot(avgs, grads, device), sqnorm(firsts, device)

    def _pair_sums(self, halves: list[_Half], pairs: list[_Pairs], matched: bool) -> dict[str, Tensor]:
        """What the gate of a second half-step reads.

        Per group ``⟨g_b, g_a⟩`` over the parameters with both gradients: a non-finite entry of
        ``g_b`` makes it non-finite (``±inf`` or ``inf·0 = NaN``), so it is also the finiteness check.
        When the parameters with a gradient changed between the two half-steps, the first half's
        sums are recomputed over the parameters with both gradients, and the gradients of the others
        are checked by their squared norm.
        """
        device = self._device()
        sums = {"cross_dots": torch.stack([dot(pair.second, pair.first, device) for pair in pairs])}
        if not matched:
            paired = self._first_half_sums([pair.params for pair in pairs], [pair.first for pair in pairs])
            paired_ids = {_key(p) for pair in pairs for p in pair.params}
            alone = [g for h in halves for p, g in zip(h.params, h.grads) if _key(p) not in paired_ids]
            sums.update(
                paired_avg_dots=paired["avg_dots"],
                paired_sqnorms=paired["sqnorms"],
                unpaired_sqnorm=sqnorm(alone, device),
            )
        return sums

    def _pending_first_grads(self) -> dict[int, dict[str, Any]]:
        """``_key(p) → state[p]`` for the parameters that took the pending first half-step."""
        return {
            id(p): self.state[p]
            for group in self.param_groups
            for p in group["params"]
            if p in self.state and self.state[p].get(FIRST_GRAD_PENDING)
        }

    def _diff_avg(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if DIFF_AVG not in state:
            state[DIFF_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state[DIFF_AVG]

    def _create_state(self) -> None:
        """The full state at its starting values, no step taken, and the records (distributed checkpoints);
        ``capturable``: with the numbers as the device tensors its steps write."""
        self._record_all([0.0] * len(self.param_groups), self.param_groups[0].get("curvature", math.nan))
        for group in self.param_groups:
            for p in self._params_and_grads(group)[0]:  # real views of complex parameters
                self._diff_avg(p)
                if not group["same_batch"]:
                    self.state[p][FIRST_GRAD] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p][FIRST_GRAD_PENDING] = False
        if self._capturable:
            device = self._device()
            self._device_group_state(device)
            self._device_pending_state(self._gather(), device)

    def _keep_first_grads(self, half: _Half) -> list[Tensor | None]:
        """``state[p]["first_grad"] = g_a``: reuse the buffer (a new tensor with weight decay is kept as is).

        Returns, per parameter of ``half``, the buffer that ``g_a`` is still to be copied into, or
        ``None`` where ``g_a`` (or a copy of it) is already stored.
        """
        fresh = half.group["weight_decay"] != 0  # the effective gradients are new tensors
        buffers: list[Tensor | None] = []
        for p, g in zip(half.params, half.grads):
            self._diff_avg(p)
            state = self.state[p]
            kept = state.get(FIRST_GRAD)
            if fresh:
                state[FIRST_GRAD] = g
                buffers.append(None)
            elif kept is None or kept.shape != g.shape:
                state[FIRST_GRAD] = g.clone()
                buffers.append(None)
            else:
                buffers.append(kept)
            state[FIRST_GRAD_PENDING] = True
        return buffers

    def _second_halves(self, halves: list[_Half], pairs: list[_Pairs], lrs: list[float]) -> None:
        beta = self.param_groups[0]["beta"]
        for half, pair, lr in zip(halves, pairs, lrs):
            diff_avgs = [self._diff_avg(p) for p in pair.params]
            if half.group["compiled"] and pair.params:  # one loop per tensor (optim/_sgd_compiled.py)
                paired = {id(p) for p in pair.params}  # `pair.params` are among `half.params`, in order
                alone = [i for i, p in enumerate(half.params) if id(p) not in paired]
                columns = (pair.params, pair.second, pair.first, diff_avgs)
                run_with_table(self._name, difference_average_step, columns, [(lr, 1.0 - beta)] * len(diff_avgs))
                # a parameter without g_a this iteration takes the plain step x ← x − η·g_b
                _first_half_step(_split(half.params, alone), _split(half.grads, alone), lr, foreach=half.group["foreach"])
                continue
            _second_half_step(
                half.params, half.grads, lr, diff_avgs, pair.first, pair.second, beta, foreach=half.group["foreach"]
            )

    def _ensure_compiler(self) -> None:
        """With ``compiled=True``: fail with a clear error, before any state changes, when Inductor cannot compile."""
        if any(group["compiled"] for group in self.param_groups if group["params"]):
            ensure_inductor_works(self._name, self._device())

    def _next_gain(
        self, lrs: list[float], avg_dots: Sequence[float], sqnorms: Sequence[float], cross_dots: Sequence[float]
    ) -> tuple[float, float]:
        """``(⟨Ĝ, Δx⟩, γ_{k+1})`` from the gated sums (:func:`step_tuned_curvature`, :func:`step_tuned_gain`).

        Non-finite (NaN) when ``‖Δx‖²`` or ``⟨Ĝ, Δx⟩`` overflow the host's float64.
        """
        options = self.param_groups[0]
        curvature, dx_sqnorm = step_tuned_curvature(
            lrs, avg_dots, sqnorms, cross_dots, beta=options["beta"], iteration=self._shared("iteration")
        )
        if not (math.isfinite(curvature) and math.isfinite(dx_sqnorm)):
            return curvature, math.nan
        return curvature, step_tuned_gain(curvature, dx_sqnorm, nu=options["nu"], bounds=options["gain_bounds"])

    def _float16_range(self, halves: list[_Half]) -> dict[str, Tensor]:
        """The gate's ``float16_range`` entry: the least and largest entry of the float16 gradients.

        Only float16 gradients are read (one extra pass over them): elsewhere an entry of ``g_b``
        large enough to overflow a half-step is of the order of the dtype's largest number.
        """
        grads = [g for h in halves for g in h.grads if g.dtype == torch.float16]
        return {"float16_range": torch.stack(tensor_extrema(grads, self._device()))} if grads else {}

    def _first_fits(self, halves: list[_Half], lrs: Sequence[Scalar], sqnorms: Sequence[Scalar]) -> bool | Tensor:
        """Whether every group's first half-step fits its dtypes (:func:`step_tuned_fits`, ``|g_a| ≤ ‖g_a‖``)."""
        return _every(
            [step_tuned_fits(lr, [_sqrt(q)], _largest(h.params)) for h, lr, q in zip(halves, lrs, sqnorms) if h.params]
        )

    def _float16_fits(
        self, halves: list[_Half], lrs: Sequence[Scalar], sqnorms: Sequence[Scalar], extrema: Sequence[Scalar]
    ) -> bool | Tensor:
        """Whether each group with float16 parameters fits its second half-step (:func:`step_tuned_fits`,
        ``|g_a| ≤ ‖g_a‖``, ``|g_b|`` bounded by the float16 gradients' ``extrema``)."""
        low, high = extrema
        bound = smax(-low, high)
        return _every(
            [
                step_tuned_fits(lr, [_sqrt(q), bound], _largest(h.params))
                for h, lr, q in zip(halves, lrs, sqnorms)
                if any(p.dtype == torch.float16 for p in h.params)
            ]
        )

    def _second_fits(
        self,
        halves: list[_Half],
        lrs: list[float],
        sqnorms: Sequence[float],
        values: dict[str, Any],
        curvature: float,
        gain: float,
    ) -> bool:
        """Whether the second half-step's outcome is finite; records the skip if not.

        The gain and the curvature must be finite floats, and, where the float16 gradients' range was
        read, each group's second half-step must fit (:func:`step_tuned_fits`, ``|g_a| ≤ ‖g_a‖``).
        """
        if not (math.isfinite(curvature) and math.isfinite(gain)):
            self._skip_step("outcome", ("curvature", "gain"))
            return False
        if "float16_range" in values and not self._float16_fits(halves, lrs, sqnorms, values["float16_range"]):
            self._skip_step("outcome", ("second half-step",))
            return False
        return True

    def _end_iteration(self, lrs: list[float], curvature: float, gain: float) -> None:
        """``γ_{k+1}`` (:meth:`_next_gain`), then ``k ← k+1``."""
        k = self._shared("iteration")
        self._set_shared(gamma=gain, iteration=k + 1, phase=0, step=self._shared("step") + 1)
        self._record_all(lrs, curvature)

    def _record_all(self, lrs: list[float], curvature: float) -> None:
        gain = self._shared("gamma")
        for group, lr in zip(self.param_groups, lrs):
            self._record(group, effective_lr=lr, gain=gain, curvature=curvature)

    # ------------------------------------------------------------------ release-0.1 state dicts

    def _legacy_group_state(self, legacy: dict[str, Any]) -> dict[str, Any]:
        """Release 0.1's ``state["global"]``: ``gain`` is now ``gamma``; the pending values go per group."""
        shared = copy.deepcopy(self.group_state)
        shared.update((key, legacy[key]) for key in ("step", "skipped_steps", "iteration", "phase") if key in legacy)
        shared["gamma"] = legacy.get("gain", 1.0)
        return shared

    def _convert_legacy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Also move a pending first half-step: per group its ``η_k`` and sums, per parameter its flag."""
        legacy = state_dict.get("state", {}).get(LEGACY_GLOBAL)
        converted = super()._convert_legacy(state_dict)
        for group in converted["param_groups"]:  # saved before `momentum` mirrored `beta`
            if "beta" in group:
                group.setdefault("momentum", group["beta"])
        if legacy is None:
            return converted
        pending = legacy.get("phase", 0) == 1 and "half_step_lrs" in legacy
        members = set(legacy.get("first_half_members", ())) if pending else set()
        state = {
            key: {**value, FIRST_GRAD_PENDING: key in members} if FIRST_GRAD in value else value
            for key, value in converted["state"].items()
        }
        groups = []
        for i, group in enumerate(converted["param_groups"]):
            values = dict.fromkeys(PENDING)
            if pending and i < len(legacy["half_step_lrs"]):
                values.update(
                    half_step_lr=legacy["half_step_lrs"][i],
                    first_half_avg_dot=legacy["first_half_avg_dots"][i],
                    first_half_sqnorm=legacy["first_half_sqnorms"][i],
                )
            groups.append({**group, **values})
        return {**converted, "state": state, "param_groups": groups}
