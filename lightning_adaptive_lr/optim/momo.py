"""MoMo and MoMo-Adam: momentum model-based adaptive learning rates.

Schaipp, Ohana, Eickenberg, Defazio, Gower. "MoMo: Momentum Models for Adaptive Learning
Rates." ICML 2024.  Implemented to the letter of the authors' update (ALGORITHMS.md §1, [exact]).

Both keep exponential averages of the loss ``f̄``, of the gradient ``d`` and of ``⟨g, x⟩`` (``γ``);
together they define a model of the loss, and the step is the truncated Polyak step on that model,
capped at ``lr``::

    τ = min(lr/ρ, [c·(f̄ − ρ·lb) + ⟨d, x⟩ − c·γ]₊ / ‖d‖²),      c = 1 + lr·weight_decay

MoMo-Adam measures ``‖d‖²`` and steps in Adam's preconditioned geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import AdaptiveOptimizer, check_betas, check_flag, check_range
from ._compiled import ensure_inductor_works, run_compiled, scalar, sum_partials
from ._scalars import Scalar, safe_div, smax, smin, where
from ._tensorlists import (
    add_scaled_,
    dot,
    exponential_average_,
    group_by_device_and_dtype,
    sqnorm,
    work_dtype,
)

__all__ = ["MoMo", "MoMoAdam"]


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

    Follows ALGORITHMS.md §1 step 5: the lower-bound reset, the capped Polyak step, the online
    lower-bound estimate (``estimate_lb``).  Works on floats and on 0-d tensors.
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


class _MoMoBase(AdaptiveOptimizer):
    """Shared by MoMo and MoMo-Adam: the loss-model scalars and the per-group Polyak step."""

    requires_loss = True

    def _groups_with_grads(self) -> tuple[list[tuple[dict[str, Any], list[Tensor], list[Tensor]]], list[Tensor], list[Tensor]]:
        """Each group with its parameters that have a gradient and those gradients; then all of both."""
        groups = [(g, *self._params_and_grads(g)) for g in self.param_groups]
        params = [p for _, ps, _ in groups for p in ps]
        grads = [g for _, _, gs in groups for g in gs]
        return groups, params, grads

    def _average_loss_model(self, f: float, gx: float, beta: float, start: float) -> None:
        """``k ← k+1``; ``f̄`` and ``γ`` take ``f`` and ``⟨g, x⟩`` (at ``k = 1`` from ``start``·those values)."""
        st = self.global_state
        if st["step"] == 0:
            st.setdefault("lb", self.param_groups[0]["lb"])
            st["loss_avg"], st["gamma"] = start * f, start * gx
        st["step"] += 1
        st["loss_avg"] = beta * st["loss_avg"] + (1 - beta) * f
        st["gamma"] = beta * st["gamma"] + (1 - beta) * gx

    def _polyak_step_sizes(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
        *,
        loss_avg: float,
        gamma: float,
        d_dot_x: Scalar,
        d_sqnorm: Scalar,
        rho: float,
    ) -> list[Scalar]:
        """Per group τ (recorded, with the lower bound, which groups update in turn)."""
        st = self.global_state
        lb = st["lb"]
        taus = []
        for group, _, _ in groups:
            tau, lb = momo_step_size(
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                loss_avg=loss_avg,
                gamma=gamma,
                d_dot_x=d_dot_x,
                d_sqnorm=d_sqnorm,
                rho=rho,
                lb=lb,
                lb_floor=group["lb"],
                estimate_lb=group["estimate_lb"],
            )
            self._record(group, effective_lr=tau, tau=tau, lower_bound=lb)
            taus.append(tau)
        st["lb"] = lb
        return taus

    @staticmethod
    def _move(
        groups: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
        directions: list[list[Tensor]],
        taus: list[Scalar],
        direction_scale: float = 1.0,
    ) -> None:
        """The foreach/per-tensor step: ``x ← (x − τ·direction_scale·direction) / c`` per group."""
        for (group, params, _), direction, tau in zip(groups, directions, taus):
            shrink = group["lr"] * group["weight_decay"]
            decoupled = group.get("decoupled_weight_decay", False)
            foreach = group["foreach"]
            for ps, ds in group_by_device_and_dtype(params, direction):
                if shrink != 0 and decoupled:
                    _multiply_(ps, 1.0 - shrink, foreach=foreach)
                add_scaled_(ps, ds, -tau * direction_scale, foreach=foreach)
                if shrink != 0 and not decoupled:
                    _divide_(ps, 1.0 + shrink, foreach=foreach)

    def _compiled(self, function: Callable[..., Any], columns: tuple[list[Tensor], ...], *scalars: Tensor) -> list[Any]:
        """``function`` compiled, run on each device-and-dtype bucket of ``columns`` (then ``scalars``)."""
        name = type(self).__name__
        results = []
        for bucket in group_by_device_and_dtype(*columns):
            ensure_inductor_works(name, bucket[0][0].device)
            results.append(run_compiled(name, function, *bucket, *scalars))
        return results

    def _state_or_zeros(self, param: Tensor, key: str) -> Tensor:
        """``state[param][key]``, or zeros not yet stored (nothing is stored before the gate)."""
        buffer = self.state.get(param, {}).get(key)
        return torch.zeros_like(param, memory_format=torch.preserve_format) if buffer is None else buffer


def _multiply_(xs: list[Tensor], factor: float, *, foreach: bool) -> None:
    """``xs *= factor`` in place."""
    if foreach:
        torch._foreach_mul_(xs, factor)
    else:
        for x in xs:
            x.mul_(factor)


def _divide_(xs: list[Tensor], divisor: float, *, foreach: bool) -> None:
    """``xs /= divisor`` in place (the proximal weight-decay step, written as the paper writes it)."""
    if foreach:
        torch._foreach_div_(xs, divisor)
    else:
        for x in xs:
            x.div_(divisor)


# --------------------------------------------------------------------------- the compiled path
# compiled=True runs each step as two compiled passes per device-and-dtype bucket (see _compiled.py):
# the sums from the state before the step (read-only), then the averages and the parameters
# written in one loop.  Against the foreach path (MoMo: five kernels and 11 parameter-sized reads
# and writes; MoMo-Adam: about a dozen) that is 8 (MoMo) and 11 (MoMo-Adam) tensor accesses.


def _work(t: Tensor) -> Tensor:
    """``t`` in :func:`work_dtype`: what the partial sums are taken in (as :func:`dot` does)."""
    return t.to(work_dtype(t.dtype))


def _momo_sums(avgs: list[Tensor], grads: list[Tensor], params: list[Tensor], weight: Tensor) -> Tensor:
    """Per tensor ``⟨g, x⟩``, ``⟨d', x⟩`` and ``‖d'‖²`` (a 3 × n array; nothing is written).

    ``d' = d + weight·(g − d)`` is the gradient average after this step, formed in registers.
    """
    rows = []
    for d, g, x in zip(avgs, grads, params):
        d, g, x = _work(d), _work(g), _work(x)
        d_next = d + weight * (g - d)
        rows.append(torch.stack([(g * x).sum(), (d_next * x).sum(), (d_next * d_next).sum()]))
    return torch.stack(rows, dim=1)


def _momo_update(
    avgs: list[Tensor], grads: list[Tensor], params: list[Tensor], weight: Tensor, step: Tensor, divisor: Tensor
) -> None:
    """``d ← d + weight·(g − d)``, then ``x ← (x − step·d) / divisor``, in one loop per tensor."""
    for d, g, x in zip(avgs, grads, params):
        d_next = d + weight * (g - d)
        d.copy_(d_next)
        x.copy_((x - step * d_next) / divisor)


def _adam_terms(
    d: Tensor, v: Tensor, g: Tensor, weight1: Tensor, weight2: Tensor, shift: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """MoMo-Adam's averages after this step and ``u = d' / (sqrt(v') + shift)`` (see :func:`_adam_directions`)."""
    d_next = d + weight1 * (g - d)
    v_next = v * (1.0 - weight2) + weight2 * g * g
    return d_next, v_next, d_next / (v_next.sqrt() + shift)


def _momo_adam_sums(
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    grads: list[Tensor],
    params: list[Tensor],
    weight1: Tensor,
    weight2: Tensor,
    shift: Tensor,
) -> Tensor:
    """Per tensor ``⟨g, x⟩``, ``⟨d', x⟩`` and ``⟨d', u⟩`` (a 3 × n array; nothing is written)."""
    rows = []
    for d, v, g, x in zip(avgs, sq_avgs, grads, params):
        d, v, g, x = _work(d), _work(v), _work(g), _work(x)
        d_next, _, u = _adam_terms(d, v, g, weight1, weight2, shift)
        rows.append(torch.stack([(g * x).sum(), (d_next * x).sum(), (d_next * u).sum()]))
    return torch.stack(rows, dim=1)


def _momo_adam_update(
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    grads: list[Tensor],
    params: list[Tensor],
    weight1: Tensor,
    weight2: Tensor,
    shift: Tensor,
    step: Tensor,
    keep: Tensor,
    divisor: Tensor,
) -> None:
    """Write ``d'`` and ``v'``; ``x ← (keep·x − step·u) / divisor``, in one loop per tensor."""
    for d, v, g, x in zip(avgs, sq_avgs, grads, params):
        d_next, v_next, u = _adam_terms(d, v, g, weight1, weight2, shift)
        d.copy_(d_next)
        v.copy_(v_next)
        x.copy_((keep * x - step * u) / divisor)


class MoMo(_MoMoBase):
    r"""MoMo: SGD with momentum whose step size is the truncated Polyak step on a momentum model.

    Schaipp et al., "MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024.

    Needs the mini-batch loss each step (``step(loss=...)``, the closure's return value, or
    :class:`~lightning_adaptive_lr.AdaptiveLRCallback`).  With a binding cap (``lr`` small) it is
    exactly ``torch.optim.SGD(momentum=beta, dampening=beta)``.

    Args:
        params: parameters or param groups.  Groups may differ in ``lr`` and ``weight_decay``.
        lr: the cap on the step size (MoMo is robust to it; the paper's default is 1).
        beta: momentum of the loss, gradient and ``⟨g, x⟩`` averages, in [0, 1).  Shared by groups.
        weight_decay: L2 regularization handled by the proximal (implicit) update ``x / (1 + lr·wd)``.
        lb: lower bound of the loss (0 for most losses); with ``estimate_lb`` the starting estimate
            and a floor.
        bias_correction: start the averages at zero and correct by ``1 − beta^k`` (otherwise they
            start at the first values).
        estimate_lb: estimate the lower bound online (MoMo*), useful when the loss does not reach 0.
        foreach: use the multi-tensor (``torch._foreach_*``) path; ``False`` updates tensor by tensor.
        average_across_ranks: average the loss across ``torch.distributed`` ranks (one collective
            per step) so replicas stay identical.
        compiled: run the step as two ``torch.compile``\ d (TorchInductor) passes per tensor
            bucket instead of five ``_foreach_``/BLAS passes: the three sums from the state before
            the step (read-only), then ``d`` and ``x`` written in one loop; 8 instead of 11
            parameter-sized reads and writes.  The same math and the same single
            device-to-host synchronization; only the float32 partial sums are added in another
            order (≤1e-5 relative after 20 steps).  Compiles once per set of parameter shapes at
            the first step (for ResNet-18 on two CPU cores about 35 s, or 5 s from Inductor's
            on-disk cache; a few seconds for a small model) and needs a working Inductor (a C++ compiler on CPU, Triton on GPU): if it
            fails, ``step()`` raises a RuntimeError naming the cause before any state changes;
            there is no silent fallback.  Measured in ``benchmarks/step_overhead.py``
            (docs/benchmarks.md).

    After each step every param group holds ``effective_lr`` (= ``tau``, the step size used) and
    ``lower_bound`` (the lower bound in use; ``lb`` stays the constructor's value, the floor).
    ``state["global"]`` holds ``step``, ``loss_avg`` (f̄), ``gamma`` (γ), ``lb`` and
    ``skipped_steps``; ``state[p]["grad_avg"]`` is ``d``.
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
        name = type(self).__name__
        check_range(name, "lr", lr, 0.0, None)
        check_range(name, "beta", beta, 0.0, 1.0, high_open=True)
        check_range(name, "weight_decay", weight_decay, 0.0, None)
        check_range(name, "lb", lb)
        check_flag(name, "bias_correction", bias_correction)
        check_flag(name, "estimate_lb", estimate_lb)
        check_flag(name, "compiled", compiled)
        defaults = dict(
            lr=lr,
            beta=beta,
            weight_decay=weight_decay,
            lb=lb,
            bias_correction=bias_correction,
            estimate_lb=estimate_lb,
            compiled=compiled,
        )
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        groups, params, grads = self._groups_with_grads()
        if not params:
            return
        options = self.param_groups[0]
        beta, bias_correction, compiled = options["beta"], options["bias_correction"], options["compiled"]
        st = self.global_state
        k = st["step"] + 1
        # Without bias correction the averages start at the first values (f, g, ⟨g, x⟩); the compiled
        # path starts d at zero and takes the first gradient whole (weight 1).
        start = 0.0 if bias_correction else 1.0
        weight = 1.0 if k == 1 and not bias_correction else 1.0 - beta
        device = loss.device

        if compiled:
            weight_t = scalar(weight)
            avgs = [self._state_or_zeros(p, "grad_avg") for p in params]
            partials = self._compiled(_momo_sums, (avgs, grads, params), weight_t)
            gx, d_dot_x, d_sqnorm = sum_partials(partials, device)
        else:
            gx = dot(grads, params, device)
        gated = self._gate(loss, gx)
        if gated is None:
            return
        self._average_loss_model(*gated, beta, start)

        if compiled:
            for p, d in zip(params, avgs):
                self.state[p].setdefault("grad_avg", d)
            directions = [[self.state[p]["grad_avg"] for p in ps] for _, ps, _ in groups]
        else:
            directions = []
            for group, ps, gs in groups:
                ds = []
                for p, g in zip(ps, gs):
                    state = self.state[p]
                    if "grad_avg" not in state:
                        # Starting at the first gradient, the exponential average stays there.
                        state["grad_avg"] = g.detach().clone() if k == 1 and not bias_correction else torch.zeros_like(p)
                    ds.append(state["grad_avg"])
                for d_bucket, g_bucket in group_by_device_and_dtype(ds, gs):
                    exponential_average_(d_bucket, g_bucket, 1 - beta, foreach=group["foreach"])
                directions.append(ds)
            all_d = [d for ds in directions for d in ds]
            d_dot_x, d_sqnorm = dot(all_d, params, device), sqnorm(all_d, device)
        d_dot_x, d_sqnorm = self._to_host_if_free(d_dot_x, d_sqnorm)
        taus = self._polyak_step_sizes(
            groups,
            loss_avg=st["loss_avg"],
            gamma=st["gamma"],
            d_dot_x=d_dot_x,
            d_sqnorm=d_sqnorm,
            rho=1.0 - beta**k if bias_correction else 1.0,
        )
        if not compiled:
            self._move(groups, directions, taus)
            return
        for (group, ps, gs), ds, tau in zip(groups, directions, taus):
            divisor = scalar(1.0 + group["lr"] * group["weight_decay"])
            self._compiled(_momo_update, (ds, gs, ps), weight_t, scalar(tau), divisor)


def _average_sq_(avgs: list[Tensor], values: list[Tensor], weight: float, *, foreach: bool) -> None:
    """Exponential average of squares in place: ``avg ← (1 − weight)·avg + weight·value²``."""
    if foreach:
        torch._foreach_mul_(avgs, 1 - weight)
        torch._foreach_addcmul_(avgs, values, values, weight)
    else:
        for a, v in zip(avgs, values):
            a.mul_(1 - weight).addcmul_(v, v, value=weight)


def _adam_directions(
    avgs: list[Tensor], sq_avgs: list[Tensor], bias_correction2: float, eps: float, *, foreach: bool
) -> tuple[list[Tensor], float]:
    """Adam's preconditioned direction ``d / (sqrt(v / (1 − β2^k)) + eps)``, as ``(u, scale)``.

    Returns new tensors ``u = d / (sqrt(v) + eps·sqrt(1 − β2^k))`` and the scalar
    ``scale = sqrt(1 − β2^k)`` such that the direction is ``scale · u`` (the same number: multiply
    numerator and denominator by ``sqrt(1 − β2^k)``).  Leaving the bias correction to the scalars
    saves two passes over the parameters per step.
    """
    scale = bias_correction2**0.5
    shift = eps * scale
    if foreach:
        out = torch._foreach_sqrt(sq_avgs)
        torch._foreach_add_(out, shift)
        torch._foreach_reciprocal_(out)
        torch._foreach_mul_(out, avgs)
        return list(out), scale
    return [d / v.sqrt().add_(shift) for d, v in zip(avgs, sq_avgs)], scale


class MoMoAdam(_MoMoBase):
    r"""MoMo-Adam: the MoMo step size in Adam's preconditioned geometry.

    Schaipp et al., "MoMo: Momentum Models for Adaptive Learning Rates", ICML 2024.

    Always bias-corrected (all averages start at 0).  With ``D = sqrt(v / (1 − β2^k)) + eps`` the
    step is ``x ← (x − τ·d/D) / (1 + lr·wd)`` with ``τ = min(lr/ρ, [...]₊ / Σ d²/D)``.

    Args:
        params: parameters or param groups.  Groups may differ in ``lr``, ``weight_decay``, ``eps``.
        lr: the cap on the step size (default 1e-2, as in the paper).
        betas: ``(β1, β2)``: β1 averages the loss, gradient and ``⟨g, x⟩``; β2 the squared gradient.
            Shared by groups.
        eps: added to the square root of the second moment (outside the root, as Adam).
        weight_decay: weight decay; proximal ``x / (1 + lr·wd)`` by default.
        lb: lower bound of the loss; with ``estimate_lb`` the starting estimate and a floor.
        estimate_lb: estimate the lower bound online.
        decoupled_weight_decay: shrink ``x ← x·(1 − lr·wd)`` before the step (AdamW style) instead
            of the proximal division.  ``τ`` keeps ``c = 1 + lr·wd`` in both modes, as the authors do.
        foreach: use the multi-tensor path.
        average_across_ranks: average the loss across ``torch.distributed`` ranks.
        compiled: run the step as two ``torch.compile``\ d (TorchInductor) passes per tensor
            bucket instead of about a dozen ``_foreach_``/BLAS passes: the three sums from the
            state before the step (read-only; the new averages and the direction are formed in
            registers), then ``d``, ``v`` and ``x`` written in one loop, which reads and writes
            what ``torch.optim.Adam`` must.  The same math and the same single device-to-host
            synchronization; only the float32 partial sums are added in another order (≤1e-5
            relative after 20 steps).  Compiles once per set of parameter shapes at the first step
            (for ResNet-18 on two CPU cores about 45 s, or 5 s from Inductor's on-disk cache; a
            few seconds for a small model) and needs a working Inductor (a C++ compiler on CPU, Triton on GPU): if it fails,
            ``step()`` raises a RuntimeError naming the cause before any state changes; there is
            no silent fallback.  Measured in ``benchmarks/step_overhead.py`` (docs/benchmarks.md).

    After each step every param group holds ``effective_lr`` (= ``tau``) and ``lower_bound``;
    ``state[p]`` holds ``grad_avg`` (d) and ``grad_avg_sq`` (v).
    """

    shared_options = ("betas", "lb", "estimate_lb", "compiled")

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
        name = type(self).__name__
        check_flag(name, "compiled", compiled)
        check_range(name, "lr", lr, 0.0, None)
        check_betas(name, betas)
        check_range(name, "eps", eps, 0.0, None)
        check_range(name, "weight_decay", weight_decay, 0.0, None)
        check_range(name, "lb", lb)
        check_flag(name, "estimate_lb", estimate_lb)
        check_flag(name, "decoupled_weight_decay", decoupled_weight_decay)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            lb=lb,
            estimate_lb=estimate_lb,
            decoupled_weight_decay=decoupled_weight_decay,
            compiled=compiled,
        )
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        groups, params, grads = self._groups_with_grads()
        if not params:
            return
        options = self.param_groups[0]
        (beta1, beta2), compiled = options["betas"], options["compiled"]
        st = self.global_state
        k = st["step"] + 1
        bias_correction2 = 1.0 - beta2**k
        # The directions are scale·u with scale = sqrt(1 − β2^k) (see _adam_directions).
        scale = bias_correction2**0.5
        device = loss.device

        if compiled:
            weight1, weight2 = scalar(1.0 - beta1), scalar(1.0 - beta2)
            moments, partials = [], []
            for group, ps, gs in groups:
                ds = [self._state_or_zeros(p, "grad_avg") for p in ps]
                vs = [self._state_or_zeros(p, "grad_avg_sq") for p in ps]
                shift = scalar(group["eps"] * scale)
                moments.append((ds, vs, shift))
                partials += self._compiled(_momo_adam_sums, (ds, vs, gs, ps), weight1, weight2, shift)
            gx, d_dot_x, d_dot_u = sum_partials(partials, device)
        else:
            gx = dot(grads, params, device)
        gated = self._gate(loss, gx)
        if gated is None:
            return
        self._average_loss_model(*gated, beta1, start=0.0)  # always bias-corrected: from zero

        if compiled:
            for (_, ps, _), (ds, vs, _) in zip(groups, moments):
                for p, d, v in zip(ps, ds, vs):
                    self.state[p].setdefault("grad_avg", d)
                    self.state[p].setdefault("grad_avg_sq", v)
        else:
            directions, all_d = [], []
            for group, ps, gs in groups:
                ds, vs = [], []
                for p in ps:
                    state = self.state[p]
                    if "grad_avg" not in state:
                        state["grad_avg"] = torch.zeros_like(p)
                        state["grad_avg_sq"] = torch.zeros_like(p)
                    ds.append(state["grad_avg"])
                    vs.append(state["grad_avg_sq"])
                preconditioned: dict[int, Tensor] = {}
                for d_b, v_b, g_b in group_by_device_and_dtype(ds, vs, gs):
                    exponential_average_(d_b, g_b, 1 - beta1, foreach=group["foreach"])
                    _average_sq_(v_b, g_b, 1 - beta2, foreach=group["foreach"])
                    us, _ = _adam_directions(d_b, v_b, bias_correction2, group["eps"], foreach=group["foreach"])
                    preconditioned.update((id(d), u) for d, u in zip(d_b, us))
                all_d.extend(ds)
                directions.append([preconditioned[id(d)] for d in ds])  # the group's parameter order
            all_u = [u for us in directions for u in us]
            d_dot_x, d_dot_u = dot(all_d, params, device), dot(all_d, all_u, device)
        d_dot_x, d_dot_u = self._to_host_if_free(d_dot_x, d_dot_u)
        taus = self._polyak_step_sizes(
            groups,
            loss_avg=st["loss_avg"],
            gamma=st["gamma"],
            d_dot_x=d_dot_x,
            d_sqnorm=d_dot_u * scale,
            rho=1.0 - beta1**k,
        )
        if not compiled:
            self._move(groups, directions, taus, direction_scale=scale)
            return
        for (group, ps, gs), (ds, vs, shift), tau in zip(groups, moments, taus):
            shrink = group["lr"] * group["weight_decay"]
            decoupled = group["decoupled_weight_decay"]
            keep, divisor = (1.0 - shrink, 1.0) if decoupled else (1.0, 1.0 + shrink)
            step = scalar(tau * scale)
            self._compiled(
                _momo_adam_update, (ds, vs, gs, ps), weight1, weight2, shift, step, scalar(keep), scalar(divisor)
            )

