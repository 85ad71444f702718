"""Worker for tests/test_sharded.py: every registry optimizer under sharded data parallelism.

Two CPU processes (gloo) train the same small network, each on its half of every batch, under
FSDP1 (``use_orig_params`` True and False), FSDP2 ``fully_shard`` and a 2×1 HSDP mesh, for every
case of tests/optimizer_registry.py (foreach and per-tensor) plus ``QLAB.wrap(torch.optim.Adam)``;
and under tensor parallelism (``parallelize_module`` with ``ColwiseParallel`` / ``RowwiseParallel``
on a 1-D mesh), each rank on the whole batch: ``tp`` with every parameter sharded (the row-wise
layer without bias), ``tp_replicated`` with the row-wise layer's bias replicated (refused).
After every step each rank records the gathered (full) parameters and every group's
``effective_lr``; a layout an optimizer refuses records the error message instead.  Everything a
rank saw goes to ``OUT/rank<r>.pt``.

Run: ``python sharded_worker.py OUT [MODE ...]`` (default: every mode).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(__file__))

STEPS = 10
WORLD = 2
BATCH = 32  # the whole batch; each rank takes its half
MODES = ("fsdp1_orig", "fsdp1_flat", "fsdp2", "hsdp", "tp", "tp_replicated", "ddp")
#: Tensor-parallel modes: every rank computes on the whole batch.
TP_MODES = ("tp", "tp_replicated")
#: Modes that also run the per-tensor (foreach=False) path: those whose local tensors differ from
#: the parameters (FSDP1's flat views, FSDP2's DTensor shards); the others repeat them.
SINGLE_TENSOR_MODES = ("fsdp2",)
#: Modes that run one setting per class (DCP_CASES): FSDP1 flat parameters (whose per-tensor
#: optimizers are refused) and the 2×1 HSDP mesh (sharded over one process: nothing to complete).
SUBSET_MODES = ("fsdp1_flat", "hsdp", "tp_replicated")
#: Modes that also run the ``compiled=True`` paths (every method's fused kernels on DTensor shards).
COMPILED_MODES = ("fsdp2",)
#: The settings whose distributed-checkpoint round trip runs: one per class (its setting with the
#: most state), the unit and param levels of HierarchicalHD (state per output unit), QLAB-sgd (no
#: tensor state at all) and the wrapper.
DCP_CASES = (
    "HierarchicalHD-sgd-unit-param-foreach",
    "QLAB-sgd-foreach",
    "MoMo-bc-lb-wd-foreach",
    "MoMoAdam-decoupled-lb-foreach",
    "QLAB-adamw-foreach",
    "HierarchicalHD-sgdn-global-wd-foreach",
    "AdaL-tensor_l1-denominator-wd-foreach",
    "StepTunedSGD-foreach",
    "QLAB.wrap(Adam)",
)


def make_model(mode: str = "") -> nn.Module:
    """The network: FSDP1's flat shards cut its tensors (rank 0 holds none of the last bias) and
    FSDP2 shards the last layer's single row unevenly (rank 1 holds none of it).  Under ``tp`` the
    last layer has no bias (a row-wise layer's bias is replicated: see ``tp_replicated``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1, bias=mode != "tp"))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The whole batches of the run (the same on every rank and in the one-process reference)."""
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 1, generator=gen)) for _ in range(STEPS)]


def cases() -> list[tuple[str, Any]]:
    """(id, factory(params, foreach) → optimizer, needs_probe) for every registry case and QLAB.wrap(Adam)."""
    from optimizer_registry import CASES

    import lightning_adaptive_lr as lalr

    out: list[tuple[str, Any]] = []
    for case in CASES:
        for foreach in (True, False):
            out.append((f"{case.id}-{'foreach' if foreach else 'single'}", (case, foreach)))
    out.append(("QLAB.wrap(Adam)", ("wrap", None)))
    compiled = {  # compiled=True: under COMPILED_MODES only (compiling costs seconds)
        "MoMo": (lambda p: lalr.MoMo(p, lr=0.05, compiled=True), False),
        "MoMoAdam": (lambda p: lalr.MoMoAdam(p, lr=0.05, compiled=True), False),
        "AdaL": (lambda p: lalr.AdaL(p, lr=0.05, compiled=True), False),
        "QLAB-adam": (lambda p: lalr.QLAB(p, base="adam", lr=0.05, compiled=True), True),
        "HierarchicalHD-adam": (lambda p: lalr.HierarchicalHD(p, base="adam", lr=0.05, compiled=True), False),
        "QLAB-sgdm": (lambda p: lalr.QLAB(p, base="sgdm", lr=0.05, weight_decay=0.01, compiled=True), True),
        "HierarchicalHD-sgd": (lambda p: lalr.HierarchicalHD(p, base="sgd", lr=0.05, compiled=True), False),
        "HierarchicalHD-sgdn": (lambda p: lalr.HierarchicalHD(p, base="sgdn", lr=0.05, compiled=True), False),
        "StepTunedSGD": (lambda p: lalr.StepTunedSGD(p, lr=0.05, compiled=True), False),
    }
    for name, (make, needs_probe) in compiled.items():
        out.append((f"{name}-compiled", ("compiled", (make, needs_probe))))
    return out


