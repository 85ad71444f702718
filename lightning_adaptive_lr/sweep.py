"""Learning-rate sensitivity: the final score of each method over a log grid of learning rates.

Tasks (``--task``; each trains in a plain PyTorch loop with the data held as tensors, float32):

==============  =================================================================================
``mlp``         (default) the ``mlp`` backbone 64-100-100-10 (ReLU: MoMo's MNIST MLP) on
                scikit-learn's 8×8 digits split by :class:`~lightning_adaptive_lr.tasks.DigitsDataModule`
                (seed 0: 1258 training, 180 validation, 359 test images, flattened, standardized),
                batch 32, 10 epochs (400 steps); score: final test accuracy.
``cnn``         the ``small_cnn`` backbone with BatchNorm (conv3-BN-ReLU ×2, pool, ×2 blocks of 16
                and 32 channels, dense 256, no dropout) on the same digits as 1×8×8 images with
                random shifts of up to one pixel (zero background), batch 32, 10 epochs (400
                steps); score: final test accuracy.
``lm``          a causal character-level Transformer
                (:class:`~lightning_adaptive_lr.tasks.language.CharTransformer`: 2 layers, width
                64, 4 heads, context 64) on the docstrings of the running Python's standard library
                (read with ``ast``, split by file), batch 16, 4 epochs of 100 steps (400 steps);
                score: final validation loss in nats per character (256 evenly spaced windows of the
                held-out files, 16384 characters), lower is better.
``lm-comments`` the same network on the standard library's ``#`` comments: the second LM setting.
==============  =================================================================================

A seed fixes the initial weights and the order of the mini-batches (and the shifts), so for one
seed every method and every rate starts from the same network and sees the same batches.

**Methods.**  The default MLP sweep trains the package's methods and the ``torch.optim`` baselines
over 13 rates each, half a decade apart over six decades placed around each method's usual scale
(the half-decade lattice ``10^(k/2)`` is shared by all grids, so the per-rate table lines up), 5
seeds per rate:

=====================================  ==============  =========================================
method                                 lr grid (mlp)   what ``lr`` is
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

The ``cnn``, ``lm`` and ``lm-comments`` sweeps train MoMo, MoMo-Adam, QLAB-adam, SGD-M with
dampening 0.9, Adam, and the competitors over 9 rates (half decades over four decades), 2 seeds
per rate: AdamW (torch, weight decay 0.01), and the methods users pick today to avoid tuning the
rate — Prodigy (``prodigyopt``), Schedule-Free AdamW (``schedulefree``) and D-Adaptation Adam
(``dadaptation``) — installed with the optional extra ``pip install "lightning-adaptive-lr[bench]"``.
Without a package the sweep prints which rows it skipped and why.  The two LM tasks also train, by
default, ``MoMo lb=None`` and ``MoMoAdam lb=None`` (aliases ``MoMo-lbNone``, ``MoMo-Adam-lbNone``):
the same optimizers with the lower bound that follows the losses (``lb=None``, docs/algorithms.md
§1.4) instead of the constructor's ``lb=0``; on ``mlp`` and ``cnn`` they run when asked for with
``--methods``.  Grids: MoMo (both), SGD-M damp=0.9, Prodigy and D-Adapt-Adam ``1e-2 .. 1e2`` (for
the last two ``lr`` multiplies the estimated rate, default 1); MoMo-Adam (both), QLAB-adam, Adam,
AdamW and Schedule-Free AdamW ``1e-4 .. 1``.  Any method runs on any task with ``--methods`` (its
grid on a task that does not list it: the MLP's).

Schedule-Free AdamW is switched as its authors ask: ``optimizer.train()`` before training steps,
``optimizer.eval()`` before every evaluation, and on networks with BatchNorm the running statistics
are recomputed with the evaluation weights (training mode, forward passes over the training split
without augmentation, cumulative averages) before evaluating, then restored.  QLAB's probe (its
extra loss on the same mini-batch) runs in training mode with BatchNorm's running statistics saved
and restored around it.

**Schedules** (``--schedule``): ``constant`` (default), or ``warmup-cosine``: linear warm-up over the
first 10 % of the steps then cosine decay to 0, through ``torch.optim.lr_scheduler.LambdaLR`` on
``lr``, identical for every method (for MoMo and MoMo-Adam it schedules the cap; for QLAB the trial
rate; for Prodigy and D-Adaptation the multiplier).

Every optimizer keeps its defaults otherwise.  A run is *diverged* when a mini-batch loss is not
finite (training stops there), when one of the package's optimizers stops the run because it keeps
skipping steps with non-finite gradients (``max_consecutive_skips``; training stops there too), or
when the final training loss is above the loss at initialization (no progress at all).  Predictions from non-finite logits count as wrong; a non-finite validation
loss is recorded as ``inf``.

Outputs, in ``--out`` (default ``./lr_sensitivity/`` for the MLP, ``./lr_sensitivity_<task>/`` for
the others, ``_warmup-cosine`` appended for that schedule; git-ignored in a checkout;
``python -m benchmarks.lr_sensitivity`` in a checkout writes under ``benchmarks/results/``):

* ``runs.csv``: one row per (task, schedule, method, lr, seed): the score (test accuracy or
  validation nats/char), final training loss, training loss after the first epoch (how fast a
  method starts), diverged flag, seconds of training.  Rows are appended as runs finish, and runs
  already in the file (same task, schedule, method, lr, seed, epochs, batch size and steps) are
  skipped, so an interrupted sweep resumes where it stopped.
* ``lr_sensitivity.png``: the score vs learning rate (log x), the median over seeds with a min-max
  band; SGD-type methods on the left, Adam-type on the right, baselines dashed, a cross where some
  seed diverged; the bottom row zooms on the good scores.
* ``lr_sensitivity.md``: per method the best median score and its rate, and the *robust range*: the
  width in decades of the contiguous run of grid rates, around the best one, whose median score is
  good enough — accuracy at least 97 % of the best (``mlp``), within 0.5 % of the best (``cnn``, as
  ``0.995·best``), validation loss within 0.05 nats of the best (``lm``) — (0 when only the best
  rate qualifies; "≥" when the run reaches an end of the grid); the number of diverged runs; the
  median training time per step relative to Adam's in the same sweep; then the median score at
  every rate.

    lalr sweep                                  # the digits MLP, 2 worker processes
    lalr sweep --task lm                        # the language model (about 15 minutes on 2 cores)
    lalr sweep --task cnn --schedule warmup-cosine
    lalr sweep --quick                          # 3 rates, 1 seed, 2 epochs (LM: 1 epoch)
    lalr sweep --methods MoMo,SGD-M-damp --seeds 5 --out my_sweep
    python -m lightning_adaptive_lr.sweep ...   # the same without the console script

The plot needs matplotlib (installed with the ``cli`` extra); without it the CSV and the table are
still written.

Example (one run of the language-model task, 20 steps):
    >>> from lightning_adaptive_lr import sweep
    >>> result = sweep.train_run("Adam", 3e-3, seed=0, epochs=1, batch_size=8, task="lm", steps_per_epoch=20)
    >>> 2.5 < result.score < 4.6  # nats per character: below ln 97 = 4.57 (the start) after 20 steps
    True
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import math
import os
import platform
import statistics
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
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

#: Relative to the working directory: the MLP's folder; other tasks and schedules add a suffix.
DEFAULT_OUT = Path("lr_sensitivity")
CSV_NAME = "runs.csv"
PNG_NAME = "lr_sensitivity.png"
MD_NAME = "lr_sensitivity.md"
#: A rate is in the MLP's robust range when its median accuracy reaches this share of the best.
ROBUST_FRACTION = 0.97
#: What ``pip install`` brings the competitors in.
BENCH_EXTRA = "pip install 'lightning-adaptive-lr[bench]'"
SCHEDULES = ("constant", "warmup-cosine")
#: Share of the steps spent warming up in the ``warmup-cosine`` schedule.
WARMUP_FRACTION = 0.1

Params = Iterable[Tensor]


# --------------------------------------------------------------------------- methods


def _optional(module: str) -> Any:
    """Import an optional package (a competitor) when a run needs it."""
    return importlib.import_module(module)


@dataclass(frozen=True)
class Method:
    """One optimizer configuration of the benchmark.

    Attributes:
        name: shown in the CSV, the plot and the table.
        make: builds the optimizer from the model's parameters and the learning rate.
        grid: ``(low, high)`` exponents of ten: the MLP's grid spans ``10^low .. 10^high`` (the
            other tasks give their own in :attr:`Task.grids`).
        family: ``"sgd"`` or ``"adam"``: the panel of the plot it is drawn in.
        baseline: not one of the package's methods (a ``torch.optim`` baseline or a competitor).
        step_kind: what ``step`` is given: ``"plain"`` nothing, ``"loss"`` the mini-batch loss,
            ``"probe"`` the loss and QLAB's probe.
        requires: the optional package the method needs (``None``: always available).
        schedule_free: switch ``optimizer.train()`` / ``optimizer.eval()`` around evaluations and
            recompute BatchNorm statistics with the evaluation weights (Schedule-Free).
        aliases: other names ``--methods`` accepts (free of characters a shell would interpret).

    Example:
        >>> m = Method("SGD", lambda p, lr: torch.optim.SGD(p, lr=lr), (-3, 1), "sgd", baseline=True, step_kind="plain")
        >>> grid(m, 5)
        [0.001, 0.01, 0.1, 1.0, 10.0]
    """

    name: str
    make: Callable[[Params, float], torch.optim.Optimizer]
    grid: tuple[float, float]
    family: str
    baseline: bool = False
    step_kind: str = "loss"
    requires: str | None = None
    schedule_free: bool = False
    aliases: tuple[str, ...] = ()


def _prodigy(p: Params, lr: float) -> torch.optim.Optimizer:
    return _optional("prodigyopt").Prodigy(p, lr=lr)


def _schedule_free_adamw(p: Params, lr: float) -> torch.optim.Optimizer:
    return _optional("schedulefree").AdamWScheduleFree(p, lr=lr)


def _dadapt_adam(p: Params, lr: float) -> torch.optim.Optimizer:
    return _optional("dadaptation").DAdaptAdam(p, lr=lr)


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
    Method("MoMoAdam", lambda p, lr: lalr.MoMoAdam(p, lr=lr), (-4, 2), "adam", aliases=("MoMo-Adam",)),
    Method("QLAB-adam", lambda p, lr: lalr.QLAB(p, base="adam", lr=lr), (-5, 1), "adam", step_kind="probe"),
    Method("AdaL", lambda p, lr: lalr.AdaL(p, lr=lr), (-5, 1), "adam"),
    Method(
        "SGD-M damp=0.9",
        lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, dampening=0.9),
        (-3, 3),
        "sgd",
        baseline=True,
        step_kind="plain",
        aliases=("SGD-M-damp",),
    ),
    Method(
        "SGD-M", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), (-4, 2), "sgd", baseline=True, step_kind="plain"
    ),
    Method("Adam", lambda p, lr: torch.optim.Adam(p, lr=lr), (-5, 1), "adam", baseline=True, step_kind="plain"),
    # Competitors: torch's AdamW, and the learning-rate-free methods (the optional extra `bench`).
    Method("AdamW", lambda p, lr: torch.optim.AdamW(p, lr=lr), (-5, 1), "adam", baseline=True, step_kind="plain"),
    Method("Prodigy", _prodigy, (-3, 3), "adam", baseline=True, step_kind="plain", requires="prodigyopt"),
    Method(
        "ScheduleFree-AdamW",
        _schedule_free_adamw,
        (-5, 1),
        "adam",
        baseline=True,
        step_kind="plain",
        requires="schedulefree",
        schedule_free=True,
        aliases=("SF-AdamW",),
    ),
    Method(
        "DAdapt-Adam", _dadapt_adam, (-3, 3), "adam", baseline=True, step_kind="plain", requires="dadaptation"
    ),
    # MoMo and MoMo-Adam with the lower bound that follows the losses (docs/algorithms.md §1.4).
    Method("MoMo lb=None", lambda p, lr: lalr.MoMo(p, lr=lr, lb=None), (-3, 3), "sgd", aliases=("MoMo-lbNone",)),
    Method(
        "MoMoAdam lb=None",
        lambda p, lr: lalr.MoMoAdam(p, lr=lr, lb=None),
        (-4, 2),
        "adam",
        aliases=("MoMo-Adam-lbNone", "MoMoAdam-lbNone"),
    ),
)
METHOD_BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
#: The sweep's original eleven: the MLP's default rows.
MLP_METHODS = tuple(m.name for m in METHODS[:11])
COMPETITORS = ("AdamW", "Prodigy", "ScheduleFree-AdamW", "DAdapt-Adam")
#: The variants of MoMo and MoMo-Adam whose lower bound follows the losses (``lb=None``).
LB_NONE = ("MoMo lb=None", "MoMoAdam lb=None")


def resolve_method(name: str) -> Method | None:
    """The method called ``name`` or one of its aliases (``None`` if there is none)."""
    if name in METHOD_BY_NAME:
        return METHOD_BY_NAME[name]
    return next((m for m in METHOD_BY_NAME.values() if name in m.aliases), None)


def missing_requirement(method: Method) -> str | None:
    """Why ``method`` cannot run here (its optional package does not import), or ``None``."""
    if method.requires is None:
        return None
    try:
        _optional(method.requires)
    except ImportError:
        return f"needs the optional package {method.requires} ({BENCH_EXTRA})"
    return None


def grid(method: Method, points: int, span: tuple[float, float] | None = None) -> list[float]:
    """``points`` rates spaced evenly in log scale over ``span`` (default: the method's MLP grid).

    Example:
        >>> grid(METHOD_BY_NAME["Adam"], 3, (-4, 0))
        [0.0001, 0.01, 1.0]
    """
    low, high = method.grid if span is None else span
    if points == 1:
        return [10.0 ** ((low + high) / 2)]
    return [10.0 ** (low + (high - low) * i / (points - 1)) for i in range(points)]


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One training problem of the sweep, with its defaults and what its score means.

    Attributes:
        name: the ``--task`` value.
        title: the network and data, for the table's title.
        score: what the score is (``"test accuracy"``, ``"validation loss (nats/char)"``).
        higher_is_better: accuracy (True) or loss (False).
        robust_fraction: the robust range keeps the rates at or above ``fraction·best`` (accuracy).
        robust_tolerance: the robust range keeps the rates within this much of the best (loss).
        methods: the default rows.
        grids: per-method ``(low, high)`` exponents (a method not listed uses its MLP grid).
        points, seeds, epochs, batch_size: the defaults; ``quick``: ``(points, seeds, epochs)``.
        steps_per_epoch: steps in one epoch where the data has no natural epoch (LM), else None.
        zoom: the y-range of the plot's bottom row (``None``: from the data).
    """

    name: str
    title: str
    score: str
    higher_is_better: bool
    methods: tuple[str, ...]
    grids: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    points: int = 9
    seeds: int = 2
    epochs: int = 10
    batch_size: int = 32
    quick: tuple[int, int, int] = (3, 1, 2)
    steps_per_epoch: int | None = None
    robust_fraction: float | None = None
    robust_tolerance: float | None = None
    zoom: tuple[float, float] | None = None

    def grid_of(self, method: Method) -> tuple[float, float]:
        """The method's ``(low, high)`` exponents on this task."""
        return tuple(self.grids.get(method.name, method.grid))  # type: ignore[return-value]

    def robust_rule(self) -> str:
        """The robust range's criterion in words."""
        if self.robust_tolerance is not None:
            return f"within {self.robust_tolerance:g} of the best"
        return f"≥ {self.robust_fraction:.1%} of the best".replace(".0%", "%")


_CORE = ("MoMo", "MoMoAdam", "QLAB-adam", "SGD-M damp=0.9", "Adam", *COMPETITORS)
#: The LM's default rows: the core ones and MoMo / MoMo-Adam with ``lb=None`` beside their ``lb=0``.
_LM_METHODS = ("MoMo", LB_NONE[0], "MoMoAdam", LB_NONE[1], *_CORE[2:])
#: Four decades, half a decade apart with 9 points, around each method's scale.
_GRIDS_4 = {
    "MoMo": (-2.0, 2.0),
    "MoMo lb=None": (-2.0, 2.0),
    "MoMoAdam lb=None": (-4.0, 0.0),
    "SGD-M damp=0.9": (-2.0, 2.0),
    "Prodigy": (-2.0, 2.0),
    "DAdapt-Adam": (-2.0, 2.0),
    "MoMoAdam": (-4.0, 0.0),
    "QLAB-adam": (-4.0, 0.0),
    "Adam": (-4.0, 0.0),
    "AdamW": (-4.0, 0.0),
    "ScheduleFree-AdamW": (-4.0, 0.0),
    "QLAB-sgd": (-3.0, 1.0),
    "SGD-M": (-3.0, 1.0),
    "HierarchicalHD-sgdn": (-4.0, 0.0),
    "HD-sgdn-global": (-4.0, 0.0),
    "StepTunedSGD": (-2.0, 2.0),
    "AdaL": (-4.0, 0.0),
}
_LM_TITLE = "Causal char Transformer (2 layers, d=64, 4 heads, context 64) on the standard library's {}"

def _lm_task(name: str, source: str) -> Task:
    """The character Transformer on one of the standard library's texts (``source``)."""
    return Task(
        name,
        _LM_TITLE.format(source),
        "validation loss (nats/char)",
        False,
        _LM_METHODS,
        _GRIDS_4,
        epochs=4,
        batch_size=16,
        quick=(3, 1, 1),
        steps_per_epoch=100,
        robust_tolerance=0.05,
    )


TASKS: dict[str, Task] = {
    "mlp": Task(
        "mlp",
        "Digits MLP 64-100-100-10",
        "test accuracy",
        True,
        MLP_METHODS,
        points=13,
        seeds=5,
        robust_fraction=ROBUST_FRACTION,
        zoom=(0.9, 0.99),
    ),
    "cnn": Task(
        "cnn",
        "Digits CNN with BatchNorm (small_cnn 16-32, no dropout), random 1-pixel shifts",
        "test accuracy",
        True,
        _CORE,
        _GRIDS_4,
        robust_fraction=0.995,
    ),
    **{name: _lm_task(name, source) for name, source in (("lm", "docstrings"), ("lm-comments", "comments"))},
}


def task_grid(task: Task, method: Method, points: int) -> list[float]:
    """The rates ``method`` is trained at on ``task``."""
    return grid(method, points, task.grid_of(method))


def default_out(task: str, schedule: str) -> Path:
    """``lr_sensitivity`` (the MLP, constant rate), else ``lr_sensitivity_<task>[_<schedule>]``."""
    name = "lr_sensitivity" if task == "mlp" else f"lr_sensitivity_{task}"
    return Path(name if schedule == "constant" else f"{name}_{schedule}")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Digits:
    """The digits splits as tensors (flattened, standardized)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@cache
def digits(flatten: bool = True) -> Digits:
    """The package's digits split (``DigitsDataModule``, seed 0), loaded once per process."""
    data = DigitsDataModule(flatten=flatten)
    data.setup()
    x_train, y_train = data.train_set.tensors  # type: ignore[union-attr]
    x_test, y_test = data.test_set.tensors  # type: ignore[union-attr]
    return Digits(x_train, y_train, x_test, y_test)


@dataclass(frozen=True)
class TextData:
    """The LM task's token streams and its fixed evaluation windows."""

    train: Tensor
    val_inputs: Tensor
    val_targets: Tensor
    train_inputs: Tensor
    train_targets: Tensor
    vocab_size: int


#: The LM network and its evaluation sample.
LM_CONTEXT = 64
LM_SIZE = {"n_layers": 2, "d_model": 64, "n_heads": 4}
LM_EVAL_WINDOWS = 256


#: ``--text``: the LM tasks' corpus replaced by your own text (a folder or a file), by task name.
TEXT_SOURCES: dict[str, str] = {}


def text_source(task: str) -> str:
    """An LM task's text: ``--text`` if given, else the standard library's docstrings or comments."""
    return TEXT_SOURCES.get(task, "comments" if task == "lm-comments" else "docstrings")


@cache
def text_data(task: str) -> TextData:
    """The corpus of an LM task (built once per process, a few seconds)."""
    from lightning_adaptive_lr.tasks.language import build_corpus, evaluation_windows

    corpus = build_corpus(text_source(task))
    val_x, val_y = evaluation_windows(corpus.val, LM_CONTEXT, LM_EVAL_WINDOWS)
    train_x, train_y = evaluation_windows(corpus.train, LM_CONTEXT, LM_EVAL_WINDOWS)
    return TextData(corpus.train, val_x, val_y, train_x, train_y, corpus.vocab_size)


def _load(task: str) -> None:
    """Load a task's data in this process (the workers' start)."""
    if task in ("lm", "lm-comments"):
        text_data(task)
    else:
        digits(task == "mlp")


# --------------------------------------------------------------------------- one training run


@dataclass(frozen=True)
class RunResult:
    """What one training run gives: the measurements of one CSV row.

    ``score`` is the task's score: test accuracy, or validation loss in nats per character.
    """

    score: float
    train_loss: float
    first_epoch_loss: float
    diverged: bool
    seconds: float

    @property
    def test_acc(self) -> float:
        """The score under its earlier name (the MLP's test accuracy)."""
        return self.score


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of correct predictions; a row of logits that is not finite counts as wrong."""
    correct = (logits.argmax(dim=1) == labels) & torch.isfinite(logits).all(dim=1)
    return correct.float().mean().item()


def schedule_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The multiplier of ``lr`` at step ``k`` (0-based) of ``total_steps``.

    ``constant``: 1.  ``warmup-cosine``: ``(k+1)/w`` for the first ``w = ⌈0.1·total⌉`` steps, then
    ``½(1 + cos(π·(k−w)/(total−w)))``, which falls from 1 to 0 over the remaining steps.

    Example:
        >>> f = schedule_factor("warmup-cosine", 20)
        >>> [round(f(k), 3) for k in (0, 1, 2, 11, 19)]
        [0.5, 1.0, 1.0, 0.5, 0.008]
    """
    if schedule == "constant":
        return lambda k: 1.0
    if schedule != "warmup-cosine":
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    warmup = max(1, math.ceil(WARMUP_FRACTION * total_steps))
    decay = max(1, total_steps - warmup)

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(k - warmup, decay) / decay))

    return factor


