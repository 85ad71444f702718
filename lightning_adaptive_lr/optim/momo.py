r"""MoMo and MoMo-Adam: momentum model-based adaptive learning rates.

Schaipp, Ohana, Eickenberg, Defazio, Gower. "MoMo: Momentum Models for Adaptive Learning
Rates." ICML 2024.  Implemented to the letter of the authors' update (docs/algorithms.md §1, [exact]).

Both keep exponential averages of the loss ``f̄``, of the gradient ``d`` and of ``⟨g, x⟩`` (``γ``);
together they define a model of the loss, and the step is the truncated Polyak step on that model,
capped at ``lr``::

    τ = min(lr/ρ, [c·(f̄ − ρ·lb) + ⟨d, x⟩ − c·γ]₊ / ‖d‖²),      c = 1 + lr·weight_decay
    x ← (x − τ·d) / c

The base direction is MoMo's dampened heavy-ball average ``d`` or, for MoMo-Adam, Adam's ``d/Dn``
(:mod:`._directions`), in whose geometry ``‖d‖²`` becomes ``Σ d²/Dn``.  The step size is
:func:`momo_step_size`.

Outside the paper's assumptions (docs/algorithms.md §1.4):

* **A loss below** ``lb``: the bound is not one, and the Polyak step would be 0 for ever.  When
  the loss average falls below it, ``lb`` is lowered (:func:`momo_lowered_bound`), counted in
  ``lb_lowered`` and warned about once.  While the losses stay at or above ``lb`` the update is
  the paper's.
* **The step's outcome is gated**: the new averages are formed next to the state, and the sums
  the step size needs (``⟨d, x⟩``, ``‖d‖²`` or ``⟨d, u⟩``, and MoMo-Adam's largest new ``v``)
  are read by the gate with the loss; if one is not finite in the parameters' precision, the
  step is skipped with state and parameters untouched.
* **Momentum schedules**: MoMo's param groups also hold ``momentum`` (= ``beta``), the key
  ``torch.optim.lr_scheduler.OneCycleLR``/``CyclicLR`` cycle and Lightning's
  ``LearningRateMonitor`` logs; MoMo-Adam's ``betas[0]`` is cycled as torch's Adam's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _momo_compiled as kernels
from ._base import (
    BETAS,
    DEFAULT_MAX_CONSECUTIVE_SKIPS,
    FINITE,
    FLAG,
    FRACTION,
    NONNEGATIVE,
    AdaptiveOptimizer,
    check_betas,
    check_range,
    checked,
    runtime_options,
    written_into,
)
from ._compiled import scalar
from ._directions import adam_denominators, adam_directions
from ._reduce import (
    accumulation_dtype,
    dot,
    pair_dot,
    sqnorm,
    sum_partials,
    tensor_extrema,
    work_dtype,
)
from ._scalars import Scalar, safe_div, smax, smin, where
from ._tensorlists import add_scaled_, divide_, group_by_device_and_dtype, multiply_

__all__ = ["MoMo", "MoMoAdam", "momo_following_bound", "momo_loss_model", "momo_lowered_bound", "momo_step_size"]

#: One param group with its parameters that have a gradient, and those gradients.
Group = tuple[dict[str, Any], list[Tensor], list[Tensor]]

#: Param-group key of the lower bound in use (``None`` before the first step: then ``lb``).
CURRENT_LB = "current_lb"
#: Param-group key counting the steps at which a loss average below ``lb`` lowered it.
LB_LOWERED = "lb_lowered"
#: Param-group key of the smallest bias-corrected loss average so far (``lb=None``'s rule).
LOSS_MIN = "loss_min"
#: Default of ``lb_fraction``: with ``lb=None`` the bound follows ``0.95·`` the lowest loss average
#: (the best of 0.5, 0.75, 0.9, 0.95 on the character-level language model; docs/algorithms.md §1.4).
DEFAULT_LB_FRACTION = 0.95
#: MoMo's param-group key of the β the last step used (``None`` before the first step: the constructor's).
BETA_USED = "beta_used"


# --------------------------------------------------------------------------- the scalar rules


def momo_loss_model(
    loss_avg: float, gamma: float, loss: float, gx: float, beta: float, *, restart: bool
) -> tuple[float, float]:
    """The loss model after a step: ``f̄ ← β·f̄ + (1−β)·f`` and ``γ ← β·γ + (1−β)·⟨g, x⟩``.

    ``restart``: the averages start at the values themselves (``f̄ = f``, ``γ = ⟨g, x⟩``), MoMo's
    first step without bias correction (docs/algorithms.md §1 step 1).

    >>> momo_loss_model(0.0, 0.0, 2.0, 4.0, 0.5, restart=False)
    (1.0, 2.0)
    >>> momo_loss_model(0.0, 0.0, 2.0, 4.0, 0.5, restart=True)
    (2.0, 4.0)
    """
    decay, weight = (0.0, 1.0) if restart else (beta, 1.0 - beta)
    return decay * loss_avg + weight * loss, decay * gamma + weight * gx


def momo_step_size(
    *,
    lr: float,
    weight_decay: float,
    loss_avg: float,
    gamma: float,
    d_dot_x: Scalar,
    d_sqnorm: Scalar,
    rho: float,
    lb: Scalar,
    lb_floor: float,
    estimate_lb: bool,
) -> tuple[Scalar, Scalar]:
    """One param group's MoMo step size τ and the (possibly updated) lower bound.

    docs/algorithms.md §1 step 5: the lower-bound reset, the capped Polyak step
    ``τ = min(lr/ρ, [c·(f̄ − ρ·lb) + ⟨d, x⟩ − c·γ]₊ / ‖d‖²)`` (0 when ``‖d‖² = 0``), and the
    online lower-bound estimate (``estimate_lb``).  Works on floats and on 0-d tensors.

    >>> momo_step_size(lr=1.0, weight_decay=0.0, loss_avg=2.0, gamma=0.0, d_dot_x=0.0,
    ...                d_sqnorm=4.0, rho=1.0, lb=0.0, lb_floor=0.0, estimate_lb=False)
    (0.5, 0.0)
    """
    c = 1.0 + lr * weight_decay
    if estimate_lb:
        cap = c * loss_avg + d_dot_x - c * gamma
        lb = where(cap < c * rho * lb, smax(cap / (2.0 * c * rho), lb_floor), lb)
    numerator = smax(c * (loss_avg - rho * lb) + d_dot_x - c * gamma, 0.0)
    tau = smin(lr / rho, safe_div(numerator, d_sqnorm))
    if estimate_lb:
        lb = smax((loss_avg + d_dot_x - gamma - 0.5 * tau * d_sqnorm) / rho, lb_floor)
    return tau, lb


def momo_following_bound(loss_min: float, fraction: float) -> float:
    """The lower bound of ``lb=None``: ``m − (1 − fraction)·|m|``, ``m`` the lowest loss average so far.

    That is ``fraction·m`` for a non-negative loss, and always at most ``m``: the bound follows the
    loss down, a fixed share below the best average the run has reached (docs/algorithms.md §1.4).
    ``fraction = 0`` gives 0 for a non-negative loss: the paper's ``lb = 0``.

    >>> momo_following_bound(2.0, 0.95), momo_following_bound(-2.0, 0.5)
    (1.9, -3.0)
    """
    return loss_min - (1.0 - fraction) * abs(loss_min)


def momo_lowered_bound(loss_avg: float, rho: float, lb: float) -> float | None:
    """The lower bound once the loss average is below ``lb``: ``2·m − lb``; ``None`` while ``m ≥ lb``.

    ``m = f̄/ρ`` is the (bias-corrected) loss average, a weighted mean of the losses seen, so it
    is below ``lb`` only if some loss was: ``lb`` is then no lower bound, and the Polyak step
    toward it would be 0 at every step.  The new bound lies as far below ``m`` as ``m`` fell below
    ``lb`` (docs/algorithms.md §1.4): it follows the loss down by the amounts the loss shows,
    never by a guessed scale, which keeps the step sizes those of a bound just below the losses.

    >>> momo_lowered_bound(-0.5, 1.0, 0.0)
    -1.0
    >>> momo_lowered_bound(0.5, 1.0, 0.0) is None
    True
    """
    below, lowered = _lowered_bound(loss_avg / rho, lb)
    return lowered if below else None


def _lowered_bound(mean: Scalar, lb: Scalar) -> tuple[Scalar, Scalar]:
    """Whether the loss average ``mean`` (bias-corrected) is below ``lb``, and the bound after this
    step: ``2·mean − lb`` then, ``lb`` otherwise (:func:`momo_lowered_bound`; numbers or 0-d tensors)."""
    below = mean < lb
    return below, where(below, 2.0 * mean - lb, lb)


# --------------------------------------------------------------------------- the eager bodies
#
# Each forms a group's new averages next to the state and returns them with the sums the gate reads
# (``⟨g, x⟩``, ``⟨d', x⟩``, ``‖d'‖²`` or ``⟨d', u⟩``, and MoMo-Adam's largest ``v'``), so that a step
# whose outcome is not finite is skipped before anything is stored; the class stores them after the
# gate.  Chosen once per group:
#
# * multi-tensor (``foreach`` on an accelerator): ``torch._foreach_*`` kernels writing new tensors
#   (the caching allocator reuses their memory), then the sums of :mod:`._reduce`;
# * one tensor at a time (the CPU, and ``foreach=False``): the new averages go into ``outs``,
#   buffers kept between steps (allocating parameter-sized tensors costs the CPU more than the
#   arithmetic), and each tensor's partial sums are taken while it is in cache.
#
# The averages are the ``lerp`` of :func:`~._directions.momentum_` (dampening = β) and the
# operations of :func:`~._directions.adam_moments_`, in its order, written to new tensors.


def _start(value: Tensor | None, param: Tensor) -> Tensor:
    """A stored average, or 0 for one not stored yet (an average starts at 0)."""
    return torch.zeros_like(param, memory_format=torch.preserve_format) if value is None else value


def _single_tensor_momo(
    avgs: list[Tensor | None],
    grads: list[Tensor],
    params: list[Tensor],
    weight: float,
    outs: list[Tensor],
    device: torch.device,
) -> tuple[list[Tensor], list[Tensor]]:
    """``d' = d + weight·(g − d)`` into ``outs``; ``[⟨g, x⟩, ⟨d', x⟩, ‖d'‖²]`` (0-d, on ``device``)."""
    acc, new, partials = accumulation_dtype(device), [], []
    for d, g, x, out in zip(avgs, grads, params, outs):
        d_new = torch.lerp(_start(d, x), g, weight, out=out)
        new.append(d_new)
        partials.append(torch.stack([pair_dot(g, x, acc), pair_dot(d_new, x, acc), pair_dot(d_new, d_new, acc)]))
    return new, sum_partials([torch.stack(partials, dim=1)], device)


