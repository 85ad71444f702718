"""LightningDataModules for the examples, configs and benchmarks.

* :class:`DigitsDataModule`: scikit-learn's bundled 8×8 handwritten digits (1797 real images, no
  download): the offline default.
* :class:`MNISTDataModule`, :class:`CIFAR10DataModule`: torchvision datasets; nothing is fetched
  unless ``download=True``, and a missing dataset raises :class:`DatasetNotFoundError` naming the
  flag and the path.
* :class:`FakeDataModule`: torchvision's ``FakeData`` (random images, random labels) of any image
  shape, for smoke tests of the large configurations.

Every module states what it yields in ``input_shape`` and ``num_classes`` as soon as it is built,
which is what :class:`~lightning_adaptive_lr.tasks.ImageClassifier` is sized from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "CIFAR10DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FakeDataModule",
    "ImageDataModule",
    "MNISTDataModule",
    "ShiftedImages",
]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not on disk and downloading was not allowed."""


class ImageDataModule(LightningDataModule):
    """Base of this package's data modules: train/val/test image-classification splits.

    Subclasses set :attr:`input_shape` and :attr:`num_classes` in ``__init__`` and assign
    ``train_set``, ``val_set`` and ``test_set`` in ``setup``.

    Args:
        batch_size: examples per training batch (evaluation uses the same size).
        num_workers: DataLoader worker processes (0 loads in the main process).
    """

    #: Shape of one example, ``(channels, height, width)`` or ``(features,)`` when flattened.
    input_shape: tuple[int, ...]
    #: Number of classes.
    num_classes: int

    def __init__(self, batch_size: int = 128, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset[Any] | None = None
        self.val_set: Dataset[Any] | None = None
        self.test_set: Dataset[Any] | None = None

    def _loader(self, dataset: Dataset[Any] | None, *, shuffle: bool) -> DataLoader[Any]:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() before asking for a data loader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader(self.test_set, shuffle=False)


def _split_indices(n: int, sizes: tuple[int, ...], seed: int) -> list[list[int]]:
    """A seeded random permutation of ``range(n)`` cut into consecutive parts of ``sizes``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    parts, start = [], 0
    for size in sizes:
        parts.append(order[start : start + size])
        start += size
    return parts


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1), got {value}")


# --------------------------------------------------------------------------- offline, real


class ShiftedImages(Dataset[tuple[Tensor, Tensor]]):
    """Images moved by a random offset of up to ``shift`` pixels in each direction every time one
    is read (the vacated border filled with ``background``): the digits' augmentation.

    Example:
        >>> data = ShiftedImages(torch.zeros(3, 1, 8, 8), torch.arange(3), shift=1, background=-1.0)
        >>> x, y = data[2]
        >>> x.shape, int(y)
        (torch.Size([1, 8, 8]), 2)
    """

    def __init__(self, images: Tensor, labels: Tensor, shift: int, background: float) -> None:
        if shift < 0:
            raise ValueError(f"shift must be at least 0, got {shift}")
        self.images, self.labels, self.shift, self.background = images, labels, shift, background

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, s = self.images[index], self.shift
        if s:
            h, w = image.shape[-2:]
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            image = F.pad(image, (s, s, s, s), value=self.background)[..., dy : dy + h, dx : dx + w]
        return image, self.labels[index]


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8×8 handwritten digits: real data that ships with scikit-learn (no download).

    1797 grey images of the digits 0-9 with 17 intensity levels, split once by a seeded random
    permutation into test (``test_fraction``), validation (``val_fraction``) and training (the
    rest: 1258 images by default).  Pixels are scaled to [0, 1] and standardized with the training
    split's mean and standard deviation.  ``shift`` augments the training images with random moves
    of up to that many pixels (a blank border fills in), as ``lalr sweep --task cnn`` does.

    Args:
        batch_size: examples per batch.
        val_fraction: share of the images held out for validation.
        test_fraction: share of the images held out for testing.
        seed: seed of the split (the same seed always gives the same split).
        flatten: yield vectors of 64 features instead of 1×8×8 images.
        num_workers: DataLoader worker processes.
        shift: training images move by up to this many pixels each time they are read (0: no
            augmentation; images only, not with ``flatten``).
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
        flatten: bool = False,
        num_workers: int = 0,
        shift: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction must be below 1, got {val_fraction + test_fraction}")
        if shift < 0 or (shift and flatten):
            raise ValueError(f"shift must be at least 0, and 0 with flatten=True; got {shift}")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.flatten = flatten
        self.shift = shift
        self.input_shape = (64,) if flatten else (1, 8, 8)
        self.num_classes = 10

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("DigitsDataModule needs scikit-learn: pip install scikit-learn") from err
        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32) / 16.0
        y = torch.as_tensor(labels, dtype=torch.long)
        n = len(y)
        n_test, n_val = round(n * self.test_fraction), round(n * self.val_fraction)
        test_idx, val_idx, train_idx = _split_indices(n, (n_test, n_val, n - n_test - n_val), self.seed)
        mean, std = x[train_idx].mean(), x[train_idx].std()
        x = (x - mean) / std
        if not self.flatten:
            x = x.view(n, 1, 8, 8)
        if self.shift:
            background = ((0.0 - mean) / std).item()  # a blank pixel, standardized
            self.train_set = ShiftedImages(x[train_idx], y[train_idx], self.shift, background)
        else:
            self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])


# --------------------------------------------------------------------------- torchvision, on disk


def _flatten_image(image: Tensor) -> Tensor:
    """``(C, H, W) → (C·H·W,)``, a named function so worker processes can pickle the transform."""
    return image.reshape(-1)


class _TorchvisionDataModule(ImageDataModule):
    """A torchvision dataset on disk, with a seeded validation split carved out of its training set.

    ``val_size=0`` validates on the test set (as the papers' curves of test accuracy do).
    """

    #: Name shown in errors.
    dataset_name: str

    def __init__(
        self,
        data_dir: str | Path,
        download: bool,
        batch_size: int,
        val_size: int,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if val_size < 0:
            raise ValueError(f"val_size must be at least 0, got {val_size}")
        self.data_dir = Path(data_dir)
        self.download = download
        self.val_size = val_size
        self.seed = seed

    def _dataset(self, train: bool, transform: Callable[[Any], Any], download: bool) -> Dataset[Any]:
        raise NotImplementedError

    def _train_transform(self) -> Callable[[Any], Any]:
        return self._eval_transform()

    def _eval_transform(self) -> Callable[[Any], Any]:
        raise NotImplementedError

    def _open(self, train: bool, transform: Callable[[Any], Any]) -> Dataset[Any]:
        try:
            return self._dataset(train, transform, False)
        except RuntimeError as err:
            if "not found" not in str(err):
                raise
            raise DatasetNotFoundError(
                f"{self.dataset_name} was not found in {self.data_dir.resolve()}: set `download: true` "
                f"(--data.download true) to fetch it there, or point `data_dir` at a copy"
            ) from None

    def prepare_data(self) -> None:
        if self.download:  # once per node; setup() then finds the files
            for train in (True, False):
                self._dataset(train, self._eval_transform(), True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_augmented = self._open(True, self._train_transform())
        self.test_set = self._open(False, self._eval_transform())
        if self.val_size == 0:
            self.train_set, self.val_set = train_augmented, self.test_set
            return
        n = len(train_augmented)  # type: ignore[arg-type]
        if self.val_size >= n:
            raise ValueError(f"val_size must be below the {n} training images, got {self.val_size}")
        val_idx, train_idx = _split_indices(n, (self.val_size, n - self.val_size), self.seed)
        # The validation images come from the training files but without augmentation.
        self.train_set = Subset(train_augmented, train_idx)
        self.val_set = Subset(self._open(True, self._eval_transform()), val_idx)


class MNISTDataModule(_TorchvisionDataModule):
    """MNIST (torchvision): 60000 training and 10000 test 28×28 grey digits.

    Standard normalisation (mean 0.1307, std 0.3081), no augmentation.

    Args:
        data_dir: folder that holds (or will hold) ``MNIST/raw``.
        download: fetch the dataset into ``data_dir`` if it is missing (off by default: nothing
            is downloaded unless asked).
        batch_size: examples per batch.
        val_size: training images held out for validation (seeded); 0 validates on the test set.
        seed: seed of the validation split.
        flatten: yield vectors of 784 features instead of 1×28×28 images.
        num_workers: DataLoader worker processes.
    """

    dataset_name = "MNIST"

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        flatten: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__(data_dir, download, batch_size, val_size, seed, num_workers)
        self.flatten = flatten
        self.input_shape = (784,) if flatten else (1, 28, 28)
        self.num_classes = 10

    def _eval_transform(self) -> Callable[[Any], Any]:
        from torchvision import transforms

        steps: list[Callable[[Any], Any]] = [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        if self.flatten:
            steps.append(_flatten_image)
        return transforms.Compose(steps)

    def _dataset(self, train: bool, transform: Callable[[Any], Any], download: bool) -> Dataset[Any]:
        from torchvision.datasets import MNIST

        return MNIST(str(self.data_dir), train=train, transform=transform, download=download)


class CIFAR10DataModule(_TorchvisionDataModule):
    """CIFAR-10 (torchvision): 50000 training and 10000 test 32×32 colour images, 10 classes.

    Per-channel normalisation with the training set's statistics; training augmentation is the
    standard random crop with 4-pixel zero padding and random horizontal flip.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py``.
        download: fetch the dataset into ``data_dir`` if it is missing (off by default).
        batch_size: examples per batch.
        val_size: training images held out for validation (seeded, not augmented); 0 validates on
            the test set.
        seed: seed of the validation split.
        augment: random crop and flip for training images.
        num_workers: DataLoader worker processes.
    """

    dataset_name = "CIFAR-10"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__(data_dir, download, batch_size, val_size, seed, num_workers)
        self.augment = augment
        self.input_shape = (3, 32, 32)
        self.num_classes = 10

    def _eval_transform(self) -> Callable[[Any], Any]:
        from torchvision import transforms

        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    def _train_transform(self) -> Callable[[Any], Any]:
        from torchvision import transforms

        if not self.augment:
            return self._eval_transform()
        return transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )

    def _dataset(self, train: bool, transform: Callable[[Any], Any], download: bool) -> Dataset[Any]:
        from torchvision.datasets import CIFAR10

        return CIFAR10(str(self.data_dir), train=train, transform=transform, download=download)


# --------------------------------------------------------------------------- synthetic


class FakeDataModule(ImageDataModule):
    """torchvision's ``FakeData``: random images with random labels, of any image shape.

    Nothing can be learned from it; it stands in for MNIST or CIFAR-10 where a configuration must
    only run (smoke tests, step-time benchmarks) without the real files.  Every image is drawn
    from a seed fixed by its index, so the three splits are disjoint and reproducible.

    Args:
        input_shape: ``(channels, height, width)``, with 1 to 4 channels (images pass through PIL).
        num_classes: number of classes.
        train_size: training images.
        val_size: validation images.
        test_size: test images.
        batch_size: examples per batch.
        seed: shifts every image's seed (different seeds, different images).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        num_classes: int = 10,
        train_size: int = 256,
        val_size: int = 64,
        test_size: int = 64,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 3 or not 1 <= shape[0] <= 4 or min(shape) < 1:
            raise ValueError(f"input_shape must be (channels, height, width) with 1 to 4 channels, got {input_shape}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        for name, size in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if size < 1:
                raise ValueError(f"{name} must be at least 1, got {size}")
        self.input_shape = shape
        self.num_classes = num_classes
        self.sizes = (train_size, val_size, test_size)
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from torchvision import transforms
        from torchvision.datasets import FakeData

        offset = self.seed * 1_000_003  # far apart, so different seeds share no image
        splits = []
        for size in self.sizes:
            splits.append(
                FakeData(
                    size=size,
                    image_size=self.input_shape,
                    num_classes=self.num_classes,
                    transform=transforms.ToTensor(),
                    random_offset=offset,
                )
            )
            offset += size
        self.train_set, self.val_set, self.test_set = splits
