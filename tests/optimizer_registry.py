"""Every optimizer of the package, with a few typical settings: the conformance suite runs over it.

A new optimizer joins the suite by adding `OptimizerCase` entries to `CASES` (one per typical
constructor setting) — nothing else in `tests/test_conformance.py` changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lightning_adaptive_lr as lalr


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer class with one constructor setting.

    Attributes:
        id: the pytest id.
        cls: the optimizer class.
        kwargs: constructor keywords (besides ``params`` and ``foreach``).
        invalid: keyword sets each of which must make the constructor raise ``ValueError``.
        needs_probe: the step needs ``probe=`` (a loss-only re-evaluation), as QLAB's does.
        recorded: param-group keys the optimizer must write after each step (besides effective_lr).
        adapts_lr: the optimizer writes ``param_groups[i]["lr"]`` itself (QLAB's fitted rate is the
            next step's trial rate), so a scheduler sets the next rate rather than the final one.
        groups_interact: why splitting the parameters into groups with equal settings changes the
            trajectory, when it does by design (empty: it must not).
        float32_state: per-parameter state kept in at least float32 for 16-bit parameters (as
            documented by the method; Adam's second moment, which float16 flushes to 0); every
            other state tensor has the parameter's dtype.
        momentum: where the method reads its momentum coefficient in a param group: a key, or a
            key and an index (``("betas", 0)``); empty when the method has none.  LR schedulers
            that cycle momentum (``OneCycleLR``, ``CyclicLR``) and Lightning's
            ``LearningRateMonitor(log_momentum=True)`` must act on that very value.
    """

    id: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    invalid: tuple[dict[str, Any], ...] = ()
    needs_probe: bool = False
    recorded: tuple[str, ...] = ()
    adapts_lr: bool = False
    groups_interact: str = ""
    float32_state: tuple[str, ...] = ()
    momentum: tuple[str | int, ...] = ()

    def make(self, params: Any, **overrides: Any) -> torch.optim.Optimizer:
        return self.cls(params, **{**self.kwargs, **overrides})

    @property
    def requires_loss(self) -> bool:
        return bool(getattr(self.cls, "requires_loss", False))


