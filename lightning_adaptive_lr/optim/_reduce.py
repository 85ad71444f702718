"""Every reduction over parameters, in one place.

The adaptive methods need a few scalars per step that are sums over *every* element of *every*
parameter (⟨a, b⟩, ‖a‖², ‖a‖₁), or over one tensor or one output unit at a time.  Nothing else in
:mod:`lightning_adaptive_lr.optim` sums over parameter elements: this module is the only code that
has to know how parameters are laid out (on one device, across dtypes, and, for sharded training,
across processes), so that a layout is handled once for all six methods.

Conventions, the same for every function:

* products and partial sums are taken in :func:`work_dtype` (16-bit inputs promoted to float32:
  their squares overflow and their small sums vanish);
* the per-tensor partial sums are then added in :func:`accumulation_dtype` (float64 where the
  device has it), on the device given, as 0-d (global) or 1-d (per tensor) tensors: nothing is
  read to the host here; the optimizer's gate decides when that happens;
* a complex tensor counts as its real pairs (``torch.view_as_real``), as the optimizers treat
  complex parameters: ``⟨z, w⟩ = Σ Re z·Re w + Im z·Im w``, ``‖z‖₁ = Σ |Re z| + |Im z|``.  (The
  optimizers hand real views over already; this keeps any other caller from dropping the
  imaginary parts.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._compiled import run_compiled
from ._tensorlists import group_by_device_and_dtype

__all__ = [
    "accumulation_dtype",
    "dot",
    "l1_norms",
    "pair_dot",
    "sqnorm",
    "sum_partials",
    "tensor_dots",
    "tensor_extrema",
    "tensor_sums",
    "unit_dots",
    "work_dtype",
]


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype partial sums are added in: float64, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype``, or float32 for 16-bit dtypes: what products and partial sums are computed in."""
    return torch.promote_types(dtype, torch.float32)


def _real(x: Tensor) -> Tensor:
    """``x``, or its real pairs if it is complex."""
    return torch.view_as_real(x.resolve_conj()) if x.is_complex() else x


def _sum(x: Tensor, acc: torch.dtype) -> Tensor:
    """``Σ x`` in :func:`work_dtype`, as a 0-d ``acc`` tensor on ``x``'s device."""
    x = _real(x)
    return x.sum(dtype=work_dtype(x.dtype)).to(acc)


def _zero(device: torch.device) -> Tensor:
    return torch.zeros((), device=device, dtype=accumulation_dtype(device))


def _work_dot(x: Tensor, y: Tensor) -> Tensor:
    """``⟨x, y⟩`` by one BLAS dot in :func:`work_dtype`, a 0-d tensor on ``x``'s device (conversions
    only where needed: on ResNet's 62 tensors the no-op ones cost a tenth of a millisecond a step)."""
    x, y = _real(x).reshape(-1), _real(y).reshape(-1)
    work = work_dtype(x.dtype)
    if x.dtype != work:
        x = x.to(work)
    if y.dtype != work or y.device != x.device:
        y = y.to(device=x.device, dtype=work)
    return torch.dot(x, y)


def _plain_dots(xs: Sequence[Tensor], ys: Sequence[Tensor | None]) -> list[Tensor] | None:
    """``⟨xs[i], ys[i]⟩`` by one BLAS dot each when every tensor is a real float32 or float64 tensor of
    one dtype on one device (the usual case: nothing to convert), else ``None``.  Checked once for the
    lists, not per pair: on ResNet's 62 tensors the per-pair checks of :func:`_work_dot` were half of
    the dots' host time."""
    dtype, device = xs[0].dtype, xs[0].device
    if dtype not in (torch.float32, torch.float64):
        return None
    for x, y in zip(xs, ys, strict=True):
        if y is None or x.dtype != dtype or y.dtype != dtype or x.device != device or y.device != device:
            return None
    return [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)]


def pair_dot(x: Tensor, y: Tensor, acc: torch.dtype) -> Tensor:
    """``⟨x, y⟩`` of one pair by one BLAS dot in :func:`work_dtype`, as a 0-d ``acc`` tensor on ``x``'s device."""
    return _work_dot(x, y).to(acc)


