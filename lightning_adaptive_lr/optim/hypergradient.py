"""Multi-level (hierarchical) hypergradient descent on top of SGD, SGD-Nesterov and Adam.

Jie, Gao, Vasnev, Tran. "Adaptive hierarchical hyper-gradient descent." arXiv:2008.07277 (2020),
International Journal of Machine Learning and Cybernetics (2022).  Built on Baydin, Cornish,
Martínez Rubio, Schmidt, Wood. "Online learning rate adaptation with hypergradient descent."
ICLR 2018.  ALGORITHMS.md §3: the base rule and the single-level method are [exact]; the
combination of levels is [reconstructed] (see :class:`HierarchicalHD`).

The learning rate is itself learned by gradient descent: the derivative of the loss at ``x_t`` with
respect to the rate applied at the previous step is ``−⟨g_t, s_{t−1}⟩``, where ``s`` is the base
rule's direction for a unit rate.  Several *levels* of rates (one for the model, one per tensor,
one per output unit, one per element) each follow their share of that derivative, and the rate
actually applied is their convex combination.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from ._base import AdaptiveOptimizer, check_betas, check_choice, check_flag, check_range
from ._scalars import Scalar
from ._tensorlists import accumulation_dtype, group_by_device_and_dtype, pair_dot, work_dtype

__all__ = ["HierarchicalHD", "DEFAULT_HYPER_LR", "LEVELS", "BASES", "project_simplex"]

#: The levels, coarsest first: the parent of a level is the next coarser *active* one.
LEVELS: tuple[str, ...] = ("global", "layer", "unit", "param")
#: The base rules: plain SGD, SGD with Nesterov momentum, Adam.
BASES: tuple[str, ...] = ("sgd", "sgdn", "adam")
#: ``hyper_lr`` used when ``hyper_lr=None``: chosen per base by a sweep (see :class:`HierarchicalHD`).
DEFAULT_HYPER_LR: dict[str, float] = {"sgd": 1e-1, "sgdn": 1e-3, "adam": 1e-4}

_LEVEL_KEYS = {level: f"hd_rate_{level}" for level in LEVELS}


def project_simplex(values: Sequence[float]) -> list[float]:
    """Euclidean projection of ``values`` onto the probability simplex {w ≥ 0, Σ w = 1}.

    The sort-based algorithm (Held, Wolfe, Crowder 1974; Duchi et al. 2008): find the threshold
    ``θ`` with ``Σ max(v_i − θ, 0) = 1`` and clip there.  Adding a constant to every entry does not
    change the result, which is why only differences between the levels' hypergradients move the
    weights.
    """
    ordered = sorted(values, reverse=True)
    cumulative, theta = 0.0, 0.0
    for i, v in enumerate(ordered, start=1):
        cumulative += v
        candidate = (cumulative - 1.0) / i
        if v - candidate > 0:
            theta = candidate
    return [max(v - theta, 0.0) for v in values]


def _unit_view_shape(tensor: Tensor) -> tuple[int, ...]:
    """Shape that broadcasts one value per output unit (dim 0) over ``tensor``."""
    if tensor.dim() == 0:
        return ()
    return (tensor.shape[0],) + (1,) * (tensor.dim() - 1)


def _units(tensor: Tensor) -> int:
    """Number of output units of a tensor: its size along dim 0 (a scalar parameter is one unit)."""
    return tensor.shape[0] if tensor.dim() > 0 else 1


def _rate_dtype(tensor: Tensor) -> torch.dtype:
    """Tensor-valued rates are kept in at least float32: small hypergradient steps vanish in 16 bits."""
    return work_dtype(tensor.dtype)


def _hypergradient_dots(grads: list[Tensor], prevs: list[Tensor | None], acc: torch.dtype) -> Tensor:
    """``⟨g_j, prev_j⟩`` per tensor as one vector of ``acc`` on the first tensor's device.

    Each dot is one BLAS call in the tensors' precision (16-bit promoted to float32), converted to
    ``acc`` once for the whole vector.  A tensor without a previous direction contributes ``0·Σg``:
    zero, but non-finite when its gradient is, so the gate sees every gradient.
    """
    device = grads[0].device
    parts = []
    for g, s in zip(grads, prevs):
        if g.dtype in (torch.float16, torch.bfloat16):
            g = g.float()
            s = None if s is None else s.float()
        part = torch.dot(g.reshape(-1), s.reshape(-1)) if s is not None else g.sum() * 0.0
        parts.append(part)
    if all(p.dtype == parts[0].dtype and p.device == device for p in parts):
        return torch.stack(parts).to(acc)
    return torch.stack([p.to(device=device, dtype=acc) for p in parts])


def _unit_sums(x: Tensor, y: Tensor) -> Tensor:
    """Per-output-unit inner products ``Σ_{i in unit u} x_i·y_i`` (a batched dot, no product temporary)."""
    dtype = _rate_dtype(x)
    n = _units(x)
    a = x.reshape(n, 1, -1).to(dtype)
    b = y.reshape(n, -1, 1).to(dtype)
    return torch.bmm(a, b).reshape(n)


@dataclass
class _Tensors:
    """One step's tensors that have a gradient, flattened over the param groups."""

    groups: list[dict[str, Any]]
    params: list[Tensor]
    #: Effective gradients ``g + weight_decay·x``.
    grads: list[Tensor]
    #: Stored previous directions (``None`` before a tensor's first step); ``s_{t−1} = prev·scale``.
    prevs: list[Tensor | None] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    #: ``⟨g_t, prev⟩`` per tensor, as read by the gate.
    dots: list[float] = field(default_factory=list)
    #: The parameters' states (after the gate).
    states: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _OldRates:
    """The scalar levels' rates (multiples of lr) before this step's update."""

    global_: float
    layer: list[float]


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

    **Levels** [reconstructed: the paper's full text was not available; this is ALGORITHMS.md §3's
    reading].  ``levels`` may combine ``"global"`` (one rate), ``"layer"`` (one per parameter
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
    scales the learned rates instead of being overridden by them.  The hypergradient steps are
    taken on the rate before scheduling (``lr_ref`` = the group's ``initial_lr`` that schedulers
    record, else its ``lr``): in absolute units a rate moves by ``β·(lr/lr_ref)·Σh``, which is
    exactly Baydin's ``β·Σh`` without a scheduler, and fades with the schedule.  A group whose
    ``lr`` (or ``lr_ref``) is 0 does not move its rates.

    **Memory.** Beyond the parameters and the base rule's buffers (none for ``sgd``, one for
    ``sgdn``, two for ``adam``), one parameter-sized buffer for ``s_{t−1}``; the ``"param"`` level
    adds one more parameter-sized tensor (its rates, in at least float32); ``"unit"`` adds one value
    per output unit, ``"layer"`` one float per tensor, ``"global"`` one float.

    **Cost.** One extra pass over the gradients for the dot products, plus, for ``sgd``, a copy of
    the gradient into ``s``: plain SGD-HD cannot come close to ``torch.optim.SGD``'s single fused
    pass (about 3× on CPU), while the Nesterov and Adam bases stay within about 1.5× of their torch
    counterparts.  The ``"unit"`` and ``"param"`` levels add a few passes each.

    **Default ``hyper_lr``.**  ``hyper_lr=None`` takes :data:`DEFAULT_HYPER_LR` for the base:
    1e-1 for ``sgd``, 1e-3 for ``sgdn``, 1e-4 for ``adam``.  No single number serves all three:
    ``⟨g, s⟩`` is about ``‖g‖²`` for SGD, about ``‖g‖²/(1−μ)`` for Nesterov, and about ``‖g‖₁`` (unit-sized
    entries summed over every parameter) for Adam.  The values come from a sweep: an MLP
    64-W-W-10 (ReLU) on scikit-learn's 8×8 digits (1437 training images), batch 64, 10 epochs, the
    default levels, widths W ∈ {64, 512} (5k and 300k parameters), two ``lr`` per base (1e-3 and
    1e-1 for the SGD family, 1e-3 and 1e-2 for Adam), seeds {0, 1}, β on a decade grid; the score
    is the geometric mean of the 8 final training losses, a diverged run disqualifies.  Score at the
    chosen β (at β = 0): sgd 0.40 (0.81; β = 1 diverges), sgdn 0.054 (0.175; β = 0.1 diverges),
    adam 0.013 (0.058; β = 1e-3 breaks the wide net).  Mostly the hypergradient rescues a too-small
    ``lr``; at a well-tuned ``lr`` it changes little.  Adam's ``⟨g, s⟩`` grows with the number of
    parameters, so for models much larger than these lower it (Baydin et al. used 1e-7 on a
    1.8M-parameter MLP and 1e-8 on VGG; 1e-3 for the SGD family).  ``weight_lr=1`` moved the
    learned weights within a few epochs on the same MLP; 1e2 and more drove them to a vertex of
    the simplex (a single level).

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
        weight_lr: the step size of the weights' hypergradient descent (see the sweep note above).
        level_pull: λ of the pull toward the parent level: one number for every level or one per
            entry of ``levels`` (ignored for the coarsest active level, which has no parent).
        rate_bounds: ``(low, high)`` bounds of every level's rate, in multiples of the group's
            ``lr``; ``low`` may be ``-inf`` and ``high`` ``inf``.
        foreach: use the multi-tensor path; ``False`` updates tensor by tensor.
        average_across_ranks: average a given loss across ``torch.distributed`` ranks (the method
            needs only gradients, which data parallelism already averages).

    A loss may be passed (``step(loss=...)``) but is not needed: it only joins the finiteness
    gate.  A non-finite gradient (or loss) skips the step: parameters and state unchanged.

    State: ``state["global"]`` holds ``step``, ``skipped_steps``, ``hd_rate_global`` (the global
    rate as a multiple of ``lr``) and ``hd_weights``; ``state[p]`` holds ``prev_direction``
    (``s_{t−1}``; for Adam the unnormalised ``m/(sqrt(v̂)+eps)``, with ``direction_scale = 1/(1−β1^k)``),
    the base buffers (``momentum_buffer``; ``exp_avg``, ``exp_avg_sq``, ``step``) and the tensor
    levels' rates ``hd_rate_layer`` (a float), ``hd_rate_unit``, ``hd_rate_param`` (tensors).

    Recorded in each param group after each step: ``effective_lr`` (the mean applied rate over the
    group's elements), ``hd_rate_global``, ``hd_rate_<level>_min`` / ``_mean`` / ``_max`` for the
    tensor-valued levels (absolute rates; means weighted by elements), and ``hd_weight_<level>``.
    On accelerators the unit and param statistics stay 0-d tensors: the step synchronizes once.
    """

    requires_loss = False
    shared_options = (
        "base",
        "levels",
        "hyper_lr",
        "weights",
        "learn_weights",
        "weight_lr",
        "level_pull",
        "rate_bounds",
    )

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
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
    ) -> None:
        name = type(self).__name__
        check_choice(name, "base", base, BASES)
        check_range(name, "lr", lr, 0.0, None)
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
        check_range(name, "momentum", momentum, 0.0, 1.0, high_open=True)
        check_betas(name, betas)
        check_range(name, "eps", eps, 0.0, None)
        check_range(name, "weight_decay", weight_decay, 0.0, None)
        initial_weights = self._check_weights(weights, levels, active)
        check_flag(name, "learn_weights", learn_weights)
        check_range(name, "weight_lr", weight_lr, 0.0, None)
        bounds = self._check_bounds(rate_bounds)
        defaults = dict(
            base=base,
            lr=lr,
            levels=active,
            hyper_lr=tuple(hyper[level] for level in active),
            momentum=momentum,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            weights=initial_weights,
            learn_weights=learn_weights,
            weight_lr=weight_lr,
            level_pull=tuple(pull[level] for level in active),
            rate_bounds=bounds,
        )
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

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
    def _check_bounds(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        name = cls.__name__
        ok = isinstance(bounds, (tuple, list)) and len(bounds) == 2
        ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) and not math.isnan(b) for b in bounds)
        if not ok or bounds[0] > bounds[1] or bounds[0] == math.inf or bounds[1] == -math.inf:
            raise ValueError(
                f"{name}: `rate_bounds` must be a pair (low, high) with -inf ≤ low ≤ high ≤ inf, got {bounds!r}"
            )
        return (float(bounds[0]), float(bounds[1]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to its parameter's dtype; the unit and param rates are
        # kept in at least float32 (16-bit rates would lose the small hypergradient steps), so put
        # the saved tensors back with their own dtype.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in ("hd_rate_unit", "hd_rate_param"):
                if key in saved:
                    self.state[p][key] = saved[key].detach().clone().to(device=p.device)

    # ------------------------------------------------------------------ the step

    def _update(self, loss: Tensor | None) -> None:
        options = self.param_groups[0]
        levels: tuple[str, ...] = options["levels"]
        entries = [(group, *self._params_and_grads(group)) for group in self.param_groups]
        if not any(ps for _, ps, _ in entries):
            return
        # Everything up to the gate only reads: a skipped step leaves parameters and state untouched.
        tensors = _Tensors(groups=[], params=[], grads=[])
        for group, ps, gs in entries:
            tensors.groups.extend(group for _ in ps)
            tensors.params.extend(ps)
            tensors.grads.extend(self._effective_grads(group, ps, gs))
        found = [self.state.get(p) or {} for p in tensors.params]  # .get: the defaultdict creates nothing
        tensors.prevs = [st.get("prev_direction") for st in found]
        tensors.scales = [st.get("direction_scale", 1.0) for st in found]
        acc = accumulation_dtype(tensors.params[0].device)
        dots = _hypergradient_dots(tensors.grads, tensors.prevs, acc)
        unit_sums = (
            [_unit_sums(g, s) if s is not None else None for g, s in zip(tensors.grads, tensors.prevs)]
            if "unit" in levels
            else []
        )
        partials = self._weight_partials(tensors, found, unit_sums, acc) if options["learn_weights"] else {}

        # The step's one synchronization: the loss, every ⟨g, s⟩, the weights' tensor partials.
        head = [loss] if loss is not None else []
        gated = self._gate(*head, *dots.unbind(), *partials.values())
        if gated is None:
            return
        tensors.dots = gated[len(head) : len(head) + len(tensors.params)]
        host_partials = dict(zip(partials, gated[len(head) + len(tensors.params) :]))

        st = self.global_state
        st["step"] += 1
        tensors.states = [self._init_state(p, levels, options["base"]) for p in tensors.params]
        old = _OldRates(
            global_=st.get("hd_rate_global", 1.0), layer=[s.get("hd_rate_layer", 1.0) for s in tensors.states]
        )
        weights = dict(zip(levels, st.get("hd_weights", options["weights"])))
        new_weights = (
            self._moved_weights(tensors, weights, old, host_partials) if options["learn_weights"] else weights
        )
        self._move_rates(tensors, unit_sums, weights, old)
        st["hd_weights"] = tuple(new_weights[level] for level in levels)

        # The step with the new rates and weights: the scalar part (global + layer) through the base
        # rule's own kernels, then the tensor-valued levels.
        start = 0
        for group, ps, _ in entries:
            span = slice(start, start + len(ps))
            start += len(ps)
            states = tensors.states[span]
            rates = [group["lr"] * self._scalar_rate(state, new_weights) for state in states]
            directions = self._base_step(group, ps, tensors.grads[span], states, rates)
            self._apply_tensor_levels(group, ps, directions, states, new_weights)
        self._record_all(levels, new_weights)

    # ------------------------------------------------------------------ pieces of the step

    def _effective_grads(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """``g + weight_decay·x`` (new tensors), or the gradients themselves (never written to)."""
        wd = group["weight_decay"]
        if wd == 0 or not params:
            return grads
        if not group["foreach"]:
            return [g.add(p, alpha=wd) for p, g in zip(params, grads)]
        out: list[Tensor] = [grads[0]] * len(params)
        for ps, gs, index in group_by_device_and_dtype(params, grads, range(len(params))):
            for i, e in zip(index, torch._foreach_add(gs, ps, alpha=wd)):
                out[i] = e
        return out

    def _weight_partials(
        self, tensors: _Tensors, found: list[dict[str, Any]], unit_sums: list[Tensor | None], acc: torch.dtype
    ) -> dict[str, Tensor]:
        """``Σ_i g_i·s_{t−1,i}·α⁽ᵏ⁾_i`` of the tensor-valued levels, on the device, for the gate to read."""
        levels = self.param_groups[0]["levels"]
        device = tensors.params[0].device
        out: dict[str, Tensor] = {}
        for level in ("unit", "param"):
            if level not in levels:
                continue
            terms = []
            for j, (group, g, s, scale, state) in enumerate(
                zip(tensors.groups, tensors.grads, tensors.prevs, tensors.scales, found)
            ):
                if s is None:
                    continue
                rate = state[_LEVEL_KEYS[level]]
                if level == "unit":
                    unit_sum = unit_sums[j]
                    assert unit_sum is not None
                    term = torch.dot(unit_sum.to(acc), rate.to(acc))
                else:
                    term = pair_dot(g * s, rate, acc)
                terms.append(term.to(device) * (group["lr"] * scale))
            out[level] = torch.stack(terms).sum() if terms else torch.zeros((), dtype=acc, device=device)
        return out

    def _init_state(self, p: Tensor, levels: tuple[str, ...], base: str) -> dict[str, Any]:
        """A parameter's state, created on its first successful step (s_0 = 0, rates = 1)."""
        state = self.state[p]
        if "prev_direction" in state:
            return state
        state["prev_direction"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if base == "adam":
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["direction_scale"] = 1.0
        if "layer" in levels:
            state["hd_rate_layer"] = 1.0
        if "unit" in levels:
            state["hd_rate_unit"] = torch.ones(_units(p), dtype=_rate_dtype(p), device=p.device)
        if "param" in levels:
            state["hd_rate_param"] = torch.ones_like(p, dtype=_rate_dtype(p), memory_format=torch.preserve_format)
        return state

    def _moved_weights(
        self, tensors: _Tensors, weights: dict[str, float], old: _OldRates, partials: dict[str, float]
    ) -> dict[str, float]:
        """``w ← Π_simplex(w − weight_lr·∂/∂w)`` with ``∂/∂w_k = Σ_i h_i·α⁽ᵏ⁾_i`` at the previous rates."""
        options = self.param_groups[0]
        levels = options["levels"]
        # lr_j·scale_j·⟨g_j, prev_j⟩: multiplied by a tensor's scalar rate, its share of ∂/∂w.
        weighted = [group["lr"] * scale * d for group, scale, d in zip(tensors.groups, tensors.scales, tensors.dots)]
        grad = {}
        if "global" in levels:
            grad["global"] = -old.global_ * sum(weighted)
        if "layer" in levels:
            grad["layer"] = -sum(r * x for r, x in zip(old.layer, weighted))
        for level in ("unit", "param"):
            if level in levels:
                grad[level] = -partials[level]
        moved = project_simplex([weights[k] - options["weight_lr"] * grad[k] for k in levels])
        return dict(zip(levels, moved))

    def _move_rates(
        self, tensors: _Tensors, unit_sums: list[Tensor | None], weights: dict[str, float], old: _OldRates
    ) -> None:
        """Each level's hypergradient step, pull toward its parent, and clip (finest level first, so
        that every pull reads its parent's previous value)."""
        options = self.param_groups[0]
        levels: tuple[str, ...] = options["levels"]
        beta = dict(zip(levels, options["hyper_lr"]))
        pull = dict(zip(levels, options["level_pull"]))
        bounds: tuple[float, float] = options["rate_bounds"]
        low, high = bounds
        # Per tensor, the factor that turns Σ g·prev into a step of the stored multiple:
        # scale·lr/lr_ref² (see the class docstring); 0 for a group that does not move.
        coefs = []
        for group, scale in zip(tensors.groups, tensors.scales):
            ref = group.get("initial_lr", group["lr"])
            coefs.append(scale * group["lr"] / ref**2 if ref > 0 and group["lr"] > 0 else 0.0)

        def parent_rate(level: str, j: int) -> Scalar | None:
            coarser = [c for c in levels if LEVELS.index(c) < LEVELS.index(level)]
            if not coarser:
                return None
            if coarser[-1] == "global":
                return old.global_
            if coarser[-1] == "layer":
                return old.layer[j]
            return tensors.states[j]["hd_rate_unit"].view(_unit_view_shape(tensors.params[j]))

        for level in ("param", "unit"):
            if level not in levels:
                continue
            step, kappa = weights[level] * beta[level], 2.0 * beta[level] * pull[level]
            rates = [state[_LEVEL_KEYS[level]] for state in tensors.states]
            for j, (rate, c) in enumerate(zip(rates, coefs)):
                target = parent_rate(level, j) if kappa > 0 else None
                if target is not None:
                    rate.mul_(1.0 - kappa)
                    if isinstance(target, Tensor):
                        rate.add_(target, alpha=kappa)
                    else:
                        rate.add_(kappa * target)
                s = tensors.prevs[j]
                if s is None or step * c == 0:
                    continue
                if level == "param":
                    rate.addcmul_(tensors.grads[j], s, value=step * c)
                else:
                    rate.add_(unit_sums[j], alpha=step * c)  # type: ignore[arg-type]
            _clamp_(rates, bounds, foreach=options["foreach"])
        if "layer" in levels:
            step = weights["layer"] * beta["layer"]
            kappa = 2.0 * beta["layer"] * pull["layer"] if "global" in levels else 0.0
            for state, r, d, c in zip(tensors.states, old.layer, tensors.dots, coefs):
                moved = r + step * c * d - kappa * (r - old.global_)
                state["hd_rate_layer"] = min(max(moved, low), high)
        if "global" in levels:
            moved = old.global_ + weights["global"] * beta["global"] * sum(c * d for c, d in zip(coefs, tensors.dots))
            self.global_state["hd_rate_global"] = min(max(moved, low), high)

    def _scalar_rate(self, state: dict[str, Any], weights: dict[str, float]) -> float:
        """``w_global·ρ_global + w_layer·ρ_layer`` of one tensor (a multiple of its group's lr)."""
        rate = 0.0
        if "global" in weights:
            rate += weights["global"] * self.global_state["hd_rate_global"]
        if "layer" in weights:
            rate += weights["layer"] * state["hd_rate_layer"]
        return rate

    def _base_step(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        geffs: list[Tensor],
        states: list[dict[str, Any]],
        rates: list[float],
    ) -> list[Tensor]:
        """Advance the base rule, store ``s_t``, take ``x ← x − rate·s_t``; return the directions."""
        if not params:
            return []
        base = group["base"]
        foreach = group["foreach"]
        owned = group["weight_decay"] != 0  # the effective gradients are this step's temporaries
        directions: list[Tensor] = list(geffs)
        for ps, gs, sts, rs, index in group_by_device_and_dtype(params, geffs, states, rates, range(len(params))):
            if base == "adam":
                ds = self._adam_direction(group, ps, gs, rs, sts, owned, foreach)
            else:
                ds = self._sgd_direction(group, gs, sts, owned, foreach)
                if any(r != 0 for r in rs):
                    _add_scaled_each_(ps, ds, [-r for r in rs], foreach=foreach)
            for i, s in zip(index, ds):
                directions[i] = s
        return directions

    def _sgd_direction(
        self,
        group: dict[str, Any],
        geffs: list[Tensor],
        states: list[dict[str, Any]],
        owned: bool,
        foreach: bool,
    ) -> list[Tensor]:
        """``s = g`` (sgd) or ``s = g + μ·v`` with ``v ← μ·v + g`` (sgdn), written into ``prev_direction``.

        The operations and their order are torch.optim.SGD's, so that ``hyper_lr=0`` reproduces it.
        """
        base = group["base"]
        if base == "sgdn":
            mu = group["momentum"]
            # A new buffer starts at the first gradient, as torch.optim.SGD's does.
            old = [i for i, st in enumerate(states) if "momentum_buffer" in st]
            for st, g in zip(states, geffs):
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = g.clone()
            bufs = [states[i]["momentum_buffer"] for i in old]
            if bufs:
                news = [geffs[i] for i in old]
                if foreach:
                    torch._foreach_mul_(bufs, mu)
                    torch._foreach_add_(bufs, news)
                else:
                    for b, g in zip(bufs, news):
                        b.mul_(mu).add_(g)
            bufs = [st["momentum_buffer"] for st in states]
        if owned:  # the effective gradients are this step's temporaries: they become s_t
            targets = list(geffs)
            if base == "sgdn":
                _add_into_(targets, geffs, bufs, mu, foreach=foreach)
        else:
            targets = [st["prev_direction"] for st in states]
            if base == "sgdn":
                _add_into_(targets, geffs, bufs, mu, foreach=foreach)
            elif foreach:
                torch._foreach_copy_(targets, geffs)
            else:
                for t, g in zip(targets, geffs):
                    t.copy_(g)
        for st, t in zip(states, targets):
            st["prev_direction"] = t
        return targets

    def _adam_direction(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        geffs: list[Tensor],
        rates: list[float],
        states: list[dict[str, Any]],
        owned: bool,
        foreach: bool,
    ) -> list[Tensor]:
        """Adam's moments and step (as torch.optim.Adam computes them); ``u = m/(sqrt(v̂)+eps)`` stored."""
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        ms = [st["exp_avg"] for st in states]
        vs = [st["exp_avg_sq"] for st in states]
        for st in states:
            st["step"] += 1
        bc1 = [1 - beta1 ** st["step"] for st in states]
        bc2_sqrt = [(1 - beta2 ** st["step"]) ** 0.5 for st in states]
        targets = list(geffs) if owned else [st["prev_direction"] for st in states]
        if foreach:
            torch._foreach_lerp_(ms, geffs, 1 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, geffs, geffs, 1 - beta2)
            _sqrt_into_(targets, vs, foreach=True)
            torch._foreach_div_(targets, bc2_sqrt)
            torch._foreach_add_(targets, eps)
            if any(r != 0 for r in rates):
                torch._foreach_addcdiv_(params, ms, targets, [-(r / b) for r, b in zip(rates, bc1)])
        else:
            for p, g, m, v, t, r, b1, b2 in zip(params, geffs, ms, vs, targets, rates, bc1, bc2_sqrt):
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                torch.sqrt(v, out=t)
                t.div_(b2).add_(eps)
                if r != 0:
                    p.addcdiv_(m, t, value=-(r / b1))
        for m, t in zip(ms, targets):
            torch.div(m, t, out=t)
        for st, t, b1 in zip(states, targets, bc1):
            st["prev_direction"] = t
            st["direction_scale"] = 1.0 / b1
        return targets

    def _apply_tensor_levels(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        directions: list[Tensor],
        states: list[dict[str, Any]],
        w: dict[str, float],
    ) -> None:
        """``x ← x − lr·(w_unit·ρ_unit + w_param·ρ_param) ⊙ s_t`` (for Adam ``s = u·direction_scale``)."""
        if w.get("unit", 0.0) == 0 and w.get("param", 0.0) == 0:
            return
        lr = group["lr"]
        for p, s, state in zip(params, directions, states):
            factor = -lr * state.get("direction_scale", 1.0)
            if "hd_rate_unit" in state and w.get("unit", 0.0) != 0:
                p.addcmul_(state["hd_rate_unit"].view(_unit_view_shape(p)).to(p.dtype), s, value=factor * w["unit"])
            if "hd_rate_param" in state and w.get("param", 0.0) != 0:
                p.addcmul_(state["hd_rate_param"].to(p.dtype), s, value=factor * w["param"])

    # ------------------------------------------------------------------ recording

    def _record_all(self, levels: tuple[str, ...], w: dict[str, float]) -> None:
        """Write effective_lr, the levels' rates and the weights into every param group."""
        st = self.global_state
        for group in self.param_groups:
            lr = group["lr"]
            found = [(p, self.state.get(p) or {}) for p in group["params"]]
            stated = [(p, state) for p, state in found if "prev_direction" in state]
            sizes = [p.numel() for p, _ in stated]
            total = float(sum(sizes))
            values: dict[str, Scalar] = {}
            mean_rate: Scalar = 0.0  # Σ_k w_k · (element mean of level k's multiple)
            if "global" in levels:
                rate = st.get("hd_rate_global", 1.0)
                values["hd_rate_global"] = lr * rate
                mean_rate = mean_rate + w["global"] * rate
            if "layer" in levels:
                rates = [state["hd_rate_layer"] for _, state in stated] or [1.0]
                mean = sum(r * n for r, n in zip(rates, sizes)) / total if total else 1.0
                values.update(
                    hd_rate_layer_min=lr * min(rates), hd_rate_layer_mean=lr * mean, hd_rate_layer_max=lr * max(rates)
                )
                mean_rate = mean_rate + w["layer"] * mean
            for level in ("unit", "param"):
                if level not in levels:
                    continue
                key = _LEVEL_KEYS[level]
                if stated:
                    lows, highs, sums = [], [], []
                    for p, state in stated:
                        r = state[key]
                        lo, hi = torch.aminmax(r)
                        lows.append(lo)
                        highs.append(hi)
                        sums.append(r.sum(dtype=torch.float64) * (p.numel() / r.numel()))
                    lo_t, hi_t, mean_t = self._to_host_if_free(
                        torch.stack(lows).min(), torch.stack(highs).max(), torch.stack(sums).sum() / total
                    )
                else:
                    lo_t = hi_t = mean_t = 1.0
                values[f"{key}_min"] = lr * lo_t
                values[f"{key}_mean"] = lr * mean_t
                values[f"{key}_max"] = lr * hi_t
                mean_rate = mean_rate + w[level] * mean_t
            values["effective_lr"] = lr * mean_rate
            values.update({f"hd_weight_{level}": w[level] for level in levels})
            self._record(group, **values)


def _clamp_(tensors: list[Tensor], bounds: tuple[float, float], *, foreach: bool) -> None:
    """Clip every tensor to ``[low, high]`` in place (skipping infinite sides)."""
    low, high = bounds
    if not tensors:
        return
    if foreach:
        for bucket in group_by_device_and_dtype(tensors):
            ts = bucket[0]
            if low != -math.inf:
                torch._foreach_clamp_min_(ts, low)
            if high != math.inf:
                torch._foreach_clamp_max_(ts, high)
        return
    for t in tensors:
        t.clamp_(min=None if low == -math.inf else low, max=None if high == math.inf else high)


def _on_cpu(xs: list[Tensor]) -> bool:
    """Whether the tensors live on the CPU, where ``torch._foreach_*`` kernels are plain loops and
    writing into an existing buffer (``out=``) beats allocating a parameter-sized result."""
    return bool(xs) and xs[0].device.type == "cpu"


def _add_into_(outs: list[Tensor], xs: list[Tensor], ys: list[Tensor], alpha: float, *, foreach: bool) -> None:
    """``outs[i] = xs[i] + alpha·ys[i]`` (``outs`` may alias ``xs``)."""
    if foreach and not _on_cpu(xs):
        if any(o is not x for o, x in zip(outs, xs)):
            torch._foreach_copy_(outs, xs)
        torch._foreach_add_(outs, ys, alpha=alpha)
        return
    for o, x, y in zip(outs, xs, ys):
        torch.add(x, y, alpha=alpha, out=o)


def _sqrt_into_(outs: list[Tensor], xs: list[Tensor], *, foreach: bool) -> None:
    """``outs[i] = sqrt(xs[i])``."""
    if foreach and not _on_cpu(xs):
        torch._foreach_copy_(outs, xs)
        torch._foreach_sqrt_(outs)
        return
    for o, x in zip(outs, xs):
        torch.sqrt(x, out=o)


def _add_scaled_each_(xs: list[Tensor], ys: list[Tensor], alphas: list[float], *, foreach: bool) -> None:
    """``xs[i] += alphas[i] * ys[i]`` in place, one scale per tensor.

    With one scale for all, one ``torch._foreach_add_``.  Otherwise, on accelerators a scaled
    temporary (``_foreach_mul``) and one add; on the CPU, where foreach kernels are loops anyway and
    a parameter-sized temporary costs more than it saves, a loop of fused ``add_(alpha=...)``.
    """
    if not xs:
        return
    if foreach and all(a == alphas[0] for a in alphas):
        torch._foreach_add_(xs, ys, alpha=alphas[0])
    elif foreach and not _on_cpu(xs):
        torch._foreach_add_(xs, torch._foreach_mul(ys, alphas))
    else:
        for x, y, a in zip(xs, ys, alphas):
            x.add_(y, alpha=a)