def take_step(case: OptimizerCase, opt: torch.optim.Optimizer, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """One ordinary training step of ``model`` on ``batch`` (mean squared error), the way a user writes it."""
    x, y = batch
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    kwargs: dict[str, Any] = {"loss": loss}
    if case.needs_probe:
        kwargs["probe"] = lambda: nn.functional.mse_loss(model(x), y)
    opt.step(**kwargs)
    return loss.item()


_MOMO_INVALID = ({"lr": -1.0}, {"beta": 1.0}, {"beta": -0.1}, {"weight_decay": -1e-3}, {"lb": float("nan")})
_MOMO_ADAM_INVALID = (
    {"lr": -1.0},
    {"betas": (1.0, 0.999)},
    {"betas": (0.9, 1.5)},
    {"betas": (0.9,)},
    {"eps": -1e-8},
    {"weight_decay": -0.1},
)

#: HierarchicalHD's per-unit and per-element rates: kept in at least float32 (docs/algorithms.md §3).
_HD_RATES = ("hd_rate_unit", "hd_rate_param")

CASES: list[OptimizerCase] = [
    # --- MoMo / MoMo-Adam (docs/algorithms.md §1)
    OptimizerCase("MoMo", lalr.MoMo, {"lr": 1.0}, _MOMO_INVALID, recorded=("tau", "lower_bound"), momentum=("beta",)),
    OptimizerCase(
        "MoMo-bc-lb-wd",
        lalr.MoMo,
        {"lr": 0.5, "bias_correction": True, "estimate_lb": True, "weight_decay": 1e-2},
        recorded=("tau", "lower_bound"),
        groups_interact="the lower-bound estimate is updated once per group, in group order (docs/algorithms.md §1)",
        momentum=("beta",),
    ),
    OptimizerCase(
        "MoMoAdam",
        lalr.MoMoAdam,
        {"lr": 1e-2},
        _MOMO_ADAM_INVALID,
        recorded=("tau", "lower_bound"),
        momentum=("betas", 0),
    ),
    OptimizerCase(
        "MoMoAdam-decoupled-lb",
        lalr.MoMoAdam,
        {"lr": 1e-2, "weight_decay": 1e-2, "decoupled_weight_decay": True, "estimate_lb": True},
        recorded=("tau", "lower_bound"),
        groups_interact="the lower-bound estimate is updated once per group, in group order (docs/algorithms.md §1)",
        momentum=("betas", 0),
    ),
    # The device-side step (capturable=True: no host read, docs/algorithms.md "The device-side step").
    OptimizerCase(
        "MoMo-capturable",
        lalr.MoMo,
        {"lr": 1.0, "capturable": True, "bias_correction": True, "lb": None},
        _MOMO_INVALID,
        recorded=("tau", "lower_bound"),
        momentum=("beta",),
    ),
    OptimizerCase(
        "MoMoAdam-capturable",
        lalr.MoMoAdam,
        {"lr": 1e-2, "capturable": True, "weight_decay": 1e-2},
        _MOMO_ADAM_INVALID,
        recorded=("tau", "lower_bound"),
        momentum=("betas", 0),
    ),
    # --- QLAB (§2): entries go here
    *(
        OptimizerCase(
            f"QLAB-{base}",
            lalr.QLAB,
            {"base": base, "lr": 0.1, **({"weight_decay": 1e-2} if base in ("sgdm", "adamw") else {})},
            (
                {"base": "rmsprop"},
                {"lr": -0.1},
                {"momentum": 1.0},
                {"betas": (0.9, 1.0)},
                {"betas": (0.9,)},
                {"eps": -1e-8},
                {"weight_decay": -1e-3},
                {"min_lr": -1e-6},
                {"max_lr": 0.0},
                {"min_lr": 1.0, "max_lr": 0.5},
                {"min_trial_lr": 0.0},
                {"max_growth": 0.5},
            ),
            needs_probe=True,
            recorded=("fitted_lr", "trial_loss", "directional_derivative", "curvature"),
            adapts_lr=True,
            float32_state=("exp_avg_sq",) if base in ("adam", "adamw") else (),
            momentum={"sgd": (), "sgdm": ("momentum",)}.get(base, ("betas", 0)),
        )
        for base in ("sgd", "sgdm", "adam", "adamw")
    ),
    # QLAB's device-side step (capturable=True): the plain rule (sgdm: lr a device tensor) and
    # Adam's anchored rule (lr_scale and the per-parameter counts on the device).
    *(
        OptimizerCase(
            f"QLAB-{base}-capturable",
            lalr.QLAB,
            {"base": base, "lr": 0.1, "capturable": True, **extra},
            ({"compiled": True}, {"lr": -0.1}, {"min_trial_lr": 0.0}, {"capturable": "yes"}),
            needs_probe=True,
            recorded=("fitted_lr", "trial_loss", "directional_derivative", "curvature"),
            adapts_lr=True,
            float32_state=("exp_avg_sq",) if base in ("adam", "adamw") else (),
            momentum={"sgdm": ("momentum",)}.get(base, ("betas", 0)),
        )
        for base, extra in (("sgdm", {"weight_decay": 1e-2}), ("adam", {}))
    ),
    # --- HierarchicalHD (§3): entries go here
    OptimizerCase(
        "HierarchicalHD-sgd",
        lalr.HierarchicalHD,
        {"base": "sgd", "lr": 0.05},
        (
            {"base": "adamw"},
            {"lr": -1.0},
            {"hyper_lr": -1e-3},
            {"hyper_lr": (1e-3, 1e-3, 1e-3)},
            {"levels": ()},
            {"levels": ("global", "neuron")},
            {"weights": (0.6, 0.6)},
            {"level_pull": -1.0},
            {"rate_bounds": (2.0, 1.0)},
            {"momentum": 1.0},
            {"weight_decay": -1e-3},
        ),
        recorded=(
            "hd_rate_global",
            "hd_rate_layer_min",
            "hd_rate_layer_mean",
            "hd_rate_layer_max",
            "hd_weight_global",
            "hd_weight_layer",
        ),
    ),
    OptimizerCase(
        "HierarchicalHD-sgdn-global-wd",
        lalr.HierarchicalHD,
        {"base": "sgdn", "lr": 0.05, "hyper_lr": 1e-2, "levels": ("global",), "weight_decay": 1e-3},
        recorded=("hd_rate_global", "hd_weight_global"),
        momentum=("momentum",),
    ),
    OptimizerCase(
        "HierarchicalHD-adam-all-levels-learned",
        lalr.HierarchicalHD,
        {
            "base": "adam",
            "lr": 1e-2,
            "hyper_lr": 1e-4,
            "levels": ("global", "layer", "unit", "param"),
            "learn_weights": True,
            "level_pull": 100.0,
            "rate_bounds": (0.0, 10.0),
        },
        ({"betas": (0.9, 1.0)}, {"eps": -1.0}, {"weights": (0.5, 0.5)}, {"weight_lr": -1.0}),
        recorded=tuple(
            f"hd_rate_{level}_{stat}" for level in ("layer", "unit", "param") for stat in ("min", "mean", "max")
        )
        + ("hd_rate_global",)
        + tuple(f"hd_weight_{level}" for level in ("global", "layer", "unit", "param")),
        float32_state=_HD_RATES + ("exp_avg_sq",),
        momentum=("betas", 0),
    ),
    OptimizerCase(
        "HierarchicalHD-sgd-unit-param",
        lalr.HierarchicalHD,
        {"base": "sgd", "lr": 0.05, "hyper_lr": (1e-2, 1e-3), "levels": ("unit", "param"), "weights": (0.3, 0.7)},
        recorded=tuple(f"hd_rate_{level}_{stat}" for level in ("unit", "param") for stat in ("min", "mean", "max")),
        float32_state=_HD_RATES,
    ),
    # The device-side step (capturable=True: no host read, docs/algorithms.md "The device-side step").
    OptimizerCase(
        "HierarchicalHD-sgdn-capturable",
        lalr.HierarchicalHD,
        {"base": "sgdn", "lr": 0.05, "capturable": True},
        ({"capturable": True, "compiled": True}, {"capturable": 1}, {"momentum": 1.0}),
        recorded=(
            "hd_rate_global", "hd_rate_layer_min", "hd_rate_layer_mean", "hd_rate_layer_max", "hd_weight_global",
            "hd_weight_layer",
        ),  # fmt: skip
        momentum=("momentum",),
    ),
    OptimizerCase(
        "HierarchicalHD-adam-all-levels-learned-capturable",
        lalr.HierarchicalHD,
        {
            "base": "adam", "lr": 1e-2, "hyper_lr": 1e-4, "levels": ("global", "layer", "unit", "param"),
            "learn_weights": True, "level_pull": 100.0, "rate_bounds": (0.0, 10.0), "capturable": True,
        },  # fmt: skip
        ({"capturable": True, "compiled": True}, {"betas": (0.9, 1.0)}, {"weights": (0.5, 0.5)}),
        recorded=tuple(f"hd_rate_{level}_{stat}" for level in ("layer", "unit", "param") for stat in ("min", "mean", "max"))
        + ("hd_rate_global",)
        + tuple(f"hd_weight_{level}" for level in ("global", "layer", "unit", "param")),
        float32_state=_HD_RATES + ("exp_avg_sq",),
        momentum=("betas", 0),
    ),
    # --- AdaL (§4): entries go here
    OptimizerCase(
        "AdaL",
        lalr.AdaL,
        {},
        (
            {"lr": -1e-3},
            {"betas": (1.0, 0.999)},
            {"betas": (0.9, -0.1)},
            {"betas": (0.9,)},
            {"eps": -1e-8},
            {"weight_decay": -0.1},
            {"transform": "l2"},
            {"eps_mode": "inside"},
            {"lr_decay": "cosine"},
        ),
        recorded=("grad_scale",),
        momentum=("betas", 0),
    ),
    OptimizerCase(
        "AdaL-tensor_l1-denominator-wd",
        lalr.AdaL,
        {"lr": 1e-2, "transform": "tensor_l1", "eps_mode": "denominator", "weight_decay": 1e-2},
        recorded=("grad_scale",),
        momentum=("betas", 0),
    ),
    OptimizerCase(
        "AdaL-none-inv_sqrt",
        lalr.AdaL,
        {"lr": 3e-2, "transform": "none", "lr_decay": "inv_sqrt"},
        recorded=("grad_scale",),
        momentum=("betas", 0),
    ),
    OptimizerCase(
        "AdaL-capturable",
        lalr.AdaL,
        {"lr": 1e-2, "capturable": True, "weight_decay": 1e-2},
        ({"lr": -1e-3}, {"capturable": 1}, {"compiled": 1}),
        recorded=("grad_scale",),
        momentum=("betas", 0),
    ),
    # --- StepTunedSGD (§5): entries go here
    # Default mode: each `opt.step(loss=loss)` of the harness is one half-step (odd: first, even:
    # second + gain update), so the 20-step checks cover ten iterations and both phases.
    OptimizerCase(
        "StepTunedSGD",
        lalr.StepTunedSGD,
        {"lr": 0.1},
        (
            {"lr": -0.1},
            {"nu": 0.0},
            {"beta": 1.0},
            {"beta": -0.1},
            {"gain_bounds": (0.0, 2.0)},
            {"gain_bounds": (2.0, 0.5)},
            {"gain_bounds": (0.5,)},
            {"delta": 0.5},
            {"delta": -0.001},
            {"weight_decay": -1e-3},
            {"same_batch": "yes"},
        ),
        recorded=("gain", "curvature"),
        momentum=("beta",),
    ),
    OptimizerCase(
        "StepTunedSGD-wd-beta0",
        lalr.StepTunedSGD,
        {"lr": 0.2, "weight_decay": 1e-2, "beta": 0.0, "gain_bounds": (0.25, 4.0), "nu": 1.5},
        recorded=("gain", "curvature"),
        momentum=("beta",),
    ),
    OptimizerCase(
        "StepTunedSGD-capturable",
        lalr.StepTunedSGD,
        {"lr": 0.1, "capturable": True, "weight_decay": 1e-2},
        ({"capturable": "yes"}, {"compiled": True}),
        recorded=("gain", "curvature"),
        momentum=("beta",),
    ),
]

CASE_IDS = [case.id for case in CASES]

#: A factory for the small network the suite trains: ``model_factory(seed)``.
ModelFactory = Callable[[int], nn.Module]
