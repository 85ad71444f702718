"""Lightning's learning-rate finder and the optimizers that need the loss.

``Tuner(trainer).lr_find()`` and the ``LearningRateFinder`` callback train for a few dozen steps with
the Trainer's callbacks replaced by the finder's own: :class:`~lightning_adaptive_lr.AdaptiveLRCallback`
is not called during the range test.  The optimizers that need the loss (``requires_loss``: MoMo,
MoMo-Adam, QLAB) would then get no loss and no probe, and a range test means nothing for them
anyway: their ``lr`` is not the step size (MoMo's is a cap on the step it computes, QLAB's the rate
of the trial step from which it fits the step).  So the finder is refused for them, before it
starts, with a message that says so.  The optimizers that need only the gradient
(HierarchicalHD, AdaL, Step-Tuned SGD, ``torch.optim``'s) run the finder as usual; so does
``AdaptiveLRCallback(qlab=True)``, whose QLAB is put on the module's own optimizer after the finder
has run (the finder then tests that optimizer's rate, which becomes QLAB's first trial rate).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from ..optim import AdaptiveLROptimizer
from .qlab_wrapping import optimizer_name

__all__ = ["guard_lr_finders", "refuse_lr_finder"]

_GUARDED = "_adaptive_lr_guarded"


def refuse_lr_finder(trainer: pl.Trainer) -> None:
    """Raise ``MisconfigurationException`` if an optimizer of ``trainer`` needs the loss."""
    names = [optimizer_name(o) for o in trainer.optimizers if isinstance(o, AdaptiveLROptimizer) and o.requires_loss]
    if not names:
        return
    raise MisconfigurationException(
        f"AdaptiveLRCallback: Lightning's learning-rate finder (Tuner.lr_find / LearningRateFinder) does not "
        f"work with {', '.join(names)}: it trains with its own callback only, so the optimizer would get no "
        "loss, and a range test of `lr` does not apply to it: MoMo's and MoMo-Adam's `lr` is only a cap on the "
        "step size they compute (the default works over a wide range), QLAB's is the rate of the trial step "
        "from which it fits the step. Train without the finder, or run it on a torch.optim optimizer and put "
        "QLAB on that one with AdaptiveLRCallback(qlab=True)."
    )


def guard_lr_finders(trainer: pl.Trainer) -> None:
    """Make every ``LearningRateFinder`` of ``trainer`` call :func:`refuse_lr_finder` before it runs.

    Called at ``setup``: the finder runs in its own ``on_fit_start`` (or later, in a subclass),
    before this package's callbacks' ``on_fit_start``, when the optimizers already exist.
    """
    for callback in trainer.callbacks:
        if not isinstance(callback, LearningRateFinder) or getattr(callback, _GUARDED, False):
            continue
        original = callback.lr_find

        def lr_find(trainer: pl.Trainer, pl_module: pl.LightningModule, _original: Any = original) -> Any:
            refuse_lr_finder(trainer)
            return _original(trainer, pl_module)

        callback.lr_find = lr_find  # type: ignore[method-assign]
        setattr(callback, _GUARDED, True)
