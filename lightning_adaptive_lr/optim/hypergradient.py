"""Multi-level (hierarchical) hypergradient descent on top of SGD, SGD-Nesterov and Adam.

Jie, Gao, Vasnev, Tran. "Adaptive hierarchical hyper-gradient descent." arXiv:2008.07277 (2020),
International Journal of Machine Learning and Cybernetics (2022).  Built on Baydin, Cornish,
Martínez Rubio, Schmidt, Wood. "Online learning rate adaptation with hypergradient descent."
ICLR 2018.  docs/algorithms.md §3: the base rule and the single-level method are [exact]; the
combination of levels is [reconstructed] (see :class:`HierarchicalHD`).

The learning rate is itself learned by gradient descent.  With ``s_t`` the base rule's direction
for a unit rate, each step, before the update::

    α⁽ᵏ⁾ ← clip(α⁽ᵏ⁾ + β_k·w_k·Σ_group g_t ⊙ s_{t−1} − 2β_k·λ_k·(α⁽ᵏ⁾ − α⁽ᵖᵃʳᵉⁿᵗ⁾))   per level k
    x    ← x − (Σ_k w_k·α⁽ᵏ⁾) ⊙ s_t

(``−⟨g_t, s_{t−1}⟩`` is the derivative of the loss with respect to the rate applied at the
previous step).  The levels are one rate for the model, one per tensor, one per output unit, one
per element; the weights ``w`` may learn too, by projected hypergradient descent on the simplex.

Outside the method's assumptions (docs/algorithms.md §3.4), all [package]:

* **Gradient spikes**: after the first steps a rate grows by at most ``max_rate_growth`` (2) per
  step (:func:`hd_rate`), so one spike cannot throw it up and start a divergence.
* **The step's outcome is gated**: the new rates are checked on the host, and a step the screen
  flags (the first, a hypergradient far above its running average, float16 parameters) is taken
  on copies first; if it would write a non-finite value, it is skipped.
* **Schedulers**: the hypergradient step is scaled to the largest scheduled ``lr``
  (:func:`reference_lr`), so no schedule amplifies it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from . import _sharding
from ._base import (
    BETAS,
    DEFAULT_MAX_CONSECUTIVE_SKIPS,
    FLAG,
    FRACTION,
    NONNEGATIVE,
    AdaptiveOptimizer,
    check_choice,
    check_range,
    checked,
    one_of,
    real_number,
    runtime_options,
    written_into,
)
from ._adam_compiled import run_adam_step
from ._compiled import ensure_inductor_works, run_with_table
from ._directions import (
    adam_denominators,
    adam_directions,
    adam_moments_,
    adam_step_,
    momentum_,
    nesterov,
    with_l2,
)
from ._reduce import (
    accumulation_dtype,
    tensor_dots,
    tensor_extrema,
    tensor_sums,
    unit_dots,
    work_dtype,
)
from ._scalars import Scalar, safe_div, smax, smin, where
from ._sharding import local as _local_tensor
from ._sgd_compiled import kept_step, nesterov_step
from ._tensorlists import add_scaled_, clamp_, copy_

__all__ = [
    "BASES",
    "DEFAULT_HYPER_LR",
    "DEFAULT_MAX_RATE_GROWTH",
    "LEVELS",
    "HierarchicalHD",
    "hd_rate",
    "hypergradient_size",
    "project_simplex",
    "rate_step_factor",
    "reference_lr",
    "running_scale",
    "scalar_rate",
    "weight_hypergradients",
]

#: The levels, coarsest first: the parent of a level is the next coarser *active* one.
LEVELS: tuple[str, ...] = ("global", "layer", "unit", "param")
#: The base rules: plain SGD, SGD with Nesterov momentum, Adam.
BASES: tuple[str, ...] = ("sgd", "sgdn", "adam")
#: ``hyper_lr`` used when ``hyper_lr=None`` (see :class:`HierarchicalHD`).
DEFAULT_HYPER_LR: dict[str, float] = {"sgd": 1e-1, "sgdn": 1e-3, "adam": 1e-4}
#: ``max_rate_growth`` by default: after the first steps a rate grows by at most this factor per step.
DEFAULT_MAX_RATE_GROWTH = 2.0
#: Steps before ``max_rate_growth`` applies: the first steps raise a small initial rate quickly.
_GROWTH_WARMUP = 5
#: Weight of the newest size in the running average of :func:`running_scale`.
_SCALE_WEIGHT = 0.1
#: A step whose hypergradient is this many times its running average is tried on copies first.
_SCREEN = 10.0

#: The state key of the levels kept per parameter (``layer``: a float; ``unit``, ``param``: tensors).
_RATE_KEYS = {"layer": "hd_rate_layer", "unit": "hd_rate_unit", "param": "hd_rate_param"}
#: Param-group key of the largest ``lr`` the group has stepped with (see :func:`reference_lr`).
REFERENCE_LR = "hd_reference_lr"
#: A parameter's scalar state: numbers on the default path, 0-d device tensors with ``capturable``.
_SCALAR_STATE = ("hd_rate_layer", "direction_scale", "step")
#: Why ``compiled=True`` and ``capturable=True`` do not go together, and what to use instead.
_COMPILED_AND_CAPTURABLE = (
    "{name}: `compiled` and `capturable` cannot both be True: the compiled base-rule kernels "
    "(optim/_sgd_compiled.py, optim/_adam_compiled.py) take their per-tensor scalars as a table of host "
    "numbers and write the state in place, with no flag to keep it where a step is skipped. Use "
    "capturable=True with compiled=False (the device-side step), or compiled=True alone."
)


# =========================================================================== the scalar rules


def rate_step_factor(lr: float, lr_ref: Scalar, scale: Scalar) -> Scalar:
    """The factor that turns ``⟨g_t, prev⟩`` into a step of a rate stored as a multiple of ``lr``.

    ``s_{t−1} = scale·prev`` and the applied rate is ``lr·ρ``; the hypergradient step is taken on
    the unscheduled rate ``lr_ref·ρ``, so ``ρ`` moves by ``β·scale·lr/lr_ref²·⟨g_t, prev⟩`` (Baydin's
    ``β·⟨g_t, s_{t−1}⟩`` in absolute units when ``lr = lr_ref``).  0 when either rate is 0
    (``lr_ref ≥ lr ≥ 0``).  ``lr_ref`` and ``scale`` may be 0-d tensors (``capturable``).
    """
    return safe_div(scale * lr, lr_ref**2) if lr > 0 else 0.0


def hd_rate(
    rate: Scalar,
    alignment: Scalar,
    step: float,
    *,
    pull: float = 0.0,
    parent: Scalar = 0.0,
    low: float = 0.0,
    high: float = math.inf,
    growth: Scalar = math.inf,
) -> Scalar:
    """One scalar rate's update: ``ρ ← clip(ρ + step·⟨g_t, s_{t−1}⟩ − pull·(ρ − parent), low, high)``.

    ``step = w_k·β_k`` (times :func:`rate_step_factor` for a tensor's rate), ``pull = 2·β_k·λ_k``.
    The tensor-valued levels apply the same rule element by element (:func:`_move_tensor_rates_`).
    [package] ``growth`` (``max_rate_growth``) also caps the new rate at ``growth·max(ρ, 1)``: at
    most ``growth`` times the old multiple, or ``growth`` (× ``lr``) from below 1 (never below ``low``).
    Numbers or 0-d tensors (``capturable``; an infinite tensor ``growth`` caps nothing: ``inf·ρ``).
    """
    uncapped = not isinstance(growth, Tensor) and growth == math.inf
    ceiling = high if uncapped else smax(smin(high, growth * smax(rate, 1.0)), low)
    return smin(smax(rate + step * alignment - pull * (rate - parent), low), ceiling)


def weight_hypergradients(
    levels: Sequence[str],
    absolute: Sequence[Scalar],
    dots: Sequence[Scalar] | Tensor,
    global_rate: Scalar,
    layer_rates: Sequence[Scalar],
    partials: Mapping[str, Sequence[Scalar] | Tensor],
) -> dict[str, Scalar]:
    """``∂/∂w_k = Σ_i h_i·α⁽ᵏ⁾_i`` with ``h = −g_t ⊙ s_{t−1}``, at the previous rates.

    Per tensor ``j``: ``absolute[j] = lr_j·scale_j`` turns its multiples into absolute rates,
    ``dots[j] = ⟨g_j, prev_j⟩``, and ``partials[level][j] = Σ_i g_i·prev_i·ρ_i`` over the tensor for
    the tensor-valued levels (``unit``, ``param``).  Numbers, or 0-d tensors and 1-d ones for the
    per-tensor vectors (``capturable``): the same sums, in the same order.
    """
    weighted = [a * d for a, d in zip(absolute, dots)]
    out: dict[str, Scalar] = {}
    if "global" in levels:
        out["global"] = -global_rate * sum(weighted)
    if "layer" in levels:
        out["layer"] = -sum(r * x for r, x in zip(layer_rates, weighted))
    for level in ("unit", "param"):
        if level in levels:
            out[level] = -sum(p * a for p, a in zip(partials[level], absolute))
    return out


def project_simplex(values: Sequence[Scalar]) -> list[float] | Tensor:
    """Euclidean projection of ``values`` onto the probability simplex {w ≥ 0, Σ w = 1}.

    The sort-based algorithm (Held, Wolfe, Crowder 1974; Duchi et al. 2008): find the threshold
    ``θ`` with ``Σ max(v_i − θ, 0) = 1`` and clip there.  Adding a constant to every entry does not
    change the result, which is why only differences between the levels' hypergradients move the
    weights.  So the values are first shifted by their largest: ``(Σv − 1)/i`` over entries near
    1e40 would lose the 1 and leave weights far off the simplex.  Values that are 0-d tensors
    (``capturable``) give a 1-d tensor, projected on the device (:func:`_project_simplex_on_device`,
    the same steps).

    >>> project_simplex([1.0, 0.5]), project_simplex([3.0, 0.0])
    ([0.75, 0.25], [1.0, 0.0])
    """
    if any(isinstance(v, Tensor) for v in values):
        return _project_simplex_on_device(torch.stack(list(values)))  # type: ignore[arg-type]
    top = max(values)
    values = [v - top for v in values]
    ordered = sorted(values, reverse=True)
    cumulative, theta = 0.0, 0.0
    for i, v in enumerate(ordered, start=1):
        cumulative += v
        candidate = (cumulative - 1.0) / i
        if v - candidate > 0:
            theta = candidate
    return [max(v - theta, 0.0) for v in values]


def _project_simplex_on_device(values: Tensor) -> Tensor:
    """:func:`project_simplex` of a 1-d tensor without a host read: the same sort, the same running
    sums (``cumsum``), and ``θ`` the candidate at the last position where ``v_i − θ_i > 0`` (0 if none)."""
    values = values - values.max()
    ordered = torch.sort(values, descending=True).values
    positions = torch.arange(1, values.numel() + 1, device=values.device)
    candidates = (torch.cumsum(ordered, 0) - 1.0) / positions
    last = torch.amax(torch.where(ordered - candidates > 0, positions, 0)).reshape(1)
    theta = torch.where(last > 0, candidates.gather(0, torch.clamp(last - 1, min=0)), 0.0)
    return torch.clamp(values - theta, min=0.0)


def scalar_rate(weights: Mapping[str, float], global_rate: float, layer_rate: float) -> float:
    """``w_global·ρ_global + w_layer·ρ_layer``: the scalar levels' part of a tensor's applied multiple."""
    return weights.get("global", 0.0) * global_rate + weights.get("layer", 0.0) * layer_rate


def reference_lr(lr: float, *recorded: Scalar | None) -> Scalar:
    """``lr_ref``: the largest rate the group is scheduled at: ``lr`` and the ``recorded`` ones
    (``initial_lr``, ``OneCycleLR``'s ``max_lr``, the largest ``lr`` seen so far; ``None`` if absent).

    [package] The hypergradient step of a rate stored as a multiple of ``lr`` is scaled by
    ``lr/lr_ref²`` (:func:`rate_step_factor`), so the applied rate ``lr·ρ`` moves by
    ``β·(lr/lr_ref)²·⟨g_t, s_{t−1}⟩``: Baydin's step at the largest scheduled rate, less below it.
    A warm-up (``OneCycleLR``'s starts at ``max_lr/div_factor``) then neither amplifies the step
    nor lets the multiples learned at its small start be multiplied by its peak.

    >>> reference_lr(0.05, 0.1, None, None)  # decaying (StepLR, cosine): initial_lr
    0.1
    >>> reference_lr(0.004, 0.004, 0.1, 0.004)  # OneCycleLR warming up: its max_lr
    0.1
    >>> reference_lr(0.5, 0.1, None, 0.3)  # CyclicLR rising: the largest lr so far
    0.5

    A recorded rate may be a 0-d tensor (``capturable``): the result is then one.
    """
    largest: Scalar = lr
    for r in recorded:
        if r is not None:
            largest = smax(largest, r)
    return largest


def hypergradient_size(coefs: Sequence[Scalar], dots: Sequence[Scalar] | Tensor) -> Scalar:
    """``Σ_j |c_j·⟨g_j, prev_j⟩|``: how far this step's hypergradient would move the rates (in
    multiples of ``lr``, before ``β`` and the weights).  A size far above its running average
    (:func:`running_scale`) marks a gradient spike: such a step is tried on copies first.
    ``dots`` as a 1-d tensor (``capturable``): a 0-d tensor, summed on the device."""
    terms = [abs(c * d) for c, d in zip(coefs, dots)]
    if isinstance(dots, Tensor):
        return torch.stack(terms).sum() if terms else dots.new_zeros(())
    return math.fsum(terms)


def running_scale(scale: Scalar, size: Scalar) -> Scalar:
    """The running average of the sizes: ``scale + w·(size − scale)``, ``w = 0.1``; it starts at
    the first non-zero size, and a step without a hypergradient leaves it alone.  Numbers or 0-d
    tensors."""
    return where(size == 0.0, scale, where(scale <= 0.0, size, scale + _SCALE_WEIGHT * (size - scale)))


def _is_spike(size: Scalar, scale: Scalar) -> Scalar:
    """Whether a hypergradient of ``size`` is a spike: non-zero, and without a running average
    ``scale`` yet or more than 10 times it (a bool, or a 0-d bool tensor: ``&``/``|`` serve both)."""
    return (size > 0.0) & ((scale <= 0.0) | (size > _SCREEN * scale))


# =========================================================================== the bodies


def _unit_view_shape(tensor: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts one value per output unit (dim 0) over ``tensor``."""
    return () if tensor.dim() == 0 else (tensor.shape[0],) + (1,) * (tensor.dim() - 1)


def _sgd_step_(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], rates: list[float]
) -> list[Tensor]:
    """``s = g`` (sgd) or Nesterov's ``s = g + μ·v`` (sgdn), stored as ``prev_direction``; ``x ← x − rate·s``.

    torch.optim.SGD's operations in its order, so that ``hyper_lr=0`` reproduces it bit for bit.
    ``grads`` are written into when they are this step's temporaries (``weight_decay ≠ 0``).
    """
    foreach = group["foreach"]
    owned = group["weight_decay"] != 0
    directions = grads if owned else [st["prev_direction"] for st in states]
    if group.get("compiled") and group["base"] == "sgdn":  # one loop per tensor (optim/_sgd_compiled.py)
        buffers = [st["momentum_buffer"] for st in states]
        rows = [(group["momentum"], r) for r in rates]
        run_with_table("HierarchicalHD", nesterov_step, (params, grads, buffers, directions), rows)
    elif group.get("compiled") and not owned:
        run_with_table("HierarchicalHD", kept_step, (params, grads, directions), [(r,) for r in rates])
    else:  # torch.optim.SGD's operations
        if group["base"] == "sgdn":
            buffers = momentum_(states, grads, group["momentum"], foreach=foreach)
            nesterov(grads, buffers, group["momentum"], foreach=foreach, out=directions)
        elif not owned:
            copy_(directions, grads, foreach=foreach)
        add_scaled_(params, directions, [-r for r in rates], foreach=foreach)
    for st, s in zip(states, directions):
        st["prev_direction"] = s
    return directions


def _adam_step_(
    group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], rates: list[float]
) -> list[Tensor]:
    """Adam's moments and step (torch.optim.Adam's operations); ``u = m/(√v̂ + eps)`` stored.

    ``s_t = u/bc1``: ``prev_direction = u`` with ``direction_scale = 1/bc1``, which saves a pass.
    """
    foreach = group["foreach"]
    beta1, beta2 = group["betas"]
    for st in states:
        st["step"] += 1
    bc1 = [1 - beta1 ** st["step"] for st in states]
    roots = [(1 - beta2 ** st["step"]) ** 0.5 for st in states]
    avgs, sq_avgs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
    steps = [-(r / b) for r, b in zip(rates, bc1)]
    if group.get("compiled"):  # moments, u and the step in one loop per tensor (optim/_adam_compiled.py)
        table = [(1 - beta1, 1 - beta2, root, group["eps"], step, 0.0) for root, step in zip(roots, steps)]
        wide = run_adam_step("HierarchicalHD", params, avgs, sq_avgs, grads, table)
        directions = [u if u.dtype == p.dtype else u.to(p.dtype) for u, p in zip(wide, params)]
    else:  # torch.optim.Adam's operations; prev_direction's buffers (or the gradient temporaries) receive u
        adam_moments_(avgs, sq_avgs, grads, 1 - beta1, 1 - beta2, foreach=foreach)
        targets = grads if group["weight_decay"] != 0 else [st["prev_direction"] for st in states]
        # The denominators go into `targets` when those have v's dtype (16-bit parameters: new float32 tensors).
        fits = all(t.dtype == v.dtype for t, v in zip(targets, sq_avgs))
        denominators = adam_denominators(sq_avgs, roots, group["eps"], foreach=foreach, out=targets if fits else None)
        adam_step_(params, avgs, denominators, steps, foreach=foreach)
        directions = adam_directions(avgs, denominators, foreach=foreach, out=targets)
    for st, u, b in zip(states, directions, bc1):
        st["prev_direction"] = u
        st["direction_scale"] = 1.0 / b
    return directions


