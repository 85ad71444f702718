"""Worker for tests/test_fabric.py: each optimizer class under ``Fabric(strategy="ddp_spawn")``, 2 CPU processes.

Each rank trains on its half of every batch through :mod:`lightning_adaptive_lr.fabric`, with
gradient accumulation over two micro-batches (the quarters of the batch), and writes the final
parameters and effective_lr per case to ``OUT/rank<r>.pt``.  Run: ``python fabric_worker.py OUT``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import sharded_worker as sw


def train(fabric: Any, out: str) -> None:
    from lightning_adaptive_lr.fabric import setup, step

    torch.set_num_threads(1)
    rank, world = fabric.global_rank, fabric.world_size
    results: dict[str, Any] = {}
    for case_id, spec in sw.cases():
        if case_id not in sw.DCP_CASES:  # one setting per class (and the wrapper) keeps the launch short
            continue
        module = sw.make_model()
        raw, needs_probe = sw.build(spec, module.parameters())
        model, opt = setup(fabric, module, raw)
        for x, y in sw.batches():
            rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
            xs, ys = x[rows], y[rows]
            half = len(xs) // 2
            opt.zero_grad()
            losses = []
            for i, part in enumerate((slice(0, half), slice(half, None))):  # two micro-batches
                with fabric.no_backward_sync(model, enabled=i == 0):
                    loss = nn.functional.mse_loss(model(xs[part]), ys[part])
                    fabric.backward(loss / 2)
                losses.append(loss.detach())
            probe = (lambda xs=xs, ys=ys, model=model: nn.functional.mse_loss(model(xs), ys)) if needs_probe else None
            step(opt, sum(losses) / 2, probe=probe)
        results[case_id] = {
            "params": [p.detach().clone() for p in module.parameters()],
            "lrs": [float(g["effective_lr"]) for g in opt.param_groups],
        }
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    fabric.barrier()


if __name__ == "__main__":
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn")
    fabric.launch(train, sys.argv[1])
