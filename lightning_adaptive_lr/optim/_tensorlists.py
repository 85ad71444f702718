"""Elementwise operations over lists of tensors, each with a multi-tensor and a per-tensor body.

``foreach=True`` runs ``torch._foreach_*`` kernels over buckets of one device and dtype (see
:func:`group_by_device_and_dtype`); ``foreach=False`` loops tensor by tensor.  Both give the same
numbers.  One convention for every function here and in :mod:`._directions`: the lists may mix
devices and dtypes (each function buckets them itself), and results come back in input order.  Reductions over parameters live in :mod:`._reduce`, base directions in
:mod:`._directions`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "add_scaled_",
    "clamp_",
    "clone",
    "copy_",
    "divide_",
    "exponential_average_",
    "group_by_device_and_dtype",
    "multiply_",
    "subtract_",
]


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


def exponential_average_(avgs: list[Tensor], values: list[Tensor], weight: float, *, foreach: bool) -> None:
    """Exponential average in place: ``avg ← (1 − weight)·avg + weight·value`` (one lerp)."""
    if foreach:
        for a, v in group_by_device_and_dtype(avgs, values):
            torch._foreach_lerp_(a, v, weight)
    else:
        for a, v in zip(avgs, values):
            a.lerp_(v, weight)


def add_scaled_(
    xs: list[Tensor], ys: list[Tensor], alpha: float | Tensor | Sequence[float], *, foreach: bool
) -> None:
    """``xs[i] += alpha·ys[i]`` in place; ``alpha`` a number, a 0-d tensor, or one number per tensor.

    A 0-d tensor keeps the step size on the device (on accelerators reading it would cost a
    device-to-host synchronization).  With one number per tensor, accelerators take a scaled
    temporary and one add; the CPU, where foreach kernels are loops anyway and a parameter-sized
    temporary costs more than it saves, a loop of fused adds.
    """
    if isinstance(alpha, Sequence):
        alphas = list(alpha)
        if alphas and all(a == alphas[0] for a in alphas):
            add_scaled_(xs, ys, alphas[0], foreach=foreach)
            return
        for x_b, y_b, index in group_by_device_and_dtype(xs, ys, list(range(len(xs)))):
            scales = [alphas[i] for i in index]
            if foreach and x_b[0].device.type != "cpu":
                torch._foreach_add_(x_b, torch._foreach_mul(y_b, scales))
            else:
                for x, y, a in zip(x_b, y_b, scales):
                    x.add_(y, alpha=a)
        return
    for x_b, y_b in group_by_device_and_dtype(xs, ys):
        scale = alpha.to(device=x_b[0].device, dtype=x_b[0].dtype) if isinstance(alpha, Tensor) else alpha
        if foreach and isinstance(scale, Tensor):
            torch._foreach_add_(x_b, torch._foreach_mul(y_b, scale))
        elif foreach:
            torch._foreach_add_(x_b, y_b, alpha=scale)
        elif isinstance(scale, Tensor):
            for x, y in zip(x_b, y_b):
                x.add_(y * scale)
        else:
            for x, y in zip(x_b, y_b):
                x.add_(y, alpha=scale)


def _each_bucket_(op: str, *lists: list[Any], foreach: bool, scalar: Any = None) -> None:
    """``torch._foreach_<op>_`` per bucket, or ``tensor.<op>_`` per tensor: ``xs[i] <op>= ys[i]`` or ``<op>= scalar``."""
    extra = () if scalar is None else (scalar,)
    if foreach:
        for bucket in group_by_device_and_dtype(*lists):
            getattr(torch, f"_foreach_{op}_")(*bucket, *extra)
        return
    for items in zip(*lists):
        getattr(items[0], f"{op}_")(*items[1:], *extra)


def multiply_(xs: list[Tensor], factor: float, *, foreach: bool) -> None:
    """``xs[i] *= factor`` in place."""
    _each_bucket_("mul", xs, foreach=foreach, scalar=factor)


def divide_(xs: list[Tensor], divisor: float, *, foreach: bool) -> None:
    """``xs[i] /= divisor`` in place."""
    _each_bucket_("div", xs, foreach=foreach, scalar=divisor)


def subtract_(xs: list[Tensor], ys: list[Tensor], *, foreach: bool) -> None:
    """``xs[i] -= ys[i]`` in place."""
    _each_bucket_("sub", xs, ys, foreach=foreach)


def copy_(dst: list[Tensor], src: list[Tensor], *, foreach: bool) -> None:
    """``dst[i] ← src[i]`` in place."""
    _each_bucket_("copy", dst, src, foreach=foreach)


def clone(xs: list[Tensor], *, foreach: bool) -> list[Tensor]:
    """New copies of ``xs``, in input order."""
    if not foreach:
        return [x.detach().clone() for x in xs]
    out: list[Tensor] = list(xs)
    for bucket, index in group_by_device_and_dtype(list(xs), list(range(len(xs)))):
        for i, c in zip(index, torch._foreach_mul(bucket, 1.0)):
            out[i] = c
    return out


def clamp_(xs: list[Tensor], low: float, high: float, *, foreach: bool) -> None:
    """Clip every tensor to ``[low, high]`` in place (an infinite side is not applied)."""
    if not xs:
        return
    if foreach:
        for (bucket,) in group_by_device_and_dtype(xs):
            if low != -math.inf:
                torch._foreach_clamp_min_(bucket, low)
            if high != math.inf:
                torch._foreach_clamp_max_(bucket, high)
        return
    for x in xs:
        x.clamp_(min=None if low == -math.inf else low, max=None if high == math.inf else high)