def build(spec: Any, params: Any) -> tuple[torch.optim.Optimizer, bool]:
    """The optimizer of a case spec and whether its step needs a probe."""
    import lightning_adaptive_lr as lalr

    case, foreach = spec
    if case == "wrap":
        return lalr.QLAB.wrap(torch.optim.Adam(params, lr=0.05)), True
    if case == "compiled":
        make, needs_probe = foreach
        return make(params), needs_probe
    return case.make(params, foreach=foreach), case.needs_probe


def probe(wrapped: nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """The loss at the current parameters; under FSDP2 the model is resharded after the forward
    (a forward without backward leaves the root unsharded, and the optimizer steps the shards)."""
    from lightning_adaptive_lr.optim import reshard_after_probe

    loss = nn.functional.mse_loss(wrapped(xs), ys)
    reshard_after_probe(wrapped)
    return loss


def run(
    spec: Any, model: nn.Module, wrapped: nn.Module, batches_: list, rank: int, world: int, gather: Any
) -> dict[str, Any]:
    """Train ``wrapped`` (the sharded ``model``) for the batches; per step the full parameters and lrs."""
    opt, needs_probe = build(spec, wrapped.parameters())
    params, lrs, times = [], [], []
    for x, y in batches_:
        times.append(step_on_half(opt, needs_probe, wrapped, x, y, rank, world))
        params.append(gather())
        lrs.append([float(g["effective_lr"]) for g in opt.param_groups])
    return {"params": params, "lrs": lrs, "times": times}


def step_on_half(
    opt: torch.optim.Optimizer, needs_probe: bool, wrapped: nn.Module, x: Tensor, y: Tensor, rank: int, world: int
) -> float:
    """One step of ``opt`` on this rank's share of the batch ``(x, y)``; the seconds ``step()`` took."""
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    xs, ys = x[rows], y[rows]
    opt.zero_grad()
    loss = nn.functional.mse_loss(wrapped(xs), ys)
    loss.backward()
    kwargs: dict[str, Any] = {"loss": loss}
    if needs_probe:
        kwargs["probe"] = lambda: probe(wrapped, xs, ys)
    start = time.perf_counter()
    opt.step(**kwargs)
    return time.perf_counter() - start


def wrap_mode(mode: str, rank: int) -> tuple[nn.Module, nn.Module, Any]:
    """(model, the module to train, a function returning the full parameters) for ``mode``."""
    model = make_model(mode)
    if mode.startswith("fsdp1"):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(model, use_orig_params=mode == "fsdp1_orig", device_id=torch.device("cpu"))

        def gather() -> list[torch.Tensor]:
            with FSDP.summon_full_params(wrapped):
                return [p.detach().clone() for p in wrapped.module.parameters()]

        return model, wrapped, gather
    if mode in TP_MODES:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        return model, model, lambda: [p.full_tensor().detach().clone() for p in model.parameters()]
    if mode in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        shape = (WORLD,) if mode == "fsdp2" else (WORLD, 1)
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("shard",) if mode == "fsdp2" else ("replicate", "shard"))
        fully_shard(model, mesh=mesh)
        return model, model, lambda: [p.full_tensor().detach().clone() for p in model.parameters()]
    from torch.nn.parallel import DistributedDataParallel

    return model, DistributedDataParallel(model), lambda: [p.detach().clone() for p in model.parameters()]


