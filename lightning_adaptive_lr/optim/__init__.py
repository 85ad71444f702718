"""Pure-PyTorch optimizers (this subpackage imports ``torch`` only, never ``lightning``)."""

from ._base import AdaptiveOptimizer
from ._protocol import AdaptiveLROptimizer, LowerBoundOptimizer, Probe
from ._sharding import reshard_after_probe
from .adal import AdaL
from .hypergradient import HierarchicalHD
from .momo import MoMo, MoMoAdam
from .qlab import QLAB
from .step_tuned import StepTunedSGD

__all__ = [
    "AdaL",
    "AdaptiveLROptimizer",
    "AdaptiveOptimizer",
    "LowerBoundOptimizer",
    "Probe",
    "HierarchicalHD",
    "MoMo",
    "MoMoAdam",
    "QLAB",
    "StepTunedSGD",
    "reshard_after_probe",
]
