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
from ._scalars import Scalar, safe_div, smax, smin, where
from ._tensorlists import (
    accumulation_dtype,
    add_scaled_,
    dot,
    exponential_average_,
    group_by_device_and_dtype,
    sqnorm,
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

    def _model_scalars(self, loss: Tensor, params: list[Tensor], grads: list[Tensor]) -> tuple[float, float] | None:
        """Gate on ``(f, ⟨g, x⟩)``: their finiteness decides whether the step happens."""
        gx = dot(grads, params, loss.device)
        values = self._gate(loss, gx)
        return None if values is None else (values[0], values[1])

    def _take_polyak_steps(
        self,
        groups: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]],
        directions: list[list[Tensor]],
        *,
        loss_avg: float,
        gamma: float,
        d_dot_x: Scalar,
        d_sqnorm: Scalar,
        rho: float,
        direction_scale: float = 1.0,
    ) -> None:
        """Per group: τ (and lb), then ``x ← (x − τ·direction_scale·direction) / c``."""
        st = self.global_state
        lb = st["lb"]
        for (group, params, _), direction in zip(groups, directions):
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
            shrink = group["lr"] * group["weight_decay"]
            decoupled = group.get("decoupled_weight_decay", False)
            foreach = group["foreach"]
            for ps, ds in group_by_device_and_dtype(params, direction):
                if shrink != 0 and decoupled:
                    _multiply_(ps, 1.0 - shrink, foreach=foreach)
                add_scaled_(ps, ds, -tau * direction_scale, foreach=foreach)
                if shrink != 0 and not decoupled:
                    _divide_(ps, 1.0 + shrink, foreach=foreach)
            self._record(group, effective_lr=tau, tau=tau, lower_bound=lb)
        st["lb"] = lb


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
# MoMoAdam(compiled=True) replaces, per device-and-dtype bucket, the moment updates, the direction
# and the two global reductions of the step by one ``torch.compile``d function: Inductor emits one
# C++/Triton kernel per tensor for what the foreach path does in about eight passes.  The per-tensor
# partial sums are added in :func:`accumulation_dtype` afterwards, as :func:`dot` does.
# MoMo has no such option: its foreach path is already three light passes, and Inductor's CPU
# kernel (the in-place lerp written back in a second loop after the reductions) streams as many
# bytes as they do; measured on ResNet-18, two CPU threads, it was 2.25x SGD-momentum vs 2.17x.


def _fused_momo_adam(
    avgs: list[Tensor],
    sq_avgs: list[Tensor],
    grads: list[Tensor],
    params: list[Tensor],
    directions: list[Tensor],
    weight1: float,
    weight2: float,
    shift: Tensor,
) -> tuple[Tensor, Tensor]:
    """MoMo-Adam's averages in place and ``u = d / (sqrt(v) + shift)`` into ``directions``.

    ``u`` is as in :func:`_adam_directions`.  ``directions`` are buffers kept from step to step:
    a fresh output per step costs the allocator as much time as the whole kernel on the CPU.
    ``shift`` changes every step, so it is a 0-d tensor (a Python float would recompile each step).
    Returns the per-tensor ``⟨d, x⟩`` and ``⟨d, u⟩``.
    """
    d_dot_x, d_dot_u = [], []
    for d, v, g, x, out in zip(avgs, sq_avgs, grads, params, directions):
        d.lerp_(g, weight1)
        v.mul_(1 - weight2).addcmul_(g, g, value=weight2)
        u = d / (v.sqrt() + shift)
        out.copy_(u)
        d_dot_x.append((d * x).sum())
        d_dot_u.append((d * u).sum())
    return torch.stack(d_dot_x), torch.stack(d_dot_u)


_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}
_INDUCTOR_CHECKED: set[str] = set()


def _compile_error(owner: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"{owner}(compiled=True) could not compile its step with torch.compile (TorchInductor): "
        f"{type(err).__name__}: {err}. Inductor needs a working C++ compiler on CPU (and Triton on "
        "GPU); install one or construct the optimizer with compiled=False."
    )


def _ensure_inductor_works(owner: str, device: torch.device) -> None:
    """Compile a one-line function once per device type, before the first step changes any state.

    A missing compiler then surfaces as a clear error instead of a half-updated optimizer.
    """
    if device.type in _INDUCTOR_CHECKED:
        return
    try:
        probe = torch.compile(lambda t: (t * 2.0).sum(), backend="inductor", fullgraph=True, dynamic=False)
        probe(torch.ones(4, device=device))
    except Exception as err:  # Inductor raises many types (BackendCompilerFailed, CalledProcessError, ...)
        raise _compile_error(owner, err) from err
    _INDUCTOR_CHECKED.add(device.type)


