"""Ready LightningModules and LightningDataModules for the examples, configs and benchmarks.

``ImageClassifier`` trains one of the seed papers' networks (MLP, LeNet-5, a small CNN, ResNet-20,
ResNet-18/34, VGG-16-BN, ShuffleNet-V2) with cross-entropy; the data modules supply offline real
data (scikit-learn's digits), MNIST and CIFAR-10 (torchvision, downloaded only on request) and
synthetic images (torchvision's FakeData).  ``CharLanguageModel`` and ``StdlibTextDataModule``
(:mod:`~lightning_adaptive_lr.tasks.language`) train a small causal character-level Transformer on
the docstrings (or comments) of the running Python's standard library, offline.
"""

from .backbones import BACKBONES, BackboneName, CifarResNet, build_backbone
from .classifier import ImageClassifier
from .data import (
    CIFAR10DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    FakeDataModule,
    ImageDataModule,
    MNISTDataModule,
)
from .language import CharLanguageModel, CharTransformer, StdlibTextDataModule
from .module import TaskModule

__all__ = [
    "BACKBONES",
    "BackboneName",
    "CIFAR10DataModule",
    "CharLanguageModel",
    "CharTransformer",
    "CifarResNet",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FakeDataModule",
    "ImageClassifier",
    "ImageDataModule",
    "MNISTDataModule",
    "StdlibTextDataModule",
    "TaskModule",
    "build_backbone",
]
