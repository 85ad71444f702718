"""GPU check: Lightning's FSDPStrategy (FSDP1, which refuses the CPU) end to end, every optimizer class.

For one setting of each optimizer class (tests/optimizer_registry.py) this trains a small MLP
(5-64-64-1) with ``Trainer(strategy=FSDPStrategy(), accelerator="gpu", devices=N)``,
AdaptiveLRCallback and AdaptiveLRMonitor, each rank on its 1/N of every batch, and compares the
gathered parameters and ``effective_lr`` with a plain one-process loop on the whole batches (on
the same GPU; rank 0 runs it after the Lightning run, its optimizer with
``average_across_ranks=False``: the process group still exists, and the other ranks are not in
that loop).  It prints one line per optimizer and exits 1 if any differs by more
than 1e-5 (relative).  With one GPU the run is a one-rank FSDP (the code path, not the
completion across ranks, which tests/test_sharded.py covers on CPU); use 2+ GPUs for both.

Run: ``python benchmarks/gpu_fsdp_check.py [--devices N]`` (exits 2 without CUDA).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

CASE_IDS = ("MoMo", "MoMoAdam-decoupled-lb", "QLAB-adam", "HierarchicalHD-sgd", "AdaL", "StepTunedSGD")
STEPS, BATCH = 10, 32


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(STEPS * BATCH, 5, generator=gen), torch.randn(STEPS * BATCH, 1, generator=gen)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def one_process(case_id: str, device: torch.device) -> dict[str, Any]:
    from optimizer_registry import CASES

    case = next(c for c in CASES if c.id == case_id)
    net = model().to(device)
    # One process's loop inside a process group that the other ranks have left for the next case:
    # no cross-rank average (it would wait for them).
    opt = case.make(net.parameters(), average_across_ranks=False)
    x_all, y_all = (t.to(device) for t in data())
    for k in range(STEPS):
        x, y = x_all[k * BATCH : (k + 1) * BATCH], y_all[k * BATCH : (k + 1) * BATCH]
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        kwargs: dict[str, Any] = {"loss": loss}
        if case.needs_probe:
            kwargs["probe"] = lambda x=x, y=y: nn.functional.mse_loss(net(x), y)
        opt.step(**kwargs)
    return {"params": [p.detach().cpu() for p in net.parameters()], "lr": float(opt.param_groups[0]["effective_lr"])}


def lightning_fsdp(case_id: str, devices: int) -> dict[str, Any] | None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy
    from optimizer_registry import CASES
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, AdaptiveLRMonitor

    case = next(c for c in CASES if c.id == case_id)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return case.make(self.parameters())

    module = Module()
    trainer = pl.Trainer(
        strategy=FSDPStrategy(),  # use_orig_params=True, as Lightning builds it
        accelerator="gpu",
        devices=devices,
        max_steps=STEPS,
        callbacks=[AdaptiveLRCallback(), AdaptiveLRMonitor()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    # Each rank takes its contiguous 1/N of every batch: the batches together are the whole ones.
    x, y = data()
    per_rank = BATCH // devices
    order = torch.arange(len(x)).reshape(STEPS, devices, per_rank).transpose(0, 1).reshape(devices, -1)
    loader = DataLoader(TensorDataset(x, y), batch_size=per_rank, sampler=_RankSampler(order))
    trainer.fit(module, loader)
    with FSDP.summon_full_params(trainer.strategy.model):
        params = [p.detach().cpu().clone() for p in module.parameters()]
    lr = float(trainer.optimizers[0].param_groups[0]["effective_lr"])
    return {"params": params, "lr": lr} if trainer.global_rank == 0 else None


class _RankSampler(torch.utils.data.Sampler):
    """Row ``rank`` of ``order``, the rank read when iterated (after the process group exists)."""

    def __init__(self, order: torch.Tensor) -> None:
        self.order = order

    def __iter__(self):
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return iter(self.order[rank].tolist())

    def __len__(self) -> int:
        return self.order.shape[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=torch.cuda.device_count())
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_fsdp_check: no CUDA device; this check needs one (Lightning's FSDPStrategy refuses the CPU).")
        return 2
    if BATCH % args.devices:
        print(f"gpu_fsdp_check: --devices must divide the batch of {BATCH}")
        return 2
    warnings.filterwarnings("ignore")
    worst = 0.0
    for case_id in CASE_IDS:
        got = lightning_fsdp(case_id, args.devices)
        if got is None:  # ranks > 0 only train
            continue
        want = one_process(case_id, torch.device("cuda", 0))
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got["params"], want["params"]))
        lr_diff = abs(got["lr"] - want["lr"]) / abs(want["lr"])
        worst = max(worst, diff, lr_diff)
        print(f"{case_id:28s} FSDPStrategy x{args.devices}: params {diff:.2e}, effective_lr {lr_diff:.2e} (relative)")
    if worst:
        print(f"worst relative difference: {worst:.2e} ({'OK' if worst <= 1e-5 else 'FAIL'}: 1e-5 allowed)")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
