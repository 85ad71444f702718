"""Lightning callbacks: feed the optimizers (loss, probe, lower bound) and trace their step sizes."""

from .adaptive_lr import AdaptiveLRCallback, lower_bound_from_losses, set_lower_bound
from .monitor import AdaptiveLRMonitor

__all__ = ["AdaptiveLRCallback", "AdaptiveLRMonitor", "lower_bound_from_losses", "set_lower_bound"]
