"""The base every optimizer of this package shares.

What lives here, once, so that each method's module holds only its own update:

* **Loss intake.** ``step(closure=None, *, loss=None)`` takes the step's loss from, in order, the
  ``loss=`` argument, a loss handed over with :meth:`AdaptiveOptimizer.set_loss` (what
  :class:`~lightning_adaptive_lr.AdaptiveLRCallback` does), or the closure's return value.  The
  closure, when given, is called exactly once.
* **The gate.** Each step reads the few scalars that decide whether it may proceed (the loss and
  a gradient reduction) in one device-to-host synchronization, and gets them back by name.  If
  any is non-finite the step is skipped: parameters and state are left untouched, a warning is
  issued, and ``param_groups[i]["skipped_steps"]`` counts it.
* **Data parallelism.** Under an initialized ``torch.distributed`` process group the loss is
  averaged across ranks (one collective per step) so that replicas take identical steps in a
  plain PyTorch DDP loop too; ``average_across_ranks=False`` turns this off.
* **State.** Per-parameter tensors live in ``self.state[p]``.  Scalars shared by the whole model
  (step counts, loss averages, ...) are declared in :attr:`AdaptiveOptimizer.group_state` and kept,
  equal, in every param group, so that ``optimizer.state`` is keyed by parameters only: what
  ``torch.distributed.checkpoint`` (Lightning's sharded checkpoints) requires.
  ``state_dict()``/``load_state_dict()`` resume bit for bit; state dicts of release 0.1, which kept
  those scalars in ``state["global"]``, are converted when loaded.
* **The contract with training loops** (:class:`~lightning_adaptive_lr.optim.AdaptiveLROptimizer`):
  ``requires_loss``, ``requires_probe``, ``calls_closure_twice``, ``set_loss``, ``set_probe``.
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

from ._protocol import Probe
from ._reduce import accumulation_dtype
from ._scalars import Scalar

__all__ = [
    "LEGACY_GLOBAL",
    "AdaptiveOptimizer",
    "LossClosure",
    "Probe",
    "BETAS",
    "FINITE",
    "FLAG",
    "FRACTION",
    "NONNEGATIVE",
    "POSITIVE",
    "Rule",
    "check_betas",
    "check_choice",
    "check_flag",
    "check_range",
    "checked",
    "number",
    "one_of",
]

LossClosure = Callable[[], Any]

#: Key of ``optimizer.state`` under which release 0.1 kept the optimizer-wide scalars (converted
#: to the param groups by :meth:`AdaptiveOptimizer.load_state_dict`).
LEGACY_GLOBAL = "global"

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


#: Checks one constructor argument, ``rule(owner, name, value)``, and returns it normalized.
Rule = Callable[[str, str, Any], Any]


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> Rule:
    """A :data:`Rule` for a finite number in a range (see :func:`check_range`)."""

    def rule(owner: str, name: str, value: Any) -> Any:
        check_range(owner, name, value, low, high, low_open=low_open, high_open=high_open)
        return value

    return rule


def one_of(*choices: str) -> Rule:
    """A :data:`Rule` for one of ``choices``."""

    def rule(owner: str, name: str, value: Any) -> Any:
        check_choice(owner, name, value, choices)
        return value

    return rule


def _flag(owner: str, name: str, value: Any) -> bool:
    check_flag(owner, name, value)
    return value


def _betas(owner: str, name: str, value: Any) -> tuple[float, float]:
    check_betas(owner, value)
    return (value[0], value[1])


NONNEGATIVE, POSITIVE, FINITE = number(0.0), number(0.0, low_open=True), number()
#: A decay or momentum coefficient: [0, 1).
FRACTION = number(0.0, 1.0, high_open=True)
FLAG: Rule = _flag
BETAS: Rule = _betas


def checked(owner: str, values: dict[str, Any], **rules: Rule) -> dict[str, Any]:
    """``{name: rule(values[name])}`` for every rule, in order: a constructor's validated defaults.

    >>> checked("Opt", {"lr": 0.1, "betas": [0.9, 0.99]}, lr=POSITIVE, betas=BETAS)
    {'lr': 0.1, 'betas': (0.9, 0.99)}
    """
    return {name: rule(owner, name, values[name]) for name, rule in rules.items()}


class AdaptiveOptimizer(Optimizer):
    """Base class: loss and probe intake, the finiteness gate, cross-rank averaging, shared state.

    Subclasses implement :meth:`_update`, which receives the resolved loss (or ``None``), declare in
    :attr:`shared_options` the hyperparameters that must be equal in every param group (those that
    feed scalars computed over the whole model), and in :attr:`group_state` the optimizer-wide
    state they keep in the param groups, with its initial values.
    """

    #: Whether a step needs the loss value (MoMo, QLAB do; gradient-only methods do not).
    requires_loss: ClassVar[bool] = True
    #: Whether a step needs a probe (a loss-only re-evaluation at a trial point: QLAB).
    requires_probe: ClassVar[bool] = False
    #: Hyperparameters that every param group must share.
    shared_options: ClassVar[tuple[str, ...]] = ()
    #: Optimizer-wide state, kept equal in every param group: key → initial value.  Subclasses
    #: extend it (``{**AdaptiveOptimizer.group_state, "loss_avg": 0.0}``).
    group_state: ClassVar[dict[str, Any]] = {"step": 0, "skipped_steps": 0}
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
        super().__init__(params, {**copy.deepcopy(self.group_state), **defaults})

    # ------------------------------------------------------------------ bookkeeping

    def _init_transient(self) -> None:
        """Attributes that are not state: lost on pickling, rebuilt here."""
        self._pending_loss: tuple[Tensor | float, bool] | None = None
        self._registered_probe: tuple[Probe, bool] | None = None
        self._warned_nonfinite = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_registered_probe"] = None  # a function: not state (register it again after loading)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_pending_loss"):
            self._init_transient()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:  # a group added later joins the optimizer-wide state where it stands
            for key in self.group_state:
                param_group.setdefault(key, copy.deepcopy(self.param_groups[0][key]))
        super().add_param_group(param_group)
        first = self.param_groups[0]
        for name in self.shared_options:
            if self.param_groups[-1][name] != first[name]:
                raise ValueError(
                    f"{self._name}: `{name}` is shared by all param groups (it enters scalars "
                    f"computed over the whole model); got {first[name]!r} and {self.param_groups[-1][name]!r}"
                )

    def _shared(self, key: str) -> Any:
        """One value of the optimizer-wide state (see :attr:`group_state`)."""
        return self.param_groups[0][key]

    def _set_shared(self, **values: Any) -> None:
        """Write optimizer-wide state into every param group (they hold it equally)."""
        for group in self.param_groups:
            group.update(values)

    @property
    def _name(self) -> str:
        """How messages name this optimizer (``QLAB.wrap(SGD)`` for a wrapper)."""
        return type(self).__name__

    @property
    def average_across_ranks(self) -> bool:
        """Whether losses handed over unreduced are averaged across ``torch.distributed`` ranks."""
        return bool(self.param_groups[0]["average_across_ranks"])

    @property
    def calls_closure_twice(self) -> bool:
        """Whether ``step(closure)`` evaluates the closure twice (only Step-Tuned SGD's ``same_batch=True``)."""
        return False

    # ------------------------------------------------------------------ state dicts

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, also one saved by release 0.1 (``state["global"]``)."""
        super().load_state_dict(self._convert_legacy(state_dict))

    def _convert_legacy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Release 0.1 kept the optimizer-wide scalars in ``state["global"]``: move them to the groups.

        Its groups lack the :attr:`group_state` keys (also when it was saved before any step, with no
        ``state["global"]``): they start at their initial values.
        """
        state = state_dict.get("state", {})
        legacy = state.get(LEGACY_GLOBAL)
        shared = self._legacy_group_state(dict(legacy)) if legacy is not None else {}
        groups = [{**copy.deepcopy(self.group_state), **group, **copy.deepcopy(shared)} for group in state_dict["param_groups"]]
        return {**state_dict, "state": {k: v for k, v in state.items() if k != LEGACY_GLOBAL}, "param_groups": groups}

    def _legacy_group_state(self, legacy: dict[str, Any]) -> dict[str, Any]:
        """The group-state values for a release-0.1 ``state["global"]`` (subclasses rename keys)."""
        return {**copy.deepcopy(self.group_state), **legacy}

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ loss and probe intake

    def set_loss(self, loss: Tensor | float, *, reduced: bool = False) -> None:
        """Hand over the loss for the next :meth:`step` (what ``AdaptiveLRCallback`` does).

        Args:
            loss: the mini-batch loss whose gradient is in ``.grad``: unscaled, averaged over
                accumulated micro-batches.
            reduced: ``True`` if it is already averaged across data-parallel ranks.
        """
        value = loss.detach() if isinstance(loss, Tensor) else float(loss)
        self._pending_loss = (value, reduced)

    @property
    def has_pending_loss(self) -> bool:
        """Whether a loss handed over with :meth:`set_loss` waits for the next step."""
        return self._pending_loss is not None

    def set_probe(self, probe: Probe | None, *, reduced: bool = False) -> None:
        """Register the probe used by every later :meth:`step` that is not given ``probe=``.

        Only optimizers with ``requires_probe`` (QLAB) call it; for the others it is kept unused.

        Args:
            probe: returns the loss of the mini-batch whose gradient is in ``.grad``, evaluated
                at the current parameters without backward (called under ``torch.no_grad()``).
                ``None`` unregisters it.
            reduced: ``True`` if the value it returns is already averaged across data-parallel
                ranks (otherwise the optimizer averages it, like the loss).
        """
        if probe is not None and not callable(probe):
            raise TypeError(f"{self._name}.set_probe: `probe` must be callable, got {probe!r}")
        self._registered_probe = None if probe is None else (probe, reduced)

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
                    f"{self._name}: the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}"
                )
            value = loss.detach().reshape(()).to(device=device, dtype=accumulation_dtype(device))
        else:
            value = torch.tensor(float(loss), device=device, dtype=accumulation_dtype(device))
        if not reduced:
            value = self._average_across_ranks(value)
        return value

    def _average_across_ranks(self, value: Tensor) -> Tensor:
        if not self.average_across_ranks:
            return value
        if not (dist.is_available() and dist.is_initialized()):
            return value
        world = dist.get_world_size()
        if world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / world

    def _is_state_initialization(self) -> bool:
        """Whether this step is ``torch.distributed.checkpoint``'s state initialization.

        To lay out the state it loads into, ``get/set_optimizer_state_dict`` step an optimizer that
        has no state yet once, with zero gradients and every ``lr`` set to 0, and no loss.  Such a
        step creates the state (at its starting values) without moving the parameters.
        """
        if self.state or any(group["lr"] != 0 for group in self.param_groups):
            return False
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return bool(grads) and all(not bool(g.any()) for g in grads)

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
            if not self._is_state_initialization():
                raise RuntimeError(f"{self._name}.step() needs the mini-batch loss: {_LOSS_FIXES}.")
            value, reduced = 0.0, True
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
                    f"{self._name} does not support sparse gradients; use dense gradients "
                    "(e.g. `nn.Embedding(..., sparse=False)`)."
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _gate(self, **scalars: Tensor) -> dict[str, Any] | None:
        """The step's one device-to-host synchronization, by name.

        Reads the tensors that decide whether the step happens (0-d or 1-d, any float dtype and
        device) and returns them by name: a 0-d tensor as a float, a 1-d one as a list of floats.
        Returns ``None`` (after recording the skip) if any value is not finite.
        """
        names = list(scalars)
        first = next(iter(scalars.values()))
        dtype = accumulation_dtype(first.device)
        flat = [scalars[n].to(device=first.device, dtype=dtype).reshape(-1) for n in names]
        values = torch.cat(flat).tolist() if flat else []
        if not all(math.isfinite(v) for v in values):
            self._skip_step()
            return None
        out: dict[str, Any] = {}
        offset = 0
        for name, piece in zip(names, flat):
            n = piece.numel()
            out[name] = values[offset] if scalars[name].dim() == 0 else values[offset : offset + n]
            offset += n
        return out

    def _skip_step(self) -> None:
        self._set_shared(skipped_steps=self._shared("skipped_steps") + 1)
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{self._name}: non-finite loss or gradient; the step was skipped (parameters and "
                "state unchanged). Further skips are counted in optimizer.param_groups[i]['skipped_steps'] "
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
