"""Lightning DDP (2 CPU processes, gloo) with AdaptiveLRCallback: replicas stay bit-identical.

DDP averages the gradients; each rank sees its own loss (its own shard of the data), and QLAB's
probe runs on each rank's own batches.  The callback averages both across ranks once, so every
rank takes the same step.  The Trainer runs in a subprocess script (Lightning's launcher re-runs it
for rank 1) so that pytest itself is never forked.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lightning_helpers import usable_cases

WORKER = os.path.join(os.path.dirname(__file__), "lightning_ddp_worker.py")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> dict[str, list]:
    out = tmp_path_factory.mktemp("lightning_ddp")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    completed = subprocess.run(
        [sys.executable, WORKER, str(out)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = {case.id: [torch.load(out / f"{case.id}-{rank}.pt") for rank in range(2)] for case in usable_cases()}
    results["extra"] = [torch.load(out / f"extra-{rank}.pt") for rank in range(2)]
    return results


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", usable_cases(), ids=lambda c: c.id)
def test_replicas_are_bit_identical_after_ten_steps(ddp_results, case) -> None:
    rank0, rank1 = ddp_results[case.id]
    assert all(torch.equal(a, b) for a, b in zip(rank0, rank1)), f"{case.id}: replicas differ"


@pytest.mark.multiprocess
def test_without_averaging_the_loss_replicas_drift(ddp_results) -> None:
    """The check above can fail: MoMo with rank-local losses takes rank-local steps."""
    rank0, rank1 = (extra["not_averaged"] for extra in ddp_results["extra"])
    assert not all(torch.equal(a, b) for a, b in zip(rank0, rank1))


@pytest.mark.multiprocess
def test_desync_check_is_silent_on_identical_replicas_and_catches_a_perturbed_one(ddp_results) -> None:
    for extra in ddp_results["extra"]:
        assert extra["desync_clean"] == []
        assert extra["desync_perturbed"] == [5, 10]
