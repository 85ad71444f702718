"""Which Lightning strategies the adaptive optimizers can run under, and the refusal of the others.

Supported: single device, DDP (``"ddp"``, ``"ddp_spawn"``), FSDP (``FSDPStrategy``, FSDP1 with
``use_orig_params=True`` as Lightning builds it), ``ModelParallelStrategy`` (FSDP2/DTensor, HSDP),
and Fabric through :mod:`lightning_adaptive_lr.fabric`.  Refused: DeepSpeed, whose engine steps
the optimizer itself, on flat fp32 partitions it keeps, without the loss these methods need and
without telling them how the partitions lie.

>>> class Trainer:  # a stand-in with a supported strategy
...     strategy = object()
>>> refuse_unsupported_strategy(Trainer())  # returns quietly
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.exceptions import MisconfigurationException

__all__ = ["SUPPORTED_STRATEGIES", "refuse_unsupported_strategy", "unsupported_strategy_message"]

#: How the messages name the strategies that work.
SUPPORTED_STRATEGIES = (
    "a single device, strategy='ddp' or 'ddp_spawn', FSDPStrategy (FSDP1), ModelParallelStrategy "
    "(FSDP2/DTensor, HSDP), or Lightning Fabric with `lightning_adaptive_lr.fabric`"
)


def unsupported_strategy_message(strategy: Any, owner: str = "AdaptiveLRCallback") -> str | None:
    """Why ``strategy`` (a Lightning or Fabric strategy) cannot run this package's optimizers, or None."""
    names = [cls.__name__ for cls in type(strategy).__mro__]
    if any("DeepSpeed" in name for name in names):
        return (
            f"{owner}: {type(strategy).__name__} is not supported: DeepSpeed's engine steps the optimizer itself on "
            "the flat fp32 partitions it keeps, so the adaptive optimizers get neither the loss nor a way to "
            f"complete their sums over the partitions. Use {SUPPORTED_STRATEGIES}."
        )
    return None


def refuse_unsupported_strategy(trainer: Any, owner: str = "AdaptiveLRCallback") -> None:
    """Raise ``MisconfigurationException`` naming the strategies that work if ``trainer``'s is not one of them."""
    message = unsupported_strategy_message(trainer.strategy, owner)
    if message is not None:
        raise MisconfigurationException(message)
