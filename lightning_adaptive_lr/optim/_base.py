"""The base every optimizer of this package shares.

What lives here, once, so that each method's module holds only its own update:

* **Loss intake.** ``step(closure=None, *, loss=None)`` takes the step's loss from, in order, the
  ``loss=`` argument, a loss handed over with :meth:`AdaptiveOptimizer.set_loss` (what
  :class:`~lightning_adaptive_lr.AdaptiveLRCallback` does), or the closure's return value.  The
  closure, when given, is called exactly once.
* **The gate.** Each step reads the few scalars that decide whether it may proceed (the loss and
  a gradient reduction) in one device-to-host synchronization, and gets them back by name.  If
  any is non-finite the step is skipped: parameters and state are left untouched and
  ``param_groups[i]["skipped_steps"]`` counts it.  Skipping is never quiet: a warning at the 1st,
  10th, 100th, ... skip says how many and why (the loss, a gradient, or the step's outcome), and
  after ``max_consecutive_skips`` skips in a row (default
  :data:`DEFAULT_MAX_CONSECUTIVE_SKIPS`) ``step()`` raises a ``RuntimeError`` with a diagnosis.
* **Inputs.** Hyperparameters may be numbers of any numeric type (Python, numpy, 0-d tensors: stored
  as floats; bools refused); a loss that is not a real number or a one-element real tensor is
  refused naming ``loss``.  Complex parameters are optimized as their real pairs
  (``torch.view_as_real``), as ``torch.optim`` does: :meth:`AdaptiveOptimizer._params_and_grads`
  hands out real views, and the state is that of the real pairs, keyed by the parameters.
* **Data parallelism.** Under an initialized ``torch.distributed`` process group the loss is
  averaged across ranks (one collective per step) so that replicas take identical steps in a
  plain PyTorch DDP loop too; ``average_across_ranks=False`` turns this off.
* **State.** Per-parameter tensors live in ``self.state[p]``.  Scalars shared by the whole model
  (step counts, loss averages, ...) are declared in :attr:`AdaptiveOptimizer.group_state` and kept,
  equal, in every param group, so that ``optimizer.state`` is keyed by parameters only: what
  ``torch.distributed.checkpoint`` (Lightning's sharded checkpoints) requires.
  ``state_dict()``/``load_state_dict()`` resume bit for bit; state dicts of release 0.1, which kept
  those scalars in ``state["global"]``, are converted when loaded.  Every group records the class
  that saved it (``param_groups[i]["optimizer"]``): a state dict of another optimizer is refused at
  load time, naming both (for older state dicts, without that entry, by their options).
* **The contract with training loops** (:class:`~lightning_adaptive_lr.optim.AdaptiveLROptimizer`):
  ``requires_loss``, ``requires_probe``, ``calls_closure_twice``, ``set_loss``, ``set_probe``.
* **Recording.** After each step the step size used is written to
  ``param_groups[i]["effective_lr"]``, beside each method's documented internal quantities.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from . import _sharding
from ._protocol import Probe
from ._reduce import accumulation_dtype
from ._scalars import Scalar

__all__ = [
    "BETAS",
    "CLASS_KEY",
    "DEFAULT_MAX_CONSECUTIVE_SKIPS",
    "FINITE",
    "FLAG",
    "FRACTION",
    "LEGACY_GLOBAL",
    "NONNEGATIVE",
    "POSITIVE",
    "AdaptiveOptimizer",
    "LossClosure",
    "Probe",
    "Rule",
    "check_betas",
    "check_choice",
    "check_flag",
    "check_range",
    "checked",
    "number",
    "one_of",
    "real_number",
]

LossClosure = Callable[[], Any]

#: Key of ``optimizer.state`` under which release 0.1 kept the optimizer-wide scalars (converted
#: to the param groups by :meth:`AdaptiveOptimizer.load_state_dict`).
LEGACY_GLOBAL = "global"

#: Param-group entry that names the optimizer that saved the state (``"MoMo"``, ``"QLAB.wrap(SGD)"``):
#: :meth:`AdaptiveOptimizer.load_state_dict` refuses a state dict of another class.
CLASS_KEY = "optimizer"

#: Default of ``max_consecutive_skips``: a run whose last 100 steps were all skipped does not
#: recover by itself (its parameters or its data produce non-finite values every time), while the
#: skips of a run that recovers come alone or in short bursts (a bad batch, a loss spike).  100
#: steps are a negligible part of any run worth stopping, and a few seconds of a typical one.
DEFAULT_MAX_CONSECUTIVE_SKIPS = 100

#: Options of the base added after release 0.1 (the subclasses' options added since are found by
#: their constructors' signatures): a state dict saved without them takes this optimizer's values.
_LATE_OPTIONS = ("max_consecutive_skips",)

#: What a skipped step's cause means, and what to do about it (the warnings and the error say it).
_CAUSES = {
    "loss": (
        "loss",
        (
            "The loss itself is NaN or infinite: check the data and the loss function (a log of 0, a "
            "division by 0, an empty batch, labels out of range) and the model's outputs; if they grew "
            "without bound, lower `lr` or clip gradients; in 16-bit precision, use bf16 or float32 where "
            "the loss overflows."
        ),
    ),
    "gradient": (
        "gradient",
        (
            "A gradient (or a reduction over gradients and parameters) is NaN or infinite while the loss "
            "is finite: the backward pass overflowed, or the parameters already hold NaN/inf. Lower `lr`, "
            "clip gradients (Trainer(gradient_clip_val=...) or torch.nn.utils.clip_grad_norm_), and check "
            "the precision (float16 overflows above 65504: use bf16-mixed, or 16-mixed with its loss scaler)."
        ),
    ),
    "outcome": (
        "step outcome",
        (
            "The loss and the gradients are finite but the step would have written NaN or infinite values "
            "(a step size or gradient too large for the parameters' dtype). Lower `lr`, clip gradients, "
            "and check the precision (keep 16-bit parameters' optimizer in float32: 16-mixed)."
        ),
    ),
    "step": (  # skips a capturable optimizer counted before it was loaded: which value is not known
        "loss, gradient or step outcome",
        (
            "Check the data and the loss, lower `lr`, clip gradients, and check the precision (bf16-mixed, "
            "or 16-mixed with its loss scaler)."
        ),
    ),
}

_LOSS_FIXES = (
    "pass it as `optimizer.step(loss=loss)` (or return it from the closure), or, in Lightning, "
    "add `lightning_adaptive_lr.AdaptiveLRCallback()` to the Trainer's callbacks"
)


def real_number(value: Any) -> float | None:
    """``value`` as a float if it is a real number of any numeric type, else ``None``.

    Python ints and floats, numpy scalars and 0-d arrays, one-element tensors (what ``torch.optim``
    accepts for ``lr``) qualify; bools (Python, numpy, tensor) and complex numbers do not.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            return None
        return float(value.detach().reshape(()).item())
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    shape, kind = getattr(value, "shape", None), getattr(getattr(value, "dtype", None), "kind", None)
    if shape == () and kind in ("i", "u", "f"):  # a numpy 0-d array
        return float(value)
    return None


