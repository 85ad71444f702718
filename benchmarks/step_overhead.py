"""Time ``optimizer.step()`` of each method against ``torch.optim`` in the same process.

The parameters are those of torchvision's ResNet-18 (11.7 M, float32, no weights downloaded),
with fixed random gradients, so only the optimizer's own work is timed.  Steps are interleaved
(one step of every row per round) so that machine noise hits all rows alike, and each row's time
is the median over the measured rounds after warm-up.  A row's ratio is the median, over rounds,
of its time divided by its baseline's time in the same round.

    python -m benchmarks.step_overhead                 # every row
    python -m benchmarks.step_overhead --only MoMo     # rows whose name contains "MoMo" (+ baselines)
    python -m benchmarks.step_overhead --markdown out.md
    python -m benchmarks.step_overhead --host-only     # each tensor cut to 16 elements: the host's cost
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import Tensor

import lightning_adaptive_lr as lalr

Factory = Callable[[list[Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Row:
    """One optimizer to time.

    Attributes:
        name: shown in the table.
        make: builds the optimizer over a list of parameters.
        baseline: name of the row it is compared with (empty for baselines).
        target: the ratio the issue tracker asks for (None: no target).
        step_kwargs: keyword arguments of each ``step()`` call (the loss, QLAB's probe).
    """

    name: str
    make: Factory
    baseline: str = ""
    target: float | None = None
    step_kwargs: Callable[[], dict[str, Any]] = field(default=lambda: {})


def _with_loss() -> dict[str, Any]:
    return {"loss": torch.tensor(2.3)}


SGDM = "torch SGD momentum (foreach)"
SGD = "torch SGD (foreach)"
ADAM = "torch Adam (foreach)"
ADAM_FUSED = "torch Adam (fused)"
SGDM_FUSED = "torch SGD momentum (fused)"
SGD_FUSED = "torch SGD (fused)"

ROWS: list[Row] = [
    # --- baselines
    Row(SGD, lambda p: torch.optim.SGD(p, lr=0.1, foreach=True)),
    Row(SGDM, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True)),
    Row(ADAM, lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True)),
    Row(ADAM_FUSED, lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)),
    Row(SGDM_FUSED, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True)),
    Row(SGD_FUSED, lambda p: torch.optim.SGD(p, lr=0.1, fused=True)),
    # --- MoMo
    Row("MoMo", lambda p: lalr.MoMo(p, lr=1.0), SGDM, 2.0, _with_loss),
    Row("MoMo (per-tensor)", lambda p: lalr.MoMo(p, lr=1.0, foreach=False), SGDM, None, _with_loss),
    Row("MoMoAdam", lambda p: lalr.MoMoAdam(p, lr=1e-2), ADAM, 1.3, _with_loss),
    Row("MoMoAdam (per-tensor)", lambda p: lalr.MoMoAdam(p, lr=1e-2, foreach=False), ADAM, None, _with_loss),
    # --- QLAB
    # The probe returns the loss itself (f̃ = f, so t* = 1/2 every step and the rate settles at half
    # the trial floor): the fitted move always runs, and only QLAB's own work is timed.
    *(
        Row(name, make, baseline, target, lambda: {"loss": torch.tensor(2.3), "probe": lambda: 2.3})
        for name, make, baseline, target in (
            ("QLAB-sgd", lambda p: lalr.QLAB(p, base="sgd"), SGD, 1.6),
            ("QLAB-sgd (per-tensor)", lambda p: lalr.QLAB(p, base="sgd", foreach=False), SGD, None),
            ("QLAB-sgdm", lambda p: lalr.QLAB(p, base="sgdm"), SGDM, 1.6),
            ("QLAB-sgdm (compiled)", lambda p: lalr.QLAB(p, base="sgdm", compiled=True), SGDM, None),
            ("QLAB-adam", lambda p: lalr.QLAB(p, base="adam"), ADAM, 1.6),
            ("QLAB-adam (per-tensor)", lambda p: lalr.QLAB(p, base="adam", foreach=False), ADAM, None),
            ("QLAB-adam (compiled)", lambda p: lalr.QLAB(p, base="adam", compiled=True), ADAM, None),
            ("QLAB.wrap(SGD)", lambda p: lalr.QLAB.wrap(torch.optim.SGD(p, lr=0.1, foreach=True)), SGD, None),
            ("QLAB.wrap(Adam)", lambda p: lalr.QLAB.wrap(torch.optim.Adam(p, lr=1e-3, foreach=True)), ADAM, None),
        )
    ),
    # --- StepTunedSGD
    # Each step() is one half-step (odd: first, even: second); rounds alternate the two, so the
    # median lands between them. Gradient-only: no loss is passed.
    Row("StepTunedSGD", lambda p: lalr.StepTunedSGD(p, lr=0.1), SGD, 1.5),
    Row("StepTunedSGD (per-tensor)", lambda p: lalr.StepTunedSGD(p, lr=0.1, foreach=False), SGD, None),
    Row("StepTunedSGD (compiled)", lambda p: lalr.StepTunedSGD(p, lr=0.1, compiled=True), SGD, None),
    # --- HierarchicalHD
    # torch's foreach Nesterov SGD adds the momentum into p.grad in place unless weight decay makes a
    # copy first, and the gradients here are shared: the Nesterov pair runs with weight decay.
    Row("torch SGD nesterov wd (foreach)", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True)),
    Row("HierarchicalHD-sgd", lambda p: lalr.HierarchicalHD(p, base="sgd", lr=0.1), SGD, 1.6),
    Row("HierarchicalHD-sgd (per-tensor)", lambda p: lalr.HierarchicalHD(p, base="sgd", lr=0.1, foreach=False), SGD),
    Row("HierarchicalHD-sgd (compiled)", lambda p: lalr.HierarchicalHD(p, base="sgd", lr=0.1, compiled=True), SGD),
    Row("HierarchicalHD-sgd global (SGD-HD)", lambda p: lalr.HierarchicalHD(p, base="sgd", lr=0.1, levels=("global",)), SGD),
    Row("HierarchicalHD-sgdn wd", lambda p: lalr.HierarchicalHD(p, base="sgdn", lr=0.1, weight_decay=1e-4), "torch SGD nesterov wd (foreach)", 1.6),
    Row("HierarchicalHD-sgdn", lambda p: lalr.HierarchicalHD(p, base="sgdn", lr=0.1), SGDM),
    Row("HierarchicalHD-sgdn (compiled)", lambda p: lalr.HierarchicalHD(p, base="sgdn", lr=0.1, compiled=True), SGDM),
    Row("HierarchicalHD-adam", lambda p: lalr.HierarchicalHD(p, base="adam", lr=1e-3), ADAM, 1.6),
    Row("HierarchicalHD-adam (per-tensor)", lambda p: lalr.HierarchicalHD(p, base="adam", lr=1e-3, foreach=False), ADAM),
    Row("HierarchicalHD-adam (compiled)", lambda p: lalr.HierarchicalHD(p, base="adam", lr=1e-3, compiled=True), ADAM),
    Row("HierarchicalHD-adam 4 levels", lambda p: lalr.HierarchicalHD(p, base="adam", lr=1e-3, levels=("global", "layer", "unit", "param")), ADAM),
    # --- AdaL
    Row("AdaL", lambda p: lalr.AdaL(p, lr=1e-3), ADAM, 1.3),
    Row("AdaL (per-tensor)", lambda p: lalr.AdaL(p, lr=1e-3, foreach=False), ADAM),
    Row("AdaL tensor_l1", lambda p: lalr.AdaL(p, lr=1e-3, transform="tensor_l1"), ADAM),
    Row(
        "AdaL none+denominator (= Adam)",
        lambda p: lalr.AdaL(p, lr=1e-3, transform="none", eps_mode="denominator"),
        ADAM,
    ),
    # --- compiled (compiled=True: two torch.compile'd passes per step; the warm-up steps compile)
    # Each against its foreach baseline and against the fused torch kernel where torch has one.
    # "torch Adam (fused)" is a baseline row, repeated here for reference (its ratio is to Adam foreach).
    Row("MoMo (compiled)", lambda p: lalr.MoMo(p, lr=1.0, compiled=True), SGDM, 2.0, _with_loss),
    Row("MoMo (compiled) vs fused SGD-M", lambda p: lalr.MoMo(p, lr=1.0, compiled=True), SGDM_FUSED, None, _with_loss),
    Row("MoMoAdam (compiled)", lambda p: lalr.MoMoAdam(p, lr=1e-2, compiled=True), ADAM, 1.3, _with_loss),
    Row(
        "MoMoAdam (compiled) vs fused Adam",
        lambda p: lalr.MoMoAdam(p, lr=1e-2, compiled=True),
        ADAM_FUSED,
        None,
        _with_loss,
    ),
    Row("torch Adam (fused) (compiled ref.)", lambda p: torch.optim.Adam(p, lr=1e-3, fused=True), ADAM),
    Row("AdaL (compiled)", lambda p: lalr.AdaL(p, lr=1e-3, compiled=True), ADAM, 1.3),
    Row("AdaL (compiled) vs fused Adam", lambda p: lalr.AdaL(p, lr=1e-3, compiled=True), ADAM_FUSED),
    # --- capturable=True: the device-side step (no host read; meant for GPUs and CUDA graphs, where
    # benchmarks/gpu_capturable_check.py also times a graph replay), against the fused kernels.
    Row("MoMo (capturable)", lambda p: lalr.MoMo(p, lr=1.0, capturable=True), SGDM_FUSED, None, _with_loss),
    Row("MoMoAdam (capturable)", lambda p: lalr.MoMoAdam(p, lr=1e-2, capturable=True), ADAM_FUSED, None, _with_loss),
    Row("MoMo (compiled, capturable)", lambda p: lalr.MoMo(p, lr=1.0, compiled=True, capturable=True), SGDM_FUSED, None, _with_loss),
    Row(
        "MoMoAdam (compiled, capturable)",
        lambda p: lalr.MoMoAdam(p, lr=1e-2, compiled=True, capturable=True),
        ADAM_FUSED,
        None,
        _with_loss,
    ),
    Row("AdaL (capturable)", lambda p: lalr.AdaL(p, lr=1e-3, capturable=True), ADAM_FUSED),
    Row("AdaL (compiled, capturable)", lambda p: lalr.AdaL(p, lr=1e-3, compiled=True, capturable=True), ADAM_FUSED),
    Row(
        "QLAB-adam (capturable)",
        lambda p: lalr.QLAB(p, base="adam", capturable=True),
        ADAM_FUSED,
        None,
        lambda: {"loss": torch.tensor(2.3), "probe": lambda: torch.tensor(2.3)},
    ),
    Row("HierarchicalHD-adam (capturable)", lambda p: lalr.HierarchicalHD(p, base="adam", lr=1e-3, capturable=True), ADAM_FUSED),
    Row("StepTunedSGD (capturable)", lambda p: lalr.StepTunedSGD(p, lr=0.1, capturable=True), SGD_FUSED),
]


@dataclass(frozen=True)
class Floor:
    """The least memory traffic of a method against torch's fused counterpart.

    Attributes:
        fused: the torch row the method is compared with (its fused kernel: one pass).
        accesses: parameter-sized reads and writes the method needs at least per ``step()``, given
            that its gate must see its sums before anything is written (docs/benchmarks.md).
        baseline_accesses: the same for ``fused``.
        rows: the method's rows, fastest path first; the table takes the fastest measured.
    """

    fused: str
    accesses: float
    baseline_accesses: float
    rows: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """The floor: the least time ratio memory traffic allows."""
        return self.accesses / self.baseline_accesses


#: Per method, its floor (issue 16: each method within 1.2x of it).
FLOORS: dict[str, Floor] = {
    "MoMo": Floor(SGDM_FUSED, 8, 5, ("MoMo (compiled)", "MoMo", "MoMo (per-tensor)", "MoMo (compiled, capturable)")),
    "MoMo-Adam": Floor(
        ADAM_FUSED, 11, 7, ("MoMoAdam (compiled)", "MoMoAdam", "MoMoAdam (per-tensor)", "MoMoAdam (compiled, capturable)")
    ),
    "QLAB-sgd": Floor(SGD_FUSED, 7, 3, ("QLAB-sgd", "QLAB-sgd (per-tensor)")),
    "QLAB-sgdm": Floor(SGDM_FUSED, 9, 5, ("QLAB-sgdm (compiled)", "QLAB-sgdm")),
    "QLAB-adam": Floor(ADAM_FUSED, 12, 7, ("QLAB-adam (compiled)", "QLAB-adam", "QLAB-adam (per-tensor)")),
    "HierarchicalHD-sgd": Floor(
        SGD_FUSED, 6, 3, ("HierarchicalHD-sgd (compiled)", "HierarchicalHD-sgd", "HierarchicalHD-sgd (per-tensor)")
    ),
    "HierarchicalHD-sgdn": Floor(SGDM_FUSED, 8, 5, ("HierarchicalHD-sgdn (compiled)", "HierarchicalHD-sgdn")),
    "HierarchicalHD-adam": Floor(
        ADAM_FUSED, 10, 7, ("HierarchicalHD-adam (compiled)", "HierarchicalHD-adam", "HierarchicalHD-adam (per-tensor)")
    ),
    "AdaL": Floor(ADAM_FUSED, 8, 7, ("AdaL (compiled)", "AdaL", "AdaL (per-tensor)", "AdaL (compiled, capturable)")),
    "StepTunedSGD (per half-step)": Floor(
        SGD_FUSED, 7, 3, ("StepTunedSGD (compiled)", "StepTunedSGD", "StepTunedSGD (per-tensor)")
    ),
}


def floor_table(times: dict[str, list[float]]) -> str:
    """Per method: its floor, its fastest measured path against torch's fused kernel, and the gap."""
    lines = [
        "| method | fused baseline | accesses (method / baseline) | floor | target (1.2 × floor) | fastest path | measured | gap (measured / floor) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for method, floor in FLOORS.items():
        if floor.fused not in times:
            continue
        measured = {row: paired_ratio(times, row, floor.fused) for row in floor.rows if row in times}
        if not measured:
            continue
        best = min(measured, key=measured.__getitem__)
        ratio, target = measured[best], 1.2 * floor.ratio
        lines.append(
            f"| {method} | {floor.fused} | {floor.accesses:g} / {floor.baseline_accesses:g} | {floor.ratio:.2f} | "
            f"{target:.2f} | {best} | {ratio:.2f} {'met' if ratio <= target else 'missed'} | {ratio / floor.ratio:.2f} |"
        )
    return "\n".join(lines)


#: ``--host-only``: every tensor cut to this many elements, so that a step is its fixed host cost.
HOST_ONLY_ELEMENTS = 16


def resnet18_parameters(device: torch.device, host_only: bool = False) -> list[Tensor]:
    """ResNet-18's parameter shapes, freshly initialized (no download); with ``host_only`` its 62
    tensors, each cut to its first :data:`HOST_ONLY_ELEMENTS` elements (a 1-d tensor)."""
    torch.manual_seed(0)
    params = [p.detach().to(device) for p in torchvision.models.resnet18().parameters()]
    return [p.reshape(-1)[:HOST_ONLY_ELEMENTS].clone() for p in params] if host_only else params


def select(rows: list[Row], only: list[str] | None) -> list[Row]:
    if not only:
        return rows
    chosen = [r for r in rows if any(o.lower() in r.name.lower() for o in only)]
    needed = {r.baseline for r in chosen if r.baseline}
    return [r for r in rows if r in chosen or r.name in needed]


def measure(
    rows: list[Row], device: torch.device, steps: int, warmup: int, host_only: bool = False
) -> dict[str, list[float]]:
    """Seconds per step of each row in every measured round (rounds interleaved); ``host_only``:
    over ResNet-18's tensor count with almost no elements (:func:`resnet18_parameters`)."""
    shapes = resnet18_parameters(device, host_only)
    gen = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen).mul_(1e-3).to(device) for p in shapes]
    setups = []
    for row in rows:
        params = [torch.nn.Parameter(p.clone()) for p in shapes]
        for p, g in zip(params, grads):
            p.grad = g  # shared, read-only for the optimizers
        setups.append((row, row.make(params)))
    times: dict[str, list[float]] = {row.name: [] for row in rows}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for round_ in range(warmup + steps):
        for row, opt in setups:
            kwargs = row.step_kwargs()
            sync()
            start = time.perf_counter()
            opt.step(**kwargs)
            sync()
            if round_ >= warmup:
                times[row.name].append(time.perf_counter() - start)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over rounds of the row's time divided by its baseline's time *in the same round*.

    Pairing within a round cancels the slow drifts of a shared machine's load, which a ratio of
    two medians taken over the whole run does not.
    """
    return statistics.median(t / b for t, b in zip(times[name], times[baseline]))


def table(rows: list[Row], times: dict[str, list[float]]) -> str:
    lines = ["| optimizer | ms / step | baseline | ratio | target |", "|---|---:|---|---:|---:|"]
    for row in rows:
        ms = statistics.median(times[row.name]) * 1e3
        if row.baseline:
            ratio = paired_ratio(times, row.name, row.baseline)
            target = f"≤ {row.target:.2f} {'met' if ratio <= row.target else 'missed'}" if row.target else ""
            lines.append(f"| {row.name} | {ms:.2f} | {row.baseline} | {ratio:.2f} | {target} |")
        else:
            lines.append(f"| {row.name} | {ms:.2f} | (baseline) | 1.00 | |")
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="substrings of row names to run (their baselines come along)")
    parser.add_argument("--steps", type=int, default=25, help="measured rounds (default 25)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured rounds first (default 5)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument(
        "--host-only",
        action="store_true",
        help=f"ResNet-18's 62 tensors cut to {HOST_ONLY_ELEMENTS} elements each: what a step costs the host "
        "(Python, torch.compile's guards and wrappers, kernel launches, the gate's read) with no arithmetic",
    )
    args = parser.parse_args(argv)
    rows = select(ROWS, args.only)
    times = measure(rows, torch.device(args.device), args.steps, args.warmup, args.host_only)
    what = f"ResNet-18's 62 tensors, {HOST_ONLY_ELEMENTS} elements each" if args.host_only else "ResNet-18 parameters (11.7 M)"
    text = (
        f"{what}, {args.device}, {machine()}; median of {args.steps} interleaved "
        "rounds; ratio = median over rounds of the same-round ratio to the baseline\n\n"
    )
    text += table(rows, times)
    floors = floor_table(times)
    if floors.count("\n") > 1 and not args.host_only:
        text += "\n\nAgainst the memory-traffic floor (torch's fused kernels; see docs/benchmarks.md):\n\n" + floors
    return emit(text, args.markdown)


def emit(text: str, markdown: str | None) -> str:
    """Print a report, and write it to ``markdown`` as well when a path is given; returns it."""
    print(text)
    if markdown:
        with open(markdown, "w") as handle:
            handle.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
