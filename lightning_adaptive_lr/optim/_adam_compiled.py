"""Adam's moments, direction and step as one TorchInductor loop per tensor (``compiled=True`` bases).

:func:`~.qlab._adam_direction`'s math (``torch.optim.Adam``'s, per-parameter step counts) and the
step along it, fused: per tensor, with its scalars ``(w1, w2, r, e, c, wd) = table[:, i]``::

    m ← m + w1·(g − m),   v ← (1 − w2)·v + w2·g²,   d = m / (√v / r + e) + wd·x,   x ← x + c·d

``m``, ``v`` and ``x`` are written in place and ``d`` comes out as a new tensor: read ``m, v, g, x``,
write ``m, v, x, d`` (8 parameter-sized accesses) where the eager body takes about 20 in seven
kernels (a lerp, a multiply, an addcmul, a square root, a scaled add, a division, the step).  ``r``
and ``e`` carry both bias corrections (``r = √(1 − β2^k)/(1 − β1^k)``, ``e = eps·(1 − β1^k)``);
``wd`` is AdamW's decoupled weight decay as part of the direction (QLAB's ``"adamw"``), ``c`` the
step (0: no step; a compiled loop cannot skip it, so ``x`` is then written back unchanged).  ``v``
may be kept wider than the parameter (float32 for 16-bit parameters): ``d`` is computed in its dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._compiled import run_with_table
from ._reduce import work_dtype

__all__ = ["adam_moments", "adam_step", "adam_terms", "run_adam_step"]


def adam_moments(m: Tensor, v: Tensor, g: Tensor, w1: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """Adam's moments after a step, ``m + w1·(g − m)`` and ``(1 − w2)·v + w2·g²`` (new tensors):
    the arithmetic every compiled Adam-like kernel shares (its inputs already in one dtype)."""
    return m + w1 * (g - m), v * (1.0 - w2) + w2 * g * g


def adam_terms(
    m: Tensor, v: Tensor, g: Tensor, w1: Tensor, w2: Tensor, root: Tensor, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`adam_moments` and Adam's direction ``u = m′ / (√v′ / root + eps)``."""
    m_new, v_new = adam_moments(m, v, g, w1, w2)
    return m_new, v_new, m_new / (v_new.sqrt() / root + eps)


def adam_step(
    params: list[Tensor], avgs: list[Tensor], sq_avgs: list[Tensor], grads: list[Tensor], table: Tensor
) -> list[Tensor]:
    """The moments and ``x ← x + c·d`` in place, and the directions ``d = m / (√v / r + e) + wd·x`` (new,
    in ``v``'s dtype, with ``x`` before the step), one loop per tensor."""
    directions = []
    for i, (x, m, v, g) in enumerate(zip(params, avgs, sq_avgs, grads)):
        w1, w2, r, e, c, decay = (table[j, i] for j in range(6))
        wide = work_dtype(v.dtype)
        gw, mw, vw, xw = g.to(wide), m.to(wide), v.to(wide), x.to(wide)
        m_new, v_new, u = adam_terms(mw, vw, gw, w1, w2, r, e)
        d = u + decay * xw
        m.copy_(m_new)
        v.copy_(v_new)
        x.copy_(xw + c * d)
        directions.append(d)
    return directions


def run_adam_step(
    owner: str,
    params: list[Tensor],
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    grads: list[Tensor],
    scalars: Sequence[Sequence[float]],
) -> list[Tensor]:
    """:func:`adam_step` compiled on each device-and-dtype bucket; ``scalars[i]`` is tensor ``i``'s
    ``(w1, w2, r, e, c, wd)``.  Returns the directions in the input order."""
    out: list[Tensor | None] = [None] * len(avgs)
    for index, directions in run_with_table(owner, adam_step, (params, avgs, sq_avgs, grads), scalars):
        for i, u in zip(index, directions):
            out[i] = u
    return out  # type: ignore[return-value]
