"""The classical base rules, written once: every method of this package steps along one of them.

* :func:`with_l2`: the L2-augmented gradient ``g + wd·x``.
* :func:`momentum_` and :func:`nesterov`: the heavy-ball buffer ``b ← μ·b + (1 − dampening)·g``
  (as ``torch.optim.SGD`` keeps it) and the Nesterov direction ``g + μ·b``.
* :func:`adam_moments_`, :func:`adam_denominators`, :func:`adam_preconditioners`,
  :func:`adam_directions`, :func:`adam_step_`: Adam's moments with bias correction and both
  placements of ``eps`` (``m/(√v̂ + eps)``, Adam's; ``m·(1/√v̂ + eps)``, AdaL's source's).

Each function has a multi-tensor body (``foreach=True``: ``torch._foreach_*`` per device-and-dtype
bucket) and a per-tensor body (``foreach=False``) that give the same numbers, takes lists that may
mix devices and dtypes, and returns results in input order.  A scalar argument documented as
"a number or one per tensor" may be a float or a list with one float per tensor.

Bias correction is left to the caller as scalars: ``m̂/(√v̂ + eps) = (1/bc1)·m/(√v/√bc2 + eps)``,
so a method passes ``root = √bc2`` to :func:`adam_denominators` and folds ``1/bc1`` into its step
size, which saves two passes over the parameters per step.

**16-bit tensors** (float16, bfloat16): Adam's intermediates are computed in float32.  In float16
``eps = 1e-8`` is 0 (so ``√v + eps`` is 0 where ``v`` is, and ``0/0`` is NaN) and ``m/(√v + eps)``
can exceed 65504.  So :func:`adam_denominators` and :func:`adam_preconditioners` return float32
tensors for 16-bit ``v``; :func:`adam_directions` of 16-bit moments and float32 scalings returns
float32 directions (or writes them, rounded once, into ``out``); :func:`adam_step_` of 16-bit
parameters adds the float32 step and rounds once.  float32 and float64 tensors take exactly
``torch.optim.Adam``'s operations, as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._tensorlists import exponential_average_, group_by_device_and_dtype

__all__ = [
    "adam_denominators",
    "adam_directions",
    "adam_moments_",
    "adam_preconditioners",
    "adam_step_",
    "momentum_",
    "nesterov",
    "rsqrt_cap",
    "with_l2",
]

#: A number for every tensor, or one number per tensor.
PerTensor = float | Sequence[float]


def _each(value: PerTensor, n: int) -> list[float]:
    return list(value) if isinstance(value, Sequence) else [value] * n


def _one_or_all(values: list[float]) -> float | list[float]:
    """One scalar when every tensor gets the same value (what foreach kernels take fastest)."""
    return values[0] if all(v == values[0] for v in values) else values


def _buckets(*columns: list[Any]) -> list[tuple[list[Any], ...]]:
    """:func:`group_by_device_and_dtype` over ``columns`` plus the input positions (last column)."""
    return group_by_device_and_dtype(*columns, list(range(len(columns[0]))))


def _is_16bit(dtype: torch.dtype) -> bool:
    """float16 and bfloat16: Adam's intermediates of such tensors are computed in float32."""
    return dtype.is_floating_point and dtype.itemsize == 2


def _widened(ts: list[Tensor]) -> list[Tensor]:
    """float32 copies of 16-bit tensors (new tensors, to be written into)."""
    return [t.to(torch.float32) for t in ts]


def _in_order(n: int, pieces: list[tuple[list[int], Sequence[Tensor]]]) -> list[Tensor]:
    out: list[Tensor] = [None] * n  # type: ignore[list-item]
    for index, tensors in pieces:
        for i, t in zip(index, tensors):
            out[i] = t
    return out


# --------------------------------------------------------------------------- SGD family


def with_l2(params: list[Tensor], grads: list[Tensor], weight_decay: float, *, foreach: bool) -> list[Tensor]:
    """``g + wd·x`` as new tensors, in input order; the gradients themselves (not copied) when ``wd = 0``."""
    if weight_decay == 0 or not params:
        return list(grads)
    if not foreach:
        return [g.add(p, alpha=weight_decay) for p, g in zip(params, grads)]
    return _in_order(
        len(params),
        [(index, torch._foreach_add(gs, ps, alpha=weight_decay)) for ps, gs, index in _buckets(params, grads)],
    )


