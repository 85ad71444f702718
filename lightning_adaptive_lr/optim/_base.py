"""The base every optimizer of this package shares.

What lives here, once, so that each method's module holds only its own update:

* **Loss intake.** ``step(closure=None, *, loss=None)`` takes the step's loss from, in order, the
  ``loss=`` argument, a loss handed over with :meth:`AdaptiveOptimizer.set_loss` (what
  :class:`~lightning_adaptive_lr.AdaptiveLRCallback` does), or the closure's return value.  The
  closure, when given, is called exactly once.
* **The gate.** Each step reads the few scalars that decide whether it may proceed (the loss and
  a gradient reduction) in one device-to-host synchronization.  If any is non-finite the step is
  skipped: parameters and state are left untouched, a warning is issued once, and
  ``state["global"]["skipped_steps"]`` counts it.
* **Data parallelism.** Under an initialized ``torch.distributed`` process group the loss is
  averaged across ranks (one collective per step) so that replicas take identical steps in a
  plain PyTorch DDP loop too; ``average_across_ranks=False`` turns this off.
* **State.** Per-parameter tensors live in ``self.state[p]``; scalars shared by the whole model
  live in ``self.state["global"]``, so ``state_dict()``/``load_state_dict()`` resume bit for bit.
* **Recording.** After each step the step size used is written to
  ``param_groups[i]["effective_lr"]``, beside each method's documented internal quantities.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from ._scalars import Scalar
from ._tensorlists import accumulation_dtype

__all__ = ["GLOBAL", "AdaptiveOptimizer", "LossClosure", "check_betas", "check_choice", "check_flag", "check_range"]

LossClosure = Callable[[], Any]

#: Key of ``optimizer.state`` that holds the scalars that belong to no single parameter.
GLOBAL = "global"

_LOSS_FIXES = (
    "pass it as `optimizer.step(loss=loss)` (or return it from the closure), or, in Lightning, "
    "add `lightning_adaptive_lr.AdaptiveLRCallback()` to the Trainer's callbacks"
)


def check_range(
    owner: str,
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming the argument and the range when ``value`` lies outside it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{owner}: `{name}` must be a finite number in {left}{lo}, {hi}{right}, got {value!r}")


def check_flag(owner: str, name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: `{name}` must be True or False, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming the allowed values unless ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: `{name}` must be one of {allowed}, got {value!r}")


def check_betas(owner: str, betas: Any) -> None:
    """Raise ``ValueError`` unless ``betas`` is a pair of numbers in [0, 1) (Adam's moment decays)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{owner}: `betas` must be a pair (beta1, beta2), got {betas!r}")
    check_range(owner, "betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_range(owner, "betas[1]", betas[1], 0.0, 1.0, high_open=True)


class AdaptiveOptimizer(Optimizer):
    """Base class: loss intake, the finiteness gate, cross-rank averaging, global state.

    Subclasses implement :meth:`_update`, which receives the resolved loss (or ``None``), and
    declare in :attr:`shared_options` the hyperparameters that must be equal in every param group
    (those that feed scalars computed over the whole model).
    """

    #: Whether a step needs the loss value (MoMo, QLAB do; gradient-only methods do not).
    requires_loss: ClassVar[bool] = True
    #: Hyperparameters that every param group must share.
    shared_options: ClassVar[tuple[str, ...]] = ()
    #: Convert post-gate scalars to Python floats when the parameters live on the CPU, where
    #: reading a tensor costs nothing. Tests switch it off to exercise the on-device path.
    host_scalars_on_cpu: ClassVar[bool] = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
    ) -> None:
        check_flag(type(self).__name__, "foreach", foreach)
        check_flag(type(self).__name__, "average_across_ranks", average_across_ranks)
        defaults = dict(defaults, foreach=foreach, average_across_ranks=average_across_ranks)
        self._init_transient()
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ bookkeeping

    def _init_transient(self) -> None:
        """Attributes that are not state: lost on pickling, rebuilt here."""
        self._pending_loss: tuple[Tensor | float, bool] | None = None
        self._warned_nonfinite = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_pending_loss"):
            self._init_transient()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        first = self.param_groups[0]
        for name in self.shared_options:
            if self.param_groups[-1][name] != first[name]:
                raise ValueError(
                    f"{type(self).__name__}: `{name}` is shared by all param groups (it enters scalars "
                    f"computed over the whole model); got {first[name]!r} and {self.param_groups[-1][name]!r}"
                )

    @property
    def global_state(self) -> dict[str, Any]:
        """Scalars shared by all parameters (step count, loss averages, ...), in ``state["global"]``."""
        if GLOBAL not in self.state:
            self.state[GLOBAL] = {"step": 0, "skipped_steps": 0}
        return self.state[GLOBAL]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch copies state that belongs to no parameter by reference: give it its own copy,
        # with its tensors on the parameters' device.
        if GLOBAL in self.state:
            device = self._device()
            self.state[GLOBAL] = {
                k: v.detach().clone().to(device) if isinstance(v, Tensor) else copy.deepcopy(v)
                for k, v in self.state[GLOBAL].items()
            }

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ loss intake

    def set_loss(self, loss: Tensor | float, *, reduced: bool = False) -> None:
        """Hand over the loss for the next :meth:`step` (what ``AdaptiveLRCallback`` does).

        Args:
            loss: the mini-batch loss whose gradient is in ``.grad``: unscaled, averaged over
                accumulated micro-batches.
            reduced: ``True`` if it is already averaged across data-parallel ranks.
        """
        value = loss.detach() if isinstance(loss, Tensor) else float(loss)
        self._pending_loss = (value, reduced)

    def _resolve_loss(self, loss: Tensor | float | None, closure_loss: Any) -> tuple[Tensor | float | None, bool]:
        pending, self._pending_loss = self._pending_loss, None
        if loss is not None:
            return loss, False
        if pending is not None:
            return pending
        if closure_loss is not None:
            return closure_loss, False
        return None, False

    def _loss_tensor(self, loss: Tensor | float, reduced: bool, device: torch.device) -> Tensor:
        """The loss as a detached 0-d tensor on ``device``, averaged across ranks unless ``reduced``."""
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"{type(self).__name__}: the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}"
                )
            value = loss.detach().reshape(()).to(device=device, dtype=accumulation_dtype(device))
        else:
            value = torch.tensor(float(loss), device=device, dtype=accumulation_dtype(device))
        if not reduced:
            value = self._average_across_ranks(value)
        return value

    def _average_across_ranks(self, value: Tensor) -> Tensor:
        if not self.param_groups[0]["average_across_ranks"]:
            return value
        if not (dist.is_available() and dist.is_initialized()):
            return value
        world = dist.get_world_size()
        if world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / world

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: LossClosure | None = None, *, loss: Tensor | float | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step.

        Args:
            closure: optional; re-evaluates the model, calls ``backward()`` and returns the loss.
                Called exactly once.
            loss: the loss of the mini-batch whose gradient is in ``.grad`` (takes precedence over
                a loss handed over with :meth:`set_loss` and over the closure's return value).

        Returns:
            The closure's return value if a closure was given, else ``loss``.
        """
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        value, reduced = self._resolve_loss(loss, closure_loss)
        if value is None and self.requires_loss:
            raise RuntimeError(f"{type(self).__name__}.step() needs the mini-batch loss: {_LOSS_FIXES}.")
        device = self._device()
        loss_tensor = None if value is None else self._loss_tensor(value, reduced, device)
        self._update(loss_tensor)
        return closure_loss if closure is not None else loss

    def _update(self, loss: Tensor | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses

    def _params_and_grads(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have a gradient, and their gradients."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; use dense gradients "
                    "(e.g. `nn.Embedding(..., sparse=False)`)."
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _gate(self, *scalars: Tensor) -> list[float] | None:
        """The step's one device-to-host synchronization.

        Reads the scalars that decide whether the step happens.  Returns them as floats, or
        ``None`` (after recording the skip) if any is not finite.
        """
        device = scalars[0].device
        values = torch.stack([s.to(device=device, dtype=scalars[0].dtype).reshape(()) for s in scalars]).tolist()
        if all(math.isfinite(v) for v in values):
            return values
        self._skip_step()
        return None

    def _skip_step(self) -> None:
        self.global_state["skipped_steps"] += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: non-finite loss or gradient; the step was skipped (parameters and "
                "state unchanged). Further skips are counted in optimizer.state['global']['skipped_steps'] "
                "without a warning.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _to_host_if_free(self, *values: Tensor) -> tuple[Scalar, ...]:
        """Python floats on the CPU (free there); the 0-d tensors themselves on accelerators."""
        if self.host_scalars_on_cpu and values and values[0].device.type == "cpu":
            return tuple(float(v) for v in values)
        return values

    @staticmethod
    def _record(group: dict[str, Any], **values: Scalar) -> None:
        """Write the quantities of the step just taken into the param group (monitors read them)."""
        for key, value in values.items():
            group[key] = value.detach() if isinstance(value, Tensor) else value
