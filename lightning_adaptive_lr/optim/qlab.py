"""QLAB: the step size from a quadratic fit of the loss along the update (ALGORITHMS.md §2).

Fu and Wu, "QLAB: Quadratic Loss Approximation-Based Optimal Learning Rate for Deep Learning"
(2023), published at AAAI 2024 as "QLABGrad: a Hyperparameter-Free and Convergence-Guaranteed
Scheme for Deep Learning".

Each step, the base rule (SGD, SGD with momentum, Adam, AdamW, or any ``torch.optim`` optimizer
through :meth:`QLAB.wrap`) takes its normal step with its current rate η; that displacement Δ is
the search direction.  Along it, ``φ(t) = L(x + t·Δ)`` is fitted by the quadratic through
``φ(0) = f``, ``φ'(0) = ⟨g, Δ⟩`` and one extra loss value ``φ(1) = f̃`` (the *probe*, a forward
pass without backward on the same mini-batch), and the parameters move to its minimum::

    a1 = ⟨g, Δ⟩,   a2 = f̃ − f − a1,   t* = −a1 / (2·a2)   (if a1 < 0 < a2, else t* = 1)
    η' = clamp(min(t*, max_growth)·η, min_lr, max_lr),   x ← x + (η'/η)·Δ

η' becomes the base rule's rate for the next step, so ``param_groups[i]["lr"]`` always holds the
rate the next trial step will use.  The base rule's buffers (momentum, Adam moments) are updated
exactly once per step, by the trial step.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._base import GLOBAL, AdaptiveOptimizer, LossClosure, check_betas, check_choice, check_range
from ._tensorlists import add_scaled_, dot, group_by_device_and_dtype, sqnorm

__all__ = ["QLAB", "QLABWrapper", "qlab_step_factor"]

#: A loss-only re-evaluation of the mini-batch at the current parameters (no backward).
Probe = Callable[[], Any]

BASES = ("sgd", "sgdm", "adam", "adamw")

# Defaults, chosen from measurements on an MLP on scikit-learn's digits (see the QLAB docstring).
DEFAULT_MIN_LR = 1e-6
DEFAULT_MAX_LR = 10.0
DEFAULT_MIN_TRIAL_LR = 1e-3
DEFAULT_MAX_GROWTH = 2.0

_PROBE_FIXES = (
    "pass both as `optimizer.step(loss=loss, probe=probe)`, where `probe()` returns the same "
    "mini-batch's loss at the current parameters without backward (or register the probe once with "
    "`optimizer.set_probe(probe)`), or, in Lightning, add `lightning_adaptive_lr.AdaptiveLRCallback()` "
    "to the Trainer's callbacks"
)


def qlab_step_factor(a1: float, a2: float) -> float:
    """The factor ``t*`` of the quadratic fit, with the safeguards of ALGORITHMS.md §2.

    ``a1 = ⟨g, Δ⟩`` is the slope and ``a2 = f̃ − f − a1`` the curvature term of
    ``φ(t) ≈ f + a1·t + a2·t²``.  Its minimum ``t* = −a1 / (2·a2)`` is used only when the
    direction descends (``a1 < 0``) and the fit is convex (``a2 > 0``); otherwise, and when
    either is not finite, the rate is kept (``t* = 1``, the authors' fallback).
    """
    if not (math.isfinite(a1) and math.isfinite(a2)):
        return 1.0
    if a1 < 0.0 and a2 > 0.0:
        return -a1 / (2.0 * a2)
    return 1.0


@dataclass
class _Trial:
    """One param group's part of the trial step.

    The group's displacement is ``Δ = −scale·d`` over each bucket, so that moving to the fitted
    point ``x + (η'/η)·Δ`` from the trial point ``x + Δ`` is ``x ← x − (η' − η)·(scale/η)·d``.
    Built-in bases keep the base's direction ``d`` (``scale = η``); the wrapper keeps
    ``d = x − x_trial`` itself (``scale = 1``).
    """

    group: dict[str, Any]
    rate: float  # η: the rate of the trial step
    scale: float
    buckets: list[tuple[list[Tensor], list[Tensor], list[Tensor]]]  # (params, grads, d), one device/dtype each

    def move(self, new_rate: float) -> None:
        """From the trial point to ``x + (new_rate/η)·Δ``."""
        alpha = -(new_rate - self.rate) * (self.scale / self.rate)
        if alpha == 0.0:
            return
        for params, _, directions in self.buckets:
            add_scaled_(params, directions, alpha, foreach=_uses_foreach(self.group))


def _uses_foreach(group: dict[str, Any]) -> bool:
    # Wrapped torch optimizers keep ``foreach=None`` ("torch decides"); only an explicit False
    # asks for the per-tensor path.
    return group.get("foreach") is not False


def _check_bounds(owner: str, min_lr: float, max_lr: float, min_trial_lr: float, max_growth: float) -> None:
    check_range(owner, "min_lr", min_lr, 0.0, None)
    check_range(owner, "max_lr", max_lr, 0.0, None, low_open=True)
    if min_lr > max_lr:
        raise ValueError(f"{owner}: `min_lr` must not exceed `max_lr`, got min_lr={min_lr!r} > max_lr={max_lr!r}")
    check_range(owner, "min_trial_lr", min_trial_lr, 0.0, None, low_open=True)
    if not (isinstance(max_growth, (int, float)) and not isinstance(max_growth, bool) and max_growth >= 1.0):
        raise ValueError(f"{owner}: `max_growth` must be a number in [1, inf], got {max_growth!r}")


class QLAB(AdaptiveOptimizer):
    r"""QLAB: a base rule whose learning rate is set each step by a quadratic fit of the loss.

    Fu and Wu, "QLAB: Quadratic Loss Approximation-Based Optimal Learning Rate for Deep
    Learning", 2023 (AAAI 2024 as QLABGrad).  ALGORITHMS.md §2.

    Each step costs one extra forward pass without backward on the same mini-batch (the *probe*),
    evaluated at the trial point ``x + Δ``, where ``Δ`` is the base rule's step with its current
    rate ``η = param_groups[i]["lr"]``.  With ``a1 = ⟨g, Δ⟩`` and ``a2 = f̃ − f − a1`` the step is
    ``x ← x + (η'/η)·Δ``, ``η' = clamp(min(t*, max_growth)·η, min_lr, max_lr)``,
    ``t* = −a1/(2·a2)``, and ``η'`` is the next step's rate (written to
    ``param_groups[i]["lr"]``).  One ``t*`` serves every param group (the fit is along the whole
    model's displacement), so groups keep the ratio of their rates, up to the bounds.  An lr
    scheduler therefore sets the next *trial* rate; the fit then chooses the step.

    [reconstructed] The displacement formulation (the fit is along the base rule's own step, which
    makes QLAB work on top of any optimizer) and the safeguards:

    * ``a1 ≥ 0`` (not a descent direction), ``a2 ≤ 0`` (no positive curvature along Δ), or a
      non-finite probe loss: the rate is kept (``t* = 1``; the parameters stay at the trial
      point), as the authors' code does.  Only the step's own loss and gradient can skip a step.
    * ``η'`` is clamped to ``[min_lr, max_lr]``.
    * ``t*`` is capped at ``max_growth`` (this option is this package's addition): the quadratic
      is fitted on ``[0, 1]`` and is not to be trusted far beyond it.  When the loss is nearly
      linear up to the trial point (``a2 ≈ 0⁺``), ``t*`` is huge; on the digits MLP below, an
      AdamW run without the cap took a step 130 trial steps long and diverged.
    * The trial step uses ``max(η, min_trial_lr)``: when η is tiny, ``a2`` is the difference of
      nearly equal losses and drowns in float rounding, which would make the rate collapse for
      good.  The authors' code starts the trial rate at 0.1 and caps it at 0.5.
    * The authors' released code fits along ``g/‖g‖∞`` but steps along ``g``, which collapses the
      rate when ``‖g‖∞ < 0.5``; here the fit and the step use the same Δ.
    * ``a1`` uses the gradient in ``.grad`` and the fit uses the losses handed in: weight decay
      shapes the direction Δ but is not part of the fitted function.  To fit a regularized
      objective, put the regularizer in the loss (and its gradient in ``.grad``) instead.

    The base rules, each exactly its ``torch.optim`` counterpart at the rate used:

    * ``"sgd"``: ``torch.optim.SGD(lr, weight_decay=wd)``; ``Δ = −η·(g + wd·x)``.
    * ``"sgdm"``: ``torch.optim.SGD(lr, momentum=momentum, dampening=0, nesterov=False,
      weight_decay=wd)``: the heavy-ball buffer ``b ← momentum·b + (g + wd·x)`` (``b = g + wd·x``
      at the first step), ``Δ = −η·b``.  Without dampening the buffer is about ``1/(1−momentum)``
      times the gradient; the fit absorbs that scale into η.
    * ``"adam"``: ``torch.optim.Adam(lr, betas, eps, weight_decay=wd)`` (L2 added to the gradient);
      ``Δ = −η·m̂/(√v̂ + eps)`` with per-parameter bias corrections.
    * ``"adamw"``: ``torch.optim.AdamW(lr, betas, eps, weight_decay=wd)``;
      ``Δ = −η·(m̂/(√v̂ + eps) + wd·x)``.

    Every Δ is linear in η, so ``x + (η'/η)·Δ`` is the base rule's step at rate ``η'``.  To put
    QLAB on another optimizer, use :meth:`QLAB.wrap`.

    The step needs the mini-batch loss and a probe: ``step(loss=loss, probe=probe)``, a probe
    registered with :meth:`set_probe`, or, in Lightning,
    :class:`~lightning_adaptive_lr.AdaptiveLRCallback` (which also restores BatchNorm statistics
    and replays dropout for the probe).  The probe is called exactly once per step, under
    ``torch.no_grad()``, at the trial point.

    Defaults of the bounds, from measurements with a 64-128-10 tanh MLP on scikit-learn's digits
    (1400 training images, batch 64, cross-entropy, float32, 10 epochs, 3 seeds, ``lr=0.1``):

    * ``max_growth=2``: the cap that mattered.  Final training loss without any bound → with the
      defaults: sgd 0.072 → 0.073 (the fit is stable there, so the cap never hurts), sgdm
      0.119 → 0.041, adam 0.204 → 0.023, adamw (wd 0.01) 84 (one run diverged) → 0.015.
      (torch's SGD-M at 0.1: 0.058; Adam at 1e-3: 0.270, at 1e-2: 0.025.)
    * ``max_lr=10``: above the rates the fit chose there (sgd: 0.36 to 3.5, median 0.84; the
      other bases' medians 0.06 to 0.4); single fits above 10 came only from ``a2 ≈ 0⁺``, which
      ``max_growth`` already caps.  A last guard that decides nothing on a well-scaled problem;
      a cap of 0.3 (near the authors' 0.5) doubled sgd's final loss (0.14).
    * ``min_trial_lr=1e-3``: started at ``lr=1e-6``, sgd's fit drowns in the float32 rounding of
      the losses without a floor (16 of 220 steps fell back, rates stuck near 1e-5 early on) or
      with a floor of 1e-4 (5 fallbacks); from 1e-3 up it follows the same path as a run started
      at 0.1.  The floor moves only the trial point, never the step.
    * ``min_lr=1e-6``: below every rate the fit chose (the smallest: about 1e-4); it keeps the
      rate positive after a step with ``t* ≈ 0``.

    Args:
        params: parameters or param groups.  Groups may differ in every option but ``base``.
        base: the base rule, one of ``"sgd"``, ``"sgdm"``, ``"adam"``, ``"adamw"``.
        lr: the first trial rate η (the authors start at 0.1); afterwards the fitted rate.
        momentum: the heavy-ball coefficient of ``"sgdm"``, in [0, 1).
        betas: Adam's ``(β1, β2)``, each in [0, 1) (``"adam"``, ``"adamw"``).
        eps: Adam's denominator term, outside the square root.
        weight_decay: coupled L2 for ``"sgd"``, ``"sgdm"``, ``"adam"``; decoupled for ``"adamw"``.
        min_lr: lower bound of the fitted rate η'.
        max_lr: upper bound of the fitted rate η'.
        min_trial_lr: lower bound of the trial step's rate (the step taken is still η').
        max_growth: upper bound of ``t*``: the step is at most this many trial steps long.
        foreach: use the multi-tensor (``torch._foreach_*``) path; ``False`` updates tensor by tensor.
        average_across_ranks: average the loss and the probe's loss across ``torch.distributed``
            ranks (one collective each per step) so replicas stay identical.

    After each step every param group holds ``effective_lr`` (η', the rate used and the next
    trial rate), ``fitted_lr`` (``t*·η`` before ``max_growth`` and the bounds), ``trial_loss`` (f̃),
    ``directional_derivative`` (a1) and ``curvature`` (a2); a1 and a2 are over the whole model.
    ``state["global"]`` holds ``step`` and ``skipped_steps``; ``state[p]`` holds the base rule's
    buffers under ``torch.optim``'s names (``momentum_buffer``; ``step``, ``exp_avg``,
    ``exp_avg_sq``).
    """

    requires_loss: ClassVar[bool] = True
    #: The step needs a loss-only re-evaluation at the trial point (the callback checks this).
    requires_probe: ClassVar[bool] = True
    shared_options = ("base",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        min_lr: float = DEFAULT_MIN_LR,
        max_lr: float = DEFAULT_MAX_LR,
        min_trial_lr: float = DEFAULT_MIN_TRIAL_LR,
        max_growth: float = DEFAULT_MAX_GROWTH,
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
    ) -> None:
        name = type(self).__name__
        check_choice(name, "base", base, BASES)
        check_range(name, "lr", lr, 0.0, None, low_open=True)
        check_range(name, "momentum", momentum, 0.0, 1.0, high_open=True)
        check_betas(name, betas)
        check_range(name, "eps", eps, 0.0, None)
        check_range(name, "weight_decay", weight_decay, 0.0, None)
        _check_bounds(name, min_lr, max_lr, min_trial_lr, max_growth)
        defaults = dict(
            base=base,
            lr=lr,
            momentum=momentum,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            min_lr=min_lr,
            max_lr=max_lr,
            min_trial_lr=min_trial_lr,
            max_growth=max_growth,
        )
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

    # ------------------------------------------------------------------ construction on an optimizer

    @classmethod
    def wrap(
        cls,
        optimizer: Optimizer,
        *,
        min_lr: float = DEFAULT_MIN_LR,
        max_lr: float = DEFAULT_MAX_LR,
        min_trial_lr: float = DEFAULT_MIN_TRIAL_LR,
        max_growth: float = DEFAULT_MAX_GROWTH,
        average_across_ranks: bool = True,
    ) -> QLABWrapper:
        """Put QLAB on top of an existing optimizer instance (``torch.optim.RAdam``, your own, ...).

        The returned optimizer shares ``optimizer.param_groups`` (the same list and dicts), so an
        lr scheduler attached to either acts on both, and ``param_groups[i]["lr"]`` is the rate
        the next trial step uses.  Each :meth:`step` snapshots the parameters that have a
        gradient, calls ``optimizer.step()`` once (its buffers are updated exactly once), takes
        ``Δ = x_trial − x`` as the direction, probes the loss at ``x_trial`` and moves to
        ``x + (η'/η)·Δ``.  The snapshot costs one copy of those parameters.

        The wrapped optimizer must step without a closure and without a loss, and leave
        parameters without a gradient alone (as ``torch.optim`` optimizers do).  Its groups'
        ``foreach`` flag also chooses the wrapper's own kernels (anything but ``False``: foreach).
        Step through the wrapper only: stepping the wrapped optimizer directly bypasses QLAB.

        Args:
            optimizer: the base optimizer.  ``QLAB.wrap(torch.optim.SGD(...))`` and
                ``QLAB.wrap(torch.optim.Adam(...))`` follow the same trajectories as
                ``QLAB(base="sgd"/"sgdm"/"adam")`` with the same settings.
            min_lr, max_lr, min_trial_lr, max_growth, average_across_ranks: as for :class:`QLAB`.
        """
        return QLABWrapper(
            optimizer,
            min_lr=min_lr,
            max_lr=max_lr,
            min_trial_lr=min_trial_lr,
            max_growth=max_growth,
            average_across_ranks=average_across_ranks,
        )

    # ------------------------------------------------------------------ probe intake

    def _init_transient(self) -> None:
        super()._init_transient()
        # The registered probe is a function: not state, not pickled (register it again after
        # loading or copying the optimizer).
        self._registered_probe: tuple[Probe, bool] | None = None
        self._active_probe: tuple[Probe, bool] | None = None

    def set_probe(self, probe: Probe | None, *, reduced: bool = False) -> None:
        """Register the probe used by every later :meth:`step` that is not given ``probe=``.

        Args:
            probe: returns the loss of the mini-batch whose gradient is in ``.grad``, evaluated
                at the current parameters without backward (called under ``torch.no_grad()``).
                ``None`` unregisters it.
            reduced: ``True`` if the value it returns is already averaged across data-parallel
                ranks (otherwise the optimizer averages it, like the loss).
        """
        if probe is not None and not callable(probe):
            raise TypeError(f"{type(self).__name__}.set_probe: `probe` must be callable, got {probe!r}")
        self._registered_probe = None if probe is None else (probe, reduced)

    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: LossClosure | None = None,
        *,
        loss: Tensor | float | None = None,
        probe: Probe | None = None,
    ) -> Any:
        """Perform one optimization step.

        Args:
            closure: optional; re-evaluates the model, calls ``backward()`` and returns the loss.
                Called exactly once.
            loss: the loss of the mini-batch whose gradient is in ``.grad`` (takes precedence
                over :meth:`set_loss` and over the closure's return value).
            probe: returns that mini-batch's loss at the current parameters without backward; it
                is called once, at the trial point.  Takes precedence over :meth:`set_probe`.

        Returns:
            The closure's return value if a closure was given, else ``loss``.
        """
        # The registered probe is looked up only after the closure has run: in Lightning the
        # closure runs the hooks in which the callback registers the probe of this very step.
        self._active_probe = None if probe is None else (probe, False)
        try:
            return super().step(closure, loss=loss)
        finally:
            self._active_probe = None

    def _require_probe(self) -> tuple[Probe, bool]:
        """This step's probe: ``probe=`` if given, else the registered one; a clear error if neither."""
        active = self._active_probe or self._registered_probe
        if active is None:
            raise RuntimeError(f"{type(self).__name__}.step() needs the mini-batch loss and a probe: {_PROBE_FIXES}.")
        return active

    def _probe_at_trial_point(self, device: torch.device) -> Tensor:
        """f̃: the probe's loss at the trial point, as a float64 0-d tensor averaged across ranks."""
        probe, reduced = self._require_probe()
        with torch.no_grad():
            value = probe()
        if value is None:
            raise RuntimeError(f"{type(self).__name__}: the probe returned None; it must return the loss")
        return self._loss_tensor(value, reduced, device)

    # ------------------------------------------------------------------ the fit, shared with the wrapper

    @staticmethod
    def _trial_rate(group: dict[str, Any]) -> float:
        return max(float(group["lr"]), group["min_trial_lr"])

    def _fit_and_move(self, trials: list[_Trial], loss: float, directional: Tensor, device: torch.device) -> None:
        """Probe the trial point, fit the quadratic, move every group to its fitted point."""
        try:
            trial_loss = self._probe_at_trial_point(device)
        except BaseException:
            for trial in trials:  # back to where the step started (the buffers keep their update)
                trial.move(0.0)
            raise
        # The step's second device-to-host read (the first is the gate): t* decides every group's
        # rate, which must be a number in param_groups.  The probe's forward pass has just run on
        # the device, so this read waits for little more than that pass.
        f_trial, a1 = torch.stack([trial_loss, directional.to(trial_loss)]).tolist()
        a2 = f_trial - loss - a1
        t_star = qlab_step_factor(a1, a2)
        for trial in trials:
            group = trial.group
            fitted = t_star * trial.rate
            new_rate = min(max(min(t_star, group["max_growth"]) * trial.rate, group["min_lr"]), group["max_lr"])
            trial.move(new_rate)
            _set_lr(group, new_rate)
            self._record(
                group,
                effective_lr=new_rate,
                fitted_lr=fitted,
                trial_loss=f_trial,
                directional_derivative=a1,
                curvature=a2,
            )
        self.global_state["step"] += 1

    # ------------------------------------------------------------------ the step of the built-in bases

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        self._require_probe()  # before anything changes
        groups = [(g, *self._params_and_grads(g)) for g in self.param_groups]
        groups = [(g, ps, gs) for g, ps, gs in groups if ps]
        if not groups:
            return
        device = loss.device
        grad_sqnorms = [sqnorm(gs, device) for _, _, gs in groups]
        # The gate: the step's one synchronization before anything changes.
        gated = self._gate(loss, *grad_sqnorms)
        if gated is None:
            return
        f, group_sqnorms = gated[0], gated[1:]

        trials, slopes = [], []
        for (group, params, grads), grad_sqnorm in zip(groups, group_sqnorms):
            rate = self._trial_rate(group)
            buckets = []
            for ps, gs in group_by_device_and_dtype(params, grads):
                ds = self._directions(group, ps, gs)
                buckets.append((ps, gs, ds))
            for ps, _, ds in buckets:  # the trial step Δ = −η·d
                add_scaled_(ps, ds, -rate, foreach=group["foreach"])
            if group["base"] == "sgd" and group["weight_decay"] == 0:
                slopes.append(torch.tensor(-rate * grad_sqnorm, dtype=loss.dtype, device=device))  # d = g
            else:
                slope = sum((dot(gs, ds, device) for _, gs, ds in buckets), torch.zeros((), dtype=loss.dtype, device=device))
                slopes.append(-rate * slope)
            trials.append(_Trial(group, rate, rate, buckets))
        self._fit_and_move(trials, f, torch.stack(slopes).sum(), device)

    def _directions(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """The base rule's unit-rate direction ``d`` (``Δ = −η·d``); updates its buffers once."""
        base, wd, foreach = group["base"], group["weight_decay"], group["foreach"]
        if base == "sgd":
            return _with_l2(params, grads, wd, foreach=foreach)
        if base == "sgdm":
            return self._momentum_buffers(params, _with_l2(params, grads, wd, foreach=foreach), group["momentum"], foreach)
        coupled = wd if base == "adam" else 0.0
        directions = self._adam_directions(group, params, _with_l2(params, grads, coupled, foreach=foreach))
        if base == "adamw" and wd != 0:
            add_scaled_(directions, params, wd, foreach=foreach)  # decoupled: x(1 − η·wd) − η·u
        return directions

    def _momentum_buffers(self, params: list[Tensor], grads: list[Tensor], momentum: float, foreach: bool) -> list[Tensor]:
        """``b ← momentum·b + g`` (``b = g`` at a parameter's first step), as torch's SGD."""
        existing, existing_grads, buffers = [], [], []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.detach().clone()
            else:
                existing.append(state["momentum_buffer"])
                existing_grads.append(g)
            buffers.append(state["momentum_buffer"])
        if existing:
            if foreach:
                torch._foreach_mul_(existing, momentum)
                torch._foreach_add_(existing, existing_grads)
            else:
                for b, g in zip(existing, existing_grads):
                    b.mul_(momentum).add_(g)
        return buffers

    def _adam_directions(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """New tensors ``m̂/(√v̂ + eps)`` after the moment updates, with per-parameter step counts."""
        beta1, beta2 = group["betas"]
        eps, foreach = group["eps"], group["foreach"]
        avgs, sq_avgs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            avgs.append(state["exp_avg"])
            sq_avgs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        bias1 = [1.0 - beta1**k for k in steps]
        # m̂/(√v̂ + eps) = m / (bc1·(√v/√bc2 + eps)): the denominator absorbs both corrections.
        scale = [b1 / math.sqrt(1.0 - beta2**k) for b1, k in zip(bias1, steps)]
        shift = [eps * b1 for b1 in bias1]
        if foreach:
            torch._foreach_lerp_(avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(sq_avgs, beta2)
            torch._foreach_addcmul_(sq_avgs, grads, grads, 1.0 - beta2)
            directions = torch._foreach_sqrt(sq_avgs)
            torch._foreach_mul_(directions, scale)
            torch._foreach_add_(directions, shift)
            # m / denominator, written into the denominator's memory: one fresh allocation per step
            # instead of two (on the CPU each fresh one is paid again in page faults).
            torch._foreach_reciprocal_(directions)
            torch._foreach_mul_(directions, avgs)
            return list(directions)
        directions = []
        for m, v, g, c, s in zip(avgs, sq_avgs, grads, scale, shift):
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            directions.append(v.sqrt().mul_(c).add_(s).reciprocal_().mul_(m))
        return directions


def _with_l2(params: list[Tensor], grads: list[Tensor], weight_decay: float, *, foreach: bool) -> list[Tensor]:
    """``g + wd·x`` as new tensors (the gradients themselves when ``wd = 0``)."""
    if weight_decay == 0:
        return list(grads)
    if foreach:
        return list(torch._foreach_add(grads, params, alpha=weight_decay))
    return [g.add(p, alpha=weight_decay) for p, g in zip(params, grads)]


def _set_lr(group: dict[str, Any], rate: float) -> None:
    """Write the next rate, in place where the group keeps it as a tensor (capturable optimizers)."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(rate)
    else:
        group["lr"] = rate


class QLABWrapper(QLAB):
    """QLAB on top of an existing optimizer instance: build it with :meth:`QLAB.wrap`.

    Shares the wrapped optimizer's ``param_groups`` (its groups gain the keys ``min_lr``,
    ``max_lr``, ``min_trial_lr``, ``max_growth``, ``average_across_ranks`` and the recorded
    quantities).  Its ``state`` holds only ``state["global"]`` (``step``, ``skipped_steps``); the
    wrapped optimizer's buffers stay in ``base_optimizer.state``.  :meth:`state_dict` holds both
    (the wrapped optimizer's state dict, with this wrapper's global scalars under
    ``state["global"]``), so :meth:`load_state_dict` restores both and resumes bit for bit.
    """

    shared_options = ()

    def __init__(  # noqa: D107 - built by QLAB.wrap, which documents the arguments
        self,
        optimizer: Optimizer,
        *,
        min_lr: float = DEFAULT_MIN_LR,
        max_lr: float = DEFAULT_MAX_LR,
        min_trial_lr: float = DEFAULT_MIN_TRIAL_LR,
        max_growth: float = DEFAULT_MAX_GROWTH,
        average_across_ranks: bool = True,
    ) -> None:
        name = "QLAB.wrap"
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"{name}: `optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, QLAB):
            raise ValueError(f"{name}: `optimizer` is already a QLAB optimizer")
        _check_bounds(name, min_lr, max_lr, min_trial_lr, max_growth)
        own = dict(min_lr=min_lr, max_lr=max_lr, min_trial_lr=min_trial_lr, max_growth=max_growth)
        self.base_optimizer = optimizer
        self._wrapping = True
        # The base's own group dicts are registered here (torch's add_param_group appends the
        # dict it is given), then the list itself is shared.
        AdaptiveOptimizer.__init__(
            self,
            list(optimizer.param_groups),
            {**optimizer.defaults, **own},
            foreach=True,
            average_across_ranks=average_across_ranks,
        )
        self.param_groups = optimizer.param_groups
        self._wrapping = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["base_optimizer"] = self.base_optimizer  # the shared param_groups list stays shared
        state["_wrapping"] = False
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group to the wrapped optimizer (with its defaults), then QLAB's options."""
        if self.__dict__.get("_wrapping", False):
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        for key, value in self.defaults.items():
            self.param_groups[-1].setdefault(key, value)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict, plus this wrapper's scalars at ``state["global"]``."""
        inner = self.base_optimizer.state_dict()
        state = dict(inner["state"])
        if GLOBAL in state:  # a wrapped optimizer of this package has a "global" entry too
            state["base_" + GLOBAL] = state.pop(GLOBAL)
        state[GLOBAL] = copy.deepcopy(self.global_state)
        return {**inner, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped optimizer and this wrapper (from :meth:`state_dict`'s layout)."""
        state = dict(state_dict["state"])
        own = state.pop(GLOBAL, None)
        if "base_" + GLOBAL in state:
            state[GLOBAL] = state.pop("base_" + GLOBAL)
        self.base_optimizer.load_state_dict({**state_dict, "state": state})
        self.param_groups = self.base_optimizer.param_groups  # torch's load builds new group dicts
        self.state = defaultdict(dict)
        if own is not None:
            self.state[GLOBAL] = copy.deepcopy(own)

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        self._require_probe()  # before anything changes
        for group in self.param_groups:  # groups added to the wrapped optimizer directly
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        groups = [(g, *self._params_and_grads(g)) for g in self.param_groups]
        groups = [(g, ps, gs) for g, ps, gs in groups if ps]
        if not groups:
            return
        device = loss.device
        grads = [g for _, _, gs in groups for g in gs]
        # The gate: the step's one synchronization before anything changes (the base included).
        gated = self._gate(loss, dot(grads, grads, device))
        if gated is None:
            return
        f = gated[0]

        trials = []
        for group, params, grads_ in groups:
            rate = self._trial_rate(group)
            _set_lr(group, rate)
            buckets = []
            for ps, gs in group_by_device_and_dtype(params, grads_):
                snapshot = torch._foreach_mul(ps, 1.0) if _uses_foreach(group) else [p.detach().clone() for p in ps]
                buckets.append((ps, gs, list(snapshot)))
            trials.append(_Trial(group, rate, 1.0, buckets))
        self.base_optimizer.step()
        slope = torch.zeros((), dtype=loss.dtype, device=device)
        for trial in trials:
            for ps, gs, snapshot in trial.buckets:  # the snapshot becomes x − x_trial = −Δ
                if _uses_foreach(trial.group):
                    torch._foreach_sub_(snapshot, ps)
                else:
                    for s, p in zip(snapshot, ps):
                        s.sub_(p)
                slope = slope - dot(gs, snapshot, device)
        self._fit_and_move(trials, f, slope, device)
