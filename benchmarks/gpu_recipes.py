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

A larger language model (no paper behind it: this package's own question, docs/benchmarks.md):
the character Transformer of ``configs/lm_transformer_momo_adam.yaml`` at 6 layers, width 384, 6
heads, context 256, batch 64, 5000 steps (about 10.8M parameters; offline text, nothing to
download), trained by MoMo-Adam with ``lb=None`` at its default cap, by Adam at two rates and by
QLAB on Adam; the score is the test loss in nats per character (lower is better).  ``--tiny``
runs every recipe that needs no download for a few steps on a tiny network (a smoke test on a CPU).
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
    """One published run: a config, the overrides that match the paper, and its reported score.

    ``metric`` is the TensorBoard scalar read back (``test_acc``; the LM's ``test_loss``, in nats
    per character, lower is better); ``downloads``: the data module takes ``data_dir`` and
    ``download`` (the image datasets; the LM's text is read offline); ``tiny``: overrides that make
    the run a few steps on a tiny network, for ``--tiny`` (empty: the recipe has no tiny mode).
    """

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    expected: float | None = None
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    metric: str = "test_acc"
    downloads: bool = True
    tiny: tuple[str, ...] = ()


#: The larger character Transformer (about 10.8M parameters) and its training length.
LM_LARGE = (
    "--model.init_args.n_layers", "6",
    "--model.init_args.d_model", "384",
    "--model.init_args.n_heads", "6",
    "--data.init_args.context", "256",
    "--data.init_args.batch_size", "64",
    "--trainer.max_steps", "5000",
    "--trainer.val_check_interval", "500",
    "--trainer.precision", "bf16-mixed",
)  # fmt: skip
#: ``--tiny``: the same recipe for 6 steps on a 1-layer, width-16 network, on the CPU in 32 bits.
LM_TINY = (
    "--model.init_args.n_layers", "1",
    "--model.init_args.d_model", "16",
    "--model.init_args.n_heads", "2",
    "--data.init_args.context", "16",
    "--data.init_args.batch_size", "4",
    "--data.init_args.max_eval_windows", "8",
    "--trainer.max_steps", "6",
    "--trainer.val_check_interval", "3",
    "--trainer.limit_test_batches", "2",
    "--trainer.precision", "32-true",
)  # fmt: skip
LM_CONFIG = "configs/lm_transformer_momo_adam.yaml"
LM_SOURCE = "this package, no paper: the 6-layer char Transformer on the stdlib docstrings"


def _lm_recipe(name: str, optimizer: tuple[str, ...], what: str) -> Recipe:
    return Recipe(
        name, LM_CONFIG, (*LM_LARGE, *optimizer), None, f"{LM_SOURCE}; {what}",
        metric="test_loss", downloads=False, tiny=(*LM_TINY, *optimizer),
    )  # fmt: skip


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
    _lm_recipe("lm_large_momoadam_lbnone", (), "MoMo-Adam, lb=None, its default cap 1e-2 (the config's)"),
    _lm_recipe("lm_large_adam_1e-3", ("--optimizer", "Adam", "--optimizer.lr", "1e-3"), "Adam at lr 1e-3"),
    _lm_recipe("lm_large_adam_3e-4", ("--optimizer", "Adam", "--optimizer.lr", "3e-4"), "Adam at lr 3e-4"),
    _lm_recipe(
        "lm_large_qlab_adam",
        ("--optimizer", "QLAB", "--optimizer.base", "adam", "--optimizer.lr", "1e-3"),
        "QLAB on Adam (anchored: rate at most lr 1e-3)",
    ),
]


def command(recipe: Recipe, seed: int, run_dir: Path, args: argparse.Namespace) -> list[str]:
    """The ``lalr fit`` command line of one run (``args.tiny``: the recipe's tiny overrides last)."""
    data = ["--data.data_dir", str(args.data_dir), "--data.download", "true" if args.download else "false"]
    tiny = list(recipe.tiny) if getattr(args, "tiny", False) else []
    return [
        sys.executable,
        "-m",
        "lightning_adaptive_lr.cli",
        "fit",
        "--config",
        str(ROOT / recipe.config),
        *recipe.overrides,
        *tiny,
        "--seed_everything",
        str(seed),
        "--trainer.accelerator",
        args.accelerator,
        "--trainer.default_root_dir",
        str(run_dir),
        *(data if recipe.downloads else []),
        "--test_after_fit",
        "true",
    ]


def read_scalar(run_dir: Path, tag: str) -> float:
    """The last ``tag`` scalar in the TensorBoard events under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.extend(event.value for event in accumulator.Scalars(tag))
    if not values:
        raise FileNotFoundError(f"no `{tag}` scalar in the TensorBoard events under {run_dir}")
    return float(values[-1])


def read_test_accuracy(run_dir: Path) -> float:
    """The last ``test_acc`` scalar in the TensorBoard events under ``run_dir``."""
    return read_scalar(run_dir, "test_acc")


def run_recipe(recipe: Recipe, seed: int, args: argparse.Namespace) -> float | None:
    """Run (or resume) one seed of a recipe; its score (``recipe.metric``), or None in a dry run."""
    run_dir = args.out / recipe.name / f"seed{seed}"
    result = run_dir / "result.json"
    if result.exists():
        return float(json.loads(result.read_text())[recipe.metric])
    cmd = command(recipe, seed, run_dir, args)
    print("$ " + " ".join(cmd), flush=True)
    if args.dry_run:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    score = read_scalar(run_dir, recipe.metric)
    result.write_text(json.dumps({"recipe": recipe.name, "seed": seed, recipe.metric: score}))
    return score


def table(results: dict[str, list[float]]) -> str:
    """Markdown: each recipe's measured score (median [min, max] over seeds) beside the paper's."""
    lines = ["| recipe | measured (median [min, max]) | published | source | score |", "|---|---:|---:|---|---|"]
    for recipe in RECIPES:
        got = results.get(recipe.name, [])
        measured = f"{statistics.median(got):.3f} [{min(got):.3f}, {max(got):.3f}] ({len(got)} seeds)" if got else "not run"
        expected = f"{recipe.expected:.3f}" if recipe.expected is not None else "n/a"
        score = "test accuracy" if recipe.metric == "test_acc" else "test loss, nats/char (lower is better)"
        lines.append(f"| {recipe.name} | {measured} | {expected} | {recipe.source} | {score} |")
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
    parser.add_argument(
        "--tiny", action="store_true", help="a few steps of a tiny network, for the recipes that have a tiny mode"
    )
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    chosen = [r for r in RECIPES if not args.only or any(o in r.name for o in args.only)]
    if args.tiny:
        chosen = [r for r in chosen if r.tiny]
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