def _scheduler(optimizer: torch.optim.Optimizer, schedule: str, total_steps: int) -> Any:
    if schedule == "constant":
        return None  # no scheduler at all: the optimizer's own lr, untouched
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(schedule, total_steps))


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def _saved_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Restore BatchNorm's running statistics (and momentum) on exit."""
    saved = [(m, m.momentum, [b.clone() for b in m.buffers()]) for m in _batch_norms(model)]
    try:
        yield
    finally:
        for module, momentum, buffers in saved:
            module.momentum = momentum
            for buffer, value in zip(module.buffers(), buffers):
                buffer.copy_(value)


@contextmanager
def evaluating(
    model: nn.Module, optimizer: torch.optim.Optimizer, method: Method, recalibrate: Sequence[Tensor] = ()
) -> Iterator[None]:
    """Evaluate inside: ``model.eval()`` and ``torch.no_grad()``; for Schedule-Free
    ``optimizer.eval()`` (the averaged weights) and, on a network with BatchNorm, its running
    statistics recomputed with those weights over ``recalibrate`` (training-mode forward passes,
    cumulative averages), as the method's authors ask.  Everything is switched back on exit."""
    switch = method.schedule_free
    norms = _batch_norms(model)
    with torch.no_grad(), _saved_batchnorm_stats(model):
        if switch:
            optimizer.eval()  # type: ignore[attr-defined]
            if norms and recalibrate:
                for m in norms:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over the passes
                model.train()
                for x in recalibrate:
                    model(x)
        model.eval()
        try:
            yield
        finally:
            model.train()
            if switch:
                optimizer.train()  # type: ignore[attr-defined]


