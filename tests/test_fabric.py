"""The optimizers under ``lightning.fabric.Fabric`` through :mod:`lightning_adaptive_lr.fabric`.

* 2-process DDP on CPU (``ddp_spawn``, gloo) with gradient accumulation: replicas bit-identical and
  equal to one process on the whole batches (tests/fabric_worker.py; expected values from the
  one-process run of tests/test_sharded.py).
* ``16-mixed`` with a GradScaler on CPU: the step uses unscaled gradients (MoMo's τ as in float32),
  and calling the raw optimizer, which would bypass the unscaling, raises.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.fabric import setup, step

WORKER = os.path.join(os.path.dirname(__file__), "fabric_worker.py")


@pytest.mark.multiprocess
def test_fabric_ddp_with_accumulation_matches_one_process(tmp_path) -> None:
    import test_sharded

    subprocess.run([sys.executable, WORKER, str(tmp_path)], check=True, timeout=600)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert rank0, "the worker ran no case"
    failures = []
    for case_id, got in rank0.items():
        if not all(torch.equal(a, b) for a, b in zip(got["params"], rank1[case_id]["params"], strict=True)):
            failures.append(f"{case_id}: the replicas differ")
        want = test_sharded.reference(case_id)
        diff = test_sharded.relative_difference([got["params"]], [want["params"][-1]])
        if diff > test_sharded.TOLERANCE:
            failures.append(f"{case_id}: parameters differ from one process by {diff:.3g} (relative)")
        if got["lrs"] != rank1[case_id]["lrs"]:
            failures.append(f"{case_id}: the ranks record different effective_lr")
    assert not failures, "\n".join(failures)


def _fabric_16_mixed():
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    return Fabric(accelerator="cpu", devices=1, plugins=MixedPrecision("16-mixed", "cpu"))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(32, 5, generator=gen), torch.randn(32, 1, generator=gen)


def test_fabric_16_mixed_steps_with_unscaled_gradients() -> None:
    """MoMo's τ under 16-mixed (loss scale 65536) equals the float32 τ to fp16 autocast precision."""
    x, y = _batch()
    torch.manual_seed(0)
    reference = nn.Linear(5, 1)
    torch.manual_seed(0)
    module = nn.Linear(5, 1)
    want_opt = lalr.MoMo(reference.parameters(), lr=1.0)
    loss = nn.functional.mse_loss(reference(x), y)
    loss.backward()
    want_opt.step(loss=loss)

    fabric = _fabric_16_mixed()
    model, opt = setup(fabric, module, lalr.MoMo(module.parameters(), lr=1.0))
    assert fabric.strategy.precision.scaler.get_scale() > 1000  # the gradients are really scaled
    loss = nn.functional.mse_loss(model(x).float(), y)
    fabric.backward(loss)
    step(opt, loss)
    got, want = opt.param_groups[0]["tau"], want_opt.param_groups[0]["tau"]
    assert got == pytest.approx(want, rel=1e-2), (got, want)


def test_fabric_raw_optimizer_step_that_bypasses_unscaling_raises() -> None:
    x, y = _batch()
    module = nn.Linear(5, 1)
    fabric = _fabric_16_mixed()
    model, opt = setup(fabric, module, lalr.MoMo(module.parameters(), lr=1.0))
    loss = nn.functional.mse_loss(model(x).float(), y)
    fabric.backward(loss)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match=r"lightning_adaptive_lr\.fabric\.step\(optimizer, loss\)"):
        opt.optimizer.step(loss=loss)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    step(opt, loss)  # the documented way still works afterwards
    assert not all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_fabric_step_refuses_foreign_optimizers() -> None:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    module = nn.Linear(2, 1)
    _, opt = setup(fabric, module, torch.optim.SGD(module.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer.step"):
        step(opt, 1.0)


def test_deepspeed_is_refused_naming_the_strategies_that_work() -> None:
    """The callback's check (callbacks/strategies.py), Fabric's setup, and the optimizers themselves
    (a ZeRO-3 partitioned parameter carries ``ds_id``) refuse DeepSpeed: no DeepSpeed install needed."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_adaptive_lr.callbacks.strategies import refuse_unsupported_strategy

    class DeepSpeedStrategy:  # stands for lightning's, which needs the deepspeed package
        pass

    class Trainer:
        strategy = DeepSpeedStrategy()

    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
        refuse_unsupported_strategy(Trainer())
    callback = lalr.AdaptiveLRCallback()  # the callback runs the check when fitting starts
    Trainer.callbacks = [callback]
    with pytest.raises(MisconfigurationException, match="DeepSpeedStrategy is not supported"):
        callback.setup(Trainer(), nn.Linear(2, 1), "fit")

    class Fabric:
        strategy = DeepSpeedStrategy()

    with pytest.raises(RuntimeError, match="DeepSpeed"):
        setup(Fabric(), nn.Linear(2, 1), lalr.MoMo(nn.Linear(2, 1).parameters()))

    import torch.distributed as dist

    from lightning_adaptive_lr.optim._sharding import layout_of

    param = nn.Parameter(torch.zeros(2))
    param.ds_id = 0
    assert not dist.is_initialized()  # the optimizers look only in a distributed run; the check itself:
    with pytest.raises(RuntimeError, match="DeepSpeed is not supported"):
        layout_of([param], "MoMo")
