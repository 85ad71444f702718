"""Worker for tests/test_lightning_ddp.py: Lightning DDP on 2 CPU processes (gloo).

Run as ``python lightning_ddp_worker.py OUT``; Lightning's launcher starts the second rank by running
the same command again.  For every registry setting it trains the small CNN (BatchNorm, dropout)
with AdaptiveLRCallback for a few steps, each rank on its own shard of the data, and writes the
final parameters to ``OUT/<case>-<rank>.pt``.  It also writes, per rank, ``OUT/extra-<rank>.pt``:
the parameters of a MoMo run without cross-rank loss averaging (they must drift apart), and what
AdaptiveLRMonitor's desync check reported on a clean run and on a run whose rank 1 was perturbed.
"""

from __future__ import annotations

import gc
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_adaptive_lr as lalr  # noqa: E402
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, AdaptiveLRMonitor  # noqa: E402
from lightning_helpers import Classifier, case_kwargs, loader, trainer, usable_cases  # noqa: E402

STEPS = 10


def ddp_trainer(**kwargs) -> pl.Trainer:
    return trainer(strategy="ddp", devices=2, accelerator="cpu", max_steps=STEPS, **kwargs)


def parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class Perturb(pl.Callback):
    """Knocks rank 1's replica off by a little at step 3: the desync check must notice."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 3:
            with torch.no_grad():
                next(pl_module.parameters()).add_(1e-3)


def main(out: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rank = None
    for case in usable_cases():
        model = Classifier(lambda p, case=case: case.make(p, **case_kwargs(case)))
        fit = ddp_trainer(callbacks=[AdaptiveLRCallback()])
        fit.fit(model, loader(512, 16))
        rank = fit.global_rank
        torch.save(parameters(model), os.path.join(out, f"{case.id}-{rank}.pt"))

    extra: dict[str, object] = {}
    # A cap that never binds: the step size is the Polyak step, which depends on the loss.
    model = Classifier(lambda p: lalr.MoMo(p, lr=100.0, average_across_ranks=False))
    ddp_trainer(callbacks=[AdaptiveLRCallback()]).fit(model, loader(512, 16))
    extra["not_averaged"] = parameters(model)

    for name, callbacks in (("clean", []), ("perturbed", [Perturb()])):
        monitor = AdaptiveLRMonitor(check_desync_every=5)
        model = Classifier(lambda p: lalr.MoMo(p, lr=1.0))
        ddp_trainer(callbacks=[AdaptiveLRCallback(), *callbacks, monitor]).fit(model, loader(512, 16))
        extra[f"desync_{name}"] = list(monitor.desync_steps)
    torch.save(extra, os.path.join(out, f"extra-{rank}.pt"))


def leave_the_process_group() -> None:
    """Lightning keeps the process group after `fit`: free what holds it, then destroy it in order
    (as examples/ddp.py does), instead of leaving it to the interpreter's teardown."""
    gc.collect()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    leave_the_process_group()