def check_range(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float; ``ValueError`` naming the argument and the range when it lies outside it.

    Any numeric type is accepted (see :func:`real_number`); bools are not.
    """
    number_ = real_number(value)
    ok = number_ is not None and math.isfinite(number_)
    if ok and low is not None:
        ok = number_ > low if low_open else number_ >= low
    if ok and high is not None:
        ok = number_ < high if high_open else number_ <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{owner}: `{name}` must be a finite number in {left}{lo}, {hi}{right}, got {value!r}")
    return number_  # type: ignore[return-value]


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
        return check_range(owner, name, value, low, high, low_open=low_open, high_open=high_open)

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
    return (float(real_number(value[0])), float(real_number(value[1])))  # type: ignore[arg-type]


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


#: The keyword-only constructor options every optimizer of the package takes (see
#: :class:`AdaptiveOptimizer`): how it runs, not what it computes.
RUNTIME_OPTIONS = ("foreach", "average_across_ranks", "max_consecutive_skips")


def runtime_options(values: dict[str, Any]) -> dict[str, Any]:
    """The :data:`RUNTIME_OPTIONS` among a constructor's ``values`` (its ``locals()``), to pass on.

    >>> runtime_options({"lr": 0.1, "foreach": False, "max_consecutive_skips": None})
    {'foreach': False, 'max_consecutive_skips': None}
    """
    return {name: values[name] for name in RUNTIME_OPTIONS if name in values}


#: Attribute of a complex parameter's real view (:meth:`AdaptiveOptimizer._params_and_grads`)
#: that holds the parameter, so that ``optimizer.state`` can be indexed by the view.
_VIEW_OF = "_adaptive_lr_view_of"


def _param_key(key: Any) -> Any:
    return getattr(key, _VIEW_OF, key) if isinstance(key, Tensor) else key


class _LocalState(MutableMapping):
    """One DTensor parameter's state as the step sees it: its local shards.

    Reads give a DTensor entry's local tensor (in-place writes reach the DTensor); a plain tensor
    written is stored as a DTensor laid out like the parameter (:func:`._sharding.to_like`), so that
    ``optimizer.state`` holds DTensors for DTensor parameters, as ``torch.optim`` does and as
    ``torch.distributed.checkpoint`` expects.
    """

    __slots__ = ("_entry", "_param")

    def __init__(self, entry: dict[str, Any], param: Tensor) -> None:
        self._entry, self._param = entry, param

    def __getitem__(self, key: str) -> Any:
        value = self._entry[key]
        return _sharding.local(value) if _sharding.is_dtensor(value) else value

    def __setitem__(self, key: str, value: Any) -> None:
        self._entry[key] = _sharding.to_like(value, self._param) if isinstance(value, Tensor) else value

    def __delitem__(self, key: str) -> None:
        del self._entry[key]

    def __iter__(self) -> Any:
        return iter(self._entry)

    def __len__(self) -> int:
        return len(self._entry)


class _ParamState(defaultdict):
    """``optimizer.state`` of an optimizer with complex or DTensor parameters: indexed by a parameter
    or by the real or local view :meth:`AdaptiveOptimizer._params_and_grads` handed out for it (both
    reach the entry of the parameter, so the state stays keyed by parameters only).  The entry of a
    DTensor parameter is seen through :class:`_LocalState` (its local shards).

    Installed only when such a parameter is present: a plain ``defaultdict`` costs nothing.
    """

    def _seen(self, param: Any, entry: Any) -> Any:
        return _LocalState(entry, param) if _sharding.is_dtensor(param) and isinstance(entry, dict) else entry

    def __getitem__(self, key: Any) -> Any:
        param = _param_key(key)
        return self._seen(param, super().__getitem__(param))

    def __setitem__(self, key: Any, value: Any) -> None:
        param = _param_key(key)
        if _sharding.is_dtensor(param) and isinstance(value, dict):  # in place: defaultdict returns `value`
            value.update({k: _sharding.to_like(v, param) for k, v in value.items() if isinstance(v, Tensor)})
        super().__setitem__(param, value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(_param_key(key))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(_param_key(key))

    def get(self, key: Any, default: Any = None) -> Any:
        param = _param_key(key)
        return self._seen(param, super().__getitem__(param)) if super().__contains__(param) else default

    def setdefault(self, key: Any, default: Any = None) -> Any:
        param = _param_key(key)
        if not super().__contains__(param):
            self[param] = default
        return self[param]

    def pop(self, key: Any, *default: Any) -> Any:
        return super().pop(_param_key(key), *default)


def _check_skip_limit(owner: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: `max_consecutive_skips` must be None or a positive integer, got {value!r}")
    return int(value)


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


class AdaptiveOptimizer(Optimizer):
    """Base class: loss and probe intake, the finiteness gate, cross-rank averaging, shared state.

    Subclasses implement :meth:`_update`, which receives the resolved loss (or ``None``), declare in
    :attr:`shared_options` the hyperparameters that must be equal in every param group (those that
    feed scalars computed over the whole model), and in :attr:`group_state` the optimizer-wide
    state they keep in the param groups, with its initial values.

    Keyword-only arguments of every optimizer (subclasses pass them through):

    * ``foreach``: the multi-tensor (``torch._foreach_*``) path, or tensor by tensor.
    * ``average_across_ranks``: average the loss across ``torch.distributed`` ranks.
    * ``max_consecutive_skips``: raise a ``RuntimeError`` with a diagnosis when this many steps in
      a row were skipped (non-finite loss, gradient or outcome); ``None`` never raises.  Default
      :data:`DEFAULT_MAX_CONSECUTIVE_SKIPS`.  Kept in the param groups (change it there too).
    """

    #: Whether a step needs the loss value (MoMo, QLAB do; gradient-only methods do not).
    requires_loss: ClassVar[bool] = True
    #: Whether a step needs a probe (a loss-only re-evaluation at a trial point: QLAB).
    requires_probe: ClassVar[bool] = False
    #: Hyperparameters that every param group must share.
    shared_options: ClassVar[tuple[str, ...]] = ()
    #: Optimizer-wide state, kept equal in every param group: key → initial value.  Subclasses
    #: extend it (``{**AdaptiveOptimizer.group_state, "loss_avg": 0.0}``).
    group_state: ClassVar[dict[str, Any]] = {"step": 0, "skipped_steps": 0, "consecutive_skips": 0}
    #: Names of :meth:`_gate` values computed from the step's outcome (not from the loss or the
    #: gradients alone): a non-finite one is reported as the step's outcome.
    outcome_scalars: ClassVar[frozenset[str]] = frozenset()
    #: Convert post-gate scalars to Python floats when the parameters live on the CPU, where
    #: reading a tensor costs nothing. Tests switch it off to exercise the on-device path.
    host_scalars_on_cpu: ClassVar[bool] = True
    #: Whether a step needs quantities per parameter tensor (not only sums over the whole model):
    #: refused over FSDP1 ``FlatParameter`` objects, which hold many tensors each.
    per_tensor_quantities: ClassVar[bool] = False
    #: :meth:`_gate` values completed over shards by a maximum, or as a ``[min, max]`` pair (the
    #: others are sums; values named ``*loss*`` are already averaged across ranks).
    gate_maxima: ClassVar[frozenset[str]] = frozenset({"v_max"})
    gate_ranges: ClassVar[frozenset[str]] = frozenset({"float16_range"})
    #: Run the per-tensor body on the CPU also when ``foreach`` is set, where it was measured faster
    #: (a multi-tensor kernel is a loop over tensors there anyway; docs/benchmarks.md).  Tests switch
    #: it off to exercise the multi-tensor body on the CPU.
    single_tensor_on_cpu: ClassVar[bool] = False
    #: :attr:`group_state` keys about the options (not the step's numbers): kept on the host also by
    #: a ``capturable`` optimizer.
    host_group_state: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        check_flag(type(self).__name__, "foreach", foreach)
        check_flag(type(self).__name__, "average_across_ranks", average_across_ranks)
        limit = _check_skip_limit(type(self).__name__, max_consecutive_skips)
        defaults = dict(
            defaults, foreach=foreach, average_across_ranks=average_across_ranks, max_consecutive_skips=limit
        )
        defaults[CLASS_KEY] = self._name
        self._init_transient()
        super().__init__(params, {**copy.deepcopy(self.group_state), **defaults})

    # ------------------------------------------------------------------ bookkeeping

    def _init_transient(self) -> None:
        """Attributes that are not state: lost on pickling, rebuilt here."""
        self._pending_loss: tuple[Tensor | float, bool] | None = None
        self._registered_probe: tuple[Probe, bool] | None = None
        self._layout: _sharding.Layout | None = None
        #: Called with the optimizer at the start of every step (``lightning_adaptive_lr.fabric``
        #: installs one that refuses a step a GradScaler did not unscale); not state.
        self._step_guard: Callable[[AdaptiveOptimizer], None] | None = None
        #: ``capturable``: the skip count :meth:`sync_warnings` last reported, and the gate's names
        #: with, on the device, which were not finite at the last skipped step.
        self._reported_skips = 0
        self._skip_record: tuple[tuple[str, ...], Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_registered_probe"] = None  # a function: not state (register it again after loading)
        state["_layout"] = None  # found again at the next step
        state["_step_guard"] = None  # a function: not state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if not hasattr(self, "_pending_loss"):
            self._init_transient()
        for name in ("_layout", "_step_guard"):  # pickled before these existed
            if not hasattr(self, name):
                setattr(self, name, None)
        if not hasattr(self, "_reported_skips"):
            self._reported_skips, self._skip_record = 0, None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self.param_groups:  # a group added later joins the optimizer-wide state where it stands
            for key in self.group_state:
                param_group.setdefault(key, copy.deepcopy(self.param_groups[0][key]))
        super().add_param_group(param_group)
        if any(p.is_complex() or _sharding.is_dtensor(p) for p in self.param_groups[-1]["params"]):
            self._index_state_by_real_views()
        first = self.param_groups[0]
        for name in self.shared_options:
            if self.param_groups[-1][name] != first[name]:
                raise ValueError(
                    f"{self._name}: `{name}` is shared by all param groups (it enters scalars "
                    f"computed over the whole model); got {first[name]!r} and {self.param_groups[-1][name]!r}"
                )

    def _uses_foreach(self, group: dict[str, Any], params: Sequence[Tensor]) -> bool:
        """Whether ``group``'s step takes the multi-tensor body: ``foreach``, except on the CPU for a
        class that is faster there tensor by tensor (:attr:`single_tensor_on_cpu`)."""
        on_cpu = bool(params) and params[0].device.type == "cpu"
        return bool(group["foreach"]) and not (on_cpu and self.single_tensor_on_cpu)

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
        """Load a state dict of this optimizer, also one saved by release 0.1 (``state["global"]``).

        A state dict of another optimizer raises a ``ValueError`` naming both, before anything is
        loaded (see :meth:`_check_compatible`).
        """
        super().load_state_dict(self._convert_legacy(state_dict))
        if any(p.is_complex() or _sharding.is_dtensor(p) for group in self.param_groups for p in group["params"]):
            self._index_state_by_real_views()  # torch's load_state_dict builds a new state

    def _convert_legacy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Release 0.1 kept the optimizer-wide scalars in ``state["global"]``: move them to the groups.

        Its groups lack the :attr:`group_state` keys (also when it was saved before any step, with no
        ``state["global"]``): they start at their initial values; constructor options added since it
        was saved (``max_consecutive_skips``, ...) and the saving class (:data:`CLASS_KEY`) take this
        optimizer's values.  First checks that the state dict is one of this optimizer
        (:meth:`_check_compatible`).
        """
        self._check_compatible(state_dict)
        state = state_dict.get("state", {})
        legacy = state.get(LEGACY_GLOBAL)
        shared = self._legacy_group_state(dict(legacy)) if legacy is not None else {}
        current = self.param_groups[0] if self.param_groups else self.defaults
        added = (*_LATE_OPTIONS, *self._option_names(), CLASS_KEY)
        late = {key: copy.deepcopy(current[key]) for key in added if key in current}
        groups = [
            {**copy.deepcopy(self.group_state), **late, **group, **copy.deepcopy(shared)}
            for group in state_dict["param_groups"]
        ]
        return {**state_dict, "state": {k: v for k, v in state.items() if k != LEGACY_GLOBAL}, "param_groups": groups}

    def _check_compatible(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError``, naming both optimizers, unless ``state_dict`` is one of this optimizer.

        * Its groups name the class that saved it (:data:`CLASS_KEY`): it must be this optimizer's
          (or a base class of it).
        * Older state dicts (release 0.1, and before the class was recorded), by the constructor
          options the saved groups hold: refused when another optimizer (this package's or
          ``torch.optim``'s) has a larger share of its options there than this one, or when fewer
          than half of this optimizer's options are there.  Options added since the state dict was
          saved are not refused (they take this optimizer's values, see :meth:`_convert_legacy`).
          The message names the missing options and the optimizer the groups fit best.
        * Options every group must share (:attr:`shared_options`) must be equal in the saved groups.
        """
        groups = state_dict.get("param_groups")
        if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
            raise ValueError(f"{self._name}.load_state_dict: not an optimizer state dict (no list of param groups)")
        mine = self.param_groups[0].get(CLASS_KEY, self._name) if self.param_groups else self._name
        accepted = {mine, *(cls.__name__ for cls in type(self).__mro__)}
        saved = sorted({g[CLASS_KEY] for g in groups if CLASS_KEY in g}, key=str)
        if saved:
            foreign = [name for name in saved if name not in accepted]
            if foreign:
                raise ValueError(
                    f"{self._name}.load_state_dict: this state dict was saved by {' and '.join(map(str, foreign))}, "
                    f"not by {mine}; {mine} cannot continue from it (its options and state differ). Load it into "
                    f"a {foreign[0]}, or start {mine} from scratch."
                )
        else:
            options = self._option_names()
            keys = set.intersection(*(set(g) for g in groups)) if groups else set()
            missing = sorted(options - keys)
            if missing:
                share = 1.0 - len(missing) / len(options)
                best, owners = _best_fitting_optimizers(keys, exclude=type(self).__name__)
                if best > share or share < 0.5:
                    looks = f"; it looks like a state dict of {' or '.join(owners)}" if best > share else ""
                    raise ValueError(
                        f"{self._name}.load_state_dict: the state dict's param groups lack the options "
                        f"{', '.join(missing)} of {mine}: it was not saved by {mine}{looks}. Load it into "
                        "the optimizer that saved it."
                    )
        for name in self.shared_options:
            values = [g[name] for g in groups if name in g]
            if any(v != values[0] for v in values):
                raise ValueError(
                    f"{self._name}.load_state_dict: `{name}` is shared by all param groups of {mine}, but the "
                    f"state dict's groups hold {values!r}"
                )

    def _option_names(self) -> set[str]:
        """The constructor options this optimizer keeps in its groups (every saved group has them)."""
        return (_constructor_options(type(self)) & set(self.defaults)) - set(self.group_state) - set(_LATE_OPTIONS)

    def _legacy_group_state(self, legacy: dict[str, Any]) -> dict[str, Any]:
        """The group-state values for a release-0.1 ``state["global"]`` (subclasses rename keys)."""
        return {**copy.deepcopy(self.group_state), **legacy}

    def _index_state_by_real_views(self) -> None:
        """Let ``optimizer.state`` be indexed by the real views of complex parameters too."""
        if not isinstance(self.state, _ParamState):
            self.state = _ParamState(dict, self.state)

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
        value = self._checked_loss(loss, "`loss`")
        self._pending_loss = (value.detach() if isinstance(value, Tensor) else value, reduced)

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

    def _checked_loss(self, loss: Any, what: str) -> Tensor | float:
        """``loss`` if it is a one-element real tensor, else as a float; ``TypeError`` naming ``loss``
        (and ``what`` it was: the argument, the closure's return value) for anything else."""
        if isinstance(loss, Tensor):
            if loss.dtype == torch.bool or loss.is_complex():
                raise TypeError(
                    f"{self._name}: {what} must be the real-valued loss (`loss`), got a {loss.dtype} tensor"
                )
            if loss.numel() != 1:
                raise ValueError(
                    f"{self._name}: {what} must be the scalar loss (`loss`), got a tensor of shape {tuple(loss.shape)}"
                )
            return loss
        value = real_number(loss)
        if value is None:
            raise TypeError(
                f"{self._name}: {what} must be the loss (`loss`) as a real number or a one-element tensor, "
                f"got {type(loss).__name__} {loss!r}"
            )
        return value

    def _resolve_loss(self, loss: Tensor | float | None, closure_loss: Any) -> tuple[Tensor | float | None, bool]:
        pending, self._pending_loss = self._pending_loss, None
        if loss is not None:
            return self._checked_loss(loss, "`loss`"), False
        if pending is not None:
            return pending
        if closure_loss is not None:
            return self._checked_loss(closure_loss, "the closure's return value"), False
        return None, False

    def _loss_tensor(self, loss: Tensor | float, reduced: bool, device: torch.device) -> Tensor:
        """The loss as a detached 0-d tensor on ``device``, averaged across ranks unless ``reduced``."""
        loss = self._checked_loss(loss, "`loss`")
        if isinstance(loss, Tensor):
            value = loss.detach().reshape(()).to(device=device, dtype=accumulation_dtype(device))
        else:
            value = torch.tensor(loss, device=device, dtype=accumulation_dtype(device))
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
        return bool(grads) and all(not bool(_sharding.local(g).any()) for g in grads)

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
        if self._step_guard is not None:
            self._step_guard(self)
        if loss is not None:
            self._checked_loss(loss, "`loss`")  # before the closure runs
        closure_loss = None
        if closure is not None:
            with torch.enable_grad():
                closure_loss = closure()
        value, reduced = self._resolve_loss(loss, closure_loss)
        if value is None and self.requires_loss:
            if not self._is_state_initialization():
                raise RuntimeError(f"{self._name}.step() needs the mini-batch loss: {_LOSS_FIXES}.")
            value, reduced = 0.0, True
        self._layout = self._find_layout()
        device = self._device()
        loss_tensor = None if value is None else self._loss_tensor(value, reduced, device)
        skipped = self._shared("skipped_steps")
        self._update(loss_tensor)
        self._end_run_of_skips(skipped)
        return closure_loss if closure is not None else loss

    def _end_run_of_skips(self, skipped_before: int) -> None:
        """After a step: if it was not skipped, the run of consecutive skips is over.

        :meth:`step` calls it; a subclass whose ``step`` does not go through :meth:`step` (Step-Tuned
        SGD's ``same_batch=True``) calls it with ``skipped_steps`` read before its update.
        """
        if self._capturable:  # counted on the device by the step itself
            return
        if self._shared("skipped_steps") == skipped_before and self._shared("consecutive_skips"):
            self._set_shared(consecutive_skips=0)

    def _update(self, loss: Tensor | None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ sharding

    def _find_layout(self) -> _sharding.Layout | None:
        """How this step's parameters are sharded (``None``: not at all; free without ``torch.distributed``)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        params = [p for group in self.param_groups for p in group["params"]]
        return _sharding.layout_of(params, self._name, per_tensor=self.per_tensor_quantities)

    def _gate_kinds(self, name: str, n: int) -> list[str]:
        """How each of the ``n`` entries of the gate value ``name`` is completed over shards."""
        if "loss" in name:
            return [_sharding.SAME] * n
        if name in self.gate_maxima:
            return [_sharding.MAX] * n
        if name in self.gate_ranges and n == 2:
            return [_sharding.MIN, _sharding.MAX]
        return [_sharding.SUM] * n

    def _completed(self, values: Tensor, kinds: Sequence[str]) -> Tensor:
        """``values`` (a 1-d vector of partials) completed over the shards, or as it is when nothing is sharded."""
        layout = self._layout
        if layout is None or layout.size == 1:
            return values
        return _sharding.complete(values, kinds, layout)

    def _agree(self, flag: bool) -> bool:
        """``flag`` if every process of the sharding group has it (a local outcome check made global).

        Unsharded, ``flag`` itself: replicas hold equal values and decide alike.
        """
        layout = self._layout
        if layout is None or layout.size == 1:
            return flag
        vote = torch.tensor([1.0 if flag else 0.0], device=self._device(), dtype=torch.float32)
        return bool(_sharding.complete(vote, [_sharding.MIN], layout)[0] > 0)

    def _require_whole_units(self, what: str) -> None:
        """Refuse per-output-unit sums (``what`` names them) where shards cut output units (rows along dim 0)."""
        layout = self._layout
        if layout is not None and layout.size > 1 and not layout.units_intact:
            raise RuntimeError(
                f"{self._name}: {what} sums over each output unit (a row along dim 0), but the parameters are "
                f"sharded across units ({layout.what}), so no process holds a unit whole. Shard along dim 0 only "
                "(FSDP2 `fully_shard` does, and HSDP), or drop that level."
            )

    def _local_view(self, p: Tensor) -> Tensor:
        """The local shard of the DTensor parameter ``p``, by which ``self.state`` reaches ``p``'s state."""
        view = _sharding.local(p)
        if getattr(view, _VIEW_OF, None) is not p:
            setattr(view, _VIEW_OF, p)
        return view

    # ------------------------------------------------------------------ helpers for subclasses

    def _params_and_grads(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """The group's parameters that have a gradient, and their gradients.

        A complex parameter comes as its real view (``torch.view_as_real``: a real tensor with a last
        dimension of 2), and its gradient likewise, as ``torch.optim`` handles complex parameters: the
        method then works on the real pairs, and ``self.state[view]`` is the parameter's state (state
        created from the view is the real pairs' state).
        """
        params, grads = [], []
        sharded = self._layout is not None
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                if sharded and self._fsdp1_empty_shard(p):
                    grad = p.detach()  # an empty slice: its place in per-tensor vectors, nothing to sum
                else:
                    continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{self._name} does not support sparse gradients; use dense gradients "
                    "(e.g. `nn.Embedding(..., sparse=False)`)."
                )
            if _sharding.is_dtensor(p):
                p, grad = self._local_view(p), _sharding.local(grad)
                if p.is_complex():
                    view = torch.view_as_real(p)
                    setattr(view, _VIEW_OF, getattr(p, _VIEW_OF))
                    p, grad = view, torch.view_as_real(grad.resolve_conj())
            elif p.is_complex():
                p, grad = self._real_view(p), torch.view_as_real(grad.resolve_conj())
            params.append(p)
            grads.append(grad)
        return params, grads

    def _fsdp1_empty_shard(self, p: Tensor) -> bool:
        """Whether ``p`` is an FSDP1 parameter none of which lies on this process (FSDP leaves its
        ``.grad`` None).  It is handed out, empty, where a per-tensor quantity needs every rank to
        list the same tensors; a parameter that has elements here but no gradient is refused then,
        since the other ranks cannot know to leave it out."""
        if not (p.requires_grad and getattr(p, _sharding.FSDP1_FLAG, False)) or _sharding.is_flat_parameter(p):
            return False
        if not self.per_tensor_quantities:
            return False
        if p.numel() == 0:
            return True
        raise RuntimeError(
            f"{self._name}: an FSDP1 parameter of local shape {tuple(p.shape)} requires a gradient but got none this "
            "step; under FSDP1 a per-tensor optimizer needs every rank to step the same tensors. Set "
            "`requires_grad=False` on parameters the loss does not use, or use FSDP2 (`fully_shard`)."
        )

    def _real_view(self, p: Tensor) -> Tensor:
        """The real view of the complex parameter ``p``, by which ``self.state`` reaches ``p``'s state."""
        view = torch.view_as_real(p)
        setattr(view, _VIEW_OF, p)
        return view

    @staticmethod
    def _parameter_of(t: Tensor) -> Tensor:
        """The parameter a tensor of :meth:`_params_and_grads` stands for (itself, or the complex
        parameter of a real view): what to compare or key by across calls."""
        return getattr(t, _VIEW_OF, t)

    def _gate_vector(self, scalars: dict[str, Tensor]) -> tuple[list[Tensor], Tensor | None]:
        """The gate's values flattened (one piece per name, in :func:`~._reduce.accumulation_dtype`)
        and joined into one vector, completed over shards when the parameters are sharded."""
        first = next(iter(scalars.values()))
        dtype = accumulation_dtype(first.device)
        flat = [value.to(device=first.device, dtype=dtype).reshape(-1) for value in scalars.values()]
        joined = torch.cat(flat) if flat else None
        if joined is not None and self._layout is not None:  # partial sums over shards: complete them
            kinds = [kind for n, piece in zip(scalars, flat) for kind in self._gate_kinds(n, piece.numel())]
            joined = self._completed(joined, kinds)
        return flat, joined

    def _gate(self, **scalars: Tensor) -> dict[str, Any] | None:
        """The step's one device-to-host synchronization, by name.

        Reads the tensors that decide whether the step happens (0-d or 1-d, any float dtype and
        device) and returns them by name: a 0-d tensor as a float, a 1-d one as a list of floats.
        Returns ``None`` (after recording the skip) if any value is not finite.
        """
        flat, joined = self._gate_vector(scalars)
        values = joined.tolist() if joined is not None else []
        out: dict[str, Any] = {}
        bad: list[str] = []
        offset = 0
        for name, piece in zip(scalars, flat):
            n = piece.numel()
            part = values[offset : offset + n]
            out[name] = part[0] if scalars[name].dim() == 0 else part
            if not all(math.isfinite(v) for v in part):
                bad.append(name)
            offset += n
        if bad:
            self._skip_step(self._cause(bad), bad)
            return None
        return out

    # ------------------------------------------------------------------ the device-side step

    @property
    def _capturable(self) -> bool:
        """Whether steps keep every decision on the device (the ``capturable`` option)."""
        return bool(self.param_groups[0].get("capturable", False))

    def _device_gate(self, outcomes: Sequence[str] = (), **scalars: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The ``capturable`` gate: :meth:`_gate`'s values as device tensors (completed over shards
        alike) and whether all are finite, a 0-d bool tensor; nothing is read to the host.  Which
        values were not finite at the last skipped step is kept on the device for
        :meth:`sync_warnings` to name, with a place for each of the step's ``outcomes``: the names of
        the checks :meth:`_device_outcome` folds in after the gate (in its :attr:`outcome_scalars`)."""
        flat, joined = self._gate_vector(scalars)
        assert joined is not None
        out, finite, offset = {}, [], 0
        for name, piece in zip(scalars, flat):
            part = joined[offset : offset + piece.numel()]
            out[name] = part[0] if scalars[name].dim() == 0 else part
            finite.append(torch.isfinite(part).all())
            offset += piece.numel()
        finite_t = torch.stack(finite)
        ok = finite_t.all()
        if outcomes:  # their places: not failed yet (a fill kernel, nothing copied from the host)
            finite_t = torch.cat([finite_t, torch.ones(len(outcomes), dtype=torch.bool, device=finite_t.device)])
        names = (*scalars, *outcomes)
        if self._skip_record and self._skip_record[0] == names:  # in place: see _set_shared_on_device
            self._skip_record[1].copy_(torch.where(ok, self._skip_record[1], ~finite_t))
        else:
            self._skip_record = (names, torch.where(ok, torch.zeros_like(finite_t), ~finite_t))
        return out, ok

    def _device_outcome(self, ok: Tensor, *failed: Tensor) -> Tensor:
        """``ok`` with the step's outcome checks folded in: the gate's ``ok`` and none of ``failed``
        (0-d bools, "this check fails", in the order of the ``outcomes`` given to
        :meth:`_device_gate`).  A skip they decide is written into the gate's skip record at their
        names (in place), so that :meth:`sync_warnings` reports it as the host step's
        ``_skip_step("outcome", ...)`` does."""
        names, record = self._skip_record  # type: ignore[misc]
        failures = torch.stack(failed) & ok
        refused = failures.any()
        noted = torch.cat([torch.zeros_like(record[: -len(failed)]), failures])
        record.copy_(torch.where(refused, noted, record))
        return ok & ~refused

    def _device_group_state(self, device: torch.device) -> None:
        """Hold the optimizer-wide state as 0-d tensors on ``device`` (``capturable``): counts as
        int64, the rest in :func:`~._reduce.accumulation_dtype`.  Done once, at the
        first step (and after a state dict or :meth:`set_lower_bound` put numbers back).  ``None`` (not
        known yet) stays: the step writes a tensor there, +inf where its first step was skipped."""
        dtype = accumulation_dtype(device)
        values = {}
        for key, initial in self.group_state.items():
            value = self._shared(key)
            if key in self.host_group_state or value is None:  # None: not known yet (the step sets it)
                continue
            if isinstance(value, Tensor):
                if value.device != device:
                    values[key] = value.to(device)
                continue
            counts = isinstance(initial, int) and not isinstance(initial, bool)
            if counts:
                values[key] = torch.tensor(int(value), device=device, dtype=torch.int64)
            else:
                values[key] = torch.tensor(float(value), device=device, dtype=dtype)
        if values:
            self._set_shared(**values)

    def _host_group_state(self) -> None:
        """The reverse of :meth:`_device_group_state`, for a step that is not ``capturable`` (a state
        dict saved by a capturable optimizer): device numbers back to Python numbers (+inf: ``None``)."""
        values = {}
        for key, initial in self.group_state.items():
            value = self._shared(key)
            if isinstance(value, Tensor) and key not in self.host_group_state:
                number = value.item()
                values[key] = None if initial is None and number == math.inf else number
        if values:
            self._set_shared(**values)

    def _count_device_step(self, ok: Tensor) -> None:
        """After a ``capturable`` step: ``step`` counts it if ``ok``, else the skip counters do."""
        taken = ok.to(torch.int64)
        self._set_shared_on_device(
            step=self._shared("step") + taken,
            skipped_steps=self._shared("skipped_steps") + (1 - taken),
            consecutive_skips=(self._shared("consecutive_skips") + 1) * (1 - taken),
        )

    def _set_shared_on_device(self, **values: Tensor) -> None:
        """:meth:`_set_shared` for a ``capturable`` step: each value :func:`written_into` the tensor
        already there, which every group then holds (a group added later held a copy)."""
        self._set_shared(**{key: written_into(self._shared(key), value) for key, value in values.items()})

    @staticmethod
    def _record_on_device(group: dict[str, Any], **values: Tensor) -> None:
        """:meth:`_record` for a ``capturable`` step: each value :func:`written_into` the record there."""
        for key, value in values.items():
            group[key] = written_into(group.get(key), value.detach())

    def sync_warnings(self) -> None:
        """Give the warnings and errors that a ``capturable`` optimizer's steps cannot (they read
        nothing to the host): skipped steps, and what a subclass counts on the device.

        Reads the counters once (one synchronization) and warns or raises as a step that reads its
        gate does: a warning when the skip count passed 1, 10, 100, ... since the last call, a
        ``RuntimeError`` after ``max_consecutive_skips`` skips in a row.  Call it outside a CUDA
        graph, every few hundred steps or at each logging step;
        :class:`~lightning_adaptive_lr.AdaptiveLRMonitor` calls it when it logs.  A no-op for
        optimizers that are not ``capturable`` (their steps report everything themselves).

        Example:
            >>> import torch
            >>> from lightning_adaptive_lr import MoMo
            >>> w = torch.nn.Parameter(torch.ones(3))
            >>> optimizer = MoMo([w], capturable=True)
            >>> w.grad = torch.ones(3)
            >>> _ = optimizer.step(loss=torch.tensor(1.0))
            >>> optimizer.sync_warnings()  # no skip: nothing to report
        """
        if not self._capturable or not isinstance(self._shared("skipped_steps"), Tensor):
            return
        counts = torch.stack([self._shared("skipped_steps"), self._shared("consecutive_skips")])
        names, mask = self._skip_record or ((), counts[:0])
        total, run, *bad = torch.cat([counts, mask.to(torch.int64)]).tolist()
        reported, self._reported_skips = self._reported_skips, total
        quantities = [name for name, flag in zip(names, bad) if flag]
        cause = self._cause(quantities) if quantities else "step"  # unknown after a resume
        limit = self.param_groups[0].get("max_consecutive_skips", DEFAULT_MAX_CONSECUTIVE_SKIPS)
        if limit is not None and run >= limit:
            self._raise_skips(run, total, limit, cause, quantities)
        if any(_is_power_of_ten(n) for n in range(reported + 1, total + 1)):
            self._warn_skips(total, run, limit, cause, quantities)

    def _cause(self, names: Sequence[str]) -> str:
        """Why a step whose gate values ``names`` are non-finite is skipped: a loss among them
        (a name containing ``loss``) comes first, then the gradients; the step's outcome only when
        every one is an :attr:`outcome_scalars` value."""
        if any("loss" in name for name in names):
            return "loss"
        return "outcome" if all(name in self.outcome_scalars for name in names) else "gradient"

    def _skip_step(self, cause: str = "gradient", quantities: Sequence[str] = ()) -> None:
        """Record a skipped step: count it, warn at the 1st, 10th, 100th, ... skip, and raise after
        ``max_consecutive_skips`` skips in a row.

        Args:
            cause: what was not finite: ``"loss"``, ``"gradient"`` or ``"outcome"`` (the step's
                result, with a finite loss and gradients).
            quantities: the names of the non-finite values (shown in the message).
        """
        total = self._shared("skipped_steps") + 1
        run = self._shared("consecutive_skips") + 1
        self._set_shared(skipped_steps=total, consecutive_skips=run)
        limit = self.param_groups[0].get("max_consecutive_skips", DEFAULT_MAX_CONSECUTIVE_SKIPS)
        if limit is not None and run >= limit:
            self._raise_skips(run, total, limit, cause, quantities)
        if _is_power_of_ten(total):
            self._warn_skips(total, run, limit, cause, quantities, stacklevel=5)

    def _raise_skips(self, run: int, total: int, limit: int, cause: str, quantities: Sequence[str]) -> None:
        what, advice = _CAUSES[cause]
        detail = f" ({', '.join(quantities)})" if quantities else ""
        raise RuntimeError(
            f"{self._name}: {run} steps in a row were skipped, the last because of a non-finite "
            f"{what}{detail} ({total} skipped in all); the run is not recovering, so it stops here "
            f"(max_consecutive_skips={limit}; None never stops). {advice}"
        )

    def _warn_skips(
        self, total: int, run: int, limit: int | None, cause: str, quantities: Sequence[str], stacklevel: int = 3
    ) -> None:
        what, advice = _CAUSES[cause]
        detail = f" ({', '.join(quantities)})" if quantities else ""
        stop = "never raises" if limit is None else f"raises after {limit} in a row"
        warnings.warn(
            f"{self._name}: non-finite {what}{detail}: step skipped (parameters and state unchanged). "
            f"{total} step{'s' if total > 1 else ''} skipped so far, {run} in a row; the next warning "
            f"comes at {10 ** len(str(total))} skips, and step() {stop} (max_consecutive_skips). The count is in "
            f"optimizer.param_groups[i]['skipped_steps'] (AdaptiveLRMonitor logs it). {advice}",
            RuntimeWarning,
            stacklevel=stacklevel,
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


def written_into(current: Any, value: Tensor) -> Tensor:
    """``value`` copied into ``current`` when that is a tensor of its shape, dtype and device, else
    ``value`` itself: a ``capturable`` step's update of state it already holds, so that a CUDA graph
    that captured the step reads and writes the same memory at every replay (new tensors only where
    there are none yet: the steps before the capture)."""
    if (
        isinstance(current, Tensor)
        and (current.shape, current.dtype, current.device) == (value.shape, value.dtype, value.device)
    ):
        return current.copy_(value)
    return value


# --------------------------------------------------------------------------- which optimizer saved it


@functools.cache
def _constructor_options(cls: type) -> frozenset[str]:
    """The names a class's constructor takes as options (not ``self``/``params``/``*args``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    return frozenset(name for name, p in parameters.items() if p.kind in kinds) - {"self", "params", CLASS_KEY}


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


def _options_of(cls: type, *, own: bool) -> set[str] | None:
    """The options of an optimizer class built on one probe parameter (this package's: its
    constructor options; torch's: its defaults), or None if it cannot be built so (a wrapper)."""
    try:
        optimizer = cls([torch.zeros(1, requires_grad=True)])
        return optimizer._option_names() if own else set(optimizer.defaults)
    except Exception:  # noqa: BLE001 - any class that needs more than parameters is no candidate
        return None


def _best_fitting_optimizers(keys: set[str], *, exclude: str) -> tuple[float, list[str]]:
    """The largest share of an optimizer's options found among ``keys``, over this package's and
    ``torch.optim``'s optimizers but ``exclude``, and the optimizers that have it (by name)."""
    candidates: list[tuple[str, set[str] | None]] = [
        (cls.__name__, _options_of(cls, own=True))
        for cls in dict.fromkeys(_subclasses(AdaptiveOptimizer))
        # this package's own classes: not the subclasses others derive at run time (Lightning's
        # LightningOptimizer makes one per optimizer it wraps)
        if cls.__module__.startswith(__package__) and not cls.__name__.startswith("_") and cls.__name__ != exclude
    ]
    for name in getattr(torch.optim, "__all__", ()):
        cls = getattr(torch.optim, name, None)
        if isinstance(cls, type) and issubclass(cls, Optimizer) and not issubclass(cls, AdaptiveOptimizer):
            candidates.append((f"torch.optim.{name}", _options_of(cls, own=False)))
    shares = [(len(options & keys) / len(options), name) for name, options in candidates if options]
    if not shares:
        return 0.0, []
    best = max(share for share, _ in shares)
    return best, sorted(name for share, name in shares if share == best)

