"""lightning_adaptive_lr: adaptive-learning-rate methods for PyTorch and PyTorch Lightning."""

from .optim import MoMo, MoMoAdam

__version__ = "0.1.0"

__all__ = ["MoMo", "MoMoAdam", "__version__"]
