"""How parameters are laid out across processes, and how a step's partial sums are completed.

:mod:`._reduce` sums over the elements a process holds.  Under sharded training a process holds
only a part of each parameter, so those sums are *partial*; this module says over which processes
each parameter is sharded and completes a step's partials in **one** collective:

* **DTensor** parameters (FSDP2 ``fully_shard``, HSDP, ``ModelParallelStrategy``): the local shard
  is ``_local_tensor`` (in-place writes reach the DTensor); the mesh dimensions with a ``Shard``
  placement are the ones to sum over, ``Replicate`` dimensions are not (their replicas already
  agree: summing over them would count every element once per replica).
* **FSDP1** (``FullyShardedDataParallel``): ``use_orig_params=True`` leaves plain-tensor views of
  each rank's slice of the flat parameter (flagged ``_fsdp_flattened`` by FSDP; empty where the
  slice holds none of it), ``use_orig_params=False`` hands the ``FlatParameter`` itself.  Both are
  sharded over FSDP's process group (the default group for ``FULL_SHARD``/``SHARD_GRAD_OP``).
* Plain tensors are not sharded: every process holds all of them.

:func:`complete` gathers the vector of a step's partials once (``all_gather``: a sum and a maximum
can travel together) and combines them locally, in rank order, so that every rank obtains
bit-identical values.

Tensor parallelism (``parallelize_module``: ``ColwiseParallel`` shards on dim 0, ``RowwiseParallel``
on dim 1) is DTensor sharding like any other: supported when every parameter an optimizer steps is
sharded.  What cannot be completed is refused with an error naming the fix, never computed wrong:
a mix of sharded and unsharded parameters in one optimizer (the unsharded ones, plain tensors or
``Replicate`` DTensors such as a row-wise layer's bias, would be counted once per rank),
parameters sharded over different process groups, per-output-unit sums over shards that cut
units, per-tensor quantities over FSDP1 ``FlatParameter`` objects (one of them holds many
tensors), and ``Partial`` parameters.

>>> import torch
>>> layout_of([torch.zeros(3)]) is None  # plain tensors: nothing to complete
True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "FSDP1_FLAG",
    "Layout",
    "complete",
    "is_dtensor",
    "is_flat_parameter",
    "layout_of",
    "local",
    "reshard_after_probe",
    "to_like",
]

#: Attribute FSDP1 sets on every tensor it flattened (the original parameters and the flat ones).
FSDP1_FLAG = "_fsdp_flattened"

try:  # torch >= 2.4 has the public module; DTensor needs a distributed build
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - a torch without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def is_flat_parameter(t: Any) -> bool:
    """Whether ``t`` is an FSDP1 ``FlatParameter`` (``use_orig_params=False``)."""
    return bool(getattr(t, "_is_flat_param", False))


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard (sharing its storage), else ``t``."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def to_like(value: Tensor, param: Tensor) -> Tensor:
    """``value``, a local state tensor of the DTensor ``param``, as a DTensor laid out like it.

    A tensor of the local shard's shape takes the parameter's global shape; a tensor with one
    entry per local output unit (dim 0, e.g. per-unit rates) the global number of units when the
    parameter is sharded on dim 0 only.  Anything else (0-d tensors) stays a plain tensor, as
    ``torch.optim`` keeps its ``step`` counters.
    """
    shard = local(param)
    if value.dim() == 0 or is_dtensor(value):
        return value
    placements = param.placements  # type: ignore[attr-defined]
    if value.shape == shard.shape:
        shape = param.shape
    elif (
        value.dim() >= 1
        and shard.dim() >= 1
        and value.shape[0] == shard.shape[0]
        and all(not p.is_shard() or p.dim == 0 for p in placements)  # type: ignore[attr-defined]
    ):
        shape = torch.Size((param.shape[0], *value.shape[1:]))
    else:
        return value
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(value, param.device_mesh, placements, run_check=False, shape=shape, stride=stride)  # type: ignore[union-attr,attr-defined]


@dataclass(frozen=True)
class Layout:
    """How one step's parameters are sharded.

    Attributes:
        group: the process group the partial sums are completed over (``None``: the default one).
        size: the number of processes in ``group``.
        units_intact: whether every output unit (a slice along dim 0) lies whole on one process,
            so that per-unit sums need no completion.
        what: the layout in words, for messages.
        flat: whether FSDP1 ``FlatParameter`` objects are among the parameters.
    """

    group: Any
    size: int
    units_intact: bool
    what: str
    flat: bool = False


def _ranks(group: Any) -> tuple[int, ...]:
    return tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))


def _dtensor_layout(owner: str, p: Tensor) -> Layout | None:
    mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
    if any(pl.is_partial() for pl in placements):
        raise RuntimeError(
            f"{owner}: a parameter of shape {tuple(p.shape)} has a Partial placement {placements}; an optimizer "
            "steps parameters, not pending sums: redistribute it to Shard or Replicate placements."
        )
    sharded = [i for i, pl in enumerate(placements) if pl.is_shard() and mesh.size(i) > 1]
    if not sharded:
        return None
    units = all(pl.dim == 0 for pl in placements if pl.is_shard())
    if len(sharded) == 1:
        (dim,) = sharded
        return Layout(mesh.get_group(dim), mesh.size(dim), units, f"DTensor sharded over mesh dim {dim} {tuple(mesh.shape)}")
    if len(sharded) == mesh.ndim:
        group = mesh._flatten().get_group() if mesh.ndim > 1 else mesh.get_group()
        return Layout(group, mesh.size(), units, f"DTensor sharded over the whole mesh {tuple(mesh.shape)}")
    raise RuntimeError(
        f"{owner}: a parameter is sharded over several, but not all, dimensions of its device mesh "
        f"{tuple(mesh.shape)} (placements {placements}); its partial sums cannot be completed in one "
        "group. Shard over one mesh dimension (FSDP/HSDP) or over all of them."
    )


def _fsdp1_layout(owner: str, p: Tensor) -> Layout | None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    flat = is_flat_parameter(p)
    if flat:
        padded = getattr(p, "_padded_unsharded_size", None) or getattr(p, "_unpadded_unsharded_size", None)
        sharded = getattr(p, "_sharded_size", None)
        if padded is not None and sharded is not None and sharded.numel() > 0:
            factor = padded.numel() // sharded.numel()
            if factor == 1:
                return None  # NO_SHARD: a replica
            if factor != dist.get_world_size():
                raise RuntimeError(
                    f"{owner}: an FSDP1 FlatParameter is sharded over {factor} of {dist.get_world_size()} "
                    "processes (HYBRID_SHARD): FSDP1 does not tell an optimizer its groups. Use FSDP2 "
                    "(`fully_shard` with a 2-D DeviceMesh, Lightning's ModelParallelStrategy or "
                    "FSDPStrategy(device_mesh=...)), whose DTensor parameters say how they are sharded."
                )
    return Layout(None, dist.get_world_size(), False, "FSDP1 flat shards", flat=flat)


def layout_of(params: Sequence[Tensor], owner: str = "optimizer", *, per_tensor: bool = False) -> Layout | None:
    """The :class:`Layout` of ``params`` (the parameters, not local views), or ``None`` if none is sharded.

    Args:
        params: every parameter the optimizer steps.
        owner: how messages name the optimizer.
        per_tensor: whether the optimizer needs per-tensor quantities (refused over FSDP1
            ``FlatParameter`` objects, which hold many tensors each).

    Raises:
        RuntimeError: naming the fix, for a layout whose sums cannot be completed exactly.

    >>> layout_of([torch.zeros(2), torch.zeros(3)]) is None
    True
    """
    found: Layout | None = None
    plain: Tensor | None = None
    for p in params:
        if hasattr(p, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
            raise RuntimeError(
                f"{owner}: DeepSpeed is not supported: its engine steps the optimizer itself on partitions it keeps, "
                "without the loss and without saying how they lie. Use DDP, FSDP (use_orig_params=True), FSDP2 "
                "(`fully_shard`, Lightning's ModelParallelStrategy) or Fabric with `lightning_adaptive_lr.fabric`."
            )
        if is_dtensor(p):
            layout = _dtensor_layout(owner, p)
        elif getattr(p, FSDP1_FLAG, False):
            layout = _fsdp1_layout(owner, p)
        else:
            layout = None
        if layout is None:
            plain = p if plain is None else plain
            continue
        if found is None:
            found = layout
        elif _ranks(found.group) != _ranks(layout.group):
            raise RuntimeError(
                f"{owner}: its parameters are sharded over different process groups ({found.what} and "
                f"{layout.what}); one optimizer completes its sums over one group. Give each group of "
                "parameters its own optimizer, or shard them alike."
            )
        else:
            found = Layout(
                found.group, found.size, found.units_intact and layout.units_intact, found.what, found.flat or layout.flat
            )
    if found is None:
        return None
    if plain is not None and is_dtensor(plain):
        raise RuntimeError(
            f"{owner}: a DTensor parameter of shape {tuple(plain.shape)} is replicated (placements {plain.placements}) "  # type: ignore[attr-defined]
            f"over the processes that shard the others ({found.what}), as tensor parallelism leaves "
            "RowwiseParallel's bias and SequenceParallel's norm weights; every process holds it whole, so its "
            "sums would be counted once per process. Parallelize so that every parameter this optimizer steps "
            "is sharded (ColwiseParallel, RowwiseParallel on layers without bias), or step the replicated "
            "parameters with a separate optimizer."
        )
    if plain is not None:
        raise RuntimeError(
            f"{owner}: a parameter of shape {tuple(plain.shape)} is held whole by every process while others "
            f"are sharded ({found.what}); its sums would be counted once per process. Shard every parameter "
            "the optimizer steps (wrap the whole model: `fully_shard(model)` / `FSDP(model)`), or step the "
            "unsharded ones with a separate optimizer."
        )
    if per_tensor and found.flat:
        raise RuntimeError(
            f"{owner} computes per-tensor quantities, but FSDP1 with use_orig_params=False hands it FlatParameter "
            "objects that each hold many tensors. Use FSDP(..., use_orig_params=True) (Lightning's FSDPStrategy "
            "does), or FSDP2 (`fully_shard`)."
        )
    return found


#: How :func:`complete` combines one entry over the processes.
SUM, MAX, MIN, SAME = "sum", "max", "min", "same"


def complete(values: Tensor, kinds: Sequence[str], layout: Layout) -> Tensor:
    """Complete a 1-d vector of per-process partials over ``layout``'s group, in one collective.

    Args:
        values: this process's partials.
        kinds: per entry, ``"sum"``, ``"max"``, ``"min"`` or ``"same"`` (already equal everywhere:
            this process's value is kept).
        layout: the step's :class:`Layout`.

    Returns:
        The completed vector, bit-identical on every process of the group (each combines the same
        gathered rows in rank order).
    """
    if layout.size == 1:
        return values
    rows = [torch.empty_like(values) for _ in range(layout.size)]
    dist.all_gather(rows, values.contiguous(), group=layout.group)
    table = torch.stack(rows)
    out = values.clone()
    kinds_t = list(kinds)
    for kind, reduce in ((SUM, lambda t: t.sum(0)), (MAX, lambda t: t.amax(0)), (MIN, lambda t: t.amin(0))):
        index = [i for i, k in enumerate(kinds_t) if k == kind]
        if index:
            where = torch.tensor(index, device=values.device)
            combined = table[:, where]
            if kind == SUM:  # in rank order, the same on every process
                acc = combined[0].clone()
                for row in combined[1:]:
                    acc = acc + row
                out[where] = acc
            else:
                out[where] = reduce(combined)
    return out


def reshard_after_probe(module: torch.nn.Module) -> None:
    """Put a sharded model back in its sharded state after a forward pass without backward.

    A probe (QLAB's loss at the trial point) runs the model's forward under ``torch.no_grad()``.
    FSDP keeps the root module's gathered (unsharded) parameters after a forward, for the backward
    that usually follows; with no backward they stay gathered: FSDP2 then leaves the module's
    parameters unsharded tensors, and FSDP1 reuses the stale gathered copy at the next forward,
    after the optimizer has moved the shards.  Call this after every forward the training loop
    runs outside forward/backward (the probe); it is a no-op for unsharded modules.

    >>> reshard_after_probe(torch.nn.Linear(2, 1))  # nothing sharded: nothing to do
    """
    for sub in module.modules():
        reshard = getattr(sub, "reshard", None)
        if type(sub).__name__ != "FullyShardedDataParallel" and callable(reshard) and hasattr(sub, "_get_fsdp_state"):
            reshard()  # FSDP2: an FSDPModule
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp._runtime_utils import _reshard
    except ImportError:  # pragma: no cover - a torch without FSDP1
        return
    for sub in FullyShardedDataParallel.fsdp_modules(module):
        handle = getattr(sub, "_handle", None)
        if handle is not None and handle.uses_sharded_strategy and not handle.needs_unshard():
            _reshard(sub, handle, True)  # the gathered copy is still there: drop it
