"""Collect the learning-rate sweeps' tables into one Markdown section (for docs/benchmarks.md).

Reads each ``lr_sensitivity*/runs.csv`` found under ``--results`` (default: the repository's
``benchmarks/results/``), rebuilds its tables with :mod:`lightning_adaptive_lr.sweep` (so old and
new runs are summarised the same way), and prints — or writes with ``--out`` — one section per
task and schedule, in the order mlp, cnn, lm, lm-comments.  Nothing is trained here: run the
sweeps first (``python -m benchmarks.lr_sensitivity --task lm`` ...).

    python -m benchmarks.sweep_tables                         # print the sections
    python -m benchmarks.sweep_tables --results /tmp/sweeps --out /tmp/sweeps.md

Example:
    >>> from benchmarks.sweep_tables import section_title
    >>> section_title("lm", "warmup-cosine")
    'Language model (`--task lm`), warm-up + cosine schedule'
"""

from __future__ import annotations

import argparse
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


def tables(results: Path) -> str:
    """Every sweep under ``results``, one section per (task, schedule) found in the CSVs."""
    sections = []
    rows = [row for path in sorted(results.glob("*/" + sweep.CSV_NAME)) for row in sweep.read_rows(path)]
    for task in sweep.TASKS.values():
        for schedule in sweep.SCHEDULES:
            mine = [r for r in rows if r.task == task.name and r.schedule == schedule]
            if not mine:
                continue
            names = list(dict.fromkeys(r.method for r in mine))
            methods = [sweep.METHOD_BY_NAME[n] for n in names if n in sweep.METHOD_BY_NAME]
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
    args = parser.parse_args(argv)
    text = tables(args.results)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