def tensor_dots(xs: Sequence[Tensor], ys: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """``⟨xs[i], ys[i]⟩`` per tensor, as a 1-d :func:`accumulation_dtype` tensor on ``device``.

    A ``None`` in ``ys`` contributes ``0·Σ xs[i]``: zero, but non-finite when ``xs[i]`` is, so a
    gate that reads the result still sees every entry of ``xs``.
    """
    acc = accumulation_dtype(device)
    if not xs:
        return torch.zeros(0, device=device, dtype=acc)
    plain = _plain_dots(xs, ys)
    if plain is not None:
        return torch.stack(plain).to(device=device, dtype=acc)
    if all(y is not None for y in ys) and len({(x.device, work_dtype(x.dtype)) for x in xs}) == 1:
        # The usual case: one stack of the dots in their work dtype, converted once.
        return torch.stack([_work_dot(x, y) for x, y in zip(xs, ys, strict=True)]).to(device=device, dtype=acc)
    parts = [
        pair_dot(x, y, acc) if y is not None else _sum(x, acc) * 0.0 for x, y in zip(xs, ys, strict=True)
    ]
    return torch.stack([p.to(device) for p in parts])


def tensor_sums(xs: Sequence[Tensor], device: torch.device) -> Tensor:
    """``Σ xs[i]`` per tensor, as a 1-d :func:`accumulation_dtype` tensor on ``device``."""
    acc = accumulation_dtype(device)
    if not xs:
        return torch.zeros(0, device=device, dtype=acc)
    return torch.stack([_sum(x, acc).to(device) for x in xs])


def tensor_extrema(xs: Sequence[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """The smallest and the largest element over all of ``xs``, as 0-d tensors on ``device``.

    Empty tensors (a process's empty slice of a sharded parameter) are left out; with nothing
    left, both are 0, which neither a magnitude bound nor a finiteness check notices.
    """
    acc = accumulation_dtype(device)
    pairs = [torch.aminmax(_real(x)) for x in xs if x.numel()]
    if not pairs:
        return _zero(device), _zero(device)
    low = torch.stack([lo.to(device=device, dtype=acc) for lo, _ in pairs])
    high = torch.stack([hi.to(device=device, dtype=acc) for _, hi in pairs])
    return low.min(), high.max()


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor], device: torch.device) -> Tensor:
    """Global inner product ``Σ_i ⟨xs[i], ys[i]⟩`` as a 0-d tensor on ``device``."""
    if not xs:
        return _zero(device)
    return tensor_dots(xs, ys, device).sum()


def sqnorm(xs: Sequence[Tensor], device: torch.device) -> Tensor:
    """Global squared Euclidean norm ``Σ_i ‖xs[i]‖²`` as a 0-d tensor on ``device``.

    On accelerators one multi-tensor ``_foreach_powsum`` kernel per device-and-dtype bucket; on the
    CPU a BLAS dot of each tensor with itself, which reads it once too and took 0.53–0.55× fused
    SGD's step on ResNet-18 against 0.76–0.78× for the multi-tensor norm (docs/benchmarks.md).
    """
    powsum = getattr(torch, "_foreach_powsum", None)
    if powsum is None:
        return dot(xs, xs, device)
    acc = accumulation_dtype(device)
    parts = []
    for (bucket,) in group_by_device_and_dtype(list(xs)):
        if bucket[0].is_complex():
            bucket = [_real(x) for x in bucket]
        work = work_dtype(bucket[0].dtype)
        if bucket[0].device.type == "cpu":
            sums = _plain_dots(bucket, bucket) or [_work_dot(x, x) for x in bucket]
        else:
            sums = powsum(bucket, 2, dtype=None if work == bucket[0].dtype else work)
        parts.append(torch.stack(list(sums)).to(device=device, dtype=acc).sum())
    return torch.stack(parts).sum() if parts else _zero(device)


def _l1_sums(xs: list[Tensor]) -> Tensor:
    """``‖x‖₁`` of each tensor in :func:`work_dtype`, stacked: the body :func:`l1_norms` compiles."""
    return torch.stack([x.abs().sum(dtype=work_dtype(x.dtype)) for x in xs])


def l1_norms(xs: Sequence[Tensor], device: torch.device, *, foreach: bool, compiled_by: str | None = None) -> Tensor:
    """``‖xs[i]‖₁`` per tensor, in input order, as a 1-d :func:`accumulation_dtype` tensor on ``device``.

    On accelerators the multi-tensor path is one ``_foreach_norm`` kernel per bucket; on the CPU,
    where that kernel is a loop over a norm several times slower than ``abs().sum()``, both paths
    take the latter (which writes ``|x|`` before summing it).  With ``compiled_by`` (the name of the
    ``compiled=True`` optimizer asking, for its errors) the sums are one ``torch.compile``\\ d graph
    per bucket, reading each tensor once: 0.7× fused SGD's step on ResNet-18 here against 1.2× for
    ``abs().sum()`` (docs/benchmarks.md).
    """
    acc = accumulation_dtype(device)
    placed: list[Tensor | None] = [None] * len(xs)
    for bucket, index in group_by_device_and_dtype(list(xs), list(range(len(xs)))):
        if bucket[0].is_complex():
            bucket = [_real(x) for x in bucket]
        work = work_dtype(bucket[0].dtype)
        if compiled_by is not None:
            norms = run_compiled(compiled_by, _l1_sums, bucket)
        elif foreach and bucket[0].device.type != "cpu":
            norms = torch._foreach_norm(bucket, 1, dtype=work)
        else:
            norms = [t.abs().sum(dtype=work) for t in bucket]
        values = torch.stack(list(norms)).to(device, acc)
        if len(index) == len(xs):
            return values
        for i, value in zip(index, values):  # back in input order, with no index copied to the device
            placed[i] = value
    return torch.stack(placed) if placed else torch.zeros(0, device=device, dtype=acc)  # type: ignore[arg-type]


def unit_dots(x: Tensor, y: Tensor) -> Tensor:
    """Per-output-unit inner products ``Σ_{i in unit u} x_i·y_i`` (units along dim 0), in :func:`work_dtype`.

    One batched dot: no product temporary.  A 0-d tensor is one unit.
    """
    n = x.shape[0] if x.dim() > 0 else 1
    if x.is_complex() or y.is_complex():  # a unit's elements are the real pairs of its entries
        x, y = _real(x), _real(y)
    dtype = work_dtype(x.dtype)
    if x.numel() == 0:  # no units here (an empty shard), or units without elements
        return torch.zeros(n, device=x.device, dtype=dtype)
    return torch.bmm(x.reshape(n, 1, -1).to(dtype), y.reshape(n, -1, 1).to(dtype)).reshape(n)


def sum_partials(partials: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Add the per-tensor partial sums of compiled kernels in :func:`accumulation_dtype`.

    Each element of ``partials`` is one kernel call's ``(kinds, tensors)`` array; returns one 0-d
    tensor per kind (row), on ``device``.
    """
    acc = accumulation_dtype(device)
    table = torch.cat([p.to(device=device, dtype=acc) for p in partials], dim=1)
    return list(table.sum(dim=1))
