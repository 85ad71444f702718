"""``AdaptiveLRCallback``: supplies what this package's optimizers need from a Lightning training loop.

The optimizers of :mod:`lightning_adaptive_lr.optim` are plain PyTorch optimizers.  Some need more
than the gradient: MoMo and QLAB need the mini-batch loss, QLAB needs one extra loss evaluation at
a trial point.  Under Lightning, that loss must be taken from the right place (it is divided by
``accumulate_grad_batches``, multiplied by the AMP scale under ``precision="16-mixed"``, different
on every data-parallel rank), and the extra evaluation must reproduce the training forward (same
batches, same dropout masks, BatchNorm statistics left untouched).  This callback does both, and
never calls Lightning's closure itself (that closure re-runs ``training_step``, logging and hooks).

Where things happen (Lightning 2.x hook order):

* ``on_train_batch_start``: the batch and the random-number state are cached for the probe (only
  when an optimizer needs a probe).
* ``on_before_backward``: the loss is captured, the AMP scale undone, and summed over the
  accumulation window (each micro-batch loss arrives already divided by ``accumulate_grad_batches``,
  so the sum is the mean over the window, exactly the loss whose gradient is in ``.grad``).
* ``on_before_optimizer_step``: gradients are complete and unscaled.  The window's loss is averaged
  across ranks (one collective) and handed to the raw optimizer with ``set_loss(..., reduced=True)``;
  QLAB gets its probe with ``set_probe(...)``.  This hook runs inside the closure under 32-bit and
  bf16 (the optimizer calls the closure first, then reads the loss) and before ``optimizer.step()``
  under 16-mixed: both orders work.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from ..optim._tensorlists import accumulation_dtype

__all__ = ["AdaptiveLRCallback", "lower_bound_from_losses"]

#: Name of the optional LightningModule method that computes the loss of one batch without side
#: effects; the probe uses it instead of ``training_step`` when the module defines it.
LOSS_HOOK = "adaptive_lr_loss"


def lower_bound_from_losses(min_epoch_loss: float, fraction: float) -> float:
    """The lower bound that :class:`AdaptiveLRCallback` gives MoMo with ``lb_fraction``.

    ``lb = m − (1 − fraction)·|m|`` where ``m`` is the smallest epoch-mean training loss seen so far:
    ``fraction·m`` for a non-negative loss (the usual case), and always at most ``m``, so that the
    bound stays below every loss level the training has shown it can reach on average.
    """
    return min_epoch_loss - (1.0 - fraction) * abs(min_epoch_loss)


@dataclass
class _MicroBatch:
    """One micro-batch of the current accumulation window, as the probe replays it."""

    batch: Any
    batch_idx: int
    rng: dict[str, Tensor]


def _raw(optimizer: Optimizer) -> Optimizer:
    """The optimizer itself, if Lightning hands over its ``LightningOptimizer`` wrapper."""
    return optimizer._optimizer if isinstance(optimizer, LightningOptimizer) else optimizer


def _rng_state(device: torch.device) -> dict[str, Tensor]:
    """The random-number states that dropout on ``device`` draws from."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def _stateful_buffers(module: nn.Module, which: str) -> list[Tensor]:
    """Buffers a train-mode forward may change: those of normalization layers, or all of them."""
    if which == "all":
        return list(module.buffers())
    norm_types = (nn.modules.batchnorm._NormBase,)
    return [b for m in module.modules() if isinstance(m, norm_types) for b in m.buffers(recurse=False)]