def momentum_(
    states: list[dict[str, Any]],
    grads: list[Tensor],
    momentum: float,
    *,
    dampening: float = 0.0,
    key: str = "momentum_buffer",
    first: str = "copy",
    foreach: bool,
) -> list[Tensor]:
    """The heavy-ball buffer ``b ← μ·b + (1 − dampening)·g`` in ``state[key]``; returns the buffers.

    A new buffer (a state without ``key``) starts as ``first`` says: ``"copy"``, a copy of ``g``
    (``torch.optim.SGD``; and, with ``dampening = μ``, an exponential average started at the first
    value); ``"zero"``, zeros updated like the others (an average started at 0, to be
    bias-corrected).  With ``dampening = μ`` the update is one ``lerp``.
    """
    updated, their_grads = [], []  # buffers that take this step's update (all but fresh copies)
    for state, g in zip(states, grads):
        if key not in state and first == "copy":
            state[key] = g.detach().clone(memory_format=torch.preserve_format)
            continue
        if key not in state:
            state[key] = torch.zeros_like(g, memory_format=torch.preserve_format)
        updated.append(state[key])
        their_grads.append(g)
    if dampening == momentum:
        exponential_average_(updated, their_grads, 1.0 - momentum, foreach=foreach)
    else:
        for bs, gs in group_by_device_and_dtype(updated, their_grads):
            if foreach:
                torch._foreach_mul_(bs, momentum)
                torch._foreach_add_(bs, gs, alpha=1.0 - dampening)
            else:
                for b, g in zip(bs, gs):
                    b.mul_(momentum).add_(g, alpha=1.0 - dampening)
    return [state[key] for state in states]


def nesterov(
    grads: list[Tensor], buffers: list[Tensor], momentum: float, *, foreach: bool, out: list[Tensor] | None = None
) -> list[Tensor]:
    """Nesterov's direction ``g + μ·b`` (``torch.optim.SGD(nesterov=True)``), into ``out`` if given (may alias ``grads``)."""
    if out is None:
        if foreach:
            return _in_order(
                len(grads),
                [(i, torch._foreach_add(gs, bs, alpha=momentum)) for gs, bs, i in _buckets(grads, buffers)],
            )
        return [g.add(b, alpha=momentum) for g, b in zip(grads, buffers)]
    for g, b, o in zip(grads, buffers, out):
        torch.add(g, b, alpha=momentum, out=o)
    return list(out)


# --------------------------------------------------------------------------- Adam family


def adam_moments_(
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    grads: list[Tensor],
    weight1: PerTensor,
    weight2: PerTensor,
    *,
    foreach: bool,
) -> None:
    """Adam's moments in place: ``m ← lerp(m, g, w1)``, ``v ← (1 − w2)·v + w2·g²``.

    ``w1 = 1 − β1`` and ``w2 = 1 − β2`` for Adam (``torch.optim.Adam``'s operations, in its order);
    a number or one per tensor (AdaL weighs each step's gradient by its scale).
    """
    w1s, w2s = _each(weight1, len(avgs)), _each(weight2, len(avgs))
    for ms, vs, gs, index in _buckets(avgs, sq_avgs, grads):
        a, b = [w1s[i] for i in index], [w2s[i] for i in index]
        if foreach:
            torch._foreach_lerp_(ms, gs, _one_or_all(a))  # type: ignore[arg-type]
            torch._foreach_mul_(vs, _one_or_all([1.0 - w for w in b]))  # type: ignore[arg-type]
            torch._foreach_addcmul_(vs, gs, gs, _one_or_all(b))  # type: ignore[arg-type]
        else:
            for m, v, g, w1, w2 in zip(ms, vs, gs, a, b):
                m.lerp_(g, w1)
                v.mul_(1.0 - w2).addcmul_(g, g, value=w2)


