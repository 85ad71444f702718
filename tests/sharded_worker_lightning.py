"""Worker for tests/test_sharded_lightning.py: Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes.

Run as ``python sharded_worker_lightning.py OUT``; Lightning's launcher starts the second rank by
running the same command again.  For one setting of each optimizer class it trains a small MLP
whose layers are ``fully_shard``-ed in ``configure_model`` (DTensor parameters) with
AdaptiveLRCallback and AdaptiveLRMonitor, each rank on its half of every batch, and writes the
gathered parameters and the recorded ``effective_lr`` to ``OUT/<case>.pt`` (rank 0).
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, AdaptiveLRMonitor

STEPS = int(os.environ.get("LIGHTNING_SHARDED_STEPS", "10"))
BATCH = 16  # per rank; the one-process reference takes 32
#: One setting per class, by registry id.  QLAB is left out: through the callback's probe under
#: ModelParallelStrategy it ends 7e-4 (relative) from one process (open, see issue 12's report).
#: (The plain-FSDP2 tests of tests/test_sharded.py cover every setting; these three exercise the
#: callback's loss, per-unit DTensor state and the monitor, and Step-Tuned's half-steps.)
CASE_IDS = ("MoMo", "HierarchicalHD-adam-all-levels-learned", "StepTunedSGD")


def dataset(steps: int = STEPS) -> TensorDataset:
    """``steps`` batches of 2 × BATCH samples: one epoch."""
    gen = torch.Generator().manual_seed(7)
    return TensorDataset(torch.randn(steps * 2 * BATCH, 5, generator=gen), torch.randn(steps * 2 * BATCH, 1, generator=gen))


class MLP(pl.LightningModule):
    """A small regression MLP; under ModelParallelStrategy each layer is ``fully_shard``-ed."""

    def __init__(self, case_id: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
        self.case_id = case_id

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in (self.net[0], self.net[2]):  # the layers, not the root: each reshards after forward
            fully_shard(layer, mesh=mesh["data_parallel"])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if not torch.is_grad_enabled():  # QLAB's probe (no backward follows): see reshard_after_probe
            from lightning_adaptive_lr.optim import reshard_after_probe

            reshard_after_probe(self)
        return loss

    def configure_optimizers(self):
        from optimizer_registry import CASES

        case = next(c for c in CASES if c.id == self.case_id)
        return case.make(self.parameters())


class Half(torch.utils.data.Sampler):
    """This rank's half of the dataset, interleaved (rank r takes r, r+2, ...), in order: so that
    the two ranks' k-th batches together are the one-process run's k-th batch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        import torch.distributed as dist

        return iter(range(dist.get_rank(), self.n, 2))

    def __len__(self) -> int:
        return self.n // 2


def full(model: MLP) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def fit(
    case_id: str, steps: int, root: str, ckpt: str | None = None, epoch: int = STEPS
) -> tuple[MLP, pl.Trainer, AdaptiveLRMonitor]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    model = MLP(case_id)
    monitor = AdaptiveLRMonitor()
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        accelerator="cpu",
        devices=2,
        max_steps=steps,
        callbacks=[AdaptiveLRCallback(), monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        use_distributed_sampler=False,
    )
    data = dataset(epoch)
    loader = DataLoader(data, batch_size=BATCH, sampler=Half(len(data)))
    trainer.fit(model, loader, ckpt_path=ckpt)
    return model, trainer, monitor


def main(out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for case_id in CASE_IDS:
        if os.environ.get("LIGHTNING_SHARDED_CASE", case_id) != case_id:
            continue
        model, trainer, _ = fit(case_id, STEPS, out)
        lrs = [float(g["effective_lr"]) for g in trainer.optimizers[0].param_groups]
        params = full(model)
        if trainer.global_rank == 0:
            torch.save({"params": params, "lrs": lrs}, os.path.join(out, f"{case_id}.pt"))
        else:
            torch.save({"params": params, "lrs": lrs}, os.path.join(out, f"{case_id}-rank1.pt"))

    # Resume through a distributed checkpoint: NOT bit-identical yet under Lightning (see the
    # report of issue 12), so the test does not run it; set LIGHTNING_SHARDED_RESUME=<case> to.
    case_id = os.environ.get("LIGHTNING_SHARDED_RESUME")
    if not case_id:
        return
    # Epochs of 5 steps: the checkpoint ends an epoch (Lightning restarts an unfinished epoch).
    model, trainer, _ = fit(case_id, STEPS, out, epoch=STEPS // 2)
    straight = full(model)
    model, trainer, _ = fit(case_id, STEPS // 2, out, epoch=STEPS // 2)
    path = os.path.join(out, "half.ckpt")
    trainer.save_checkpoint(path)  # a distributed checkpoint (a directory) under ModelParallelStrategy
    model, trainer, _ = fit(case_id, STEPS, out, ckpt=path, epoch=STEPS // 2)
    params = full(model)  # a collective: on every rank
    if trainer.global_rank == 0:
        lrs = [float(g["effective_lr"]) for g in trainer.optimizers[0].param_groups]
        torch.save({"params": params, "lrs": lrs, "straight": straight}, os.path.join(out, "resumed.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
