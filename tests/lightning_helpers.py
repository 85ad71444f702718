"""Shared pieces of the Lightning tests: tiny data, a small CNN with BatchNorm and dropout, Trainer defaults.

Kept small so that a full `Trainer.fit` of a few dozen steps takes well under a second on one core.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optimizer_registry import CASES, OptimizerCase

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")

#: Learning rates that train the small CNN below in a few dozen steps, by optimizer class name
#: (and base rule, for the methods built on one).  The registry's settings are chosen for its
#: least-squares problems; its other keywords are kept.
LIGHTNING_LR: dict[str, float] = {
    "MoMo": 1.0,
    "MoMoAdam": 1e-2,
    "QLAB": 0.1,
    "HierarchicalHD": 0.5,
    "HierarchicalHD-adam": 1e-2,
    "AdaL": 3e-2,
    "StepTunedSGD": 1.0,
}


def usable_cases() -> list[OptimizerCase]:
    """Every registry case: a method joins the Lightning tests when its entries appear in the registry."""
    return list(CASES)


def case_kwargs(case: OptimizerCase, **overrides: Any) -> dict[str, Any]:
    """The case's constructor keywords with the Lightning learning rate of its class."""
    kwargs = dict(case.kwargs)
    name = case.cls.__name__
    lr = LIGHTNING_LR.get(f"{name}-{kwargs.get('base')}", LIGHTNING_LR.get(name))
    if lr is not None:
        kwargs["lr"] = lr
    kwargs.update(overrides)
    return kwargs


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 handwritten digits (offline), as ``(N, 1, 8, 8)`` floats and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(data.target)


def loader(n: int = 256, batch_size: int = 32, offset: int = 0) -> DataLoader:
    x, y = digits()
    return DataLoader(TensorDataset(x[offset : offset + n], y[offset : offset + n]), batch_size=batch_size, shuffle=False)


def make_net(batchnorm: bool = True, dropout: float = 0.1) -> nn.Module:
    """A small CNN for 8×8 images (BatchNorm and dropout switchable)."""
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        norm(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        norm(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        nn.Linear(16, 10),
    )


class Classifier(pl.LightningModule):
    """An ordinary user module: cross-entropy, logs its loss, optimizer from a factory."""

    def __init__(
        self,
        make_optimizer: Callable[[Any], torch.optim.Optimizer],
        batchnorm: bool = True,
        dropout: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = make_net(batchnorm, dropout)
        self.make_optimizer = make_optimizer
        self.train_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        self.train_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self.parameters())


def trainer(precision: str = "32-true", **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer; ``precision="16-mixed"`` gets a CPU GradScaler."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    if precision == "16-mixed":
        options["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    else:
        options["precision"] = precision
    options.update(kwargs)
    return pl.Trainer(**options)


@torch.no_grad()
def eval_loss(net: nn.Module, n: int = 256) -> float:
    """Cross-entropy of a copy of ``net`` on the first ``n`` digits, BatchNorm on batch statistics.

    Batch statistics (train mode) rather than running ones, because a few dozen large adaptive
    steps leave BatchNorm's running averages behind the weights; dropout is switched off.
    """
    x, y = digits()
    probe = copy.deepcopy(net).train()
    for module in probe.modules():
        if isinstance(module, nn.Dropout):
            module.eval()
    return float(nn.functional.cross_entropy(probe(x[:n]), y[:n]))


#: Lightning's advice for real runs (dataloader workers, logging intervals) is noise in tiny ones.
QUIET = [
    "ignore:.*does not have many workers.*",
    "ignore:.*log_every_n_steps.*",
    "ignore:.*treespec.*",
    "ignore:.*LeafSpec.*",
]


class ContractSGD(torch.optim.SGD):
    """Plain SGD that declares the optimizer ↔ training-loop contract (``AdaptiveLROptimizer``).

    As declared here it needs nothing from the loop; test doubles override what they need.
    """

    requires_loss = False
    requires_probe = False
    calls_closure_twice = False
    average_across_ranks = True
    has_pending_loss = False

    def set_loss(self, loss: Any, *, reduced: bool = False) -> None:
        pass

    def set_probe(self, fn: Callable[[], torch.Tensor] | None, *, reduced: bool = False) -> None:
        pass


class ProbingSGD(ContractSGD):
    """A test double of QLAB's Lightning interface: plain SGD that asks for the loss and a probe.

    It records the loss handed over and the probe's value, evaluated once per step ``"before"`` the
    update (at the current parameters) or ``"after"`` it, and otherwise steps exactly like SGD.
    """

    requires_loss = True
    requires_probe = True

    def __init__(self, params: Any, lr: float = 0.1, probe_at: str = "before") -> None:
        super().__init__(params, lr=lr)
        self.probe_at = probe_at
        self.losses: list[float] = []
        self.probes: list[float] = []
        self._loss: Any = None
        self._probe: Callable[[], torch.Tensor] | None = None

    @property
    def has_pending_loss(self) -> bool:  # type: ignore[override]
        return self._loss is not None

    def set_loss(self, loss: Any, *, reduced: bool = False) -> None:
        self._loss = loss

    def set_probe(self, fn: Callable[[], torch.Tensor] | None, *, reduced: bool = False) -> None:
        self._probe = fn

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        assert self._probe is not None and self._loss is not None, "the callback did not hand over loss and probe"
        if self.probe_at == "before":
            self.probes.append(float(self._probe()))
        super().step()
        if self.probe_at == "after":
            self.probes.append(float(self._probe()))
        self.losses.append(float(self._loss))
        self._loss = None
        return result


class RequiredLRSGD(torch.optim.SGD):
    """SGD whose ``lr`` has no default (as some third-party optimizers have): for the command line."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.0) -> None:
        super().__init__(params, lr=lr, momentum=momentum)
