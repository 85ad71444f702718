"""Step-Tuned SGD: SGD whose step size is tuned online by a stochastic Barzilai–Borwein gain.

Castera, Bolte, Févotte, Pauwels. "Second-order step-size tuning of SGD for non-convex
optimization." Neural Processing Letters, 2022 (arXiv:2103.03570).  ALGORITHMS.md §5.

Iteration ``k = 0, 1, …`` is two half-steps that share one step size::

    η_k     = lr·γ_k / (k+1)^(1/2+δ)
    x_{k+½} = x_k − η_k·g_a,          g_a = ∇f_B(x_k)
    x_{k+1} = x_{k+½} − η_k·g_b,      g_b = ∇f_B'(x_{k+½})
    Δx = x_{k+½} − x_k,   G ← β·G + (1−β)·(g_b − g_a),   Ĝ = G / (1 − β^(k+1))
    γ_{k+1} = clip(‖Δx‖² / ⟨Ĝ, Δx⟩  if ⟨Ĝ, Δx⟩ > 0  else ν,   m̃, M̃)

How the scalars are obtained without a second device-to-host read.  Since ``Δx = −η_k·g_a`` (per
param group), the gain needs only scalars that exist before the parameters move::

    ‖Δx‖²     = Σ_groups η² · ‖g_a‖²
    ⟨Ĝ, Δx⟩   = Σ_groups η · (β·⟨D, g_a⟩ + (1−β)·(‖g_a‖² − ⟨g_b, g_a⟩)) / (1 − β^(k+1))

where ``D = −G`` is what is stored (the average of ``g_a − g_b``: one fused ``lerp`` updates it).
``‖g_a‖²`` and ``⟨D, g_a⟩`` are read by the gate of the first half-step (they also tell whether
``g_a`` is finite), ``⟨g_b, g_a⟩`` by the gate of the second (a non-finite entry of ``g_b`` makes it
non-finite whatever ``g_a`` holds there), so every ``step()`` reads the device exactly once and the
gain and step sizes stay Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._base import AdaptiveOptimizer, LossClosure, check_flag, check_range
from ._tensorlists import add_scaled_, dot, exponential_average_, group_by_device_and_dtype, sqnorm

__all__ = ["StepTunedSGD"]

#: ``state[p]`` key of the running average of ``g_a − g_b`` (that is −G in ALGORITHMS.md §5).
DIFF_AVG = "neg_grad_diff_avg"
#: ``state[p]`` key of ``g_a`` (with weight decay) kept between the two half-steps.
FIRST_GRAD = "first_grad"
#: ``state["global"]`` keys that exist only between the two half-steps of one iteration.
PENDING = ("half_step_lrs", "first_half_members", "first_half_avg_dots", "first_half_sqnorms")


@dataclass
class _HalfStep:
    """One param group's parameters that have a gradient at this half-step."""

    group: dict[str, Any]
    params: list[Tensor]
    #: ``g + weight_decay·x`` (the ``.grad`` tensors themselves when there is no weight decay).
    grads: list[Tensor]
    #: positions of ``params`` in the flat list of every group's parameters (what ``state_dict`` numbers).
    members: list[int]


@dataclass
class _Pairs:
    """One param group's parameters that have a gradient at both half-steps of the iteration."""

    params: list[Tensor]
    second: list[Tensor]
    first: list[Tensor]


def _with_weight_decay(params: list[Tensor], grads: list[Tensor], weight_decay: float, *, foreach: bool) -> list[Tensor]:
    """New tensors ``g + weight_decay·x`` (coupled L2), in input order; ``grads`` itself if no decay."""
    if weight_decay == 0 or not params:
        return grads
    if not foreach:
        return [g.add(p, alpha=weight_decay) for p, g in zip(params, grads)]
    out: dict[int, Tensor] = {}
    for ps, gs in group_by_device_and_dtype(params, grads):
        out.update((id(g), d) for g, d in zip(gs, torch._foreach_add(gs, ps, alpha=weight_decay)))
    return [out[id(g)] for g in grads]


