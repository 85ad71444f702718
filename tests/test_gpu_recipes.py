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


LM_RECIPES = [r for r in gpu_recipes.RECIPES if r.name.startswith("lm_large")]


def test_language_model_recipes_read_no_dataset_and_score_the_test_loss(tmp_path) -> None:
    assert len(LM_RECIPES) >= 3
    args = argparse.Namespace(accelerator="gpu", data_dir=tmp_path, download=True)
    for recipe in LM_RECIPES:
        cmd = gpu_recipes.command(recipe, 0, tmp_path / "run", args)
        assert "--data.data_dir" not in cmd and "--data.download" not in cmd  # the text is read offline
        assert recipe.metric == "test_loss" and recipe.tiny
        assert cmd[cmd.index("--model.init_args.d_model") + 1] == "384"  # the larger network
    # The tiny overrides come after the recipe's: the later value wins in the command line.
    tiny = gpu_recipes.command(LM_RECIPES[0], 0, tmp_path / "run", argparse.Namespace(**vars(args), tiny=True))
    assert tiny[len(tiny) - 1 - tiny[::-1].index("--model.init_args.d_model") + 1] == "16"


def test_adam_language_model_recipe_parses_with_the_real_cli(tmp_path) -> None:
    """Switching the config's MoMo-Adam (with lb: null) to Adam is accepted by `lalr`."""
    recipe = next(r for r in LM_RECIPES if "adam_1e-3" in r.name)
    args = argparse.Namespace(accelerator="cpu", data_dir=tmp_path, download=False)
    cmd = gpu_recipes.command(recipe, 2, tmp_path / "run", args) + ["--print_config"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "class_path: torch.optim.Adam" in out.stdout and "lr: 0.001" in out.stdout
    assert "n_layers: 6" in out.stdout and "context: 256" in out.stdout and "lb:" not in out.stdout


def test_a_language_model_recipe_runs_in_tiny_mode_and_resumes(tmp_path, monkeypatch) -> None:
    """The QLAB-on-Adam recipe for 6 steps of a tiny network on the CPU, through `lalr fit`."""
    argv = ["--tiny", "--accelerator", "cpu", "--only", "lm_large_qlab", "--seeds", "1", "--out", str(tmp_path)]
    text = gpu_recipes.main(argv)
    saved = json.loads((tmp_path / "lm_large_qlab_adam" / "seed0" / "result.json").read_text())
    # 6 steps from ln(97) = 4.57 nats per character (a uniform guess): finite, near the start.
    assert 3.0 < saved["test_loss"] < 5.5
    assert f"| lm_large_qlab_adam | {saved['test_loss']:.3f} [" in text
    assert "test loss, nats/char" in text

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(gpu_recipes.subprocess, "run", refuse)
    assert gpu_recipes.main(argv) == text  # resumed from result.json: nothing runs


def test_tiny_mode_skips_recipes_without_one(tmp_path, capsys) -> None:
    gpu_recipes.main(["--tiny", "--dry-run", "--seeds", "1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "momo_cifar10_resnet20.yaml" not in printed
    assert printed.count("lm_transformer_momo_adam.yaml") == len(LM_RECIPES)
