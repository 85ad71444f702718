"""LightningModule mixins: change one base class and a module trains with an adaptive method.

::

    class MyModel(MoMoMixin):            # was: class MyModel(LightningModule)
        ...                              # __init__, training_step, ... unchanged

What a mixin does:

* ``configure_optimizers`` builds the method's optimizer from ``self.hparams["adaptive_lr"]``, a
  dict of constructor arguments filled at construction with the documented defaults (the
  optimizer constructor's defaults, then the mixin class's :attr:`~AdaptiveLRMixin.adaptive_lr_hparams`).
  Being in ``hparams``, they are saved in checkpoints and logged with the other hyperparameters
  (tuples as lists, so that the logger's ``hparams.yaml`` loads with ``yaml.safe_load``).
  If the module defines its own ``configure_optimizers`` (an existing module usually does), it is
  replaced: it is still called, to keep its choice of parameters and their grouping, but the
  optimizer and schedulers it returns are discarded (a message says so).  Set
  ``adaptive_lr_replace_configure_optimizers = False`` on the class to keep yours instead.
* ``configure_callbacks`` adds :class:`~lightning_adaptive_lr.AdaptiveLRCallback` (loss, probe,
  cross-rank averaging) and :class:`~lightning_adaptive_lr.AdaptiveLRMonitor` (step-size traces),
  unless the Trainer or the module's own ``configure_callbacks`` already has one; a module's own
  ``configure_callbacks`` is kept and the two callbacks are appended to what it returns.

Overriding the hyperparameters, from most to least specific:

* per instance: ``MyModel(..., adaptive_lr={"lr": 0.5})`` when the module's ``__init__`` forwards
  ``**kwargs`` to ``super().__init__``; with LightningCLI this is ``--model.adaptive_lr '{lr: 0.5}'``;
  or, inside ``__init__`` after ``super().__init__()``: ``self.hparams.adaptive_lr["lr"] = 0.5``;
* per class: ``adaptive_lr_hparams = {"lr": 0.5}`` as a class attribute of the module;
* the callbacks' options: the class attributes ``adaptive_lr_callback_options`` and
  ``adaptive_lr_monitor_options`` (keyword arguments of the two callbacks).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import _configure_optimizers
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from . import optim
from .callbacks import AdaptiveLRCallback, AdaptiveLRMonitor

__all__ = [
    "AdaLMixin",
    "AdaptiveLRMixin",
    "HierarchicalHDMixin",
    "MoMoAdamMixin",
    "MoMoMixin",
    "QLABMixin",
    "StepTunedSGDMixin",
]

#: Constructor arguments that select an implementation or a distributed behaviour, not the method.
_NOT_HYPERPARAMETERS = frozenset({"params", "foreach", "average_across_ranks"})


def optimizer_defaults(cls: type) -> dict[str, Any]:
    """The keyword arguments of ``cls.__init__`` that have defaults (its hyperparameters)."""
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return {}
    return {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in _NOT_HYPERPARAMETERS
        and p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def plain(value: Any) -> Any:
    """``value`` with its tuples made lists (recursively), so that ``hparams.yaml`` stays plain YAML.

    Loggers write ``hparams`` with ``yaml.dump``, which writes a tuple as ``!!python/tuple``: a
    tag that ``yaml.safe_load`` refuses.  The optimizers take lists where they take tuples.

    >>> plain({"betas": (0.9, 0.999), "levels": ("global", "layer"), "lr": 1.0})
    {'betas': [0.9, 0.999], 'levels': ['global', 'layer'], 'lr': 1.0}
    """
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _as_list(callbacks: Any) -> list[Callback]:
    if not callbacks:
        return []
    return list(callbacks) if isinstance(callbacks, Sequence) else [callbacks]


class AdaptiveLRMixin(pl.LightningModule):
    """Base of the per-method mixins (use those: :class:`MoMoMixin`, :class:`QLABMixin`, ...).

    Args:
        adaptive_lr: constructor arguments of the optimizer that override the defaults for this
            instance (see the module docstring for the other ways to override them).
        *args, **kwargs: passed on to :class:`~lightning.pytorch.LightningModule`.
    """

    #: The optimizer's class name in :mod:`lightning_adaptive_lr.optim`; set by each mixin.
    adaptive_lr_optimizer: ClassVar[str] = ""
    #: The ``hparams`` key that holds the optimizer's constructor arguments.
    adaptive_lr_key: ClassVar[str] = "adaptive_lr"
    #: Class-level overrides of the optimizer's constructor defaults.
    adaptive_lr_hparams: ClassVar[dict[str, Any]] = {}
    #: Keyword arguments of the :class:`AdaptiveLRCallback` the mixin adds.
    adaptive_lr_callback_options: ClassVar[dict[str, Any]] = {}
    #: Keyword arguments of the :class:`AdaptiveLRMonitor` the mixin adds.
    adaptive_lr_monitor_options: ClassVar[dict[str, Any]] = {}
    #: Replace a ``configure_optimizers`` that a subclass defines by the mixin's.
    adaptive_lr_replace_configure_optimizers: ClassVar[bool] = True
    #: The ``configure_optimizers`` a subclass defined, when the mixin's replaced it.
    _adaptive_lr_own_configure_optimizers: ClassVar[Callable[[Any], Any] | None] = None

    def __init__(self, *args: Any, adaptive_lr: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hparams[self.adaptive_lr_key] = plain({**self.adaptive_lr_defaults(), **(adaptive_lr or {})})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("configure_optimizers")
        if own is not None and cls.adaptive_lr_replace_configure_optimizers:
            cls._adaptive_lr_own_configure_optimizers = own
            cls.configure_optimizers = AdaptiveLRMixin.configure_optimizers  # type: ignore[method-assign]
        own_callbacks = cls.__dict__.get("configure_callbacks")
        if own_callbacks is not None and not getattr(own_callbacks, "_adaptive_lr_wrapped", False):

            @functools.wraps(own_callbacks)
            def configure_callbacks(self: AdaptiveLRMixin) -> list[Callback]:
                theirs = _as_list(own_callbacks(self))
                return theirs + self.adaptive_lr_callbacks(theirs)

            configure_callbacks._adaptive_lr_wrapped = True  # type: ignore[attr-defined]
            cls.configure_callbacks = configure_callbacks  # type: ignore[method-assign]

    # ------------------------------------------------------------------ the optimizer

    @classmethod
    def adaptive_lr_optimizer_class(cls) -> type[Optimizer]:
        """The optimizer class this mixin trains with."""
        if not cls.adaptive_lr_optimizer:
            raise TypeError(f"{cls.__name__}: use one of the per-method mixins (MoMoMixin, QLABMixin, ...)")
        return getattr(optim, cls.adaptive_lr_optimizer)

    @classmethod
    def adaptive_lr_defaults(cls) -> dict[str, Any]:
        """The documented defaults: the optimizer constructor's, updated by ``adaptive_lr_hparams``."""
        return {**optimizer_defaults(cls.adaptive_lr_optimizer_class()), **cls.adaptive_lr_hparams}

    def adaptive_lr_options(self) -> dict[str, Any]:
        """The constructor arguments the optimizer is built with (defaults updated by ``hparams``)."""
        return {**self.adaptive_lr_defaults(), **dict(self.hparams.get(self.adaptive_lr_key) or {})}

    def adaptive_lr_parameters(self) -> list[Any]:
        """The parameters (or param groups) to optimize.

        The parameters of the param groups of the optimizer that the module's own
        ``configure_optimizers`` returns, if it has one (their grouping kept, their options dropped:
        the hyperparameters come from ``hparams``); otherwise every parameter that requires a gradient.
        """
        own = type(self)._adaptive_lr_own_configure_optimizers
        if own is None:
            return [p for p in self.parameters() if p.requires_grad]
        optimizers, _, _ = _configure_optimizers(own(self))
        if len(optimizers) != 1:
            raise RuntimeError(
                f"{type(self).__name__}: `configure_optimizers` returns {len(optimizers)} optimizers; "
                f"{self.adaptive_lr_optimizer}Mixin replaces exactly one. Set "
                "`adaptive_lr_replace_configure_optimizers = False` on the class and build the optimizers "
                "yourself (adding `AdaptiveLRCallback` to the Trainer)."
            )
        rank_zero_info(
            f"{type(self).__name__}: training with {self.adaptive_lr_optimizer} from hparams[{self.adaptive_lr_key!r}]; "
            f"the {type(optimizers[0]).__name__} (and any LR scheduler) returned by the module's own "
            "`configure_optimizers` is replaced, its parameter groups are kept."
        )
        return [{"params": list(group["params"])} for group in optimizers[0].param_groups]

    @override
    def configure_optimizers(self) -> Any:
        """The method's optimizer over :meth:`adaptive_lr_parameters`, from ``hparams``."""
        return self.adaptive_lr_optimizer_class()(self.adaptive_lr_parameters(), **self.adaptive_lr_options())

    # ------------------------------------------------------------------ the callbacks

    def adaptive_lr_callbacks(self, existing: Sequence[Callback] = ()) -> list[Callback]:
        """An :class:`AdaptiveLRCallback` and an :class:`AdaptiveLRMonitor`, unless already present.

        Present means: in ``existing`` or among the Trainer's callbacks, so that one configured by the
        user (with other options) is the one that runs.
        """
        trainer = self._trainer  # None until the module is attached to a Trainer
        present = list(existing) + (list(trainer.callbacks) if trainer is not None else [])
        added: list[Callback] = []
        if not any(isinstance(c, AdaptiveLRCallback) for c in present):
            added.append(AdaptiveLRCallback(**self.adaptive_lr_callback_options))
        if not any(isinstance(c, AdaptiveLRMonitor) for c in present):
            added.append(AdaptiveLRMonitor(**self.adaptive_lr_monitor_options))
        return added

    @override
    def configure_callbacks(self) -> list[Callback]:
        """Adds :class:`AdaptiveLRCallback` and :class:`AdaptiveLRMonitor` (see :meth:`adaptive_lr_callbacks`)."""
        return self.adaptive_lr_callbacks()

    configure_callbacks._adaptive_lr_wrapped = True  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ checkpoints

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the optimizer hyperparameters saved in the checkpoint's ``hparams``.

        ``load_from_checkpoint`` passes to ``__init__`` only the hyperparameters it declares, so the
        ``adaptive_lr`` entry is put back here.
        """
        super().on_load_checkpoint(checkpoint)
        saved = (checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY) or {}).get(self.adaptive_lr_key)
        if isinstance(saved, dict):
            self.hparams[self.adaptive_lr_key] = dict(saved)


class MoMoMixin(AdaptiveLRMixin):
    """Train with :class:`~lightning_adaptive_lr.MoMo` (Schaipp et al., ICML 2024).

    Defaults: those of ``MoMo`` (``lr=1.0, beta=0.9, weight_decay=0.0, lb=0.0,
    bias_correction=False, estimate_lb=False``), stored in ``hparams["adaptive_lr"]``.
    """

    adaptive_lr_optimizer = "MoMo"


class MoMoAdamMixin(AdaptiveLRMixin):
    """Train with :class:`~lightning_adaptive_lr.MoMoAdam` (Schaipp et al., ICML 2024).

    Defaults: those of ``MoMoAdam`` (``lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
    lb=0.0, estimate_lb=False, decoupled_weight_decay=False``), stored in ``hparams["adaptive_lr"]``.
    """

    adaptive_lr_optimizer = "MoMoAdam"


class QLABMixin(AdaptiveLRMixin):
    """Train with :class:`~lightning_adaptive_lr.QLAB` (Fu and Wu, AAAI 2024).

    Defaults: those of ``QLAB`` (``base="sgd", lr=0.1, momentum=0.9, ...``), stored in
    ``hparams["adaptive_lr"]``.  The probe (one extra loss evaluation per step) goes through
    ``training_step`` with logging muted; define ``adaptive_lr_loss(self, batch)`` to give it a loss
    without side effects (e.g. when ``training_step`` updates metrics).
    """

    adaptive_lr_optimizer = "QLAB"


class HierarchicalHDMixin(AdaptiveLRMixin):
    """Train with :class:`~lightning_adaptive_lr.HierarchicalHD` (Jie et al.; Baydin et al., ICLR 2018).

    Defaults: those of ``HierarchicalHD`` (``base="sgd", lr=1e-3, levels=("global", "layer"), ...``),
    stored in ``hparams["adaptive_lr"]``.
    """

    adaptive_lr_optimizer = "HierarchicalHD"


class AdaLMixin(AdaptiveLRMixin):
    """Train with :class:`~lightning_adaptive_lr.AdaL` (Zhang et al., 2021).

    Defaults: those of ``AdaL`` (``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, transform="l1", ...``),
    stored in ``hparams["adaptive_lr"]``.
    """

    adaptive_lr_optimizer = "AdaL"


class StepTunedSGDMixin(AdaptiveLRMixin):
    """Train with :class:`~lightning_adaptive_lr.StepTunedSGD` (Castera et al., 2022).

    Defaults: those of ``StepTunedSGD`` (``nu=2.0, beta=0.9, gain_bounds=(0.5, 2.0), delta=0.001,
    same_batch=False``), stored in ``hparams["adaptive_lr"]``.  ``same_batch=True`` is refused under
    automatic optimization (it would run Lightning's closure twice).
    """

    adaptive_lr_optimizer = "StepTunedSGD"
