"""The learning-rate sensitivity benchmark: :mod:`lightning_adaptive_lr.sweep` (``lalr sweep``),
writing into ``benchmarks/results/lr_sensitivity/`` of the repository unless ``--out`` says otherwise.

    python -m benchmarks.lr_sensitivity            # the default grid (what docs/benchmarks.md shows)
    python -m benchmarks.lr_sensitivity --quick    # 3 rates, 1 seed, 2 epochs
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_adaptive_lr import sweep

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lr_sensitivity"


def main(argv: Sequence[str] | None = None) -> None:
    # argparse keeps the last --out, so one given by the caller wins over this default.
    args = list(sys.argv[1:] if argv is None else argv)
    sweep.main(["--out", str(DEFAULT_OUT), *args], prog="python -m benchmarks.lr_sensitivity")


if __name__ == "__main__":
    main()
