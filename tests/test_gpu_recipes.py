"""The GPU recipes script without a GPU: its commands, its result reading, its table, its resume."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmarks import gpu_recipes

ROOT = Path(__file__).resolve().parent.parent


def test_every_recipe_names_an_existing_config_and_a_valid_command(tmp_path, capsys) -> None:
    gpu_recipes.main(["--dry-run", "--seeds", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for recipe in gpu_recipes.RECIPES:
        assert (ROOT / recipe.config).exists(), recipe.config
        assert recipe.config in printed
    assert "--optimizer.lr 3.16" in printed  # MoMo's published run is at its best lr
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_dry_run_command_parses_with_the_real_cli(tmp_path) -> None:
    """The command line the script builds is accepted by `lalr` (checked with --print_config)."""
    recipe = gpu_recipes.RECIPES[0]
    args = argparse.Namespace(accelerator="cpu", data_dir=tmp_path, download=False)
    cmd = gpu_recipes.command(recipe, 1, tmp_path / "run", args) + ["--print_config"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lr: 3.16" in out.stdout and "seed_everything: 1" in out.stdout


def test_reads_the_last_test_accuracy_and_resumes(tmp_path) -> None:
    run_dir = tmp_path / "momo_mnist_mlp" / "seed0"
    writer = SummaryWriter(str(run_dir / "version_0"))
    writer.add_scalar("train_loss", 0.5, 1)
    writer.add_scalar("test_acc", 0.5, 10)
    writer.add_scalar("test_acc", 0.97, 20)
    writer.close()
    assert gpu_recipes.read_test_accuracy(run_dir) == pytest.approx(0.97)
    with pytest.raises(FileNotFoundError, match="test_acc"):
        gpu_recipes.read_test_accuracy(tmp_path / "empty")

    (run_dir / "result.json").write_text(json.dumps({"test_acc": 0.978}))
    text = gpu_recipes.main(["--only", "momo_mnist", "--seeds", "1", "--out", str(tmp_path)])  # resumes: runs nothing
    assert "| momo_mnist_mlp | 0.978 [0.978, 0.978] (1 seeds) | 0.980 |" in text
    assert "| momo_cifar10_resnet20 | not run | 0.891 |" in text


def test_unknown_recipe_is_refused(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_recipes", "--only", "nope", "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "no recipe matches" in result.stderr
