"""The ``compiled=True`` body of AdaL: one TorchInductor pass per tensor bucket.

The math is the eager body's (:func:`~.adal._adal`, docs/algorithms.md §4): per tensor, with its
scalars from :func:`~.adal.adal_scalars` (the moment weights ``w1``, ``w2``, the signed step
coefficient ``c``, the eps term ``e``) and the decoupled weight decay ``decay``::

    m ← m + w1·(g − m),   v ← (1 − w2)·v + w2·g²
    x ← decay·x + c·m/(√v + e)                    (eps in the denominator)
    x ← decay·x + c·m·(min(1/√v, cap) + e)        (eps in the preconditioner, the default)

in one loop per tensor: 7 parameter-sized accesses (read ``x, g, m, v``, write ``m, v, x``), as
``torch.optim.Adam(fused=True)``, against 13 to 16 for the eager body's separate passes.  The gate
and the outcome check (``‖g‖₁``, :func:`~.adal.adal_step_fits`) run before, on the host's scalars, as
in the eager path, so the pass only writes; under ``capturable=True`` they run on the device and the
pass keeps every value where the gate's ``ok`` is false.  The per-tensor scalars go in as one float64 table per
bucket (5 × tensors): numbers that change every step must be tensors, or each step would compile.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._adam_compiled import adam_moments
from ._compiled import run_with_table, scalar
from ._directions import rsqrt_cap
from ._reduce import work_dtype

__all__ = ["adal_update", "run_adal_update"]


def adal_update(
    params: list[Tensor],
    grads: list[Tensor],
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    table: Tensor,
    eps_in_denominator: bool,
    ok: Tensor,
) -> None:
    """Per tensor ``i`` with ``(w1, w2, c, e, decay) = table[:, i]``: the moments and the step, one loop;
    every value kept as it was where ``ok`` (a 0-d bool: the capturable step's gate) is false."""
    for i, (x, g, m, v) in enumerate(zip(params, grads, avgs, sq_avgs)):
        w1, w2, c, e, decay = table[0, i], table[1, i], table[2, i], table[3, i], table[4, i]
        work = work_dtype(x.dtype)
        xw, gw, mw, vw = x.to(work), g.to(work), m.to(work), v.to(work)
        m_new, v_new = adam_moments(mw, vw, gw, w1, w2)
        if eps_in_denominator:
            u = m_new / (v_new.sqrt() + e)
        else:
            u = m_new * (torch.clamp(v_new.rsqrt(), max=rsqrt_cap(v.dtype)) + e)
        m.copy_(torch.where(ok, m_new, m))
        v.copy_(torch.where(ok, v_new, v))
        x.copy_(torch.where(ok, xw * decay + c * u, x))


def run_adal_update(
    params: list[Tensor],
    grads: list[Tensor],
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    scalars: Sequence[Sequence[float]],
    eps_in_denominator: bool,
) -> None:
    """:func:`adal_update` compiled, on each device-and-dtype bucket; ``scalars[i]`` is tensor ``i``'s
    ``(w1, w2, c, e, decay)``."""
    run_with_table("AdaL", adal_update, (params, grads, avgs, sq_avgs), scalars, eps_in_denominator, scalar(True))
