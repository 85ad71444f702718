"""Plain PyTorch data parallelism (DDP, gloo, 2 CPU processes): replicas stay bit-identical.

DDP averages the gradients, but each rank sees its own loss; the optimizers that use the loss
average it across ranks themselves (one collective per step).  Without that, replicas drift.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from optimizer_registry import CASES

WORKER = os.path.join(os.path.dirname(__file__), "ddp_plain_worker.py")


def run_workers(tmp_path, *flags: str) -> dict[str, list[list[torch.Tensor]]]:
    subprocess.run([sys.executable, WORKER, str(tmp_path), *flags], check=True, timeout=600)
    return {
        case.id: [torch.load(tmp_path / f"{case.id}-{rank}.pt") for rank in range(2)] for case in CASES
    }


@pytest.mark.multiprocess
def test_replicas_stay_identical_and_drift_without_averaging(tmp_path) -> None:
    (tmp_path / "averaged").mkdir()
    averaged = run_workers(tmp_path / "averaged")
    for case in CASES:
        rank0, rank1 = averaged[case.id]
        assert all(torch.equal(a, b) for a, b in zip(rank0, rank1)), f"{case.id}: replicas differ"

    (tmp_path / "plain").mkdir()
    not_averaged = run_workers(tmp_path / "plain", "--no-average")
    drifted = {
        case.id
        for case in CASES
        if not all(torch.equal(a, b) for a, b in zip(*not_averaged[case.id]))
    }
    # Only the loss differs between ranks (DDP averages the gradients), so only methods that use
    # the loss can drift; MoMo at lr=1 is in its Polyak regime, where the loss sets the step.
    assert "MoMo" in drifted
    assert all(case.requires_loss for case in CASES if case.id in drifted), drifted
