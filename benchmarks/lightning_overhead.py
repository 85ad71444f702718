"""End-to-end training-step time in Lightning: the adaptive methods + AdaptiveLRCallback vs torch.optim.

A small CNN (three conv layers of 16, 32, 64 channels with BatchNorm, 24 k parameters, CIFAR-shaped
3×32×32 inputs, batch 64, synthetic data) is trained by ``Trainer.fit`` with each row's optimizer and callbacks.  A row's step time is
the wall time between consecutive ``on_train_batch_start`` calls (forward, backward, optimizer
step, every callback, the data loader), median over the steps after warm-up.  Rows are run in
rounds (each round fits every row once, in turn) so that machine noise hits all rows alike; the
reported time is the median over rounds, and ratios divide it by the baseline row's.  ``spread``
is (slowest − fastest round) / median: how much other processes on the machine moved the rounds.

Targets (from the issue tracker): MoMo + callback ≤ 1.05× SGD with momentum; QLAB (one extra
forward pass per step) ≤ 1.45× its base optimizer.

    python -m benchmarks.lightning_overhead                       # CPU, default sizes
    python -m benchmarks.lightning_overhead --steps 30 --rounds 3 --threads 1
    python -m benchmarks.lightning_overhead --accelerator gpu --markdown out.md
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr import AdaptiveLRCallback


@dataclass(frozen=True)
class Row:
    """One configuration to time.

    Attributes:
        name: shown in the table.
        make: builds the optimizer over the model's parameters (what ``configure_optimizers`` returns).
        callbacks: builds the callbacks the row adds to the Trainer.
        baseline: name of the row it is compared with (empty for baselines).
        target: the ratio the issue tracker asks for (None: no target).
    """

    name: str
    make: Callable[[Any], torch.optim.Optimizer]
    callbacks: Callable[[], list[pl.Callback]] = field(default=lambda: [])
    baseline: str = ""
    target: float | None = None


SGDM = "torch SGD momentum"
ADAM = "torch Adam"

ROWS: list[Row] = [
    Row(SGDM, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    Row(ADAM, lambda p: torch.optim.Adam(p, lr=1e-3)),
    Row("MoMo + callback", lambda p: lalr.MoMo(p, lr=1.0), lambda: [AdaptiveLRCallback()], SGDM, 1.05),
    Row("MoMoAdam + callback", lambda p: lalr.MoMoAdam(p, lr=1e-2), lambda: [AdaptiveLRCallback()], ADAM, None),
    Row("QLAB-sgdm + callback", lambda p: lalr.QLAB(p, base="sgdm"), lambda: [AdaptiveLRCallback()], SGDM, 1.45),
    Row(
        "QLAB.wrap(SGD momentum), qlab=True",
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda: [AdaptiveLRCallback(qlab=True)],
        SGDM,
        1.45,
    ),
    Row("QLAB-adam + callback", lambda p: lalr.QLAB(p, base="adam", lr=1e-3), lambda: [AdaptiveLRCallback()], ADAM, 1.45),
]


class SmallCNN(pl.LightningModule):
    """Three conv layers with BatchNorm and a linear head, for 3×32×32 inputs."""

    def __init__(self, make_optimizer: Callable[[Any], torch.optim.Optimizer]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
        self.make_optimizer = make_optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())


class StepTimer(pl.Callback):
    """Wall time between consecutive batch starts (the device synchronized first)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def time_row(row: Row, data: DataLoader, steps: int, warmup: int, accelerator: str) -> float:
    """Median step time of one fit of ``row`` (seconds)."""
    timer = StepTimer()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, *row.callbacks()],  # the timer first: its hook starts each iteration
    )
    trainer.fit(SmallCNN(row.make), data)
    return statistics.median(timer.times[warmup:])


def run(
    steps: int, rounds: int, warmup: int, batch_size: int, accelerator: str, only: str | None
) -> dict[str, list[float]]:
    """Each row's median step time (seconds) in every round."""
    rows = [r for r in ROWS if only is None or only in r.name or not r.baseline]
    generator = torch.Generator().manual_seed(0)
    n = batch_size * (steps + 2)
    x = torch.randn(n, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    data = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
    per_round: dict[str, list[float]] = {r.name: [] for r in rows}
    for _ in range(rounds):
        for row in rows:
            per_round[row.name].append(time_row(row, data, steps, warmup, accelerator))
    return per_round


def table(per_round: dict[str, list[float]], header: str) -> str:
    """A markdown table: median step time, spread over rounds, ratio to the baseline, target."""
    median = {name: statistics.median(times) for name, times in per_round.items()}
    lines = [header, "", "| configuration | step (ms) | spread | ratio | vs | target |", "|---|---:|---:|---:|---|---|"]
    for row in ROWS:
        if row.name not in median:
            continue
        times = per_round[row.name]
        cells = f"| {row.name} | {1e3 * median[row.name]:.2f} | {(max(times) - min(times)) / median[row.name]:.0%} |"
        if row.baseline and row.baseline in median:
            ratio = median[row.name] / median[row.baseline]
            target = "" if row.target is None else f"≤ {row.target:.2f} {'met' if ratio <= row.target else 'missed'}"
            lines.append(f"{cells} {ratio:.3f} | {row.baseline} | {target} |")
        else:
            lines.append(f"{cells} 1 | baseline | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per fit")
    parser.add_argument("--warmup", type=int, default=5, help="first steps of each fit not counted")
    parser.add_argument("--rounds", type=int, default=5, help="fits per row (interleaved)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--only", default=None, help="rows whose name contains this (and the baselines)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    per_round = run(args.steps, args.rounds, args.warmup, args.batch_size, args.accelerator, args.only)
    device = torch.cuda.get_device_name() if args.accelerator in ("gpu", "cuda") else platform.processor() or platform.machine()
    header = (
        f"Lightning end-to-end step time, small CNN (3×32×32, batch {args.batch_size}), {args.accelerator} "
        f"({device}, {torch.get_num_threads()} threads), torch {torch.__version__}, lightning {pl.__version__}; "
        f"median of {args.rounds} interleaved fits × {args.steps} steps"
    )
    text = table(per_round, header)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
