"""Regenerate docs/benchmarks.md: every benchmark of the project, on this machine.

    python -m benchmarks.run_all            # the full set (about 25 minutes on 2 CPU cores)
    python -m benchmarks.run_all --quick    # a short version (a few minutes), for a smoke test

The learning-rate sweep resumes from ``benchmarks/results/`` (git-ignored): runs already done
there are not repeated unless ``--fresh`` is given.  It runs, in one process each after the other (so they do not compete for the cores):
``benchmarks.step_overhead`` (optimizer step vs torch.optim on ResNet-18 parameters),
``benchmarks.lightning_overhead`` (end-to-end Lightning step time) and ``benchmarks.lr_sensitivity``
(final test accuracy over a grid of learning rates), and writes their tables, the sensitivity plot
and the machine they ran on into ``docs/benchmarks.md``.  The reading of the numbers against the
papers' claims is kept by hand in ``benchmarks/claims.md`` and included as it is: rerunning the
benchmarks does not rewrite it, so check it against the new tables.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def machine() -> str:
    """A line naming the machine, the thread count and the versions."""
    import lightning

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} threads, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}"
    )


def sweep_table(path: Path) -> str:
    """The sweep's Markdown without its own title and picture (the page has both already)."""
    if not path.exists():
        return "(the sweep wrote no table)"
    lines = path.read_text().strip().splitlines()
    return "\n".join(line for line in lines if not line.startswith(("# ", "![")))


def gpu_section() -> str:
    """The GPU recipes: how to run them and what the papers report (run on a GPU, not here)."""
    from benchmarks import gpu_recipes

    return "\n".join(
        [
            "## GPU recipes (not run on this machine)",
            "",
            "The papers' headline runs, through the package's configs: "
            "`python -m benchmarks.gpu_recipes --download` on a machine with a GPU "
            "(3 seeds each; finished runs are kept, so it resumes).",
            "",
            gpu_recipes.table({}),
        ]
    )


def run_module(module: str, args: list[str]) -> None:
    """Run ``python -m module args`` from the repository root, streaming its output."""
    print(f"\n$ python -m {module} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, check=True)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short versions of every benchmark")
    parser.add_argument("--out", type=Path, default=DOCS / "benchmarks.md", help="the page to write")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="rerun the learning-rate sweep from scratch (by default it resumes from its results folder, "
        "so runs already done are not repeated)",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        step = ["--steps", "8", "--warmup", "2"] if args.quick else ["--steps", "25", "--warmup", "5"]
        run_module("benchmarks.step_overhead", [*step, "--markdown", str(work / "step.md")])
        # One thread: a small CNN gains nothing from the second core, and its rounds vary far less.
        light = ["--steps", "10", "--rounds", "2"] if args.quick else ["--steps", "40", "--rounds", "7"]
        light += ["--threads", "1"]
        run_module("benchmarks.lightning_overhead", [*light, "--markdown", str(work / "lightning.md")])
        sweep_dir = ROOT / "benchmarks" / "results" / ("lr_sensitivity_quick" if args.quick else "lr_sensitivity")
        if args.fresh and sweep_dir.exists():
            shutil.rmtree(sweep_dir)
        run_module("benchmarks.lr_sensitivity", [*(["--quick"] if args.quick else []), "--out", str(sweep_dir)])

        png = sweep_dir / "lr_sensitivity.png"
        table = sweep_dir / "lr_sensitivity.md"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if png.exists():
            shutil.copyfile(png, args.out.parent / "lr_sensitivity.png")
        if table.exists():
            shutil.copyfile(table, args.out.parent / "lr_sensitivity.md")
        claims = ROOT / "benchmarks" / "claims.md"
        page = [
            "# Benchmarks",
            "",
            f"Regenerated by `python -m benchmarks.run_all{' --quick' if args.quick else ''}` on "
            f"{datetime.date.today().isoformat()}.",
            "",
            f"Machine: {machine()}.",
            "",
            "## Optimizer step overhead",
            "",
            "Median time of `optimizer.step()` over ResNet-18's parameters with fixed random gradients, "
            "every row stepped once per round (interleaved), against `torch.optim` in the same process.",
            "",
            (work / "step.md").read_text().strip(),
            "",
            "## End-to-end overhead in Lightning",
            "",
            (work / "lightning.md").read_text().strip(),
            "",
            "## Learning-rate sensitivity",
            "",
            "![final test accuracy vs learning rate](lr_sensitivity.png)",
            "",
            sweep_table(table),
            "",
        ]
        page += [gpu_section(), ""]
        if claims.exists():
            page += [claims.read_text().strip(), ""]
        defaults = ROOT / "benchmarks" / "defaults.md"  # hand-written too: how the defaults were chosen
        if defaults.exists():
            page += [defaults.read_text().strip(), ""]
        args.out.write_text("\n".join(page))
    print(f"\nwrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