def _gave_up(optimizer: torch.optim.Optimizer, error: RuntimeError) -> bool:
    """Whether ``error`` is one of this package's optimizers stopping a run that keeps skipping
    steps (``max_consecutive_skips``): the run diverged.  Any other error is a bug to report."""
    if not isinstance(optimizer, lalr.optim.AdaptiveOptimizer):
        return False
    return any(group.get("skipped_steps", 0) > 0 for group in optimizer.param_groups)


def _step_or_diverge(
    optimizer: torch.optim.Optimizer, kind: str, loss: Tensor, model: nn.Module, probe: Callable[[], Tensor]
) -> bool:
    """One step; ``False`` when the optimizer gave up on the run (it diverged), see :func:`_gave_up`."""
    try:
        _step(optimizer, kind, loss, model, probe)
    except RuntimeError as error:
        if not _gave_up(optimizer, error):
            raise
        return False
    return True


def _step(
    optimizer: torch.optim.Optimizer, kind: str, loss: Tensor, model: nn.Module, probe: Callable[[], Tensor]
) -> None:
    if kind == "plain":
        optimizer.step()
    elif kind == "loss":
        optimizer.step(loss=loss)  # type: ignore[call-arg]
    else:  # QLAB: the same mini-batch's loss at the trial point, BatchNorm statistics untouched

        def restored_probe() -> Tensor:
            with _saved_batchnorm_stats(model):
                return probe()

        optimizer.step(loss=loss, probe=restored_probe)  # type: ignore[call-arg]