def _run_compiled(owner: str, function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function`` compiled (once per set of shapes: ``dynamic=False``), errors named clearly."""
    compiled = _COMPILED.get(function)
    if compiled is None:
        compiled = _COMPILED[function] = torch.compile(function, backend="inductor", fullgraph=True, dynamic=False)
    try:
        return compiled(*args)
    except Exception as err:
        raise _compile_error(owner, err) from err


def _sum_partials(partials: list[tuple[Tensor, ...]], device: torch.device) -> tuple[Tensor, ...]:
    """Add the buckets' per-tensor partial sums in :func:`accumulation_dtype`, one 0-d tensor per kind."""
    acc = accumulation_dtype(device)
    kinds = range(len(partials[0]))
    return tuple(torch.cat([bucket[i].to(device=device, dtype=acc) for bucket in partials]).sum() for i in kinds)


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

    After each step every param group holds ``effective_lr`` (= ``tau``, the step size used) and
    ``lower_bound`` (the lower bound in use; ``lb`` stays the constructor's value, the floor).
    ``state["global"]`` holds ``step``, ``loss_avg`` (f̄), ``gamma`` (γ), ``lb`` and
    ``skipped_steps``; ``state[p]["grad_avg"]`` is ``d``.
    """

    shared_options = ("beta", "lb", "bias_correction", "estimate_lb")

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
    ) -> None:
        name = type(self).__name__
        check_range(name, "lr", lr, 0.0, None)
        check_range(name, "beta", beta, 0.0, 1.0, high_open=True)
        check_range(name, "weight_decay", weight_decay, 0.0, None)
        check_range(name, "lb", lb)
        check_flag(name, "bias_correction", bias_correction)
        check_flag(name, "estimate_lb", estimate_lb)
        defaults = dict(
            lr=lr, beta=beta, weight_decay=weight_decay, lb=lb, bias_correction=bias_correction, estimate_lb=estimate_lb
        )
        super().__init__(params, defaults, foreach=foreach, average_across_ranks=average_across_ranks)

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        groups = [(g, *self._params_and_grads(g)) for g in self.param_groups]
        params = [p for _, ps, _ in groups for p in ps]
        grads = [g for _, _, gs in groups for g in gs]
        if not params:
            return
        gated = self._model_scalars(loss, params, grads)
        if gated is None:
            return
        f, gx = gated
        options = self.param_groups[0]
        beta, bias_correction = options["beta"], options["bias_correction"]

        st = self.global_state
        k = st["step"] + 1
        if k == 1:
            st.setdefault("lb", options["lb"])
            start = 0.0 if bias_correction else 1.0
            st["loss_avg"], st["gamma"] = start * f, start * gx
        st["step"] = k
        st["loss_avg"] = beta * st["loss_avg"] + (1 - beta) * f
        st["gamma"] = beta * st["gamma"] + (1 - beta) * gx

        directions = []
        for group, ps, gs in groups:
            ds = []
            for p, g in zip(ps, gs):
                state = self.state[p]
                if "grad_avg" not in state:
                    # Without bias correction the first average is the first gradient.
                    first = k == 1 and not bias_correction
                    state["grad_avg"] = g.detach().clone() if first else torch.zeros_like(p)
                ds.append(state["grad_avg"])
            for d_bucket, g_bucket in group_by_device_and_dtype(ds, gs):
                exponential_average_(d_bucket, g_bucket, 1 - beta, foreach=group["foreach"])
            directions.append(ds)

        all_d = [d for ds in directions for d in ds]
        device = loss.device
        d_dot_x, d_sqnorm = self._to_host_if_free(dot(all_d, params, device), sqnorm(all_d, device))
        rho = 1.0 - beta**k if bias_correction else 1.0
        self._take_polyak_steps(
            groups,
            directions,
            loss_avg=st["loss_avg"],
            gamma=st["gamma"],
            d_dot_x=d_dot_x,
            d_sqnorm=d_sqnorm,
            rho=rho,
        )


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
        compiled: run the updates of ``d`` and ``v``, the direction ``u`` and the reductions
            ``⟨d, x⟩`` and ``⟨d, u⟩`` as one ``torch.compile``\ d (TorchInductor) kernel per
            tensor instead of about eight ``_foreach_`` passes and two BLAS reductions.  Same math
            and the same single device-to-host synchronization; only the summation order of the
            float32 partial sums differs (≤1e-5 relative after 20 steps).  Costs one compilation
            per set of parameter shapes at the first step (20-40 s for ResNet-18 on two CPU
            cores, a few seconds for a small model; Inductor's on-disk cache shortens later
            runs) and needs a working Inductor backend (a C++ compiler on CPU, Triton on GPU):
            if it fails, ``step()`` raises a RuntimeError naming the cause before any state
            changes; there is no silent fallback.  Pays off in long runs where the optimizer
            step is visible in the iteration time: on ResNet-18, CPU, two threads, the step took
            22-25 ms against 31-46 ms for the foreach path, i.e. 0.7-1.1x
            ``torch.optim.Adam(foreach=True)``, whose own time moved between 20 and 38 ms from
            run to run with the allocator's state (fused Adam: 0.2-0.4x).
            Keeps one extra buffer per parameter for the direction (not part of the state).

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

    def _init_transient(self) -> None:
        super()._init_transient()
        # The compiled path's direction buffers, one per parameter: recomputed every step, so not
        # state (not saved, rebuilt after unpickling).
        self._direction_buffers: dict[Tensor, Tensor] = {}

    def _update(self, loss: Tensor | None) -> None:
        assert loss is not None
        groups = [(g, *self._params_and_grads(g)) for g in self.param_groups]
        params = [p for _, ps, _ in groups for p in ps]
        grads = [g for _, _, gs in groups for g in gs]
        if not params:
            return
        gated = self._model_scalars(loss, params, grads)
        if gated is None:
            return
        f, gx = gated
        beta1, beta2 = self.param_groups[0]["betas"]
        compiled = self.param_groups[0].get("compiled", False)
        if compiled:
            _ensure_inductor_works(type(self).__name__, params[0].device)

        st = self.global_state
        k = st["step"] + 1
        if k == 1:
            st.setdefault("lb", self.param_groups[0]["lb"])
            st["loss_avg"], st["gamma"] = 0.0, 0.0
        st["step"] = k
        st["loss_avg"] = beta1 * st["loss_avg"] + (1 - beta1) * f
        st["gamma"] = beta1 * st["gamma"] + (1 - beta1) * gx
        bias_correction2 = 1.0 - beta2**k

        all_d, directions = [], []
        fused_sums: list[tuple[Tensor, Tensor]] = []
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
            for d_b, v_b, g_b, x_b in group_by_device_and_dtype(ds, vs, gs, ps):
                if compiled:
                    shift = torch.tensor(group["eps"] * bias_correction2**0.5, dtype=torch.float64)
                    us = [self._direction_buffer(x) for x in x_b]
                    fused_sums.append(
                        _run_compiled(
                            type(self).__name__, _fused_momo_adam, d_b, v_b, g_b, x_b, us, 1 - beta1, 1 - beta2, shift
                        )
                    )
                else:
                    exponential_average_(d_b, g_b, 1 - beta1, foreach=group["foreach"])
                    _average_sq_(v_b, g_b, 1 - beta2, foreach=group["foreach"])
                    us, _ = _adam_directions(d_b, v_b, bias_correction2, group["eps"], foreach=group["foreach"])
                preconditioned.update((id(d), u) for d, u in zip(d_b, us))
            all_d.extend(ds)
            directions.append([preconditioned[id(d)] for d in ds])  # the group's parameter order

        # The directions are scale·u with scale = sqrt(1 − β2^k) (see _adam_directions).
        scale = bias_correction2**0.5
        all_u = [u for us in directions for u in us]
        device = loss.device
        if compiled:
            d_dot_x, d_dot_u = self._to_host_if_free(*_sum_partials(fused_sums, device))
        else:
            d_dot_x, d_dot_u = self._to_host_if_free(dot(all_d, params, device), dot(all_d, all_u, device))
        self._take_polyak_steps(
            groups,
            directions,
            loss_avg=st["loss_avg"],
            gamma=st["gamma"],
            d_dot_x=d_dot_x,
            d_sqnorm=d_dot_u * scale,
            rho=1.0 - beta1**k,
            direction_scale=scale,
        )

    def _direction_buffer(self, param: Tensor) -> Tensor:
        """The compiled path's reusable buffer for the direction ``u`` of ``param``."""
        buffer = self._direction_buffers.get(param)
        if buffer is None:
            buffer = self._direction_buffers[param] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return buffer
