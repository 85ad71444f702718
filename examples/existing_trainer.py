"""Your own LightningModule, unchanged, trained with QLAB by adding one callback to the Trainer.

The module below is an ordinary Lightning module: its ``configure_optimizers`` returns plain
``torch.optim.SGD``.  ``AdaptiveLRCallback(qlab=True)`` puts QLAB on top of that optimizer when
training starts (``QLAB.wrap(SGD)``: each step fits the step size from one extra loss evaluation), and
``AdaptiveLRMonitor`` logs the step sizes it picks.  Nothing in the module changes.

If your ``configure_optimizers`` already returns one of this package's optimizers (``MoMo``,
``QLAB``, ...), the same ``AdaptiveLRCallback()`` (without ``qlab=True``) supplies what they need.

Offline: scikit-learn's bundled 8×8 digits.  Run::

    python examples/existing_trainer.py                 # a few epochs, TensorBoard logs in ./lightning_logs
    python examples/existing_trainer.py --fast          # a few steps, no logs (what the tests run)
    tensorboard --logdir lightning_logs                 # adaptive_lr/QLAB.wrap(SGD)/group0/effective_lr, ...
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

from lightning_adaptive_lr import AdaptiveLRCallback, AdaptiveLRMonitor


# ----------------------------------------------------------------------------- the user's code, unchanged
class DigitsClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    train, val = TensorDataset(x[:1500], y[:1500]), TensorDataset(x[1500:], y[1500:])
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=256)


# ----------------------------------------------------------------------------- what this package adds
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
        logger=not args.fast,  # TensorBoard in ./lightning_logs
        enable_checkpointing=False,
        enable_progress_bar=not args.fast,
        log_every_n_steps=5,
        callbacks=[AdaptiveLRCallback(qlab=True), AdaptiveLRMonitor(prog_bar=True)],
    )
    model = DigitsClassifier()
    trainer.fit(model, train, val)
    optimizer = trainer.optimizers[0]
    result = {"val_acc": float(trainer.callback_metrics["val_acc"]), "lr": float(optimizer.param_groups[0]["lr"])}
    print(f"{type(optimizer).__name__} on {type(optimizer.base_optimizer).__name__}: {result}")
    return result


if __name__ == "__main__":
    main()
