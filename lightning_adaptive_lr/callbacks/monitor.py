"""``AdaptiveLRMonitor``: the step sizes the adaptive methods actually took, in any Lightning logger.

Lightning's ``LearningRateMonitor`` reads ``param_groups[i]["lr"]`` *before* the step: for these
methods that is only a cap or a starting value.  After each step this package's optimizers write the
step size they used to ``param_groups[i]["effective_lr"]`` and their internal quantities (MoMo's
``tau`` and ``lower_bound``, QLAB's fitted rate and curvature, Step-Tuned SGD's gain, the hypergradient
levels' rates, AdaL's gradient scale, ...) to further keys; this monitor logs them.

How often: by default often enough that a short run shows a curve, and never less often than
Lightning logs the training loss: every ``min(log_every_n_steps, total_steps // 100)`` optimizer
steps (at least every step), so a run of up to 100 steps is traced at every step, and a long run
at Lightning's ``log_every_n_steps`` (default 50).  ``logging_interval`` sets it explicitly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from ..optim._reduce import accumulation_dtype, dot
from .qlab_wrapping import optimizer_name

__all__ = ["AdaptiveLRMonitor", "automatic_interval"]

#: A run traced with the automatic interval gets at least this many points per tag (when it has
#: that many optimizer steps), however large ``log_every_n_steps`` is.
MIN_POINTS = 100

#: Param-group keys never logged: the parameters themselves and LR-scheduler bookkeeping (torch's
#: schedulers write ``initial_lr``; ``OneCycleLR`` also ``max_lr``, ``min_lr`` and, with
#: ``CyclicLR``, ``base_momentum`` and ``max_momentum``: constants of the schedule, not the step).
_NEVER = frozenset({"params", "initial_lr", "param_names", "max_lr", "min_lr", "base_momentum", "max_momentum"})
#: Optimizer-wide counters, equal in every param group of this package's optimizers: logged once
#: per optimizer (per group only where the groups differ), although they live among the defaults.
_OPTIMIZER_WIDE = ("skipped_steps",)
#: Largest tensor logged element by element (per-layer rates of a small model, level weights).
_MAX_ELEMENTS = 16


def automatic_interval(log_every_n_steps: int, total_steps: float) -> int:
    """The monitor's default logging interval: ``min(log_every_n_steps, total_steps // MIN_POINTS)``, at least 1.

    ``total_steps`` is the run's number of optimizer steps (``trainer.estimated_stepping_batches``;
    infinite when the run has no end, which leaves ``log_every_n_steps``).

    >>> automatic_interval(50, 75), automatic_interval(10, 460), automatic_interval(50, 100_000)
    (1, 4, 50)
    """
    if not math.isfinite(total_steps):
        return max(1, log_every_n_steps)
    return max(1, min(log_every_n_steps, int(total_steps) // MIN_POINTS))


def _flatten(key: str, value: Any) -> Iterable[tuple[str, float | Tensor]]:
    """``(name, scalar)`` pairs for one recorded value: a number, a small tensor, a sequence or a mapping."""
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, Tensor):
        if value.numel() == 1:
            yield key, value.detach().reshape(())
        elif 0 < value.numel() <= _MAX_ELEMENTS and value.is_floating_point():
            for i, item in enumerate(value.detach().reshape(-1)):
                yield f"{key}/{i}", item
        return
    if isinstance(value, numbers.Real):
        yield key, float(value)
    elif isinstance(value, Mapping):
        for name, item in value.items():
            yield from _flatten(f"{key}/{name}", item)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) <= _MAX_ELEMENTS:
        for i, item in enumerate(value):
            yield from _flatten(f"{key}/{i}", item)


def _as_floats(pairs: list[tuple[str, float | Tensor]]) -> dict[str, float]:
    """Convert to floats, reading all tensors of one device in a single synchronization."""
    out: dict[str, float] = {}
    by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for name, value in pairs:
        if isinstance(value, Tensor):
            by_device.setdefault(value.device, []).append((name, value))
        else:
            out[name] = value
    for device, items in by_device.items():
        dtype = accumulation_dtype(device)
        values = torch.stack([v.to(dtype) for _, v in items]).tolist()
        out.update((name, v) for (name, _), v in zip(items, values))
    return out


def _scheduled(trainer: pl.Trainer) -> set[int]:
    """The indices of the Trainer's optimizers that an LR scheduler drives (directly, or through
    the optimizer QLAB was put on)."""
    targets = {id(getattr(config.scheduler, "optimizer", None)) for config in trainer.lr_scheduler_configs}
    return {
        i
        for i, optimizer in enumerate(trainer.optimizers)
        if id(optimizer) in targets or id(getattr(optimizer, "base_optimizer", None)) in targets
    }


class AdaptiveLRMonitor(Callback):
    """Log the adaptive methods' step sizes and internal quantities after each optimizer step.

    Every few optimizer steps (see below), for every optimizer and param group, it logs to every
    logger of the Trainer (TensorBoard, CSV, W&B, ...), with Lightning's own step counter so the
    curves line up with the training loss:

    * ``adaptive_lr/<Optimizer>/group<i>/effective_lr``: the step size actually used;
    * ``adaptive_lr/<Optimizer>/group<i>/<key>`` for every other numeric value the optimizer records
      in the param group (keys that are not constructor hyperparameters), except aliases of
      ``effective_lr`` (``exclude``: MoMo's ``tau``).  Values may be Python floats, 0-d tensors,
      small tensors, sequences or mappings of those (``rates/0``, ``weights/layer`` ...);
    * ``adaptive_lr/<Optimizer>/group<i>/lr`` for the optimizers an LR scheduler drives (MoMo's cap,
      the base rate of the others, as the scheduler sets it); without a scheduler ``lr`` is the
      constant you configured (or, for QLAB on an SGD base, ``effective_lr`` again; on an Adam
      base the rate the fitted one may not exceed) and is not logged;
    * ``adaptive_lr/<Optimizer>/skipped_steps``: the steps skipped so far because of a non-finite
      loss, gradient or outcome (once per optimizer: every group holds the same count; per group,
      ``.../group<i>/skipped_steps``, if they ever differ).

    ``<Optimizer>`` is the class name (``QLAB.wrap(SGD)`` for QLAB put on an SGD, as the optimizer
    names itself), suffixed by the optimizer's index when a module has several optimizers of one
    class.  Tensors are read in one synchronization per device, and only on the steps that log.

    How often: every ``logging_interval`` optimizer steps.  By default (``None``) every
    ``min(trainer.log_every_n_steps, total_steps // 100)`` steps, at least every step
    (:func:`automatic_interval`): a short run gets a point at every step, a run of more than
    100 × ``log_every_n_steps`` steps one every ``log_every_n_steps`` steps, like the training loss.

    Example::

        trainer = Trainer(callbacks=[AdaptiveLRCallback(), AdaptiveLRMonitor()], max_steps=75)
        # 75 points per adaptive_lr/* tag; AdaptiveLRMonitor(logging_interval=10): 7

    Args:
        logging_interval: log every this many optimizer steps; ``None`` chooses as above.
        prog_bar: also show the first optimizer's first group's ``effective_lr`` in the progress bar
            (as ``eff_lr``; read every step).
        include: hyperparameter keys logged although they are constructor arguments (``("lr",)``
            logs ``lr`` even without a scheduler).
        exclude: recorded keys not logged: by default ``tau``, which MoMo and MoMo-Adam record
            beside ``effective_lr`` with the same value.
        check_desync_every: every this many optimizer steps, all-gather a checksum of the parameters
            (sum and sum of squares, in float64) across data-parallel ranks and warn if the replicas
            differ; ``None`` disables it.  Costs one all-gather when it runs.
        prefix: the first part of every logged name.
    """

    def __init__(
        self,
        logging_interval: int | None = None,
        prog_bar: bool = False,
        include: Sequence[str] = (),
        exclude: Sequence[str] = ("tau",),
        check_desync_every: int | None = None,
        prefix: str = "adaptive_lr",
    ) -> None:
        for name, value in (("logging_interval", logging_interval), ("check_desync_every", check_desync_every)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"AdaptiveLRMonitor: `{name}` must be None or a positive integer, got {value!r}")
        self.logging_interval = logging_interval
        self.prog_bar = prog_bar
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.check_desync_every = check_desync_every
        self.prefix = prefix
        self._step_at_batch_start = 0
        self._interval = logging_interval or 1
        #: Optimizer steps (``trainer.global_step``) at which replicas were found to differ.
        self.desync_steps: list[int] = []

    # ------------------------------------------------------------------ what to log

    def optimizer_names(self, optimizers: Sequence[Optimizer]) -> list[str]:
        """One name per optimizer: its class name, with its index when the name repeats.

        QLAB put on another optimizer is named as it names itself: ``QLAB.wrap(SGD)``.
        """
        classes = [optimizer_name(optimizer) for optimizer in optimizers]
        return [f"{c}_{i}" if classes.count(c) > 1 else c for i, c in enumerate(classes)]

    def collect(self, optimizers: Sequence[Optimizer], scheduled: Collection[int] = ()) -> dict[str, float]:
        """The values to log now, by name (see the class docstring for the names).

        ``scheduled``: the indices of the optimizers an LR scheduler drives (their ``lr`` is logged).
        """
        pairs: list[tuple[str, float | Tensor]] = []
        for index, (name, optimizer) in enumerate(zip(self.optimizer_names(optimizers), optimizers)):
            shown = set(self.include) | ({"lr"} if index in scheduled else set())
            hyperparameters = (set(getattr(optimizer, "defaults", {})) | set(self.exclude)) - shown
            groups = optimizer.param_groups
            per_group: set[str] = set()
            for key in _OPTIMIZER_WIDE:
                values = [group[key] for group in groups if key in group]
                if values and len(values) == len(groups) and all(v == values[0] for v in values):
                    pairs.extend(_flatten(f"{self.prefix}/{name}/{key}", values[0]))
                elif values:
                    per_group.add(key)
            for g, group in enumerate(groups):
                base = f"{self.prefix}/{name}/group{g}"
                for key, value in group.items():
                    skip = key in _NEVER or key in hyperparameters or key in _OPTIMIZER_WIDE
                    if key in per_group or not skip:
                        pairs.extend(_flatten(f"{base}/{key}", value))
        return _as_floats(pairs)

    # ------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._interval = self.logging_interval or automatic_interval(
            trainer.log_every_n_steps, trainer.estimated_stepping_batches
        )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # accumulating: no optimizer step in this batch
        # Lightning logs this batch's metrics at `_batches_that_stepped` (incremented after this hook).
        loop = trainer.fit_loop.epoch_loop
        stepped = getattr(loop, "_batches_that_stepped", trainer.global_step - 1)
        if self.prog_bar and trainer.optimizers:
            value = trainer.optimizers[0].param_groups[0].get("effective_lr")
            if isinstance(value, (Tensor, numbers.Real)) and not isinstance(value, bool):
                pl_module.log("eff_lr", value, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if (stepped + 1) % self._interval == 0:  # a capturable optimizer's warnings, read here
            for optimizer in trainer.optimizers:
                sync = getattr(optimizer, "sync_warnings", None)
                if callable(sync):
                    sync()
        if (stepped + 1) % self._interval == 0 and trainer.loggers:
            metrics = self.collect(trainer.optimizers, _scheduled(trainer))
            if metrics:
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=stepped)
        if self.check_desync_every is not None and trainer.global_step // self.check_desync_every > (
            self._step_at_batch_start // self.check_desync_every
        ):
            self.check_desync(trainer, pl_module)

    # ------------------------------------------------------------------ replicas

    def check_desync(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """All-gather a parameter checksum; warn (and remember the step) if ranks differ.

        Returns ``True`` when the replicas differ.  A no-op returning ``False`` with one process.
        """
        params = [p.detach() for p in pl_module.parameters()]
        if trainer.world_size <= 1 or not params:
            return False
        device = params[0].device
        total = torch.stack([p.sum(dtype=accumulation_dtype(device)).to(device) for p in params]).sum()
        checksum = torch.stack([total, dot(params, params, device)])
        gathered = trainer.strategy.all_gather(checksum).reshape(trainer.world_size, -1).cpu()
        if bool((gathered == gathered[0]).all()):
            return False
        self.desync_steps.append(trainer.global_step)
        spread = (gathered - gathered[0]).abs().max().item()
        rank_zero_warn(
            f"AdaptiveLRMonitor: the data-parallel replicas differ at step {trainer.global_step} (parameter "
            f"checksums per rank {[[float(v) for v in row] for row in gathered]}, largest difference {spread:.3g}). "
            "Something that feeds the optimizer differs between ranks: a loss not averaged across ranks "
            "(`average_across_ranks=False`), rank-dependent code in the step, or non-deterministic kernels.",
            category=RuntimeWarning,
        )
        return True
