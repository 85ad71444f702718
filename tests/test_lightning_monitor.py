"""AdaptiveLRMonitor: what it logs, under which names, when, and that TensorBoard receives it."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, AdaptiveLRMonitor
from lightning_helpers import QUIET, Classifier, case_kwargs, loader, trainer, usable_cases

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class GroupSpy(pl.Callback):
    """The param groups' values right after each optimizer step (runs after the monitor)."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        group = trainer.optimizers[0].param_groups[0]
        self.after_step.append({k: v for k, v in group.items() if k != "params"})


def _adaptive_only(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith("adaptive_lr/")}


def test_tensorboard_event_files_hold_the_traces(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spy = GroupSpy()
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    model = Classifier(lambda p: lalr.MoMo(p, lr=1.0, estimate_lb=True))
    trainer(
        max_steps=6,
        logger=logger,
        log_every_n_steps=2,
        callbacks=[AdaptiveLRCallback(), AdaptiveLRMonitor(logging_interval=2), spy],
    ).fit(model, loader(256))
    logger.experiment.flush()

    events = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    base = "adaptive_lr/MoMo/group0"
    for key in ("effective_lr", "lower_bound"):
        assert f"{base}/{key}" in tags, sorted(tags)
    # constant hyperparameters (lr without a scheduler: MoMo's cap) and aliases (tau) are not traced
    for key in ("beta", "lr", "tau"):
        assert f"{base}/{key}" not in tags, sorted(tags)
    assert "train_loss" in tags  # beside the module's own metrics ...
    loss_steps = [e.step for e in events.Scalars("train_loss")]
    effective = events.Scalars(f"{base}/effective_lr")
    assert [e.step for e in effective] == loss_steps == [1, 3, 5]  # ... at the same steps
    for event in effective:
        assert event.value == pytest.approx(spy.after_step[event.step]["effective_lr"], rel=1e-6)
    for event in events.Scalars(f"{base}/lower_bound"):
        assert event.value == pytest.approx(float(spy.after_step[event.step]["lower_bound"]), rel=1e-6)


@pytest.mark.parametrize("case", usable_cases(), ids=lambda c: c.id)
def test_every_optimizer_has_its_recorded_quantities_traced(case) -> None:
    memory = MemoryLogger()
    model = Classifier(lambda p: case.make(p, **case_kwargs(case)))
    trainer(max_steps=2, logger=memory, log_every_n_steps=1, callbacks=[AdaptiveLRCallback(), AdaptiveLRMonitor()]).fit(
        model, loader(64)
    )
    logged = {}
    for _, metrics in memory.calls:
        logged.update(_adaptive_only(metrics))
    base = f"adaptive_lr/{case.cls.__name__}/group0/"
    excluded = AdaptiveLRMonitor().exclude  # aliases of effective_lr (MoMo's tau)
    for key in [k for k in ("effective_lr", *case.recorded) if k not in excluded]:
        assert any(name == base + key or name.startswith(base + key + "/") for name in logged), (key, sorted(logged))
    assert all(isinstance(v, float) for v in logged.values())


def test_logs_only_after_optimizer_steps_every_interval() -> None:
    memory = MemoryLogger()
    model = Classifier(lambda p: lalr.MoMo(p, lr=1.0))
    trainer(
        max_steps=6,
        logger=memory,
        accumulate_grad_batches=2,
        log_every_n_steps=50,
        callbacks=[AdaptiveLRCallback(), AdaptiveLRMonitor(logging_interval=3)],
    ).fit(model, loader(256))
    steps = [step for step, metrics in memory.calls if _adaptive_only(metrics)]
    assert steps == [2, 5]  # after optimizer steps 3 and 6 (Lightning's step counter starts at 0)


def test_progress_bar_entry() -> None:
    model = Classifier(lambda p: lalr.MoMo(p, lr=1.0))
    fit = trainer(max_steps=3, callbacks=[AdaptiveLRCallback(), AdaptiveLRMonitor(prog_bar=True)])
    fit.fit(model, loader(128))
    assert fit.progress_bar_metrics["eff_lr"] == pytest.approx(fit.optimizers[0].param_groups[0]["effective_lr"])


def test_collect_names_and_value_kinds() -> None:
    params = [torch.nn.Parameter(torch.zeros(2))]
    first, second = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(params, lr=0.2)
    momo = lalr.MoMo([{"params": params}, {"params": [torch.nn.Parameter(torch.zeros(1))]}])
    first.param_groups[0].update(
        effective_lr=torch.tensor(0.5, dtype=torch.float64),
        rates=[1.0, torch.tensor(2.0)],
        weights={"global": 0.25, "layer": torch.tensor([0.75])},
        per_layer=torch.tensor([1.0, 2.0, 3.0]),
        flag=True,
        label="text",
        huge=torch.zeros(100),
    )
    momo.param_groups[1]["effective_lr"] = 3.0
    monitor = AdaptiveLRMonitor()
    assert monitor.optimizer_names([first, second, momo]) == ["SGD_0", "SGD_1", "MoMo"]
    values = monitor.collect([first, second, momo])
    assert values == {
        "adaptive_lr/SGD_0/group0/effective_lr": 0.5,
        "adaptive_lr/SGD_0/group0/rates/0": 1.0,
        "adaptive_lr/SGD_0/group0/rates/1": 2.0,
        "adaptive_lr/SGD_0/group0/weights/global": 0.25,
        "adaptive_lr/SGD_0/group0/weights/layer": 0.75,
        "adaptive_lr/SGD_0/group0/per_layer/0": 1.0,
        "adaptive_lr/SGD_0/group0/per_layer/1": 2.0,
        "adaptive_lr/SGD_0/group0/per_layer/2": 3.0,
        "adaptive_lr/MoMo/group1/effective_lr": 3.0,
        "adaptive_lr/MoMo/skipped_steps": 0.0,
    }
    # `lr` for the optimizers a scheduler drives (by index), or for all with include=("lr",)
    scheduled = monitor.collect([first, second, momo], scheduled={1})
    assert set(scheduled) - set(values) == {"adaptive_lr/SGD_1/group0/lr"}
    assert scheduled["adaptive_lr/SGD_1/group0/lr"] == 0.2
    everything = AdaptiveLRMonitor(include=("lr",)).collect([first, second, momo])
    assert {k for k in everything if k.endswith("/lr")} == {
        "adaptive_lr/SGD_0/group0/lr",
        "adaptive_lr/SGD_1/group0/lr",
        "adaptive_lr/MoMo/group0/lr",
        "adaptive_lr/MoMo/group1/lr",
    }


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10), id="OneCycleLR"),
        pytest.param(
            lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2), id="CyclicLR"
        ),
    ],
)
def test_scheduler_bookkeeping_is_not_logged(make) -> None:
    """OneCycleLR and CyclicLR write the constants of their schedule into every param group: not traced."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    for opt in (lalr.MoMo(params), lalr.QLAB(params, base="sgdm")):
        make(opt)
        names = {key.rsplit("/", 1)[-1] for key in AdaptiveLRMonitor().collect([opt])}
        assert not names & {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"}, names


def test_constructor_validates_its_arguments() -> None:
    for kwargs in ({"logging_interval": 0}, {"check_desync_every": -1}, {"check_desync_every": 1.5}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            AdaptiveLRMonitor(**kwargs)


def test_desync_check_is_a_no_op_in_one_process() -> None:
    monitor = AdaptiveLRMonitor(check_desync_every=1)
    model = Classifier(lambda p: lalr.MoMo(p, lr=1.0))
    trainer(max_steps=2, callbacks=[AdaptiveLRCallback(), monitor]).fit(model, loader(64))
    assert monitor.desync_steps == []
