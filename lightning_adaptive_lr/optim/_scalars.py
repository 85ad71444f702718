"""Scalar arithmetic that works on Python floats and on 0-d tensors alike.

After its one synchronization per step an optimizer may hold some scalars as Python floats and
others as 0-d device tensors (see :meth:`AdaptiveOptimizer._to_host_if_free`; the ``capturable``
steps hold them all on the device).  Writing the step-size formulas once with these helpers keeps a
single source of truth for both cases.  A number meeting a tensor goes into the kernel as its
argument (``clamp``, ``where``): no tensor is made from a Python number, which a CUDA graph could
not capture.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

__all__ = ["Scalar", "safe_div", "smax", "smin", "where"]


def _is_number(value: Scalar) -> bool:
    return not isinstance(value, Tensor)


def smin(a: Scalar, b: Scalar) -> Scalar:
    """``min(a, b)``."""
    if _is_number(a) and _is_number(b):
        return min(a, b)
    if _is_number(b) or _is_number(a):  # a number goes into the kernel as its argument
        tensor, number = (a, b) if _is_number(b) else (b, a)
        return torch.clamp(tensor, max=number)
    return torch.minimum(a, b)


def smax(a: Scalar, b: Scalar) -> Scalar:
    """``max(a, b)``."""
    if _is_number(a) and _is_number(b):
        return max(a, b)
    if _is_number(b) or _is_number(a):
        tensor, number = (a, b) if _is_number(b) else (b, a)
        return torch.clamp(tensor, min=number)
    return torch.maximum(a, b)


def where(condition: bool | Tensor, a: Scalar, b: Scalar) -> Scalar:
    """``a if condition else b``."""
    if not isinstance(condition, Tensor):
        return a if condition else b
    if _is_number(a) and _is_number(b):
        return torch.where(condition, torch.full_like(condition, a, dtype=torch.float64), b)
    return torch.where(condition, a, b)


def safe_div(numerator: Scalar, denominator: Scalar) -> Scalar:
    """``numerator / denominator``, and 0 where the denominator is not positive."""
    if _is_number(numerator) and _is_number(denominator):
        return numerator / denominator if denominator > 0 else 0.0
    if _is_number(denominator):
        return numerator / denominator if denominator > 0 else torch.zeros_like(numerator)
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)
