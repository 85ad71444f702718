"""Learning-rate sensitivity: final test accuracy of each method over a log grid of learning rates.

The task (default): the package's ``mlp`` backbone (64-100-100-10, ReLU: MoMo's MNIST MLP) on
scikit-learn's bundled 8×8 digits, split by :class:`~lightning_adaptive_lr.tasks.DigitsDataModule`
(seed 0: 1258 training, 180 validation, 359 test images, flattened and standardized), cross-entropy,
batch 32, 10 epochs (400 steps), float32, constant learning rate.  A seed fixes the initial weights
and the order of the mini-batches, so for one seed every method and every rate starts from the same
network and sees the same batches.  The training loop is plain PyTorch with the data held as
tensors: on a problem this small, Lightning's per-step bookkeeping would cost more than the step.

Each method is trained over its own grid of 13 rates, half a decade apart over six decades,
placed around its usual scale so that both ends, too small to learn in 400 steps and too large,
show (the half-decade lattice ``10^(k/2)`` is shared by all grids, so the per-rate table lines up),
with 5 seeds per rate:

=====================================  ==============  =========================================
method                                 lr grid         what ``lr`` is
=====================================  ==============  =========================================
MoMo                                   1e-3 .. 1e3     the cap of the Polyak step (default 1)
MoMo-Adam                              1e-4 .. 1e2     the cap (default 1e-2)
QLAB (base sgd)                        1e-4 .. 1e2     the first trial rate (default 0.1)
QLAB (base adam)                       1e-5 .. 1e1     the first trial rate
HierarchicalHD (sgdn, global+layer)    1e-4 .. 1e2     the initial rate α_0 (default 1e-3)
HD-sgdn-global (one level: Baydin's)   1e-4 .. 1e2     the initial rate α_0
AdaL                                   1e-5 .. 1e1     η (default 1e-3)
Step-Tuned SGD                         1e-3 .. 1e3     α of α·γ/(k+1)^(1/2+δ) (decays, so larger)
SGD-M, dampening 0.9 (MoMo's baseline) 1e-3 .. 1e3     torch's lr; the step is about lr·g
SGD-M (momentum 0.9)                   1e-4 .. 1e2     torch's lr; the step is about 10·lr·g
Adam                                   1e-5 .. 1e1     torch's lr (default 1e-3)
=====================================  ==============  =========================================

MoMo shares its grid with its baseline SGD-M with dampening 0.9 (MoMo with the cap binding at
every step is exactly that), and AdaL and QLAB-adam share Adam's.  The single-level hypergradient
run (``levels=("global",)``, Baydin et al.'s SGDN-HD) is there to compare the multi-level one
with.  One run takes about half a second on one core, so the default 715 runs take a few minutes
on two.

Every optimizer keeps its defaults otherwise.  A run is *diverged* when a mini-batch loss is not
finite (training stops there) or when the final training loss is above the loss at initialization
(no progress at all).  Predictions from non-finite logits count as wrong.

Outputs, in ``--out`` (default ``./lr_sensitivity/``; ``python -m benchmarks.lr_sensitivity`` in a
checkout of the repository writes ``benchmarks/results/lr_sensitivity/``):

* ``runs.csv``: one row per (method, lr, seed): final test accuracy, final training loss (whole
  training split), training loss after the first epoch (how fast a method starts), diverged flag,
  seconds of training.  Rows are appended as runs finish, and runs already in
  the file (same method, lr, seed, epochs and batch size) are skipped, so an interrupted benchmark
  resumes where it stopped.
* ``lr_sensitivity.png``: final test accuracy vs learning rate (log x), the median over seeds with
  a min-max band; SGD-type methods on the left, Adam-type on the right, baselines dashed, a cross
  where some seed diverged; the bottom row zooms on accuracies from 0.9 up.
* ``lr_sensitivity.md``: per method the best median accuracy and its rate, and the *robust range*:
  the width in decades of the contiguous run of grid rates, around the best one, whose median
  accuracy is at least 97 % of the best (0 when only the best rate qualifies; "≥" when the run
  reaches an end of the grid); then the median accuracy at every rate.

    lalr sweep                                  # the default grid, 2 worker processes
    lalr sweep --quick                          # 3 rates, 1 seed, 2 epochs
    lalr sweep --methods MoMo,SGD-M --seeds 5 --out my_sweep
    python -m lightning_adaptive_lr.sweep ...   # the same without the console script

The plot needs matplotlib (installed with the ``cli`` extra); without it the CSV and the table are
still written.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.tasks import DigitsDataModule
from lightning_adaptive_lr.tasks.backbones import build_backbone

#: Relative to the working directory.
DEFAULT_OUT = Path("lr_sensitivity")
CSV_NAME = "runs.csv"
PNG_NAME = "lr_sensitivity.png"
MD_NAME = "lr_sensitivity.md"
#: A rate is in a method's robust range when its median accuracy reaches this share of the best.
ROBUST_FRACTION = 0.97

Params = Iterable[Tensor]


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One optimizer configuration of the benchmark.

    Attributes:
        name: shown in the CSV, the plot and the table.
        make: builds the optimizer from the model's parameters and the learning rate.
        grid: ``(low, high)`` exponents of ten: the default grid spans ``10^low .. 10^high``.
        family: ``"sgd"`` or ``"adam"``: the panel of the plot it is drawn in.
        baseline: a ``torch.optim`` baseline rather than one of the package's methods.
        step_kind: what ``step`` is given: ``"plain"`` nothing, ``"loss"`` the mini-batch loss,
            ``"probe"`` the loss and QLAB's probe.
    """

    name: str
    make: Callable[[Params, float], torch.optim.Optimizer]
    grid: tuple[float, float]
    family: str
    baseline: bool = False
    step_kind: str = "loss"


