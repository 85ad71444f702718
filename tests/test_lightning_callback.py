"""AdaptiveLRCallback in a real Trainer: loss intake under every precision, accumulation, the probe.

Every optimizer of the registry is trained on a small CNN (BatchNorm, dropout) on scikit-learn's
digits; methods join as their registry entries appear.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, lower_bound_from_losses
from lightning_adaptive_lr.callbacks import probe as probe_module
from lightning_adaptive_lr.optim import AdaptiveLROptimizer
from lightning_helpers import PRECISIONS, QUIET, Classifier, ContractSGD, ProbingSGD, case_kwargs, eval_loss, loader, trainer, usable_cases

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]

CASES = usable_cases()
CASE_IDS = [c.id for c in CASES]


class LossSpy(pl.Callback):
    """Records every loss the AdaptiveLRCallback hands to the optimizer (it must run after it)."""

    def __init__(self) -> None:
        self.handed: list[tuple[float, bool]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            original = optimizer.set_loss

            def spy(loss: Any, *, reduced: bool = False, _original: Any = original) -> None:
                self.handed.append((float(loss), reduced))
                _original(loss, reduced=reduced)

            optimizer.set_loss = spy


def _momo(params: Any) -> torch.optim.Optimizer:
    return lalr.MoMo(params, lr=1.0)


# ---------------------------------------------------------------------------------------------- training


def _first_of_each_class() -> list:
    seen: dict[type, Any] = {}
    for case in CASES:
        seen.setdefault(case.cls, case)
    return list(seen.values())


# Every registry setting under 32-true; every optimizer class under the two mixed precisions (the
# precision-specific part, the loss intake, is checked exactly for all three below).
TRAINING_RUNS = [(c, "32-true") for c in CASES] + [(c, p) for p in PRECISIONS[1:] for c in _first_of_each_class()]


@pytest.mark.parametrize(("case", "precision"), TRAINING_RUNS, ids=[f"{c.id}-{p}" for c, p in TRAINING_RUNS])
def test_every_optimizer_trains_under_each_precision(case, precision) -> None:
    model = Classifier(lambda params: case.make(params, **case_kwargs(case)))
    before = eval_loss(model.net)
    trainer(precision, max_steps=60, callbacks=[AdaptiveLRCallback()]).fit(model, loader(512))
    after = eval_loss(model.net)
    first, last = model.train_losses[:5], model.train_losses[-5:]
    assert after < 0.85 * before, f"{case.id} {precision}: loss {before:.3f} -> {after:.3f}"
    assert sum(last) < 0.9 * sum(first), f"{case.id} {precision}: train loss {first} -> {last}"


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("accumulate", [1, 3])
def test_loss_handed_over_is_the_unscaled_window_mean(precision, accumulate) -> None:
    spy = LossSpy()
    model = Classifier(_momo)
    trainer(precision, max_steps=4, accumulate_grad_batches=accumulate, callbacks=[AdaptiveLRCallback(), spy]).fit(
        model, loader(512)
    )
    assert len(spy.handed) == 4
    for step, (handed, reduced) in enumerate(spy.handed):
        window = model.train_losses[step * accumulate : (step + 1) * accumulate]
        expected = sum(window) / accumulate
        assert reduced
        assert handed == pytest.approx(expected, rel=1e-6), (step, window)


def test_without_the_callback_the_error_names_the_fix() -> None:
    # Under 16-mixed Lightning calls step() without a closure: nothing else can supply the loss.
    with pytest.raises(RuntimeError, match="AdaptiveLRCallback"):
        trainer("16-mixed", max_steps=2).fit(Classifier(_momo), loader(64))


@pytest.mark.filterwarnings("ignore:.*returned `None`.*")
def test_a_step_whose_training_step_returns_none_is_skipped() -> None:
    class Skipping(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return None if batch_idx == 1 else loss

    model = Skipping(_momo)
    trainer(max_steps=3, callbacks=[AdaptiveLRCallback()]).fit(model, loader(128))
    state = model.trainer.optimizers[0].param_groups[0]
    assert state["step"] == 2  # the optimizer was called 3 times; the batch without a loss changed nothing


# ---------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_accumulating_two_micro_batches_matches_one_batch_of_twice_the_size(case) -> None:
    def run(batch_size: int, accumulate: int) -> list[torch.Tensor]:
        model = Classifier(lambda p: case.make(p, **case_kwargs(case)), batchnorm=False, dropout=0.0)
        trainer(max_steps=6, accumulate_grad_batches=accumulate, callbacks=[AdaptiveLRCallback()]).fit(
            model, loader(256, batch_size)
        )
        return [p.detach().clone() for p in model.parameters()]

    large, accumulated = run(16, 1), run(8, 2)
    start = [p.detach() for p in Classifier(_momo, batchnorm=False, dropout=0.0).parameters()]
    for a, b, p0 in zip(large, accumulated, start):
        assert not torch.equal(a, p0), f"{case.id}: the parameters did not move"
        assert torch.linalg.vector_norm(a - b) <= 1e-4 * torch.linalg.vector_norm(a), case.id


# ---------------------------------------------------------------------------------------------- the probe


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for b in m.buffers()]


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_probe_at_the_current_point_reproduces_the_training_loss(accumulate, precision) -> None:
    """Same batches, same dropout masks, BatchNorm in train mode: the probe equals the training loss."""
    model = Classifier(lambda p: ProbingSGD(p, lr=0.1, probe_at="before"), dropout=0.3)
    trainer(precision, max_steps=5, accumulate_grad_batches=accumulate, callbacks=[AdaptiveLRCallback()]).fit(
        model, loader(256)
    )
    optimizer = model.trainer.optimizers[0]
    assert len(optimizer.probes) == 5
    tolerance = 1e-6 if precision == "32-true" else 1e-3  # bf16 kernels may pick another reduction order
    for probe, loss in zip(optimizer.probes, optimizer.losses):
        assert probe == pytest.approx(loss, rel=tolerance)


def test_probe_leaves_batchnorm_statistics_and_random_stream_as_without_probing() -> None:
    """A run that probes after every step ends bit-identical to plain SGD: BN buffers and dropout included."""

    def run(make: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        model = Classifier(make, dropout=0.3)
        trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[AdaptiveLRCallback()]).fit(model, loader(256, 16))
        return [p.detach().clone() for p in model.parameters()], _bn_buffers(model)

    probing = run(lambda p: ProbingSGD(p, lr=0.1, probe_at="after"))
    plain = run(lambda p: torch.optim.SGD(p, lr=0.1))
    for a, b in zip(probing[0] + probing[1], plain[0] + plain[1]):
        assert torch.equal(a, b)


def test_probe_without_restoring_batchnorm_would_be_caught(monkeypatch) -> None:
    """The test above can fail: without the buffer restore the statistics drift from the plain run."""
    monkeypatch.setattr(probe_module, "stateful_buffers", lambda module, which: [])

    def run(make: Any) -> list[torch.Tensor]:
        model = Classifier(make, dropout=0.0)
        trainer(max_steps=3, callbacks=[AdaptiveLRCallback()]).fit(model, loader(128))
        return _bn_buffers(model)

    probing = run(lambda p: ProbingSGD(p, lr=0.1, probe_at="after"))
    plain = run(lambda p: torch.optim.SGD(p, lr=0.1))
    assert not all(torch.equal(a, b) for a, b in zip(probing, plain))


class _AdaptiveLoss(Classifier):
    """Defines the probe's loss hook (and counts its calls): the probe must use it, not training_step."""

    hook_calls = 0

    def adaptive_lr_loss(self, batch: Any) -> torch.Tensor:
        type(self).hook_calls += 1
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_probe_uses_the_modules_loss_hook_and_logs_nothing() -> None:
    model = _AdaptiveLoss(lambda p: ProbingSGD(p, lr=0.1))
    trainer(max_steps=3, callbacks=[AdaptiveLRCallback()]).fit(model, loader(128))
    assert _AdaptiveLoss.hook_calls == 3
    assert len(model.train_losses) == 3  # training_step ran once per batch: never for the probe