def _copy_(dst: list[Tensor], src: list[Tensor], *, foreach: bool) -> None:
    if foreach:
        for d, s in group_by_device_and_dtype(dst, src):
            torch._foreach_copy_(d, s)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _clone(xs: list[Tensor], *, foreach: bool) -> list[Tensor]:
    if not foreach:
        return [x.clone() for x in xs]
    out: dict[int, Tensor] = {}
    for (bucket,) in group_by_device_and_dtype(xs):
        out.update((id(x), c) for x, c in zip(bucket, torch._foreach_clone(bucket)))
    return [out[id(x)] for x in xs]


def _subtract_(xs: list[Tensor], ys: list[Tensor], *, foreach: bool) -> None:
    """``xs -= ys`` in place."""
    if foreach:
        for a, b in group_by_device_and_dtype(xs, ys):
            torch._foreach_sub_(a, b)
    else:
        for a, b in zip(xs, ys):
            a.sub_(b)


def _descend(params: list[Tensor], grads: list[Tensor], lr: float, *, foreach: bool) -> None:
    """``x ← x − lr·g``."""
    for ps, gs in group_by_device_and_dtype(params, grads):
        add_scaled_(ps, gs, -lr, foreach=foreach)


class StepTunedSGD(AdaptiveOptimizer):
    r"""Step-Tuned SGD: SGD with a step size tuned by a stochastic Barzilai–Borwein gain.

    Castera, Bolte, Févotte, Pauwels, "Second-order step-size tuning of SGD for non-convex
    optimization", Neural Processing Letters, 2022.  See ALGORITHMS.md §5 and the module docstring
    for the update.  One scalar gain ``γ`` (``γ_0 = 1``) for the whole model rescales a step size
    ``lr/(k+1)^(1/2+δ)`` that decays with the iteration count ``k``; the gain is the inverse of a
    curvature estimate along the last displacement, clipped to ``gain_bounds``, or ``nu`` where the
    estimate says the loss is locally concave.  Gradient-only: no loss is needed (a loss, when
    given, is still checked, so that a non-finite loss skips the step).

    **Which mini-batch the second half-step uses [reconstructed].**  Each iteration takes two
    half-steps, the second at the midpoint ``x_{k+½}``.  The paper's footnote says that computing a
    second gradient on the same mini-batch, as stochastic BFGS does, "would double the computational
    cost"; we read it as: the second gradient comes from the **next** mini-batch.

    * ``same_batch=False`` (default): every ``step()`` is one half-step on its own mini-batch — odd
      calls take first half-steps, even calls second half-steps followed by the gain update — so a
      step costs what an SGD step costs (one forward and backward; no extra model evaluation).  It
      works in any loop, including Lightning's automatic optimization.  One iteration ``k`` spans
      two calls, so ``(k+1)`` counts pairs of calls.
    * ``same_batch=True``: the second gradient is taken on the same mini-batch (``B' = B``, as some
      third-party ports do).  ``step(closure)`` then calls the closure **twice** (at ``x_k`` and at
      ``x_{k+½}``); the closure must zero the gradients, re-evaluate the model, call ``backward()``
      and return the loss, as for ``torch.optim.LBFGS``.  For plain PyTorch loops only:
      :attr:`calls_closure_twice` lets a training framework refuse it, and Lightning must never run
      its closure twice.  Costs two forward and backward passes per step.

    **Parameters that miss a gradient.**  Parameters whose ``.grad`` is ``None`` are left alone.
    A parameter with a gradient at only one of the two half-steps of an iteration takes that
    half-step, but stays out of that iteration's gain (its ``G`` and its share of ``Δx`` are not
    counted).  The step size ``η_k`` is fixed when the first half-step is taken: a change of
    ``lr`` (a scheduler) between the two half-steps applies from the next iteration.

    Args:
        params: parameters or param groups.  Groups may differ in ``lr`` and ``weight_decay``.
        lr: the base step size ``α`` (the paper tunes it; 0.1 is a common SGD start).  The step
            actually taken is ``lr·γ/(k+1)^(1/2+δ)`` with ``γ`` in ``gain_bounds``, so it decays;
            larger values than for constant-rate SGD are usual.
        nu: the gain used where the curvature estimate ``⟨Ĝ, Δx⟩`` is not positive (paper: 2).
        beta: decay of the running average ``G`` of gradient differences, in [0, 1) (paper: 0.9).
            ``beta=0`` gives the plain (stochastic) Barzilai–Borwein gain.
        gain_bounds: ``(m̃, M̃)``, the interval the gain is clipped to, ``0 < m̃ ≤ M̃`` (paper: (0.5, 2)).
        delta: ``δ`` in [0, 1/2): the decay exponent is ``1/2 + δ`` (paper: 0.001).
        weight_decay: coupled L2 penalty: ``g + weight_decay·x`` is used as the gradient at both
            half-steps (so it enters ``Δg`` and the gain too).
        same_batch: take the second half-step on the same mini-batch (closure called twice), see above.
        foreach: use the multi-tensor (``torch._foreach_*``) path; ``False`` updates tensor by tensor.
        average_across_ranks: average a given loss across ``torch.distributed`` ranks (one collective)
            before the finiteness check, so that all replicas skip the same steps.

    After each step every param group holds ``effective_lr`` (``η_k``, the step size of the
    half-step just taken), ``gain`` (the current ``γ``: ``γ_{k+1}`` after a second half-step) and
    ``curvature`` (``⟨Ĝ, Δx⟩`` of the last completed iteration; NaN before the first).
    ``state["global"]`` holds ``step`` (half-steps taken; iterations with ``same_batch``),
    ``iteration`` (``k``), ``phase`` (1 between the two half-steps), ``gain``, ``curvature``,
    ``skipped_steps`` and, between the two half-steps, what the second needs.  ``state[p]`` holds
    ``neg_grad_diff_avg`` (the running average of ``g_a − g_b``, i.e. ``−G``: stored with this sign
    so that one fused ``lerp`` updates it) and, without ``same_batch``, ``first_grad`` (``g_a``;
    scratch after the second half-step).  Extra memory: two parameter-sized buffers (with
    ``same_batch``, one, plus copies of ``x_k`` and ``g_a`` during the step).

    Cost of the optimizer's own work per pair of calls: five element-wise passes (two parameter
    updates, keeping ``g_a``, and two to update ``G``) and three reductions (``‖g_a‖²``,
    ``⟨D, g_a⟩``, ``⟨g_b, g_a⟩``), against SGD's two element-wise passes; keeping ``G`` and ``g_a``
    is what the method needs, so this is its floor with PyTorch's in-place multi-tensor kernels.
    """

    requires_loss = False
    shared_options = ("nu", "beta", "gain_bounds", "delta", "same_batch")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        nu: float = 2.0,
        beta: float = 0.9,
        gain_bounds: tuple[float, float] = (0.5, 2.0),
        delta: float = 0.001,
        weight_decay: float = 0.0,
        same_batch: bool = False,
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
    ) -> None:
        name = type(self).__name__
        check_range(name, "lr", lr, 0.0, None)
        check_range(name, "nu", nu, 0.0, None, low_open=True)
        check_range(name, "beta", beta, 0.0, 1.0, high_open=True)
        if not (isinstance(gain_bounds, (tuple, list)) and len(gain_bounds) == 2):
            raise ValueError(f"{name}: `gain_bounds` must be a pair (low, high), got {gain_bounds!r}")
        check_range(name, "gain_bounds[0]", gain_bounds[0], 0.0, None, low_open=True)
        check_range(name, "gain_bounds[1]", gain_bounds[1], gain_bounds[0], None)
        check_range(name, "delta", delta, 0.0, 0.5, high_open=True)
        check_range(name, "weight_decay", weight_decay, 0.0, None)
        check_flag(name, "same_batch", same_batch)
        defaults = dict(
            lr=lr,
            nu=nu,
            beta=beta,
            gain_bounds=(float(gain_bounds[0]), float(gain_bounds[1])),
            delta=delta,
            weight_decay=weight_decay,
            same_batch=same_batch,
        )
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

    @property
    def calls_closure_twice(self) -> bool:
        """Whether ``step(closure)`` calls the closure twice (``same_batch=True``).

        Training loops that must not re-run their closure (Lightning's automatic optimization)
        read this to refuse the setting with an explanation.
        """
        return bool(self.param_groups[0]["same_batch"])

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: LossClosure | None = None, *, loss: Tensor | float | None = None) -> Any:  # type: ignore[override]
        """Take one half-step (default) or, with ``same_batch=True``, one whole iteration.

        Args:
            closure: re-evaluates the model, calls ``backward()`` and returns the loss.  Optional and
                called once by default; required and called twice with ``same_batch=True``.
            loss: the loss whose gradient is in ``.grad`` (optional: only checked for finiteness).

        Returns:
            The (first) closure's return value if a closure was given, else ``loss``.
        """
        if not self.calls_closure_twice:
            return super().step(closure, loss=loss)
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}(same_batch=True) takes both half-steps on the same mini-batch, so "
                "`step()` needs a closure: `optimizer.step(closure)`, where the closure zeroes the gradients, "
                "evaluates the model, calls backward() and returns the loss (it is called twice, at x_k and at "
                "x_{k+1/2}). Lightning's automatic optimization cannot do this; use same_batch=False (the "
                "default), where each step() is one half-step on its own mini-batch."
            )
        return self._same_batch_step(closure, loss)

    def _update(self, loss: Tensor | None) -> None:
        if self._iteration_state()["phase"] == 0:
            self._first_half_step(loss)
        else:
            self._second_half_step(loss)

    # ------------------------------------------------------------------ the two modes

    def _first_half_step(self, loss: Tensor | None) -> None:
        """Odd calls (``same_batch=False``): ``x_{k+½} = x_k − η_k·g_a``; keep ``g_a`` for the second."""
        halves = self._gather()
        if not any(h.params for h in halves):
            return
        device = self._device()
        terms = self._first_half_terms(halves, [h.grads for h in halves], device)
        values = self._gate(*([] if loss is None else [loss]), *terms)
        if values is None:
            return
        avg_dots, sqnorms = _split_pairs(values[0 if loss is None else 1 :])
        lrs = self._step_sizes()
        for half, lr in zip(halves, lrs):
            self._keep_first_grads(half)
            _descend(half.params, half.grads, lr, foreach=half.group["foreach"])
        st = self.global_state
        st["step"] += 1
        st["phase"] = 1
        st["half_step_lrs"] = lrs
        st["first_half_members"] = [m for h in halves for m in h.members]
        st["first_half_avg_dots"] = avg_dots
        st["first_half_sqnorms"] = sqnorms
        self._record_all(lrs)

    def _second_half_step(self, loss: Tensor | None) -> None:
        """Even calls: ``x_{k+1} = x_{k+½} − η_k·g_b``, then the running average and the gain."""
        st = self.global_state
        halves = self._gather()
        if not any(h.params for h in halves):
            return
        device = self._device()
        members = st["first_half_members"]
        first_of = self._kept_first_grads(halves, set(members))
        matched = [m for h in halves for m in h.members] == members
        terms = self._second_half_terms(halves, first_of, matched, device)
        values = self._gate(*([] if loss is None else [loss]), *terms)
        if values is None:
            return
        values = values[0 if loss is None else 1 :]
        n = len(halves)
        cross_dots = values[:n]
        if matched:  # the sums the first half-step read are the ones the gain needs
            avg_dots, sqnorms = st["first_half_avg_dots"], st["first_half_sqnorms"]
        else:
            avg_dots, sqnorms = _split_pairs(values[n : 3 * n])
        first_lrs = st["half_step_lrs"]
        lrs = first_lrs + self._step_sizes()[len(first_lrs) :]  # groups added in between
        self._second_half(halves, first_of, lrs)
        for key in PENDING:
            del st[key]
        self._end_iteration(lrs, avg_dots, sqnorms, cross_dots)

    def _same_batch_step(self, closure: LossClosure, loss: Tensor | float | None) -> Any:
        """``same_batch=True``: both half-steps on the closure's mini-batch, in one call.

        The first half-step is taken before anything is read from the device; the one gate at the
        end checks both gradients (and losses), and a skipped step puts the saved ``x_k`` back.
        """
        st = self._iteration_state()
        if st["phase"] != 0:
            raise RuntimeError(
                f"{type(self).__name__}(same_batch=True) was given a state saved between the two half-steps of "
                "a same_batch=False run; finish that iteration with same_batch=False first."
            )
        with torch.enable_grad():
            first_loss = closure()
        value, reduced = self._resolve_loss(loss, first_loss)
        device = self._device()
        losses = [] if value is None else [self._loss_tensor(value, reduced, device)]

        firsts = self._gather()
        if not any(h.params for h in firsts):
            return first_loss
        # g_a must outlive the second closure call, which overwrites `.grad`; with weight decay the
        # effective gradients are new tensors already.
        first_grads = [h.grads if h.group["weight_decay"] != 0 else _clone(h.grads, foreach=h.group["foreach"]) for h in firsts]
        terms = self._first_half_terms(firsts, first_grads, device)
        saved = [_clone(h.params, foreach=h.group["foreach"]) for h in firsts]
        lrs = self._step_sizes()
        for half, grads, lr in zip(firsts, first_grads, lrs):
            _descend(half.params, grads, lr, foreach=half.group["foreach"])

        with torch.enable_grad():
            second_loss = closure()
        if second_loss is not None:
            losses.append(self._loss_tensor(second_loss, False, device))
        halves = self._gather()
        first_of = {m: g for h, grads in zip(firsts, first_grads) for m, g in zip(h.members, grads)}
        matched = [m for h in halves for m in h.members] == list(first_of)
        second_terms = self._second_half_terms(halves, first_of, matched, device)
        values = self._gate(*losses, *terms, *second_terms)
        if values is None:
            for half, x_k in zip(firsts, saved):
                _copy_(half.params, x_k, foreach=half.group["foreach"])
            return first_loss
        values = values[len(losses) :]
        n = len(halves)
        avg_dots, sqnorms = _split_pairs(values[: 2 * n])
        cross_dots = values[2 * n : 3 * n]
        if not matched:
            avg_dots, sqnorms = _split_pairs(values[3 * n : 5 * n])
        self._second_half(halves, first_of, lrs)
        self._end_iteration(lrs, avg_dots, sqnorms, cross_dots)
        return first_loss

    # ------------------------------------------------------------------ pieces shared by both modes

    def _iteration_state(self) -> dict[str, Any]:
        st = self.global_state
        if "iteration" not in st:
            st.update(iteration=0, phase=0, gain=1.0)
        return st

    def _step_sizes(self) -> list[float]:
        """``η_k = lr·γ_k/(k+1)^(1/2+δ)`` for every param group."""
        st = self._iteration_state()
        decay = (st["iteration"] + 1) ** (0.5 + self.param_groups[0]["delta"])
        return [group["lr"] * st["gain"] / decay for group in self.param_groups]

    def _gather(self) -> list[_HalfStep]:
        """Every group's parameters that have a gradient, with their effective gradients."""
        halves, offset = [], 0
        for group in self.param_groups:
            params, grads = self._params_and_grads(group)
            members = [offset + i for i, p in enumerate(group["params"]) if p.grad is not None]
            offset += len(group["params"])
            grads = _with_weight_decay(params, grads, group["weight_decay"], foreach=group["foreach"])
            halves.append(_HalfStep(group, params, grads, members))
        return halves

    def _first_half_terms(self, halves: list[_HalfStep], firsts: list[list[Tensor]], device: torch.device) -> list[Tensor]:
        """Per group ``⟨D, g_a⟩`` and ``‖g_a‖²`` (interleaved); ``‖g_a‖²`` is also ``g_a``'s finiteness check."""
        terms = []
        for half, grads in zip(halves, firsts):
            terms.extend(self._curvature_terms(half.params, grads, device, foreach=half.group["foreach"]))
        return terms

    def _curvature_terms(
        self, params: list[Tensor], firsts: list[Tensor], device: torch.device, *, foreach: bool
    ) -> tuple[Tensor, Tensor]:
        """``⟨D, g_a⟩`` (a parameter without ``D`` yet counts 0: ``G_0 = 0``) and ``‖g_a‖²``."""
        avgs, grads = [], []
        for p, g in zip(params, firsts):
            state = self.state.get(p)
            if state is not None and DIFF_AVG in state:
                avgs.append(state[DIFF_AVG])
                grads.append(g)
        return dot(avgs, grads, device), sqnorm(firsts, device)

    def _second_half_terms(
        self, halves: list[_HalfStep], first_of: dict[int, Tensor], matched: bool, device: torch.device
    ) -> list[Tensor]:
        """What the second half-step's gate reads.

        Per group ``⟨g_b, g_a⟩`` over the parameters with both gradients: a non-finite entry of
        ``g_b`` makes it non-finite (``±inf`` or ``inf·0 = NaN``), so it is also the finiteness check.
        When the parameters with a gradient changed between the two half-steps, the first half's
        sums are recomputed over the parameters with both gradients, and the gradients of the others
        are checked by their squared norm.
        """
        pairs = [_pairs_of(h, first_of) for h in halves]
        terms = [dot(pair.second, pair.first, device) for pair in pairs]
        if not matched:
            for half, pair in zip(halves, pairs):
                terms.extend(self._curvature_terms(pair.params, pair.first, device, foreach=half.group["foreach"]))
            alone = [g for h in halves for m, g in zip(h.members, h.grads) if m not in first_of]
            terms.append(sqnorm(alone, device))
        return terms

    def _keep_first_grads(self, half: _HalfStep) -> None:
        """``state[p]["first_grad"] = g_a``: reuse the buffer (a new tensor with weight decay is kept as is)."""
        fresh = half.group["weight_decay"] != 0  # the effective gradients are new tensors
        copy_to, copy_from = [], []
        for p, g in zip(half.params, half.grads):
            state = self.state[p]
            kept = state.get(FIRST_GRAD)
            if fresh:
                state[FIRST_GRAD] = g
            elif kept is None or kept.shape != g.shape:
                state[FIRST_GRAD] = g.clone()
            else:
                copy_to.append(kept)
                copy_from.append(g)
        _copy_(copy_to, copy_from, foreach=half.group["foreach"])

    def _kept_first_grads(self, halves: list[_HalfStep], first_members: set[int]) -> dict[int, Tensor]:
        """``g_a`` of the parameters that have a gradient now and had one at the first half-step."""
        return {
            m: self.state[p][FIRST_GRAD]
            for h in halves
            for m, p in zip(h.members, h.params)
            if m in first_members
        }

    def _second_half(self, halves: list[_HalfStep], first_of: dict[int, Tensor], lrs: list[float]) -> None:
        """``x ← x − η_k·g_b``; ``D ← β·D + (1−β)·(g_a − g_b)`` (``g_a`` is overwritten: scratch)."""
        beta = self.param_groups[0]["beta"]
        for half, lr in zip(halves, lrs):
            foreach = half.group["foreach"]
            _descend(half.params, half.grads, lr, foreach=foreach)
            pair = _pairs_of(half, first_of)
            _subtract_(pair.first, pair.second, foreach=foreach)
            avgs = []
            for p in pair.params:
                state = self.state[p]
                if DIFF_AVG not in state:
                    state[DIFF_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                avgs.append(state[DIFF_AVG])
            exponential_average_(avgs, pair.first, 1.0 - beta, foreach=foreach)

    def _end_iteration(
        self,
        lrs: list[float],
        avg_dots: Sequence[float],
        sqnorms: Sequence[float],
        cross_dots: Sequence[float],
    ) -> None:
        """The gain ``γ_{k+1}`` from the gated sums (module docstring), then ``k ← k+1``."""
        options = self.param_groups[0]
        beta, nu, (low, high) = options["beta"], options["nu"], options["gain_bounds"]
        st = self.global_state
        rho = 1.0 - beta ** (st["iteration"] + 1)
        curvature = sum(
            lr * (beta * a + (1.0 - beta) * (q - c)) for lr, a, q, c in zip(lrs, avg_dots, sqnorms, cross_dots)
        ) / rho
        dx_sqnorm = sum(lr * lr * q for lr, q in zip(lrs, sqnorms))
        gain = dx_sqnorm / curvature if curvature > 0 else nu
        st["gain"] = min(max(gain, low), high)
        st["curvature"] = curvature
        st["iteration"] += 1
        st["phase"] = 0
        st["step"] += 1
        self._record_all(lrs)

    def _record_all(self, lrs: list[float]) -> None:
        st = self.global_state
        for group, lr in zip(self.param_groups, lrs):
            self._record(group, effective_lr=lr, gain=st["gain"], curvature=st.get("curvature", math.nan))


def _pairs_of(half: _HalfStep, first_of: dict[int, Tensor]) -> _Pairs:
    """The group's parameters with a gradient at both half-steps: ``(x, g_b, g_a)``."""
    pairs = _Pairs([], [], [])
    for m, p, g in zip(half.members, half.params, half.grads):
        first = first_of.get(m)
        if first is not None:
            pairs.params.append(p)
            pairs.second.append(g)
            pairs.first.append(first)
    return pairs


def _split_pairs(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """``[a0, q0, a1, q1, …]`` → ``([a0, a1, …], [q0, q1, …])``."""
    return list(values[0::2]), list(values[1::2])
