"""The SGD bases' steps as one TorchInductor loop per tensor (``compiled=True``).

Four steps, each fused into one pass over every tensor, with its per-tensor scalars in a table
(``table[:, i]`` for tensor ``i``), to be run with :func:`~._compiled.run_with_table`:

* :func:`heavy_ball_step` (QLAB's ``"sgdm"`` trial step): ``b ← μ·b + (g + wd·x)``, ``x ← x − η·b``.
  Reads ``x, g, b``, writes ``x, b``: 5 parameter-sized accesses where the foreach kernels take 8
  (a multiply, an add, the step), and 11 with weight decay.
* :func:`nesterov_step` (HierarchicalHD's ``"sgdn"``): ``b ← μ·b + g``, ``s = g + μ·b``,
  ``prev ← s``, ``x ← x − η·s``: 6 accesses where the foreach kernels take 11.
* :func:`kept_step` (HierarchicalHD's ``"sgd"``, Step-Tuned SGD's first half-step): ``prev ← g``,
  ``x ← x − η·g``: 4 accesses where a copy and a step take 5.
* :func:`difference_average_step` (Step-Tuned SGD's second half-step): ``x ← x − η·g_b``,
  ``D ← D + w·((g_a − g_b) − D)``: 6 accesses where the foreach kernels take 9.

A new buffer is zeros: ``μ·0 + g`` is ``g``, as ``torch.optim.SGD`` starts its buffer.  Products are
formed in :func:`~._reduce.work_dtype` (float32 for 16-bit tensors) and rounded once, on writing.
"""

from __future__ import annotations

from torch import Tensor

from ._reduce import work_dtype

__all__ = ["difference_average_step", "heavy_ball_step", "kept_step", "nesterov_step"]


def heavy_ball_step(params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], table: Tensor) -> None:
    """``b ← μ·b + (g + wd·x)``, ``x ← x − η·b``; ``(μ, η, wd) = table[:, i]``."""
    for i, (x, g, b) in enumerate(zip(params, grads, buffers)):
        mu, rate, decay = table[0, i], table[1, i], table[2, i]
        wide = work_dtype(x.dtype)
        xw = x.to(wide)
        b_new = mu * b.to(wide) + (g.to(wide) + decay * xw)
        b.copy_(b_new)
        x.copy_(xw - rate * b_new)


def nesterov_step(
    params: list[Tensor], grads: list[Tensor], buffers: list[Tensor], prevs: list[Tensor], table: Tensor
) -> None:
    """``b ← μ·b + g``, ``s = g + μ·b``, ``prev ← s``, ``x ← x − η·s``; ``(μ, η) = table[:, i]``."""
    for i, (x, g, b, prev) in enumerate(zip(params, grads, buffers, prevs)):
        mu, rate = table[0, i], table[1, i]
        wide = work_dtype(x.dtype)
        gw = g.to(wide)
        b_new = mu * b.to(wide) + gw
        s = gw + mu * b_new
        b.copy_(b_new)
        prev.copy_(s)
        x.copy_(x.to(wide) - rate * s)


def kept_step(params: list[Tensor], grads: list[Tensor], prevs: list[Tensor], table: Tensor) -> None:
    """``prev ← g``, ``x ← x − η·g``; ``η = table[0, i]``."""
    for i, (x, g, prev) in enumerate(zip(params, grads, prevs)):
        wide = work_dtype(x.dtype)
        prev.copy_(g)
        x.copy_(x.to(wide) - table[0, i] * g.to(wide))


def difference_average_step(
    params: list[Tensor], grads: list[Tensor], firsts: list[Tensor], diff_avgs: list[Tensor], table: Tensor
) -> None:
    """``x ← x − η·g_b``, ``D ← lerp(D, g_a − g_b, w)``; ``(η, w) = table[:, i]``, ``g_a`` in ``firsts``.

    ``g_a − g_b`` is rounded to the tensors' dtype before it enters the average, as the eager
    body's subtraction into ``g_a``'s buffer rounds it."""
    for i, (x, g, first, avg) in enumerate(zip(params, grads, firsts, diff_avgs)):
        rate, weight = table[0, i], table[1, i]
        wide = work_dtype(x.dtype)
        second = g.to(wide)
        difference = (first.to(wide) - second).to(first.dtype).to(wide)
        avg.copy_(avg.to(wide).lerp(difference, weight.to(wide)))
        x.copy_(x.to(wide) - rate * second)
