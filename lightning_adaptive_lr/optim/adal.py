r"""AdaL: Adam on a transformed gradient that is amplified early in training and shrunk later.

Zhang et al., "AdaL: Adaptive Gradient Transformation Contributes to Convergences and
Generalizations", 2021 (docs/algorithms.md §4).  The idea is the paper's (abstract verified); the
update is **reconstructed from a secondary source**, because the paper's full text could not be
read.  The choices that reading leaves open are options, documented on :class:`AdaL`.

With ``s`` the scale of the transform (``‖g‖₁`` by default) the step is::

    ĝ = s·g
    m ← β1·m + (1 − β1)·ĝ          v ← β2·v + (1 − β2)·ĝ²
    x ← x − η_k · m̂ · (1/√v̂ + eps)            (eps_mode="preconditioner", the source's form)
    x ← x − η_k · m̂ / (√v̂ + eps)              (eps_mode="denominator", Adam's form)

The base direction is Adam's (:mod:`._directions`); what is AdaL's own is the scale ``s`` and the
per-tensor scalars it turns into (:func:`adal_scalars`, on floats).  Whether a step's outcome fits
the parameters' dtype is judged on those floats too (:func:`adal_step_fits`), before anything moves.
With ``capturable=True`` the same two functions run on device tensors, one entry per tensor, and
the step reads nothing to the host (:meth:`AdaL._device_update`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._base import (
    BETAS,
    DEFAULT_MAX_CONSECUTIVE_SKIPS,
    FLAG,
    NONNEGATIVE,
    AdaptiveOptimizer,
    checked,
    one_of,
    runtime_options,
)
from ._directions import (
    adam_denominators,
    adam_moments_,
    adam_preconditioners,
    adam_step_,
    rsqrt_cap,
)
from ._adal_compiled import adal_update, run_adal_update
from ._compiled import ensure_inductor_works, run_compiled
from ._reduce import accumulation_dtype, l1_norms, tensor_extrema, work_dtype
from ._scalars import Scalar, safe_div, smax, smin, where
from ._tensorlists import multiply_

__all__ = ["AdaL", "AdaLScalars", "adal_rate", "adal_scalars", "adal_step_fits"]

TRANSFORMS = ("l1", "tensor_l1", "none")
EPS_MODES = ("preconditioner", "denominator")
LR_DECAYS = ("none", "inv_sqrt")

#: One param group with its parameters that have a gradient, and those gradients.
Group = tuple[dict[str, Any], list[Tensor], list[Tensor]]
#: The per-parameter scalars of the state (numbers; 0-d device tensors once a ``capturable`` step ran).
SCALAR_STATE = ("step", "scale_avg", "scale_sq_avg")
#: What a skipped step's outcome check names (the host path's ``_skip_step("outcome", ...)`` alike).
OUTCOME = "step size"


# --------------------------------------------------------------------------- the scalar rule


def _sqrt(value: Scalar) -> Scalar:
    """``√value`` of a number (``math.sqrt``) or of a tensor (``torch.sqrt``)."""
    return torch.sqrt(value) if isinstance(value, Tensor) else math.sqrt(value)


def _finite(*values: Scalar) -> bool | Tensor:
    """Whether every value is finite: a bool for numbers, a bool tensor where one is a tensor."""
    result: bool | Tensor = True
    for value in values:
        result = result & (torch.isfinite(value) if isinstance(value, Tensor) else math.isfinite(value))
    return result


def adal_rate(lr: float, step: Scalar, lr_decay: str) -> Scalar:
    """``η_k``: ``lr`` (``lr_decay="none"``) or ``lr/√k`` (``"inv_sqrt"``, the source's schedule).

    ``step`` is a number or (``capturable``) a 0-d float tensor.

    >>> adal_rate(0.1, 4, "inv_sqrt")
    0.05
    """
    return lr / _sqrt(step) if lr_decay == "inv_sqrt" else lr


@dataclass(frozen=True)
class AdaLScalars:
    """One tensor's scalars for one step (see :func:`adal_scalars`): numbers, or (``capturable``)
    tensors holding one entry per tensor of a bucket."""

    #: Λ1 and Λ2 after this step: the moving averages of ``s`` and ``s²``.
    scale_avg: Scalar
    scale_sq_avg: Scalar
    #: the weights of the moment updates ``m̃ ← lerp(m̃, g, w1)``, ``ṽ ← (1 − w2)·ṽ + w2·g²``.
    avg_weight: Scalar
    sq_weight: Scalar
    #: whether the tensor moves (Λ2 > 0: its ĝ has not been exactly 0 at every step so far).
    moves: bool | Tensor
    #: the signed coefficient of ``m̃`` in the step (0 when the tensor does not move).
    step_size: Scalar
    #: what is added to ``√ṽ`` (eps in the denominator) or to ``1/√ṽ`` (eps in the preconditioner).
    shift: Scalar


def adal_scalars(
    scale: Scalar,
    scale_avg: Scalar,
    scale_sq_avg: Scalar,
    step: Scalar,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    eps_in_denominator: bool,
    floor: float,
) -> AdaLScalars:
    r"""One tensor's step, as scalars: the averages Λ1, Λ2, the moment weights, the step coefficient and eps term.

    The averages of ĝ = s·g are kept factored, ``m = Λ1·m̃`` and ``v = Λ2·ṽ`` (docs/algorithms.md
    §4.3): Λ1 ← β1·Λ1 + (1 − β1)·s and Λ2 ← β2·Λ2 + (1 − β2)·s² are floats, and m̃, ṽ move toward
    g, g² by ``w1 = (1 − β1)·s/Λ1`` and ``w2 = (1 − β2)·s²/Λ2``.  With ``σ = √(Λ2/(1 − β2^k))``
    (so that √v̂ = σ·√ṽ) and ``m̂ = Λ1/(1 − β1^k)·m̃`` the step is::

        x += c·m̃ / (√ṽ + e)     c = −lr·Λ1/((1 − β1^k)·σ),   e = max(eps/σ, floor)   (denominator)
        x += c·m̃ · (1/√ṽ + e)   c as above,                  e = eps·σ               (preconditioner)

    Written for numbers and, with every branch a :func:`~._scalars.where`, for tensors (one entry per
    tensor: the ``capturable`` step), which give the same values elementwise.

    Args:
        scale: this step's ``s``.
        scale_avg, scale_sq_avg: Λ1 and Λ2 before this step (0 for a new tensor).
        step: ``k``, the tensor's own step count, this step included (a float tensor on the device).
        lr: ``η_k``.
        betas: ``(β1, β2)``.
        eps: the user's ``eps``.
        eps_in_denominator: Adam's placement (only when ``eps > 0``; with ``eps = 0`` both forms
            are the capped ``1/√ṽ``).
        floor: the least ``eps/σ`` may be, so that it does not round to 0 in the tensor's dtype
            when σ is huge: ``1/rsqrt_cap(dtype)``, that is √(smallest normal number).

    >>> r = adal_scalars(4.0, 0.0, 0.0, 1, lr=1.0, betas=(0.9, 0.999), eps=0.01,
    ...                  eps_in_denominator=False, floor=0.0)
    >>> round(r.avg_weight, 12), round(r.step_size, 12), round(r.shift, 12)
    (1.0, -1.0, 0.04)
    """
    beta1, beta2 = betas
    scale_avg = beta1 * scale_avg + (1.0 - beta1) * scale
    scale_sq_avg = beta2 * scale_sq_avg + (1.0 - beta2) * scale * scale
    avg_weight = safe_div((1.0 - beta1) * scale, scale_avg)
    sq_weight = safe_div((1.0 - beta2) * scale * scale, scale_sq_avg)
    sigma = _sqrt(scale_sq_avg / (1.0 - beta2**step))
    moves = sigma > 0  # (1 − β1^k)·σ > 0 too: the step size is 0 exactly where the tensor does not move
    step_size = safe_div(-lr * scale_avg, (1.0 - beta1**step) * sigma)
    shift = smax(safe_div(eps, sigma), floor) if eps_in_denominator else eps * sigma
    return AdaLScalars(scale_avg, scale_sq_avg, avg_weight, sq_weight, moves, step_size, where(moves, shift, 0.0))


def adal_step_fits(
    rule: AdaLScalars,
    grad_bound: Scalar,
    *,
    betas: tuple[float, float],
    eps_in_denominator: bool,
    largest: float,
    largest_work: float,
    cap: float,
) -> bool | Tensor:
    r"""Whether one tensor's step keeps its moments and the parameter finite, judged on its scalars.

    With ``F = largest`` (the dtype's largest number) every bound is kept below ``F/2``, so that a
    parameter within ``±F/2`` stays finite.  The step fits when

    * every number of ``rule`` is finite (``s²``, hence Λ2, overflows float64 for ``s > 1e154``);
    * ``grad_bound`` (a bound on ``|g|``) is at most ``R = √(F/2)``: ṽ, an average of ``g²``, then
      stays below ``F/2``, and ``|m̃| ≤ R``, since every step taken so far had ``|g| ≤ R``;
    * the step ``|c|·|m̃|·(min(1/√ṽ, cap) + e)`` is at most ``F/2``, and the preconditioner and
      the product before the scaling by ``c`` at most half of ``largest_work`` (for 16-bit
      parameters they are formed in float32, :mod:`._directions`).
      ``|m̃|·min(1/√ṽ, cap)`` is at most ``R·cap``, and, when ``β1² < β2``, at most
      ``√Λ2/Λ1 · (1 − β1)/√((1 − β2)(1 − β1²/β2))`` (Adam's bounded ratio, by Cauchy–Schwarz on
      the s-weighted averages); ``|m̃|·e ≤ R·e``; in the denominator form the ratio
      ``|m̃|/(√ṽ + e)`` is also at most ``R/e``.

    A bool for numbers; for the tensors of a ``capturable`` step (:func:`adal_scalars`) a bool
    tensor, one entry per tensor, with the same values: nothing is read to the host.

    Args:
        rule: the tensor's scalars for this step (:func:`adal_scalars`).
        grad_bound: a bound on the gradient's entries (``‖g‖₁``, or the exact ``max |g|``).
        betas: ``(β1, β2)`` of this step.
        eps_in_denominator: the form of ``rule.shift`` (as for :func:`adal_scalars`).
        largest: the parameter dtype's largest finite number.
        largest_work: the same for the dtype the products are formed in (float32 for 16-bit).
        cap: the cap on ``1/√ṽ`` (:func:`~._directions.rsqrt_cap` of the dtype).

    >>> r = adal_scalars(10.0, 0.0, 0.0, 1, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    ...                  eps_in_denominator=False, floor=0.0)
    >>> f32 = dict(betas=(0.9, 0.999), eps_in_denominator=False, cap=9.2e18, largest=3.4e38,
    ...            largest_work=3.4e38)
    >>> adal_step_fits(r, 1.0, **f32), adal_step_fits(r, 1e20, **f32)  # (1e20)² overflows float32
    (True, False)
    """
    finite = _finite(
        rule.scale_avg, rule.scale_sq_avg, rule.avg_weight, rule.sq_weight, rule.step_size, rule.shift
    )  # fmt: skip
    limit = largest / 2
    radius = math.sqrt(limit)
    ratio = radius * cap
    beta1, beta2 = betas
    if beta1 * beta1 < beta2:
        adam = (1.0 - beta1) / math.sqrt((1.0 - beta2) * (1.0 - beta1 * beta1 / beta2))
        bounded = smin(ratio, safe_div(_sqrt(rule.scale_sq_avg), rule.scale_avg) * adam)
        ratio = where(rule.scale_avg > 0, bounded, ratio)
    if eps_in_denominator:
        product, preconditioner_fits = smin(ratio, safe_div(radius, rule.shift)), True
    else:  # the preconditioner 1/√ṽ + e itself must fit too (float32 for 16-bit)
        product, preconditioner_fits = ratio + radius * rule.shift, rule.shift + cap <= largest_work / 2
    step_fits = preconditioner_fits & (product <= largest_work / 2) & (abs(rule.step_size) * product <= limit)
    return finite & (grad_bound <= radius) & where(rule.moves, step_fits, True)


@functools.cache
def _dtype_limits(dtype: torch.dtype) -> tuple[float, float, float]:
    """``(cap, largest, largest_work)`` of a parameter dtype, for :func:`adal_step_fits`."""
    return rsqrt_cap(dtype), torch.finfo(dtype).max, torch.finfo(work_dtype(dtype)).max


# --------------------------------------------------------------------------- the body


def _adal(
    params: list[Tensor],
    grads: list[Tensor],
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    scalars: Sequence[AdaLScalars],
    *,
    decay: float,
    eps_in_denominator: bool,
    foreach: bool,
) -> None:
    """Decoupled weight decay, the factored moments, then the step of the tensors that move.

    ``x ← decay·x``; ``m̃ ← lerp(m̃, g, w1)``, ``ṽ ← (1 − w2)·ṽ + w2·g²``; then
    ``x += c·m̃/(√ṽ + e)`` or ``x += c·m̃·(1/√ṽ + e)`` (``1/√ṽ`` capped at :func:`rsqrt_cap`).
    """
    if decay != 1.0:  # decoupled weight decay first, as AdamW
        multiply_(params, decay, foreach=foreach)
    weights1, weights2 = [s.avg_weight for s in scalars], [s.sq_weight for s in scalars]
    adam_moments_(avgs, sq_avgs, grads, weights1, weights2, foreach=foreach)
    moving = [i for i, s in enumerate(scalars) if s.moves]
    if not moving:
        return
    ps, ms, vs = ([xs[i] for i in moving] for xs in (params, avgs, sq_avgs))
    steps, shifts = [scalars[i].step_size for i in moving], [scalars[i].shift for i in moving]
    if eps_in_denominator:
        adam_step_(ps, ms, adam_denominators(vs, 1.0, shifts, foreach=foreach), steps, divide=True, foreach=foreach)
    else:
        adam_step_(ps, ms, adam_preconditioners(vs, 1.0, shifts, foreach=foreach), steps, divide=False, foreach=foreach)


def _device_adal_(
    params: list[Tensor],
    grads: list[Tensor],
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    rule: AdaLScalars,
    *,
    decay: Scalar,
    eps_in_denominator: bool,
    ok: Tensor,
) -> None:
    """:func:`_adal` with its scalars on the device (``capturable``): ``rule`` holds 1-d tensors, entry
    ``j`` for tensor ``j``, and each new moment and parameter is written back only where ``ok`` (a
    0-d bool), so a skipped step leaves every tensor bit for bit as it was.

    Tensor by tensor, in :func:`~._reduce.work_dtype` (16-bit tensors in float32, rounded once into
    their dtype); the moments are rounded into theirs before the step reads them, as the eager body
    reads them back.  A tensor that does not move keeps ``decay·x`` exactly (as :func:`_adal`).
    """
    keep = 1.0 - rule.sq_weight
    for j, (x, g, m, v) in enumerate(zip(params, grads, avgs, sq_avgs)):
        work = work_dtype(x.dtype)
        w1, w2, w2_keep, c, e = (t[j].to(work) for t in (rule.avg_weight, rule.sq_weight, keep, rule.step_size, rule.shift))
        g_w = g.to(work)
        m_new = torch.lerp(m.to(work), g_w, w1).to(m.dtype)
        v_new = torch.addcmul(v.to(work) * w2_keep, g_w, g_w * w2).to(v.dtype)
        if eps_in_denominator:
            u = m_new.to(work) / (v_new.to(work).sqrt() + e)
        else:
            u = m_new.to(work) * (torch.clamp(v_new.to(work).rsqrt(), max=rsqrt_cap(v.dtype)) + e)
        decayed = (x.to(work) * (decay.to(work) if isinstance(decay, Tensor) else decay)).to(x.dtype)
        x_new = torch.where(rule.moves[j], (decayed.to(work) + c * u).to(x.dtype), decayed)
        m.copy_(torch.where(ok, m_new, m))
        v.copy_(torch.where(ok, v_new, v))
        x.copy_(torch.where(ok, x_new, x))


def _device_table(rule: AdaLScalars, decay: Scalar) -> Tensor:
    """The compiled pass's ``(w1, w2, c, e, decay)`` rows (5 × tensors, float64) from a ``capturable``
    step's per-tensor vectors; a tensor that does not move takes ``c = 0`` and ``e = 1`` (its ``0·u``
    stays 0), as the host path's table (:meth:`AdaL._step_group`)."""
    moves = rule.moves
    step_size = torch.where(moves, rule.step_size, 0.0)
    shift = torch.where(moves, rule.shift, 1.0)
    rows = (rule.avg_weight, rule.sq_weight, step_size, shift, torch.zeros_like(step_size) + decay)
    return torch.stack(rows).to(torch.float64)


