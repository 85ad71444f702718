"""``ImageClassifier``: the LightningModule that the configs, examples and benchmarks train."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from ..optim import MoMo
from .backbones import BackboneName, build_backbone
from .module import TaskModule

__all__ = ["ImageClassifier"]

Batch = tuple[Tensor, Tensor]


class ImageClassifier(TaskModule):
    """Cross-entropy image classification over one of the seed papers' backbones.

    Logs ``train_loss`` (every step), ``train_acc`` (per epoch), ``val_loss``, ``val_acc``,
    ``test_loss`` and ``test_acc``; accuracies are torchmetrics' micro-averaged multiclass accuracy.

    The input shape and the number of classes belong to the data: the ``lalr`` command links them
    from the data module (``data.input_shape`` → ``model.input_shape``, the same for
    ``num_classes``), and in Python :meth:`for_datamodule` does the same.  The network is built
    here, in ``__init__``, so the parameters exist when an optimizer is made (LightningCLI makes it
    right after instantiating the model) and checkpoints reload with ``load_from_checkpoint``.

    No optimizer is chosen here on purpose: ``lalr fit --optimizer ...`` (LightningCLI) replaces
    :meth:`configure_optimizers`.  Without one, :class:`~lightning_adaptive_lr.MoMo` with its
    default ``lr=1.0`` is used; it needs the loss, which Lightning's closure supplies in 32-bit
    training and :class:`~lightning_adaptive_lr.AdaptiveLRCallback` supplies everywhere.

    Args:
        backbone: the network (see :mod:`lightning_adaptive_lr.tasks.backbones`).
        num_classes: number of classes (linked from the data module by ``lalr``).
        input_shape: one example's shape, ``(channels, height, width)``, or ``(features,)`` for an
            MLP on flat inputs (linked from the data module by ``lalr``).
        hidden_sizes: hidden widths of the ``mlp`` (MoMo's MNIST MLP: 100, 100; QLAB's: 1024,
            1000, 1000).
        channels: block widths of the ``small_cnn``.
        dropout: dropout rate of ``mlp``, ``small_cnn`` and ``vgg16_bn``; ``None`` keeps each
            backbone's default (0 for the MLP, 0.25 for the small CNN, 0.5 for VGG).
        cifar_stem: ResNet-18/34 and ShuffleNet-V2 with the small-image stem (3×3 convolution, no
            max-pool) instead of the ImageNet one.
    """

    def __init__(
        self,
        backbone: BackboneName = "mlp",
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        hidden_sizes: tuple[int, ...] = (100, 100),
        channels: tuple[int, ...] = (32, 64),
        dropout: float | None = None,
        cifar_stem: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.net = build_backbone(
            backbone,
            self.input_shape,
            self.num_classes,
            hidden_sizes=hidden_sizes,
            channels=channels,
            dropout=dropout,
            cifar_stem=cifar_stem,
        )
        self.train_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")

    @classmethod
    def for_datamodule(cls, datamodule: LightningDataModule, backbone: BackboneName = "mlp", **kwargs: Any) -> ImageClassifier:
        """An ``ImageClassifier`` sized for ``datamodule`` (its ``input_shape`` and ``num_classes``)."""
        return cls(backbone, num_classes=datamodule.num_classes, input_shape=datamodule.input_shape, **kwargs)

    # ------------------------------------------------------------------ forward and loss

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch of inputs."""
        return self.net(x)

    def adaptive_lr_loss(self, batch: Batch) -> Tensor:
        """The training loss of ``batch``: mean cross-entropy, nothing logged, no metric touched.

        :class:`~lightning_adaptive_lr.AdaptiveLRCallback` calls it for QLAB's extra loss value at
        the trial point (in place of ``training_step``, which would also update ``train_acc``).
        """
        x, y = batch
        return F.cross_entropy(self(x), y)

    # ------------------------------------------------------------------ Lightning steps

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: Batch, stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """MoMo with its defaults; replaced by ``lalr ... --optimizer`` (LightningCLI)."""
        return MoMo(self.parameters())
