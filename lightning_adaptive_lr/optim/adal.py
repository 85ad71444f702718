"""AdaL: Adam on a transformed gradient that is amplified early in training and shrunk later.

Zhang et al., "AdaL: Adaptive Gradient Transformation Contributes to Convergences and
Generalizations", 2021 (ALGORITHMS.md §4).  The idea is the paper's (abstract verified); the
update is **reconstructed from a secondary source**, because the paper's full text could not be
read.  The choices that reading leaves open are options, documented on :class:`AdaL`.

With ``s`` the scale of the transform (``‖g‖₁`` by default) the step is::

    ĝ = s·g
    m ← β1·m + (1 − β1)·ĝ          v ← β2·v + (1 − β2)·ĝ²
    x ← x − η_k · m̂ · (1/√v̂ + eps)            (eps_mode="preconditioner", the source's form)
    x ← x − η_k · m̂ / (√v̂ + eps)              (eps_mode="denominator", Adam's form)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import AdaptiveOptimizer, check_betas, check_choice, check_range
from ._tensorlists import accumulation_dtype, group_by_device_and_dtype, work_dtype

__all__ = ["AdaL"]

TRANSFORMS = ("l1", "tensor_l1", "none")
EPS_MODES = ("preconditioner", "denominator")
LR_DECAYS = ("none", "inv_sqrt")


def _l1_norms(tensors: Sequence[Tensor], device: torch.device, *, foreach: bool) -> Tensor:
    """Per-tensor ℓ1 norms, in input order, as a 1-d tensor on ``device`` in the accumulation dtype.

    Each norm is reduced in the tensor's precision promoted to at least float32 (a half-precision
    ‖g‖₁ overflows easily); nothing leaves the device here.  On accelerators the multi-tensor
    path is one fused ``_foreach_norm`` kernel; on the CPU, where that kernel is a loop over a
    norm that is several times slower than ``abs().sum()``, both paths take the latter.
    """
    acc = accumulation_dtype(device)
    positions: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        positions.setdefault((t.device, t.dtype), []).append(i)
    parts = []
    for (where, dtype), indices in positions.items():
        work = work_dtype(dtype)
        chunk = [tensors[i] for i in indices]
        if foreach and where.type != "cpu":
            norms = torch._foreach_norm(chunk, 1, dtype=work)
        else:
            norms = [t.abs().sum(dtype=work) for t in chunk]
        parts.append(torch.stack(norms).to(device, acc))
    if len(parts) == 1:
        return parts[0]
    out = torch.empty(len(tensors), device=device, dtype=acc)
    for part, indices in zip(parts, positions.values()):
        out[torch.tensor(indices, device=device)] = part
    return out


def _rsqrt_cap(dtype: torch.dtype) -> float:
    """Cap on 1/√ṽ: 1/√(smallest normal number), i.e. √ṽ is floored there.

    A coordinate whose gradient is always zero has m̃ = ṽ = 0, where 1/√ṽ is infinite; with the
    cap its step is exactly 0, never 0·∞.  Where ṽ underflowed to 0 (g² too small for the
    dtype) but m̃ did not, m̃·cap stays of the order of the bounded ratio m̃/√ṽ instead of
    overflowing.  Coordinates whose ṽ is a normal number are not affected.
    """
    return 1.0 / math.sqrt(torch.finfo(dtype).tiny)


def _one_or_all(values: list[float]) -> float | list[float]:
    """One scalar when every tensor gets the same value (the common case), else one per tensor."""
    first = values[0]
    return first if all(v == first for v in values) else values


def _moments_per_tensor(
    grads: list[Tensor], avgs: list[Tensor], sq_avgs: list[Tensor], avg_weights: list[float], sq_weights: list[float]
) -> None:
    """``m̃ ← lerp(m̃, g, w1)``, ``ṽ ← (1 − w2)·ṽ + w2·g²``, one tensor at a time."""
    for g, m, v, w1, w2 in zip(grads, avgs, sq_avgs, avg_weights, sq_weights):
        m.lerp_(g, w1)
        v.mul_(1.0 - w2).addcmul_(g, g, value=w2)


def _moments_foreach(
    grads: list[Tensor], avgs: list[Tensor], sq_avgs: list[Tensor], avg_weights: list[float], sq_weights: list[float]
) -> None:
    """The same with ``torch._foreach_*`` kernels (tensors of one device and dtype)."""
    torch._foreach_lerp_(avgs, grads, _one_or_all(avg_weights))
    torch._foreach_mul_(sq_avgs, _one_or_all([1.0 - w for w in sq_weights]))
    torch._foreach_addcmul_(sq_avgs, grads, grads, _one_or_all(sq_weights))


def _step_per_tensor(
    params: list[Tensor],
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    coefficients: list[float],
    eps_terms: list[float] | None,
    eps_in_denominator: bool,
) -> None:
    """``x += c·m̃/(√ṽ + e)`` (denominator) or ``x += c·m̃·(1/√ṽ + e)`` (preconditioner), per tensor."""
    for i, (p, m, v) in enumerate(zip(params, avgs, sq_avgs)):
        if eps_in_denominator and eps_terms is not None:
            p.addcdiv_(m, v.sqrt().add_(eps_terms[i]), value=coefficients[i])
        else:
            r = v.rsqrt().clamp_max_(_rsqrt_cap(v.dtype))
            if eps_terms is not None:
                r.add_(eps_terms[i])
            p.addcmul_(m, r, value=coefficients[i])


def _step_foreach(
    params: list[Tensor],
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    coefficients: list[float],
    eps_terms: list[float] | None,
    eps_in_denominator: bool,
) -> None:
    """The same with ``torch._foreach_*`` kernels (tensors of one device and dtype)."""
    if eps_in_denominator and eps_terms is not None:
        denom = torch._foreach_sqrt(sq_avgs)
        torch._foreach_add_(denom, _one_or_all(eps_terms))
        torch._foreach_addcdiv_(params, avgs, denom, _one_or_all(coefficients))
    else:
        r = torch._foreach_rsqrt(sq_avgs)
        torch._foreach_clamp_max_(r, _rsqrt_cap(sq_avgs[0].dtype))
        if eps_terms is not None:
            torch._foreach_add_(r, _one_or_all(eps_terms))
        torch._foreach_addcmul_(params, avgs, r, _one_or_all(coefficients))


class AdaL(AdaptiveOptimizer):
    r"""AdaL: Adam driven by a transformed gradient ``ĝ = ‖g‖₁·g``.

    Zhang et al., "AdaL: Adaptive Gradient Transformation Contributes to Convergences and
    Generalizations", 2021.  The paper's idea (abstract verified): transform the raw gradient so
    that it is amplified early in training, while gradients are large, and shrunk later, which
    speeds up the start and keeps some gradient noise for generalization.  The update below is
    **reconstructed from a secondary source** (ALGORITHMS.md §4); the choices it leaves open are
    the options ``transform``, ``eps_mode`` and ``lr_decay``::

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
    (``m̃ ← lerp(m̃, g, (1 − β1)·s/Λ1)``, likewise ``ṽ``).  This is the same arithmetic as the
    formulas above, but ``m̃`` takes one ``lerp`` (as in Adam) instead of a scale-and-add, and
    ``ĝ² = s²g²``, which overflows half precision for moderate ``s``, is never formed.

    Args:
        params: parameters or param groups.  Groups may differ in ``lr``, ``betas``, ``eps``,
            ``weight_decay``, ``eps_mode`` and ``lr_decay``.
        lr: the learning rate η (η_k = lr, or lr/√k with ``lr_decay="inv_sqrt"``).
        betas: ``(β1, β2)``, each in [0, 1): averaging of ĝ and of ĝ².
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
        foreach: use the multi-tensor (``torch._foreach_*``) path; ``False`` updates tensor by tensor.
        average_across_ranks: average a given loss across ``torch.distributed`` ranks.  AdaL needs
            no loss; one passed with ``step(loss=...)`` is only checked for finiteness.

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
          every device; no other scalar of the step is computed on the device.
        * A non-finite gradient (or given loss) skips the step: parameters and state unchanged,
          ``state["global"]["skipped_steps"]`` incremented.

    After each step every param group holds ``effective_lr`` (η_k) and ``grad_scale``: ``s`` for
    ``"l1"``, 1.0 for ``"none"``, and for ``"tensor_l1"`` the mean of ``s`` over the group's tensors
    that had a gradient (0.0 if none had).  ``state[p]`` holds ``step`` (its own count),
    ``scale_avg`` (Λ1), ``scale_sq_avg`` (Λ2), ``grad_avg`` (m̃) and ``grad_avg_sq`` (ṽ), so that
    ``m = scale_avg·grad_avg`` and ``v = scale_sq_avg·grad_avg_sq``; ``state["global"]`` holds
    ``step`` and ``skipped_steps``.
    """

    requires_loss = False
    shared_options = ("transform",)

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
    ) -> None:
        name = type(self).__name__
        check_range(name, "lr", lr, 0.0, None)
        check_betas(name, betas)
        check_range(name, "eps", eps, 0.0, None)
        check_range(name, "weight_decay", weight_decay, 0.0, None)
        check_choice(name, "transform", transform, TRANSFORMS)
        check_choice(name, "eps_mode", eps_mode, EPS_MODES)
        check_choice(name, "lr_decay", lr_decay, LR_DECAYS)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            transform=transform,
            eps_mode=eps_mode,
            lr_decay=lr_decay,
        )
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

    def _update(self, loss: Tensor | None) -> None:
        groups = [(g, *self._params_and_grads(g)) for g in self.param_groups]
        if not any(ps for _, ps, _ in groups):
            return
        transform = self.param_groups[0]["transform"]
        device = self._device()

        # The gate: ‖g‖₁ (its finiteness is the gradient's) and the loss, read in one sync.
        norms = torch.cat([_l1_norms(gs, device, foreach=group["foreach"]) for group, _, gs in groups if gs])
        gated_scalars = list(norms.unbind()) if transform == "tensor_l1" else [norms.sum()]
        if loss is not None:
            gated_scalars.append(loss)
        values = self._gate(*gated_scalars)
        if values is None:
            return

        st = self.global_state
        k = st["step"] + 1
        st["step"] = k
        offset = 0
        for group, ps, gs in groups:
            n = len(ps)
            if transform == "l1":
                scales, recorded_scale = [values[0]] * n, values[0]
            elif transform == "tensor_l1":
                scales = values[offset : offset + n]
                recorded_scale = math.fsum(scales) / n if n else 0.0
            else:
                scales, recorded_scale = [1.0] * n, 1.0
            offset += n
            lr = group["lr"] / math.sqrt(k) if group["lr_decay"] == "inv_sqrt" else group["lr"]
            if ps:
                self._update_group(group, ps, gs, scales, lr)
            self._record(group, effective_lr=lr, grad_scale=recorded_scale)

    def _update_group(
        self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor], scales: list[float], lr: float
    ) -> None:
        """Advance the group's per-parameter state and update its parameters.

        The per-tensor scalars (averaging weights, step coefficients) are worked out here on the
        host; the kernels then run over tensors of one device and dtype.
        """
        beta1, beta2 = group["betas"]
        eps, eps_mode = group["eps"], group["eps_mode"]
        avgs, sq_avgs, avg_weights, sq_weights, coefficients, eps_terms = [], [], [], [], [], []
        moving = []  # the tensors whose ĝ has not been exactly zero all along (others stay put)
        for i, (p, s) in enumerate(zip(params, scales)):
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["scale_avg"] = 0.0
                state["scale_sq_avg"] = 0.0
                state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["grad_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            k = state["step"]
            # m = Λ1·m̃ with Λ1 the average of s and m̃ the s-weighted average of g (see the class
            # docstring); likewise v = Λ2·ṽ.  Then m̃ moves toward g by w1 = (1 − β1)·s/Λ1.
            scale_avg = beta1 * state["scale_avg"] + (1.0 - beta1) * s
            scale_sq_avg = beta2 * state["scale_sq_avg"] + (1.0 - beta2) * s * s
            state["scale_avg"], state["scale_sq_avg"] = scale_avg, scale_sq_avg
            avg_weights.append((1.0 - beta1) * s / scale_avg if scale_avg > 0 else 0.0)
            sq_weights.append((1.0 - beta2) * s * s / scale_sq_avg if scale_sq_avg > 0 else 0.0)
            avgs.append(state["grad_avg"])
            sq_avgs.append(state["grad_avg_sq"])
            # m̂ = (Λ1/bc1)·m̃ and √v̂ = σ·√ṽ with σ = √(Λ2/bc2): fold both into per-tensor scalars.
            sigma = math.sqrt(scale_sq_avg / (1.0 - beta2**k))
            if sigma > 0:
                moving.append(i)
                coefficients.append(-lr * scale_avg / ((1.0 - beta1**k) * sigma))
                if eps_mode == "denominator":
                    # eps/σ must not round to 0 in the tensor's dtype (σ huge): keep it ≥ the floor.
                    eps_terms.append(max(eps / sigma, 1.0 / _rsqrt_cap(p.dtype)))
                else:
                    eps_terms.append(eps * sigma)
            else:
                coefficients.append(0.0)
                eps_terms.append(0.0)

        foreach = group["foreach"]
        decay = 1.0 - lr * group["weight_decay"]
        # The helper buckets on the first list's device and dtype; the scalar columns ride along.
        for ps, gs, ms, vs, w1, w2 in group_by_device_and_dtype(params, grads, avgs, sq_avgs, avg_weights, sq_weights):
            if decay != 1.0:  # decoupled weight decay first, as AdamW
                if foreach:
                    torch._foreach_mul_(ps, decay)
                else:
                    for p in ps:
                        p.mul_(decay)
            (_moments_foreach if foreach else _moments_per_tensor)(gs, ms, vs, w1, w2)

        def pick(items: list[Any]) -> list[Any]:
            return [items[i] for i in moving]

        for ps, ms, vs, cs, es in group_by_device_and_dtype(
            pick(params), pick(avgs), pick(sq_avgs), pick(coefficients), pick(eps_terms)
        ):
            (_step_foreach if foreach else _step_per_tensor)(
                ps, ms, vs, cs, es if eps > 0 else None, eps_in_denominator=eps_mode == "denominator"
            )
