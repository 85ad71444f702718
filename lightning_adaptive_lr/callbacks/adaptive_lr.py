"""``AdaptiveLRCallback``: supplies what this package's optimizers need from a Lightning training loop.

The optimizers of :mod:`lightning_adaptive_lr.optim` are plain PyTorch optimizers.  Some need more
than the gradient: MoMo and QLAB need the mini-batch loss, QLAB needs one extra loss evaluation at
a trial point.  What a step needs, each optimizer declares through
:class:`~lightning_adaptive_lr.optim.AdaptiveLROptimizer`; this callback reads that and nothing else.
It never calls Lightning's closure itself (that closure re-runs ``training_step``, logging and hooks).

The parts, one module each: the accumulation window (:mod:`.loss_window`), the losses of manual
optimization (:mod:`.manual`), the probe (:mod:`.probe`), QLAB on any optimizer
(:mod:`.qlab_wrapping`), MoMo's lower bound (:mod:`.lower_bound`), Lightning's learning-rate finder
(:mod:`.lr_finder`).  Where they run (Lightning 2.x hook order):

* ``setup``: a ``LearningRateFinder`` is made to refuse the optimizers that need the loss.
* ``on_train_start``: in manual optimization, the optimizers that need the loss get step hooks that
  see ``opt.step(loss=...)``.
* ``on_train_batch_start``: the batch and the random-number state are kept for the probe (only
  when an optimizer needs a probe); an epoch whose lower-bound sums a resume left open is ended.
* ``on_before_backward``: the loss is added to the window, the AMP scale undone (in manual
  optimization: to the optimizers whose parameters it reaches).
* ``on_before_optimizer_step``: gradients are complete and unscaled.  The window's loss is averaged
  across ranks (one collective) and handed to the raw optimizer with ``set_loss(..., reduced=True)``;
  QLAB gets its probe with ``set_probe(...)``.  This hook runs inside the closure under 32-bit and
  bf16 (the optimizer calls the closure first, then reads the loss) and before ``optimizer.step()``
  under 16-mixed: both orders work.
* ``on_train_epoch_end``: the lower-bound rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from ..optim import AdaptiveLROptimizer
from .loss_window import LossWindow, MicroBatch, average_over_ranks, loss_value, nan_loss
from .lower_bound import LowerBoundRule, lower_bound_from_losses, set_lower_bound
from .lr_finder import guard_lr_finders
from .manual import ExplicitLossCheck, ManualLosses
from .probe import LOSS_HOOK, evaluate_window, make_probe
from .qlab_wrapping import optimizer_name, wrap_with_qlab
from .strategies import refuse_unsupported_strategy

__all__ = ["AdaptiveLRCallback", "lower_bound_from_losses", "set_lower_bound"]


def _raw(optimizer: Optimizer) -> Optimizer:
    """The optimizer itself, if Lightning hands over its ``LightningOptimizer`` wrapper."""
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _adaptive(optimizers: list[Optimizer]) -> list[tuple[int, AdaptiveLROptimizer]]:
    """The optimizers that declare what their steps need, with their indices."""
    return [(i, o) for i, o in enumerate(optimizers) if isinstance(o, AdaptiveLROptimizer)]


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The ``GradScaler`` of ``precision="16-mixed"`` (``None`` under other precisions)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _refuse_unsupported(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Raise, saying why, for an optimizer this loop cannot feed."""
    automatic = pl_module.automatic_optimization
    for _, optimizer in _adaptive(trainer.optimizers):
        name = type(optimizer).__name__
        if optimizer.calls_closure_twice and automatic:
            raise MisconfigurationException(
                f"{name} is configured to evaluate its closure twice per step (`same_batch=True`), but in "
                "Lightning's automatic optimization the closure runs `training_step`, the backward pass, "
                "logging and the hooks; running it twice would log twice, step schedulers and callbacks "
                "twice and, with gradient accumulation, mix micro-batches. Use `same_batch=False` (the "
                "paper's default: the second half-step uses the next mini-batch), or manual optimization "
                "with a closure of your own."
            )
        if optimizer.calls_closure_twice and _grad_scaler(trainer) is not None:
            raise MisconfigurationException(
                f"{name} with `same_batch=True` needs a closure, and under precision='16-mixed' Lightning "
                "calls `optimizer.step()` through the GradScaler, which does not support closures. Use "
                "`same_batch=False`, or bf16-mixed / 32-true precision."
            )
        if optimizer.requires_probe and not automatic and not callable(getattr(pl_module, LOSS_HOOK, None)):
            raise MisconfigurationException(
                f"{name} evaluates the loss once more per step (a probe). In manual optimization the "
                "callback cannot re-run `training_step` (it steps the optimizers itself): define "
                f"`{LOSS_HOOK}(self, batch)` on {type(pl_module).__name__}, returning the batch's loss "
                "without side effects (optionally with an `optimizer_idx` argument)."
            )


