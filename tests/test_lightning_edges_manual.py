"""Manual optimization with several optimizers: each gets its own loss, ``opt.step(loss=...)`` wins.

A GAN-like module (a "generator" ``g`` and a "discriminator" ``d``, each with its own optimizer and
loss; ``d``'s loss uses ``g``'s output detached) is trained by Lightning with AdaptiveLRCallback and,
independently, by a plain PyTorch loop that hands every optimizer the loss stated by the attribution
rule (``lightning_adaptive_lr.callbacks.manual``): the sum of the losses back-propagated since the
optimizer's gradients were last cleared that reach its parameters.  The two must agree bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback
from lightning_helpers import QUIET, loader, trainer

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]

OptimizerFactory = Callable[[Any], torch.optim.Optimizer]


def momo(params: Any) -> torch.optim.Optimizer:
    return lalr.MoMo(params, lr=1.0)


def adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-2)


def players(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
    d = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    return g, d


def losses(g: nn.Module, d: nn.Module, x: Tensor, y: Tensor, shared: bool) -> tuple[Tensor, Tensor]:
    """``loss_g`` reaches ``d``'s parameters only when ``shared``; ``loss_d`` never reaches ``g``'s."""
    logits = g(x)
    loss_g = nn.functional.cross_entropy(logits, y)
    if shared:
        loss_g = loss_g + 0.1 * d(x).pow(2).mean()
    loss_d = nn.functional.cross_entropy(d(x) + logits.detach(), y)
    return loss_g, loss_d


class TwoPlayers(pl.LightningModule):
    """``pattern``: ``"sequential"`` (backward, step, backward, step) or ``"both_first"`` (both
    backward passes, then both steps).  ``explicit`` maps an optimizer index to a function of its
    loss whose value is passed as ``opt.step(loss=...)``.  ``step_d_twice``: ``d`` steps once more
    at the end, with no loss back-propagated since its previous step."""

    def __init__(
        self,
        pattern: str,
        make_g: OptimizerFactory = momo,
        make_d: OptimizerFactory = momo,
        shared: bool = False,
        explicit: dict[int, Callable[[Tensor], Tensor]] | None = None,
        step_d_twice: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g, self.d = players()
        self.pattern, self.make_g, self.make_d, self.shared = pattern, make_g, make_d, shared
        self.explicit = explicit or {}
        self.step_d_twice = step_d_twice

    def _step(self, index: int, optimizer: Any, loss: Tensor) -> None:
        if index in self.explicit:
            optimizer.step(loss=self.explicit[index](loss.detach()))
        else:
            optimizer.step()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        x, y = batch
        loss_g, loss_d = losses(self.g, self.d, x, y, self.shared)
        if self.pattern == "sequential":
            opt_g.zero_grad()
            self.manual_backward(loss_g)
            self._step(0, opt_g, loss_g)
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            self._step(1, opt_d, loss_d)
        else:
            opt_g.zero_grad()
            opt_d.zero_grad()
            self.manual_backward(loss_g)
            self.manual_backward(loss_d)
            self._step(0, opt_g, loss_g)
            self._step(1, opt_d, loss_d)
        if self.step_d_twice:
            self._step(1, opt_d, loss_d)

    def configure_optimizers(self) -> Any:
        return self.make_g(self.g.parameters()), self.make_d(self.d.parameters())


def plain_loop(
    pattern: str,
    make_g: OptimizerFactory = momo,
    make_d: OptimizerFactory = momo,
    shared: bool = False,
    explicit: dict[int, Callable[[Tensor], Tensor]] | None = None,
    precision: str = "32-true",
) -> list[Tensor]:
    """The same training in plain PyTorch: every optimizer gets its loss by ``step(loss=...)``.

    Under ``16-mixed`` it does what Lightning's MixedPrecision plugin does (autocast, scaled
    backward, unscale, ``scaler.step``, ``scaler.update`` after every optimizer step).
    """
    explicit = explicit or {}
    g, d = players()
    opt_g, opt_d = make_g(g.parameters()), make_d(d.parameters())
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None

    def autocast() -> Any:
        if precision == "16-mixed":
            return torch.autocast("cpu", dtype=torch.float16)
        if precision == "bf16-mixed":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(loss: Tensor) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    def step(index: int, optimizer: torch.optim.Optimizer, own: Tensor, attributed: Tensor) -> None:
        kwargs = {}
        if index in explicit:
            kwargs["loss"] = explicit[index](own.detach())
        elif isinstance(optimizer, lalr.MoMo):
            kwargs["loss"] = attributed
        if scaler is None:
            optimizer.step(**kwargs)
            return
        scaler.unscale_(optimizer)
        scaler.step(optimizer, **kwargs)
        scaler.update()

    for x, y in loader(256, 32):
        with autocast():
            loss_g, loss_d = losses(g, d, x, y, shared)
        # The attribution rule, in float64 as the callback sums.
        as64 = {"g": loss_g.detach().double(), "d": loss_d.detach().double()}
        if pattern == "sequential":
            opt_g.zero_grad()
            backward(loss_g)
            step(0, opt_g, loss_g, as64["g"])
            opt_d.zero_grad()  # clears what loss_g left in d's gradients
            backward(loss_d)
            step(1, opt_d, loss_d, as64["d"])
        else:
            opt_g.zero_grad()
            opt_d.zero_grad()
            backward(loss_g)
            backward(loss_d)
            step(0, opt_g, loss_g, as64["g"])
            step(1, opt_d, loss_d, as64["d"] + as64["g"] if shared else as64["d"])
    return [p.detach() for p in (*g.parameters(), *d.parameters())]


def fit(module: TwoPlayers, precision: str = "32-true") -> list[Tensor]:
    trainer(precision, max_epochs=1, callbacks=[AdaptiveLRCallback()]).fit(module, loader(256, 32))
    return [p.detach() for p in (*module.g.parameters(), *module.d.parameters())]


def assert_same(actual: list[Tensor], expected: list[Tensor]) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["sequential", "both_first"])
@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_two_momo_each_get_their_own_loss(pattern: str, precision: str) -> None:
    assert_same(fit(TwoPlayers(pattern), precision), plain_loop(pattern, precision=precision))


@pytest.mark.parametrize("pattern", ["sequential", "both_first"])
def test_momo_and_adam_momo_gets_only_its_loss(pattern: str) -> None:
    assert_same(fit(TwoPlayers(pattern, make_d=adam)), plain_loop(pattern, make_d=adam))
    assert_same(fit(TwoPlayers(pattern, make_g=adam)), plain_loop(pattern, make_g=adam))


@pytest.mark.parametrize("pattern", ["sequential", "both_first"])
def test_a_loss_that_reaches_both_counts_for_both_until_zero_grad(pattern: str) -> None:
    """loss_g reaches d: in "both_first" d's gradient holds both losses, and d gets their sum; in
    "sequential" d's zero_grad() clears loss_g's part, and d gets loss_d only."""
    assert_same(fit(TwoPlayers(pattern, shared=True)), plain_loop(pattern, shared=True))


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_an_explicit_loss_always_wins(precision: str) -> None:
    explicit = {0: lambda loss: 2.0 * loss, 1: lambda loss: loss + 0.5}
    for pattern in ("sequential", "both_first"):
        expected = plain_loop(pattern, explicit=explicit, precision=precision)
        assert_same(fit(TwoPlayers(pattern, explicit=explicit), precision), expected)
        # ...and differs from the attributed losses' run: the explicit loss was used
        assert not torch.equal(expected[0], plain_loop(pattern, precision=precision)[0])


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_a_step_without_any_loss_names_both_fixes(precision: str) -> None:
    module = TwoPlayers("sequential", step_d_twice=True)  # d's second step: no loss since its first
    with pytest.raises(RuntimeError, match=r"MoMo \(optimizer 1\).*manual_backward.*opt\.step\(loss=loss\)"):
        fit(module, precision)
    assert module.trainer.global_step == 2  # g's and d's first steps, then the error
    # An explicit loss for that step is enough.
    fit(TwoPlayers("sequential", step_d_twice=True, explicit={1: lambda loss: loss}), precision)


def test_step_hooks_are_removed_after_fit() -> None:
    module = TwoPlayers("sequential")
    fit(module)
    for optimizer in module.trainer.optimizers:
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
