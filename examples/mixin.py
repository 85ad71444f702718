"""Change one base class: an existing LightningModule trains with MoMo.

``class DigitsClassifier(pl.LightningModule)`` became ``class DigitsClassifier(MoMoMixin)``; the
rest of the module is as it was, its own ``configure_optimizers`` included (the mixin replaces the
optimizer it returns, keeping its parameters).  The mixin:

* builds ``MoMo`` from ``self.hparams["adaptive_lr"]`` (MoMo's defaults, overridable: below, the
  class attribute ``adaptive_lr_hparams``), so checkpoints and loggers carry the settings;
* adds ``AdaptiveLRCallback`` (feeds MoMo the loss) and ``AdaptiveLRMonitor`` (logs MoMo's step size
  ``tau`` and its lower bound) through ``configure_callbacks``.

The other mixins work the same way: ``MoMoAdamMixin``, ``QLABMixin``, ``HierarchicalHDMixin``,
``AdaLMixin``, ``StepTunedSGDMixin``.  Offline (scikit-learn's digits).  Run::

    python examples/mixin.py            # a few epochs, TensorBoard logs in ./lightning_logs
    python examples/mixin.py --fast     # a few steps, no logs (what the tests run)
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adaptive_lr import MoMoMixin


class DigitsClassifier(MoMoMixin):  # was: pl.LightningModule
    adaptive_lr_hparams = {"lr": 1.0, "weight_decay": 1e-4}  # optional: MoMo's defaults otherwise

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:  # replaced by the mixin's
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    train, val = TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=256)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--fast", action="store_true", default=os.environ.get("LALR_EXAMPLE_FAST") == "1")
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    trainer = pl.Trainer(
        max_epochs=1 if args.fast else args.epochs,
        limit_train_batches=5 if args.fast else 1.0,
        limit_val_batches=1 if args.fast else 1.0,
        logger=not args.fast,
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
        log_every_n_steps=5,
    )
    model = DigitsClassifier()
    trainer.fit(model, train, val)
    optimizer = trainer.optimizers[0]
    result = {"val_acc": float(trainer.callback_metrics["val_acc"]), "tau": float(optimizer.param_groups[0]["tau"])}
    print(f"{type(optimizer).__name__} with {model.hparams['adaptive_lr']}: {result}")
    return result


if __name__ == "__main__":
    main()
