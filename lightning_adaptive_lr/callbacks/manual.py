"""Manual optimization: which loss belongs to which optimizer.

In manual optimization (``self.automatic_optimization = False``) a ``training_step`` back-propagates
its losses with ``self.manual_backward(loss)`` and steps its optimizers with ``opt.step()``, in any
order.  An optimizer that needs the loss (MoMo, MoMo-Adam, QLAB) must get *the loss whose gradient
is in its parameters' ``.grad``*, so :class:`ManualLosses` attributes every loss passed to
``manual_backward`` to the optimizers whose parameters it reaches in the autograd graph:

* the loss an optimizer gets at ``opt.step()`` is the sum of the losses back-propagated since its
  previous step that reach at least one of its parameters;
* a backward pass that finds all of an optimizer's gradients cleared (``opt.zero_grad()``, which sets
  them to ``None``) starts its sum afresh: what was back-propagated before no longer is in ``.grad``.
  (``zero_grad(set_to_none=False)`` leaves zeros that cannot be told from gradients: the sum then
  runs from the optimizer's previous step);
* ``opt.step(loss=...)`` always wins over the attributed loss.

So both usual patterns give each optimizer its own loss::

    # one after the other                   # both backward passes first, then both steps
    opt_g.zero_grad()                        opt_g.zero_grad(); opt_d.zero_grad()
    self.manual_backward(loss_g)             self.manual_backward(loss_g)
    opt_g.step()          # gets loss_g      self.manual_backward(loss_d)
    opt_d.zero_grad()                        opt_g.step()    # gets loss_g
    self.manual_backward(loss_d)             opt_d.step()    # gets loss_d
    opt_d.step()          # gets loss_d

provided ``loss_g`` does not reach the discriminator's parameters (detach the generated samples, or
use ``self.toggle_optimizer(opt_g)``, which Lightning recommends for GANs anyway).  A loss that does
reach them is counted for both optimizers, as its gradient is in both.  A loss whose graph reaches no
optimizer's parameters at all (a graph this traversal cannot see through, such as reentrant
activation checkpointing) is counted for every optimizer that needs a loss.

:class:`ExplicitLossCheck` makes the "no loss" case an error that names the fix, and lets an
explicit ``opt.step(loss=...)`` through: it reads the step's keyword arguments with the optimizer's
step hooks, since Lightning's ``on_before_optimizer_step`` hook does not see them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch  # noqa: F401  (the examples use it)
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ..optim import AdaptiveLROptimizer

__all__ = ["ExplicitLossCheck", "ManualLosses", "reachable_leaves"]


def reachable_leaves(loss: Tensor) -> set[int]:
    """The ``id`` of every leaf tensor (parameter) that a backward pass from ``loss`` reaches.

    Walks the autograd graph once (a ResNet-50 has about 340 nodes: well under a millisecond).

    >>> layer, other = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> found = reachable_leaves(layer(torch.ones(1, 2)).sum())
    >>> found == {id(layer.weight), id(layer.bias)}, id(other.weight) in found
    (True, False)
    """
    if loss.grad_fn is None:
        return {id(loss)} if loss.requires_grad else set()
    leaves: set[int] = set()
    seen: set[Any] = set()
    stack: list[Any] = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: its leaf
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def _parameters(optimizer: Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _needs_loss(optimizer: Optimizer) -> bool:
    return isinstance(optimizer, AdaptiveLROptimizer) and optimizer.requires_loss


class ManualLosses:
    """Per optimizer, the sum of the ``manual_backward`` losses that reached its parameters.

    Args:
        optimizers: the Trainer's optimizers, in order (their index identifies them).

    >>> import lightning_adaptive_lr as lalr
    >>> g, d = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    >>> losses = ManualLosses([lalr.MoMo(g.parameters()), lalr.MoMo(d.parameters())])
    >>> x = torch.ones(1, 2)
    >>> loss_g, loss_d = g(x).sum() ** 2, d(x).sum() ** 2
    >>> for loss in (loss_g, loss_d):  # both backward passes first, as a GAN step often does
    ...     losses.add(loss.detach(), loss)
    ...     loss.backward()
    >>> losses.take(0) == loss_g, losses.take(1) == loss_d
    (tensor(True), tensor(True))
    """

    def __init__(self, optimizers: Sequence[Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self._parameter_ids = [{id(p) for p in _parameters(o)} for o in self.optimizers]
        self._needing = [i for i, o in enumerate(self.optimizers) if _needs_loss(o)]
        self._sums: dict[int, Tensor] = {}

    def add(self, value: Tensor, loss: Tensor) -> None:
        """A loss about to be back-propagated: ``value`` (detached, unscaled) is counted for the
        optimizers whose parameters the graph of ``loss`` reaches."""
        if not self._needing:
            return
        if len(self.optimizers) == 1:
            targets = self._needing
        else:
            reached = reachable_leaves(loss)
            hit = [i for i, ids in enumerate(self._parameter_ids) if ids & reached]
            targets = [i for i in self._needing if i in hit] if hit else self._needing
        for index in targets:
            if all(p.grad is None for p in _parameters(self.optimizers[index])):
                self._sums.pop(index, None)  # its gradients were cleared: a new sum starts
            previous = self._sums.get(index)
            self._sums[index] = value if previous is None else previous + value

    def take(self, index: int) -> Tensor | None:
        """Optimizer ``index`` steps: its loss (``None`` if nothing reached it); the sum restarts."""
        return self._sums.pop(index, None)


class ExplicitLossCheck:
    """Raise, naming the fix, when a manual ``opt.step()`` has no loss at all.

    An optimizer step has a loss when the callback attributed one (:class:`ManualLosses`), when the
    step is called with ``loss=...``, or when one was handed over with ``set_loss`` beforehand.  The
    callback learns of the first in ``on_before_optimizer_step``, of the second in a step pre-hook;
    which of the two runs first depends on the precision plugin (the closure runs inside
    ``optimizer.step()`` under 32-bit and bf16, before it under 16-mixed), so whichever runs second
    decides.  A step post-hook clears what is left of the step.

    Args:
        message: ``message(optimizer, index)`` is the text of the error.
    """

    def __init__(self, message: Any) -> None:
        self.message = message
        self._handles: list[RemovableHandle] = []
        self._explicit: dict[int, bool] = {}  # the pre-hook ran first: was `loss=` given?
        self._waiting: set[int] = set()  # the callback ran first and had no loss for the step

    def attach(self, optimizers: Sequence[Optimizer]) -> None:
        """Hook the optimizers that need a loss (the others are left alone)."""
        self.detach()
        for index, optimizer in enumerate(optimizers):
            if not _needs_loss(optimizer) or not hasattr(optimizer, "register_step_pre_hook"):
                continue
            self._handles.append(optimizer.register_step_pre_hook(self._pre_hook(index)))
            self._handles.append(optimizer.register_step_post_hook(self._post_hook(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._explicit.clear()
        self._waiting.clear()

    def _pre_hook(self, index: int) -> Any:
        def hook(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            explicit = kwargs.get("loss") is not None
            if index in self._waiting:
                self._waiting.discard(index)
                self._check(optimizer, index, explicit)
            else:
                self._explicit[index] = explicit

        return hook

    def _post_hook(self, index: int) -> Any:
        def hook(optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._explicit.pop(index, None)
            self._waiting.discard(index)

        return hook

    def no_attributed_loss(self, optimizer: Optimizer, index: int) -> None:
        """The callback has no loss for this step of optimizer ``index``: check now or at the pre-hook."""
        if index in self._explicit:
            self._check(optimizer, index, self._explicit.pop(index))
        elif self._handles:
            self._waiting.add(index)

    def attributed_loss(self, index: int) -> None:
        """The callback hands over a loss for this step (an explicit ``loss=`` still wins)."""
        self._explicit.pop(index, None)
        self._waiting.discard(index)

    def _check(self, optimizer: Optimizer, index: int, explicit: bool) -> None:
        if explicit or getattr(optimizer, "has_pending_loss", False):
            return
        raise RuntimeError(self.message(optimizer, index))
