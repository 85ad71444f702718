"""Checkpoint mid-training and `Trainer.fit(ckpt_path=...)`: the resumed run equals the uninterrupted one.

Bit for bit: the optimizers keep all their state in `state_dict()`, the callback's own state (the
lower-bound rule's running epoch losses) goes into the checkpoint too.  The model has BatchNorm but
no dropout (Lightning does not checkpoint the global random-number generator).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback
from lightning_helpers import QUIET, Classifier, case_kwargs, loader, trainer, usable_cases

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]


class StateAtStart(AdaptiveLRCallback):
    """Remembers its own state when training starts (after the checkpoint was restored)."""

    @property
    def state_key(self) -> str:
        return AdaptiveLRCallback.__qualname__  # read the state the plain callback saved

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = self.state_dict()
        super().on_train_start(trainer, pl_module)


def resume_matches_uninterrupted(
    tmp_path, make_optimizer: Any, epochs: int, callback: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Returns the callback's state when the checkpoint was saved, and when the resumed run started."""
    data = loader(64, 16)  # 4 optimizer steps per epoch

    def fresh(seed: int) -> Classifier:
        return Classifier(make_optimizer, dropout=0.0, seed=seed)

    whole = fresh(0)
    trainer(max_epochs=epochs, callbacks=[AdaptiveLRCallback(**callback)]).fit(whole, data)

    first = fresh(0)
    saving = AdaptiveLRCallback(**callback)
    interrupted = trainer(max_epochs=1, callbacks=[saving])
    interrupted.fit(first, data)
    path = tmp_path / "mid.ckpt"
    interrupted.save_checkpoint(path)

    resumed = fresh(1)  # other initial weights: everything must come from the checkpoint
    restoring = StateAtStart(**callback)
    trainer(max_epochs=epochs, callbacks=[restoring]).fit(resumed, data, ckpt_path=path)

    assert resumed.trainer.global_step == whole.trainer.global_step == 4 * epochs
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    return saving.state_dict(), restoring.at_start


@pytest.mark.parametrize("case", usable_cases(), ids=lambda c: c.id)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, case) -> None:
    resume_matches_uninterrupted(tmp_path, lambda p: case.make(p, **case_kwargs(case)), 2, {})


def test_resume_keeps_the_lower_bound_rule_state(tmp_path) -> None:
    # lr large enough that the Polyak step (which uses lb), not the cap, sets the step size.
    saved, restored = resume_matches_uninterrupted(tmp_path, lambda p: lalr.MoMo(p, lr=10.0), 3, {"lb_fraction": 0.9})
    assert saved["best_epoch_loss"][0] > 0
    assert restored == saved


def test_resume_with_qlab_put_on_the_modules_own_optimizer(tmp_path) -> None:
    resume_matches_uninterrupted(tmp_path, lambda p: torch.optim.Adam(p, lr=1e-2), 2, {"qlab": True})
