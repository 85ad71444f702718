"""Worker for tests/test_sharded_lightning.py: Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes.

Run as ``python sharded_worker_lightning.py OUT``; Lightning's launcher starts the second rank by
running the same command again.  For each case of :data:`CASES` it trains a small MLP whose
layers are ``fully_shard``-ed in ``configure_model`` (DTensor parameters), each rank on its half
of every batch, or (``tp`` cases) tensor-parallel (``ColwiseParallel``, then ``RowwiseParallel``
on a layer without bias), each rank on the whole batches, with AdaptiveLRCallback and
AdaptiveLRMonitor, for 2 epochs of :data:`EPOCH` batches, and writes the gathered parameters, the
recorded ``effective_lr`` and ``lb`` to ``OUT/<case>-rank<r>.pt``.

Cases with ``resume`` also save a distributed checkpoint after step :data:`EPOCH` (the last step
of epoch 0) through ``ModelCheckpoint(every_n_train_steps=EPOCH)``, the way a user's run does, and
resume from it with ``Trainer.fit(ckpt_path=...)`` in a fresh Trainer and a model initialised
differently; the resumed run's results go to ``OUT/<case>-resumed-rank<r>.pt``.  (Not a
checkpoint written at an epoch's end, by ``trainer.save_checkpoint`` after a ``fit`` that
``max_steps`` ended or by ``ModelCheckpoint(save_on_train_epoch_end=True)``: under ``max_steps``
Lightning 2.6 resumes from those one batch off, running the next epoch's first batch as an extra
batch of the finished epoch, with any optimizer and in one process too.)
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, AdaptiveLRMonitor

STEPS = 10
EPOCH = STEPS // 2  # batches per epoch: the checkpoint after step EPOCH closes epoch 0
BATCH = 16  # per rank; the one-process reference takes 32


@dataclass(frozen=True)
class Case:
    """One Lightning run: a registry setting, the callback's options, the dtype, whether to resume,
    and the parallelism (``"fsdp"``: 2 data-parallel ranks; ``"tp"``: 2 tensor-parallel ranks)."""

    id: str
    registry_id: str
    callback: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    resume: bool = True
    parallel: str = "fsdp"


#: One setting per class (the callback's loss, its lower-bound rule and its state in the
#: checkpoint, QLAB's probe through the callback, per-unit DTensor state and the monitor,
#: Step-Tuned's half-steps across the checkpoint).  QLAB with SGD momentum runs in float64: in
#: float32 its quadratic fit (a2 = f_trial − f − a1) magnifies the rounding of a loss averaged
#: over two half-batches (vs one mean over the whole batch) to 2e-5 after 10 steps; in float64
#: the same run agrees with one process to 1e-13, which no incomplete sum or misplaced probe does.
CASES = (
    Case("MoMo-lb_fraction", "MoMo", {"lb_fraction": 0.1}),
    Case("QLAB-adamw", "QLAB-adamw"),
    Case("QLAB-sgdm-float64", "QLAB-sgdm", dtype=torch.float64, resume=False),
    Case("HierarchicalHD-adam-all-levels-learned", "HierarchicalHD-adam-all-levels-learned"),
    Case("AdaL-tensor_l1-denominator-wd", "AdaL-tensor_l1-denominator-wd"),
    Case("StepTunedSGD", "StepTunedSGD"),
    # The device-side step: its optimizer-wide numbers are tensors in the param groups, through the
    # distributed checkpoint and the monitor's sync_warnings.
    Case("MoMoAdam-capturable", "MoMoAdam-capturable"),
    Case("MoMo-lb_fraction-tp", "MoMo", {"lb_fraction": 0.1}, resume=False, parallel="tp"),
    Case("QLAB-sgdm-float64-tp", "QLAB-sgdm", dtype=torch.float64, resume=False, parallel="tp"),
)


def dataset(dtype: torch.dtype = torch.float32) -> TensorDataset:
    """``EPOCH`` batches of 2 × BATCH samples: one epoch."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(EPOCH * 2 * BATCH, 5, generator=gen), torch.randn(EPOCH * 2 * BATCH, 1, generator=gen)
    return TensorDataset(x.to(dtype), y.to(dtype))


