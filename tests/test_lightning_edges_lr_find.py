"""Lightning's learning-rate finder: refused, with the reason, for the optimizers that need the loss;
run as usual for the others, and before ``qlab=True`` puts QLAB on the module's optimizer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, AdaptiveLRMonitor
from lightning_helpers import QUIET, Classifier, loader, trainer

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]

REFUSED = r"learning-rate finder .*does not work with {name}.*no loss.*cap on the step size"


class WithLR(Classifier):
    """The classifier with the ``lr`` attribute that the finder sets."""

    def __init__(self, make_optimizer: Any, lr: float) -> None:
        super().__init__(lambda params: make_optimizer(params, self.lr))
        self.lr = lr


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
@pytest.mark.parametrize(
    "name, make",
    [
        ("MoMo", lambda p, lr: lalr.MoMo(p, lr=lr)),
        ("MoMoAdam", lambda p, lr: lalr.MoMoAdam(p, lr=lr)),
        ("QLAB", lambda p, lr: lalr.QLAB(p, lr=lr)),
    ],
)
def test_tuner_lr_find_is_refused_for_optimizers_that_need_the_loss(name: str, make: Any, precision: str) -> None:
    model = WithLR(make, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    fit = trainer(precision, max_epochs=1, callbacks=[AdaptiveLRCallback(), AdaptiveLRMonitor()])
    with pytest.raises(MisconfigurationException, match=REFUSED.format(name=name)):
        Tuner(fit).lr_find(model, train_dataloaders=loader(128), num_training=10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before any step
    assert model.lr == 1.0


def test_the_finder_callback_and_the_mixin_are_refused_too() -> None:
    class Mixed(lalr.MoMoMixin, Classifier):
        pass

    model = Mixed(lambda params: None)
    with pytest.raises(MisconfigurationException, match=REFUSED.format(name="MoMo")):
        trainer(max_epochs=1, callbacks=[LearningRateFinder(num_training_steps=10)]).fit(model, loader(128))


@pytest.mark.parametrize(
    "make",
    [lambda p, lr: lalr.AdaL(p, lr=lr), lambda p, lr: lalr.HierarchicalHD(p, lr=lr)],
    ids=["AdaL", "HierarchicalHD"],
)
def test_lr_find_runs_for_optimizers_that_need_only_the_gradient(make: Any) -> None:
    model = WithLR(make, lr=1e-3)
    fit = trainer(max_epochs=1, callbacks=[AdaptiveLRCallback()])
    finder = Tuner(fit).lr_find(model, train_dataloaders=loader(256, 16), num_training=16, min_lr=1e-4, max_lr=1.0)
    assert len(finder.results["lr"]) == 16
    assert 1e-4 <= model.lr <= 1.0 and model.lr == finder.suggestion()
    fit.fit(model, loader(256, 16))  # and training goes on with the callback
    assert fit.optimizers[0].param_groups[0]["lr"] == model.lr


def test_lr_find_runs_before_qlab_is_put_on_the_modules_optimizer() -> None:
    model = WithLR(lambda p, lr: torch.optim.SGD(p, lr=lr), lr=0.01)
    fit = trainer(max_epochs=1, callbacks=[AdaptiveLRCallback(qlab=True)])
    Tuner(fit).lr_find(model, train_dataloaders=loader(256, 16), num_training=16, min_lr=1e-4, max_lr=1.0)
    assert model.lr != 0.01
    fit.fit(model, loader(256, 16))
    assert repr(fit.optimizers[0]).startswith("QLAB.wrap(SGD)")