@contextlib.contextmanager
def _muted_logging(module: pl.LightningModule) -> Iterator[None]:
    """Turn ``self.log``/``self.log_dict`` into no-ops: the probe must not log a second value."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}

    def _no_op(*args: Any, **kwargs: Any) -> None:
        return None

    for name in saved:
        object.__setattr__(module, name, _no_op)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                object.__delattr__(module, name)
            else:
                object.__setattr__(module, name, value)


def _average_over_ranks(value: Tensor, trainer: pl.Trainer) -> Tensor:
    """Mean over data-parallel ranks with one all-reduce (no barrier)."""
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / trainer.world_size


def _loss_from_output(output: Any) -> Tensor | None:
    """The loss inside a ``training_step`` output (a tensor, a mapping with ``"loss"``, or ``None``)."""
    if output is None or isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        return output.get("loss")
    raise MisconfigurationException(
        f"AdaptiveLRCallback: `training_step` returned a {type(output).__name__}; the probe needs a loss tensor "
        "or a mapping with a 'loss' key (or define `adaptive_lr_loss(batch)` on the LightningModule)."
    )


class AdaptiveLRCallback(Callback):
    """Feeds this package's optimizers from a Lightning training loop.

    Add it to the Trainer (``Trainer(callbacks=[AdaptiveLRCallback()])``) when ``configure_optimizers``
    returns one of this package's optimizers; the mixins of :mod:`lightning_adaptive_lr.mixins` add it
    for you.  What it does, per optimizer step:

    * **Loss** (for optimizers with ``requires_loss``: MoMo, MoMo-Adam, QLAB): the sum of the
      micro-batch losses of the accumulation window as Lightning back-propagates them (each already
      divided by ``accumulate_grad_batches``), with the ``GradScaler`` scale of ``precision="16-mixed"``
      undone, averaged across data-parallel ranks once, and handed over with
      ``optimizer.set_loss(loss, reduced=True)``.  Works with 32-true, bf16-mixed and 16-mixed.  In
      manual optimization the loss of an optimizer step is the sum of the losses passed to
      ``manual_backward`` since the previous optimizer step.  A step whose ``training_step``
      returned ``None`` gets a NaN loss, which the optimizers treat as "skip this step".
    * **Probe** (for optimizers with ``requires_probe``: QLAB): a loss-only re-evaluation of the
      window's micro-batches at the trial point, registered with ``optimizer.set_probe(fn, reduced=True)``.
      It runs under ``torch.no_grad()`` and ``trainer.precision_plugin.forward_context()`` on the
      unwrapped LightningModule (never through DDP's forward), in train mode, through the module's
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
      epoch-mean training loss seen so far (see :func:`lower_bound_from_losses`).  It becomes both the
      lower bound and, with ``estimate_lb=True``, the floor of the online estimate.  Use it when the
      loss cannot reach 0 (label smoothing, regularizers) and no better bound is known.

    What it refuses, with a message that says why: an optimizer that would call Lightning's closure
    twice in automatic optimization (Step-Tuned SGD with ``same_batch=True``), a probe in manual
    optimization without an ``adaptive_lr_loss`` method (``training_step`` there steps the
    optimizers itself).  Several optimizers are supported in manual optimization (Lightning requires
    it for several optimizers).

    Args:
        qlab: ``True`` or a dict of ``QLAB.wrap`` options: put QLAB on top of the module's own
            optimizers at fit start.
        lb_fraction: if set (in (0, 1]), set MoMo's lower bound at every epoch end from the losses
            observed so far (the rule above).  ``None`` leaves ``lb`` alone.
        restore_buffers: which buffers the probe saves and restores: ``"norm"`` (those of
            BatchNorm/InstanceNorm layers, the default) or ``"all"`` (every buffer, for models with
            other running statistics updated in the forward).
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
        # The current window (micro-batches since the last optimizer step).
        self._loss_sum: Tensor | None = None
        self._batches: list[_MicroBatch] = []
        self._window_closed = True
        self._needs_batches = False
        # Lower-bound rule: per optimizer index, the running epoch sum/count and the best epoch mean.
        self._epoch_sum: dict[int, Tensor | float] = {}
        self._epoch_count: dict[int, int] = {}
        self._best_epoch_loss: dict[int, float] = {}

    # ------------------------------------------------------------------ set-up

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_sum, self._batches, self._window_closed, self._needs_batches = None, [], True, False
        if self.qlab is not False:
            self._wrap_with_qlab(trainer)
        automatic = pl_module.automatic_optimization
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        for optimizer in trainer.optimizers:
            name = type(optimizer).__name__
            if getattr(optimizer, "calls_closure_twice", False):
                if automatic:
                    raise MisconfigurationException(
                        f"{name} is configured to evaluate its closure twice per step (`same_batch=True`), but in "
                        "Lightning's automatic optimization the closure runs `training_step`, the backward pass, "
                        "logging and the hooks; running it twice would log twice, step schedulers and callbacks "
                        "twice and, with gradient accumulation, mix micro-batches. Use `same_batch=False` (the "
                        "paper's default: the second half-step uses the next mini-batch), or manual optimization "
                        "with a closure of your own."
                    )
                if scaler is not None:
                    raise MisconfigurationException(
                        f"{name} with `same_batch=True` needs a closure, and under precision='16-mixed' Lightning "
                        "calls `optimizer.step()` through the GradScaler, which does not support closures. Use "
                        "`same_batch=False`, or bf16-mixed / 32-true precision."
                    )
            if getattr(optimizer, "requires_probe", False):
                if not automatic and not callable(getattr(pl_module, LOSS_HOOK, None)):
                    raise MisconfigurationException(
                        f"{name} evaluates the loss once more per step (a probe). In manual optimization the "
                        "callback cannot re-run `training_step` (it steps the optimizers itself): define "
                        f"`{LOSS_HOOK}(self, batch)` on {type(pl_module).__name__}, returning the batch's loss "
                        "without side effects (optionally with an `optimizer_idx` argument)."
                    )
                self._needs_batches = True
        if trainer.strategy.handles_gradient_accumulation and self._needs_any_loss(trainer):
            warnings.warn(
                f"AdaptiveLRCallback: the strategy {type(trainer.strategy).__name__} accumulates gradients itself; "
                "the loss handed to the optimizer may not match the accumulated gradient.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _needs_any_loss(self, trainer: pl.Trainer) -> bool:
        return any(getattr(o, "requires_loss", False) for o in trainer.optimizers)

    def _wrap_with_qlab(self, trainer: pl.Trainer) -> None:
        """Replace every optimizer by ``QLAB.wrap(optimizer)`` (QLAB-SGD, QLAB-Adam, ...)."""
        from ..optim import QLAB

        options = {} if self.qlab is True else dict(self.qlab)  # type: ignore[arg-type]
        strategy = trainer.strategy
        wrapped = []
        for optimizer in strategy.optimizers:
            if isinstance(optimizer, QLAB) or getattr(optimizer, "requires_probe", False):
                wrapped.append(optimizer)  # already fitting its own step size
                continue
            wrapped.append(QLAB.wrap(optimizer, **options))
        # The setter rebuilds the LightningOptimizer wrappers that `self.optimizers()` returns.  LR
        # schedulers stay bound to the base optimizer: the wrapper shares its `param_groups` list,
        # so what a scheduler writes there is what QLAB reads.
        strategy.optimizers = wrapped
        rank_zero_info(
            "AdaptiveLRCallback: training with "
            + ", ".join(f"QLAB on {type(getattr(o, 'base_optimizer', o)).__name__}" for o in wrapped)
        )

    # ------------------------------------------------------------------ per micro-batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._window_closed:
            self._batches = []
            self._window_closed = False
        if self._needs_batches:
            # The first random draw of the training forward comes after this hook: replaying this
            # state gives the probe the training forward's dropout masks.
            self._batches.append(_MicroBatch(batch, batch_idx, _rng_state(pl_module.device)))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        value = loss.detach()
        if not value.is_floating_point() or value.numel() != 1:
            return
        value = value.reshape(()).to(accumulation_dtype(value.device))
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            # 16-mixed: Lightning hands over `scaler.scale(loss)`; the scale is a power of two, so
            # dividing it out is exact.
            scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else None
            value = value / (scale.reshape(()).to(value) if scale is not None else scaler.get_scale())
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer) -> None:
        optimizer = _raw(optimizer)
        loss_sum, self._loss_sum = self._loss_sum, None
        self._window_closed = True
        index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        if getattr(optimizer, "requires_loss", False) and hasattr(optimizer, "set_loss"):
            average = optimizer.param_groups[0].get("average_across_ranks", True)
            if loss_sum is None:
                if not pl_module.automatic_optimization and getattr(optimizer, "_pending_loss", None) is None:
                    raise RuntimeError(
                        f"AdaptiveLRCallback: {type(optimizer).__name__} needs the loss, but no loss was passed to "
                        "`manual_backward` since the previous optimizer step. In manual optimization call "
                        "`self.manual_backward(loss)` before each `opt.step()`, or pass it: `opt.step(loss=loss)`."
                    )
                if pl_module.automatic_optimization:
                    # training_step returned None for every micro-batch: Lightning skipped the backward.
                    loss_sum = torch.tensor(math.nan, device=pl_module.device, dtype=accumulation_dtype(pl_module.device))
            if loss_sum is not None:
                loss = _average_over_ranks(loss_sum, trainer) if average else loss_sum
                optimizer.set_loss(loss, reduced=True)
                self._track_epoch_loss(index, loss)
        if getattr(optimizer, "requires_probe", False) and hasattr(optimizer, "set_probe"):
            optimizer.set_probe(self._make_probe(trainer, pl_module, optimizer, index), reduced=True)

    # ------------------------------------------------------------------ the probe

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Register the probes once before the first step as well: an optimizer may look for its
        # probe before it runs Lightning's closure (in which `on_before_optimizer_step` runs).
        for index, optimizer in enumerate(trainer.optimizers):
            if getattr(optimizer, "requires_probe", False) and hasattr(optimizer, "set_probe"):
                optimizer.set_probe(self._make_probe(trainer, pl_module, optimizer, index), reduced=True)

    def _make_probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, index: int
    ) -> Callable[[], Tensor]:
        """The probe: the current window's loss at the current parameters, averaged across ranks.

        It reads the window when it is called (inside ``optimizer.step()``, after the window closed
        and before the next batch opens a new one), so one registration serves every step.
        """

        def probe() -> Tensor:
            value = self.evaluate_window(trainer, pl_module, optimizer_idx=index)
            average = optimizer.param_groups[0].get("average_across_ranks", True)
            return _average_over_ranks(value, trainer) if average else value

        return probe

    @torch.no_grad()
    def evaluate_window(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        window: list[_MicroBatch] | None = None,
        *,
        optimizer_idx: int = 0,
    ) -> Tensor:
        """The loss of the current accumulation window at the current parameters, without side effects.

        This is what the probe computes (before the cross-rank average).  Each micro-batch is
        replayed with the random-number state it started with; normalization buffers and the
        random-number state are restored afterwards.  The micro-batch losses are divided like
        Lightning divides them (by ``accumulate_grad_batches`` in automatic optimization, by the
        window's length in manual optimization) and summed.
        """
        window = self._batches if window is None else window
        if not window:
            raise RuntimeError(
                "AdaptiveLRCallback: no batch was cached for the probe (was the callback attached before training started?)"
            )
        device = pl_module.device
        loss_fn = self._loss_function(pl_module, optimizer_idx)
        divisor = trainer.accumulate_grad_batches if pl_module.automatic_optimization else len(window)
        buffers = _stateful_buffers(pl_module, self.restore_buffers)
        saved_buffers = [b.clone() for b in buffers]
        rng_before = _rng_state(device)
        total: Tensor | None = None
        try:
            with trainer.precision_plugin.forward_context(), _muted_logging(pl_module):
                for micro in window:
                    _set_rng_state(micro.rng, device)
                    loss = loss_fn(micro.batch, micro.batch_idx)
                    if loss is None:  # training_step skipped this batch: so did its backward
                        continue
                    loss = loss.detach().reshape(()).to(accumulation_dtype(loss.device))
                    total = loss if total is None else total + loss
        finally:
            for buffer, saved in zip(buffers, saved_buffers):
                buffer.copy_(saved)
            _set_rng_state(rng_before, device)
        if total is None:
            return torch.tensor(math.nan, device=device, dtype=accumulation_dtype(device))
        return total / divisor

    def _loss_function(self, pl_module: pl.LightningModule, optimizer_idx: int) -> Callable[[Any, int], Tensor | None]:
        hook = getattr(pl_module, LOSS_HOOK, None)
        if callable(hook):
            wants_idx = "optimizer_idx" in inspect.signature(hook).parameters

            def from_hook(batch: Any, batch_idx: int) -> Tensor | None:
                return hook(batch, optimizer_idx=optimizer_idx) if wants_idx else hook(batch)

            return from_hook
        step = pl_module.training_step
        try:
            params = list(inspect.signature(step).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes_idx = len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)

        def from_training_step(batch: Any, batch_idx: int) -> Tensor | None:
            output = step(batch, batch_idx) if takes_idx else step(batch)
            return _loss_from_output(output)

        return from_training_step

    # ------------------------------------------------------------------ MoMo's lower bound

    def _track_epoch_loss(self, index: int, loss: Tensor) -> None:
        if self.lb_fraction is None:
            return
        self._epoch_sum[index] = self._epoch_sum.get(index, 0.0) + loss
        self._epoch_count[index] = self._epoch_count.get(index, 0) + 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lb_fraction is None:
            return
        from ..optim import MoMo, MoMoAdam

        for index, optimizer in enumerate(trainer.optimizers):
            count = self._epoch_count.pop(index, 0)
            total = self._epoch_sum.pop(index, 0.0)
            if count == 0:
                continue
            mean = float(total) / count  # one synchronization per epoch
            if not math.isfinite(mean):
                continue
            best = min(mean, self._best_epoch_loss.get(index, math.inf))
            self._best_epoch_loss[index] = best
            if isinstance(optimizer, (MoMo, MoMoAdam)):
                set_lower_bound(optimizer, lower_bound_from_losses(best, self.lb_fraction))

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch_sum": {k: float(v) for k, v in self._epoch_sum.items()},
            "epoch_count": dict(self._epoch_count),
            "best_epoch_loss": dict(self._best_epoch_loss),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._epoch_sum = {int(k): float(v) for k, v in state_dict.get("epoch_sum", {}).items()}
        self._epoch_count = {int(k): int(v) for k, v in state_dict.get("epoch_count", {}).items()}
        self._best_epoch_loss = {int(k): float(v) for k, v in state_dict.get("best_epoch_loss", {}).items()}


def set_lower_bound(optimizer: Optimizer, lb: float) -> None:
    """Set MoMo's / MoMo-Adam's lower bound ``lb`` in place (between two steps).

    It becomes every group's ``lb`` option (the floor of the online estimate when
    ``estimate_lb=True``) and the current bound in ``state["global"]["lb"]`` (raised to at least
    ``lb`` when the bound is estimated online, replaced otherwise).
    """
    for group in optimizer.param_groups:
        group["lb"] = lb
    global_state = optimizer.state.get("global") if isinstance(optimizer.state, Mapping) else None
    if global_state is not None and "lb" in global_state:
        current = global_state["lb"]
        if optimizer.param_groups[0].get("estimate_lb", False):
            global_state["lb"] = torch.clamp(current, min=lb) if isinstance(current, Tensor) else max(float(current), lb)
        else:
            global_state["lb"] = torch.full_like(current, lb) if isinstance(current, Tensor) else lb
