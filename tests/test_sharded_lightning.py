"""Lightning's ModelParallelStrategy (FSDP2 or tensor parallelism, DTensor parameters) on 2 CPU processes (gloo).

With AdaptiveLRCallback and AdaptiveLRMonitor, MoMo (with the callback's lower-bound rule), QLAB
(its probe through the callback), HierarchicalHD, AdaL and Step-Tuned SGD train like one process
on the whole batches (under tensor parallelism: MoMo and QLAB) (expected values from a plain one-process loop, not from the code under
test), both ranks hold the same parameters, and a resume through a distributed checkpoint
(``ModelCheckpoint`` + ``Trainer.fit(ckpt_path=...)``) continues bit for bit.  (Lightning's
FSDPStrategy refuses the CPU: tests/test_sharded.py runs the same optimizer code under plain
FSDP1, and benchmarks/gpu_fsdp_check.py runs FSDPStrategy.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

import sharded_worker_lightning as lw

WORKER = os.path.join(os.path.dirname(__file__), "sharded_worker_lightning.py")
#: float32: what rounding allows; float64: far below any incomplete sum (1e-3 to 1) or probe at
#: the wrong point.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def one_process(case: lw.Case) -> dict[str, Any]:
    """The same model and optimizer stepped by a plain loop on the whole batches (2 × BATCH), with
    the lower-bound rule written out: at each epoch end ``lb = fraction · (mean loss of the epoch)``
    (the smallest epoch mean so far; the loss is non-negative)."""
    from optimizer_registry import CASES

    spec = next(c for c in CASES if c.id == case.registry_id)
    model = lw.MLP(case.registry_id, case.dtype, parallel=case.parallel)
    opt = spec.make(model.parameters())
    x_all, y_all = lw.dataset(case.dtype).tensors
    fraction = case.callback.get("lb_fraction")
    epoch_losses: list[float] = []
    best = float("inf")
    for k in range(lw.STEPS):
        b = k % lw.EPOCH
        rows = torch.cat([torch.arange(r, len(x_all), 2)[b * lw.BATCH : (b + 1) * lw.BATCH] for r in (0, 1)])
        x, y = x_all[rows], y_all[rows]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model.net(x), y)
        loss.backward()
        kwargs: dict[str, Any] = {"loss": loss}
        if spec.needs_probe:
            kwargs["probe"] = lambda x=x, y=y: nn.functional.mse_loss(model.net(x), y)
        opt.step(**kwargs)
        epoch_losses.append(loss.item())
        if fraction is not None and b == lw.EPOCH - 1:
            best = min(best, sum(epoch_losses) / len(epoch_losses))
            opt.set_lower_bound(fraction * best)
            epoch_losses = []
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "lrs": [float(g["effective_lr"]) for g in opt.param_groups],
        "lbs": [float(g["lb"]) if "lb" in g else None for g in opt.param_groups],
    }


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory):
    """One launch of the worker for every case (process start-up costs seconds)."""
    out = tmp_path_factory.mktemp("lightning_sharded")
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_SHARDED_CASES"}
    env["PYTHONWARNINGS"] = "ignore"
    run = subprocess.run([sys.executable, WORKER, str(out)], timeout=600, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]

    def load(name: str) -> dict[str, Any]:
        return torch.load(out / f"{name}.pt", weights_only=True)

    return load


def _relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want, strict=True))


@pytest.mark.multiprocess
def test_model_parallel_strategy_matches_one_process(lightning_runs) -> None:
    failures = []
    for case in lw.CASES:
        got, other = lightning_runs(f"{case.id}-rank0"), lightning_runs(f"{case.id}-rank1")
        want = one_process(case)
        if not all(torch.equal(a, b) for a, b in zip(got["params"], other["params"], strict=True)):
            failures.append(f"{case.id}: the ranks' gathered parameters differ")
        if got["lrs"] != other["lrs"]:
            failures.append(f"{case.id}: the ranks record different effective_lr: {got['lrs']} vs {other['lrs']}")
        tolerance = TOLERANCE[case.dtype]
        diff = _relative(got["params"], want["params"])
        print(f"{case.id}: max relative difference from one process {diff:.3g}")
        if diff > tolerance:
            failures.append(f"{case.id}: parameters differ from one process by {diff:.3g} (relative)")
        lr_diff = max(abs(a - b) / abs(b) for a, b in zip(got["lrs"], want["lrs"], strict=True))
        if lr_diff > tolerance:
            failures.append(f"{case.id}: effective_lr {got['lrs']} vs one process {want['lrs']}")
        if "lb_fraction" in case.callback:
            assert want["lbs"][0] > 0.0  # the rule did set a bound (else the case tests nothing)
            lb_diff = abs(got["lbs"][0] - want["lbs"][0]) / want["lbs"][0]
            if lb_diff > tolerance:
                failures.append(f"{case.id}: lb {got['lbs']} vs one process {want['lbs']}")
    assert not failures, "\n".join(failures)


@pytest.mark.multiprocess
def test_model_parallel_checkpoint_resume_is_bit_identical(lightning_runs) -> None:
    """A distributed checkpoint after the last step of epoch 0, resumed by ``Trainer.fit(ckpt_path=...)``
    into a model initialised otherwise: parameters, effective_lr and lb equal the uninterrupted run's."""
    failures = []
    cases = [case for case in lw.CASES if case.resume]
    assert len({c.registry_id.split("-")[0] for c in cases}) >= 5
    for case in cases:
        for rank in (0, 1):
            straight = lightning_runs(f"{case.id}-rank{rank}")
            resumed = lightning_runs(f"{case.id}-resumed-rank{rank}")
            if not all(torch.equal(a, b) for a, b in zip(resumed["params"], straight["params"], strict=True)):
                diff = _relative(resumed["params"], straight["params"])
                failures.append(f"{case.id} (rank {rank}): resumed parameters differ by {diff:.3g} (relative)")
            for key in ("lrs", "lbs"):
                if resumed[key] != straight[key]:
                    failures.append(f"{case.id} (rank {rank}): {key} {resumed[key]} != {straight[key]}")
    assert not failures, "\n".join(failures)
