"""Pure-PyTorch optimizers (this subpackage imports ``torch`` only, never ``lightning``)."""

from ._base import AdaptiveOptimizer
from .adal import AdaL
from .hypergradient import HierarchicalHD
from .momo import MoMo, MoMoAdam
from .qlab import QLAB
from .step_tuned import StepTunedSGD

__all__ = ["AdaL", "AdaptiveOptimizer", "HierarchicalHD", "MoMo", "MoMoAdam", "QLAB", "StepTunedSGD"]