def _move_tensor_rates_(
    rates: list[Tensor],
    grads: list[Tensor],
    prevs: list[Tensor | None],
    unit_sums: list[Tensor | None] | None,
    steps: list[Scalar],
    parents: list[Scalar | None],
    pull: float,
    bounds: tuple[float, float],
    growth: Scalar,
    *,
    foreach: bool,
) -> None:
    """:func:`hd_rate` for a tensor-valued level, in place: per output unit (``unit_sums`` given) or per element.

    ``ρ ← clip(ρ·(1 − pull) + pull·parent + step·Σ_group g ⊙ prev)``; ``steps`` already hold the
    factor of :func:`rate_step_factor`.  A finite ``growth`` caps each rate at ``growth·max(ρ, 1)``.
    ``steps`` and ``growth`` may be 0-d tensors (``capturable``): the cap is then always formed
    (an infinite ``growth`` caps nothing) and a zero step is added, not skipped.
    """
    low, high = bounds
    ceilings = []
    on_device = isinstance(growth, Tensor)
    if on_device or growth != math.inf:  # growth·max(ρ, 1), within the bounds, from the rates before the step
        ceilings = [torch.clamp(rate, min=1.0).mul_(growth) for rate in rates]
        if on_device or low > growth or high < math.inf:
            clamp_(ceilings, low, max(high, low), foreach=foreach)
    for j, (rate, g, s, step, parent) in enumerate(zip(rates, grads, prevs, steps, parents)):
        if pull > 0 and parent is not None:
            rate.mul_(1.0 - pull)
            if isinstance(parent, Tensor):
                rate.add_(parent, alpha=pull)
            else:
                rate.add_(pull * parent)
        if isinstance(step, Tensor):  # a 0-d tensor cannot be an `alpha`: into the factor, in ρ's dtype
            if unit_sums is None:
                rate.addcmul_(g, s.to(rate.dtype) * step)  # type: ignore[union-attr]
            else:
                rate.add_(unit_sums[j] * step)  # type: ignore[operator]
            continue
        if s is None or step == 0:
            continue
        if unit_sums is None:
            rate.addcmul_(g, s, value=step)
        else:
            rate.add_(unit_sums[j], alpha=step)  # type: ignore[arg-type]
    clamp_(rates, low, high, foreach=foreach)
    for rate, ceiling in zip(rates, ceilings):  # the ceilings lie within [low, high]
        torch.minimum(rate, ceiling, out=rate)


