"""Collect the learning-rate sweeps' tables into one Markdown section (for docs/benchmarks.md).

Reads each ``lr_sensitivity*/runs.csv`` found under ``--results`` (default: the repository's
``benchmarks/results/``), rebuilds its tables with :mod:`lightning_adaptive_lr.sweep` (so old and
new runs are summarised the same way), and prints — or writes with ``--out`` — one section per
task and schedule, in the order mlp, cnn, lm, lm-comments.  Nothing is trained here: run the
sweeps first (``python -m benchmarks.lr_sensitivity --task lm`` ...).

    python -m benchmarks.sweep_tables                         # print the sections
    python -m benchmarks.sweep_tables --results /tmp/sweeps --out /tmp/sweeps.md
    python -m benchmarks.sweep_tables --results /tmp/after --before /tmp/before --changed QLAB-adam

With ``--before`` (a folder of the same layout, from an earlier version of the code) the rows of the
``--changed`` methods found there are added under the name ``<method> (before)``, right after the
current row, so one table shows a change's effect.  The rows of a section follow the task's default
order (``lalr sweep --help``), then any other method in the order the CSVs hold them (an
``lb=None`` row right after its ``lb=0`` row).

Example:
    >>> from benchmarks.sweep_tables import section_title
    >>> section_title("lm", "warmup-cosine")
    'Language model (`--task lm`), warm-up + cosine schedule'
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from lightning_adaptive_lr import sweep

RESULTS = Path(__file__).resolve().parent / "results"
NAMES = {
    "mlp": "Digits MLP",
    "cnn": "Digits CNN with BatchNorm",
    "lm": "Language model",
    "lm-comments": "Language model, second text",
}


def section_title(task: str, schedule: str) -> str:
    """The heading of one sweep's section."""
    when = "constant learning rate" if schedule == "constant" else "warm-up + cosine schedule"
    return f"{NAMES.get(task, task)} (`--task {task}`), {when}"


BEFORE = " (before)"


def _rows(results: Path) -> list[sweep.Row]:
    return [row for path in sorted(results.glob("*/" + sweep.CSV_NAME)) for row in sweep.read_rows(path)]


def _methods(task: sweep.Task, names: Sequence[str]) -> list[sweep.Method]:
    """The methods of ``names``: the task's default order first, each ``(before)`` row after its own."""
    present = set(names)
    ordered = [n for n in task.methods if n in present]
    for name in (n for n in names if n not in task.methods):
        sibling = name.removesuffix(" lb=None")  # an lb=None row right after its lb=0 row
        ordered.insert(ordered.index(sibling) + 1 if sibling != name and sibling in ordered else len(ordered), name)
    methods = []
    for name in ordered:
        if name.endswith(BEFORE):
            continue
        if name in sweep.METHOD_BY_NAME:
            methods.append(sweep.METHOD_BY_NAME[name])
        if name + BEFORE in present and name in sweep.METHOD_BY_NAME:
            methods.append(dataclasses.replace(sweep.METHOD_BY_NAME[name], name=name + BEFORE))
    return methods


def tables(results: Path, before: Path | None = None, changed: Sequence[str] = ()) -> str:
    """Every sweep under ``results``, one section per (task, schedule) found in the CSVs; with
    ``before``, the ``changed`` methods' rows from there as ``<method> (before)``."""
    sections = []
    rows = _rows(results)
    if before is not None:
        rows += [dataclasses.replace(r, method=r.method + BEFORE) for r in _rows(before) if r.method in changed]
    for task in sweep.TASKS.values():
        for schedule in sweep.SCHEDULES:
            mine = [r for r in rows if r.task == task.name and r.schedule == schedule]
            if not mine:
                continue
            names = list(dict.fromkeys(r.method for r in mine))
            methods = _methods(task, names)
            found = sweep.curves(mine, methods)
            seeds = max(max(c.seeds) for c in found)
            steps = max(r.steps for r in mine)
            title = (
                f"### {section_title(task.name, schedule)}\n\n{task.title}; {steps} steps, up to {seeds} "
                f"seed{'s' if seeds > 1 else ''} per rate; score: {task.score}; robust range: {task.robust_rule()}."
            )
            sections.append(sweep.markdown(found, title, task))
    return "\n".join(sections) if sections else f"(no sweep results under {results})\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder holding the sweeps' folders")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here instead of printing it")
    parser.add_argument("--before", type=Path, default=None, help="a folder of earlier sweeps to compare with")
    parser.add_argument(
        "--changed", default="", help="comma-separated methods whose --before rows are shown (as '<method> (before)')"
    )
    args = parser.parse_args(argv)
    changed = [sweep.resolve_method(n.strip()) for n in args.changed.split(",") if n.strip()]
    if None in changed:
        parser.error(f"unknown method in --changed {args.changed!r}")
    if changed and args.before is None:
        parser.error("--changed needs --before")
    text = tables(args.results, args.before, [m.name for m in changed])  # type: ignore[union-attr]
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