def _no_loss_message(optimizer: Optimizer, index: int) -> str:
    return (
        f"AdaptiveLRCallback: {optimizer_name(optimizer)} (optimizer {index}) needs the loss of its step, but no "
        "loss passed to `manual_backward` since its previous step reached its parameters. In manual "
        "optimization call `self.manual_backward(loss)` with a loss computed from its parameters before "
        "`opt.step()`, or pass the loss: `opt.step(loss=loss)`."
    )


class AdaptiveLRCallback(Callback):
    """Feeds this package's optimizers from a Lightning training loop.

    Add it to the Trainer (``Trainer(callbacks=[AdaptiveLRCallback()])``) when ``configure_optimizers``
    returns one of this package's optimizers; the mixins of :mod:`lightning_adaptive_lr.mixins` add it
    for you.  What it does, per optimizer step, for the optimizers that declare their needs
    (:class:`~lightning_adaptive_lr.optim.AdaptiveLROptimizer`; others are left alone):

    * **Loss** (``requires_loss``: MoMo, MoMo-Adam, QLAB): the sum of the micro-batch losses of the
      accumulation window as Lightning back-propagates them (each already divided by
      ``accumulate_grad_batches``), with the ``GradScaler`` scale of ``precision="16-mixed"`` undone,
      averaged across data-parallel ranks once (unless the optimizer's ``average_across_ranks`` is
      off), and handed over with ``optimizer.set_loss(loss, reduced=True)``.  Works with 32-true,
      bf16-mixed and 16-mixed.  A step whose ``training_step`` returned ``None`` gets a NaN loss,
      which the optimizers treat as "skip this step".
    * **Manual optimization** (several optimizers, GANs): each optimizer gets its own loss: the
      sum of the losses passed to ``manual_backward`` since its previous step (or since its
      ``zero_grad()``) that reach its parameters in the autograd graph, i.e. the loss whose gradient
      is in its ``.grad``; ``opt.step(loss=...)`` always wins over it.  A step with neither raises
      an error that names both fixes.  The rule and the usual patterns: :mod:`.manual`.
    * **Probe** (``requires_probe``: QLAB): a loss-only re-evaluation of the window's micro-batches
      at the trial point, registered with ``optimizer.set_probe(fn, reduced=True)``.  It runs under
      ``torch.no_grad()`` and ``trainer.precision_plugin.forward_context()`` on the unwrapped
      LightningModule (never through DDP's forward), in train mode, through the module's
      ``adaptive_lr_loss(batch)`` when it defines one, else through ``training_step`` with logging
      muted.  The random-number state saved when each micro-batch started is replayed (the same
      dropout masks as the training forward) and restored afterwards; BatchNorm running statistics
      are saved before and restored after, so training goes on exactly as without probing.  The
      value is the mean over the window (normalized like the loss) averaged across ranks.
    * **QLAB on any optimizer** (``qlab=True``): at fit start, each optimizer returned by
      ``configure_optimizers`` is replaced by ``QLAB.wrap(optimizer, **options)`` — the module is
      not touched.  Lightning's optimizer wrappers are rebuilt; LR schedulers keep working because
      the QLAB wrapper shares the base optimizer's ``param_groups``.
    * **MoMo's lower bound** (``lb_fraction``): at the end of each training epoch, MoMo and
      MoMo-Adam get ``lb = lower_bound_from_losses(m, lb_fraction)`` where ``m`` is the smallest
      epoch-mean training loss seen so far (see :func:`lower_bound_from_losses`), through their
      ``set_lower_bound``.  It becomes both the lower bound and, with ``estimate_lb=True``, the floor
      of the online estimate.  Use it when the loss cannot reach 0 (label smoothing, regularizers)
      and no better bound is known.

    What it refuses, with a message that says why: an optimizer that would call Lightning's closure
    twice in automatic optimization (``calls_closure_twice``: Step-Tuned SGD with ``same_batch=True``),
    a probe in manual optimization without an ``adaptive_lr_loss`` method (``training_step`` there
    steps the optimizers itself), and Lightning's learning-rate finder (``Tuner.lr_find``) for the
    optimizers that need the loss (it runs without this callback, and their ``lr`` is not a step
    size: :mod:`.lr_finder`).  Several optimizers are supported in manual optimization (Lightning
    requires it for several optimizers).

    Args:
        qlab: ``True`` or a dict of ``QLAB.wrap`` options: put QLAB on top of the module's own
            optimizers at fit start.
        lb_fraction: if set (in (0, 1]), set MoMo's lower bound at every epoch end from the losses
            observed so far (the rule above).  ``None`` leaves ``lb`` alone.
        restore_buffers: which buffers the probe saves and restores: ``"norm"`` (those of
            BatchNorm/InstanceNorm layers, the default) or ``"all"`` (every buffer, for models with
            other running statistics updated in the forward).

    Example::

        trainer = Trainer(callbacks=[AdaptiveLRCallback()])
        trainer.fit(model)  # model.configure_optimizers() returns MoMo(self.parameters())
    """

    def __init__(
        self,
        qlab: bool | dict[str, Any] = False,
        lb_fraction: float | None = None,
        restore_buffers: Literal["norm", "all"] = "norm",
    ) -> None:
        if not isinstance(qlab, (bool, dict)):
            raise ValueError(f"AdaptiveLRCallback: `qlab` must be True, False or a dict of QLAB.wrap options, got {qlab!r}")
        if lb_fraction is not None and not (
            isinstance(lb_fraction, (int, float)) and not isinstance(lb_fraction, bool) and 0.0 < lb_fraction <= 1.0
        ):
            raise ValueError(f"AdaptiveLRCallback: `lb_fraction` must be None or a number in (0, 1], got {lb_fraction!r}")
        if restore_buffers not in ("norm", "all"):
            raise ValueError(f"AdaptiveLRCallback: `restore_buffers` must be 'norm' or 'all', got {restore_buffers!r}")
        self.qlab = qlab
        self.lb_fraction = lb_fraction
        self.restore_buffers = restore_buffers
        self._window = LossWindow()
        self._lower_bound = LowerBoundRule(lb_fraction)
        self._manual: ManualLosses | None = None
        self._explicit = ExplicitLossCheck(_no_loss_message)

    # ------------------------------------------------------------------ set-up

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            guard_lr_finders(trainer)
            refuse_unsupported_strategy(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.qlab is not False:
            wrap_with_qlab(trainer, {} if self.qlab is True else dict(self.qlab))
        _refuse_unsupported(trainer, pl_module)
        adaptive = [o for _, o in _adaptive(trainer.optimizers)]
        self._window = LossWindow(keep_batches=any(o.requires_probe for o in adaptive))
        if trainer.strategy.handles_gradient_accumulation and any(o.requires_loss for o in adaptive):
            warnings.warn(
                f"AdaptiveLRCallback: the strategy {type(trainer.strategy).__name__} accumulates gradients itself; "
                "the loss handed to the optimizer may not match the accumulated gradient.",
                RuntimeWarning,
                stacklevel=2,
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Register the probes once before the first step as well: an optimizer may look for its
        # probe before it runs Lightning's closure (in which `on_before_optimizer_step` runs).
        for index, optimizer in _adaptive(trainer.optimizers):
            if optimizer.requires_probe:
                optimizer.set_probe(self._probe(trainer, pl_module, optimizer, index), reduced=True)
        if not pl_module.automatic_optimization:
            self._manual = ManualLosses(trainer.optimizers)
            self._explicit.attach(trainer.optimizers)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._explicit.detach()
        self._manual = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._explicit.detach()

    # ------------------------------------------------------------------ per micro-batch and per step

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._lower_bound.enter_epoch(trainer.current_epoch, trainer.optimizers)
        self._window.add_batch(batch, batch_idx, pl_module.device)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._manual is None:
            self._window.add_loss(loss, _grad_scaler(trainer))
            return
        value = loss_value(loss, _grad_scaler(trainer))
        if value is not None:
            self._manual.add(value, loss)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        optimizer = _raw(optimizer)
        loss_sum = self._window.close()
        if not isinstance(optimizer, AdaptiveLROptimizer):
            return
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        if optimizer.requires_loss and self._manual is not None:
            loss = self._manual.take(index)
            if loss is None:  # unless the step is given `loss=` (seen by a step hook): an error
                self._explicit.no_attributed_loss(optimizer, index)
            else:
                self._explicit.attributed_loss(index)
                self._hand_over_loss(trainer, optimizer, index, loss)
        elif optimizer.requires_loss:
            # None: training_step returned None for every micro-batch, Lightning skipped the backward.
            self._hand_over_loss(trainer, optimizer, index, nan_loss(pl_module.device) if loss_sum is None else loss_sum)
        if optimizer.requires_probe:
            optimizer.set_probe(self._probe(trainer, pl_module, optimizer, index), reduced=True)

    def _hand_over_loss(self, trainer: pl.Trainer, optimizer: AdaptiveLROptimizer, index: int, loss_sum: Tensor) -> None:
        loss = average_over_ranks(loss_sum, trainer) if optimizer.average_across_ranks else loss_sum
        optimizer.set_loss(loss, reduced=True)
        self._lower_bound.track(index, loss)

    # ------------------------------------------------------------------ the probe

    def _probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: AdaptiveLROptimizer, index: int
    ) -> Callable[[], Tensor]:
        return make_probe(
            trainer,
            pl_module,
            optimizer,
            lambda: self._window.batches,
            optimizer_idx=index,
            restore_buffers=self.restore_buffers,
        )

    def evaluate_window(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        window: list[MicroBatch] | None = None,
        *,
        optimizer_idx: int = 0,
    ) -> Tensor:
        """The loss of the current accumulation window at the current parameters, without side effects.

        This is what the probe computes (before the cross-rank average); see :mod:`.probe`.
        """
        window = self._window.batches if window is None else window
        return evaluate_window(
            trainer, pl_module, window, optimizer_idx=optimizer_idx, restore_buffers=self.restore_buffers
        )

    # ------------------------------------------------------------------ MoMo's lower bound

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lower_bound.end_epoch(trainer.optimizers)

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._lower_bound.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._lower_bound.load_state_dict(state_dict)