def _parent_rates(
    parent: str | None,
    global_rate: float,
    layer_rates: list[float],
    states: list[dict[str, Any]],
    params: list[Tensor],
) -> list[Scalar | None]:
    """Each tensor's parent rate (before this step): the global or its layer's multiple, or its
    unit rates broadcast over its elements; ``None`` for the coarsest level."""
    if parent is None:
        return [None] * len(params)
    if parent == "global":
        return [global_rate] * len(params)
    if parent == "layer":
        return list(layer_rates)
    return [st["hd_rate_unit"].view(_unit_view_shape(p)) for st, p in zip(states, params)]


def _tensor_levels_step_(
    lr: float,
    params: list[Tensor],
    directions: list[Tensor],
    states: list[dict[str, Any]],
    weights: Mapping[str, float],
) -> None:
    """``x ← x − lr·(w_unit·ρ_unit + w_param·ρ_param) ⊙ s_t`` (``s_t = direction_scale·direction``)."""
    for level in ("unit", "param"):
        w = weights.get(level, 0.0)
        if w == 0:
            continue
        for p, s, st in zip(params, directions, states):
            rate = st[_RATE_KEYS[level]]
            if level == "unit":
                rate = rate.view(_unit_view_shape(p))
            p.addcmul_(rate.to(p.dtype), s, value=-lr * st.get("direction_scale", 1.0) * w)


def _parent_level(levels: Sequence[str], level: str) -> str | None:
    """The next coarser active level (``None`` for the coarsest)."""
    coarser = [c for c in levels if LEVELS.index(c) < LEVELS.index(level)]
    return coarser[-1] if coarser else None


def _move_rates_(
    plan: _Plan,
    levels: Sequence[str],
    reads: Sequence[_Reads],
    states: list[dict[str, Any]],
    unit_sums: list[Tensor | None],
    *,
    foreach: bool,
) -> None:
    """The rates a step writes into ``states`` (one per tensor of ``reads``): the tensor levels'
    (in place, :func:`_move_tensor_rates_`), then the layer rates of ``plan``."""
    params, grads, prevs = (_flat(reads, k) for k in ("params", "grads", "prevs"))
    for level in ("param", "unit"):  # finest first: every pull reads its parent's previous value
        if level in levels:
            _move_tensor_rates_(
                [st[_RATE_KEYS[level]] for st in states],
                grads,
                prevs,
                unit_sums if level == "unit" else None,
                plan.tensor_steps[level],
                _parent_rates(_parent_level(levels, level), plan.old_global, plan.old_layer, states, params),
                plan.pulls[level],
                plan.bounds,
                where(plan.check, plan.growth, math.inf),  # per element: on the screened steps only
                foreach=foreach,
            )
    if "layer" in levels:
        for st, rate in zip(states, plan.layer_rates):
            st["hd_rate_layer"] = rate


def _apply_step_(
    plan: _Plan,
    levels: Sequence[str],
    reads: Sequence[_Reads],
    states: list[dict[str, Any]],
    unit_sums: list[Tensor | None],
    *,
    foreach: bool,
) -> None:
    """Everything a step writes: the tensor levels' rates, the layer rates, then the base rule's
    step with the new rates and weights and the tensor levels' share of it.

    ``states`` (one per tensor of ``reads``) are written; the real states, or copies to try a step on.
    """
    _move_rates_(plan, levels, reads, states, unit_sums, foreach=foreach)
    offset = 0
    for r in reads:
        sts = states[offset : offset + len(r.params)]
        offset += len(r.params)
        lr = r.group["lr"]
        rates = [lr * scalar_rate(plan.weights, plan.global_rate, st.get("hd_rate_layer", 1.0)) for st in sts]
        base_step_ = _adam_step_ if r.group["base"] == "adam" else _sgd_step_
        directions = base_step_(r.group, r.params, r.grads, sts, rates)
        _tensor_levels_step_(lr, r.params, directions, sts, plan.weights)


def _copied(state: Mapping[str, Any]) -> dict[str, Any]:
    """A parameter's state with its tensors copied."""
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()}


# =========================================================================== the device-side bodies
#
# ``capturable``: the step is formed next to the state (new tensors, the state's own left as they
# are), then kept ``where`` it may be (:meth:`HierarchicalHD._commit`).  The per-tensor scalars are
# 0-d tensors, which cannot be an ``alpha`` or a ``value``: they enter as factors.


def _device_base_step(
    group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]], rates: list[Scalar]
) -> list[Scalar]:
    """The base rule's new state (``capturable``): ``states``' entries replaced by new tensors
    (``prev_direction``, ``momentum_buffer``; Adam's in :func:`_device_adam_step`), the operations of
    :func:`_sgd_step_`.  Returns each tensor's step size along its new ``prev_direction``."""
    if group["base"] == "adam":
        return _device_adam_step(group, grads, states, rates)
    directions = grads
    if group["base"] == "sgdn":
        buffers = [{"momentum_buffer": st["momentum_buffer"].clone()} for st in states]
        momentum_(buffers, grads, group["momentum"], foreach=group["foreach"])
        directions = nesterov(grads, [b["momentum_buffer"] for b in buffers], group["momentum"], foreach=group["foreach"])
        for st, b in zip(states, buffers):
            st["momentum_buffer"] = b["momentum_buffer"]
    for st, s in zip(states, directions):
        st["prev_direction"] = s
    return rates


def _device_adam_step(
    group: dict[str, Any], grads: list[Tensor], states: list[dict[str, Any]], rates: list[Scalar]
) -> list[Scalar]:
    """Adam's new moments, step count (int64), ``u = m/(√v/root + eps)`` and ``direction_scale =
    1/bc1`` as new tensors in ``states`` (:func:`_adam_step_`'s math, the bias corrections from each
    tensor's count on the device; ``u`` in ``v``'s dtype).  Returns ``rate/bc1`` per tensor."""
    beta1, beta2 = group["betas"]
    avgs = [st["exp_avg"].clone() for st in states]
    sq_avgs = [st["exp_avg_sq"].clone() for st in states]
    adam_moments_(avgs, sq_avgs, grads, 1 - beta1, 1 - beta2, foreach=group["foreach"])
    steps = []
    for st, m, v, rate in zip(states, avgs, sq_avgs, rates):
        count = st["step"] + 1
        k = count.to(accumulation_dtype(count.device))
        bc1, root = 1.0 - torch.pow(beta1, k), torch.sqrt(1.0 - torch.pow(beta2, k))
        denominator = (v.sqrt() / root).add_(group["eps"])  # v's dtype: float32 for 16-bit parameters
        u = m.to(denominator.dtype) / denominator
        st.update(step=count, exp_avg=m, exp_avg_sq=v, prev_direction=u, direction_scale=1.0 / bc1)
        steps.append(rate / bc1)
    return steps


def _descended(p: Tensor, state: Mapping[str, Any], step: Scalar, lr: float, weights: Mapping[str, Scalar]) -> Tensor:
    """The new parameter (``capturable``): ``x − step·s``, then the tensor levels' share
    ``lr·scale·w_k·ρ_k ⊙ s`` (:func:`_tensor_levels_step_`), with ``s = prev_direction`` and
    ``scale = direction_scale`` of the new ``state``; formed in :func:`work_dtype`, rounded once."""
    wide = work_dtype(p.dtype)
    s = state["prev_direction"].to(wide)
    x = p.to(wide) - s * step
    for level in ("unit", "param"):
        if level in weights:
            rate = state[_RATE_KEYS[level]]
            if level == "unit":
                rate = rate.view(_unit_view_shape(p))
            x = x - rate.to(wide) * s * (lr * state.get("direction_scale", 1.0) * weights[level])
    return x.to(p.dtype)


def _outcome_finite(staged: Sequence[tuple[Tensor, Mapping[str, Any]]], device: torch.device) -> Tensor:
    """Whether every new parameter and every state tensor after the step is finite (0-d bool): what
    :meth:`HierarchicalHD._outcome_is_finite` finds on copies, from the step formed next to the state."""
    tensors = [t for new_p, state in staged for t in (new_p, *(v for v in state.values() if isinstance(v, Tensor)))]
    low, high = tensor_extrema(tensors, device)
    return torch.isfinite(low) & torch.isfinite(high)


# =========================================================================== the optimizer


@dataclass(frozen=True)
class _Reads:
    """What one param group's step reads, taken before the gate (nothing is written before it)."""

    group: dict[str, Any]
    params: list[Tensor]
    #: ``g + weight_decay·x``: new tensors when ``weight_decay ≠ 0``, else the ``.grad`` tensors.
    grads: list[Tensor]
    #: The stored ``s_{t−1}/scale`` (``None`` before a tensor's first step: ``s_0 = 0``) and ``scale``.
    prevs: list[Tensor | None]
    scales: list[float]
    #: The parameters' states as found (``{}`` before a tensor's first step; nothing created).
    states: list[Mapping[str, Any]]


@dataclass(frozen=True)
class _Plan:
    """What a step will write, worked out from the gate's values before anything is written: on
    the host (numbers), or on the device (0-d tensors, ``capturable``).  Per-tensor lists run over
    the tensors of all groups, in order."""

    #: The new combination weights (the step uses them) and the new global and layer multiples.
    weights: dict[str, Scalar]
    global_rate: Scalar
    layer_rates: list[Scalar]
    #: The multiples before this step (the tensor levels' parents).
    old_global: Scalar
    old_layer: list[Scalar]
    #: Per tensor-valued level: each tensor's hypergradient step (``w_k·β_k`` × its factor), and ``2·β_k·λ_k``.
    tensor_steps: dict[str, list[Scalar]]
    pulls: dict[str, float]
    bounds: tuple[float, float]
    #: Each group's ``lr_ref`` (:func:`reference_lr`), in the order of the reads.
    references: list[Scalar]
    #: ``max_rate_growth`` (``inf`` in the first steps) and the running scale after this step.  The
    #: scalar levels' rates are capped at every step; the tensor levels' (three passes over their
    #: rates) on the steps the screen flags (``check``), where a spike would throw them up.
    growth: Scalar
    scale: Scalar
    #: Whether the step must be tried on copies first (:meth:`HierarchicalHD._outcome_is_finite`).
    check: bool | Tensor
    #: Whether the new scalar rates, weights and the screen's size are all finite (else the step is skipped).
    finite: bool | Tensor

    def at(self, j: int) -> _Plan:
        """The plan of the ``j``-th tensor alone."""
        return replace(
            self,
            layer_rates=self.layer_rates[j : j + 1],
            old_layer=self.old_layer[j : j + 1],
            tensor_steps={k: v[j : j + 1] for k, v in self.tensor_steps.items()},
        )


