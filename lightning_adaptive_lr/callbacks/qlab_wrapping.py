"""QLAB on any optimizer (``AdaptiveLRCallback(qlab=True)``).

At fit start each optimizer that ``configure_optimizers`` returned is replaced by
``QLAB.wrap(optimizer, **options)``; the module is not touched.  Optimizers that already fit their
own step size from a probe (``requires_probe``: QLAB itself) are left as they are.

An optimizer built so is named ``QLAB.wrap(SGD)`` (``QLAB.wrap(Adam)``, ...) everywhere: in its
``repr`` and error messages, in the message at fit start, in its saved state and in the traces of
:class:`~lightning_adaptive_lr.AdaptiveLRMonitor` (:func:`optimizer_name`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer

from ..optim import QLAB, AdaptiveLROptimizer
from ..optim._base import CLASS_KEY

__all__ = ["optimizer_name", "wrap_with_qlab"]


def optimizer_name(optimizer: Optimizer) -> str:
    """The name this package shows for ``optimizer``: the one it records in its param groups
    (``"MoMo"``, ``"QLAB.wrap(SGD)"``), else its class name.

    >>> import torch
    >>> sgd = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> optimizer_name(sgd), optimizer_name(QLAB.wrap(sgd))
    ('SGD', 'QLAB.wrap(SGD)')
    """
    defaults = getattr(optimizer, "defaults", None)
    name = defaults.get(CLASS_KEY) if isinstance(defaults, dict) else None
    return name if isinstance(name, str) else type(optimizer).__name__


def _fits_its_own_step(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, AdaptiveLROptimizer) and optimizer.requires_probe


def wrap_with_qlab(trainer: pl.Trainer, options: dict[str, Any]) -> None:
    """Replace every optimizer of ``trainer`` by ``QLAB.wrap(optimizer, **options)``."""
    strategy = trainer.strategy
    wrapped: list[Optimizer] = []
    for optimizer in strategy.optimizers:
        wrapped.append(optimizer if _fits_its_own_step(optimizer) else QLAB.wrap(optimizer, **options))
    # The setter rebuilds the LightningOptimizer wrappers that `self.optimizers()` returns.  LR
    # schedulers stay bound to the base optimizer: the wrapper shares its `param_groups` list, so
    # what a scheduler writes there is what QLAB reads.
    strategy.optimizers = wrapped
    rank_zero_info("AdaptiveLRCallback: training with " + ", ".join(optimizer_name(o) for o in wrapped))
