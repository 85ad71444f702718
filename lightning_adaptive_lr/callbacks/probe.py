"""The probe: the loss of the current window at the current parameters, without side effects.

QLAB fits its step size from one extra loss evaluation per step, on the same mini-batch as the
gradient.  Under Lightning that evaluation replays the window's micro-batches through the
unwrapped LightningModule (never through DDP's forward), in train mode, under ``torch.no_grad()``
and ``trainer.precision_plugin.forward_context()``:

* through the module's ``adaptive_lr_loss(batch)`` when it defines one, else through
  ``training_step`` with ``self.log`` muted;
* each micro-batch with the random-number state it started with (the training forward's dropout
  masks), the state before the probe restored afterwards;
* normalization buffers (BatchNorm running statistics) saved before and restored after,

so that training goes on exactly as without probing.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn

from ..optim import AdaptiveLROptimizer, reshard_after_probe
from ..optim._reduce import accumulation_dtype
from .loss_window import MicroBatch, average_over_ranks, nan_loss, rng_state, set_rng_state

__all__ = ["LOSS_HOOK", "evaluate_window", "make_probe", "stateful_buffers"]

#: Name of the optional LightningModule method that computes the loss of one batch without side
#: effects; the probe uses it instead of ``training_step`` when the module defines it.
LOSS_HOOK = "adaptive_lr_loss"

BufferChoice = Literal["norm", "all"]
LossFunction = Callable[[Any, int], "Tensor | None"]


def stateful_buffers(module: nn.Module, which: BufferChoice) -> list[Tensor]:
    """Buffers a train-mode forward may change: those of normalization layers, or all of them."""
    if which == "all":
        return list(module.buffers())
    norm_types = (nn.modules.batchnorm._NormBase,)
    return [b for m in module.modules() if isinstance(m, norm_types) for b in m.buffers(recurse=False)]


@contextlib.contextmanager
def _muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """Turn ``self.log``/``self.log_dict`` into no-ops: the probe must not log a second value."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}

    def _no_op(*args: Any, **kwargs: Any) -> None:
        return None

    for name in saved:
        object.__setattr__(module, name, _no_op)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                object.__delattr__(module, name)
            else:
                object.__setattr__(module, name, value)


def _loss_from_output(output: Any) -> Tensor | None:
    """The loss inside a ``training_step`` output (a tensor, a mapping with ``"loss"``, or ``None``)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    raise MisconfigurationException(
        f"AdaptiveLRCallback: `training_step` returned a {type(output).__name__}; the probe needs a loss tensor "
        f"or a mapping with a 'loss' key (or define `{LOSS_HOOK}(batch)` on the LightningModule)."
    )


def _loss_function(pl_module: pl.LightningModule, optimizer_idx: int) -> LossFunction:
    """``(batch, batch_idx) -> loss``: the module's loss hook if it has one, else ``training_step``."""
    hook = getattr(pl_module, LOSS_HOOK, None)
    if callable(hook):
        if "optimizer_idx" in inspect.signature(hook).parameters:
            return lambda batch, batch_idx: hook(batch, optimizer_idx=optimizer_idx)
        return lambda batch, batch_idx: hook(batch)
    step = pl_module.training_step
    try:
        params = list(inspect.signature(step).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params):
        return lambda batch, batch_idx: _loss_from_output(step(batch, batch_idx))
    return lambda batch, batch_idx: _loss_from_output(step(batch))


@torch.no_grad()
def evaluate_window(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    window: list[MicroBatch],
    *,
    optimizer_idx: int = 0,
    restore_buffers: BufferChoice = "norm",
) -> Tensor:
    """The loss of ``window`` at the current parameters (before any cross-rank average).

    The micro-batch losses are divided like Lightning divides them (by ``accumulate_grad_batches``
    in automatic optimization, by the window's length in manual optimization) and summed.
    """
    if not window:
        raise RuntimeError(
            "AdaptiveLRCallback: no batch was cached for the probe (was the callback attached before training started?)"
        )
    device = pl_module.device
    loss_fn = _loss_function(pl_module, optimizer_idx)
    divisor = trainer.accumulate_grad_batches if pl_module.automatic_optimization else len(window)
    buffers = stateful_buffers(pl_module, restore_buffers)
    saved_buffers = [b.clone() for b in buffers]
    rng_before = rng_state(device)
    total: Tensor | None = None
    try:
        with trainer.precision_plugin.forward_context(), _muted_logging(pl_module):
            for micro in window:
                set_rng_state(micro.rng, device)
                loss = loss_fn(micro.batch, micro.batch_idx)
                if loss is None:  # training_step skipped this batch: so did its backward
                    continue
                loss = loss.detach().reshape(()).to(accumulation_dtype(loss.device))
                total = loss if total is None else total + loss
    finally:
        reshard_after_probe(pl_module)  # FSDP keeps a forward-only pass's gathered parameters
        for buffer, saved in zip(buffers, saved_buffers):
            buffer.copy_(saved)
        set_rng_state(rng_before, device)
    return nan_loss(device) if total is None else total / divisor


def make_probe(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    optimizer: AdaptiveLROptimizer,
    window: Callable[[], list[MicroBatch]],
    *,
    optimizer_idx: int,
    restore_buffers: BufferChoice,
) -> Callable[[], Tensor]:
    """The probe to register with ``optimizer.set_probe(probe, reduced=True)``.

    It reads ``window()`` when it is called (inside ``optimizer.step()``, after the window closed
    and before the next micro-batch opens a new one), so one registration serves every step.
    """

    def probe() -> Tensor:
        value = evaluate_window(
            trainer, pl_module, window(), optimizer_idx=optimizer_idx, restore_buffers=restore_buffers
        )
        return average_over_ranks(value, trainer) if optimizer.average_across_ranks else value

    return probe
