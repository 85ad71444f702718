"""Short runs get useful traces by default, and no redundant tags: read back from TensorBoard's files.

The README's recipe (``AdaptiveLRCallback(), AdaptiveLRMonitor()``) with Lightning's default
``log_every_n_steps=50``: a 75-step run must show a point per step, not one per 50 steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback, AdaptiveLRMonitor
from lightning_adaptive_lr.callbacks.monitor import automatic_interval
from lightning_helpers import QUIET, Classifier, loader, trainer

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run(tmp_path: Path, optimizer, steps: int, monitor: AdaptiveLRMonitor, **kwargs) -> dict[str, list[tuple[int, float]]]:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    model = Classifier(optimizer)
    fit = trainer(max_steps=steps, logger=logger, callbacks=[AdaptiveLRCallback(), monitor], **kwargs)
    assert fit.log_every_n_steps == 50  # Lightning's default
    fit.fit(model, loader(512, 16))  # 32 batches per epoch
    logger.experiment.flush()
    return scalars(tmp_path / "tb" / "version_0")


def test_a_75_step_run_is_traced_at_every_step_by_default(tmp_path: Path) -> None:
    traces = run(tmp_path, lambda p: lalr.MoMo(p, lr=10.0), 75, AdaptiveLRMonitor())  # the cap rarely binds
    ours = {tag: points for tag, points in traces.items() if tag.startswith("adaptive_lr/")}
    assert sorted(ours) == [
        "adaptive_lr/MoMo/group0/effective_lr",
        "adaptive_lr/MoMo/group0/lower_bound",
        "adaptive_lr/MoMo/skipped_steps",
    ]  # no `tau` (= effective_lr), no `lr` (the constant cap)
    for points in ours.values():
        assert [step for step, _ in points] == list(range(75))
    assert len({value for _, value in ours["adaptive_lr/MoMo/group0/effective_lr"]}) > 10  # a curve, not a line
    # Lightning's own training loss, at its log_every_n_steps=50: one point
    assert [step for step, _ in traces["train_loss"]] == [49]


def test_the_automatic_interval_and_an_explicit_one(tmp_path: Path) -> None:
    # at least 100 points per tag, never fewer than Lightning's own logging gives
    assert [automatic_interval(50, n) for n in (75, 460, 5_000, 100_000, math.inf)] == [1, 4, 50, 50, 50]
    assert automatic_interval(10, 100_000) == 10
    traces = run(tmp_path, lambda p: lalr.MoMo(p, lr=1.0), 60, AdaptiveLRMonitor(logging_interval=20))
    assert [s for s, _ in traces["adaptive_lr/MoMo/group0/effective_lr"]] == [19, 39, 59]


def test_lr_is_traced_when_a_scheduler_drives_it(tmp_path: Path) -> None:
    class Scheduled(Classifier):
        def configure_optimizers(self):
            optimizer = lalr.MoMo(self.parameters(), lr=1.0)
            schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer(max_steps=30, logger=logger, callbacks=[AdaptiveLRCallback(), AdaptiveLRMonitor()]).fit(
        Scheduled(lambda p: None), loader(512, 16)
    )
    logger.experiment.flush()
    traces = scalars(tmp_path / "tb" / "version_0")
    caps = [value for _, value in traces["adaptive_lr/MoMo/group0/lr"]]
    # logged after each step, when the scheduler has already set the next step's cap
    assert caps == [1.0] * 9 + [0.5] * 10 + [0.25] * 10 + [0.125]
    steps = [value for _, value in traces["adaptive_lr/MoMo/group0/effective_lr"]]
    assert all(step <= cap + 1e-7 for step, cap in zip(steps[1:], caps))  # each step within its cap


def test_qlab_on_sgd_has_one_name(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    model = Classifier(lambda p: torch.optim.SGD(p, lr=0.1))
    trainer(max_steps=3, logger=logger, callbacks=[AdaptiveLRCallback(qlab=True), AdaptiveLRMonitor()]).fit(
        model, loader(128, 16)
    )
    logger.experiment.flush()
    names = {tag.split("/")[1] for tag in scalars(tmp_path / "tb" / "version_0") if tag.startswith("adaptive_lr/")}
    optimizer = model.trainer.optimizers[0]
    assert names == {"QLAB.wrap(SGD)"} and repr(optimizer).startswith("QLAB.wrap(SGD)")
    assert optimizer.param_groups[0]["optimizer"] == "QLAB.wrap(SGD)"  # the name in its saved state
