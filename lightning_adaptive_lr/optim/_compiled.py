"""Running an optimizer's per-tensor math as ``torch.compile``\\ d (TorchInductor) kernels.

The ``compiled=True`` paths (:class:`~lightning_adaptive_lr.MoMo`,
:class:`~lightning_adaptive_lr.MoMoAdam`) split each step into two compiled functions over a
bucket of tensors:

1. a **read-only** pass that computes, from the state *before* the step and the gradient, the
   per-tensor partial sums the step size needs (the averages after the step are formed in
   registers and never written);
2. after the gate has read the sums, a **pointwise** pass that recomputes the same averages,
   writes them and moves the parameters.

Inductor emits one loop per tensor for each: a pass that both mutates a tensor and reduces over
its new value comes out as two loops (the reduction, then the write-back), streaming the memory
twice, which is what the split avoids.  Scalars that change from step to step (step sizes,
schedules) go in as 0-d float64 tensors: a Python float would be baked into the kernel and
recompile it every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._tensorlists import group_by_device_and_dtype

__all__ = ["ensure_inductor_works", "run_compiled", "run_on_buckets", "run_sums", "run_with_table", "scalar", "state_or_zeros"]

_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}
#: Compiled variants (sets of shapes, dtypes, devices) one step function may have in a process.
RECOMPILE_LIMIT = 256
_INDUCTOR_CHECKED: set[str] = set()


def _compile_error(owner: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"{owner}(compiled=True) could not compile its step with torch.compile (TorchInductor): "
        f"{type(err).__name__}: {err}. Inductor needs a working C++ compiler on CPU (and Triton on "
        "GPU); install one or construct the optimizer with compiled=False."
    )


def ensure_inductor_works(owner: str, device: torch.device) -> None:
    """Compile a one-line function once per device type, before the first step changes any state.

    A missing compiler then surfaces as a clear error instead of a half-updated optimizer.
    """
    if device.type in _INDUCTOR_CHECKED:
        return
    try:
        probe = torch.compile(lambda t: (t * 2.0).sum(), backend="inductor", fullgraph=True, dynamic=False)
        probe(torch.ones(4, device=device))
    except Exception as err:  # Inductor raises many types (BackendCompilerFailed, CalledProcessError, ...)
        raise _compile_error(owner, err) from err
    _INDUCTOR_CHECKED.add(device.type)


def run_compiled(owner: str, function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function`` compiled (once per set of shapes: ``dynamic=False``), errors named clearly."""
    compiled = _COMPILED.get(function)
    if compiled is None:
        compiled = _COMPILED[function] = torch.compile(function, backend="inductor", fullgraph=True, dynamic=False)
    try:
        # One compiled variant per set of shapes, dtypes and devices: a process that steps many
        # models (a sweep, a test suite) needs more than torch's default of 8 per function.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return compiled(*args)
    except Exception as err:
        raise _compile_error(owner, err) from err


def scalar(value: float | bool | Tensor, device: torch.device | None = None) -> Tensor:
    """A step's scalar as a compiled function's argument: a 0-d tensor (kept as is if it is one).

    On the CPU unless ``device`` is given: the ``capturable`` steps keep every scalar on the
    parameters' device (made by a fill kernel, not copied from the host)."""
    if isinstance(value, Tensor):
        return value if device is None else value.to(device)
    dtype = torch.bool if isinstance(value, bool) else torch.float64
    return torch.tensor(value, dtype=dtype) if device is None else torch.full((), value, dtype=dtype, device=device)


def run_on_buckets(
    owner: str, function: Callable[..., Any], columns: tuple[list[Tensor], ...], *scalars: Tensor
) -> list[Any]:
    """``function`` compiled, called on each device-and-dtype bucket of ``columns`` (then ``scalars``)."""
    results = []
    for bucket in group_by_device_and_dtype(*columns):
        ensure_inductor_works(owner, bucket[0][0].device)
        results.append(run_compiled(owner, function, *bucket, *scalars))
    return results


def run_sums(owner: str, function: Callable[..., Any], columns: tuple[list[Tensor], ...], rows: int, *scalars: Tensor) -> list[Tensor]:
    """``function`` compiled on each device-and-dtype bucket of ``columns`` (then ``scalars``), given a
    ``rows`` × tensors table to write its per-tensor sums into (in the work dtype of the bucket's
    last column, the parameters'); returns the tables.  The table is allocated here, once per call:
    sums a compiled function returned would each be a new tensor."""
    tables = []
    for bucket in group_by_device_and_dtype(*columns):
        params = bucket[-1]
        ensure_inductor_works(owner, params[0].device)
        work = torch.promote_types(params[0].dtype, torch.float32)  # _reduce.work_dtype (which imports this module)
        table = torch.empty((rows, len(params)), device=params[0].device, dtype=work)
        run_compiled(owner, function, *bucket, *scalars, table)
        tables.append(table)
    return tables


def run_with_table(
    owner: str, function: Callable[..., Any], columns: tuple[list[Tensor], ...], scalars: Sequence[Sequence[float]], *args: Any
) -> list[tuple[list[int], Any]]:
    """``function`` compiled on each device-and-dtype bucket of ``columns``, given the bucket's rows
    of ``scalars`` (one row per tensor) as one float64 table, scalars × tensors, on its device, then
    ``args``.  Returns each bucket's tensor indices with its result.

    Per-tensor numbers that change every step go in as a table: as Python numbers they would be
    baked into the kernel and recompile it at every step."""
    results = []
    for *bucket, index in group_by_device_and_dtype(*columns, list(range(len(columns[0])))):
        device = bucket[0][0].device
        ensure_inductor_works(owner, device)
        table = torch.tensor([scalars[i] for i in index], dtype=torch.float64).T.contiguous().to(device)
        results.append((index, run_compiled(owner, function, *bucket, table, *args)))
    return results


def state_or_zeros(state: dict[str, Tensor], param: Tensor, key: str) -> Tensor:
    """``state[key]``, or new zeros not stored yet (nothing is stored before the gate has passed)."""
    buffer = state.get(key)
    return torch.zeros_like(param, memory_format=torch.preserve_format) if buffer is None else buffer
