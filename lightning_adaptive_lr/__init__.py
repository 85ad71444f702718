"""lightning_adaptive_lr: adaptive-learning-rate methods for PyTorch and PyTorch Lightning."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .optim import QLAB, AdaL, HierarchicalHD, MoMo, MoMoAdam, StepTunedSGD

if TYPE_CHECKING:
    from .callbacks import AdaptiveLRCallback, AdaptiveLRMonitor
    from .mixins import AdaLMixin, HierarchicalHDMixin, MoMoAdamMixin, MoMoMixin, QLABMixin, StepTunedSGDMixin

__version__ = "0.1.0"

# The Lightning layer is imported on first use, so that the optimizers (pure PyTorch) load
# without importing Lightning.
_LAZY = {
    "AdaptiveLRCallback": ".callbacks",
    "AdaptiveLRMonitor": ".callbacks",
    "AdaLMixin": ".mixins",
    "HierarchicalHDMixin": ".mixins",
    "MoMoAdamMixin": ".mixins",
    "MoMoMixin": ".mixins",
    "QLABMixin": ".mixins",
    "StepTunedSGDMixin": ".mixins",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdaL",
    "AdaLMixin",
    "AdaptiveLRCallback",
    "AdaptiveLRMonitor",
    "HierarchicalHD",
    "HierarchicalHDMixin",
    "MoMo",
    "MoMoAdam",
    "MoMoAdamMixin",
    "MoMoMixin",
    "QLAB",
    "QLABMixin",
    "StepTunedSGD",
    "StepTunedSGDMixin",
    "__version__",
]