def _multi_tensor_momo(
    avgs: list[Tensor | None], grads: list[Tensor], params: list[Tensor], weight: float, device: torch.device
) -> tuple[list[Tensor], list[Tensor]]:
    """As :func:`_single_tensor_momo`, the averages as new tensors from multi-tensor kernels."""
    new = [_start(d, x) for d, x in zip(avgs, params)]
    for ds, gs, index in group_by_device_and_dtype(list(new), grads, list(range(len(new)))):
        for i, d in zip(index, torch._foreach_lerp(ds, gs, weight)):
            new[i] = d
    return new, [dot(grads, params, device), dot(new, params, device), sqnorm(new, device)]


def _second_moment(v: Tensor, g: Tensor, weight: float, out: Tensor) -> tuple[Tensor, Tensor]:
    """Adam's ``v' = v·(1 − weight) + weight·g²`` into ``out``, and ``v'`` for the denominator: the
    same tensor, except for 16-bit ``v``, whose ``v'`` is computed in float32 and rounded once into
    ``out`` (float16 flushes a small ``v'`` to 0, where ``d/(√v' + eps)`` would be ``d/eps``)."""
    if v.dtype.itemsize == 2:
        wide = torch.mul(v.float(), 1.0 - weight).addcmul_(g, g, value=weight)
        return out.copy_(wide), wide
    new = torch.mul(v, 1.0 - weight, out=out).addcmul_(g, g, value=weight)
    return new, new