METHODS: tuple[Method, ...] = (
    Method("MoMo", lambda p, lr: lalr.MoMo(p, lr=lr), (-3, 3), "sgd"),
    Method("QLAB-sgd", lambda p, lr: lalr.QLAB(p, base="sgd", lr=lr), (-4, 2), "sgd", step_kind="probe"),
    Method(
        "HierarchicalHD-sgdn",
        lambda p, lr: lalr.HierarchicalHD(p, base="sgdn", lr=lr, levels=("global", "layer")),
        (-4, 2),
        "sgd",
    ),
    Method(
        "HD-sgdn-global",
        lambda p, lr: lalr.HierarchicalHD(p, base="sgdn", lr=lr, levels=("global",)),
        (-4, 2),
        "sgd",
    ),
    Method("StepTunedSGD", lambda p, lr: lalr.StepTunedSGD(p, lr=lr), (-3, 3), "sgd"),
    Method("MoMoAdam", lambda p, lr: lalr.MoMoAdam(p, lr=lr), (-4, 2), "adam"),
    Method("QLAB-adam", lambda p, lr: lalr.QLAB(p, base="adam", lr=lr), (-5, 1), "adam", step_kind="probe"),
    Method("AdaL", lambda p, lr: lalr.AdaL(p, lr=lr), (-5, 1), "adam"),
    Method(
        "SGD-M damp=0.9",
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, dampening=0.9),
        (-3, 3),
        "sgd",
        baseline=True,
        step_kind="plain",
    ),
    Method(
        "SGD-M", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), (-4, 2), "sgd", baseline=True, step_kind="plain"
    ),
    Method("Adam", lambda p, lr: torch.optim.Adam(p, lr=lr), (-5, 1), "adam", baseline=True, step_kind="plain"),
)
METHOD_BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}


