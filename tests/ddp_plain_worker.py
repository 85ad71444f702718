"""Worker for tests/test_distributed.py: a plain PyTorch DDP loop (no Lightning), 2 CPU processes.

Each rank trains the same model on its own data with every registry optimizer and writes the
final parameters to ``OUT/<case>-<rank>.pt``.  Run: ``python ddp_plain_worker.py OUT [--no-average]``.
"""

from __future__ import annotations

import gc
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))

STEPS = 10
WORLD = 2


def train_all(rank: int, out: str, average: bool) -> None:
    from optimizer_registry import CASES  # imported in the child: it imports the package

    for case in CASES:
        torch.manual_seed(0)  # the same initial model on every rank
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        ddp = DistributedDataParallel(model)
        opt = case.make(model.parameters(), average_across_ranks=average)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(STEPS):
            x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            kwargs = {"loss": loss}
            if case.needs_probe:
                kwargs["probe"] = lambda x=x, y=y: nn.functional.mse_loss(model(x), y)
            opt.step(**kwargs)
        torch.save([p.detach() for p in model.parameters()], os.path.join(out, f"{case.id}-{rank}.pt"))


def worker(rank: int, out: str, average: bool, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(minutes=5)
    )
    try:
        train_all(rank, out, average)
    finally:
        # The order of examples/ddp.py: the DDP reducers (and the group's pending work they hold)
        # freed while Python is fully alive, both ranks done communicating, then the group destroyed.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    # No interpreter teardown, in which gloo's threads can abort the process on a busy machine
    # (SIGABRT, "terminate called without an active exception"): the results are on disk.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    mp.spawn(worker, args=(out_dir, "--no-average" not in sys.argv, os.path.join(out_dir, "init")), nprocs=WORLD)