def _shift(x: Tensor, generator: torch.Generator, background: float) -> Tensor:
    """Each image moved by up to one pixel in each direction (the vacated border: ``background``)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=background)
    offsets = torch.randint(0, 3, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def train_run(
    method_name: str,
    lr: float,
    seed: int,
    epochs: int,
    batch_size: int,
    task: str = "mlp",
    schedule: str = "constant",
    steps_per_epoch: int | None = None,
) -> RunResult:
    """Train ``task``'s network with one method at one rate and seed; measure it at the end.

    Args:
        method_name: a name of :data:`METHOD_BY_NAME`.
        lr: the method's ``lr``.
        seed: initial weights and batch order.
        epochs: epochs (LM: of ``steps_per_epoch`` steps).
        batch_size: examples (LM: windows) per step.
        task: a key of :data:`TASKS`.
        schedule: ``"constant"`` or ``"warmup-cosine"``.
        steps_per_epoch: the LM's epoch length (default: the task's, 100).
    """
    method = METHOD_BY_NAME[method_name]
    if task in ("lm", "lm-comments"):
        per_epoch = steps_per_epoch or TASKS[task].steps_per_epoch or 100
        return _train_language_model(method, lr, seed, epochs, batch_size, task, schedule, per_epoch)
    if task not in ("mlp", "cnn"):
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return _train_classifier(method, lr, seed, epochs, batch_size, task, schedule)


def _train_classifier(
    method: Method, lr: float, seed: int, epochs: int, batch_size: int, task: str, schedule: str
) -> RunResult:
    """The digits MLP (flat inputs) or the digits CNN (images, random shifts)."""
    cnn = task == "cnn"
    data = digits(not cnn)
    torch.manual_seed(seed)
    if cnn:
        model = build_backbone("small_cnn", (1, 8, 8), 10, channels=(16, 32), dropout=0.0)
    else:
        model = build_backbone("mlp", (data.x_train.shape[1],), 10, hidden_sizes=(100, 100))
    optimizer = method.make(model.parameters(), lr)
    order = torch.Generator().manual_seed(seed)
    shifts = torch.Generator().manual_seed(10_000 + seed)
    background = data.x_train.min().item()  # a blank pixel, standardized
    n = len(data.y_train)
    steps = epochs * math.ceil(n / batch_size)
    scheduler = _scheduler(optimizer, schedule, steps)
    recalibrate = data.x_train.split(batch_size) if cnn else ()

    def full_train_loss() -> float:
        with evaluating(model, optimizer, method, recalibrate):
            return F.cross_entropy(model(data.x_train), data.y_train).item()

    if method.schedule_free:
        optimizer.train()  # type: ignore[attr-defined]
    initial_loss = full_train_loss()
    start = time.perf_counter()
    diverged = False
    first_epoch_loss = math.nan
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=order).split(batch_size):
            xb, yb = data.x_train[idx], data.y_train[idx]
            if cnn:
                xb = _shift(xb, shifts, background)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            if not math.isfinite(loss.item()):
                diverged = True
                break
            loss.backward()
            if not _step_or_diverge(
                optimizer, method.step_kind, loss.detach(), model, lambda x=xb, y=yb: F.cross_entropy(model(x), y)
            ):
                diverged = True
                break
            if scheduler is not None:
                scheduler.step()
        if diverged:
            break
        if epoch == 0:  # how fast it starts (AdaL's claim): one forward pass, negligible
            first_epoch_loss = full_train_loss()
    seconds = time.perf_counter() - start

    train_loss = full_train_loss()
    with evaluating(model, optimizer, method, recalibrate):
        test_acc = _accuracy(model(data.x_test), data.y_test)
    diverged = diverged or not math.isfinite(train_loss) or train_loss > initial_loss
    return RunResult(test_acc, train_loss, first_epoch_loss, diverged, seconds)


def _train_language_model(
    method: Method, lr: float, seed: int, epochs: int, batch_size: int, task: str, schedule: str, per_epoch: int
) -> RunResult:
    """The character Transformer on random windows of the training stream."""
    from lightning_adaptive_lr.tasks.language import (
        CharTransformer,
        nats_per_char,
        random_windows,
    )

    data = text_data(task)
    torch.manual_seed(seed)
    model = CharTransformer(data.vocab_size, LM_CONTEXT, **LM_SIZE)
    optimizer = method.make(model.parameters(), lr)
    order = torch.Generator().manual_seed(seed)
    steps = epochs * per_epoch
    scheduler = _scheduler(optimizer, schedule, steps)

    def loss_on(inputs: Tensor, targets: Tensor) -> float:
        with evaluating(model, optimizer, method):
            value = nats_per_char(model(inputs), targets).item()
        return value if math.isfinite(value) else math.inf

    if method.schedule_free:
        optimizer.train()  # type: ignore[attr-defined]
    initial_loss = loss_on(data.train_inputs, data.train_targets)
    start = time.perf_counter()
    diverged = False
    first_epoch_loss = math.nan
    for step in range(steps):
        xb, yb = random_windows(data.train, batch_size, LM_CONTEXT, order)
        optimizer.zero_grad(set_to_none=True)
        loss = nats_per_char(model(xb), yb)
        if not math.isfinite(loss.item()):
            diverged = True
            break
        loss.backward()
        if not _step_or_diverge(
            optimizer, method.step_kind, loss.detach(), model, lambda x=xb, y=yb: nats_per_char(model(x), y)
        ):
            diverged = True
            break
        if scheduler is not None:
            scheduler.step()
        if step + 1 == per_epoch:
            first_epoch_loss = loss_on(data.train_inputs, data.train_targets)
    seconds = time.perf_counter() - start

    train_loss = loss_on(data.train_inputs, data.train_targets)
    val_loss = loss_on(data.val_inputs, data.val_targets)
    diverged = diverged or not math.isfinite(val_loss) or train_loss > initial_loss
    return RunResult(val_loss, train_loss, first_epoch_loss, diverged, seconds)


def total_steps(task: str, epochs: int, batch_size: int, steps_per_epoch: int | None = None) -> int:
    """Optimizer steps of one run."""
    if task in ("lm", "lm-comments"):
        return epochs * (steps_per_epoch or TASKS[task].steps_per_epoch or 100)
    return epochs * math.ceil(len(digits(task == "mlp").y_train) / batch_size)


# --------------------------------------------------------------------------- the CSV


FIELDS = (
    "task",
    "schedule",
    "method",
    "baseline",
    "lr",
    "seed",
    "epochs",
    "batch_size",
    "steps",
    "score",
    "train_loss",
    "first_epoch_loss",
    "diverged",
    "seconds",
)

Key = tuple[str, str, str, float, int, int, int, int]


@dataclass(frozen=True)
class Row:
    """One CSV row (``score``: the task's score; ``steps``: 0 when not recorded)."""

    method: str
    baseline: bool
    lr: float
    seed: int
    epochs: int
    batch_size: int
    score: float
    train_loss: float
    first_epoch_loss: float
    diverged: bool
    seconds: float
    task: str = "mlp"
    schedule: str = "constant"
    steps: int = 0

    @property
    def test_acc(self) -> float:
        """The score under its earlier name (the MLP's test accuracy)."""
        return self.score

    def key(self) -> Key:
        return run_key(self.method, self.lr, self.seed, self.epochs, self.batch_size, self.task, self.schedule, self.steps)


def run_key(
    method: str,
    lr: float,
    seed: int,
    epochs: int,
    batch_size: int,
    task: str = "mlp",
    schedule: str = "constant",
    steps: int = 0,
) -> Key:
    """Identifies a run; the rate is compared on its decimal exponent, rounded, so that a rate read
    back from the CSV matches the grid's even if it went through a different float formatting."""
    return (task, schedule, method, round(math.log10(lr), 6), seed, epochs, batch_size, steps)


def read_rows(path: Path) -> list[Row]:
    """The rows of a results CSV (none if it does not exist).  A line that cannot be parsed (the
    last one, cut short when a run was interrupted while writing) is ignored.  A CSV of the earlier
    layout (``test_acc``, no task, schedule or steps) reads as the MLP's constant-rate runs."""
    if not path.exists():
        return []
    rows = []
    with path.open(newline="") as file:
        for record in csv.DictReader(file):
            try:
                task = record.get("task") or "mlp"
                epochs, batch_size = int(record["epochs"]), int(record["batch_size"])
                steps = record.get("steps")
                rows.append(
                    Row(
                        method=record["method"],
                        baseline=record["baseline"] == "True",
                        lr=float(record["lr"]),
                        seed=int(record["seed"]),
                        epochs=epochs,
                        batch_size=batch_size,
                        score=float(record["score"] if "score" in record else record["test_acc"]),
                        train_loss=float(record["train_loss"]),
                        first_epoch_loss=float(record["first_epoch_loss"]),
                        diverged=record["diverged"] == "True",
                        seconds=float(record["seconds"]),
                        task=task,
                        schedule=record.get("schedule") or "constant",
                        steps=int(steps) if steps else total_steps(task, epochs, batch_size),
                    )
                )
            except (KeyError, TypeError, ValueError):
                continue
    return rows


class CsvAppender:
    """Appends rows to the results CSV, writing the header when the file is new, and flushing after
    each row so that an interruption loses at most the run in progress.  A CSV of the earlier
    layout is rewritten in the current one first."""

    def __init__(self, path: Path) -> None:
        earlier: list[Row] = []
        if path.exists() and path.stat().st_size:
            with path.open(newline="") as file:
                header = next(csv.reader(file), [])
            if tuple(header) != FIELDS:  # an earlier layout: rewritten with what it holds
                earlier = read_rows(path)
                path.write_text("")
            elif not path.read_text().endswith("\n"):
                with path.open("a") as file:  # a line cut short by an interruption: end it
                    file.write("\n")
        new = not path.exists() or path.stat().st_size == 0
        self._file = path.open("a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(FIELDS)
            for row in earlier:
                self.write(row)
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
    task: str = "mlp"
    schedule: str = "constant"
    steps_per_epoch: int | None = None


def _worker_init(task: str = "mlp", text: str | None = None) -> None:
    torch.set_num_threads(1)  # one core per worker: the parallelism is across runs
    warnings.filterwarnings("ignore")
    if text is not None:
        TEXT_SOURCES[task] = text
    _load(task)


def _call(job: Job) -> RunResult:
    # Through the module-level name (tests count runs by replacing it); the MLP's call keeps
    # its original five arguments.
    module = sys.modules[__name__]
    if job.task == "mlp" and job.schedule == "constant":
        return module.train_run(job.method, job.lr, job.seed, job.epochs, job.batch_size)
    return module.train_run(
        job.method, job.lr, job.seed, job.epochs, job.batch_size, job.task, job.schedule, job.steps_per_epoch
    )


def _run_job(job: Job) -> tuple[Job, RunResult]:
    return job, _call(job)


def _to_row(job: Job, result: RunResult) -> Row:
    return Row(
        method=job.method,
        baseline=METHOD_BY_NAME[job.method].baseline,
        lr=job.lr,
        seed=job.seed,
        epochs=job.epochs,
        batch_size=job.batch_size,
        score=result.score,
        train_loss=result.train_loss,
        first_epoch_loss=result.first_epoch_loss,
        diverged=result.diverged,
        seconds=result.seconds,
        task=job.task,
        schedule=job.schedule,
        steps=total_steps(job.task, job.epochs, job.batch_size, job.steps_per_epoch),
    )


def _results(jobs: list[Job], workers: int) -> Iterator[tuple[Job, RunResult]]:
    if workers <= 1:
        torch.set_num_threads(1)
        for job in jobs:
            yield job, _call(job)
        return
    task = jobs[0].task
    # "spawn": fresh interpreters, safe with torch's thread pools (fork after torch use may hang).
    init = (task, TEXT_SOURCES.get(task))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init, initargs=init) as pool:
        futures = [pool.submit(_run_job, job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def run_grid(
    methods: Sequence[Method],
    points: int,
    seeds: int,
    epochs: int,
    batch_size: int,
    out: Path,
    jobs: int,
    task: str = "mlp",
    schedule: str = "constant",
    steps_per_epoch: int | None = None,
) -> tuple[list[Row], int]:
    """Run every (method, rate, seed) of ``task`` not yet in ``out/runs.csv``.

    Returns:
        This configuration's rows (old and new) and the number of runs done by this call.
    """
    from tqdm import tqdm

    spec = TASKS[task]
    out.mkdir(parents=True, exist_ok=True)
    path = out / CSV_NAME
    steps = total_steps(task, epochs, batch_size, steps_per_epoch)
    done = {row.key() for row in read_rows(path)}
    wanted = [
        Job(m.name, lr, seed, epochs, batch_size, task, schedule, steps_per_epoch)
        for m in methods
        for lr in task_grid(spec, m, points)
        for seed in range(seeds)
    ]

    def key(job: Job) -> Key:
        return run_key(job.method, job.lr, job.seed, epochs, batch_size, task, schedule, steps)

    todo = [job for job in wanted if key(job) not in done]
    if len(todo) < len(wanted):
        print(f"resuming: {len(wanted) - len(todo)} of {len(wanted)} runs already in {path}")
    appender = CsvAppender(path)
    try:
        with tqdm(total=len(todo), desc=f"lr sensitivity ({task})", unit="run", disable=not todo) as bar:
            for job, result in _results(todo, min(jobs, len(todo))):
                appender.write(_to_row(job, result))
                bar.set_postfix_str(f"{job.method} lr={job.lr:.3g}", refresh=False)
                bar.update()
    finally:
        appender.close()
    keys = {key(j) for j in wanted}
    return [row for row in read_rows(path) if row.key() in keys], len(todo)


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class RobustRange:
    """The contiguous run of grid rates around the best one whose score is good enough.

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


def robust_range(
    lrs: Sequence[float],
    scores: Sequence[float],
    fraction: float = ROBUST_FRACTION,
    *,
    higher_is_better: bool = True,
    tolerance: float | None = None,
) -> RobustRange:
    """Robust range of one method from its grid rates and their (median) scores.

    The best rate is the one with the best score (the smallest such rate on ties; a score that is
    not a number is the worst); the range grows from it to each side while the neighbouring grid
    rate's score is good enough: with ``tolerance``, within it of the best (``≤ best + tolerance``
    for a loss, ``≥ best − tolerance`` for an accuracy), else at least ``fraction·best``
    (accuracy) or at most ``best / fraction`` (loss).

    Example:
        >>> robust_range([1e-3, 1e-2, 1e-1], [2.70, 2.62, 2.66], higher_is_better=False, tolerance=0.05).decades
        1.0
    """
    if len(lrs) != len(scores) or not lrs:
        raise ValueError("robust_range needs as many scores as rates, and at least one")
    order = sorted(range(len(lrs)), key=lambda i: lrs[i])
    rates = [lrs[i] for i in order]
    sign = 1.0 if higher_is_better else -1.0
    # Oriented so that larger is better; NaN → -inf (the worst).
    values = [sign * scores[i] if not math.isnan(scores[i]) else -math.inf for i in order]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    if tolerance is not None:
        threshold = values[best] - tolerance
    elif higher_is_better:
        threshold = fraction * values[best]
    else:
        threshold = values[best] / fraction  # values are negated losses: -best/fraction
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


def task_robust_range(task: Task, lrs: Sequence[float], scores: Sequence[float]) -> RobustRange:
    """:func:`robust_range` with ``task``'s criterion."""
    return robust_range(
        lrs,
        scores,
        task.robust_fraction or ROBUST_FRACTION,
        higher_is_better=task.higher_is_better,
        tolerance=task.robust_tolerance,
    )


@dataclass(frozen=True)
class Curve:
    """One method's results per grid rate (rates ascending), over seeds (``median``, ``low`` and
    ``high``: of the score)."""

    method: Method
    lrs: list[float]
    median: list[float]
    low: list[float]
    high: list[float]
    train_loss: list[float]
    first_epoch_loss: list[float]
    diverged: list[int]
    seeds: list[int]
    step_seconds: float = math.nan


def curves(rows: Sequence[Row], methods: Sequence[Method]) -> list[Curve]:
    """Group the rows by method and rate: median, min and max score over seeds."""
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
                median=[statistics.median(r.score for r in g) for g in groups],
                low=[min(r.score for r in g) for g in groups],
                high=[max(r.score for r in g) for g in groups],
                train_loss=[statistics.median(r.train_loss for r in g) for g in groups],
                first_epoch_loss=[statistics.median(r.first_epoch_loss for r in g) for g in groups],
                diverged=[sum(r.diverged for r in g) for g in groups],
                seeds=[len(g) for g in groups],
                step_seconds=statistics.median(r.seconds / max(r.steps, 1) for g in groups for r in g),
            )
        )
    return result


