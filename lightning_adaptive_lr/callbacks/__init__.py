"""Lightning callbacks: feed the optimizers (loss, probe, lower bound) and trace their step sizes.

:class:`AdaptiveLRCallback` is the one callback to add; it composes the parts in
:mod:`.loss_window`, :mod:`.manual`, :mod:`.probe`, :mod:`.qlab_wrapping`, :mod:`.lower_bound` and
:mod:`.lr_finder`.  :class:`AdaptiveLRMonitor` (:mod:`.monitor`) traces the step sizes.
"""

from .adaptive_lr import AdaptiveLRCallback
from .lower_bound import lower_bound_from_losses, set_lower_bound
from .monitor import AdaptiveLRMonitor

__all__ = ["AdaptiveLRCallback", "AdaptiveLRMonitor", "lower_bound_from_losses", "set_lower_bound"]
