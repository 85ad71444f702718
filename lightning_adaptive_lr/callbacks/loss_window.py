"""The accumulation window: what happened since the last optimizer step.

Lightning back-propagates each micro-batch loss already divided by ``accumulate_grad_batches``, so
the sum of the window's losses is the mean over the window: exactly the loss whose gradient is in
``.grad`` when the optimizer steps.  Under ``precision="16-mixed"`` each loss arrives multiplied by
the ``GradScaler``'s scale, which is divided out here.  When a probe will replay the window, each
micro-batch is kept with the random-number state it started with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from ..optim._reduce import accumulation_dtype

__all__ = ["LossWindow", "MicroBatch", "average_over_ranks", "loss_value", "nan_loss", "rng_state", "set_rng_state"]


@dataclass
class MicroBatch:
    """One micro-batch of the window, as the probe replays it."""

    batch: Any
    batch_idx: int
    rng: dict[str, Tensor]


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The random-number states that dropout on ``device`` draws from."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    """Restore states returned by :func:`rng_state`."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def average_over_ranks(value: Tensor, trainer: pl.Trainer) -> Tensor:
    """Mean over data-parallel ranks with one all-reduce (no barrier)."""
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / trainer.world_size


def nan_loss(device: torch.device) -> Tensor:
    """The loss of a window without one (every ``training_step`` returned ``None``): skip the step."""
    return torch.tensor(math.nan, device=device, dtype=accumulation_dtype(device))


def _unscaled(loss: Tensor, scaler: torch.amp.GradScaler | None) -> Tensor:
    """``loss`` with the ``GradScaler``'s scale divided out (exact: the scale is a power of two)."""
    if scaler is None or not scaler.is_enabled():
        return loss
    # `_get_scale_async` reads the scale without a device-to-host synchronization.
    scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
    return loss / (scale.reshape(()).to(loss) if scale is not None else scaler.get_scale())


def loss_value(loss: Tensor, scaler: torch.amp.GradScaler | None) -> Tensor | None:
    """A loss about to be back-propagated as a detached 0-d tensor in the accumulation dtype, the
    ``GradScaler``'s scale divided out; ``None`` unless it is a floating-point scalar."""
    value = loss.detach()
    if not value.is_floating_point() or value.numel() != 1:
        return None
    return _unscaled(value.reshape(()).to(accumulation_dtype(value.device)), scaler)


class LossWindow:
    """The micro-batches since the last optimizer step and the sum of their losses.

    Args:
        keep_batches: keep each micro-batch (and its random-number state) for a probe.

    >>> window = LossWindow()
    >>> for loss in (0.25, 0.5):  # two micro-batches, each loss already divided by 2
    ...     window.add_batch(batch=None, batch_idx=0, device=torch.device("cpu"))
    ...     window.add_loss(torch.tensor(loss), scaler=None)
    >>> window.close()
    tensor(0.7500, dtype=torch.float64)
    """

    def __init__(self, keep_batches: bool = False) -> None:
        self.keep_batches = keep_batches
        self.batches: list[MicroBatch] = []
        self._loss_sum: Tensor | None = None
        self._closed = True

    def add_batch(self, batch: Any, batch_idx: int, device: torch.device) -> None:
        """A micro-batch starts (the first after an optimizer step opens a new window)."""
        if self._closed:
            self.batches = []
            self._closed = False
        if self.keep_batches:
            # The training forward draws its first random number after this: replaying this state
            # gives the probe the training forward's dropout masks.
            self.batches.append(MicroBatch(batch, batch_idx, rng_state(device)))

    def add_loss(self, loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
        """A micro-batch loss about to be back-propagated (ignored unless a floating-point scalar)."""
        value = loss_value(loss, scaler)
        if value is None:
            return
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value

    def close(self) -> Tensor | None:
        """The optimizer steps: return the window's loss (``None`` if no loss was back-propagated).

        The micro-batches stay readable until the next one starts (the probe runs in between).
        """
        loss_sum, self._loss_sum = self._loss_sum, None
        self._closed = True
        return loss_sum
