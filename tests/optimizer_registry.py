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
        groups_interact: why splitting the parameters into groups with equal settings changes the
            trajectory, when it does by design (empty: it must not).
    """

    id: str
    cls: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    invalid: tuple[dict[str, Any], ...] = ()
    needs_probe: bool = False
    recorded: tuple[str, ...] = ()
    groups_interact: str = ""

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

CASES: list[OptimizerCase] = [
    # --- MoMo / MoMo-Adam (ALGORITHMS.md §1)
    OptimizerCase("MoMo", lalr.MoMo, {"lr": 1.0}, _MOMO_INVALID, recorded=("tau", "lower_bound")),
    OptimizerCase(
        "MoMo-bc-lb-wd",
        lalr.MoMo,
        {"lr": 0.5, "bias_correction": True, "estimate_lb": True, "weight_decay": 1e-2},
        recorded=("tau", "lower_bound"),
        groups_interact="the lower-bound estimate is updated once per group, in group order (ALGORITHMS.md §1)",
    ),
    OptimizerCase("MoMoAdam", lalr.MoMoAdam, {"lr": 1e-2}, _MOMO_ADAM_INVALID, recorded=("tau", "lower_bound")),
    OptimizerCase(
        "MoMoAdam-decoupled-lb",
        lalr.MoMoAdam,
        {"lr": 1e-2, "weight_decay": 1e-2, "decoupled_weight_decay": True, "estimate_lb": True},
        recorded=("tau", "lower_bound"),
        groups_interact="the lower-bound estimate is updated once per group, in group order (ALGORITHMS.md §1)",
    ),
    # --- QLAB (§2): entries go here
    # --- HierarchicalHD (§3): entries go here
    # --- AdaL (§4): entries go here
    # --- StepTunedSGD (§5): entries go here
]

CASE_IDS = [case.id for case in CASES]

#: A factory for the small network the suite trains: ``model_factory(seed)``.
ModelFactory = Callable[[int], nn.Module]
