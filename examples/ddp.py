"""Data-parallel training with MoMo in plain PyTorch: 2 CPU processes, DistributedDataParallel.

Each process (rank) trains a replica of the same MLP on its own share of scikit-learn's digits
(offline).  DDP averages the *gradients* across ranks, but every rank computes its own mini-batch
*loss*, and MoMo's step size depends on the loss.  If each rank used its own loss, the replicas
would take different steps and drift apart.  This package's optimizers therefore average the loss
across ranks themselves (one ``all_reduce`` inside ``step()``), so the loop needs nothing special:
``optimizer.step(loss=loss)`` as on one process.  At the end the ranks gather their parameters and
check that the replicas are bit-identical.

    python examples/ddp.py                  # 5 epochs
    python examples/ddp.py --fast           # a few steps (what the tests run)
    python examples/ddp.py --no-average     # average_across_ranks=False: watch the replicas drift

The same ``train`` runs under ``torchrun``: call ``dist.init_process_group("gloo")`` (or
``"nccl"`` on GPUs) there without the address and rank arguments.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from lightning_adaptive_lr import MoMo

WORLD_SIZE = 2


def digits() -> tuple[TensorDataset, TensorDataset]:
    """Training and test sets (1437 and 360 images), standardized with the training statistics."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def train(rank: int, epochs: int, max_steps: int | None, average: bool) -> dict[str, float] | None:
    """One rank's training; then this replica's parameters are compared with every other rank's."""
    train_set, test_set = digits()
    # Each rank reads a different half of the training set (the sampler shards by rank).
    sampler = DistributedSampler(train_set, num_replicas=WORLD_SIZE, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    ddp_model = DistributedDataParallel(model)  # copies rank 0's weights to every rank
    # average_across_ranks=True is the default; it is spelled out here because it is the point.
    optimizer = MoMo(model.parameters(), lr=1.0, average_across_ranks=average)

    steps = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(ddp_model(x), y)  # this rank's loss, on this rank's batch
            loss.backward()  # DDP averages the gradients across ranks here
            optimizer.step(loss=loss)  # MoMo averages the loss across ranks itself
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break

    # Gather every rank's parameters and compare them bit for bit.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, flat)
    if rank != 0:
        return None
    with torch.no_grad():
        x, y = test_set.tensors
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    difference = max((g - gathered[0]).abs().max().item() for g in gathered)
    return {"test_acc": accuracy, "max_difference": difference, "steps": steps}


def worker(rank: int, init_file: str, epochs: int, max_steps: int | None, average: bool, results: mp.SimpleQueue) -> None:
    """One process: join the group, train, report, leave the group cleanly."""
    torch.set_num_threads(1)  # one core per process
    # A file both processes can see names the group (no TCP port to pick, which another program
    # could take first); a rank that waits longer than the timeout fails instead of hanging.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(minutes=5)
    )
    try:
        result = train(rank, epochs, max_steps, average)
        if result is not None:
            results.put(result)
    finally:
        # Tear down in order: DDP's reducer holds the group's pending work (free it while Python is
        # fully alive), both ranks finish communicating (the barrier), then the group goes.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    # Nothing is left to do: leave without the interpreter's teardown, during which gloo's threads
    # can abort a process ("terminate called without an active exception") on a busy machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fast", action="store_true", default=os.environ.get("LALR_EXAMPLE_FAST") == "1")
    parser.add_argument("--no-average", dest="average", action="store_false", help="average_across_ranks=False")
    args = parser.parse_args(argv)

    results = mp.get_context("spawn").SimpleQueue()
    epochs, max_steps = (1, 8) if args.fast else (args.epochs, None)
    with tempfile.TemporaryDirectory() as folder:
        init_file = os.path.join(folder, "process_group")
        mp.spawn(worker, args=(init_file, epochs, max_steps, args.average, results), nprocs=WORLD_SIZE)
    result = results.get()
    identical = result["max_difference"] == 0.0
    print(
        f"MoMo on {WORLD_SIZE} processes, {result['steps']} steps, loss averaged across ranks: {args.average}\n"
        f"  test accuracy {result['test_acc']:.3f}\n"
        f"  replicas identical: {identical} (largest parameter difference {result['max_difference']:.3g})"
    )
    return {**result, "identical": identical}


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["identical"] or "--no-average" in sys.argv else 1)
