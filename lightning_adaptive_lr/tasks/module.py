"""``TaskModule``: what every ready LightningModule of :mod:`lightning_adaptive_lr.tasks` shares.

A task module is sized by its data: ``num_classes`` (classes, or the vocabulary of a language
model) and ``input_shape`` (one example's shape).  The data modules state both as soon as they are
built, the ``lalr`` command links them from ``--data`` to ``--model``, and in Python
:meth:`TaskModule.for_datamodule` does the same.  ``setup`` checks that the data fits the network.

Subclasses: :class:`~lightning_adaptive_lr.tasks.ImageClassifier` and
:class:`~lightning_adaptive_lr.tasks.CharLanguageModel`.

Example:
    >>> from lightning_adaptive_lr.tasks import DigitsDataModule, ImageClassifier, TaskModule
    >>> model = ImageClassifier.for_datamodule(DigitsDataModule(flatten=True))
    >>> isinstance(model, TaskModule), model.num_classes, model.input_shape
    (True, 10, (64,))
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor

__all__ = ["TaskModule"]


class TaskModule(LightningModule):
    """Base of the package's ready LightningModules: sized from the data, checked against it.

    Subclasses set :attr:`num_classes` and :attr:`input_shape` in ``__init__`` (taking them as
    keyword arguments of those names, so ``lalr`` can link them) and define
    :meth:`adaptive_lr_loss`.
    """

    #: Number of classes (a language model: the vocabulary size).
    num_classes: int
    #: One example's shape.
    input_shape: tuple[int, ...]

    @classmethod
    def for_datamodule(cls, datamodule: LightningDataModule, *args: Any, **kwargs: Any) -> Any:
        """A model sized for ``datamodule`` (its ``input_shape`` and ``num_classes``)."""
        return cls(*args, num_classes=datamodule.num_classes, input_shape=datamodule.input_shape, **kwargs)

    def adaptive_lr_loss(self, batch: Any) -> Tensor:
        """The training loss of ``batch``, nothing logged (QLAB's probe through the callback)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Check that the data fits the network when the data module says what it yields."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        for name in ("input_shape", "num_classes"):
            expected = getattr(datamodule, name, None)
            if expected is None:
                continue
            expected = tuple(expected) if name == "input_shape" else int(expected)
            if expected != getattr(self, name):
                raise ValueError(
                    f"the data module yields {name}={expected} but the model was built for "
                    f"{name}={getattr(self, name)}; build it with {type(self).__name__}.for_datamodule(...)"
                )
