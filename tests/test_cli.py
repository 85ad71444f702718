"""The `lalr` command: configs parse and run, optimizers by short name, default callbacks, errors."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.cli import AdaptiveLRCLI, main
from lightning_adaptive_lr.tasks import FakeDataModule, ImageClassifier

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
QUICKSTART = next(p for p in CONFIGS if p.name == "quickstart.yaml")

# Keep runs small and quiet; what is checked does not depend on these.
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch, one_thread):
    """Logs and checkpoints of the runs land in a temporary folder; one thread for small models
    (the shared ``one_thread``); pytest's own arguments are not mistaken for the command's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lalr"])
    return tmp_path


def import_object(path: str) -> object:
    """``"package.module.Name"`` → the object."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def print_config(*args: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def run_main(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


# --------------------------------------------------------------------------- the configs


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert "quickstart.yaml" in names and len(names) >= 8


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_sets_lr_and_parses(config):
    raw = yaml.safe_load(config.read_text())
    # jsonargparse keeps a same-named argument when the optimizer class changes: every config
    # must set the learning rate itself.
    assert "lr" in raw["optimizer"]["init_args"]
    printed = print_config("--config", str(config))
    assert import_object(printed["optimizer"]["class_path"]) is import_object(raw["optimizer"]["class_path"])
    assert printed["optimizer"]["init_args"]["lr"] == raw["optimizer"]["init_args"]["lr"]
    for name, value in raw["model"]["init_args"].items():
        assert printed["model"]["init_args"][name] == value
    assert printed["data"]["class_path"].endswith(raw["data"]["class_path"].rsplit(".", 1)[-1])
    assert printed["seed_everything"] == raw["seed_everything"]


def test_printed_config_is_a_valid_config(tmp_path):
    """`--print_config` output, infinities included, can be fed back unchanged."""
    config = next(p for p in CONFIGS if "hierarchical" in p.name)
    printed = print_config("--config", str(config))
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(printed))
    again = print_config("--config", str(saved))
    assert again["optimizer"] == printed["optimizer"]
    assert math.isinf(float(again["optimizer"]["init_args"]["rate_bounds"][1]))


def offline_data(config: Path) -> list[str]:
    """Arguments that swap the config's data for offline data of the same shape.

    The digits stay; MNIST and CIFAR-10 become FakeData with the shape and classes the real module
    states (its constructor does not touch the disk)."""
    raw = yaml.safe_load(config.read_text())["data"]
    cls = import_object(raw["class_path"])
    if not hasattr(cls(**raw.get("init_args", {})), "download"):  # offline already (digits, text)
        return ["--data.batch_size=16"]
    real = cls(**{k: v for k, v in raw.get("init_args", {}).items() if k != "download"})
    fake = {
        "class_path": "FakeDataModule",
        "init_args": {
            "input_shape": list(real.input_shape) if len(real.input_shape) == 3 else [1, 28, 28],
            "num_classes": real.num_classes,
            "train_size": 8,
            "val_size": 4,
            "test_size": 4,
            "batch_size": 4,
        },
    }
    return ["--data", json.dumps(fake)]


def tensorboard_tags(log_dir: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir)
    events.Reload()
    return events.Tags()["scalars"]


@pytest.mark.parametrize("config", [p for p in CONFIGS if p != QUICKSTART], ids=lambda p: p.stem)
def test_config_runs_a_few_steps_on_offline_data(config):
    raw = yaml.safe_load(config.read_text())
    cli = AdaptiveLRCLI(
        args=[
            "fit",
            "--config",
            str(config),
            *offline_data(config),
            *QUIET,
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.log_every_n_steps=1",
        ]
    )
    trainer = cli.trainer
    assert trainer.global_step == 2
    optimizer = trainer.optimizers[0]
    expected = import_object(raw["optimizer"]["class_path"])
    assert isinstance(optimizer, expected)
    assert all(math.isfinite(float(g["effective_lr"])) for g in optimizer.param_groups)
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())
    # the default callbacks were added and did their work: the step size reached TensorBoard
    names = {type(cb).__name__ for cb in trainer.callbacks}
    assert {"AdaptiveLRCallback", "AdaptiveLRMonitor"} <= names
    assert any(tag.endswith("effective_lr") for tag in tensorboard_tags(trainer.logger.log_dir))
    # test_after_fit ran the test split
    assert "test_loss" in trainer.callback_metrics


def test_quickstart_end_to_end(tmp_path):
    """The README's command, as a user runs it; prints the test accuracy, which must be high."""
    env = dict(os.environ, OMP_NUM_THREADS="1")  # tiny MLP: threads only contend on a busy machine
    done = subprocess.run(
        [sys.executable, "-m", "lightning_adaptive_lr.cli", "fit", "--config", str(QUICKSTART)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r"test_acc\s+([0-9.]+)", done.stdout)
    assert match, done.stdout[-2000:]
    assert float(match.group(1)) > 0.93
    assert "test_acc" in tensorboard_tags(str(tmp_path / "lightning_logs" / "version_0"))


# --------------------------------------------------------------------------- choosing classes


def test_optimizer_by_short_name():
    cli = AdaptiveLRCLI(args=["--optimizer", "MoMoAdam", "--optimizer.lr", "0.03", *QUIET], run=False)
    optimizer = cli.model.configure_optimizers()
    assert type(optimizer) is lalr.MoMoAdam and optimizer.param_groups[0]["lr"] == 0.03


@pytest.mark.parametrize("name", ["MoMo", "QLAB", "HierarchicalHD", "AdaL", "StepTunedSGD", "SGD"])
def test_every_optimizer_is_found_by_class_name(name):
    cli = AdaptiveLRCLI(args=["--optimizer", name, "--optimizer.lr", "0.01", *QUIET], run=False)
    optimizer = cli.model.configure_optimizers()
    expected = getattr(lalr, name, None) or getattr(torch.optim, name)
    assert type(optimizer) is expected and optimizer.param_groups[0]["lr"] == 0.01


def test_default_optimizer_is_the_models_momo():
    cli = AdaptiveLRCLI(args=QUIET, run=False)
    optimizer = cli.model.configure_optimizers()
    assert type(optimizer) is lalr.MoMo and optimizer.param_groups[0]["lr"] == 1.0


def test_model_sizes_come_from_the_data():
    cli = AdaptiveLRCLI(
        args=["--data", "FakeDataModule", "--data.input_shape", "[1, 16, 16]", "--data.num_classes", "3", *QUIET],
        run=False,
    )
    assert isinstance(cli.datamodule, FakeDataModule) and isinstance(cli.model, ImageClassifier)
    assert cli.model.input_shape == (1, 16, 16) and cli.model.num_classes == 3


def test_default_callbacks_and_logger():
    from lightning.pytorch.loggers import TensorBoardLogger

    cli = AdaptiveLRCLI(args=QUIET, run=False)
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert names.count("AdaptiveLRCallback") == 1 and names.count("AdaptiveLRMonitor") == 1
    assert isinstance(cli.trainer.logger, TensorBoardLogger)


def test_configured_callback_replaces_the_default():
    callback = {"class_path": "AdaptiveLRCallback", "init_args": {"lb_fraction": 0.5}}
    cli = AdaptiveLRCLI(args=["--trainer.callbacks", json.dumps([callback]), *QUIET], run=False)
    ours = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "AdaptiveLRCallback"]
    assert len(ours) == 1 and ours[0].lb_fraction == 0.5