def _single_tensor_momo_adam(
    avgs: list[Tensor | None],
    sq_avgs: list[Tensor | None],
    grads: list[Tensor],
    params: list[Tensor],
    weights: tuple[float, float],
    eps: float,
    outs: tuple[list[Tensor], list[Tensor], list[Tensor]],
    device: torch.device,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Adam's moments into ``outs`` (d', v'; the directions ``u = d'/(√v' + eps)`` into the third),
    and ``[⟨g, x⟩, ⟨d', x⟩, ⟨d', u⟩, max v']`` (0-d, on ``device``; ``max v'`` as stored).  The
    caller folds Adam's bias correction √(1 − β2^k) into ``eps`` and its scalars.

    One tensor at a time, each quantity taken while the tensor is in cache; the denominator and
    the direction are :func:`~._directions.adam_denominators` and ``adam_directions``' operations
    written out (called per tensor, their bookkeeping costs more than ResNet's small tensors' arithmetic).
    """
    acc, ds, vs, us, partials = accumulation_dtype(device), [], [], [], []
    for d, v, g, x, out_d, out_v, out_u in zip(avgs, sq_avgs, grads, params, *outs):
        d_new = torch.lerp(_start(d, x), g, weights[0], out=out_d)
        v_new, wide = _second_moment(_start(v, x), g, weights[1], out_v)
        u = torch.div(d_new, torch.sqrt(wide, out=out_u).add_(eps), out=out_u)
        ds.append(d_new)
        vs.append(v_new)
        us.append(u)
        sums = [pair_dot(g, x, acc), pair_dot(d_new, x, acc), pair_dot(d_new, u, acc), _largest(v_new, acc)]
        partials.append(torch.stack(sums))
    return ds, vs, us, sum_partials([torch.stack(partials, dim=1)], device)


def _multi_tensor_momo_adam(
    avgs: list[Tensor | None],
    sq_avgs: list[Tensor | None],
    grads: list[Tensor],
    params: list[Tensor],
    weights: tuple[float, float],
    eps: float,
    device: torch.device,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """As :func:`_single_tensor_momo_adam`, the moments and directions as new tensors."""
    ds = [_start(d, x) for d, x in zip(avgs, params)]
    starts = [_start(v, x) for v, x in zip(sq_avgs, params)]
    vs, wides = list(starts), list(starts)
    for ms, sq, gs, index in group_by_device_and_dtype(list(ds), starts, grads, list(range(len(ds)))):
        narrow = sq[0].dtype.itemsize == 2
        wide = torch._foreach_mul([v.float() for v in sq] if narrow else sq, 1.0 - weights[1])
        torch._foreach_addcmul_(wide, gs, gs, weights[1])
        for i, d, w in zip(index, torch._foreach_lerp(ms, gs, weights[0]), wide):
            ds[i], wides[i], vs[i] = d, w, w.to(starts[i].dtype) if narrow else w
    us = adam_directions(ds, adam_denominators(wides, 1.0, eps, foreach=True), foreach=True)
    v_max = tensor_extrema(vs, device)[1]
    return ds, vs, us, [dot(grads, params, device), dot(ds, params, device), dot(ds, us, device), v_max]


def _largest(t: Tensor, acc: torch.dtype) -> Tensor:
    """The largest element of ``t`` (NaN if one is), a 0-d ``acc`` tensor: one tensor's part of
    :func:`~._reduce.tensor_extrema`, taken while the tensor is in cache (0 for an empty shard)."""
    return t.amax().to(acc) if t.numel() else t.new_zeros((), dtype=acc)


# --------------------------------------------------------------------------- shared by both classes


def _flatten(groups: list[Group]) -> tuple[list[Tensor], list[Tensor]]:
    """Every group's parameters with a gradient, and those gradients."""
    return [p for _, ps, _ in groups for p in ps], [g for _, _, gs in groups for g in gs]


def _descend_(groups: list[Group], directions: list[list[Tensor]], taus: list[Scalar]) -> None:
    """Per group ``x ← (x − τ·u) / c`` with ``c = 1 + lr·wd`` (proximal weight decay), or, with
    ``decoupled_weight_decay``, ``x ← x·(1 − lr·wd) − τ·u``."""
    for (group, params, _), direction, tau in zip(groups, directions, taus):
        shrink = group["lr"] * group["weight_decay"]
        decoupled = group.get("decoupled_weight_decay", False)
        foreach = group["foreach"]
        if shrink != 0 and decoupled:
            multiply_(params, 1.0 - shrink, foreach=foreach)
        add_scaled_(params, direction, -tau, foreach=foreach)
        if shrink != 0 and not decoupled:
            divide_(params, 1.0 + shrink, foreach=foreach)


def _optional_bound(owner: str, name: str, value: Any) -> float | None:
    """``lb``: ``None`` (follow the losses) or a finite number."""
    return None if value is None else FINITE(owner, name, value)


class _MoMoBase(AdaptiveOptimizer):
    """The loss model, the per-group Polyak step sizes and the lower bound, shared by both methods."""

    requires_loss = True
    group_state: ClassVar[dict[str, Any]] = {
        **AdaptiveOptimizer.group_state,
        "loss_avg": 0.0,
        "gamma": 0.0,
        CURRENT_LB: None,
        LB_LOWERED: 0,
        LOSS_MIN: None,
    }

    #: One tensor at a time on the CPU (buffers kept between steps spare the allocations there).
    single_tensor_on_cpu: ClassVar[bool] = True
    #: The gate's values computed from the step's outcome (the new averages and the parameters).
    outcome_scalars: ClassVar[frozenset[str]] = frozenset({"d_dot_x", "d_sqnorm", "d_dot_u", "v_max"})

    def _init_transient(self) -> None:
        super()._init_transient()
        self._warned_lb = False
        #: Per parameter, by name, the buffers the one-tensor-at-a-time eager body writes new values
        #: into (:func:`_single_tensor_momo`): mostly the tensors the last step replaced.  Not state.
        self._spares: dict[Tensor, dict[str, Tensor]] = {}

    def _outs(self, name: str, params: list[Tensor], *, foreach: bool, wide: bool = False) -> list[Tensor] | None:
        """The buffers a group's eager step writes a new value into, one per parameter (shaped like
        it; in :func:`~._reduce.work_dtype` if ``wide``): ``None`` for the multi-tensor body (on
        accelerators), else each parameter's spare, kept between steps."""
        if not params or (foreach and self._uses_foreach({"foreach": foreach}, params)):
            return None
        outs = []
        for p in params:
            spares, dtype = self._spares.setdefault(self._parameter_of(p), {}), work_dtype(p.dtype) if wide else p.dtype
            spare = spares.get(name)
            if spare is None or (spare.shape, spare.dtype, spare.device) != (p.shape, dtype, p.device):
                spare = spares[name] = torch.empty_like(p, dtype=dtype, memory_format=torch.preserve_format)
            outs.append(spare)
        return outs

    def _store(self, key: str, params: list[Tensor], values: list[Tensor]) -> None:
        """``state[p][key] ← value`` (after the gate); a replaced tensor becomes ``p``'s spare if it has one."""
        for p, value in zip(params, values):
            state, spares = self.state[p], self._spares.get(self._parameter_of(p))
            old, state[key] = state.get(key), value
            if spares is not None and key in spares:
                if old is None:
                    del spares[key]
                else:
                    spares[key] = old

    def _state_tensor(self, p: Tensor, key: str) -> Tensor:
        """``state[p][key]``, stored as zeros (an average of nothing) if it is not there yet."""
        state = self.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state[key]

    def _store_on_device(self, key: str, params: list[Tensor], values: list[Tensor], ok: Tensor) -> None:
        """``state[p][key] ← value where ok`` (a ``capturable`` step), :func:`~._base.written_into` the
        tensor already there; a state not stored yet starts at 0, the average of nothing."""
        for p, value in zip(params, values):
            state = self.state[p]
            old = state.get(key)
            state[key] = written_into(old, torch.where(ok, value, 0.0 if old is None else old))

    def _loss_beta(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def set_lower_bound(self, lb: float) -> None:
        """Use ``lb`` as the loss's lower bound from the next step on (between two steps).

        It becomes every group's ``lb`` option (with ``estimate_lb`` the floor of the online
        estimate) and the bound in use: raised to at least ``lb`` when it is estimated online,
        replaced otherwise.
        """
        check_range(type(self).__name__, "lb", lb)
        lb = float(lb)
        for group in self.param_groups:
            group["lb"] = lb
        current = self._shared(CURRENT_LB)
        if current is None:  # before the first step the bound in use is `lb`
            return
        if self._shared("estimate_lb"):
            current = torch.clamp(current, min=lb) if isinstance(current, Tensor) else max(float(current), lb)
        else:
            current = torch.full_like(current, lb) if isinstance(current, Tensor) else lb
        self._set_shared(**{CURRENT_LB: current})

    def _legacy_group_state(self, legacy: dict[str, Any]) -> dict[str, Any]:
        """Release 0.1 kept the bound in use as ``state["global"]["lb"]``: it is :data:`CURRENT_LB` now."""
        legacy = dict(legacy)
        if "lb" in legacy:
            legacy[CURRENT_LB] = legacy.pop("lb")
        return super()._legacy_group_state(legacy)

    def _check_shared_options(self) -> None:
        """The shared options as a scheduler may have left them: equal in every group, and valid."""
        first = self.param_groups[0]
        for name in self.shared_options:
            for group in self.param_groups[1:]:
                if isinstance(group[name], Tensor) or isinstance(first[name], Tensor):
                    continue  # a capturable optimizer's lowered `lb`: its state, made equal by every step
                if group[name] != first[name]:
                    raise ValueError(
                        f"{self._name}: `{name}` is shared by all param groups (it enters scalars computed over "
                        f"the whole model), but the groups hold {first[name]!r} and {group[name]!r} (changed by "
                        "a scheduler or by hand?); give every group the same value"
                    )
        if "betas" in first:
            check_betas(self._name, first["betas"])

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        self._check_shared_options()
        groups = [(g, *self._params_and_grads(g)) for g in self.param_groups]
        if not any(params for _, params, _ in groups):
            return
        if self._shared("capturable"):
            self._device_group_state(loss.device)
        else:
            self._host_group_state()
        if self._shared("compiled"):
            self._compiled_step(loss, groups)
        elif self._shared("capturable"):
            self._device_step(loss, groups)
        else:
            self._eager_step(loss, groups)

    def _eager_step(self, loss: Tensor, groups: list[Group]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compiled_step(self, loss: Tensor, groups: list[Group]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _device_step(self, loss: Tensor, groups: list[Group]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _device_step_sizes(
        self, groups: list[Group], values: dict[str, Tensor], ok: Tensor, d_sqnorm: Tensor, rho: Scalar, restart: Scalar
    ) -> list[Tensor]:
        """The ``capturable`` step's scalars, all on the device: the loss model, the lower bound and
        each group's τ, as the host-side step computes them (:func:`momo_loss_model`,
        :func:`momo_lowered_bound`'s rule, :func:`momo_following_bound`, :func:`momo_step_size`),
        every new value kept only ``where`` the gate's values are finite (``ok``); the returned τ
        are 0 where they are not.  ``restart``: a 0-d bool tensor (or ``False``)."""
        old = {key: self._shared(key) for key in ("loss_avg", "gamma", "lb", CURRENT_LB, LOSS_MIN, LB_LOWERED)}
        beta, loss, gx = self._loss_beta(), values["loss"], values["gx"]
        averaged = momo_loss_model(old["loss_avg"], old["gamma"], loss, gx, beta, restart=False)
        restarted = momo_loss_model(old["loss_avg"], old["gamma"], loss, gx, beta, restart=True)
        loss_avg, gamma = (where(restart, r, a) for r, a in zip(restarted, averaged))
        mean, new = loss_avg / rho, {"loss_avg": loss_avg, "gamma": gamma}
        if self._shared("lb") is None:
            new[LOSS_MIN] = mean if old[LOSS_MIN] is None else smin(old[LOSS_MIN], mean)
            floor = momo_following_bound(new[LOSS_MIN], self._shared("lb_fraction"))
        else:  # a loss average below lb lowers it to 2·m − lb (momo_lowered_bound)
            below, floor = _lowered_bound(mean, old["lb"])
            new["lb"] = floor
            new[LB_LOWERED] = old[LB_LOWERED] + below.to(torch.int64)
        current = old[CURRENT_LB]  # None or +inf: not known yet (before a step was taken)
        estimated = floor if current is None else torch.where(current == math.inf, floor, current)
        lb = estimated if self._shared("estimate_lb") else floor
        taus = []
        for group, _, _ in groups:
            tau, lb = momo_step_size(
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                loss_avg=loss_avg,
                gamma=gamma,
                d_dot_x=values["d_dot_x"],
                d_sqnorm=d_sqnorm,
                rho=rho,
                lb=lb,
                lb_floor=floor,
                estimate_lb=group["estimate_lb"],
            )
            tau = torch.where(ok, tau, 0.0)
            previous = group.get("effective_lr")
            kept = previous if isinstance(previous, Tensor) else torch.zeros_like(tau)
            self._record_on_device(group, effective_lr=torch.where(ok, tau, kept), tau=torch.where(ok, tau, kept))
            self._record_on_device(group, lower_bound=torch.where(ok, lb, math.inf if current is None else current))
            taus.append(tau)
        new[CURRENT_LB] = lb
        kept = {key: math.inf if old[key] is None else old[key] for key in new}
        self._set_shared_on_device(**{key: torch.where(ok, value, kept[key]) for key, value in new.items()})
        self._count_device_step(ok)
        return taus

    def _advance_loss_model(self, values: dict[str, Any], *, restart: bool) -> None:
        """``k ← k+1`` and the loss model's averages (:func:`momo_loss_model`) from the gate's values."""
        loss_avg, gamma = momo_loss_model(
            self._shared("loss_avg"),
            self._shared("gamma"),
            values["loss"],
            values["gx"],
            self._loss_beta(),
            restart=restart,
        )
        self._set_shared(step=self._shared("step") + 1, loss_avg=loss_avg, gamma=gamma)

    def _floor(self, rho: float) -> float:
        """This step's floor of the lower bound: ``lb`` (lowered if the loss average fell below it),
        or with ``lb=None`` :func:`momo_following_bound` of the lowest loss average so far, which
        is then also the bound in use (unless it is estimated online)."""
        if self._shared("lb") is not None:
            self._lower_bound_below_loss(rho)
            return self._shared("lb")
        loss_avg, previous = self._shared("loss_avg") / rho, self._shared(LOSS_MIN)
        loss_min = loss_avg if previous is None else smin(previous, loss_avg)
        floor = momo_following_bound(loss_min, self._shared("lb_fraction"))
        shared: dict[str, Any] = {LOSS_MIN: loss_min}
        if not self._shared("estimate_lb"):
            shared[CURRENT_LB] = floor
        self._set_shared(**shared)
        return floor

    def _lower_bound_below_loss(self, rho: float) -> None:
        """Lower ``lb`` (:func:`momo_lowered_bound`) if the loss average fell below it; count and warn."""
        floor, loss_avg = self._shared("lb"), self._shared("loss_avg")
        lowered = momo_lowered_bound(loss_avg, rho, floor)
        if lowered is None:
            return
        shared: dict[str, Any] = {"lb": lowered, LB_LOWERED: self._shared(LB_LOWERED) + 1}
        if not self._shared("estimate_lb"):
            shared[CURRENT_LB] = lowered
        self._set_shared(**shared)
        self._warn_lowered(f"the loss average {loss_avg / rho:.6g} is below the lower bound lb={floor:.6g}", lowered, 9)

    def _warn_lowered(self, what: str, lowered: Scalar, stacklevel: int) -> None:
        """Warn, once, that ``lb`` was lowered (``what`` happened) to ``lowered``."""
        if not self._warned_lb:
            self._warned_lb = True
            warnings.warn(
                f"{self._name}: {what}, where the step size would be 0 for ever; lb is lowered to {float(lowered):.6g} "
                "(and again whenever the loss average falls below it, counted in param_groups[i]['lb_lowered']). "
                "Pass an `lb` below every loss value, use `estimate_lb=True`, `lb=None` (the bound follows the "
                "losses), or, with AdaptiveLRCallback(lb_fraction=...), a smaller `lb_fraction`.",
                RuntimeWarning,
                stacklevel=stacklevel,  # the caller of step()
            )

    def sync_warnings(self) -> None:
        """:meth:`~._base.AdaptiveOptimizer.sync_warnings`, and the warning that ``lb`` was lowered."""
        super().sync_warnings()
        lowered = self._shared(LB_LOWERED)
        if self._capturable and isinstance(lowered, Tensor) and not self._warned_lb and int(lowered) > 0:
            self._warn_lowered("the loss average fell below the lower bound", self._shared("lb"), 3)

    def _step_sizes(self, groups: list[Group], d_dot_x: float, d_sqnorm: float, rho: float) -> list[Scalar]:
        """Per group τ by :func:`momo_step_size` (recorded); the groups update the lower bound in turn."""
        floor = self._floor(rho)
        lb = self._shared(CURRENT_LB)
        taus = []
        for group, _, _ in groups:
            tau, lb = momo_step_size(
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                loss_avg=self._shared("loss_avg"),
                gamma=self._shared("gamma"),
                d_dot_x=d_dot_x,
                d_sqnorm=d_sqnorm,
                rho=rho,
                lb=floor if lb is None else lb,
                lb_floor=floor,
                estimate_lb=group["estimate_lb"],
            )
            self._record(group, effective_lr=tau, tau=tau, lower_bound=lb)
            taus.append(tau)
        self._set_shared(**{CURRENT_LB: lb})
        return taus


# --------------------------------------------------------------------------- MoMo


class MoMo(_MoMoBase):
    r"""MoMo: SGD with momentum whose step size is the truncated Polyak step on a momentum model.

    Schaipp et al., "MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024;
    docs/algorithms.md §1.  Per step, with ``k`` the step count::

        d ← β·d + (1−β)·g,   f̄ ← β·f̄ + (1−β)·f,   γ ← β·γ + (1−β)·⟨g, x⟩
        ρ = 1 − β^k with bias_correction, else 1
        τ = min(lr/ρ, [c·(f̄ − ρ·lb) + ⟨d, x⟩ − c·γ]₊ / ‖d‖²),   x ← (x − τ·d) / c

    Without bias correction the three averages start at the first step's values; with it, at 0.
    Needs the mini-batch loss each step (``step(loss=...)``, the closure's return value, or
    :class:`~lightning_adaptive_lr.AdaptiveLRCallback`).  With a binding cap (``lr`` small) it is
    exactly ``torch.optim.SGD(momentum=beta, dampening=beta)``.

    Args:
        params: parameters or param groups.  Groups may differ in ``lr`` and ``weight_decay``.
        lr: the cap on the step size (MoMo is robust to it; the paper's default is 1).
        beta: momentum of the loss, gradient and ``⟨g, x⟩`` averages, in [0, 1).  Shared by groups.
            Also held as ``momentum`` in every param group (see below).
        weight_decay: L2 regularization handled by the proximal (implicit) update ``x / (1 + lr·wd)``.
        lb: lower bound of the loss (0 for most losses); with ``estimate_lb`` the starting estimate
            and a floor.  Change it between steps with :meth:`set_lower_bound`.  If the loss
            average falls below it, it is lowered (docs/algorithms.md §1.4).  ``None``: the bound
            follows the losses, ``lb_fraction`` of the lowest loss average so far
            (:func:`momo_following_bound`): for losses whose floor is far above 0 (language
            models), where ``lb=0`` makes the cap decide every step.
        bias_correction: start the averages at zero and correct by ``1 − beta^k`` (otherwise they
            start at the first values).
        estimate_lb: estimate the lower bound online (MoMo*), useful when the loss does not reach 0.
        lb_fraction: with ``lb=None``, the bound is ``m − (1 − lb_fraction)·|m|`` for the lowest
            bias-corrected loss average ``m`` so far, in [0, 1) (0: the paper's ``lb=0`` for a
            non-negative loss).  Ignored when ``lb`` is a number.
        foreach: use the multi-tensor (``torch._foreach_*``) path on accelerators; ``False``
            updates tensor by tensor (as the CPU always does: see the module's eager bodies).
        average_across_ranks: average the loss across ``torch.distributed`` ranks (one collective
            per step) so replicas stay identical.
        compiled: run the step as two ``torch.compile``\ d (TorchInductor) passes per tensor
            bucket (:mod:`._momo_compiled`): the three sums from the state before the step
            (read-only), then ``d`` and ``x`` written in one loop; 8 instead of 11 parameter-sized
            reads and writes.  The same math and the same single device-to-host synchronization;
            only the partial sums are added in another order.  Compiles once per set of parameter
            shapes at the first step and needs a working Inductor (a C++ compiler on CPU, Triton
            on GPU): if it fails, ``step()`` raises a RuntimeError naming the cause before any
            state changes; there is no silent fallback.  Speed: see docs/benchmarks.md.
        capturable: keep every decision of the step on the device (docs/algorithms.md, "The
            device-side step"): the gate, the loss model, the lower bound and τ are 0-d device
            tensors, a step whose values are not finite is undone with ``torch.where``, and the
            state is updated in place, so the step never waits for the host and can be captured
            in a CUDA graph (after a few eager steps).  Skips are counted on the device and
            reported by :meth:`sync_warnings` (which :class:`~lightning_adaptive_lr.AdaptiveLRMonitor`
            calls when it logs).  Hyperparameters (``lr``, β, ...) are read as Python numbers at
            each call: a graph keeps the values it was captured with.  With ``compiled=True``
            it runs the compiled passes (their update pass takes the gate's decision as a
            tensor): the fewest memory passes and no host read.
        max_consecutive_skips: raise after this many skipped steps in a row (``None``: never); see
            :class:`~._base.AdaptiveOptimizer`.

    **Momentum schedules.**  Every param group holds ``momentum`` equal to ``beta``: the key that
    ``OneCycleLR``/``CyclicLR`` (``cycle_momentum=True``) write and Lightning's
    ``LearningRateMonitor(log_momentum=True)`` reads.  A step uses ``momentum`` if it changed since
    the last step, otherwise ``beta`` (so changing either works; if both changed, ``momentum``
    wins), and then sets both to the value used.  Like ``beta``, it must be equal in every group.

    After each step every param group holds ``effective_lr`` (= ``tau``, the step size used) and
    ``lower_bound`` (the lower bound in use after this group; ``lb`` stays the floor).  The
    optimizer-wide state is kept, equal, in every param group: ``step`` (k), ``skipped_steps``,
    ``loss_avg`` (f̄), ``gamma`` (γ), ``current_lb`` (the lower bound in use; ``None`` before
    the first step, meaning ``lb``), ``lb_lowered`` (how many steps lowered ``lb``) and
    ``beta_used`` (the β of the last step).  ``state[p]["grad_avg"]`` is ``d``.

    Example:
        >>> import torch
        >>> from lightning_adaptive_lr import MoMo
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = MoMo(model.parameters(), lr=1.0)
        >>> loss = model(torch.ones(4, 3)).pow(2).mean()
        >>> loss.backward()
        >>> _ = optimizer.step(loss=loss)
        >>> 0.0 <= optimizer.param_groups[0]["effective_lr"] <= 1.0
        True
    """

    shared_options = ("beta", "momentum", "lb", "bias_correction", "estimate_lb", "lb_fraction", "compiled", "capturable")
    group_state: ClassVar[dict[str, Any]] = {**_MoMoBase.group_state, BETA_USED: None}
    host_group_state = frozenset({BETA_USED})

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        lb: float | None = 0.0,
        bias_correction: bool = False,
        estimate_lb: bool = False,
        lb_fraction: float = DEFAULT_LB_FRACTION,
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
        compiled: bool = False,
        capturable: bool = False,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        defaults = checked(
            type(self).__name__, locals(), lr=NONNEGATIVE, beta=FRACTION, weight_decay=NONNEGATIVE, lb=_optional_bound,
            bias_correction=FLAG, estimate_lb=FLAG, lb_fraction=FRACTION, compiled=FLAG, capturable=FLAG,
        )  # fmt: skip
        defaults["momentum"] = defaults["beta"]
        super().__init__(params, defaults, **runtime_options(locals()))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group that sets one of ``beta`` and ``momentum`` gets the other alike (both: equal)."""
        if "beta" in param_group and "momentum" not in param_group:
            param_group["momentum"] = param_group["beta"]
        elif "momentum" in param_group and "beta" not in param_group:
            param_group["beta"] = param_group["momentum"]
        elif "beta" in param_group and param_group["beta"] != param_group["momentum"]:
            raise ValueError(
                f"{self._name}: `momentum` is another name for `beta`; a param group gave both, "
                f"{param_group['beta']!r} and {param_group['momentum']!r}"
            )
        super().add_param_group(param_group)

    def _convert_legacy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """State dicts saved before ``momentum`` existed: it starts equal to ``beta``."""
        converted = super()._convert_legacy(state_dict)
        for group in converted["param_groups"]:
            group.setdefault("momentum", group["beta"])
        return converted

    def _check_shared_options(self) -> None:
        """β from ``momentum`` (if a scheduler changed it since the last step) or ``beta``: into both keys."""
        used = self._shared(BETA_USED)
        last = self.defaults["beta"] if used is None else used  # before the first step: the constructor's
        for group in self.param_groups:
            momentum = group.setdefault("momentum", group["beta"])
            key = "momentum" if momentum != last else "beta"
            check_range(self._name, key, group[key], 0.0, 1.0, high_open=True)
            group["beta"] = group["momentum"] = group[key]
        betas = [group["beta"] for group in self.param_groups]
        if any(beta != betas[0] for beta in betas):
            raise ValueError(
                f"{self._name}: `beta` (`momentum`) is shared by all param groups (it averages the loss of the "
                f"whole model), but the groups hold {betas} (set by a scheduler with per-group momenta?); give "
                "every group the same value"
            )
        super()._check_shared_options()

    def _advance_loss_model(self, values: dict[str, Any], *, restart: bool) -> None:
        super()._advance_loss_model(values, restart=restart)
        self._set_shared(**{BETA_USED: self._shared("beta")})

    def _loss_beta(self) -> float:
        return self._shared("beta")

    def _this_step(self) -> tuple[bool, float]:
        """For the step about to be taken (``k = step + 1``): whether its averages start at its own
        values (the first step without bias correction), and ``ρ = 1 − β^k`` (1 without bias correction)."""
        k, beta, bias_correction = self._shared("step") + 1, self._shared("beta"), self._shared("bias_correction")
        return k == 1 and not bias_correction, 1.0 - beta**k if bias_correction else 1.0

    def _eager_step(self, loss: Tensor, groups: list[Group]) -> None:
        restart, rho = self._this_step()
        # A restart takes the gradient whole into the zero average (the first value itself).
        weight, device = 1.0 if restart else 1.0 - self._shared("beta"), loss.device
        directions, sums = [], []
        for group, ps, gs in groups:
            if not ps:
                directions.append([])
                continue
            avgs = [self.state.get(p, {}).get("grad_avg") for p in ps]
            outs = self._outs("grad_avg", ps, foreach=group["foreach"])
            if outs is None:
                ds, group_sums = _multi_tensor_momo(avgs, gs, ps, weight, device)
            else:
                ds, group_sums = _single_tensor_momo(avgs, gs, ps, weight, outs, device)
            directions.append(ds)
            sums.append(group_sums)
        gx, d_dot_x, d_sqnorm = (sum(column) for column in zip(*sums))
        values = self._gate(loss=loss, gx=gx, d_dot_x=d_dot_x, d_sqnorm=d_sqnorm)
        if values is None:
            return
        self._advance_loss_model(values, restart=restart)
        self._store("grad_avg", _flatten(groups)[0], [d for ds in directions for d in ds])
        taus = self._step_sizes(groups, values["d_dot_x"], values["d_sqnorm"], rho)
        _descend_(groups, directions, taus)

    def _device_weights(self, device: torch.device) -> tuple[Scalar, Scalar, Scalar]:
        """:meth:`_this_step` on the device (``capturable``): the restart flag (a 0-d bool, or
        ``False`` with bias correction), ρ, and the weight of the new gradient in ``d``."""
        k = self._shared("step").to(accumulation_dtype(device)) + 1
        beta, bias_correction = self._shared("beta"), self._shared("bias_correction")
        restart = (k == 1) if not bias_correction else False
        rho = 1.0 - torch.pow(beta, k) if bias_correction else 1.0
        return restart, rho, where(restart, 1.0, 1.0 - beta)

    def _compiled_step(self, loss: Tensor, groups: list[Group]) -> None:
        name, (params, grads), device = type(self).__name__, _flatten(groups), loss.device
        on_device, beta = self._shared("capturable"), self._shared("beta")
        if on_device:  # the state exists from the first step on: the update pass writes it in place
            restart, rho, weight = self._device_weights(device)
            weight = scalar(weight, device)
            avgs = [self._state_tensor(p, "grad_avg") for p in params]
        else:
            restart, rho = self._this_step()
            # A restart takes the gradient whole into the zero average: the eager path's copy.
            weight = scalar(1.0 if restart else 1.0 - beta)
            avgs = [kernels.state_or_zeros(self.state.get(p, {}), p, "grad_avg") for p in params]
        partials = kernels.run_sums(name, kernels.momo_sums, (avgs, grads, params), 3, weight)
        gx, d_dot_x, d_sqnorm = sum_partials(partials, device)
        if on_device:
            values, ok = self._device_gate(loss=loss, gx=gx, d_dot_x=d_dot_x, d_sqnorm=d_sqnorm)
            taus = self._device_step_sizes(groups, values, ok, values["d_sqnorm"], rho, restart)
            self._set_shared(**{BETA_USED: beta})  # a host-side option: taken, skipped or not
            divisors = [torch.where(ok, 1.0 + group["lr"] * group["weight_decay"], 1.0) for group, _, _ in groups]
        else:
            host = self._gate(loss=loss, gx=gx, d_dot_x=d_dot_x, d_sqnorm=d_sqnorm)
            if host is None:
                return
            self._advance_loss_model(host, restart=restart)
            for p, d in zip(params, avgs):
                self.state[p].setdefault("grad_avg", d)
            taus = [scalar(tau) for tau in self._step_sizes(groups, host["d_dot_x"], host["d_sqnorm"], rho)]
            divisors = [scalar(1.0 + group["lr"] * group["weight_decay"]) for group, _, _ in groups]
            ok = scalar(True)
        for (group, ps, gs), tau, divisor in zip(groups, taus, divisors):
            ds = [self.state[p]["grad_avg"] for p in ps]
            kernels.run_on_buckets(name, kernels.momo_update, (ds, gs, ps), weight, tau, divisor, ok)

    def _device_step(self, loss: Tensor, groups: list[Group]) -> None:
        """``capturable``: the eager step's math with every decision on the device (no host read):
        the averages and parameters are replaced ``where`` the gate's values are finite."""
        (restart, rho, weight), beta = self._device_weights(loss.device), self._shared("beta")
        params, grads = _flatten(groups)
        avgs = [_start(self.state.get(p, {}).get("grad_avg"), p) for p in params]
        new = [torch.lerp(d, g, weight.to(d.dtype) if isinstance(weight, Tensor) else weight) for d, g in zip(avgs, grads)]
        device = loss.device
        values, ok = self._device_gate(
            loss=loss, gx=dot(grads, params, device), d_dot_x=dot(new, params, device), d_sqnorm=sqnorm(new, device)
        )
        taus = self._device_step_sizes(groups, values, ok, values["d_sqnorm"], rho, restart)
        self._set_shared(**{BETA_USED: beta})  # a host-side option: taken, skipped or not
        self._store_on_device("grad_avg", params, new, ok)
        for (group, ps, _), tau in zip(groups, taus):
            divisor = torch.where(ok, 1.0 + group["lr"] * group["weight_decay"], 1.0)
            for p in ps:
                p.sub_(self.state[p]["grad_avg"] * tau.to(p.dtype)).div_(divisor.to(p.dtype))


# --------------------------------------------------------------------------- MoMo-Adam


class MoMoAdam(_MoMoBase):
    r"""MoMo-Adam: the MoMo step size in Adam's preconditioned geometry.

    Schaipp et al., "MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024;
    docs/algorithms.md §1.  Always bias-corrected (all averages start at 0).  Per step::

        d, v: Adam's moments (β1, β2);   f̄, γ: averaged with β1;   ρ = 1 − β1^k
        Dn = √(v / (1 − β2^k)) + eps
        τ = min(lr/ρ, [c·(f̄ − ρ·lb) + ⟨d, x⟩ − c·γ]₊ / Σ d²/Dn),   x ← (x − τ·d/Dn) / c

    Args:
        params: parameters or param groups.  Groups may differ in ``lr``, ``weight_decay``, ``eps``.
        lr: the cap on the step size (default 1e-2, as in the paper).
        betas: ``(β1, β2)``: β1 averages the loss, gradient and ``⟨g, x⟩``; β2 the squared gradient.
            Shared by groups.  ``OneCycleLR``/``CyclicLR`` with ``cycle_momentum=True`` cycle β1,
            as for ``torch.optim.Adam``; each step uses the ``betas`` the groups hold then.
        eps: added to the square root of the second moment (outside the root, as Adam).
        weight_decay: weight decay; proximal ``x / (1 + lr·wd)`` by default.
        lb: lower bound of the loss; with ``estimate_lb`` the starting estimate and a floor.
            Change it between steps with :meth:`set_lower_bound`.  If the loss average falls
            below it, it is lowered (docs/algorithms.md §1.4).  ``None``: the bound follows the
            losses (see :class:`MoMo`; recommended for language models).
        estimate_lb: estimate the lower bound online.
        lb_fraction: with ``lb=None``, how close below the lowest loss average the bound follows
            (see :class:`MoMo`).
        decoupled_weight_decay: shrink ``x ← x·(1 − lr·wd)`` before the step (AdamW style) instead
            of the proximal division.  ``τ`` keeps ``c = 1 + lr·wd`` in both modes, as the authors do.
        foreach: use the multi-tensor path on accelerators (the CPU goes tensor by tensor).
        average_across_ranks: average the loss across ``torch.distributed`` ranks.
        compiled: run the step as two ``torch.compile``\ d (TorchInductor) passes per tensor
            bucket (:mod:`._momo_compiled`): the three sums from the state before the step
            (read-only; the new moments and the direction are formed in registers), then ``d``,
            ``v`` and ``x`` written in one loop, which reads and writes what ``torch.optim.Adam``
            must.  The same math and the same single device-to-host synchronization; only the
            partial sums are added in another order.  Compiles once per set of parameter shapes at
            the first step and needs a working Inductor (a C++ compiler on CPU, Triton on GPU): if
            it fails, ``step()`` raises a RuntimeError naming the cause before any state changes;
            there is no silent fallback.  Speed: see docs/benchmarks.md.
        capturable: every decision of the step on the device, as for :class:`MoMo`: no host
            read, the state updated in place, skips reported by :meth:`sync_warnings`; with
            ``compiled=True`` the compiled passes.
        max_consecutive_skips: raise after this many skipped steps in a row (``None``: never); see
            :class:`~._base.AdaptiveOptimizer`.

    After each step every param group holds ``effective_lr`` (= ``tau``) and ``lower_bound``, and,
    equal in every group, ``step``, ``skipped_steps``, ``loss_avg``, ``gamma``, ``current_lb`` and
    ``lb_lowered`` (as :class:`MoMo`); ``state[p]`` holds ``grad_avg`` (d) and ``grad_avg_sq`` (v),
    in the parameters' dtype.  For 16-bit parameters ``Dn`` and ``d/Dn`` are computed in float32
    (:mod:`._directions`: in float16 ``eps = 1e-8`` is 0); a step whose new ``v`` would overflow the
    parameters' dtype is skipped (see the module docstring).

    Example:
        >>> import torch
        >>> from lightning_adaptive_lr import MoMoAdam
        >>> model = torch.nn.Linear(3, 1)
        >>> optimizer = MoMoAdam(model.parameters(), lr=1e-2)
        >>> loss = model(torch.ones(4, 3)).pow(2).mean()
        >>> loss.backward()
        >>> _ = optimizer.step(loss=loss)
        >>> sorted(optimizer.state[model.weight])
        ['grad_avg', 'grad_avg_sq']
    """

    shared_options = ("betas", "lb", "estimate_lb", "lb_fraction", "compiled", "capturable")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lb: float | None = 0.0,
        estimate_lb: bool = False,
        decoupled_weight_decay: bool = False,
        lb_fraction: float = DEFAULT_LB_FRACTION,
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
        compiled: bool = False,
        capturable: bool = False,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        defaults = checked(
            type(self).__name__, locals(), lr=NONNEGATIVE, betas=BETAS, eps=NONNEGATIVE, weight_decay=NONNEGATIVE,
            lb=_optional_bound, estimate_lb=FLAG, decoupled_weight_decay=FLAG, lb_fraction=FRACTION, compiled=FLAG,
            capturable=FLAG,
        )  # fmt: skip
        super().__init__(params, defaults, **runtime_options(locals()))

    def _loss_beta(self) -> float:
        return self._shared("betas")[0]

    def _this_step(self) -> tuple[float, float]:
        """For the step about to be taken (``k = step + 1``): ``ρ = 1 − β1^k`` and ``root = √(1 − β2^k)``."""
        (beta1, beta2), k = self._shared("betas"), self._shared("step") + 1
        return 1.0 - beta1**k, math.sqrt(1.0 - beta2**k)

    def _eager_step(self, loss: Tensor, groups: list[Group]) -> None:
        (beta1, beta2), (rho, root) = self._shared("betas"), self._this_step()
        weights, device = (1 - beta1, 1 - beta2), loss.device
        moments, second_moments, directions, sums = [], [], [], []
        for group, ps, gs in groups:
            if not ps:
                directions.append([])
                continue
            states, foreach = [self.state.get(p, {}) for p in ps], group["foreach"]
            avgs, sq_avgs = [s.get("grad_avg") for s in states], [s.get("grad_avg_sq") for s in states]
            outs = self._outs("grad_avg", ps, foreach=foreach)
            # d/(√v/root + eps) = root·u with u = d/(√v + eps·root): root moves to the scalars,
            # which saves the pass dividing by it (adam_denominators skips a division by 1).
            eps = group["eps"] * root
            if outs is None:
                ds, vs, us, group_sums = _multi_tensor_momo_adam(avgs, sq_avgs, gs, ps, weights, eps, device)
            else:
                sq_outs = self._outs("grad_avg_sq", ps, foreach=foreach)
                u_outs = self._outs("direction", ps, foreach=foreach, wide=True)
                buffers = (outs, sq_outs, u_outs)
                ds, vs, us, group_sums = _single_tensor_momo_adam(
                    avgs, sq_avgs, gs, ps, weights, eps, buffers, device  # type: ignore[arg-type]
                )
            moments += ds
            second_moments += vs
            directions.append(us)
            sums.append(group_sums)
        gx, d_dot_x, d_dot_u, v_max = (sum(column) for column in zip(*sums))
        values = self._gate(loss=loss, gx=gx, d_dot_x=d_dot_x, d_dot_u=d_dot_u, v_max=v_max)
        if values is None:
            return
        self._advance_loss_model(values, restart=False)
        params = _flatten(groups)[0]
        self._store("grad_avg", params, moments)
        self._store("grad_avg_sq", params, second_moments)
        taus = self._step_sizes(groups, values["d_dot_x"], values["d_dot_u"] * root, rho)
        _descend_(groups, directions, [tau * root for tau in taus])

    def _device_step(self, loss: Tensor, groups: list[Group]) -> None:
        """``capturable``: the eager step's math with every decision on the device (no host read):
        the moments and parameters are replaced ``where`` the gate's values are finite."""
        (beta1, beta2), device = self._shared("betas"), loss.device
        rho, root = self._device_corrections(device)
        params, grads = _flatten(groups)
        states = [self.state.get(p, {}) for p in params]
        avgs = [_start(s.get("grad_avg"), p) for s, p in zip(states, params)]
        sq_avgs = [_start(s.get("grad_avg_sq"), p) for s, p in zip(states, params)]
        eps = {id(p): group["eps"] * root for group, ps, _ in groups for p in ps}
        new_d, new_v, directions = [], [], []
        for d, v, g, p in zip(avgs, sq_avgs, grads, params):
            d_new = torch.lerp(d, g, 1.0 - beta1)
            v_new, wide = _second_moment(v, g, 1.0 - beta2, torch.empty_like(v))
            new_d.append(d_new)
            new_v.append(v_new)
            directions.append(d_new / (wide.sqrt() + eps[id(p)].to(wide.dtype)))
        values, ok = self._device_gate(
            loss=loss,
            gx=dot(grads, params, device),
            d_dot_x=dot(new_d, params, device),
            d_dot_u=dot(new_d, directions, device),
            v_max=tensor_extrema(new_v, device)[1],
        )
        taus = self._device_step_sizes(groups, values, ok, values["d_dot_u"] * root, rho, False)
        self._store_on_device("grad_avg", params, new_d, ok)
        self._store_on_device("grad_avg_sq", params, new_v, ok)
        index = 0
        for (group, ps, _), tau in zip(groups, taus):
            shrink = group["lr"] * group["weight_decay"]
            keep, divisor = (1.0 - shrink, 1.0) if group["decoupled_weight_decay"] else (1.0, 1.0 + shrink)
            keep, divisor, step = torch.where(ok, keep, 1.0), torch.where(ok, divisor, 1.0), tau * root
            for p in ps:
                u = torch.where(ok, directions[index], 0.0)
                p.mul_(keep.to(p.dtype)).sub_(u * step.to(u.dtype)).div_(divisor.to(p.dtype))
                index += 1

    def _device_corrections(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """:meth:`_this_step` on the device (``capturable``): ``ρ = 1 − β1^k`` and ``root = √(1 − β2^k)``."""
        (beta1, beta2), k = self._shared("betas"), self._shared("step").to(accumulation_dtype(device)) + 1
        return 1.0 - torch.pow(beta1, k), torch.sqrt(1.0 - torch.pow(beta2, k))

    def _compiled_step(self, loss: Tensor, groups: list[Group]) -> None:
        name, (beta1, beta2), device = type(self).__name__, self._shared("betas"), loss.device
        on_device = self._shared("capturable")
        if on_device:  # the state exists from the first step on: the update pass writes it in place
            rho, root = self._device_corrections(device)
            at = device
        else:
            rho, root = self._this_step()
            at = None
        weight1, weight2, root_t = scalar(1.0 - beta1, at), scalar(1.0 - beta2, at), scalar(root, at)
        moments, partials = [], []
        for group, ps, gs in groups:
            if on_device:
                ds = [self._state_tensor(p, "grad_avg") for p in ps]
                vs = [self._state_tensor(p, "grad_avg_sq") for p in ps]
            else:
                ds = [kernels.state_or_zeros(self.state.get(p, {}), p, "grad_avg") for p in ps]
                vs = [kernels.state_or_zeros(self.state.get(p, {}), p, "grad_avg_sq") for p in ps]
            eps = scalar(group["eps"], at)
            moments.append((ds, vs, eps))
            columns = (ds, vs, gs, ps)
            partials += kernels.run_sums(name, kernels.momo_adam_sums, columns, 4, weight1, weight2, root_t, eps)
        gx, d_dot_x, d_dot_u, v_max = sum_partials(partials, device)
        if on_device:
            values, ok = self._device_gate(loss=loss, gx=gx, d_dot_x=d_dot_x, d_dot_u=d_dot_u, v_max=v_max)
            taus: list[Tensor] = self._device_step_sizes(groups, values, ok, values["d_dot_u"], rho, False)
        else:
            host = self._gate(loss=loss, gx=gx, d_dot_x=d_dot_x, d_dot_u=d_dot_u, v_max=v_max)
            if host is None:
                return
            self._advance_loss_model(host, restart=False)
            for (_, ps, _), (ds, vs, _) in zip(groups, moments):
                for p, d, v in zip(ps, ds, vs):
                    self.state[p].setdefault("grad_avg", d)
                    self.state[p].setdefault("grad_avg_sq", v)
            taus = [scalar(tau) for tau in self._step_sizes(groups, host["d_dot_x"], host["d_dot_u"], rho)]
            ok = scalar(True)
        for (group, ps, gs), (ds, vs, eps), tau in zip(groups, moments, taus):
            shrink = group["lr"] * group["weight_decay"]
            keep, divisor = (1.0 - shrink, 1.0) if group["decoupled_weight_decay"] else (1.0, 1.0 + shrink)
            kernels.run_on_buckets(
                name,
                kernels.momo_adam_update,
                (ds, vs, gs, ps),
                weight1,
                weight2,
                root_t,
                eps,
                tau,
                scalar(keep, at),
                scalar(divisor, at),
                ok,
            )
