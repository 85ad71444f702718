"""Resume from a checkpoint written at an epoch's last step, before the epoch ended, with ``lb_fraction``.

``ModelCheckpoint(every_n_train_steps=k)`` with ``k`` the steps per epoch writes its checkpoint in
``on_train_batch_end`` of the epoch's last batch, before ``on_train_epoch_end``, where the
lower-bound rule turns the epoch's losses into MoMo's ``lb``.  ``Trainer.fit(ckpt_path=...)``
resumes from it in the next epoch without running the finished epoch's end.  The resumed run must
still set the same bound before the same step: its parameters equal the uninterrupted run's, bit
for bit.  (One process: the rule is the callback's, the same under every strategy;
tests/test_sharded_lightning.py runs it under ModelParallelStrategy.)
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.callbacks import AdaptiveLRCallback
from lightning_helpers import QUIET, Classifier, loader, trainer

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]

STEPS_PER_EPOCH = 4


class BoundAtSteps(AdaptiveLRCallback):
    """Records MoMo's ``lb`` before every optimizer step (under the plain callback's state key)."""

    @property
    def state_key(self) -> str:
        return AdaptiveLRCallback.__qualname__

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.bounds = getattr(self, "bounds", {})
        self.bounds[trainer.global_step] = float(trainer.optimizers[0].param_groups[0]["lb"])


def test_resume_from_a_checkpoint_at_the_last_step_of_an_epoch_sets_the_same_lower_bound(tmp_path) -> None:
    data = loader(16 * STEPS_PER_EPOCH, 16)

    def fresh(seed: int) -> Classifier:
        # lr large enough that the Polyak step (which uses lb), not the cap, sets the step size.
        return Classifier(lambda p: lalr.MoMo(p, lr=10.0), dropout=0.0, seed=seed)

    whole = fresh(0)
    straight = BoundAtSteps(lb_fraction=0.9)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=STEPS_PER_EPOCH, save_top_k=-1)
    trainer(max_epochs=3, callbacks=[straight, checkpoints], enable_checkpointing=True).fit(whole, data)
    path = tmp_path / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    assert path.exists()

    resumed = fresh(1)  # other initial weights: everything must come from the checkpoint
    restoring = BoundAtSteps(lb_fraction=0.9)
    trainer(max_epochs=3, callbacks=[restoring]).fit(resumed, data, ckpt_path=path)

    # The bound the uninterrupted run set at the end of epoch 0 is in force at the resumed run's first step.
    first = STEPS_PER_EPOCH
    assert straight.bounds[first] > 0.0 and straight.bounds[first] != straight.bounds[first - 1]
    assert restoring.bounds == {k: v for k, v in straight.bounds.items() if k >= first}
    assert resumed.trainer.global_step == whole.trainer.global_step == 3 * STEPS_PER_EPOCH
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
