"""Adam's moments and direction as one TorchInductor loop per tensor (``compiled=True`` bases).

:func:`~.qlab._adam_direction`'s math (``torch.optim.Adam``'s, per-parameter step counts), fused:
per tensor, with its scalars ``(w1, w2, r, e) = table[:, i]``::

    m ← m + w1·(g − m),   v ← (1 − w2)·v + w2·g²,   u = m / (√v / r + e)

``m`` and ``v`` are written in place and ``u`` comes out as a new tensor: read ``m, v, g``, write
``m, v, u`` (6 parameter-sized accesses) where the eager body takes about 17 in six kernels
(a lerp, a multiply, an addcmul, a square root, a scaled add and a division).  ``r`` and ``e``
carry both bias corrections (``r = √(1 − β2^k)/(1 − β1^k)``, ``e = eps·(1 − β1^k)``); ``v`` may be
kept wider than the parameter (float32 for 16-bit parameters): it is computed in its own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._compiled import run_with_table
from ._reduce import work_dtype

__all__ = ["adam_direction", "run_adam_direction"]


def adam_direction(avgs: list[Tensor], sq_avgs: list[Tensor], grads: list[Tensor], table: Tensor) -> list[Tensor]:
    """The moments in place and the directions ``m / (√v / r + e)`` (new, in ``v``'s dtype), one loop per tensor."""
    directions = []
    for i, (m, v, g) in enumerate(zip(avgs, sq_avgs, grads)):
        w1, w2, r, e = table[0, i], table[1, i], table[2, i], table[3, i]
        wide = work_dtype(v.dtype)
        gw, mw, vw = g.to(wide), m.to(wide), v.to(wide)
        m_new = mw + w1 * (gw - mw)
        v_new = vw * (1.0 - w2) + w2 * gw * gw
        m.copy_(m_new)
        v.copy_(v_new)
        directions.append(m_new / (v_new.sqrt() / r + e))
    return directions


def run_adam_direction(
    owner: str, avgs: list[Tensor], sq_avgs: list[Tensor], grads: list[Tensor], scalars: Sequence[Sequence[float]]
) -> list[Tensor]:
    """:func:`adam_direction` compiled on each device-and-dtype bucket; ``scalars[i]`` is tensor ``i``'s
    ``(w1, w2, r, e)``.  Returns the directions in the input order."""
    out: list[Tensor | None] = [None] * len(avgs)
    for index, directions in run_with_table(owner, adam_direction, (avgs, sq_avgs, grads), scalars):
        for i, u in zip(index, directions):
            out[i] = u
    return out  # type: ignore[return-value]
