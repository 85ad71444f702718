"""The mixins: one base class changed, and an existing module trains with the adaptive method."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr import mixins
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, AdaptiveLRMonitor
from lightning_helpers import QUIET, eval_loss, loader, make_net, trainer, usable_cases

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]

#: Each mixin, with the learning rate that trains the small CNN (the rest: the documented defaults).
MIXINS = {
    "MoMo": (mixins.MoMoMixin, {}),
    "MoMoAdam": (mixins.MoMoAdamMixin, {}),
    "QLAB": (mixins.QLABMixin, {}),
    "HierarchicalHD": (mixins.HierarchicalHDMixin, {"lr": 0.5}),
    "AdaL": (mixins.AdaLMixin, {"lr": 3e-2}),
    "StepTunedSGD": (mixins.StepTunedSGDMixin, {"lr": 1.0}),
}
LANDED = [name for name in MIXINS if any(c.cls.__name__ == name for c in usable_cases())]


def existing_module(base: type) -> type:
    """The same user module body on the given base class (what changing one base class does)."""

    class UserClassifier(base):
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            torch.manual_seed(0)
            self.net = make_net()
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1)}

    return UserClassifier


@pytest.mark.parametrize("name", LANDED)
def test_changing_the_base_class_trains_with_the_method(name) -> None:
    mixin, lr = MIXINS[name]
    cls = existing_module(mixin)
    cls.adaptive_lr_hparams = lr
    model = cls()
    before = eval_loss(model.net)
    fit = trainer(max_steps=60)
    fit.fit(model, loader(512))

    optimizer = fit.optimizers[0]
    assert type(optimizer) is getattr(lalr, name)
    assert fit.lr_scheduler_configs == []  # the module's own scheduler went with its optimizer
    assert sum(isinstance(c, AdaptiveLRCallback) for c in fit.callbacks) == 1
    assert sum(isinstance(c, AdaptiveLRMonitor) for c in fit.callbacks) == 1
    expected = {**mixins.optimizer_defaults(getattr(lalr, name)), **lr}
    # tuples stored as lists (plain YAML in hparams.yaml)
    assert model.hparams["adaptive_lr"] == {k: list(v) if isinstance(v, tuple) else v for k, v in expected.items()}
    assert model.hparams["hidden"] == 8  # the module's own hyperparameters are still there
    # Built from those hyperparameters: the same options as a direct construction with them.
    direct = getattr(lalr, name)(model.parameters(), **expected)
    assert optimizer.defaults == direct.defaults
    assert eval_loss(model.net) < 0.85 * before


def test_hyperparameters_can_be_overridden_per_class_per_instance_and_in_init() -> None:
    class PerClass(existing_module(mixins.MoMoMixin)):
        adaptive_lr_hparams = {"lr": 0.5, "beta": 0.8}

    class InInit(existing_module(mixins.MoMoMixin)):
        def __init__(self) -> None:
            super().__init__()
            self.hparams.adaptive_lr["weight_decay"] = 1e-3

    class Forwarding(mixins.MoMoMixin):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.net = nn.Linear(2, 1)

    assert PerClass().configure_optimizers().defaults["beta"] == 0.8
    assert PerClass().configure_optimizers().defaults["lr"] == 0.5
    assert InInit().configure_optimizers().defaults["weight_decay"] == 1e-3
    built = Forwarding(adaptive_lr={"lr": 0.25}).configure_optimizers()
    assert (built.defaults["lr"], built.defaults["beta"]) == (0.25, 0.9)


def test_checkpoints_carry_the_hyperparameters(tmp_path) -> None:
    cls = existing_module(mixins.MoMoMixin)
    model = cls()
    model.hparams.adaptive_lr["lr"] = 0.3
    fit = trainer(max_steps=2)
    fit.fit(model, loader(64))
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    assert torch.load(path, weights_only=False)["hyper_parameters"]["adaptive_lr"]["lr"] == 0.3

    restored = cls.load_from_checkpoint(path)
    assert restored.hparams["adaptive_lr"]["lr"] == 0.3
    assert restored.configure_optimizers().defaults["lr"] == 0.3


@pytest.mark.parametrize("name", ["MoMoAdam", "HierarchicalHD", "StepTunedSGD"])
def test_hparams_yaml_is_plain_yaml(tmp_path, name) -> None:
    """The optimizers' tuple defaults (betas, levels, bounds) reach the logger's hparams.yaml as
    lists: yaml.safe_load reads it (a tuple would be written as !!python/tuple)."""
    import yaml
    from lightning.pytorch.loggers import TensorBoardLogger

    mixin, lr = MIXINS[name]
    cls = existing_module(mixin)
    cls.adaptive_lr_hparams = lr
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(max_steps=1, logger=logger).fit(cls(), loader(64))
    saved = yaml.safe_load((tmp_path / "tb" / "version_0" / "hparams.yaml").read_text())
    tuples = {k: list(v) for k, v in mixins.optimizer_defaults(getattr(lalr, name)).items() if isinstance(v, tuple)}
    assert tuples and {k: saved["adaptive_lr"][k] for k in tuples} == tuples


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_cli_override(tmp_path, monkeypatch) -> None:
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["lalr"])
    cli = LightningCLI(
        CliModel,
        run=False,
        args=["--model.adaptive_lr", '{"lr": 0.25, "beta": 0.5}', f"--trainer.default_root_dir={tmp_path}"],
        save_config_callback=None,
    )
    assert cli.model.hparams["adaptive_lr"]["lr"] == 0.25
    optimizer = cli.model.configure_optimizers()
    assert (optimizer.defaults["lr"], optimizer.defaults["beta"]) == (0.25, 0.5)


class CliModel(mixins.MoMoMixin):
    """A module whose ``__init__`` forwards keyword arguments, as LightningCLI needs for ``adaptive_lr``."""

    def __init__(self, hidden: int = 4, **kwargs: Any) -> None:
        """Args:
        hidden: width.
        """
        super().__init__(**kwargs)
        self.net = nn.Linear(hidden, 1)


def test_own_callbacks_are_kept_and_user_configured_ones_win() -> None:
    class Marker(Callback):
        pass

    class WithCallbacks(existing_module(mixins.MoMoMixin)):
        def configure_callbacks(self) -> Any:
            return Marker()

    monitor = AdaptiveLRMonitor(prog_bar=True)
    fit = trainer(max_steps=1, callbacks=[monitor])
    fit.fit(WithCallbacks(), loader(64))
    kinds = [type(c) for c in fit.callbacks]
    assert Marker in kinds and AdaptiveLRCallback in kinds
    assert [c for c in fit.callbacks if isinstance(c, AdaptiveLRMonitor)] == [monitor]


def test_keeping_your_own_configure_optimizers() -> None:
    class Own(existing_module(mixins.MoMoMixin)):
        adaptive_lr_replace_configure_optimizers = False

        def configure_optimizers(self) -> Any:
            return lalr.MoMo(self.parameters(), lr=0.123)

    assert Own().configure_optimizers().defaults["lr"] == 0.123


def test_param_groups_of_the_modules_own_optimizer_are_kept() -> None:
    class Grouped(existing_module(mixins.MoMoMixin)):
        def configure_optimizers(self) -> Any:
            head = list(self.net[-1].parameters())
            rest = [p for p in self.parameters() if all(p is not h for h in head)]
            return torch.optim.SGD([{"params": rest}, {"params": head, "lr": 1.0}], lr=0.1)

    model = Grouped()
    optimizer = model.configure_optimizers()
    assert isinstance(optimizer, lalr.MoMo)
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(list(model.parameters())) - 2, 2]
    assert all(g["lr"] == 1.0 for g in optimizer.param_groups)  # the options come from hparams


def test_several_optimizers_are_refused_with_a_clear_message() -> None:
    class Two(existing_module(mixins.MoMoMixin)):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.net[:3].parameters(), lr=0.1), torch.optim.SGD(self.net[3:].parameters(), lr=0.1)

    with pytest.raises(RuntimeError, match="adaptive_lr_replace_configure_optimizers"):
        Two().configure_optimizers()


def test_a_module_without_configure_optimizers_uses_all_trainable_parameters() -> None:
    class Bare(mixins.AdaLMixin):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
            self.b.weight.requires_grad_(False)

    model = Bare()
    optimizer = model.configure_optimizers()
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 3
    assert isinstance(model.configure_callbacks()[0], Callback)