def adam_denominators(
    sq_avgs: list[Tensor],
    root: PerTensor,
    shift: PerTensor,
    *,
    foreach: bool,
    out: list[Tensor] | None = None,
) -> list[Tensor]:
    """``√v / root + shift`` (new tensors, or written into ``out``), as ``torch.optim.Adam`` computes it.

    Adam's denominator is ``root = √(1 − β2^k)``, ``shift = eps``.  Numbers or one per tensor.
    For 16-bit ``v`` the denominators are new float32 tensors (``out`` is not used for them: a
    16-bit denominator would lose ``eps``).
    """
    n = len(sq_avgs)
    roots, shifts = _each(root, n), _each(shift, n)
    targets = out if out is not None else [None] * n
    pieces = []
    for vs, ts, index in _buckets(sq_avgs, list(targets)):
        r, s = _one_or_all([roots[i] for i in index]), _one_or_all([shifts[i] for i in index])
        if _is_16bit(vs[0].dtype):
            ds = _widened(vs)
            if foreach:
                torch._foreach_sqrt_(ds)
            else:
                for d in ds:
                    d.sqrt_()
        elif foreach and out is None:
            ds = torch._foreach_sqrt(vs)
        elif foreach and vs[0].device.type != "cpu":
            torch._foreach_copy_(ts, vs)
            torch._foreach_sqrt_(ts)
            ds = ts
        else:  # on the CPU a loop writing into `out` beats a copy and an in-place pass
            ds = [torch.sqrt(v, out=t) if t is not None else v.sqrt() for v, t in zip(vs, ts)]
        _scale_and_shift_(ds, r, s, divide=True, foreach=foreach)
        pieces.append((index, ds))
    return _in_order(n, pieces)


def _scale_and_shift_(ts: list[Tensor], scale: PerTensor, shift: PerTensor, *, divide: bool, foreach: bool) -> None:
    """``t ← t / scale + shift`` (``divide``) or ``t ← t·scale + shift``, one bucket, in place.

    Dividing or multiplying by 1 and adding 0 are exact: they are skipped, a pass saved each.
    """
    if foreach:
        if scale != 1.0:
            (torch._foreach_div_ if divide else torch._foreach_mul_)(ts, scale)  # type: ignore[arg-type]
        if shift != 0.0:
            torch._foreach_add_(ts, shift)  # type: ignore[arg-type]
        return
    for t, a, b in zip(ts, _each(scale, len(ts)), _each(shift, len(ts))):
        if a != 1.0:
            (t.div_ if divide else t.mul_)(a)
        if b != 0.0:
            t.add_(b)


def rsqrt_cap(dtype: torch.dtype) -> float:
    """Cap on ``1/√v``: ``1/√(smallest normal number)``, i.e. ``√v`` floored there.

    Where ``v = 0`` (a coordinate whose gradient was always 0) the step is then exactly 0, never
    ``0·∞``; coordinates whose ``v`` is a normal number are not affected.
    """
    return 1.0 / math.sqrt(torch.finfo(dtype).tiny)


def adam_preconditioners(sq_avgs: list[Tensor], root: PerTensor, shift: PerTensor, *, foreach: bool) -> list[Tensor]:
    """``root / √v + shift`` (new tensors): the preconditioner of ``m·(1/√v̂ + eps)``, AdaL's placement.

    ``1/√v`` is capped at :func:`rsqrt_cap` of ``v``'s dtype.  ``root = √(1 − β2^k)``, ``shift = eps``
    give ``1/√v̂ + eps``.  Numbers or one per tensor.  For 16-bit ``v`` the preconditioners are
    computed and returned in float32 (the cap stays that of ``v``'s dtype).
    """
    n = len(sq_avgs)
    roots, shifts = _each(root, n), _each(shift, n)
    pieces = []
    for vs, index in _buckets(sq_avgs):
        r, s = _one_or_all([roots[i] for i in index]), _one_or_all([shifts[i] for i in index])
        cap = rsqrt_cap(vs[0].dtype)
        if _is_16bit(vs[0].dtype):
            ps = _widened(vs)
            if foreach:
                torch._foreach_rsqrt_(ps)
                torch._foreach_clamp_max_(ps, cap)
            else:
                for q in ps:
                    q.rsqrt_().clamp_max_(cap)
        elif foreach:
            ps = torch._foreach_rsqrt(vs)
            torch._foreach_clamp_max_(ps, cap)
        else:
            ps = [v.rsqrt().clamp_max_(cap) for v in vs]
        _scale_and_shift_(ps, r, s, divide=False, foreach=foreach)
        pieces.append((index, ps))
    return _in_order(n, pieces)


