"""Reproduce the seed papers' headline runs on a GPU, and compare with the published numbers.

Not run on this project's CPU machines: a recipe is a full training run (ResNet-20 for 50 epochs on
CIFAR-10 takes roughly 15–25 minutes on one modern GPU).  Each recipe runs the package's own
config from ``configs/`` through the ``lalr`` command, once per seed, and reads the final test
accuracy back from the run's TensorBoard events.  Finished runs are not repeated (a run counts as
finished when its ``result.json`` exists), so an interrupted sweep resumes.

    python -m benchmarks.gpu_recipes --download                 # every recipe, 3 seeds, on the GPU
    python -m benchmarks.gpu_recipes --only momo_cifar10 --seeds 1
    python -m benchmarks.gpu_recipes --dry-run                  # print the commands only

Expected numbers (docs/algorithms.md): MoMo on CIFAR-10 ResNet-20, 50 epochs, constant lr 3.16: test
accuracy .891 (SGD-M .863); MoMo-Adam .895 (Adam .875); MoMo on the MNIST MLP, 10 epochs: .980
(flat for lr from 1 to 1000).  QLAB-SGD on the MNIST MLP: the paper reports a win over hand-tuned
SGD, but no number could be read, so the recipe prints the measured accuracy only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Recipe:
    """One published run: a config, the overrides that match the paper, and its reported accuracy."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    expected: float | None = None
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict)


RECIPES = [
    Recipe(
        "momo_cifar10_resnet20",
        "configs/momo_cifar10_resnet20.yaml",
        ("--optimizer.lr", "3.16"),
        0.891,
        "Schaipp et al. 2024, CIFAR-10 ResNet-20, MoMo at its best lr 3.16 (SGD-M .863)",
    ),
    Recipe(
        "momoadam_cifar10_resnet20",
        "configs/momoadam_cifar10_resnet20.yaml",
        (),
        0.895,
        "Schaipp et al. 2024, CIFAR-10 ResNet-20, MoMo-Adam (Adam .875)",
    ),
    Recipe(
        "momo_mnist_mlp",
        "configs/momo_mnist_mlp.yaml",
        (),
        0.980,
        "Schaipp et al. 2024, MNIST MLP, 10 epochs (SGD-M best .977)",
    ),
    Recipe(
        "qlab_sgd_mnist_mlp",
        "configs/qlab_sgd_mnist_mlp.yaml",
        (),
        None,
        "Fu & Wu 2023/2024, MNIST MLP 1024-1000-1000-10, batch 64: no number could be read",
    ),
]


def command(recipe: Recipe, seed: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    """The ``lalr fit`` command line of one run."""
    return [
        sys.executable,
        "-m",
        "lightning_adaptive_lr.cli",
        "fit",
        "--config",
        str(ROOT / recipe.config),
        *recipe.overrides,
        "--seed_everything",
        str(seed),
        "--trainer.accelerator",
        args.accelerator,
        "--trainer.default_root_dir",
        str(run_dir),
        "--data.data_dir",
        str(args.data_dir),
        "--data.download",
        "true" if args.download else "false",
        "--test_after_fit",
        "true",
    ]


def read_test_accuracy(run_dir: Path) -> float:
    """The last ``test_acc`` scalar in the TensorBoard events under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "test_acc" in accumulator.Tags()["scalars"]:
            values.extend(event.value for event in accumulator.Scalars("test_acc"))
    if not values:
        raise FileNotFoundError(f"no `test_acc` scalar in the TensorBoard events under {run_dir}")
    return float(values[-1])


def run_recipe(recipe: Recipe, seed: int, args: argparse.Namespace) -> float | None:
    """Run (or resume) one seed of a recipe; its test accuracy, or None in a dry run."""
    run_dir = args.out / recipe.name / f"seed{seed}"
    result = run_dir / "result.json"
    if result.exists():
        return float(json.loads(result.read_text())["test_acc"])
    cmd = command(recipe, seed, run_dir, args)
    print("$ " + " ".join(cmd), flush=True)
    if args.dry_run:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    accuracy = read_test_accuracy(run_dir)
    result.write_text(json.dumps({"recipe": recipe.name, "seed": seed, "test_acc": accuracy}))
    return accuracy


def table(results: dict[str, list[float]]) -> str:
    """Markdown: each recipe's measured accuracy (median [min, max] over seeds) beside the paper's."""
    lines = ["| recipe | measured test accuracy | published | source |", "|---|---:|---:|---|"]
    for recipe in RECIPES:
        accs = results.get(recipe.name, [])
        measured = f"{statistics.median(accs):.3f} [{min(accs):.3f}, {max(accs):.3f}] ({len(accs)} seeds)" if accs else "not run"
        expected = f"{recipe.expected:.3f}" if recipe.expected is not None else "n/a"
        lines.append(f"| {recipe.name} | {measured} | {expected} | {recipe.source} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per recipe (the papers use 3)")
    parser.add_argument("--only", nargs="*", help="substrings of recipe names to run")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "data")
    parser.add_argument("--download", action="store_true", help="download MNIST / CIFAR-10 if missing")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_recipes")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    chosen = [r for r in RECIPES if not args.only or any(o in r.name for o in args.only)]
    if not chosen:
        parser.error(f"no recipe matches {args.only}; recipes: {', '.join(r.name for r in RECIPES)}")
    results: dict[str, list[float]] = {}
    for recipe in chosen:
        for seed in range(args.seeds):
            accuracy = run_recipe(recipe, seed, args)
            if accuracy is not None:
                results.setdefault(recipe.name, []).append(accuracy)
    text = table(results)
    print(text)
    return text


if __name__ == "__main__":
    main()
