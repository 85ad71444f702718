"""The optimizers under ``lightning.fabric.Fabric``: set up, step with the loss, never skip unscaling.

Fabric wraps an optimizer in a ``_FabricOptimizer`` whose ``step(closure=None)`` runs the
precision plugin (under ``16-mixed`` a ``GradScaler`` unscales the gradients, skips the step on
overflow and updates its scale) and takes no ``loss=``.  The adaptive methods need the loss, so:

* :func:`setup` is ``fabric.setup(module, optimizer)`` that also makes the raw optimizer refuse a
  step the ``GradScaler`` did not unscale (``fabric_optimizer.optimizer.step(loss=...)`` under
  ``16-mixed`` would take a step from gradients still multiplied by the scale, e.g. 65536);
* :func:`step` hands the loss (and QLAB's probe) to the raw optimizer, then steps through Fabric.

Example (one process; the same code runs under ``strategy="ddp"`` and with ``16-mixed``):

>>> import torch
>>> from lightning.fabric import Fabric
>>> import lightning_adaptive_lr as lalr
>>> from lightning_adaptive_lr.fabric import setup, step
>>> fabric = Fabric(accelerator="cpu", devices=1)
>>> module = torch.nn.Linear(3, 1)
>>> model, opt = setup(fabric, module, lalr.MoMo(module.parameters()))
>>> x, y = torch.randn(8, 3), torch.randn(8, 1)
>>> opt.zero_grad()
>>> loss = torch.nn.functional.mse_loss(model(x), y)
>>> fabric.backward(loss)
>>> step(opt, loss)
>>> opt.param_groups[0]["effective_lr"] >= 0
True

Gradient accumulation: run ``fabric.backward(loss_i / n)`` for the ``n`` micro-batches (under
``fabric.no_backward_sync(model, enabled=...)`` for all but the last) and pass the average of
the micro-batch losses, ``Σ loss_i / n``, to :func:`step`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .optim import AdaptiveOptimizer
from .optim._protocol import Probe

__all__ = ["guard", "setup", "step"]


def _raw(optimizer: Any) -> Any:
    """The optimizer a Fabric optimizer wraps (or ``optimizer`` itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def guard(fabric: Any, fabric_optimizer: Any) -> None:
    """Make the raw optimizer behind ``fabric_optimizer`` refuse a step that bypasses the GradScaler.

    Under a precision plugin with an enabled ``GradScaler`` (``16-mixed``), the raw optimizer's
    :meth:`~lightning_adaptive_lr.optim.AdaptiveOptimizer.step` then raises a ``RuntimeError`` unless
    the scaler has just unscaled its gradients (which it does inside ``fabric_optimizer.step()``).
    Without a scaler nothing is installed.  :func:`setup` calls it.
    """
    raw = _raw(fabric_optimizer)
    if not isinstance(raw, AdaptiveOptimizer):
        return
    precision = getattr(getattr(fabric, "strategy", None), "precision", None)
    scaler = getattr(precision, "scaler", None)
    if scaler is None:
        return
    from torch.amp.grad_scaler import OptState

    def check(optimizer: AdaptiveOptimizer) -> None:
        if not scaler.is_enabled():
            return
        stage = dict.get(scaler._per_optimizer_states, id(optimizer), {}).get("stage")
        if stage is not OptState.UNSCALED:
            raise RuntimeError(
                f"{optimizer._name}.step() was called directly, but Fabric's GradScaler (precision='16-mixed') "
                "has not unscaled the gradients, so the step would use gradients multiplied by the loss scale. "
                "Step through the Fabric optimizer: `lightning_adaptive_lr.fabric.step(optimizer, loss)`, or "
                "`optimizer.optimizer.set_loss(loss); optimizer.step()`."
            )

    raw._step_guard = check


def setup(fabric: Any, module: nn.Module, *optimizers: torch.optim.Optimizer, **kwargs: Any) -> Any:
    """``fabric.setup(module, *optimizers, **kwargs)``, with :func:`guard` applied to each optimizer.

    Returns what ``fabric.setup`` returns: ``(module, optimizer, ...)``.
    """
    from .callbacks.strategies import unsupported_strategy_message

    message = unsupported_strategy_message(fabric.strategy, "lightning_adaptive_lr.fabric.setup")
    if message is not None:
        raise RuntimeError(message)
    result = fabric.setup(module, *optimizers, **kwargs)
    for fabric_optimizer in result[1:] if isinstance(result, tuple) else ():
        guard(fabric, fabric_optimizer)
    return result


def step(
    fabric_optimizer: Any,
    loss: torch.Tensor | float,
    *,
    probe: Probe | None = None,
    reduced: bool = False,
) -> Any:
    """One step of an adaptive optimizer set up by Fabric: hand over ``loss`` (and ``probe``), then step.

    Args:
        fabric_optimizer: what ``fabric.setup`` returned for the optimizer.
        loss: the mini-batch loss whose gradient is in ``.grad`` (unscaled: the value your loss
            function returned; averaged over accumulated micro-batches).
        probe: QLAB's loss at the current parameters, without backward (see
            :meth:`~lightning_adaptive_lr.QLAB.step`); call ``reshard_after_probe(model)`` in it under FSDP.
        reduced: whether ``loss`` is already averaged across processes.

    Returns:
        What the Fabric optimizer's ``step`` returns.  When the GradScaler skips the step (an
        overflow), the loss handed over is dropped, not kept for the next step.
    """
    raw = _raw(fabric_optimizer)
    if not isinstance(raw, AdaptiveOptimizer):
        raise TypeError(
            f"lightning_adaptive_lr.fabric.step: expected a Fabric-wrapped optimizer of this package, got "
            f"{type(raw).__name__}; step other optimizers with `optimizer.step()`."
        )
    raw.set_loss(loss.detach() if isinstance(loss, torch.Tensor) else loss, reduced=reduced)
    previous = getattr(raw, "_registered_probe", None)
    if probe is not None:
        raw.set_probe(probe)
    try:
        return fabric_optimizer.step()
    finally:
        raw._pending_loss = None  # a step the scaler skipped must not take this loss later
        if probe is not None:
            raw._registered_probe = previous
