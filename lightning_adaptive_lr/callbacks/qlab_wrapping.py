"""QLAB on any optimizer (``AdaptiveLRCallback(qlab=True)``).

At fit start each optimizer that ``configure_optimizers`` returned is replaced by
``QLAB.wrap(optimizer, **options)``; the module is not touched.  Optimizers that already fit their
own step size from a probe (``requires_probe``: QLAB itself) are left as they are.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer

from ..optim import QLAB, AdaptiveLROptimizer

__all__ = ["wrap_with_qlab"]


def _fits_its_own_step(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, AdaptiveLROptimizer) and optimizer.requires_probe


def wrap_with_qlab(trainer: pl.Trainer, options: dict[str, Any]) -> None:
    """Replace every optimizer of ``trainer`` by ``QLAB.wrap(optimizer, **options)``."""
    strategy = trainer.strategy
    wrapped: list[Optimizer] = []
    names: list[str] = []
    for optimizer in strategy.optimizers:
        if _fits_its_own_step(optimizer):
            wrapped.append(optimizer)
            names.append(type(optimizer).__name__)
        else:
            wrapped.append(QLAB.wrap(optimizer, **options))
            names.append(f"QLAB on {type(optimizer).__name__}")
    # The setter rebuilds the LightningOptimizer wrappers that `self.optimizers()` returns.  LR
    # schedulers stay bound to the base optimizer: the wrapper shares its `param_groups` list, so
    # what a scheduler writes there is what QLAB reads.
    strategy.optimizers = wrapped
    rank_zero_info("AdaptiveLRCallback: training with " + ", ".join(names))