def adam_directions(
    avgs: list[Tensor], scalings: list[Tensor], *, divide: bool = True, foreach: bool, out: list[Tensor] | None = None
) -> list[Tensor]:
    """``m / D`` (``divide``: ``scalings`` are :func:`adam_denominators`) or ``m·P`` (preconditioners).

    Written into ``out`` when given (it may alias ``scalings``: the usual way to save an allocation).
    16-bit moments with float32 scalings (what the two functions above return for 16-bit ``v``)
    give float32 directions, or are written, rounded once, into ``out``.
    """
    if any(_is_16bit(m.dtype) and s.dtype != m.dtype for m, s in zip(avgs, scalings)):
        return _wide_directions(avgs, scalings, divide=divide, foreach=foreach, out=out)
    if out is None:
        if foreach:
            op = torch._foreach_div if divide else torch._foreach_mul
            return _in_order(len(avgs), [(i, op(ms, ss)) for ms, ss, i in _buckets(avgs, scalings)])
        return [m / s if divide else m * s for m, s in zip(avgs, scalings)]
    op_out = torch.div if divide else torch.mul
    for m, s, o in zip(avgs, scalings, out):
        op_out(m, s, out=o)
    return list(out)


def _wide_directions(
    avgs: list[Tensor], scalings: list[Tensor], *, divide: bool, foreach: bool, out: list[Tensor] | None
) -> list[Tensor]:
    """:func:`adam_directions` computed in float32 where the moments are 16-bit."""
    n = len(avgs)
    targets = out if out is not None else [None] * n
    pieces = []
    for ms, ss, ts, index in _buckets(avgs, scalings, list(targets)):
        if _is_16bit(ms[0].dtype):
            us = _widened(ms)
            if foreach:
                for ss_bucket, positions in _sub_buckets(ss):
                    (torch._foreach_div_ if divide else torch._foreach_mul_)([us[i] for i in positions], ss_bucket)
            else:
                for u, s in zip(us, ss):
                    (u.div_ if divide else u.mul_)(s)
        else:
            us = [m / s if divide else m * s for m, s in zip(ms, ss)]
        if out is not None:
            for t, u in zip(ts, us):
                t.copy_(u)
            us = ts
        pieces.append((index, us))
    return _in_order(n, pieces)


def _sub_buckets(ts: list[Tensor]) -> list[tuple[list[Tensor], list[int]]]:
    """``ts`` split by device and dtype, with the positions of each bucket's tensors."""
    return group_by_device_and_dtype(list(ts), list(range(len(ts))))


def adam_step_(
    params: list[Tensor],
    avgs: list[Tensor],
    scalings: list[Tensor],
    step_size: PerTensor,
    *,
    divide: bool = True,
    foreach: bool,
) -> None:
    """``x ← x + step·m/D`` (``divide``, ``torch.optim.Adam``'s ``addcdiv``) or ``x ← x + step·m·P``.

    ``step_size`` is signed (``−lr/bc1`` for Adam); a number or one per tensor.  16-bit parameters
    whose scalings are float32 take the step computed in float32, rounded once when added.
    """
    steps = _each(step_size, len(params))
    for ps, ms, ss, index in _buckets(params, avgs, scalings):
        c = _one_or_all([steps[i] for i in index])
        if _is_16bit(ps[0].dtype) and any(s.dtype != ps[0].dtype for s in ss):
            us = _wide_directions(ms, ss, divide=divide, foreach=foreach, out=None)
            if foreach and not isinstance(c, list):
                torch._foreach_add_(ps, us, alpha=c)
            else:
                for p, u, ci in zip(ps, us, _each(c, len(ps))):
                    p.add_(u, alpha=ci)
        elif foreach:
            (torch._foreach_addcdiv_ if divide else torch._foreach_addcmul_)(ps, ms, ss, c)  # type: ignore[arg-type]
        else:
            for p, m, s, ci in zip(ps, ms, ss, _each(c, len(ps))):
                (p.addcdiv_ if divide else p.addcmul_)(m, s, value=ci)
