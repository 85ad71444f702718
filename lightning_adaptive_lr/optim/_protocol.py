"""What a training loop must know about an optimizer of this package, as declared types.

A training loop (Lightning's, through :class:`~lightning_adaptive_lr.AdaptiveLRCallback`, or your
own) reads these and nothing else: no private attribute of an optimizer is part of the contract.
Every optimizer of this package and the result of :meth:`QLAB.wrap` satisfy
:class:`AdaptiveLROptimizer`; MoMo and MoMo-Adam also satisfy :class:`LowerBoundOptimizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["AdaptiveLROptimizer", "LowerBoundOptimizer", "Probe"]

#: A loss-only re-evaluation of the current mini-batch at the current parameters (no backward).
Probe = Callable[[], Any]


@runtime_checkable
class AdaptiveLROptimizer(Protocol):
    """The optimizer ↔ training-loop contract.

    Attributes:
        requires_loss: each step needs the mini-batch loss (MoMo, MoMo-Adam, QLAB).
        requires_probe: each step needs a probe (QLAB): the loss of the same mini-batch at the
            trial point, evaluated without backward.
        calls_closure_twice: ``step(closure)`` evaluates the closure twice (Step-Tuned SGD with
            ``same_batch=True``); a loop that must not re-run its closure refuses it.
        average_across_ranks: the optimizer averages losses it is given across data-parallel ranks
            unless they are handed over as ``reduced``.
        has_pending_loss: a loss handed over with :meth:`set_loss` waits for the next step.
    """

    requires_loss: bool
    requires_probe: bool

    @property
    def calls_closure_twice(self) -> bool: ...

    @property
    def average_across_ranks(self) -> bool: ...

    @property
    def has_pending_loss(self) -> bool: ...

    def set_loss(self, loss: Tensor | float, *, reduced: bool = False) -> None:
        """Hand over the loss whose gradient is in ``.grad``, for the next ``step()``."""

    def set_probe(self, probe: Probe | None, *, reduced: bool = False) -> None:
        """Register the probe every later ``step()`` calls (if the optimizer needs one)."""


@runtime_checkable
class LowerBoundOptimizer(Protocol):
    """An optimizer whose step uses a lower bound of the loss (MoMo, MoMo-Adam)."""

    def set_lower_bound(self, lb: float) -> None:
        """Use ``lb`` as the loss's lower bound from the next step on (see the method's docs)."""
