"""MoMo's lower bound from the losses seen so far (``AdaptiveLRCallback(lb_fraction=...)``).

At the end of each training epoch, every optimizer that takes a lower bound (MoMo, MoMo-Adam:
:class:`~lightning_adaptive_lr.optim.LowerBoundOptimizer`) gets
``lb = lower_bound_from_losses(m, fraction)``, where ``m`` is the smallest epoch-mean training loss
seen so far.  Useful when the loss cannot reach 0 (label smoothing, regularizers) and no better
bound is known.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ..optim import LowerBoundOptimizer
from ..optim.momo import momo_following_bound

__all__ = ["LowerBoundRule", "lower_bound_from_losses", "set_lower_bound"]


def lower_bound_from_losses(min_epoch_loss: float, fraction: float) -> float:
    """The lower bound that :class:`AdaptiveLRCallback` gives MoMo with ``lb_fraction``.

    ``lb = m − (1 − fraction)·|m|`` where ``m`` is the smallest epoch-mean training loss seen so far:
    ``fraction·m`` for a non-negative loss (the usual case), and always at most ``m``, so that the
    bound stays below every loss level the training has shown it can reach on average.  The same
    rule as the optimizers' own ``lb=None`` (:func:`~lightning_adaptive_lr.optim.momo.momo_following_bound`),
    applied to epoch means at epoch ends.

    >>> lower_bound_from_losses(2.0, 0.5), lower_bound_from_losses(-2.0, 0.5)
    (1.0, -3.0)
    """
    return momo_following_bound(min_epoch_loss, fraction)


def set_lower_bound(optimizer: Optimizer, lb: float) -> None:
    """Give MoMo / MoMo-Adam the lower bound ``lb`` from the next step on (see their ``set_lower_bound``).

    Raises:
        TypeError: if ``optimizer`` does not take a lower bound.
    """
    if not isinstance(optimizer, LowerBoundOptimizer):
        raise TypeError(f"set_lower_bound: {type(optimizer).__name__} does not take a lower bound (MoMo, MoMoAdam do)")
    optimizer.set_lower_bound(lb)


class LowerBoundRule:
    """Per optimizer index: the running sum and count of this epoch's losses, and the best epoch mean.

    The running sums remember their epoch (:meth:`enter_epoch`): a checkpoint written after an
    epoch's last step but before its end (``ModelCheckpoint(every_n_train_steps=...)`` at an epoch
    boundary) holds that epoch's sums, and Lightning resumes from it in the next epoch without
    running the finished epoch's ``on_train_epoch_end``; the first batch of the resumed run then
    ends that epoch, so the resumed run sets the same bound, before the same step, as the run
    that was not interrupted.

    Args:
        fraction: the rule's ``fraction`` in (0, 1]; ``None`` disables the rule (nothing is tracked).

    >>> import torch
    >>> from lightning_adaptive_lr import MoMo
    >>> momo = MoMo(torch.nn.Linear(2, 1).parameters())
    >>> rule = LowerBoundRule(fraction=0.5)
    >>> for loss in (1.0, 0.5):  # one epoch: mean 0.75
    ...     rule.track(0, torch.tensor(loss))
    >>> rule.end_epoch([momo])
    >>> momo.param_groups[0]["lb"]
    0.375
    """

    def __init__(self, fraction: float | None) -> None:
        self.fraction = fraction
        self.epoch_sum: dict[int, Tensor | float] = {}
        self.epoch_count: dict[int, int] = {}
        self.best_epoch_loss: dict[int, float] = {}
        #: The epoch the running sums belong to (``None``: not known yet).
        self.epoch: int | None = None

    def enter_epoch(self, epoch: int, optimizers: Sequence[Optimizer]) -> None:
        """A training batch of ``epoch`` starts: first end an earlier epoch whose sums are still open.

        In an uninterrupted run ``on_train_epoch_end`` has ended it already (nothing is open); after
        a resume from a checkpoint written between an epoch's last step and its end, it has not.
        """
        if self.fraction is None:
            return
        if self.epoch is not None and epoch != self.epoch and any(self.epoch_count.values()):
            self.end_epoch(optimizers)
        self.epoch = epoch

    def track(self, index: int, loss: Tensor) -> None:
        """The loss handed to optimizer ``index`` for one step (kept on its device until the epoch ends)."""
        if self.fraction is None:
            return
        self.epoch_sum[index] = self.epoch_sum.get(index, 0.0) + loss
        self.epoch_count[index] = self.epoch_count.get(index, 0) + 1

    def end_epoch(self, optimizers: Sequence[Optimizer]) -> None:
        """Update each best epoch mean and set the lower bound of the optimizers that take one."""
        if self.fraction is None:
            return
        for index, optimizer in enumerate(optimizers):
            count = self.epoch_count.pop(index, 0)
            total = self.epoch_sum.pop(index, 0.0)
            if count == 0:
                continue
            mean = float(total) / count  # one synchronization per epoch
            if not math.isfinite(mean):
                continue
            best = min(mean, self.best_epoch_loss.get(index, math.inf))
            self.best_epoch_loss[index] = best
            if isinstance(optimizer, LowerBoundOptimizer):
                optimizer.set_lower_bound(lower_bound_from_losses(best, self.fraction))

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch_sum": {k: float(v) for k, v in self.epoch_sum.items()},
            "epoch_count": dict(self.epoch_count),
            "best_epoch_loss": dict(self.best_epoch_loss),
            "epoch": self.epoch,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epoch_sum = {int(k): float(v) for k, v in state_dict.get("epoch_sum", {}).items()}
        self.epoch_count = {int(k): int(v) for k, v in state_dict.get("epoch_count", {}).items()}
        self.best_epoch_loss = {int(k): float(v) for k, v in state_dict.get("best_epoch_loss", {}).items()}
        epoch = state_dict.get("epoch")  # absent from checkpoints written before it was kept
        self.epoch = None if epoch is None else int(epoch)