def test_probe_through_training_step_mutes_logging() -> None:
    logged: list[str] = []

    class Logging(Classifier):
        def log(self, name: str, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
            logged.append(name)
            super().log(name, *args, **kwargs)

    model = Logging(lambda p: ProbingSGD(p, lr=0.1))
    trainer(max_steps=3, callbacks=[AdaptiveLRCallback()]).fit(model, loader(128))
    assert logged == ["train_loss"] * 3
    assert len(model.train_losses) == 6  # 3 training steps + 3 probes through training_step


@pytest.mark.parametrize("case", [c for c in CASES if getattr(c.cls, "requires_probe", False)], ids=lambda c: c.id)
def test_registry_probing_optimizers_leave_batchnorm_statistics_untouched(case) -> None:
    """For QLAB & co.: after each step, the BN statistics are those the training forwards left."""

    class Watch(pl.Callback):
        def __init__(self) -> None:
            self.pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.before = _bn_buffers(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.pairs.append((self.before, _bn_buffers(pl_module)))

    watch = Watch()
    model = Classifier(lambda p: case.make(p, **case_kwargs(case)))
    trainer(max_steps=4, callbacks=[AdaptiveLRCallback(), watch]).fit(model, loader(256))
    assert len(watch.pairs) == 4
    for before, after in watch.pairs:
        assert all(torch.equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------------- refusals


class _TwiceClosure(ContractSGD):
    """Stands for StepTunedSGD(same_batch=True): an optimizer that runs its closure twice."""

    calls_closure_twice = True


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_an_optimizer_that_runs_the_closure_twice_is_refused(precision) -> None:
    model = Classifier(lambda p: _TwiceClosure(p, lr=0.1))
    with pytest.raises(MisconfigurationException, match="closure"):
        trainer(precision, max_steps=1, callbacks=[AdaptiveLRCallback()]).fit(model, loader(64))


def test_step_tuned_same_batch_is_refused() -> None:
    if not any(c.cls is lalr.StepTunedSGD for c in CASES):
        pytest.skip("StepTunedSGD has no registry entry yet")
    model = Classifier(lambda p: lalr.StepTunedSGD(p, lr=0.1, same_batch=True))
    with pytest.raises(MisconfigurationException, match="twice"):
        trainer(max_steps=1, callbacks=[AdaptiveLRCallback()]).fit(model, loader(64))


def test_constructor_validates_its_arguments() -> None:
    for kwargs in ({"qlab": "yes"}, {"lb_fraction": 0.0}, {"lb_fraction": 1.5}, {"restore_buffers": "some"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            AdaptiveLRCallback(**kwargs)


# ---------------------------------------------------------------------------------------------- MoMo's lb


def test_lower_bound_rule_sets_momo_lb_at_epoch_ends() -> None:
    spy = LossSpy()
    model = Classifier(lambda p: lalr.MoMo(p, lr=1.0))
    trainer(max_epochs=3, callbacks=[AdaptiveLRCallback(lb_fraction=0.5), spy]).fit(model, loader(96))
    losses = [loss for loss, _ in spy.handed]
    epoch_means = [sum(losses[i : i + 3]) / 3 for i in (0, 3, 6)]
    expected = 0.5 * min(epoch_means)
    optimizer = model.trainer.optimizers[0]
    assert len(losses) == 9
    assert optimizer.param_groups[0]["lb"] == pytest.approx(expected, rel=1e-12)
    assert float(optimizer.param_groups[0]["current_lb"]) == pytest.approx(expected, rel=1e-12)
    assert lower_bound_from_losses(-2.0, 0.5) == -3.0  # below a negative minimum, too


# ---------------------------------------------------------------------------------------------- manual optimization


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two of the package's optimizers on two halves of the model."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_features, opt_head = self.optimizers()
        x, y = batch
        for optimizer in (opt_features, opt_head):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(self.head(self.features(x)), y)
            self.manual_backward(loss)
            optimizer.step()
            self.losses.append(float(loss.detach()))

    def configure_optimizers(self) -> Any:
        return lalr.MoMo(self.features.parameters(), lr=1.0), ProbingSGD(self.head.parameters(), lr=0.1)

    def adaptive_lr_loss(self, batch: Any, optimizer_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.features(x)), y)


def test_manual_optimization_with_two_optimizers() -> None:
    model = TwoOptimizers()
    spy = LossSpy()
    trainer(max_epochs=2, callbacks=[AdaptiveLRCallback(), spy]).fit(model, loader(256))
    opt_features, opt_head = model.trainer.optimizers
    momo_losses = [loss for loss, _ in spy.handed[0::2]]
    assert momo_losses == pytest.approx(model.losses[0::2], rel=1e-6)
    assert opt_head.losses == pytest.approx(model.losses[1::2], rel=1e-6)
    # The head's probe is evaluated before its step, after the features' step: the loss of the 2nd backward.
    assert opt_head.probes == pytest.approx(model.losses[1::2], rel=1e-6)
    assert sum(model.losses[-4:]) < 0.8 * sum(model.losses[:4])


def test_manual_optimization_probe_needs_a_loss_hook() -> None:
    class NoHook(TwoOptimizers):
        adaptive_lr_loss = None  # type: ignore[assignment]

    with pytest.raises(MisconfigurationException, match="adaptive_lr_loss"):
        trainer(max_steps=1, callbacks=[AdaptiveLRCallback()]).fit(NoHook(), loader(64))


def test_manual_optimization_without_backward_names_the_fix() -> None:
    class NoBackward(TwoOptimizers):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            self.optimizers()[0].step()

    with pytest.raises(RuntimeError, match="manual_backward"):
        trainer(max_steps=1, callbacks=[AdaptiveLRCallback()]).fit(NoBackward(), loader(64))


# ---------------------------------------------------------------------------------------------- QLAB on any optimizer


def _qlab_ready() -> bool:
    return any(c.cls is lalr.QLAB for c in CASES)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_qlab_option_wraps_the_modules_own_optimizer(base) -> None:
    if not _qlab_ready():
        pytest.skip("QLAB has no registry entry yet")

    class WithScheduler(Classifier):
        def configure_optimizers(self) -> Any:
            optimizer = (
                torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
                if base == "sgd"
                else torch.optim.Adam(self.parameters(), lr=1e-2)
            )
            self.own_optimizer = optimizer
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 100)}

    model = WithScheduler(lambda p: None)
    before = eval_loss(model.net)
    trainer(max_steps=40, callbacks=[AdaptiveLRCallback(qlab=True)]).fit(model, loader(512))
    optimizer = model.trainer.optimizers[0]
    # QLAB.wrap's result (QLAB by composition, not a QLAB subclass) on the module's own optimizer.
    assert isinstance(optimizer, AdaptiveLROptimizer) and optimizer.requires_probe
    assert optimizer.base_optimizer is model.own_optimizer
    assert model.optimizers().optimizer is optimizer  # the LightningOptimizer wrapper was rebuilt
    assert "effective_lr" in optimizer.param_groups[0]
    assert eval_loss(model.net) < 0.8 * before


@pytest.mark.parametrize("estimate_lb", [False, True])
def test_set_lower_bound_sets_option_and_current_bound(estimate_lb) -> None:
    from lightning_adaptive_lr.callbacks import set_lower_bound

    weight = nn.Parameter(torch.ones(3))
    optimizer = lalr.MoMo([{"params": [weight]}, {"params": [nn.Parameter(torch.ones(2))]}], lr=1.0, estimate_lb=estimate_lb)
    weight.grad = torch.ones(3)
    optimizer.step(loss=2.0)
    for group in optimizer.param_groups:  # the bound in use, kept equal in every group
        group["current_lb"] = 0.7
    set_lower_bound(optimizer, 0.5)
    assert [g["lb"] for g in optimizer.param_groups] == [0.5, 0.5]
    # Estimated online: the new value is a floor (the estimate 0.7 stays); otherwise it replaces the bound.
    assert optimizer.param_groups[0]["current_lb"] == (0.7 if estimate_lb else 0.5)
