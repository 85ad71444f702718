"""Operations over lists of tensors: grouping for ``torch._foreach_*`` kernels and global reductions.

The adaptive methods need a few *global* scalars per step (inner products and squared norms over
every parameter of every group).  They are computed here once, as 0-d tensors on the parameters'
device, so that nothing leaves the device until the optimizer decides it must.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "accumulation_dtype",
    "add_scaled_",
    "dot",
    "exponential_average_",
    "group_by_device_and_dtype",
    "pair_dot",
    "sqnorm",
    "work_dtype",
]


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype global reductions are summed in: float64, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or float32 for 16-bit dtypes: what products and partial sums are computed in
    (16-bit squares overflow, and small updates vanish in 16 bits)."""
    return torch.promote_types(dtype, torch.float32)


def group_by_device_and_dtype(*lists: Sequence[Any]) -> list[tuple[list[Any], ...]]:
    """Split parallel lists into buckets whose first-list tensors share device and dtype.

    Only the first list must hold tensors; the others (state tensors, dicts, indices) follow it.

    ``torch._foreach_*`` kernels need every tensor of one call on one device with one dtype; the
    order inside a bucket follows the input order, so results do not depend on the grouping.
    The usual case, every tensor on one device with one dtype, returns at once: this runs on the
    host every step.
    """
    first = lists[0]
    if any(len(column) != len(first) for column in lists):
        raise ValueError("group_by_device_and_dtype: the lists must have equal lengths")
    if all(t.device == first[0].device and t.dtype == first[0].dtype for t in first):
        return [tuple(list(column) for column in lists)] if first else []
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Any], ...]] = {}
    for items in zip(*lists, strict=True):
        key = (items[0].device, items[0].dtype)
        bucket = buckets.setdefault(key, tuple([] for _ in lists))
        for column, tensor in zip(bucket, items):
            column.append(tensor)
    return list(buckets.values())


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor], device: torch.device) -> Tensor:
    """Global inner product ``sum_i <xs[i], ys[i]>`` as a 0-d tensor on ``device``.

    Each pair is reduced by one BLAS dot in the tensors' own precision (half precision is promoted
    to float32 first); the per-tensor partial sums are added in :func:`accumulation_dtype`.
    """
    acc = accumulation_dtype(device)
    parts = [pair_dot(x, y, acc).to(device) for x, y in zip(xs, ys, strict=True)]
    if not parts:
        return torch.zeros((), device=device, dtype=acc)
    return torch.stack(parts).sum()


def pair_dot(x: Tensor, y: Tensor, acc: torch.dtype) -> Tensor:
    """``⟨x, y⟩`` by one BLAS dot in :func:`work_dtype`, as a 0-d ``acc`` tensor on ``x``'s device."""
    work = work_dtype(x.dtype)
    return torch.dot(x.reshape(-1).to(work), y.reshape(-1).to(device=x.device, dtype=work)).to(acc)


def sqnorm(xs: Sequence[Tensor], device: torch.device) -> Tensor:
    """Global squared Euclidean norm ``sum_i ||xs[i]||^2`` as a 0-d tensor on ``device``.

    Uses the multi-tensor ``_foreach_powsum`` kernel where torch has it (it reads each tensor once;
    a dot product of a tensor with itself streams it twice), per device-and-dtype bucket.
    """
    powsum = getattr(torch, "_foreach_powsum", None)
    if powsum is None:
        return dot(xs, xs, device)
    acc = accumulation_dtype(device)
    parts = []
    for (bucket,) in group_by_device_and_dtype(list(xs)):
        work = work_dtype(bucket[0].dtype)
        sums = powsum(bucket, 2, dtype=None if work == bucket[0].dtype else work)
        parts.append(torch.stack(list(sums)).to(device=device, dtype=acc).sum())
    if not parts:
        return torch.zeros((), device=device, dtype=acc)
    return torch.stack(parts).sum()


def exponential_average_(avgs: list[Tensor], values: list[Tensor], weight: float, *, foreach: bool) -> None:
    """Exponential average in place: ``avg ← (1 − weight)·avg + weight·value`` (one lerp)."""
    if foreach:
        for a, v in group_by_device_and_dtype(avgs, values):
            torch._foreach_lerp_(a, v, weight)
    else:
        for a, v in zip(avgs, values):
            a.lerp_(v, weight)


def add_scaled_(xs: list[Tensor], ys: list[Tensor], alpha: float | Tensor, *, foreach: bool) -> None:
    """``xs[i] += alpha * ys[i]`` in place.

    ``alpha`` may be a 0-d tensor: on accelerators the step sizes stay on the device, so that
    reading them does not cost a device-to-host synchronization.
    """
    if not xs:
        return
    if isinstance(alpha, Tensor):
        alpha = alpha.to(device=xs[0].device, dtype=xs[0].dtype)
        if foreach:
            torch._foreach_add_(xs, torch._foreach_mul(ys, alpha))
        else:
            for x, y in zip(xs, ys):
                x.add_(y * alpha)
    elif foreach:
        torch._foreach_add_(xs, ys, alpha=alpha)
    else:
        for x, y in zip(xs, ys):
            x.add_(y, alpha=alpha)