def dcp_round_trip(spec: Any, mode: str, full: bool, rank: int, data: list) -> dict[str, Any]:
    """Train 5 steps, save through ``get_optimizer_state_dict`` (and the model's), load into a fresh
    model and optimizer through ``set_*_state_dict``, train 5 more; beside it the run without the
    round trip.  Returns both runs' full parameters and lrs after the 10 steps."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=full)
    straight_model, straight, gather = wrap_mode(mode, rank)
    straight_run = run(spec, straight_model, straight, data, rank, WORLD, gather)

    model, wrapped, _ = wrap_mode(mode, rank)
    opt, needs_probe = build(spec, wrapped.parameters())
    first = run_with(opt, needs_probe, wrapped, data[:5], rank)
    del first
    model_sd = get_model_state_dict(wrapped, options=options)
    optim_sd = get_optimizer_state_dict(wrapped, opt, options=options)
    # What a checkpoint file holds: plain tensors and DTensors load with weights_only=True; FSDP1's
    # sharded state dict holds ShardedTensor objects, which need the full unpickler.
    saved = torch.load(_roundtrip_bytes(optim_sd), weights_only=not (mode.startswith("fsdp1") and not full))

    model2, wrapped2, gather2 = wrap_mode(mode, rank)
    opt2, _ = build(spec, wrapped2.parameters())
    set_model_state_dict(wrapped2, model_sd, options=options)
    set_optimizer_state_dict(wrapped2, opt2, saved, options=options)
    run_with(opt2, needs_probe, wrapped2, data[5:], rank)
    tensors = [v for st in saved["state"].values() for v in st.values() if isinstance(v, torch.Tensor) and len(v.size())]
    return {
        "resumed": gather2(),
        "straight": straight_run["params"][-1],
        "lrs": [float(g["effective_lr"]) for g in opt2.param_groups],
        "straight_lrs": straight_run["lrs"][-1],
        "saved_types": sorted({type(v).__name__ for v in tensors}),
        "saved_numel": sum(v.size().numel() for v in tensors),
        "saved_keys": sorted({k for st in saved["state"].values() for k in st}),
    }


def _roundtrip_bytes(state: Any) -> Any:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def run_with(opt: torch.optim.Optimizer, needs_probe: bool, wrapped: nn.Module, batches_: list, rank: int) -> None:
    """Step ``opt`` on ``wrapped`` for ``batches_`` (each rank its half)."""
    for x, y in batches_:
        step_on_half(opt, needs_probe, wrapped, x, y, rank, WORLD)


def worker(rank: int, out: str, modes: list[str], init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300)
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        data = batches()
        for mode in [m for m in modes if m.startswith("dcp")]:  # dcp-<layout>-<full|sharded>
            _, layout, kind = mode.split("-")
            results[mode] = {}
            for case_id, spec in cases():
                if case_id.endswith("-single") or (
                    os.environ.get("SHARDED_CASES") and not any(c in case_id for c in os.environ["SHARDED_CASES"].split(","))
                ):
                    continue
                if case_id not in DCP_CASES:
                    continue  # the state layout is the optimizer's: one setting per class suffices
                try:
                    results[mode][case_id] = dcp_round_trip(spec, layout, kind == "full", rank, data)
                except Exception as error:  # noqa: BLE001 - recorded: the test shows it
                    results[mode][case_id] = {"error": str(error), "trace": traceback.format_exc()}
                dist.barrier()
        for mode in [m for m in modes if not m.startswith("dcp")]:
            results[mode] = {}
            for case_id, spec in cases():
                if case_id.endswith("-single") and (
                    mode not in SINGLE_TENSOR_MODES or case_id.replace("-single", "-foreach") not in DCP_CASES
                ):
                    continue
                if mode in SUBSET_MODES and case_id not in DCP_CASES:
                    continue
                if case_id.endswith("-compiled") and mode not in COMPILED_MODES:
                    continue
                if os.environ.get("SHARDED_CASES") and not any(
                    c in case_id for c in os.environ["SHARDED_CASES"].split(",")
                ):
                    continue
                model, wrapped, gather = wrap_mode(mode, rank)
                share = (0, 1) if mode in TP_MODES else (rank, WORLD)  # tensor parallel: the whole batch
                try:
                    results[mode][case_id] = run(spec, model, wrapped, data, *share, gather)
                except Exception as error:  # noqa: BLE001 - recorded: a refusal, or a failure the test shows
                    results[mode][case_id] = {"error": str(error), "trace": traceback.format_exc()}
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = sys.argv[1]
    chosen = sys.argv[2:] or list(MODES)
    mp.spawn(worker, args=(out_dir, chosen, os.path.join(out_dir, "init")), nprocs=WORLD)
