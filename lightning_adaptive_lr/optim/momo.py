r"""MoMo and MoMo-Adam: momentum model-based adaptive learning rates.

Schaipp, Ohana, Eickenberg, Defazio, Gower. "MoMo: Momentum Models for Adaptive Learning
Rates." ICML 2024.  Implemented to the letter of the authors' update (docs/algorithms.md §1, [exact]).

Both keep exponential averages of the loss ``f̄``, of the gradient ``d`` and of ``⟨g, x⟩`` (``γ``);
together they define a model of the loss, and the step is the truncated Polyak step on that model,
capped at ``lr``::

    τ = min(lr/ρ, [c·(f̄ − ρ·lb) + ⟨d, x⟩ − c·γ]₊ / ‖d‖²),      c = 1 + lr·weight_decay
    x ← (x − τ·d) / c

The base direction is MoMo's dampened heavy-ball average ``d`` (:func:`~._directions.momentum_`
with ``dampening = β``) or, for MoMo-Adam, Adam's ``d/Dn`` (:mod:`._directions`), in whose
geometry ``‖d‖²`` becomes ``Σ d²/Dn``.  The step size is :func:`momo_step_size`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _momo_compiled as kernels
from ._base import BETAS, FINITE, FLAG, FRACTION, NONNEGATIVE, AdaptiveOptimizer, check_range, checked
from ._compiled import scalar
from ._directions import adam_denominators, adam_directions, adam_moments_, momentum_
from ._reduce import dot, sqnorm, sum_partials
from ._scalars import Scalar, safe_div, smax, smin, where
from ._tensorlists import add_scaled_, divide_, multiply_

__all__ = ["MoMo", "MoMoAdam", "momo_loss_model", "momo_step_size"]

#: One param group with its parameters that have a gradient, and those gradients.
Group = tuple[dict[str, Any], list[Tensor], list[Tensor]]

#: Param-group key of the lower bound in use (``None`` before the first step: then ``lb``).
CURRENT_LB = "current_lb"


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


class _MoMoBase(AdaptiveOptimizer):
    """The loss model, the per-group Polyak step sizes and the lower bound, shared by both methods."""

    requires_loss = True
    group_state: ClassVar[dict[str, Any]] = {
        **AdaptiveOptimizer.group_state,
        "loss_avg": 0.0,
        "gamma": 0.0,
        CURRENT_LB: None,
    }

    #: Whether float16 parameters are supported (Adam's ``eps`` is 0 in float16: MoMo-Adam refuses them).
    supports_float16: ClassVar[bool] = True

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

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        groups = [(g, *self._params_and_grads(g)) for g in self.param_groups]
        if not any(params for _, params, _ in groups):
            return
        if not self.supports_float16 and any(p.dtype == torch.float16 for _, ps, _ in groups for p in ps):
            raise TypeError(
                f"{type(self).__name__} does not support float16 parameters: `eps` is 0 in float16, so an "
                "element whose gradient is 0 would divide 0 by 0. Keep the parameters in float32 (mixed "
                "precision: precision='16-mixed') or use bfloat16."
            )
        step = self._compiled_step if self._shared("compiled") else self._eager_step
        step(loss, groups)

    def _eager_step(self, loss: Tensor, groups: list[Group]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compiled_step(self, loss: Tensor, groups: list[Group]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

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

    def _step_sizes(self, groups: list[Group], d_dot_x: Tensor, d_sqnorm: Tensor, rho: float) -> list[Scalar]:
        """Per group τ by :func:`momo_step_size` (recorded); the groups update the lower bound in turn."""
        d_dot_x, d_sqnorm = self._to_host_if_free(d_dot_x, d_sqnorm)
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
                lb=group["lb"] if lb is None else lb,
                lb_floor=group["lb"],
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
        weight_decay: L2 regularization handled by the proximal (implicit) update ``x / (1 + lr·wd)``.
        lb: lower bound of the loss (0 for most losses); with ``estimate_lb`` the starting estimate
            and a floor.  Change it between steps with :meth:`set_lower_bound`.
        bias_correction: start the averages at zero and correct by ``1 − beta^k`` (otherwise they
            start at the first values).
        estimate_lb: estimate the lower bound online (MoMo*), useful when the loss does not reach 0.
        foreach: use the multi-tensor (``torch._foreach_*``) path; ``False`` updates tensor by tensor.
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

    After each step every param group holds ``effective_lr`` (= ``tau``, the step size used) and
    ``lower_bound`` (the lower bound in use after this group; ``lb`` stays the floor).  The
    optimizer-wide state is kept, equal, in every param group: ``step`` (k), ``skipped_steps``,
    ``loss_avg`` (f̄), ``gamma`` (γ) and ``current_lb`` (the lower bound in use; ``None`` before
    the first step, meaning ``lb``).  ``state[p]["grad_avg"]`` is ``d``.

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

    shared_options = ("beta", "lb", "bias_correction", "estimate_lb", "compiled")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1.0,
        beta: float = 0.9,
        weight_decay: float = 0.0,
        lb: float = 0.0,
        bias_correction: bool = False,
        estimate_lb: bool = False,
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
        compiled: bool = False,
    ) -> None:
        defaults = checked(
            type(self).__name__, locals(), lr=NONNEGATIVE, beta=FRACTION, weight_decay=NONNEGATIVE, lb=FINITE,
            bias_correction=FLAG, estimate_lb=FLAG, compiled=FLAG,
        )  # fmt: skip
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

    def _loss_beta(self) -> float:
        return self._shared("beta")

    def _this_step(self) -> tuple[bool, float]:
        """For the step about to be taken (``k = step + 1``): whether its averages start at its own
        values (the first step without bias correction), and ``ρ = 1 − β^k`` (1 without bias correction)."""
        k, beta, bias_correction = self._shared("step") + 1, self._shared("beta"), self._shared("bias_correction")
        return k == 1 and not bias_correction, 1.0 - beta**k if bias_correction else 1.0

    def _eager_step(self, loss: Tensor, groups: list[Group]) -> None:
        params, grads = _flatten(groups)
        values = self._gate(loss=loss, gx=dot(grads, params, loss.device))
        if values is None:
            return
        restart, rho = self._this_step()
        self._advance_loss_model(values, restart=restart)
        beta = self._shared("beta")
        directions = [
            momentum_(
                [self.state[p] for p in ps],
                gs,
                beta,
                dampening=beta,
                key="grad_avg",
                first="copy" if restart else "zero",
                foreach=group["foreach"],
            )
            for group, ps, gs in groups
        ]
        ds = [d for group_ds in directions for d in group_ds]
        taus = self._step_sizes(groups, dot(ds, params, loss.device), sqnorm(ds, loss.device), rho)
        _descend_(groups, directions, taus)

    def _compiled_step(self, loss: Tensor, groups: list[Group]) -> None:
        name, (params, grads), (restart, rho) = type(self).__name__, _flatten(groups), self._this_step()
        avgs = [kernels.state_or_zeros(self.state.get(p, {}), p, "grad_avg") for p in params]
        # A restart takes the gradient whole into the zero average: the eager path's copy.
        weight = scalar(1.0 if restart else 1.0 - self._shared("beta"))
        partials = kernels.run_on_buckets(name, kernels.momo_sums, (avgs, grads, params), weight)
        gx, d_dot_x, d_sqnorm = sum_partials(partials, loss.device)
        values = self._gate(loss=loss, gx=gx)
        if values is None:
            return
        self._advance_loss_model(values, restart=restart)
        for p, d in zip(params, avgs):
            self.state[p].setdefault("grad_avg", d)
        taus = self._step_sizes(groups, d_dot_x, d_sqnorm, rho)
        for (group, ps, gs), tau in zip(groups, taus):
            ds = [self.state[p]["grad_avg"] for p in ps]
            divisor = scalar(1.0 + group["lr"] * group["weight_decay"])
            kernels.run_on_buckets(name, kernels.momo_update, (ds, gs, ps), weight, scalar(tau), divisor)


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
            Shared by groups.
        eps: added to the square root of the second moment (outside the root, as Adam).
        weight_decay: weight decay; proximal ``x / (1 + lr·wd)`` by default.
        lb: lower bound of the loss; with ``estimate_lb`` the starting estimate and a floor.
            Change it between steps with :meth:`set_lower_bound`.
        estimate_lb: estimate the lower bound online.
        decoupled_weight_decay: shrink ``x ← x·(1 − lr·wd)`` before the step (AdamW style) instead
            of the proximal division.  ``τ`` keeps ``c = 1 + lr·wd`` in both modes, as the authors do.
        foreach: use the multi-tensor path.
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

    After each step every param group holds ``effective_lr`` (= ``tau``) and ``lower_bound``, and,
    equal in every group, ``step``, ``skipped_steps``, ``loss_avg``, ``gamma`` and ``current_lb``
    (as :class:`MoMo`); ``state[p]`` holds ``grad_avg`` (d) and ``grad_avg_sq`` (v).  float16
    parameters are refused (a ``TypeError`` at the step): Adam's ``eps`` is 0 in float16; bfloat16
    and float32 work.

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

    shared_options = ("betas", "lb", "estimate_lb", "compiled")
    supports_float16 = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        lb: float = 0.0,
        estimate_lb: bool = False,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool = True,
        average_across_ranks: bool = True,
        compiled: bool = False,
    ) -> None:
        defaults = checked(
            type(self).__name__, locals(), lr=NONNEGATIVE, betas=BETAS, eps=NONNEGATIVE, weight_decay=NONNEGATIVE,
            lb=FINITE, estimate_lb=FLAG, decoupled_weight_decay=FLAG, compiled=FLAG,
        )  # fmt: skip
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

    def _loss_beta(self) -> float:
        return self._shared("betas")[0]

    def _this_step(self) -> tuple[float, float]:
        """For the step about to be taken (``k = step + 1``): ``ρ = 1 − β1^k`` and ``root = √(1 − β2^k)``."""
        (beta1, beta2), k = self._shared("betas"), self._shared("step") + 1
        return 1.0 - beta1**k, math.sqrt(1.0 - beta2**k)

    def _eager_step(self, loss: Tensor, groups: list[Group]) -> None:
        params, grads = _flatten(groups)
        values = self._gate(loss=loss, gx=dot(grads, params, loss.device))
        if values is None:
            return
        (beta1, beta2), (rho, root) = self._shared("betas"), self._this_step()
        self._advance_loss_model(values, restart=False)
        moments, directions = [], []
        for group, ps, gs in groups:
            states = [self.state[p] for p in ps]
            for p, state in zip(ps, states):
                if "grad_avg" not in state:  # both moments start at 0
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["grad_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ds, vs = [s["grad_avg"] for s in states], [s["grad_avg_sq"] for s in states]
            adam_moments_(ds, vs, gs, 1 - beta1, 1 - beta2, foreach=group["foreach"])
            # d/(√v/root + eps) = root·u with u = d/(√v + eps·root): root moves to the scalars, which
            # saves the pass dividing by it (adam_denominators skips a division by 1).
            denominators = adam_denominators(vs, 1.0, group["eps"] * root, foreach=group["foreach"])
            moments += ds
            directions.append(adam_directions(ds, denominators, foreach=group["foreach"], out=denominators))
        us = [u for group_us in directions for u in group_us]
        d_dot_u = dot(moments, us, loss.device) * root
        taus = self._step_sizes(groups, dot(moments, params, loss.device), d_dot_u, rho)
        _descend_(groups, directions, [tau * root for tau in taus])

    def _compiled_step(self, loss: Tensor, groups: list[Group]) -> None:
        name, (beta1, beta2), (rho, root) = type(self).__name__, self._shared("betas"), self._this_step()
        weight1, weight2, root_t = scalar(1.0 - beta1), scalar(1.0 - beta2), scalar(root)
        moments, partials = [], []
        for group, ps, gs in groups:
            ds = [kernels.state_or_zeros(self.state.get(p, {}), p, "grad_avg") for p in ps]
            vs = [kernels.state_or_zeros(self.state.get(p, {}), p, "grad_avg_sq") for p in ps]
            eps = scalar(group["eps"])
            moments.append((ds, vs, eps))
            columns = (ds, vs, gs, ps)
            partials += kernels.run_on_buckets(name, kernels.momo_adam_sums, columns, weight1, weight2, root_t, eps)
        gx, d_dot_x, d_dot_u = sum_partials(partials, loss.device)
        values = self._gate(loss=loss, gx=gx)
        if values is None:
            return
        self._advance_loss_model(values, restart=False)
        for (_, ps, _), (ds, vs, _) in zip(groups, moments):
            for p, d, v in zip(ps, ds, vs):
                self.state[p].setdefault("grad_avg", d)
                self.state[p].setdefault("grad_avg_sq", v)
        taus = self._step_sizes(groups, d_dot_x, d_dot_u, rho)
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
                scalar(tau),
                scalar(keep),
                scalar(divisor),
            )