def grid(method: Method, points: int) -> list[float]:
    """``points`` rates spaced evenly in log scale over the method's grid (13 points: half decades)."""
    low, high = method.grid
    if points == 1:
        return [10.0 ** ((low + high) / 2)]
    return [10.0 ** (low + (high - low) * i / (points - 1)) for i in range(points)]


# --------------------------------------------------------------------------- one training run


@dataclass(frozen=True)
class Digits:
    """The digits splits as tensors (flattened, standardized)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@cache
def digits() -> Digits:
    """The package's digits split (``DigitsDataModule``, seed 0), loaded once per process."""
    data = DigitsDataModule(flatten=True)
    data.setup()
    x_train, y_train = data.train_set.tensors  # type: ignore[union-attr]
    x_test, y_test = data.test_set.tensors  # type: ignore[union-attr]
    return Digits(x_train, y_train, x_test, y_test)


@dataclass(frozen=True)
class RunResult:
    """What one training run gives: the measurements of one CSV row."""

    test_acc: float
    train_loss: float
    first_epoch_loss: float
    diverged: bool
    seconds: float


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of correct predictions; a row of logits that is not finite counts as wrong."""
    correct = (logits.argmax(dim=1) == labels) & torch.isfinite(logits).all(dim=1)
    return correct.float().mean().item()


def train_run(method_name: str, lr: float, seed: int, epochs: int, batch_size: int) -> RunResult:
    """Train the digits MLP with one method at one rate and seed; measure it at the end."""
    method = METHOD_BY_NAME[method_name]
    data = digits()
    torch.manual_seed(seed)
    model = build_backbone("mlp", (data.x_train.shape[1],), 10, hidden_sizes=(100, 100))
    optimizer = method.make(model.parameters(), lr)
    order = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    with torch.no_grad():
        initial_loss = F.cross_entropy(model(data.x_train), data.y_train).item()

    start = time.perf_counter()
    diverged = False
    first_epoch_loss = math.nan
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=order).split(batch_size):
            xb, yb = data.x_train[idx], data.y_train[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            if not math.isfinite(loss.item()):
                diverged = True
                break
            loss.backward()
            _step(optimizer, method.step_kind, loss.detach(), model, xb, yb)
        if diverged:
            break
        if epoch == 0:  # how fast it starts (AdaL's claim): one forward pass, negligible
            with torch.no_grad():
                first_epoch_loss = F.cross_entropy(model(data.x_train), data.y_train).item()
    seconds = time.perf_counter() - start

    with torch.no_grad():
        train_loss = F.cross_entropy(model(data.x_train), data.y_train).item()
        test_acc = _accuracy(model(data.x_test), data.y_test)
    diverged = diverged or not math.isfinite(train_loss) or train_loss > initial_loss
    return RunResult(test_acc, train_loss, first_epoch_loss, diverged, seconds)


def _step(optimizer: torch.optim.Optimizer, kind: str, loss: Tensor, model: nn.Module, xb: Tensor, yb: Tensor) -> None:
    if kind == "plain":
        optimizer.step()
    elif kind == "loss":
        optimizer.step(loss=loss)  # type: ignore[call-arg]
    else:  # QLAB: the same mini-batch's loss at the trial point (no dropout or BatchNorm here)
        optimizer.step(loss=loss, probe=lambda: F.cross_entropy(model(xb), yb))  # type: ignore[call-arg]


# --------------------------------------------------------------------------- the CSV


FIELDS = (
    "method",
    "baseline",
    "lr",
    "seed",
    "epochs",
    "batch_size",
    "test_acc",
    "train_loss",
    "first_epoch_loss",
    "diverged",
    "seconds",
)


@dataclass(frozen=True)
class Row:
    """One CSV row."""

    method: str
    baseline: bool
    lr: float
    seed: int
    epochs: int
    batch_size: int
    test_acc: float
    train_loss: float
    first_epoch_loss: float
    diverged: bool
    seconds: float

    def key(self) -> tuple[str, float, int, int, int]:
        return run_key(self.method, self.lr, self.seed, self.epochs, self.batch_size)


def run_key(method: str, lr: float, seed: int, epochs: int, batch_size: int) -> tuple[str, float, int, int, int]:
    """Identifies a run; the rate is compared on its decimal exponent, rounded, so that a rate read
    back from the CSV matches the grid's even if it went through a different float formatting."""
    return (method, round(math.log10(lr), 6), seed, epochs, batch_size)