def _lr_label(lr: float) -> str:
    """``1e-3``, ``3e-3`` (for 10^-2.5), ``0.1`` stays ``1e-1``: short labels for the tables."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _best(curve: Curve, higher_is_better: bool) -> int:
    sign = 1.0 if higher_is_better else -1.0
    return max(
        range(len(curve.lrs)),
        key=lambda i: (sign * curve.median[i] if not math.isnan(curve.median[i]) else -math.inf, -i),
    )


def _ratio(value: float, reference: float) -> str:
    """``1.23x``, or ``n/a`` without a reference (no Adam row) or a measurement."""
    if not (math.isfinite(value) and math.isfinite(reference) and reference > 0):
        return "n/a"
    return f"{value / reference:.2f}x"


def markdown(found: Sequence[Curve], title: str, task: Task | None = None) -> str:
    """The summary table and the per-rate table of median scores (``task``: the MLP by default)."""
    task = TASKS["mlp"] if task is None else task
    short = "test acc" if task.higher_is_better else "val loss"
    rule = task.robust_rule()
    lines = [
        title,
        "",
        (
            f"| method | lr grid | best {short} (median [min, max]) | at lr | train loss there: epoch 1, final "
            f"| robust range ({rule}) | rates in it | first lr with a diverged seed | diverged runs | time per step vs Adam |"
        ),
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    adam = next((c.step_seconds for c in found if c.method.name == "Adam"), math.nan)
    for c in found:
        r = task_robust_range(task, c.lrs, c.median)
        best = _best(c, task.higher_is_better)
        name = f"{c.method.name} (baseline)" if c.method.baseline else f"**{c.method.name}**"
        bound = "≥ " if r.open_low or r.open_high else ""
        first_div = next((_lr_label(lr) for lr, d in zip(c.lrs, c.diverged) if d), "none")
        lines.append(
            f"| {name} | {_lr_label(c.lrs[0])} .. {_lr_label(c.lrs[-1])} "
            f"| {c.median[best]:.3f} [{c.low[best]:.3f}, {c.high[best]:.3f}] | {_lr_label(c.lrs[best])} "
            f"| {c.first_epoch_loss[best]:.3g}, {c.train_loss[best]:.3g} | {bound}{r.decades:.1f} decades "
            f"| {_lr_label(r.low)} .. {_lr_label(r.high)} | {first_div} | {sum(c.diverged)} of {sum(c.seeds)} "
            f"| {_ratio(c.step_seconds, adam)} |"
        )
    exponents = sorted({round(math.log10(lr), 6) for c in found for lr in c.lrs})
    lines += [
        "",
        (
            f"Median {task.score} over seeds at each learning rate (blank: not on the method's grid; "
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


def plot(found: Sequence[Curve], path: Path, title: str, task: Task | None = None) -> None:
    """The score vs learning rate: SGD-type methods left, Adam-type right; the bottom row repeats
    the top one zoomed on the good scores, where the methods differ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = TASKS["mlp"] if task is None else task
    # One fixed colour and marker per method (so a method looks the same in every figure), black and
    # grey dashes for the torch baselines, coloured dashes for the competitors.
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
    # Colours none of the package's methods uses (they take tab10's first nine but grey).
    for name, colour in zip(COMPETITORS[1:], ("#17becf", "#e6ab02", "#7570b3")):
        style[name] = {"color": colour, "linestyle": "--", "marker": "x", "markersize": 4}
    style["AdamW"] = {"color": "0.45", "linestyle": ":", "marker": None}
    for name in LB_NONE:  # the lb=None variants: their lb=0 sibling's colour, dash-dotted
        style[name] = {**style[name.removesuffix(" lb=None")], "linestyle": "-."}

    finite = [v for c in found for v in c.median if math.isfinite(v)]
    if task.higher_is_better:
        full = (0.0, 1.0)
        best = max(finite, default=1.0)
        zoom = task.zoom or (max(0.0, best - 0.08), min(1.0, best + 0.01))
    else:
        best = min(finite, default=0.0)
        top = max(finite, default=best + 1.0)
        full = (best - 0.1, min(top + 0.1, best + 2.5))  # diverged runs would flatten the rest
        zoom = task.zoom or (best - 0.02, best + 0.4)
    families = [("sgd", "SGD-type methods"), ("adam", "Adam-type methods")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), sharex="col", gridspec_kw={"height_ratios": (1, 1)})
    for col, (family, label) in enumerate(families):
        own = [c for c in found if c.method.family == family]
        for row, (low, high) in enumerate((full, zoom)):
            ax = axes[row, col]
            for c in own:
                st = style.get(c.method.name, {"color": "C0", "linestyle": "-"})
                name = c.method.name + (" (baseline)" if c.method.baseline else "")
                ax.plot(c.lrs, c.median, label=name, linewidth=1.8, **st)
                ax.fill_between(c.lrs, c.low, c.high, color=st["color"], alpha=0.12, linewidth=0)
                bad = [(lr, min(max(m, low), high)) for lr, m, d in zip(c.lrs, c.median, c.diverged) if d]
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
    what = "final test accuracy" if task.higher_is_better else "final validation loss (nats/char)"
    axes[0, 0].set_ylabel(what)
    axes[1, 0].set_ylabel(f"{what} (zoom)")
    heading = textwrap.fill(title, 150)
    fig.suptitle(f"{heading}\nlines: median over seeds; bands: min to max; x: some seed diverged", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def _methods_help() -> str:
    """The epilog of ``--help``: tasks, methods, aliases and grids."""
    lines = ["tasks (--task):"]
    for task in TASKS.values():
        lines.append(f"  {task.name:12} {task.title}; score: {task.score}")
    lines += ["", "methods (--methods, comma-separated; 'all' for every one; * = default rows of the task):"]
    header = f"  {'name':22} {'alias':14} " + " ".join(f"{t:>13}" for t in TASKS)
    lines.append(header)
    for m in METHODS:
        cells = []
        for task in TASKS.values():
            low, high = task.grid_of(m)
            mark = "*" if m.name in task.methods else " "
            cells.append(f"{mark}{_lr_label(10.0**low)}..{_lr_label(10.0**high)}".rjust(13))
        alias = ",".join(m.aliases)
        extra = f"  [{m.requires}: bench extra]" if m.requires else ""
        lines.append(f"  {m.name:22} {alias:14} " + " ".join(cells) + extra)
    lines += [
        "",
        "Names with a space or '=' need shell quoting (--methods 'SGD-M damp=0.9'), or use the alias.",
        f"Prodigy, ScheduleFree-AdamW and DAdapt-Adam need the optional extra: {BENCH_EXTRA}.",
    ]
    return "\n".join(lines)


def _fail(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def _check_writable(out: Path, prog: str) -> None:
    """Make ``out`` and check a file can be written in it: else one line on stderr, exit 2."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        _fail(prog, f"cannot write to --out {str(out)!r}: {reason}")


def main(argv: Sequence[str] | None = None, prog: str = "lalr sweep") -> None:
    """Run the sweep from command-line arguments (``lalr sweep --help`` lists them)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.splitlines()[0],
        epilog=_methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", choices=tuple(TASKS), default="mlp", help="what to train (default: mlp)")
    parser.add_argument(
        "--schedule", choices=SCHEDULES, default="constant", help="lr schedule, the same for every method"
    )
    parser.add_argument("--quick", action="store_true", help="short version: 3 rates, 1 seed, 2 epochs (LM: 1)")
    parser.add_argument("--points", type=int, default=None, help="rates per method (default: mlp 13, others 9)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per rate (default: mlp 5, others 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default: 10; LM 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32; LM 16")
    parser.add_argument("--steps-per-epoch", type=int, default=None, help="LM only: steps per epoch (default 100)")
    parser.add_argument("--methods", default=None, help="comma-separated method names or aliases (see below)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1: in this process)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: ./lr_sensitivity[_TASK])")
    parser.add_argument(
        "--text",
        default=None,
        help="LM tasks only: your own text instead of the standard library's, a folder of .txt/.md/.rst "
        "files or one file (its paragraphs are the documents); default output ./lr_sensitivity_TASK_NAME",
    )
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    if args.text is not None:
        if task.steps_per_epoch is None:
            parser.error(f"--text is for the LM tasks, not --task {task.name}")
        from lightning_adaptive_lr.tasks.language import build_corpus

        source = Path(args.text).expanduser().resolve()
        try:  # read once here: the corpus is cached for the table and for runs in this process
            build_corpus(str(source))
        except (ValueError, RuntimeError) as err:
            parser.error(str(err))
        TEXT_SOURCES[task.name] = str(source)
        task = dataclasses.replace(task, title=_LM_TITLE.replace("the standard library's {}", repr(source.name)))

    quick_points, quick_seeds, quick_epochs = task.quick
    points = args.points or (quick_points if args.quick else task.points)
    seeds = args.seeds or (quick_seeds if args.quick else task.seeds)
    epochs = args.epochs or (quick_epochs if args.quick else task.epochs)
    batch_size = args.batch_size or task.batch_size
    for name, value in (("--points", points), ("--seeds", seeds), ("--epochs", epochs),
                        ("--batch-size", batch_size), ("--jobs", args.jobs)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if args.steps_per_epoch is not None:
        if task.steps_per_epoch is None:
            parser.error(f"--steps-per-epoch is for the LM tasks, not --task {task.name}")
        if args.steps_per_epoch < 1:
            parser.error(f"--steps-per-epoch must be at least 1, got {args.steps_per_epoch}")
    if args.methods is None:
        names = list(task.methods)
    elif args.methods.strip() == "all":
        names = [m.name for m in METHODS]
    else:
        names = [n.strip() for n in args.methods.split(",") if n.strip()]
        unknown = [n for n in names if resolve_method(n) is None]
        if unknown:
            parser.error(
                f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_BY_NAME)} "
                "(or an alias: see --help)"
            )
    chosen = list(dict.fromkeys(resolve_method(n).name for n in names))  # type: ignore[union-attr]
    skipped = {name: why for name in chosen if (why := missing_requirement(METHOD_BY_NAME[name]))}
    methods = [METHOD_BY_NAME[n] for n in chosen if n not in skipped]
    for name, why in skipped.items():
        print(f"{prog}: skipped {name}: {why}", file=sys.stderr)
    if not methods:
        _fail(prog, "every method asked for was skipped: " + "; ".join(f"{n} {w}" for n, w in skipped.items()))
    out = args.out if args.out is not None else default_out(task.name, args.schedule)
    if args.text is not None and args.out is None:  # runs.csv keys runs by task: keep your text's apart
        out = out.with_name(f"{out.name}_{Path(TEXT_SOURCES[task.name]).name}")
    _check_writable(out, prog)

    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    try:
        rows, ran = run_grid(
            methods, points, seeds, epochs, batch_size, out, args.jobs, task.name, args.schedule, args.steps_per_epoch
        )
    except OSError as err:  # the folder became unwritable (or the disk full) mid-run
        _fail(prog, f"cannot write to --out {str(out)!r}: {err.strerror or err}")
    wall = time.perf_counter() - start
    found = curves(rows, methods)
    steps = total_steps(task.name, epochs, batch_size, args.steps_per_epoch)
    if task.higher_is_better:
        n_test = len(digits(task.name == "mlp").y_test)
        measured = f"final test accuracy on the {n_test} held-out images"
        unit = f"  One test image is {1 / n_test:.2%} of accuracy."
    else:
        from lightning_adaptive_lr.tasks.language import build_corpus

        corpus = build_corpus(text_source(task.name))
        measured = (
            f"final validation loss in nats per character on {LM_EVAL_WINDOWS} windows of {LM_CONTEXT} characters "
            f"from {corpus.documents[1]} held-out files (training text: {len(corpus.train)} characters from "
            f"{corpus.documents[0]} files, Python {platform.python_version()})"
        )
        unit = ""
    epoch_words = f"{epochs} epochs" + (f" of {steps // epochs} steps" if task.steps_per_epoch else "")
    title = (
        f"{task.title}, batch {batch_size}, {epoch_words} ({steps} steps), {args.schedule} lr, "
        f"{seeds} seed{'s' if seeds > 1 else ''}, {points} rates per method; {measured}"
    )
    jobs = f"{args.jobs} worker process{'es' if args.jobs > 1 else ''}"
    if ran:
        done_now = f"the last invocation trained {ran} of them in {wall:.0f} s wall time with {jobs}"
    else:
        done_now = f"all of them read back from an earlier invocation's `{CSV_NAME}`"
    skipped_text = "".join(f"\n\nSkipped: {name}, which {why}." for name, why in skipped.items())
    header = f"""# Learning-rate sensitivity

{title}.  Written by `lalr sweep --task {task.name} --schedule {args.schedule}` (grids, task and definitions: `lalr sweep --help` and the
docstring of `lightning_adaptive_lr/sweep.py`): {len(rows)} runs, {sum(r.seconds for r in rows):.0f} s of training summed over runs;
{done_now} ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}).

*Robust range*: the width, in decades, of the contiguous run of grid rates around the best one
whose median {task.score} is {task.robust_rule()} ("≥": the run reaches an end of
the grid).  A run *diverged* when a mini-batch loss was not finite, when the optimizer stopped it
after too many skipped steps, or when the final training loss was above the initial one.{unit}{skipped_text}

![{task.score} vs learning rate]({PNG_NAME})
"""
    text = markdown(found, header.rstrip(), task)
    written = [out / CSV_NAME, out / MD_NAME]
    try:
        (out / MD_NAME).write_text(text)
    except OSError as err:
        _fail(prog, f"cannot write to --out {str(out)!r}: {err.strerror or err}")
    try:
        plot(found, out / PNG_NAME, title, task)
        written.append(out / PNG_NAME)
    except ImportError:
        print(f"the plot {PNG_NAME} needs matplotlib (pip install matplotlib); the CSV and the table are written",
              file=sys.stderr)
    print(text)
    print(f"wall time {wall:.1f} s for {ran} runs ({jobs}); wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    main(prog="python -m lightning_adaptive_lr.sweep")
