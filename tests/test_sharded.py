"""Sharded data parallelism (FSDP1, FSDP2/DTensor, HSDP) and tensor parallelism (gloo, 2 CPU processes) step like one process.

One launch of tests/sharded_worker.py trains every registry optimizer (foreach and per-tensor),
plus ``QLAB.wrap(torch.optim.Adam)``, under each layout, each rank on half of every batch; and
under tensor parallelism (DTensor ``ColwiseParallel`` / ``RowwiseParallel`` on a 1-D mesh), each
rank on the whole batch.  The
expected values come from one process stepping the same optimizer on the whole batches: after
every step (Step-Tuned SGD's half-steps included) the gathered parameters must agree with it to
1e-5 relative, and every rank must record the same ``effective_lr`` as it.  Layouts an optimizer
cannot complete exactly must be refused with a message naming the fix.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import sharded_worker as sw

WORKER = os.path.join(os.path.dirname(__file__), "sharded_worker.py")
TOLERANCE = 1e-5

#: Registry settings whose per-tensor quantities FSDP1's FlatParameter (use_orig_params=False) hides.
PER_TENSOR = ("HierarchicalHD", "AdaL")


@functools.cache
def reference(case_id: str, mode: str = "") -> dict[str, Any]:
    """One process, the whole batch: the parameters and effective_lr after every step (the network
    of ``mode``: see sharded_worker.make_model)."""
    spec = dict(sw.cases())[case_id]
    model = sw.make_model(mode)
    opt, needs_probe = sw.build(spec, model.parameters())
    params, lrs = [], []
    for x, y in sw.batches():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        kwargs: dict[str, Any] = {"loss": loss}
        if needs_probe:
            kwargs["probe"] = lambda x=x, y=y: nn.functional.mse_loss(model(x), y)
        opt.step(**kwargs)
        params.append([p.detach().clone() for p in model.parameters()])
        lrs.append([float(g["effective_lr"]) for g in opt.param_groups])
    return {"params": params, "lrs": lrs}


def relative_difference(got: list[list[torch.Tensor]], want: list[list[torch.Tensor]]) -> float:
    """The largest ‖got − want‖∞ / ‖want‖∞ over the steps given and their tensors."""
    worst = 0.0
    for step_got, step_want in zip(got, want, strict=True):
        for a, b in zip(step_got, step_want, strict=True):
            worst = max(worst, float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)))
    return worst


#: (layout, full state dict?) of the distributed-checkpoint round trips.
DCP_MODES = ("dcp-fsdp2-full", "dcp-fsdp2-sharded", "dcp-fsdp1_orig-full", "dcp-fsdp1_orig-sharded")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """One launch of the worker (process start-up costs seconds) for every layout and round trip."""
    out = tmp_path_factory.mktemp("sharded")
    env = {k: v for k, v in os.environ.items() if k != "SHARDED_CASES"}
    modes = [m for m in sw.MODES if m != "ddp"]
    subprocess.run([sys.executable, WORKER, str(out), *modes, *DCP_MODES], check=True, timeout=600, env=env)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(sw.WORLD)]
    return ranks[0], ranks[1]


def _refusal(mode: str, case_id: str) -> str | None:
    """What the refusal of ``case_id`` under ``mode`` must say, or None if it must run."""
    if mode == "fsdp1_flat" and case_id.startswith(PER_TENSOR):
        return "use_orig_params=True"
    if mode == "tp_replicated":  # RowwiseParallel's bias is replicated over the tensor-parallel mesh
        return "is replicated"
    spec = dict(sw.cases())[case_id][0]
    levels = getattr(spec, "kwargs", {}).get("levels", ())
    if (mode.startswith("fsdp1") or mode == "tp") and "unit" in levels:  # flat shards / RowwiseParallel cut units
        return 'the "unit" level'
    return None


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", [m for m in sw.MODES if m != "ddp"])
def test_sharded_steps_match_one_process(mode: str, sharded_runs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    rank0, rank1 = (r[mode] for r in sharded_runs)
    failures, worst = [], {}
    for case_id, _ in sw.cases():
        if case_id not in rank0:
            continue  # not run in this mode (see sharded_worker.cases)
        got0, got1 = rank0[case_id], rank1[case_id]
        refusal = _refusal(mode, case_id)
        if refusal is not None:
            for got in (got0, got1):
                assert refusal in got.get("error", ""), (case_id, got.get("trace", "not refused"))
            continue
        if "error" in got0 or "error" in got1:
            failures.append(f"{case_id}: {got0.get('trace') or got1.get('trace')}")
            continue
        want = reference(case_id, "tp" if mode == "tp" else "")
        # After the last two steps (Step-Tuned SGD: after a first and a second half-step): 1e-5.
        # Before that, QLAB's quadratic fit (a2 = f_trial − f − a1) magnifies the float32 rounding
        # of a loss averaged over two half-batches at some steps: 1e-4 there still catches any
        # incomplete sum (those miss by 1e-3 to 1).
        diff = max(relative_difference(g["params"][-2:], want["params"][-2:]) for g in (got0, got1))
        early = max(relative_difference(g["params"][:-2], want["params"][:-2]) for g in (got0, got1))
        worst[case_id] = diff
        if diff > TOLERANCE or early > 10 * TOLERANCE:
            failures.append(f"{case_id}: parameters differ from one process by {diff:.3g} at the end, {early:.3g} before")
        if got0["lrs"] != got1["lrs"]:
            failures.append(f"{case_id}: the ranks record different effective_lr: {got0['lrs']} vs {got1['lrs']}")
        lr_diff = max(
            abs(a - b) / max(abs(b), 1e-12)
            for step_a, step_b in zip(got0["lrs"], want["lrs"], strict=True)
            for a, b in zip(step_a, step_b, strict=True)
        )
        if lr_diff > TOLERANCE:
            failures.append(f"{case_id}: effective_lr differs from one process by {lr_diff:.3g} (relative)")
    print(f"\n{mode}: max relative difference from one process per case: {worst}")
    assert not failures, "\n".join(failures)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", DCP_MODES)
def test_distributed_checkpoint_round_trip_resumes_bit_identically(
    mode: str, sharded_runs: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """get/set_optimizer_state_dict after 5 steps, into a fresh model and optimizer, then 5 more steps:
    the parameters and effective_lr equal those of the run without the round trip, bit for bit."""
    layout, kind = mode.split("-")[1:]
    failures = []
    for case_id, _ in sw.cases():
        if case_id not in sharded_runs[0][mode]:
            continue  # not run in this mode (see sharded_worker.worker)
        refusal = _refusal(layout, case_id)
        for rank, results in enumerate(sharded_runs):
            got = results[mode][case_id]
            if refusal is not None:
                assert refusal in got.get("error", ""), (case_id, got.get("trace", "not refused"))
                continue
            if "error" in got and kind == "full" and "Expected device to be set" in got["error"]:
                # torch's own limit: a full optimizer state dict of an optimizer without tensor
                # state (QLAB-sgd keeps none; torch.optim.SGD without momentum fails alike) finds
                # no device to load to.  The sharded round trip of the same case must pass.
                assert "error" not in results[mode.replace("full", "sharded")][case_id], case_id
                continue
            if "error" in got:
                failures.append(f"{case_id} (rank {rank}): {got['trace']}")
                continue
            if not all(torch.equal(a, b) for a, b in zip(got["resumed"], got["straight"], strict=True)):
                failures.append(f"{case_id} (rank {rank}): the resumed parameters differ from the uninterrupted run")
            if got["lrs"] != got["straight_lrs"]:
                failures.append(f"{case_id} (rank {rank}): effective_lr {got['lrs']} != {got['straight_lrs']}")
            if got["saved_numel"]:
                want = {"full": ["Tensor"], "sharded": ["DTensor"] if layout == "fsdp2" else ["ShardedTensor"]}[kind]
                if got["saved_types"] != want:
                    failures.append(f"{case_id}: saved state tensors are {got['saved_types']}, expected {want}")
    assert not failures, "\n".join(failures)
