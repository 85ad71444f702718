"""Scalar arithmetic that works on Python floats and on 0-d tensors alike.

After its one synchronization per step an optimizer may hold some scalars as Python floats and
others as 0-d device tensors (see :meth:`AdaptiveOptimizer._to_host_if_free`).  Writing the step-size
formulas once with these helpers keeps a single source of truth for both cases.
"""

from __future__ import annotations

from typing import Any, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

__all__ = ["Scalar", "safe_div", "smax", "smin", "where"]


def _as_tensor(value: Scalar, like: Tensor) -> Tensor:
    return torch.as_tensor(value, device=like.device, dtype=like.dtype)


def _pick(a: Scalar, b: Scalar, on_tensors: Any, on_floats: Any) -> Scalar:
    """``on_tensors(a, b)`` if either is a tensor (the other cast alike), else ``on_floats(a, b)``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        like = a if isinstance(a, Tensor) else b
        return on_tensors(_as_tensor(a, like), _as_tensor(b, like))  # type: ignore[arg-type]
    return on_floats(a, b)


def smin(a: Scalar, b: Scalar) -> Scalar:
    """``min(a, b)``."""
    return _pick(a, b, torch.minimum, min)


def smax(a: Scalar, b: Scalar) -> Scalar:
    """``max(a, b)``."""
    return _pick(a, b, torch.maximum, max)


def where(condition: bool | Tensor, a: Scalar, b: Scalar) -> Scalar:
    """``a if condition else b``."""
    if isinstance(condition, Tensor):
        like = a if isinstance(a, Tensor) else b if isinstance(b, Tensor) else None
        dtype = like.dtype if like is not None else torch.float64
        a = torch.as_tensor(a, device=condition.device, dtype=dtype)
        b = torch.as_tensor(b, device=condition.device, dtype=dtype)
        return torch.where(condition, a, b)
    return a if condition else b


def safe_div(numerator: Scalar, denominator: Scalar) -> Scalar:
    """``numerator / denominator``, and 0 where the denominator is not positive."""
    if isinstance(numerator, Tensor) or isinstance(denominator, Tensor):
        like = numerator if isinstance(numerator, Tensor) else denominator
        num = _as_tensor(numerator, like)
        den = _as_tensor(denominator, like)
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), 0.0)
    return numerator / denominator if denominator > 0 else 0.0
