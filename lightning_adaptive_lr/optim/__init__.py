"""Pure-PyTorch optimizers (this subpackage imports ``torch`` only, never ``lightning``)."""

from ._base import AdaptiveOptimizer
from .momo import MoMo, MoMoAdam

__all__ = ["AdaptiveOptimizer", "MoMo", "MoMoAdam"]