def _as_numbers(entry: dict[str, Any]) -> dict[str, Any]:
    """A state entry with its :data:`SCALAR_STATE` as Python numbers (a ``capturable`` step's 0-d
    tensors read back: one synchronization, where the host path or a state dict takes them)."""
    read = {key: entry[key].item() for key in SCALAR_STATE if isinstance(entry.get(key), Tensor)}
    return {**entry, **{key: int(value) if key == "step" else float(value) for key, value in read.items()}}


# --------------------------------------------------------------------------- the optimizer


class AdaL(AdaptiveOptimizer):
    r"""AdaL: Adam driven by a transformed gradient ``ĝ = ‖g‖₁·g``.

    Zhang et al., "AdaL: Adaptive Gradient Transformation Contributes to Convergences and
    Generalizations", 2021.  The paper's idea (abstract verified): transform the raw gradient so
    that it is amplified early in training, while gradients are large, and shrunk later, which
    speeds up the start and keeps some gradient noise for generalization.  The update below is
    **reconstructed from a secondary source** (docs/algorithms.md §4); the choices it leaves open
    are the options ``transform``, ``eps_mode`` and ``lr_decay``::

        ĝ = s·g,   s = ‖g‖₁ (over every parameter of every group)
        m ← β1·m + (1 − β1)·ĝ,   v ← β2·v + (1 − β2)·ĝ²,   m̂ = m/(1 − β1^k),   v̂ = v/(1 − β2^k)
        x ← x·(1 − η_k·wd)                         (decoupled weight decay, AdamW style)
        x ← x − η_k · m̂ · (1/√v̂ + eps)

    Why the transform matters at all: Adam's direction m̂/√v̂ ignores a *constant* rescaling of
    the gradient, so ``s`` acts only through (a) the moving averages, which weight each step's
    gradient by that step's ``s`` (large early gradients dominate m and v), and (b) ``eps``, whose
    size relative to √v̂ or to 1/√v̂ changes with ``s``.  With ``transform="none"`` and
    ``eps_mode="denominator"`` this optimizer is ``torch.optim.Adam`` (``AdamW`` with weight
    decay), up to rounding.

    How it is computed: the averages of ĝ are kept factored as ``m = Λ1·m̃`` and ``v = Λ2·ṽ``,
    where ``Λ1``, ``Λ2`` are the moving averages of ``s`` and ``s²`` (host floats, per tensor) and
    ``m̃``, ``ṽ`` the ``s``-weighted moving averages of ``g`` and ``g²``
    (``m̃ ← lerp(m̃, g, (1 − β1)·s/Λ1)``, likewise ``ṽ``): :func:`adal_scalars`.  This is the same
    arithmetic as the formulas above, but ``m̃`` takes one ``lerp`` (as in Adam) instead of a
    scale-and-add, and ``ĝ² = s²g²``, which overflows half precision for moderate ``s``, is never
    formed.

    Args:
        params: parameters or param groups.  Groups may differ in ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``eps_mode`` and ``lr_decay``.
        lr: the learning rate η (η_k = lr, or lr/√k with ``lr_decay="inv_sqrt"``).
        betas: ``(β1, β2)``, each in [0, 1): averaging of ĝ and of ĝ².  Read at every step, so a
            scheduler that cycles momentum (``OneCycleLR``, ``CyclicLR``: they write ``betas[0]``)
            sets β1 from that step on.
        eps: where ``eps_mode`` says.  Note that in the preconditioner form it adds a plain
            momentum step ``η_k·eps·m̂``, whose size scales with ``s``.
        weight_decay: decoupled weight decay: ``x ← x·(1 − η_k·wd)`` before the update.
        transform: the gradient transform (shared by all groups).
            ``"l1"`` (default, the source's): ``s = ‖g‖₁`` over the whole model.
            ``"tensor_l1"``: ``s`` is each parameter tensor's own ‖g‖₁, so that one layer's large
            gradient does not rescale the others (the source's wording is ambiguous about the
            norm's extent).
            ``"none"``: ``s = 1``, plain Adam (with the chosen ``eps_mode``): the baseline.
        eps_mode: ``"preconditioner"`` (default): ``m̂·(1/√v̂ + eps)``, as the secondary source
            writes it.  ``"denominator"``: Adam's ``m̂/(√v̂ + eps)``, in case the source's
            placement is a transcription slip.
        lr_decay: ``"none"`` (default): η_k = lr, so that lr schedulers act as on Adam.
            ``"inv_sqrt"``: η_k = lr/√k, the schedule of the source's analysis; k counts the steps
            taken (skipped steps excluded).
        foreach: use the multi-tensor (``torch._foreach_*``) path on accelerators; ``False`` updates
            tensor by tensor (as the CPU always does, where that was measured faster).
        compiled: run the moments and the step as one ``torch.compile``\ d (TorchInductor) loop
            per tensor (:mod:`._adal_compiled`): 7 parameter-sized reads and writes, as fused
            Adam, instead of 13 to 16; the gate and the outcome check are unchanged.  Compiles
            once per set of parameter shapes at the first step; needs a working Inductor (a C++
            compiler on CPU, Triton on GPU), else ``step()`` raises a RuntimeError naming the cause
            before any state changes.  Speed: docs/benchmarks.md.
        capturable: keep every decision of the step on the device (docs/algorithms.md, "The
            device-side step"): ``‖g‖₁``, the gate, the per-tensor scalars (Λ1, Λ2, the moment
            weights, the step coefficient, the eps term, by :func:`adal_scalars` on device
            tensors) and the outcome check (:func:`adal_step_fits`, folded into the gate's
            decision) stay 0-d device tensors; a step that is not taken is undone with
            ``torch.where``, and the state (``step``, ``scale_avg``, ``scale_sq_avg`` per parameter
            as 0-d tensors, the moments) is updated in place, so the step never waits for the host
            and can be captured in a CUDA graph (after a few eager steps).  Skips are counted on the
            device and reported by :meth:`sync_warnings` (which
            :class:`~lightning_adaptive_lr.AdaptiveLRMonitor` calls when it logs).  Hyperparameters
            (``lr``, β, ...) are read as Python numbers at each call: a graph keeps the values it was
            captured with.  The device-side step goes tensor by tensor (``foreach`` does not apply);
            with ``compiled=True`` it runs the compiled pass, which keeps every value where the
            step is not taken.
        average_across_ranks: average a given loss across ``torch.distributed`` ranks.  AdaL needs
            no loss; one passed with ``step(loss=...)`` is only checked for finiteness.
        max_consecutive_skips: raise after this many skipped steps in a row (``None``: never);
            see :class:`~._base.AdaptiveOptimizer`.

    Numerics:
        * A coordinate whose gradient is always zero has m̃ = ṽ = 0, where 1/√ṽ is infinite.
          √ṽ is floored at √(smallest normal number of the dtype) wherever no ``eps`` is added
          to it, so the step there is exactly 0, never 0·∞; coordinates whose ṽ is a normal
          number are untouched by the floor.  A tensor whose ĝ has been exactly 0 at every step
          so far (Λ2 = 0) does not move at all.
        * Bias corrections use each parameter's own step count (as ``torch.optim.Adam`` does), so
          a parameter that first receives a gradient late starts like a fresh Adam; η_k's k is
          the global count of steps taken.
        * The step synchronizes with the device once: the finiteness gate reads ``‖g‖₁`` (every
          tensor's, for ``"tensor_l1"``) together with the loss if one was given.  Those values are
          then on the host for free, so the scale enters the kernels as a plain Python number on
          every device; no other scalar of the step is computed on the device.  With
          ``capturable=True`` nothing is read: every scalar of the step is computed on the device.
        * A non-finite gradient (or given loss) skips the step: parameters and state unchanged,
          every group's ``skipped_steps`` incremented.  So does a finite step whose outcome would
          not be (a gradient whose square, or an eps term ``η_k·eps·m̂``, beyond the dtype's range,
          or ``s²`` beyond float64's): judged before anything moves, on the host numbers of the step
          (:func:`adal_step_fits`; with float16 parameters the gate also reads the float16
          gradients' range).

    After each step every param group holds ``effective_lr`` (η_k) and ``grad_scale``: ``s`` for
    ``"l1"``, 1.0 for ``"none"``, and for ``"tensor_l1"`` the mean of ``s`` over the group's tensors
    that had a gradient (0.0 if none had).  ``state[p]`` holds ``step`` (its own count),
    ``scale_avg`` (Λ1), ``scale_sq_avg`` (Λ2), ``grad_avg`` (m̃) and ``grad_avg_sq`` (ṽ), so that
    ``m = scale_avg·grad_avg`` and ``v = scale_sq_avg·grad_avg_sq``; every param group holds the
    optimizer-wide ``step`` and ``skipped_steps``.  With ``capturable=True`` these numbers and the
    records are 0-d tensors on the parameters' device (counts int64, the rest in float64, float32
    on MPS); a state dict loads into either mode.

    Example:
        >>> import torch
        >>> from lightning_adaptive_lr import AdaL
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = AdaL(model.parameters(), lr=1e-3)
        >>> model(torch.ones(4, 3)).pow(2).mean().backward()
        >>> optimizer.step()
        >>> optimizer.param_groups[0]["step"], optimizer.param_groups[0]["effective_lr"]
        (1, 0.001)
    """

    requires_loss = False
    #: Tensor by tensor on the CPU: 0.88x the multi-tensor body's time on ResNet-18 (docs/benchmarks.md).
    single_tensor_on_cpu = True
    per_tensor_quantities = True  # per-tensor rates/norms: see AdaptiveOptimizer
    shared_options = ("transform", "capturable")
    #: The outcome check's name in the skip record of a ``capturable`` step (see :meth:`~._base.AdaptiveOptimizer._device_outcome`).
    outcome_scalars = frozenset({OUTCOME})

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        transform: str = "l1",
        eps_mode: str = "preconditioner",
        lr_decay: str = "none",
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
        compiled: bool = False,
        capturable: bool = False,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        defaults = checked(
            type(self).__name__, locals(), lr=NONNEGATIVE, betas=BETAS, eps=NONNEGATIVE, weight_decay=NONNEGATIVE,
            transform=one_of(*TRANSFORMS), eps_mode=one_of(*EPS_MODES), lr_decay=one_of(*LR_DECAYS), compiled=FLAG,
            capturable=FLAG,
        )  # fmt: skip
        super().__init__(params, defaults, **runtime_options(locals()))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """:meth:`~._base.AdaptiveOptimizer.load_state_dict`, with the per-parameter step counts and
        Λ1, Λ2 of a ``capturable`` optimizer's state dict (0-d tensors) loaded as numbers: torch.optim
        would cast them to the parameter's dtype (Λ2 = s² overflows float16).  A ``capturable`` step
        moves them to the device again (:meth:`_device_state_of`)."""
        state = {
            key: _as_numbers(entry) if isinstance(entry, dict) else entry
            for key, entry in state_dict.get("state", {}).items()
        }
        super().load_state_dict({**state_dict, "state": state})

    def _state_of(self, p: Tensor) -> dict[str, Any]:
        """``state[p]``, created at its starting values (no step taken) if new."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["scale_avg"] = 0.0
            state["scale_sq_avg"] = 0.0
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["grad_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _update(self, loss: Tensor | None) -> None:
        groups = [(group, *self._params_and_grads(group)) for group in self.param_groups]
        if not any(params for _, params, _ in groups):
            return
        transform = self.param_groups[0]["transform"]
        if self._is_state_initialization():  # torch.distributed.checkpoint laying out the state
            self._initialize_state(groups, transform)
            return
        if self._capturable:
            self._device_update(groups, loss)
            return
        self._host_group_state()  # numbers again after a capturable optimizer's state dict
        per_tensor = transform == "tensor_l1"
        device = self._device()
        if any(group["compiled"] for group, params, _ in groups if params):
            ensure_inductor_works("AdaL", device)  # a missing compiler: a clear error before any state changes

        # The gate: ‖g‖₁ (its finiteness is the gradient's) and the loss, read in one sync; for
        # float16 gradients also their range, since there (‖g‖₁)² bounds |g|² far too loosely.
        norms = torch.cat([
            l1_norms(gs, device, foreach=self._uses_foreach(group, gs), compiled_by="AdaL" if group["compiled"] else None)
            for group, _, gs in groups
            if gs
        ])  # fmt: skip
        halves = [g for _, _, gs in groups for g in gs if g.dtype == torch.float16]
        extra = {"float16_range": torch.stack(tensor_extrema(halves, device))} if halves else {}
        values = self._gate(
            norms=norms if per_tensor else norms.sum(), **extra, **({} if loss is None else {"loss": loss})
        )
        if values is None:
            return

        k = self._shared("step") + 1
        # s per tensor, in the order of `groups`: each tensor's own norm, the model's, or 1.
        model_scale = 1.0 if transform == "none" else values["norms"]
        scales = iter(values["norms"]) if per_tensor else itertools.repeat(model_scale)
        plans = []
        for group, params, grads in groups:
            group_scales = list(itertools.islice(scales, len(params)))
            lr = adal_rate(group["lr"], k, group["lr_decay"])
            plans.append((group, params, grads, group_scales, lr, self._scalars(group, params, group_scales, lr)))

        # The step's outcome: skipped, with nothing written, if it would not fit the dtypes.  A bound
        # on |g|: the tensor's ‖g‖₁ (its s under "tensor_l1") or the model's, or max |g| in float16.
        # Tensors that share their scalars (under "l1", usually all of them) are judged once.
        half_bound = max(-values["float16_range"][0], values["float16_range"][1]) if halves else 0.0
        cases = {
            (i, p.dtype, id(rule)): (
                rule,
                half_bound if p.dtype == torch.float16 else s if per_tensor else values["norms"],
            )
            for i, (_, params, _, group_scales, _, rules) in enumerate(plans)
            for p, s, rule in zip(params, group_scales, rules)
        }
        if not all(self._fits(self.param_groups[i], dtype, *case) for (i, dtype, _), case in cases.items()):
            self._skip_step("outcome", ("step size",))
            return

        self._set_shared(step=k)
        for group, params, grads, group_scales, lr, rules in plans:
            if params:
                self._step_group(group, params, grads, rules, lr)
            if per_tensor:
                recorded = math.fsum(group_scales) / len(group_scales) if group_scales else 0.0
            else:
                recorded = model_scale
            self._record(group, effective_lr=lr, grad_scale=recorded)

    def _initialize_state(self, groups: list[Group], transform: str) -> None:
        """The state at its starting values and the records, laid out as a step lays them out (with
        ``capturable``, as device tensors: :meth:`_device_state_of`); nothing moves."""
        records = {"effective_lr": 0.0, "grad_scale": 1.0 if transform == "none" else 0.0}
        if not self._capturable:
            for group, params, _ in groups:
                for p in params:
                    self._state_of(p)
                self._record(group, **records)
            return
        device = self._device()
        self._device_group_state(device)
        for group, params, _ in groups:
            for p in params:
                self._device_state_of(p, device)
            self._record_on_device(
                group, **{key: torch.full((), value, dtype=accumulation_dtype(device), device=device) for key, value in records.items()}
            )

    def _scalars(
        self, group: dict[str, Any], params: list[Tensor], scales: list[float], lr: float
    ) -> list[AdaLScalars]:
        """Each tensor's scalars for this step (:func:`adal_scalars`), from its state; nothing is written.

        Tensors with equal inputs (the same s, Λ1, Λ2, step count and dtype) share one result.
        """
        rules: list[AdaLScalars] = []
        done: dict[tuple[Any, ...], AdaLScalars] = {}
        for p, s in zip(params, scales):
            state = self.state.get(p)
            if state and isinstance(state["step"], Tensor):  # a capturable step's (the option switched)
                state.update(_as_numbers(state))
            if state:
                inputs = (s, state["scale_avg"], state["scale_sq_avg"], state["step"] + 1, p.dtype)
            else:
                inputs = (s, 0.0, 0.0, 1, p.dtype)
            rule = done.get(inputs)
            if rule is None:
                rule = done[inputs] = self._rule(group, inputs[4], *inputs[:4], lr)
            rules.append(rule)
        return rules

    @staticmethod
    def _rule(
        group: dict[str, Any], dtype: torch.dtype, scale: Scalar, scale_avg: Scalar, scale_sq_avg: Scalar, step: Scalar, lr: Scalar
    ) -> AdaLScalars:
        """:func:`adal_scalars` with ``group``'s options, for tensors of ``dtype`` (numbers, or device tensors)."""
        eps = group["eps"]
        eps_in_denominator = group["eps_mode"] == "denominator" and eps > 0
        return adal_scalars(
            scale,
            scale_avg,
            scale_sq_avg,
            step,
            lr=lr,  # type: ignore[arg-type]
            betas=group["betas"],
            eps=eps,
            eps_in_denominator=eps_in_denominator,
            floor=1.0 / _dtype_limits(dtype)[0] if eps_in_denominator else 0.0,
        )

    @staticmethod
    def _fits(group: dict[str, Any], dtype: torch.dtype, rule: AdaLScalars, grad_bound: Scalar) -> bool | Tensor:
        """Whether a tensor of ``dtype`` in ``group`` takes its step within range (:func:`adal_step_fits`)."""
        cap, largest, largest_work = _dtype_limits(dtype)
        return adal_step_fits(
            rule,
            grad_bound,
            betas=group["betas"],
            eps_in_denominator=group["eps_mode"] == "denominator" and group["eps"] > 0,
            largest=largest,
            largest_work=largest_work,
            cap=cap,
        )

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], rules: list[AdaLScalars], lr: float
    ) -> None:
        """Advance the group's per-parameter scalars to ``rules`` (:func:`adal_scalars`), then run the body."""
        states = []
        for p, rule in zip(params, rules):
            state = self._state_of(p)
            state["step"] += 1
            state["scale_avg"], state["scale_sq_avg"] = rule.scale_avg, rule.scale_sq_avg
            states.append(state)
        avgs, sq_avgs = [state["grad_avg"] for state in states], [state["grad_avg_sq"] for state in states]
        decay, eps_in_denominator = 1.0 - lr * group["weight_decay"], group["eps_mode"] == "denominator" and group["eps"] > 0
        if group["compiled"]:  # a tensor that does not move (c = 0) takes e = 1: its 0·u stays 0
            table = [(r.avg_weight, r.sq_weight, r.step_size, r.shift if r.moves else 1.0, decay) for r in rules]
            run_adal_update(params, grads, avgs, sq_avgs, table, eps_in_denominator)
            return
        _adal(
            params,
            grads,
            avgs,
            sq_avgs,
            rules,
            decay=decay,
            eps_in_denominator=eps_in_denominator,
            foreach=self._uses_foreach(group, params),
        )

    # ------------------------------------------------------------------ the device-side step (capturable)

    def _device_update(self, groups: list[Group], loss: Tensor | None) -> None:
        """``capturable``: the host path's step with every decision on the device (no host read).

        The same gate values (``‖g‖₁``, float16 gradients' range, the loss) come back from
        :meth:`_device_gate` as tensors with ``ok``; the per-tensor scalars are :func:`adal_scalars` of
        them, and :func:`adal_step_fits` of those is folded into ``ok`` (:meth:`~._base.AdaptiveOptimizer._device_outcome`).  The
        state, the parameters, the counters and the records then take their new values only where
        ``ok``.
        """
        device = self._device()
        if any(group["compiled"] for group, params, _ in groups if params):
            ensure_inductor_works("AdaL", device)  # a missing compiler: a clear error before any state changes
        self._device_group_state(device)
        for _, params, _ in groups:
            for p in params:
                self._device_state_of(p, device)
        transform = self._shared("transform")
        per_tensor = transform == "tensor_l1"
        norms = torch.cat([l1_norms(gs, device, foreach=self._uses_foreach(group, gs)) for group, _, gs in groups if gs])
        halves = [g for _, _, gs in groups for g in gs if g.dtype == torch.float16]
        extra = {"float16_range": torch.stack(tensor_extrema(halves, device))} if halves else {}
        values, ok = self._device_gate(
            (OUTCOME,), norms=norms if per_tensor else norms.sum(), **extra, **({} if loss is None else {"loss": loss})
        )

        k = self._shared("step").to(accumulation_dtype(device)) + 1
        half_bound = smax(-values["float16_range"][0], values["float16_range"][1]) if halves else 0.0
        plans, fits, offset = [], [], 0
        for group, params, grads in groups:
            group_scales = values["norms"][offset : offset + len(params)] if per_tensor else None
            offset += len(params)
            scale = group_scales if per_tensor else 1.0 if transform == "none" else values["norms"]
            lr = adal_rate(group["lr"], k, group["lr_decay"])
            buckets = self._device_scalars(group, params, scale, lr)
            for dtype, index, rule in buckets:
                bound = half_bound if dtype == torch.float16 else _entries(scale, index) if per_tensor else values["norms"]
                fits.append(self._fits(group, dtype, rule, bound).all())  # type: ignore[union-attr]
            recorded = (group_scales.mean() if params else 0.0) if per_tensor else scale
            plans.append((group, params, grads, buckets, lr, recorded))
        ok = self._device_outcome(ok, ~torch.stack(fits).all())

        for group, params, grads, buckets, lr, recorded in plans:
            self._device_step_group(group, params, grads, buckets, lr, ok)
            self._record_on_device(
                group,
                effective_lr=self._new_record(group, "effective_lr", lr, ok, like=k),
                grad_scale=self._new_record(group, "grad_scale", recorded, ok, like=k),
            )
        self._count_device_step(ok)

    def _device_state_of(self, p: Tensor, device: torch.device) -> dict[str, Any]:
        """``state[p]`` with its :data:`SCALAR_STATE` as 0-d tensors on ``device`` (``capturable``): the
        step count as int64, Λ1 and Λ2 in :func:`~._reduce.accumulation_dtype`.  Converted once (a
        new state, or numbers from the host path or a state dict); later steps write into them."""
        state = self._state_of(p)
        acc = accumulation_dtype(device)
        for key, dtype in zip(SCALAR_STATE, (torch.int64, acc, acc)):
            value = state[key]
            if not (isinstance(value, Tensor) and (value.dtype, value.device) == (dtype, device)):
                state[key] = torch.as_tensor(value, dtype=dtype, device=device)
        return state

    def _device_scalars(
        self, group: dict[str, Any], params: list[Tensor], scale: Scalar, lr: Scalar
    ) -> list[tuple[torch.dtype, list[int], AdaLScalars]]:
        """The group's scalars for this step on the device, one :func:`adal_scalars` per dtype (the
        floor depends on it) over 1-d tensors with an entry per tensor, from the state; nothing is
        written.  ``scale``: per tensor (``"tensor_l1"``, 1-d) or the model's (0-d, or 1.0)."""
        buckets: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault(p.dtype, []).append(i)
        out = []
        for dtype, index in buckets.items():
            states = [self.state[params[i]] for i in index]
            steps, scale_avg, scale_sq_avg = (torch.stack([state[key] for state in states]) for key in SCALAR_STATE)
            s = _entries(scale, index) if isinstance(scale, Tensor) and scale.dim() == 1 else scale
            rule = self._rule(group, dtype, s, scale_avg, scale_sq_avg, steps.to(scale_avg.dtype) + 1, lr)
            out.append((dtype, index, rule))
        return out

    def _device_step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        buckets: list[tuple[torch.dtype, list[int], AdaLScalars]],
        lr: Scalar,
        ok: Tensor,
    ) -> None:
        """:meth:`_step_group` on the device: each bucket's scalars stored where ``ok``
        (:meth:`_store_scalars`), then the body (:func:`_device_adal_`)."""
        decay, eps_in_denominator = 1.0 - lr * group["weight_decay"], group["eps_mode"] == "denominator" and group["eps"] > 0
        for _, index, rule in buckets:
            states = [self.state[params[i]] for i in index]
            self._store_scalars(states, rule, ok)
            columns = (
                [params[i] for i in index],
                [grads[i] for i in index],
                [state["grad_avg"] for state in states],
                [state["grad_avg_sq"] for state in states],
            )
            if group["compiled"]:  # the compiled pass, its table built on the device and kept where ok
                run_compiled("AdaL", adal_update, *columns, _device_table(rule, decay), eps_in_denominator, ok)
            else:
                _device_adal_(*columns, rule, decay=decay, eps_in_denominator=eps_in_denominator, ok=ok)

    @staticmethod
    def _store_scalars(states: list[dict[str, Any]], rule: AdaLScalars, ok: Tensor) -> None:
        """A bucket's ``scale_avg``, ``scale_sq_avg`` ← ``rule``'s and ``step`` + 1, where ``ok``; in place."""
        for key, new in (("scale_avg", rule.scale_avg), ("scale_sq_avg", rule.scale_sq_avg)):
            olds = [state[key] for state in states]
            torch._foreach_copy_(olds, list(torch.where(ok, new, torch.stack(olds)).unbind(0)))
        torch._foreach_add_([state["step"] for state in states], ok.to(torch.int64))

    @staticmethod
    def _new_record(group: dict[str, Any], key: str, value: Scalar, ok: Tensor, *, like: Tensor) -> Tensor:
        """The record ``key`` after a ``capturable`` step: ``value`` where ``ok``, else what the group
        held (0 before any), as a 0-d tensor like ``like``."""
        previous = group.get(key)
        kept = previous if isinstance(previous, Tensor) else torch.full_like(like, 0.0 if previous is None else previous)
        return torch.where(ok, value, kept)


def _entries(values: Tensor, index: list[int]) -> Tensor:
    """``values[index]`` of a 1-d tensor, without an index tensor made on the host (a copy a CUDA
    graph could not capture): the slice itself when ``index`` is every position in order."""
    if index == list(range(values.numel())):
        return values
    return torch.stack([values[i] for i in index])
