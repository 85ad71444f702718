"""The ``compiled=True`` bodies of MoMo and MoMo-Adam: two TorchInductor passes per tensor bucket.

The math is the eager path's (:mod:`.momo`, docs/algorithms.md §1); only the memory traffic
differs.  Each step runs, per device-and-dtype bucket (see :mod:`._compiled`):

1. a **read-only** pass over the state *before* the step: the averages after the step are formed
   in registers and only the per-tensor partial sums the step size needs come out (``⟨g, x⟩``,
   ``⟨d', x⟩`` and ``‖d'‖²`` for MoMo; ``⟨g, x⟩``, ``⟨d', x⟩``, ``⟨d', u⟩`` and the largest ``v'``
   as stored for MoMo-Adam), written into a table the caller allocates (:func:`~._compiled.run_sums`:
   returned as new tensors they cost an allocation each, 0.15 ms a step over ResNet-18's 62
   tensors; added over the bucket inside the kernel, they split each tensor's loop in three), to be
   added by :func:`~._reduce.sum_partials`; the gate reads them, so a step whose new state would not be finite is skipped before anything
   is written;
2. after the gate, a **pointwise** pass that forms the same averages again, writes them and moves
   the parameters.  Under ``capturable=True`` the gate's decision is a device tensor ``ok`` and
   this pass keeps every value ``where`` it is false: the step reads nothing to the host.

Counted in parameter-sized reads and writes per step, MoMo takes 8 (read ``d, g, x`` twice, write
``d, x``) and MoMo-Adam 11 (read ``d, v, g, x`` twice, write ``d, v, x``).  Averages start at zero
(a state not stored yet is passed as zeros); MoMo's first step without bias correction takes the
gradient whole (``weight = 1``), which is the eager path's copy of the first gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._adam_compiled import adam_terms
from ._compiled import run_on_buckets, run_sums, state_or_zeros
from ._reduce import work_dtype

__all__ = ["momo_adam_sums", "momo_adam_update", "momo_sums", "momo_update", "run_on_buckets", "run_sums", "state_or_zeros"]


def _work(t: Tensor) -> Tensor:
    """``t`` in :func:`~._reduce.work_dtype`, the dtype partial sums are taken in (as :func:`~._reduce.dot`)."""
    return t.to(work_dtype(t.dtype))


# --------------------------------------------------------------------------- MoMo


def momo_sums(avgs: list[Tensor], grads: list[Tensor], params: list[Tensor], weight: Tensor, out: Tensor) -> None:
    """Per tensor ``⟨g, x⟩``, ``⟨d', x⟩`` and ``‖d'‖²`` into the columns of ``out`` (3 × n; nothing else is
    written); ``d' = d + weight·(g − d)``."""
    for i, (d, g, x) in enumerate(zip(avgs, grads, params)):
        d, g, x = _work(d), _work(g), _work(x)
        d_next = d + weight * (g - d)
        out[0, i] = (g * x).sum()
        out[1, i] = (d_next * x).sum()
        out[2, i] = (d_next * d_next).sum()


def momo_update(
    avgs: list[Tensor],
    grads: list[Tensor],
    params: list[Tensor],
    weight: Tensor,
    step: Tensor,
    divisor: Tensor,
    ok: Tensor,
) -> None:
    """``d ← d + weight·(g − d)``, then ``x ← (x − step·d) / divisor``: one loop per tensor; both
    kept as they were where ``ok`` (a 0-d bool: the capturable step's gate) is false."""
    for d, g, x in zip(avgs, grads, params):
        d_next = d + weight * (g - d)
        d.copy_(torch.where(ok, d_next, d))
        x.copy_(torch.where(ok, (x - step * d_next) / divisor, x))


# --------------------------------------------------------------------------- MoMo-Adam


def momo_adam_sums(
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    grads: list[Tensor],
    params: list[Tensor],
    weight1: Tensor,
    weight2: Tensor,
    root: Tensor,
    eps: Tensor,
    out: Tensor,
) -> None:
    """Per tensor ``⟨g, x⟩``, ``⟨d', x⟩``, ``⟨d', u⟩`` and ``max v'`` in ``v``'s dtype, where it is
    stored (infinite if it overflows there), into the columns of ``out`` (4 × n; nothing else is written)."""
    for i, (d, v, g, x) in enumerate(zip(avgs, sq_avgs, grads, params)):
        stored = v.dtype
        d, v, g, x = _work(d), _work(v), _work(g), _work(x)
        d_next, v_next, u = adam_terms(d, v, g, weight1, weight2, root, eps)
        out[0, i] = (g * x).sum()
        out[1, i] = (d_next * x).sum()
        out[2, i] = (d_next * u).sum()
        # An empty shard (FSDP2 shards unevenly) has no largest element: 0 (shapes are fixed per compile).
        out[3, i] = v_next.to(stored).amax() if v_next.numel() else 0.0


def momo_adam_update(
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    grads: list[Tensor],
    params: list[Tensor],
    weight1: Tensor,
    weight2: Tensor,
    root: Tensor,
    eps: Tensor,
    step: Tensor,
    keep: Tensor,
    divisor: Tensor,
    ok: Tensor,
) -> None:
    """Write ``d'`` and ``v'``, then ``x ← (keep·x − step·u) / divisor``: one loop per tensor; all
    kept as they were where ``ok`` (a 0-d bool: the capturable step's gate) is false."""
    for d, v, g, x in zip(avgs, sq_avgs, grads, params):
        d_next, v_next, u = adam_terms(d, v, g, weight1, weight2, root, eps)
        d.copy_(torch.where(ok, d_next, d))
        v.copy_(torch.where(ok, v_next, v))
        x.copy_(torch.where(ok, (keep * x - step * u) / divisor, x))