def _all_finite(values: Sequence[Scalar]) -> bool | Tensor:
    """Whether every value is finite: a bool for numbers, a 0-d bool tensor if one is a tensor."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    numbers = all(math.isfinite(v) for v in values if not isinstance(v, Tensor))
    if not tensors:
        return numbers
    device = tensors[0].device
    stacked = torch.stack([t.to(device=device, dtype=accumulation_dtype(device)) for t in tensors])
    return torch.isfinite(stacked).all() & numbers


def _flat(reads: Sequence[_Reads], field: str) -> list[Any]:
    """One field of every group's reads, as one list over the tensors of all groups."""
    return [x for r in reads for x in getattr(r, field)]


class HierarchicalHD(AdaptiveOptimizer):
    r"""Multi-level hypergradient descent (Jie et al. 2020/2022; Baydin et al. ICLR 2018).

    **Base rule.** ``base`` picks the direction ``s_t`` of a unit learning rate (the update is
    ``x ← x − α ⊙ s_t``), with ``g_t`` the gradient plus ``weight_decay·x`` (L2, as in Baydin's code):

    * ``"sgd"``: ``s = g``.
    * ``"sgdn"``: Nesterov, ``v ← μ·v + g`` (``v`` starts at the first ``g``), ``s = g + μ·v``.  This is
      exactly ``torch.optim.SGD(momentum=μ, nesterov=True, dampening=0)``: with ``hyper_lr=0`` the
      two produce the same parameters bit for bit.
    * ``"adam"``: ``s = m̂ / (sqrt(v̂) + eps)`` with bias-corrected moments (per-parameter step counts,
      L2 weight decay, ``eps`` outside the root); with ``hyper_lr=0`` this is ``torch.optim.Adam``
      bit for bit.

    (Bit for bit with levels ``global`` and ``layer``; the tensor-valued levels apply their share
    of the rate in separate passes, equal up to rounding.)

    **Hypergradient.** Each step, *before* the update, ``h = −g_t ⊙ s_{t−1}`` (``s_0 = 0``, so the
    first step uses the initial rates) is the derivative of the loss with respect to the rate
    applied, element by element, at the previous step.  With ``levels=("global",)`` the rate moves
    by ``α ← α + β·⟨g_t, s_{t−1}⟩`` computed with one global dot product per step: Baydin et al.'s
    SGD-HD, SGDN-HD and Adam-HD [exact].  (The authors' Adam-HD code updates its rate tensor by
    tensor; this class does not copy that quirk.)

    **Levels** [reconstructed: the paper's full text was not available; this is docs/algorithms.md
    §3.2's reading].  ``levels`` may combine ``"global"`` (one rate), ``"layer"`` (one per parameter
    tensor), ``"unit"`` (one per output unit: dim 0 of each tensor; a bias has one per element) and
    ``"param"`` (one per element).  Per step, with the rates and weights of the previous step:

    * each level's rates move against the sum of ``h`` over each rate's group of elements, scaled by
      the level's weight: ``α⁽ᵏ⁾ ← α⁽ᵏ⁾ − β_k·w_k·Σ_group h``;
    * ``level_pull=λ`` adds the paper's regulariser ``λ_k·‖α⁽ᵏ⁾ − α⁽ᵖᵃʳᵉⁿᵗ⁾‖²`` (parent = the next
      coarser active level, held fixed): ``α⁽ᵏ⁾ ← α⁽ᵏ⁾ − 2β_k·λ_k·(α⁽ᵏ⁾ − α⁽ᵖᵃʳᵉⁿᵗ⁾)``.  It keeps the
      fine levels near the coarse ones, which is what makes the over-parameterised fine levels
      usable; ``2·β_k·λ_k`` is the fraction of the gap closed per step and must be ≤ 1;
    * with ``learn_weights`` the combination weights follow their own hypergradient,
      ``∂/∂w_k = Σ_i h_i·α⁽ᵏ⁾_i``, projected back onto the simplex: ``w ← Π(w − weight_lr·∂/∂w)``;
    * the rates are clipped to ``rate_bounds`` (by default rates stay ≥ 0: a negative rate would
      climb the loss);
    * the step is ``x ← x − α* ⊙ s_t`` with ``α* = Σ_k w_k·α⁽ᵏ⁾`` broadcast to each element.

    **Rates, param groups and schedulers.** The learned rates are stored as multiples of the
    group's ``lr`` (they start at 1), and the rate applied to a group is its current ``lr`` times
    that multiple.  So groups with different ``lr`` share the global level, and an LR scheduler
    scales the learned rates instead of being overridden by them.  [package] The hypergradient
    steps are taken on the rate at the largest scheduled ``lr``: ``lr_ref`` (:func:`reference_lr`)
    is the largest of the group's ``lr``, the ``initial_lr`` and ``max_lr`` that schedulers record
    and every ``lr`` the group has stepped with (kept in ``hd_reference_lr``).  The applied rate
    then moves by ``β·(lr/lr_ref)²·Σh``: exactly Baydin's ``β·Σh`` without a scheduler, never more
    under one, less where the schedule is below its peak (a warm-up neither amplifies the step nor
    multiplies the multiples learned at its small start by its peak).  A group whose ``lr`` is 0
    does not move its rates.

    **Safeguards** [package].  ``max_rate_growth`` (default 2): after the first 5 steps, a rate may
    grow by at most that factor per step, from below ``lr`` up to ``max_rate_growth·lr``
    (decreases are not limited); the ``"unit"`` and ``"param"`` rates on the steps the screen
    below flags, the global and layer rates on every step.  One gradient spike otherwise throws the rate up (the
    hypergradient ``⟨g_t, s_{t−1}⟩`` grows with the square of the gradients), the run overshoots,
    and the rate swings between 0 and ever larger values until the run diverges; on normal runs
    the cap does not bind (``inf`` turns it off).  The step's outcome is gated: the new scalar
    rates and weights are checked on the host, and a step that the screen flags (the first one; a
    hypergradient ``Σ_j |⟨g_j, s_j⟩|`` (in rate units) more than 10 times its running average, as
    a gradient spike gives; every step of float16 parameters) is first taken on copies, tensor
    by tensor; if anything it would write is not finite, the step is skipped with parameters and
    state untouched.

    **Memory.** Beyond the parameters and the base rule's buffers (none for ``sgd``, one for
    ``sgdn``, two for ``adam``), one parameter-sized buffer for ``s_{t−1}``; the ``"param"`` level
    adds one more parameter-sized tensor (its rates, in at least float32); ``"unit"`` adds one value
    per output unit, ``"layer"`` one float per tensor, ``"global"`` one float.  Adam's ``exp_avg_sq``
    is kept in at least float32 (in float16 the squares of small gradients underflow to 0, and
    ``m/(√v + eps)`` becomes ``g/eps``; ``torch.optim.Adam`` keeps it in the parameters' dtype).

    **Cost.** One extra pass over the gradients for the dot products, plus, for ``sgd``, a copy of
    the gradient into ``s``: plain SGD-HD cannot come close to ``torch.optim.SGD``'s single fused
    pass, while the Nesterov and Adam bases, which already make several passes, add relatively
    little.  The ``"unit"`` and ``"param"`` levels add a few passes each (three more for
    ``max_rate_growth``'s cap on their rates, on screened steps only).  Measured step times:
    see docs/benchmarks.md.

    **Default ``hyper_lr``.**  ``hyper_lr=None`` takes :data:`DEFAULT_HYPER_LR` for the base:
    1e-1 for ``sgd``, 1e-3 for ``sgdn``, 1e-4 for ``adam``.  No single number serves all three:
    ``⟨g, s⟩`` is about ``‖g‖²`` for SGD, about ``‖g‖²/(1−μ)`` for Nesterov, and about ``‖g‖₁`` (unit-sized
    entries summed over every parameter) for Adam.  The values come from a sweep over small MLPs
    (its setup and scores: see docs/benchmarks.md).  Mostly the hypergradient rescues a too-small
    ``lr``; at a well-tuned ``lr`` it changes little.  Adam's ``⟨g, s⟩`` grows with the number of
    parameters, so for models much larger than a small MLP lower it (Baydin et al. used 1e-7 on a
    1.8M-parameter MLP and 1e-8 on VGG; 1e-3 for the SGD family).  Too large a ``weight_lr`` drives
    the learned weights to a vertex of the simplex (a single level); see docs/benchmarks.md.

    Args:
        params: parameters or param groups.  Groups may differ in ``lr``, ``weight_decay``,
            ``momentum``, ``betas`` and ``eps``; the options below ``weight_decay`` are shared.
        base: ``"sgd"``, ``"sgdn"`` or ``"adam"``: the rule whose learning rate is learned.
        lr: the initial rate ``α_0`` of every level (and the scale that schedulers act on).
        hyper_lr: the hypergradient step β: one number for every level, one per entry of
            ``levels``, or ``None`` for the per-base default above.
        levels: the active levels, any non-empty combination of ``LEVELS`` (order does not matter).
        momentum: Nesterov momentum μ of ``"sgdn"`` (unused by the other bases).
        betas: Adam's ``(β1, β2)`` (``"adam"`` only).
        eps: Adam's ``eps``, added outside the square root (``"adam"`` only).
        weight_decay: L2 penalty added to the gradient (it enters the hypergradient too).
        weights: the combination weights, one per entry of ``levels``, on the simplex; ``None``
            means uniform.  The initial values when ``learn_weights``.
        learn_weights: learn the combination weights by projected hypergradient descent.
        weight_lr: the step size of the weights' hypergradient descent (see the note above).
        level_pull: λ of the pull toward the parent level: one number for every level or one per
            entry of ``levels`` (ignored for the coarsest active level, which has no parent).
        rate_bounds: ``(low, high)`` bounds of every level's rate, in multiples of the group's
            ``lr``; ``low`` may be ``-inf`` and ``high`` ``inf``.
        max_rate_growth: the factor by which a rate may grow per step after the first 5 (see
            Safeguards), in (1, inf]; ``inf`` turns the cap off.
        foreach: use the multi-tensor path on accelerators; ``False`` updates tensor by tensor (as the
            CPU always does, where that was measured faster).
        average_across_ranks: average a given loss across ``torch.distributed`` ranks (the method
            needs only gradients, which data parallelism already averages).
        compiled: the base rule's update as one ``torch.compile``\ d (TorchInductor) loop per
            tensor: Adam's moments, direction and step (:mod:`._adam_compiled`), SGD's ``prev ← g`` with
            the step (4 parameter-sized accesses instead of 5), Nesterov's buffer, direction and
            step (:mod:`._sgd_compiled`: 6 instead of 11).  The rates, the tensor levels' share of
            the step and the safeguards are unchanged.  Compiles once per set of parameter shapes;
            a missing compiler raises before any state changes.
        capturable: keep every decision of the step on the device (docs/algorithms.md, "The
            device-side step"): the gate, the rates, the weights (projected onto the simplex by a
            sort on the device), the screen's running scale and the records are 0-d device tensors
            (``level_weights`` a tuple of them), the whole step is formed next to the state and kept
            with ``torch.where`` where the default step would take it (the gate's values and the
            new rates finite and, on a screened step, every value it writes), and the state is
            updated in place, so the step never waits for the host and can be captured in a CUDA
            graph (after a few eager steps).  Each step costs about what a screened step of the
            default path costs (the step formed next to the state, and its extrema).  Skips are
            counted on the device and reported by :meth:`sync_warnings`.  Hyperparameters (``lr``,
            ``hyper_lr``, betas, ...) are read as Python numbers at each call: a graph keeps the
            values it was captured with.  Not with ``compiled=True`` (its kernels take host numbers
            and have no skip flag): a ``ValueError`` says so.
        max_consecutive_skips: raise after this many skipped steps in a row (see
            :class:`~lightning_adaptive_lr.optim._base.AdaptiveOptimizer`).

    A loss may be passed (``step(loss=...)``) but is not needed: it only joins the finiteness
    gate.  A non-finite gradient (or loss), or a step whose outcome would not be finite, skips the
    step: parameters and state unchanged.

    State: every param group holds, equal in all groups, ``step``, ``skipped_steps``,
    ``global_rate_multiple`` (the global rate as a multiple of ``lr``), ``level_weights`` (the
    current combination weights, in the order of ``levels``) and ``hypergradient_scale`` (the
    screen's running average), and its own ``hd_reference_lr``; ``state[p]`` holds ``prev_direction``
    (``s_{t−1}``; for Adam the unnormalised ``m/(sqrt(v̂)+eps)``, with ``direction_scale = 1/(1−β1^k)``),
    the base buffers (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``step``) and the tensor
    levels' rates ``hd_rate_layer`` (a float), ``hd_rate_unit``, ``hd_rate_param`` (tensors).

    Recorded in each param group after each step: ``effective_lr`` (the mean applied rate over the
    group's elements), ``hd_rate_global``, ``hd_rate_<level>_min`` / ``_mean`` / ``_max`` for the
    tensor-valued levels (absolute rates; means weighted by elements), and ``hd_weight_<level>``.
    On accelerators the unit and param statistics stay 0-d tensors: the step synchronizes once.

    Example:
        >>> import torch
        >>> from lightning_adaptive_lr import HierarchicalHD
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = HierarchicalHD(model.parameters(), base="sgdn", lr=1e-2)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.param_groups[0]["hd_rate_global"]  # s_0 = 0: the first step runs at lr
        0.01
    """

    requires_loss = False
    #: Tensor by tensor on the CPU: 0.93-0.97x the multi-tensor body's time on ResNet-18 (adam base,
    #: five runs; docs/benchmarks.md).
    single_tensor_on_cpu = True
    per_tensor_quantities = True  # per-tensor rates/norms: see AdaptiveOptimizer
    shared_options = (
        "base",
        "levels",
        "hyper_lr",
        "weights",
        "learn_weights",
        "weight_lr",
        "level_pull",
        "rate_bounds",
        "max_rate_growth",
        "capturable",
    )
    #: The ``capturable`` step's outcome checks, named in its skip record (:meth:`_device_outcome`).
    outcome_scalars: ClassVar[frozenset[str]] = frozenset({"new_rates", "new_state"})
    #: ``level_weights`` is a tuple, one weight per level: the base's conversions take single numbers,
    #: so :meth:`_device_group_state` and :meth:`_host_group_state` here convert it weight by weight.
    host_group_state: ClassVar[frozenset[str]] = frozenset({"level_weights"})
    group_state: ClassVar[dict[str, Any]] = {
        **AdaptiveOptimizer.group_state,
        "global_rate_multiple": 1.0,
        "level_weights": (),  # set from `weights` by the constructor
        "hypergradient_scale": 0.0,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: Literal["sgd", "sgdn", "adam"] = "sgd",
        lr: float = 1e-3,
        hyper_lr: float | Sequence[float] | None = None,
        levels: Sequence[str] = ("global", "layer"),
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        weights: Sequence[float] | None = None,
        learn_weights: bool = False,
        weight_lr: float = 1.0,
        level_pull: float | Sequence[float] = 0.0,
        rate_bounds: tuple[float, float] = (0.0, math.inf),
        max_rate_growth: float = DEFAULT_MAX_RATE_GROWTH,
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
        compiled: bool = False,
        capturable: bool = False,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        name = type(self).__name__
        check_choice(name, "base", base, BASES)  # the default hyper_lr depends on it
        active = self._check_levels(levels)
        hyper = self._per_level(
            "hyper_lr", DEFAULT_HYPER_LR[base] if hyper_lr is None else hyper_lr, levels, active
        )
        pull = self._per_level("level_pull", level_pull, levels, active)
        for level in active:
            if 2.0 * hyper[level] * pull[level] > 1.0:
                raise ValueError(
                    f"{name}: `level_pull` × `hyper_lr` must be ≤ 0.5 for every level (2·β·λ is the fraction "
                    f"of the gap to the parent closed per step); got β={hyper[level]:g}, λ={pull[level]:g} "
                    f"for level {level!r}"
                )
        defaults = checked(
            name, locals(), base=one_of(*BASES), lr=NONNEGATIVE, momentum=FRACTION, betas=BETAS, eps=NONNEGATIVE,
            weight_decay=NONNEGATIVE, learn_weights=FLAG, weight_lr=NONNEGATIVE, compiled=FLAG, capturable=FLAG,
        )  # fmt: skip
        if compiled and capturable:
            raise ValueError(_COMPILED_AND_CAPTURABLE.format(name=name))
        initial_weights = self._check_weights(weights, levels, active)
        defaults.update(
            levels=active,
            hyper_lr=tuple(hyper[level] for level in active),
            weights=initial_weights,
            level_pull=tuple(pull[level] for level in active),
            rate_bounds=self._check_bounds(rate_bounds),
            max_rate_growth=self._check_growth(max_rate_growth),
            level_weights=initial_weights,
            **{REFERENCE_LR: None},
        )
        if base != "adam":
            # torch's momentum-cycling schedulers (OneCycleLR, CyclicLR) and Lightning's
            # LearningRateMonitor read `betas` when the defaults have it, else `momentum`: only
            # Adam's base keeps `betas`, so that they act on the momentum the base uses.
            del defaults["betas"]
        super().__init__(params, defaults, **runtime_options(locals()))

    # ------------------------------------------------------------------ argument checks

    @classmethod
    def _check_levels(cls, levels: Sequence[str]) -> tuple[str, ...]:
        """The active levels in canonical (coarse to fine) order."""
        name = cls.__name__
        if isinstance(levels, str) or not isinstance(levels, Sequence) or len(levels) == 0:
            raise ValueError(f"{name}: `levels` must be a non-empty sequence drawn from {LEVELS}, got {levels!r}")
        unknown = [level for level in levels if level not in LEVELS]
        if unknown or len(set(levels)) != len(levels):
            raise ValueError(f"{name}: `levels` must be distinct names from {LEVELS}, got {tuple(levels)!r}")
        return tuple(level for level in LEVELS if level in levels)

    @classmethod
    def _per_level(
        cls, arg: str, value: float | Sequence[float], levels: Sequence[str], active: tuple[str, ...]
    ) -> dict[str, float]:
        """One non-negative number per active level, from one number or one per entry of ``levels``."""
        name = cls.__name__
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != len(levels):
                raise ValueError(
                    f"{name}: `{arg}` must be one number or one per level ({len(levels)}), got {value!r}"
                )
            for i, v in enumerate(value):
                check_range(name, f"{arg}[{i}]", v, 0.0, None)
            return {level: float(v) for level, v in zip(levels, value)}
        check_range(name, arg, value, 0.0, None)  # type: ignore[arg-type]
        return {level: float(value) for level in active}  # type: ignore[arg-type]

    @classmethod
    def _check_weights(
        cls, weights: Sequence[float] | None, levels: Sequence[str], active: tuple[str, ...]
    ) -> tuple[float, ...]:
        """The combination weights in canonical level order: given (on the simplex) or uniform."""
        name = cls.__name__
        if weights is None:
            return tuple(1.0 / len(active) for _ in active)
        if not isinstance(weights, Sequence) or len(weights) != len(levels):
            raise ValueError(f"{name}: `weights` must hold one number per level ({len(levels)}), got {weights!r}")
        for i, w in enumerate(weights):
            check_range(name, f"weights[{i}]", w, 0.0, None)
        total = float(sum(weights))
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"{name}: `weights` must sum to 1 (they lie on the simplex), got sum {total!r}")
        by_level = dict(zip(levels, weights))
        return tuple(float(by_level[level]) / total for level in active)

    @classmethod
    def _check_growth(cls, value: float) -> float:
        number = real_number(value)
        if number is None or math.isnan(number) or number <= 1.0:
            raise ValueError(f"{cls.__name__}: `max_rate_growth` must be a number in (1, inf], got {value!r}")
        return number

    @classmethod
    def _check_bounds(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        name = cls.__name__
        ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2
        ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) and not math.isnan(b) for b in bounds)
        if not ok or bounds[0] > bounds[1] or bounds[0] == math.inf or bounds[1] == -math.inf:
            raise ValueError(
                f"{name}: `rate_bounds` must be a pair (low, high) with -inf ≤ low ≤ high ≤ inf, got {bounds!r}"
            )
        return (float(bounds[0]), float(bounds[1]))

    # ------------------------------------------------------------------ state dicts

    def _legacy_group_state(self, legacy: dict[str, Any]) -> dict[str, Any]:
        """Release 0.1 kept ``hd_rate_global`` and ``hd_weights`` in ``state["global"]``.

        ``hd_rate_global`` is also the name of the rate recorded in the groups (in absolute
        units), so the multiple is kept as ``global_rate_multiple``.
        """
        return {
            "step": legacy.get("step", 0),
            "skipped_steps": legacy.get("skipped_steps", 0),
            "global_rate_multiple": legacy.get("hd_rate_global", 1.0),
            "level_weights": tuple(legacy.get("hd_weights", self.param_groups[0]["weights"])),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # `max_rate_growth` came after release 0.1: older groups take this optimizer's.
        groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(groups, list) and all(isinstance(group, dict) for group in groups):
            growth = self.param_groups[0]["max_rate_growth"]
            state_dict = {**state_dict, "param_groups": [{"max_rate_growth": growth, **group} for group in groups]}
        super().load_state_dict(state_dict)
        # torch casts floating-point state to its parameter's dtype; the unit and param rates and
        # Adam's v are kept in at least float32 (16-bit rates would lose the small hypergradient
        # steps, a 16-bit v the squares of small gradients), so put them back with their own dtype,
        # and so the scalars a capturable optimizer keeps as 0-d tensors (float64, Adam's count int64).
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in ("hd_rate_unit", "hd_rate_param", "exp_avg_sq", *_SCALAR_STATE):
                if isinstance(saved.get(key), Tensor):
                    self.state[p][key] = saved[key].detach().clone().to(device=p.device)

    def _new_state(self, p: Tensor) -> dict[str, Any]:
        """A parameter's state at its first step (not stored): ``s_0 = 0``, every rate 1 (× ``lr``)."""
        options = self.param_groups[0]
        state: dict[str, Any] = {"prev_direction": torch.zeros_like(p, memory_format=torch.preserve_format)}
        if options["base"] == "sgdn":  # 0 then μ·0 + g: the first g, as torch.optim.SGD starts it
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if options["base"] == "adam":
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # v in at least float32: in float16 the squares of small gradients underflow to 0 and
            # the direction m/(√v + eps) becomes g/eps.
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=work_dtype(p.dtype), memory_format=torch.preserve_format)
            state["direction_scale"] = 1.0
        if "layer" in options["levels"]:
            state["hd_rate_layer"] = 1.0
        if "unit" in options["levels"]:
            units = p.shape[0] if p.dim() > 0 else 1
            state["hd_rate_unit"] = torch.ones(units, dtype=work_dtype(p.dtype), device=p.device)
        if "param" in options["levels"]:
            state["hd_rate_param"] = torch.ones_like(p, dtype=work_dtype(p.dtype), memory_format=torch.preserve_format)
        return state

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        """A parameter's state, created (:meth:`_new_state`) at its first step."""
        state = self.state[p]
        if "prev_direction" not in state:
            state.update(self._new_state(p))
        return state

    # ------------------------------------------------------------------ the step

    def _gather(self) -> list[_Reads]:
        """Every group's parameters with a gradient, their effective gradients and states (read only)."""
        reads = []
        for group in self.param_groups:
            params, grads = self._params_and_grads(group)
            if params:
                grads = with_l2(params, grads, group["weight_decay"], foreach=group["foreach"])
                states = [self.state.get(p, {}) for p in params]  # .get: the defaultdict creates nothing
                prevs = [st.get("prev_direction") for st in states]
                scales = [st.get("direction_scale", 1.0) for st in states]
                reads.append(_Reads(group, params, grads, prevs, scales, states))
        return reads

    def _update(self, loss: Tensor | None) -> None:
        if self._capturable:
            self._device_update(loss)
            return
        self._host_group_state()
        reads = self._gather()
        if not reads:
            return
        options = self.param_groups[0]
        levels: tuple[str, ...] = options["levels"]
        params = _flat(reads, "params")
        if self._is_state_initialization():  # torch.distributed.checkpoint lays out the state
            for p in params:
                self._init_state(p)
            self._record_all(levels, dict(zip(levels, self._shared("level_weights"))))
            return
        if params and any(group.get("compiled") for group in self.param_groups):
            ensure_inductor_works(self._name, params[0].device)  # before any state changes

        scalars, unit_sums = self._gate_scalars(reads, loss)
        values = self._gate(**scalars)  # the step's one synchronization
        if values is None:
            return
        # The outcome, before anything is written: the new scalar rates and weights (host
        # arithmetic); where the screen asks for it, the whole step taken on copies.
        plan = self._plan(reads, values)
        if not plan.finite:
            self._skip_step("outcome", ["the new learning rates"])
            return
        if plan.check and not self._agree(self._outcome_is_finite(reads, plan, unit_sums)):
            self._skip_step("outcome", ["the step's parameters or state"])
            return

        states = [self._init_state(p) for p in params]
        _apply_step_(plan, levels, reads, states, unit_sums, foreach=options["foreach"])
        self._set_shared(
            step=self._shared("step") + 1,
            global_rate_multiple=plan.global_rate,
            level_weights=tuple(plan.weights[k] for k in levels),
            hypergradient_scale=plan.scale,
        )
        for r, reference in zip(reads, plan.references):
            r.group[REFERENCE_LR] = reference
        self._record_all(levels, plan.weights)

    def _gate_scalars(
        self, reads: list[_Reads], loss: Tensor | None
    ) -> tuple[dict[str, Tensor], list[Tensor | None]]:
        """What the gate reads, and the per-unit sums the step uses: ⟨g_j, prev_j⟩ per tensor (and
        per output unit), the loss if given, and the weights' partials Σ_i g_i·prev_i·ρ_i per tensor
        (a tensor without s_{t−1} has h = 0: tensor_dots' None).  Device tensors; nothing is read."""
        options = self.param_groups[0]
        levels: tuple[str, ...] = options["levels"]
        grads, prevs, found = (_flat(reads, k) for k in ("grads", "prevs", "states"))
        device = grads[0].device
        if "unit" in levels:
            self._require_whole_units('the "unit" level')
        scalars = {"dots": tensor_dots(grads, prevs, device)}
        if loss is not None:
            scalars["loss"] = loss
        unit_sums = [None if s is None else unit_dots(g, s) for g, s in zip(grads, prevs)] if "unit" in levels else []
        if options["learn_weights"] and "unit" in levels:
            terms = [g if u is None else u for g, u in zip(grads, unit_sums)]
            unit_rates = [None if s is None else st["hd_rate_unit"] for s, st in zip(prevs, found)]
            scalars["unit_partial"] = tensor_dots(terms, unit_rates, device)
        if options["learn_weights"] and "param" in levels:
            terms = [g if s is None else g * s for g, s in zip(grads, prevs)]
            param_rates = [None if s is None else st["hd_rate_param"] for s, st in zip(prevs, found)]
            scalars["param_partial"] = tensor_dots(terms, param_rates, device)
        return scalars, unit_sums

    def _plan(self, reads: list[_Reads], values: dict[str, Any]) -> _Plan:
        """The rules on the previous rates and weights: the new global and layer rates, the new
        weights, the tensor levels' steps, the screen, and whether the new rates and weights are
        finite.  On the host from the gate's numbers, or on the device from its tensors and the
        state's 0-d tensors (``capturable``): the same functions.  Nothing is written."""
        options = self.param_groups[0]
        levels: tuple[str, ...] = options["levels"]
        beta, lam = dict(zip(levels, options["hyper_lr"])), dict(zip(levels, options["level_pull"]))
        low, high = options["rate_bounds"]
        scales, found, params = (_flat(reads, k) for k in ("scales", "states", "params"))
        groups = [r.group for r in reads for _ in r.params]
        dots = values["dots"]
        weights = dict(zip(levels, self._shared("level_weights")))
        old_global = self._shared("global_rate_multiple")
        old_layer = [st.get("hd_rate_layer", 1.0) for st in found]

        references = [
            reference_lr(r.group["lr"], r.group.get("initial_lr"), r.group.get("max_lr"), r.group.get(REFERENCE_LR))
            for r in reads
        ]
        lr_refs = [ref for r, ref in zip(reads, references) for _ in r.params]
        coefs = [rate_step_factor(g["lr"], ref, a) for g, ref, a in zip(groups, lr_refs, scales)]
        growth = where(self._shared("step") >= _GROWTH_WARMUP, options["max_rate_growth"], math.inf)

        new_weights = weights
        if options["learn_weights"]:
            partials = {k: values[f"{k}_partial"] for k in ("unit", "param") if k in levels}
            absolute = [g["lr"] * a for g, a in zip(groups, scales)]
            gradient = weight_hypergradients(levels, absolute, dots, old_global, old_layer, partials)
            moved = project_simplex([weights[k] - options["weight_lr"] * gradient[k] for k in levels])
            new_weights = dict(zip(levels, moved))
        layer_rates = list(old_layer)
        if "layer" in levels:
            step = weights["layer"] * beta["layer"]
            pull = 2.0 * beta["layer"] * lam["layer"] if "global" in levels else 0.0
            layer_rates = [
                hd_rate(r, d, step * c, pull=pull, parent=old_global, low=low, high=high, growth=growth)
                for r, d, c in zip(old_layer, dots, coefs)
            ]
        new_global = old_global
        if "global" in levels:
            alignment = sum(c * d for c, d in zip(coefs, dots))
            step = weights["global"] * beta["global"]
            new_global = hd_rate(old_global, alignment, step, low=low, high=high, growth=growth)
        # The screen (host arithmetic): the first step, a hypergradient without a running average
        # yet or far above it (a gradient spike), float16 parameters (whose range the base rule's
        # buffers can overflow with ordinary gradients): the step is then tried on copies first.
        size = hypergradient_size(coefs, dots)
        scale = self._shared("hypergradient_scale")
        check = (self._shared("step") == 0) | _is_spike(size, scale) | any(p.dtype == torch.float16 for p in params)
        tensor_levels = [k for k in ("unit", "param") if k in levels]
        return _Plan(
            weights=new_weights,
            global_rate=new_global,
            layer_rates=layer_rates,
            old_global=old_global,
            old_layer=old_layer,
            tensor_steps={k: [weights[k] * beta[k] * c for c in coefs] for k in tensor_levels},
            pulls={k: 2.0 * beta[k] * lam[k] for k in tensor_levels},
            bounds=(low, high),
            references=references,
            growth=growth,
            scale=running_scale(scale, size),
            check=check,
            finite=_all_finite([size, new_global, *layer_rates, *new_weights.values()]),
        )

    def _outcome_is_finite(self, reads: list[_Reads], plan: _Plan, unit_sums: list[Tensor | None]) -> bool:
        """Whether the step leaves every parameter and state value finite, found by taking it on
        copies, one tensor at a time, with the per-tensor bodies (the same operations)."""
        levels: tuple[str, ...] = self.param_groups[0]["levels"]
        extrema: list[Tensor] = []
        j = 0
        for r in reads:
            group = {**r.group, "foreach": False}
            for p, g, prev, scale, found in zip(r.params, r.grads, r.prevs, r.scales, r.states):
                state = _copied(found) if prev is not None else self._new_state(p)
                prevs = [None if prev is None else state["prev_direction"]]
                copy = _Reads(group, [p.detach().clone()], [g.clone()], prevs, [scale], [state])
                _apply_step_(plan.at(j), levels, [copy], [state], unit_sums[j : j + 1], foreach=False)
                tensors = [copy.params[0], *(v for v in state.values() if isinstance(v, Tensor))]
                numbers = [float(v) for v in state.values() if isinstance(v, float)]
                if not all(math.isfinite(v) for v in numbers):
                    return False
                extrema.extend(tensor_extrema(tensors, p.device))
                j += 1
        device = extrema[0].device
        return bool(torch.isfinite(torch.stack([e.to(device) for e in extrema])).all())

    # ------------------------------------------------------------------ the device-side step

    def _device_update(self, loss: Tensor | None) -> None:
        """``capturable``: the step with every decision on the device; nothing is read to the host.

        The default step's rules, on the gate's values kept as tensors and the state's 0-d tensors
        (:meth:`_plan`); the whole step formed next to the state (:meth:`_staged_step`: what the
        default step takes on copies where the screen asks); then kept ``where`` the default step
        would take it (the gate's values and the new rates finite, and on a screened step every
        value it writes): a step not taken leaves parameters and state bit for bit as they were.
        """
        reads = self._gather()
        if not reads:
            return
        if any(group.get("compiled") for group in self.param_groups):
            raise ValueError(_COMPILED_AND_CAPTURABLE.format(name=self._name))
        levels: tuple[str, ...] = self.param_groups[0]["levels"]
        device = reads[0].grads[0].device
        if any(p.device != device for r in reads for p in r.params):
            raise RuntimeError(
                f"{self._name}(capturable=True) keeps the step's scalars on one device, but the parameters lie on "
                f"several ({sorted({str(p.device) for r in reads for p in r.params})}); use one optimizer per "
                "device, or capturable=False."
            )
        initializing = self._is_state_initialization()  # torch.distributed.checkpoint lays out the state
        self._device_group_state(device)
        reads = [self._stated(r) for r in reads]
        if initializing:  # the records too, as device tensors: the layout a loaded state dict fills
            none_yet = torch.zeros((), dtype=accumulation_dtype(device), device=device)  # as _commit_shared keeps it
            for r in reads:
                if r.group.get(REFERENCE_LR) is None:
                    self._record_on_device(r.group, **{REFERENCE_LR: none_yet})
            self._record_all_on_device(levels, torch.ones((), dtype=torch.bool, device=device))
            return
        scalars, unit_sums = self._gate_scalars(reads, loss)
        values, ok = self._device_gate(("new_rates", "new_state"), **scalars)
        plan = self._plan(reads, values)
        staged = self._staged_step(plan, reads, unit_sums)
        written = self._agreed_on_device(_outcome_finite(staged, device))
        # the outcome: a new scalar rate or weight not finite, or (screened) a value the step writes
        taken = self._device_outcome(ok, ~plan.finite, plan.finite & plan.check & ~written)
        self._commit(_flat(reads, "params"), staged, taken)
        self._commit_shared(levels, plan, reads, taken)
        self._record_all_on_device(levels, taken)

    def _device_group_state(self, device: torch.device) -> None:
        """:meth:`~._base.AdaptiveOptimizer._device_group_state`, and ``level_weights`` as a tuple of
        0-d tensors (one per level, as the default path's tuple of numbers)."""
        weights = self._shared("level_weights")
        if not all(isinstance(w, Tensor) and w.device == device for w in weights):
            dtype = accumulation_dtype(device)
            self._set_shared(level_weights=tuple(torch.as_tensor(w, dtype=dtype).to(device) for w in weights))
        super()._device_group_state(device)

    def _host_group_state(self) -> None:
        """The reverse of :meth:`_device_group_state` and :meth:`_device_state`, for a default step
        after ``capturable`` ones (a state dict saved by a capturable optimizer, the option switched
        off): the optimizer-wide numbers, each group's ``hd_reference_lr`` and the parameters'
        :data:`_SCALAR_STATE` back to Python numbers.  Nothing is read when they are numbers."""
        if not isinstance(self._shared("step"), Tensor):
            return
        self._set_shared(level_weights=tuple(float(w) for w in self._shared("level_weights")))
        for group in self.param_groups:
            if isinstance(group.get(REFERENCE_LR), Tensor):
                group[REFERENCE_LR] = group[REFERENCE_LR].item()
        for p in [p for group in self.param_groups for p in group["params"]]:
            state = self.state.get(p, {})
            for key in _SCALAR_STATE:
                if isinstance(state.get(key), Tensor):
                    state[key] = state[key].item()
        super()._host_group_state()

    def _device_state(self, p: Tensor) -> dict[str, Any]:
        """A parameter's state for a ``capturable`` step: created at its first step, taken or not
        (:meth:`_new_state`), its :data:`_SCALAR_STATE` as 0-d tensors on its device (Adam's count
        int64, the rest in :func:`~._reduce.accumulation_dtype`), written in place from then on."""
        state = self._init_state(p)
        for key in _SCALAR_STATE:
            value = state.get(key)
            if value is not None and not isinstance(value, Tensor):
                dtype = torch.int64 if key == "step" else accumulation_dtype(p.device)
                state[key] = torch.tensor(value, dtype=dtype, device=p.device)
        return state

    def _stated(self, reads: _Reads) -> _Reads:
        """``reads`` with every parameter's state (:meth:`_device_state`): its ``s_{t−1}`` (zeros at
        its first step, which give the default step's ``h = 0``) and ``direction_scale``."""
        states = [self._device_state(p) for p in reads.params]
        prevs = [st["prev_direction"] for st in states]
        scales = [st.get("direction_scale", 1.0) for st in states]
        return replace(reads, prevs=prevs, scales=scales, states=states)

    def _staged_step(
        self, plan: _Plan, reads: list[_Reads], unit_sums: list[Tensor | None]
    ) -> list[tuple[Tensor, dict[str, Any]]]:
        """Everything the step writes, as new tensors next to the state (``capturable``): per tensor
        of all groups, its new parameter and its new state (entries the step does not write are the
        state's own).  :func:`_apply_step_`'s order and rules: the rates (:func:`_move_rates_` on
        copies), the base rule with the new rates and weights (:func:`_device_base_step`), the
        tensor levels' share (:func:`_descended`)."""
        options = self.param_groups[0]
        levels: tuple[str, ...] = options["levels"]
        states = [dict(st) for st in _flat(reads, "states")]
        tensor_rates = [_RATE_KEYS[level] for level in ("param", "unit") if level in levels]
        for st in states:  # moved in place by _move_rates_: copies, the state's own stay as they are
            st.update((key, st[key].clone()) for key in tensor_rates)
        _move_rates_(plan, levels, reads, states, unit_sums, foreach=options["foreach"])
        new_params: list[Tensor] = []
        offset = 0
        for r in reads:
            sts = states[offset : offset + len(r.params)]
            offset += len(r.params)
            lr = r.group["lr"]
            rates = [lr * scalar_rate(plan.weights, plan.global_rate, st.get("hd_rate_layer", 1.0)) for st in sts]
            steps = _device_base_step(r.group, r.grads, sts, rates)
            new_params += [_descended(p, st, step, lr, plan.weights) for p, st, step in zip(r.params, sts, steps)]
        return list(zip(new_params, states))

    def _agreed_on_device(self, flag: Tensor) -> Tensor:
        """:meth:`_agree` on the device: ``flag`` if every process of the sharding group has it."""
        vote = flag.to(torch.float32).reshape(1)
        return self._completed(vote, [_sharding.MIN])[0] > 0

    def _commit(self, params: list[Tensor], staged: list[tuple[Tensor, dict[str, Any]]], taken: Tensor) -> None:
        """Parameters and states ``where`` the step is ``taken``, each :func:`~._base.written_into`
        its tensor (a CUDA graph that captured the step reads and writes the same memory)."""
        for p, (new_p, new_state) in zip(params, staged):
            keep = taken.to(p.device)
            p.copy_(torch.where(keep, new_p, p))
            state = self.state[p]
            for key, value in new_state.items():
                old = state[key]
                if value is not old:
                    value = value.to(device=old.device, dtype=old.dtype)
                    state[key] = written_into(old, torch.where(keep.to(old.device), value, old))

    def _commit_shared(self, levels: tuple[str, ...], plan: _Plan, reads: list[_Reads], taken: Tensor) -> None:
        """The optimizer-wide numbers and each group's ``lr_ref`` ``where`` the step is ``taken``;
        the step and skip counts (``hd_reference_lr`` 0 where no step was taken yet: ``lr ≥ 0``)."""
        old_weights = self._shared("level_weights")
        weights = [written_into(w, torch.where(taken, plan.weights[k], w)) for k, w in zip(levels, old_weights)]
        self._set_shared(level_weights=tuple(weights))  # the same tensors, in every group
        self._set_shared_on_device(
            global_rate_multiple=torch.where(taken, plan.global_rate, self._shared("global_rate_multiple")),
            hypergradient_scale=torch.where(taken, plan.scale, self._shared("hypergradient_scale")),
        )
        self._count_device_step(taken)
        for r, reference in zip(reads, plan.references):
            kept = r.group.get(REFERENCE_LR)
            self._record_on_device(r.group, **{REFERENCE_LR: where(taken, reference, 0.0 if kept is None else kept)})

    # ------------------------------------------------------------------ recording

    def _record_all(self, levels: tuple[str, ...], weights: Mapping[str, float]) -> None:
        """Write effective_lr, the levels' rates (absolute) and the weights into every param group."""
        global_rate = self._shared("global_rate_multiple")
        for group in self.param_groups:
            lr = group["lr"]
            stated = [(p, self.state[p]) for p in group["params"] if "prev_direction" in self.state.get(p, {})]
            sizes = [p.numel() for p, _ in stated]
            total = float(sum(sizes))
            values: dict[str, Scalar] = {}
            mean: Scalar = 0.0  # Σ_k w_k · (element mean of level k's multiple)
            if "global" in levels:
                values["hd_rate_global"] = lr * global_rate
                mean = mean + weights["global"] * global_rate
            if self._layout is not None and len(levels) > ("global" in levels):  # sharded: complete the statistics
                statistics = self._sharded_statistics(levels, stated)
                for level, (low, level_mean, high) in statistics.items():
                    key = _RATE_KEYS.get(level, "hd_rate_layer")
                    values.update({f"{key}_min": lr * low, f"{key}_mean": lr * level_mean, f"{key}_max": lr * high})
                    mean = mean + weights[level] * level_mean
            elif "layer" in levels:
                rates = [st["hd_rate_layer"] for _, st in stated] or [1.0]
                layer_mean = sum(r * n for r, n in zip(rates, sizes)) / total if total else 1.0
                values.update(
                    hd_rate_layer_min=lr * min(rates),
                    hd_rate_layer_mean=lr * layer_mean,
                    hd_rate_layer_max=lr * max(rates),
                )
                mean = mean + weights["layer"] * layer_mean
            for level in ("unit", "param") if self._layout is None else ():
                if level in levels:
                    low, high, level_mean = self._rate_statistics(level, stated, total)
                    key = _RATE_KEYS[level]
                    values.update({f"{key}_min": lr * low, f"{key}_mean": lr * level_mean, f"{key}_max": lr * high})
                    mean = mean + weights[level] * level_mean
            values["effective_lr"] = lr * mean
            values.update({f"hd_weight_{level}": weights[level] for level in levels})
            self._record(group, **values)

    def _sharded_statistics(
        self, levels: tuple[str, ...], stated: list[tuple[Tensor, dict[str, Any]]]
    ) -> dict[str, tuple[float, float, float]]:
        """(min, element-weighted mean, max) of each tensor-valued level's multiples over all shards,
        completed in one collective (1 before any step)."""
        entries: list[Tensor] = []
        kinds: list[str] = []
        device = self._device()
        dtype = accumulation_dtype(device)
        sizes = [_local_tensor(p).numel() for p, _ in stated]
        entries.append(torch.tensor(float(sum(sizes)), dtype=dtype))
        kinds.append("sum")
        order = [level for level in ("layer", "unit", "param") if level in levels]
        for level in order:
            if level == "layer":
                rates = [torch.tensor(float(st["hd_rate_layer"]), dtype=dtype) for _, st in stated]
                counts = [float(n) for n in sizes]
            else:
                rates = [st[_RATE_KEYS[level]].to(dtype) for _, st in stated]
                counts = [float(n // r.numel()) if r.numel() else 0.0 for n, r in zip(sizes, rates)]
            present = [r.reshape(-1) for r in rates if r.numel()]
            flat = torch.cat(present).cpu() if present else torch.zeros(0, dtype=dtype)
            low = flat.min() if flat.numel() else torch.tensor(math.inf, dtype=dtype)
            high = flat.max() if flat.numel() else torch.tensor(-math.inf, dtype=dtype)
            weighted = sum((r.sum().cpu() * c for r, c in zip(rates, counts)), torch.zeros((), dtype=dtype))
            entries += [low, high, weighted]
            kinds += ["min", "max", "sum"]
        done = self._completed(torch.stack(entries).to(device), kinds).tolist()
        total, out = done[0], {}
        for i, level in enumerate(order):
            low, high, weighted = done[1 + 3 * i : 4 + 3 * i]
            out[level] = (low, weighted / total, high) if total else (1.0, 1.0, 1.0)
        return out

    def _rate_statistics(
        self, level: str, stated: list[tuple[Tensor, dict[str, Any]]], total: float
    ) -> tuple[Scalar, Scalar, Scalar]:
        """Min, max and element-weighted mean of a tensor-valued level's multiples (1 before any step)."""
        if not stated:
            return 1.0, 1.0, 1.0
        rates = [st[_RATE_KEYS[level]] for _, st in stated]
        device = rates[0].device
        low, high = tensor_extrema(rates, device)
        # Elements per rate: a unit's rate covers its row, a param's rate its element.
        counts = torch.tensor([p.numel() / r.numel() for (p, _), r in zip(stated, rates)], dtype=low.dtype)
        mean = (tensor_sums(rates, device) * counts.to(device)).sum() / total
        return self._to_host_if_free(low, high, mean)  # type: ignore[return-value]

    def _record_all_on_device(self, levels: tuple[str, ...], taken: Tensor) -> None:
        """:meth:`_record_all` for a ``capturable`` step: the same records as 0-d tensors, from the
        state after the step, kept ``where`` it was ``taken`` (a group's first records: the state as
        it stands), each :func:`~._base.written_into` the record there."""
        weights = dict(zip(levels, self._shared("level_weights")))
        global_rate = self._shared("global_rate_multiple")
        device = global_rate.device
        for group in self.param_groups:
            lr = group["lr"]
            stated = [(p, self.state[p]) for p in group["params"] if "prev_direction" in self.state.get(p, {})]
            values: dict[str, Tensor] = {}
            mean: Scalar = 0.0  # Σ_k w_k · (element mean of level k's multiple)
            if "global" in levels:
                values["hd_rate_global"] = lr * global_rate
                mean = mean + weights["global"] * global_rate
            if self._layout is not None and len(levels) > ("global" in levels):  # sharded: complete the statistics
                statistics = self._sharded_statistics_on_device(levels, stated, device)
            else:
                total = float(sum(p.numel() for p, _ in stated))
                statistics = {
                    level: self._statistics_on_device(level, stated, total, device)
                    for level in ("layer", "unit", "param")
                    if level in levels
                }
            for level, (low, level_mean, high) in statistics.items():
                key = _RATE_KEYS.get(level, "hd_rate_layer")
                values.update({f"{key}_min": lr * low, f"{key}_mean": lr * level_mean, f"{key}_max": lr * high})
                mean = mean + weights[level] * level_mean
            values["effective_lr"] = lr * mean  # type: ignore[assignment]
            values.update({f"hd_weight_{level}": weights[level] for level in levels})
            previous = {key: group.get(key) for key in values}
            kept = {
                key: torch.where(taken, value, previous[key] if isinstance(previous[key], Tensor) else value)
                for key, value in values.items()
            }
            self._record_on_device(group, **kept)

    def _statistics_on_device(
        self, level: str, stated: list[tuple[Tensor, dict[str, Any]]], total: float, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Min, element-weighted mean and max of a level's multiples as 0-d tensors on ``device``
        (``capturable``; 1 before any step): :meth:`_record_all`'s layer statistics and
        :meth:`_rate_statistics`, the element counts entering as numbers."""
        if not stated or not total:
            one = torch.ones((), dtype=accumulation_dtype(device), device=device)
            return one, one, one
        if level == "layer":
            rates = [st["hd_rate_layer"].to(device) for _, st in stated]
            stacked = torch.stack(rates)
            mean = sum(r * p.numel() for r, (p, _) in zip(rates, stated)) / total
            return stacked.min(), mean, stacked.max()  # type: ignore[return-value]
        tensors = [st[_RATE_KEYS[level]] for _, st in stated]
        low, high = tensor_extrema(tensors, device)
        # Elements per rate: a unit's rate covers its row, a param's rate its element.
        sums = tensor_sums(tensors, device)
        mean = sum(s * (p.numel() / r.numel()) for s, (p, _), r in zip(sums, stated, tensors)) / total
        return low, mean, high  # type: ignore[return-value]

    def _sharded_statistics_on_device(
        self, levels: tuple[str, ...], stated: list[tuple[Tensor, dict[str, Any]]], device: torch.device
    ) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """:meth:`_sharded_statistics` as 0-d tensors on ``device`` (``capturable``): the same
        entries, completed in the same one collective, nothing read."""
        dtype = accumulation_dtype(device)
        sizes = [_local_tensor(p).numel() for p, _ in stated]
        entries = [torch.full((), float(sum(sizes)), dtype=dtype, device=device)]
        kinds = [_sharding.SUM]
        order = [level for level in ("layer", "unit", "param") if level in levels]
        for level in order:
            if level == "layer":
                rates = [st["hd_rate_layer"].to(device=device, dtype=dtype).reshape(1) for _, st in stated]
                counts = [float(n) for n in sizes]
            else:
                rates = [st[_RATE_KEYS[level]].to(device=device, dtype=dtype) for _, st in stated]
                counts = [float(n // r.numel()) if r.numel() else 0.0 for n, r in zip(sizes, rates)]
            present = [r for r in rates if r.numel()]
            if present:
                low, high = tensor_extrema(present, device)
            else:
                low, high = entries[0].new_full((), math.inf), entries[0].new_full((), -math.inf)
            weighted = sum((r.sum() * c for r, c in zip(rates, counts)), entries[0].new_zeros(()))
            entries += [low, high, weighted]
            kinds += [_sharding.MIN, _sharding.MAX, _sharding.SUM]
        done = self._completed(torch.stack(entries), kinds)
        total, out = done[0], {}
        for i, level in enumerate(order):
            low, high, weighted = done[1 + 3 * i], done[2 + 3 * i], done[3 + 3 * i]
            some = total > 0
            out[level] = (torch.where(some, low, 1.0), torch.where(some, weighted / total, 1.0), torch.where(some, high, 1.0))
        return out