def test_default_callbacks_that_do_not_exist_are_skipped(monkeypatch):
    import lightning_adaptive_lr.cli as cli_module

    monkeypatch.setattr(
        cli_module,
        "DEFAULT_CALLBACKS",
        (
            ("lightning_adaptive_lr.no_such_module", "AdaptiveLRCallback"),  # not written yet
            ("lightning_adaptive_lr.callbacks", "NoSuchCallback"),
            ("lightning_adaptive_lr.callbacks", "AdaptiveLRMonitor"),
        ),
    )
    cli = AdaptiveLRCLI(args=QUIET, run=False)
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert "AdaptiveLRMonitor" in names and "AdaptiveLRCallback" not in names


def test_validate_and_test_subcommands():
    for subcommand in ("validate", "test"):
        cli = AdaptiveLRCLI(args=[subcommand, *QUIET, "--trainer.logger=false", "--model.hidden_sizes=[16]"])
        assert f"{'val' if subcommand == 'validate' else 'test'}_acc" in cli.trainer.callback_metrics


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, expected",
    [
        (["fit", "--optimizer", "Nope"], r"--optimizer: unknown class 'Nope'.*MoMo"),
        (["fit", "--model", "Nope"], r"--model: unknown class 'Nope'"),
        (["fit", "--data", "Nope"], r"--data: unknown class 'Nope'.*DigitsDataModule"),
        (["fit", "--trainer.max_epochs", "abc"], r"--trainer.max_epochs: expected int or None, got 'abc'"),
        (["fit", "--model.backbone", "nope"], r"--model.backbone: expected one of 'mlp'.*got 'nope'"),
        (["fit", "--optimizer", "SGD", "--optimizer.lrr", "3"], r"--optimizer: SGD has no argument 'lrr'"),
        (["fit", "--optimizer.lr", "3"], r"--optimizer.lr was given without an optimizer class"),
        (["fit", "--config", "missing.yaml"], r"--config: .*missing.yaml"),
        (["fit", "--optimizer", "MoMo", "--optimizer.lr=-1"], r"MoMo: `lr` must be .* got -1"),
        (["fit", "--model.backbone", "vgg16_bn"], r"ImageClassifier: backbone 'vgg16_bn' cannot take inputs of shape \(1, 8, 8\)"),
        (["bogus"], r"invalid choice: 'bogus'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, args, expected):
    code, err = run_main(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lalr: error: "), err
    assert re.search(expected, lines[0]), lines[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("nope: 3\n", r"option 'nope'"),
        ("optimizer:\n  class_path: MoMo\n  init_args: {lrr: 1}\n", r"--optimizer: MoMo has no argument 'lrr'"),
        ("trainer: [1, 2\n", r"Problems parsing config"),
    ],
)
def test_bad_config_file_is_one_line_and_exit_code_2(capsys, tmp_path, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, err = run_main(capsys, "fit", "--config", str(config))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), err


def test_missing_dataset_is_one_line_and_exit_code_2(capsys, tmp_path):
    empty = tmp_path / "no_data_here"
    empty.mkdir()
    code, err = run_main(
        capsys, "fit", "--data", "CIFAR10DataModule", f"--data.data_dir={empty}", "--trainer.max_epochs=1", *QUIET
    )
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "CIFAR-10" in line and str(empty) in line and "--data.download true" in line


def test_exit_code_2_from_the_real_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lightning_adaptive_lr.cli", "fit", "--optimizer", "Nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "Traceback" not in done.stderr and "unknown class 'Nope'" in done.stderr
