"""The learning-rate sensitivity benchmark: :mod:`lightning_adaptive_lr.sweep` (``lalr sweep``),
writing into ``benchmarks/results/`` of the repository unless ``--out`` says otherwise: the MLP's
constant-rate sweep into ``lr_sensitivity/``, the others into ``lr_sensitivity_<task>[_<schedule>]/``.

    python -m benchmarks.lr_sensitivity            # the default grid (what docs/benchmarks.md shows)
    python -m benchmarks.lr_sensitivity --quick    # 3 rates, 1 seed, 2 epochs
    python -m benchmarks.lr_sensitivity --task lm  # the language model (competitors: the bench extra)
    python -m benchmarks.lr_sensitivity --task cnn --schedule warmup-cosine
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_adaptive_lr import sweep

#: The MLP's folder; the other tasks' folders sit beside it.
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lr_sensitivity"


def output_folder(argv: Sequence[str]) -> Path:
    """Where the sweep of ``argv`` writes by default: ``DEFAULT_OUT`` for the MLP at a constant rate,
    else its sibling named as ``lalr sweep`` names it in the working directory."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--task", default="mlp")
    parser.add_argument("--schedule", default="constant")
    known, _ = parser.parse_known_args(list(argv))
    if known.task == "mlp" and known.schedule == "constant":
        return DEFAULT_OUT
    return DEFAULT_OUT.parent / sweep.default_out(known.task, known.schedule).name


def main(argv: Sequence[str] | None = None) -> None:
    # argparse keeps the last --out, so one given by the caller wins over this default.
    args = list(sys.argv[1:] if argv is None else argv)
    sweep.main(["--out", str(output_folder(args)), *args], prog="python -m benchmarks.lr_sensitivity")


if __name__ == "__main__":
    main()