class MLP(pl.LightningModule):
    """A small regression MLP; under ModelParallelStrategy each layer is ``fully_shard``-ed, or
    (``parallel="tp"``) tensor-parallel, the row-wise layer without bias (a replicated bias among
    sharded parameters is refused: see optim/_sharding.py)."""

    def __init__(self, registry_id: str, dtype: torch.dtype = torch.float32, seed: int = 0, parallel: str = "fsdp") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1, bias=parallel != "tp")).to(dtype)
        self.registry_id = registry_id
        self.parallel = parallel

    def configure_model(self) -> None:
        mesh = getattr(self, "device_mesh", None)
        if mesh is None:
            return
        if self.parallel == "tp":
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            parallelize_module(self.net, mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
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
        from optimizer_registry import CASES as REGISTRY

        case = next(c for c in REGISTRY if c.id == self.registry_id)
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


class Whole(torch.utils.data.Sampler):
    """Every sample, in the order of the one-process run's batches (batch k: rank 0's k-th half
    batch of :class:`Half`, then rank 1's), for tensor parallelism: every rank on the whole batch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        halves = [list(range(r, self.n, 2)) for r in (0, 1)]
        return iter(i for k in range(self.n // (2 * BATCH)) for h in halves for i in h[k * BATCH : (k + 1) * BATCH])

    def __len__(self) -> int:
        return self.n


def full(model: MLP) -> list[torch.Tensor]:
    """The gathered parameters (a collective: call it on every rank)."""
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def fit(case: Case, root: str, *, ckpt: str | None = None, save_every: int | None = None, seed: int = 0) -> tuple[MLP, pl.Trainer]:
    """Train ``case`` for STEPS steps (epochs of EPOCH batches), from ``ckpt`` if given; with
    ``save_every``, ModelCheckpoint writes a distributed checkpoint every that many steps."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    model = MLP(case.registry_id, case.dtype, seed, case.parallel)
    callbacks: list[pl.Callback] = [AdaptiveLRCallback(**case.callback), AdaptiveLRMonitor()]
    if save_every is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir(root, case), every_n_train_steps=save_every, save_top_k=-1))
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(**({"data_parallel_size": 1, "tensor_parallel_size": 2} if case.parallel == "tp" else {"data_parallel_size": 2, "tensor_parallel_size": 1})),
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=save_every is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        use_distributed_sampler=False,
    )
    data = dataset(case.dtype)
    if case.parallel == "tp":
        loader = DataLoader(data, batch_size=2 * BATCH, sampler=Whole(len(data)))
    else:
        loader = DataLoader(data, batch_size=BATCH, sampler=Half(len(data)))
    trainer.fit(model, loader, ckpt_path=ckpt)
    return model, trainer


def checkpoint_dir(root: str, case: Case) -> str:
    return os.path.join(root, f"checkpoints-{case.id}")


def outcome(model: MLP, trainer: pl.Trainer) -> dict[str, Any]:
    """What a run is compared by: the gathered parameters, and per group effective_lr and lb."""
    groups = trainer.optimizers[0].param_groups
    return {
        "params": full(model),
        "lrs": [float(g["effective_lr"]) for g in groups],
        "lbs": [float(g["lb"]) if "lb" in g else None for g in groups],
    }


def main(out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    chosen = os.environ.get("LIGHTNING_SHARDED_CASES")
    for case in CASES:
        if chosen and case.id not in chosen.split(","):
            continue
        model, trainer = fit(case, out, save_every=EPOCH if case.resume else None)
        result = outcome(model, trainer)
        rank = trainer.global_rank
        torch.save(result, os.path.join(out, f"{case.id}-rank{rank}.pt"))
        if not case.resume:
            continue
        path = os.path.join(checkpoint_dir(out, case), f"epoch=0-step={EPOCH}.ckpt")
        model, trainer = fit(case, out, ckpt=path, seed=1)  # other initial weights: all from the checkpoint
        torch.save(outcome(model, trainer), os.path.join(out, f"{case.id}-resumed-rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