def read_rows(path: Path) -> list[Row]:
    """The rows of a results CSV (none if it does not exist).  A line that cannot be parsed (the
    last one, cut short when a run was interrupted while writing) is ignored."""
    if not path.exists():
        return []
    rows = []
    with path.open(newline="") as file:
        for record in csv.DictReader(file):
            try:
                rows.append(
                    Row(
                        method=record["method"],
                        baseline=record["baseline"] == "True",
                        lr=float(record["lr"]),
                        seed=int(record["seed"]),
                        epochs=int(record["epochs"]),
                        batch_size=int(record["batch_size"]),
                        test_acc=float(record["test_acc"]),
                        train_loss=float(record["train_loss"]),
                        first_epoch_loss=float(record["first_epoch_loss"]),
                        diverged=record["diverged"] == "True",
                        seconds=float(record["seconds"]),
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue
    return rows


class CsvAppender:
    """Appends rows to the results CSV, writing the header when the file is new, and flushing after
    each row so that an interruption loses at most the run in progress."""

    def __init__(self, path: Path) -> None:
        new = not path.exists() or path.stat().st_size == 0
        if not new and not path.read_text().endswith("\n"):
            with path.open("a") as file:  # a line cut short by an interruption: end it
                file.write("\n")
        self._file = path.open("a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(FIELDS)
            self._file.flush()

    def write(self, row: Row) -> None:
        self._writer.writerow([repr(getattr(row, name)) if name == "lr" else getattr(row, name) for name in FIELDS])
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# --------------------------------------------------------------------------- running the grid


@dataclass(frozen=True)
class Job:
    """One run to do."""

    method: str
    lr: float
    seed: int
    epochs: int
    batch_size: int


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker: the parallelism is across runs
    warnings.filterwarnings("ignore")
    digits()


def _run_job(job: Job) -> tuple[Job, RunResult]:
    return job, train_run(job.method, job.lr, job.seed, job.epochs, job.batch_size)


def _to_row(job: Job, result: RunResult) -> Row:
    return Row(
        method=job.method,
        baseline=METHOD_BY_NAME[job.method].baseline,
        lr=job.lr,
        seed=job.seed,
        epochs=job.epochs,
        batch_size=job.batch_size,
        test_acc=result.test_acc,
        train_loss=result.train_loss,
        first_epoch_loss=result.first_epoch_loss,
        diverged=result.diverged,
        seconds=result.seconds,
    )


def _results(jobs: list[Job], workers: int) -> Iterator[tuple[Job, RunResult]]:
    if workers <= 1:
        # In this process, through the module-level name (tests count runs by replacing it).
        module = sys.modules[__name__]
        torch.set_num_threads(1)
        for job in jobs:
            yield job, module.train_run(job.method, job.lr, job.seed, job.epochs, job.batch_size)
        return
    # "spawn": fresh interpreters, safe with torch's thread pools (fork after torch use may hang).
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def run_grid(
    methods: Sequence[Method], points: int, seeds: int, epochs: int, batch_size: int, out: Path, jobs: int
) -> tuple[list[Row], int]:
    """Run every (method, rate, seed) not yet in ``out/runs.csv``.

    Returns:
        This configuration's rows (old and new) and the number of runs done by this call.
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    path = out / CSV_NAME
    done = {row.key() for row in read_rows(path)}
    wanted = [
        Job(m.name, lr, seed, epochs, batch_size) for m in methods for lr in grid(m, points) for seed in range(seeds)
    ]
    todo = [job for job in wanted if run_key(job.method, job.lr, job.seed, epochs, batch_size) not in done]
    if len(todo) < len(wanted):
        print(f"resuming: {len(wanted) - len(todo)} of {len(wanted)} runs already in {path}")
    appender = CsvAppender(path)
    try:
        with tqdm(total=len(todo), desc="lr sensitivity", unit="run", disable=not todo) as bar:
            for job, result in _results(todo, min(jobs, len(todo))):
                appender.write(_to_row(job, result))
                bar.set_postfix_str(f"{job.method} lr={job.lr:.3g}", refresh=False)
                bar.update()
    finally:
        appender.close()
    keys = {run_key(j.method, j.lr, j.seed, j.epochs, j.batch_size) for j in wanted}
    return [row for row in read_rows(path) if row.key() in keys], len(todo)


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class RobustRange:
    """The contiguous run of grid rates around the best one that reach ``fraction`` of its accuracy.

    Attributes:
        decades: ``log10(high / low)``; 0 when only the best rate qualifies.
        low, high: the run's end rates.
        open_low, open_high: the run reaches the low / high end of the grid, so the true range may
            be wider than measured.
    """

    decades: float
    low: float
    high: float
    open_low: bool
    open_high: bool


def robust_range(lrs: Sequence[float], accs: Sequence[float], fraction: float = ROBUST_FRACTION) -> RobustRange:
    """Robust range of one method from its grid rates and their (median) accuracies.

    The best rate is the one with the highest accuracy (the smallest such rate on ties); the range
    grows from it to each side while the neighbouring grid rate reaches ``fraction·best``.
    """
    if len(lrs) != len(accs) or not lrs:
        raise ValueError("robust_range needs as many accuracies as rates, and at least one")
    order = sorted(range(len(lrs)), key=lambda i: lrs[i])
    rates = [lrs[i] for i in order]
    values = [accs[i] for i in order]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    threshold = fraction * values[best]
    lo = hi = best
    while lo > 0 and values[lo - 1] >= threshold:
        lo -= 1
    while hi < len(values) - 1 and values[hi + 1] >= threshold:
        hi += 1
    return RobustRange(
        decades=math.log10(rates[hi] / rates[lo]),
        low=rates[lo],
        high=rates[hi],
        open_low=lo == 0,
        open_high=hi == len(values) - 1,
    )


@dataclass(frozen=True)
class Curve:
    """One method's results per grid rate (rates ascending), over seeds."""

    method: Method
    lrs: list[float]
    median: list[float]
    low: list[float]
    high: list[float]
    train_loss: list[float]
    first_epoch_loss: list[float]
    diverged: list[int]
    seeds: list[int]


def curves(rows: Sequence[Row], methods: Sequence[Method]) -> list[Curve]:
    """Group the rows by method and rate: median, min and max test accuracy over seeds."""
    result = []
    for method in methods:
        by_lr: dict[float, list[Row]] = {}
        for row in rows:
            if row.method == method.name:
                by_lr.setdefault(round(math.log10(row.lr), 6), []).append(row)
        if not by_lr:
            continue
        exponents = sorted(by_lr)
        groups = [by_lr[e] for e in exponents]
        result.append(
            Curve(
                method=method,
                lrs=[g[0].lr for g in groups],
                median=[statistics.median(r.test_acc for r in g) for g in groups],
                low=[min(r.test_acc for r in g) for g in groups],
                high=[max(r.test_acc for r in g) for g in groups],
                train_loss=[statistics.median(r.train_loss for r in g) for g in groups],
                first_epoch_loss=[statistics.median(r.first_epoch_loss for r in g) for g in groups],
                diverged=[sum(r.diverged for r in g) for g in groups],
                seeds=[len(g) for g in groups],
            )
        )
    return result


def _lr_label(lr: float) -> str:
    """``1e-3``, ``3e-3`` (for 10^-2.5), ``0.1`` stays ``1e-1``: short labels for the tables."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def markdown(found: Sequence[Curve], title: str) -> str:
    """The summary table and the per-rate table of median accuracies."""
    lines = [
        title,
        "",
        (
            "| method | lr grid | best test acc (median [min, max]) | at lr | train loss there: epoch 1, final "
            f"| robust range (≥ {ROBUST_FRACTION:.0%} of best) | rates in it | first lr with a diverged seed |"
        ),
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for c in found:
        r = robust_range(c.lrs, c.median)
        best = max(range(len(c.lrs)), key=lambda i: (c.median[i], -i))
        name = f"{c.method.name} (baseline)" if c.method.baseline else f"**{c.method.name}**"
        bound = "≥ " if r.open_low or r.open_high else ""
        first_div = next((_lr_label(lr) for lr, d in zip(c.lrs, c.diverged) if d), "none")
        lines.append(
            f"| {name} | {_lr_label(c.lrs[0])} .. {_lr_label(c.lrs[-1])} "
            f"| {c.median[best]:.3f} [{c.low[best]:.3f}, {c.high[best]:.3f}] | {_lr_label(c.lrs[best])} "
            f"| {c.first_epoch_loss[best]:.3g}, {c.train_loss[best]:.3g} | {bound}{r.decades:.1f} decades "
            f"| {_lr_label(r.low)} .. {_lr_label(r.high)} | {first_div} |"
        )
    exponents = sorted({round(math.log10(lr), 6) for c in found for lr in c.lrs})
    lines += [
        "",
        (
            "Median test accuracy over seeds at each learning rate (blank: not on the method's grid; "
            "† some seed diverged):"
        ),
        "",
        "| method | " + " | ".join(_lr_label(10.0**e) for e in exponents) + " |",
        "|---|" + "---:|" * len(exponents),
    ]
    for c in found:
        at = {round(math.log10(lr), 6): (m, d) for lr, m, d in zip(c.lrs, c.median, c.diverged)}
        cells = [f"{at[e][0]:.3f}{'†' if at[e][1] else ''}" if e in at else "" for e in exponents]
        lines.append(f"| {c.method.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(found: Sequence[Curve], path: Path, title: str) -> None:
    """Final test accuracy vs learning rate: SGD-type methods left, Adam-type right; the bottom row
    repeats the top one zoomed on accuracies from 0.9 up, where the methods differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One fixed colour and marker per method (so a method looks the same in every figure), black and
    # grey dashes for the baselines.
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # grey is for baselines
    ours = [m for m in METHODS if not m.baseline]
    style: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(ours):
        marker = "osD^vP*Xh"[i % 9]
        style[m.name] = {"color": palette[i % len(palette)], "linestyle": "-", "marker": marker, "markersize": 4.5}
    for m in METHODS:
        if m.baseline:
            style[m.name] = {"color": "black", "linestyle": "--", "marker": None}
    style["SGD-M"] = {"color": "0.45", "linestyle": ":", "marker": None}  # the second baseline of its panel

    families = [("sgd", "SGD-type methods"), ("adam", "Adam-type methods")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), sharex="col", gridspec_kw={"height_ratios": (1, 1)})
    for col, (family, label) in enumerate(families):
        own = [c for c in found if c.method.family == family]
        for row, (low, high) in enumerate(((0.0, 1.0), (0.9, 0.99))):
            ax = axes[row, col]
            for c in own:
                st = style[c.method.name]
                name = c.method.name + (" (baseline)" if c.method.baseline else "")
                ax.plot(c.lrs, c.median, label=name, linewidth=1.8, **st)
                ax.fill_between(c.lrs, c.low, c.high, color=st["color"], alpha=0.12, linewidth=0)
                bad = [(lr, m) for lr, m, d in zip(c.lrs, c.median, c.diverged) if d]
                if bad and row == 0:
                    ax.scatter(*zip(*bad), marker="x", s=28, color=st["color"], zorder=3)
            ax.set_xscale("log")
            ax.set_ylim(low, high)
            ax.grid(True, which="major", alpha=0.3)
            if row == 0:
                ax.set_title(label)
            else:
                ax.set_xlabel("learning rate (the optimizer's lr argument)")
        handles, labels = axes[0, col].get_legend_handles_labels()
        axes[1, col].legend(
            handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9, frameon=False
        )
    axes[0, 0].set_ylabel("final test accuracy")
    axes[1, 0].set_ylabel("final test accuracy (zoom)")
    fig.suptitle(f"{title}\nlines: median over seeds; bands: min to max; x: some seed diverged", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None, prog: str = "lalr sweep") -> None:
    """Run the sweep from command-line arguments (``lalr sweep --help`` lists them)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version: 3 rates, 1 seed, 2 epochs")
    parser.add_argument("--points", type=int, default=None, help="rates per method (default 13; quick 3)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per rate (default 5; quick 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10; quick 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1: in this process)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)

    points = args.points or (3 if args.quick else 13)
    seeds = args.seeds or (1 if args.quick else 5)
    epochs = args.epochs or (2 if args.quick else 10)
    if points < 1 or seeds < 1 or epochs < 1 or args.batch_size < 1 or args.jobs < 1:
        parser.error("--points, --seeds, --epochs, --batch-size and --jobs must be at least 1")
    if args.methods is None:
        methods = list(METHODS)
    else:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if n not in METHOD_BY_NAME]
        if unknown:
            parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_BY_NAME)}")
        methods = [METHOD_BY_NAME[n] for n in names]

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    rows, ran = run_grid(methods, points, seeds, epochs, args.batch_size, args.out, args.jobs)
    wall = time.perf_counter() - start
    found = curves(rows, methods)
    n_test = len(digits().y_test)
    title = (
        f"Digits MLP 64-100-100-10, batch {args.batch_size}, {epochs} epochs, constant lr, "
        f"{seeds} seed{'s' if seeds > 1 else ''}, {points} rates per method; "
        f"final test accuracy on the {n_test} held-out images"
    )
    jobs = f"{args.jobs} worker process{'es' if args.jobs > 1 else ''}"
    if ran:
        done_now = f"the last invocation trained {ran} of them in {wall:.0f} s wall time with {jobs}"
    else:
        done_now = f"all of them read back from an earlier invocation's `{CSV_NAME}`"
    header = f"""# Learning-rate sensitivity

{title}.  Written by `lalr sweep` (grids, task and definitions: `lalr sweep --help` and the
docstring of `lightning_adaptive_lr/sweep.py`): {len(rows)} runs, {sum(r.seconds for r in rows):.0f} s of training summed over runs;
{done_now} ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}).

*Robust range*: the width, in decades, of the contiguous run of grid rates around the best one
whose median accuracy is at least {ROBUST_FRACTION:.0%} of the best ("≥": the run reaches an end of
the grid).  A run *diverged* when a mini-batch loss was not finite or the final training loss was
above the initial one.  One test image is {1 / n_test:.2%} of accuracy.

![final test accuracy vs learning rate]({PNG_NAME})
"""
    text = markdown(found, header.rstrip())
    (args.out / MD_NAME).write_text(text)
    written = [args.out / CSV_NAME, args.out / MD_NAME]
    try:
        plot(found, args.out / PNG_NAME, title)
        written.append(args.out / PNG_NAME)
    except ImportError:
        print(f"the plot {PNG_NAME} needs matplotlib (pip install matplotlib); the CSV and the table are written",
              file=sys.stderr)
    print(text)
    print(f"wall time {wall:.1f} s for {ran} runs ({jobs}); wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    main(prog="python -m lightning_adaptive_lr.sweep")
