"""The `lalr` command at its edges: switching --optimizer, default_root_dir, failures as one line and
exit status 2 with nothing half-made left behind, --help, plain-YAML hparams."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr.cli import AdaptiveLRCLI, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lalr"])
    return tmp_path


def print_config(capsys, *args: str) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue()), capsys.readouterr().err


def fails(capsys, *args: str) -> str:
    """Run the command; it must exit with status 2 and end stderr with one `lalr: error:` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("lalr: error: "), err
    return line


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- switching the optimizer

SWITCHES = {
    "Adam": torch.optim.Adam,
    "SGD": torch.optim.SGD,
    "MoMoAdam": lalr.MoMoAdam,
    "QLAB": lalr.QLAB,
    "HierarchicalHD": lalr.HierarchicalHD,
    "AdaL": lalr.AdaL,
    "StepTunedSGD": lalr.StepTunedSGD,
}


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switching_the_optimizer_starts_from_the_new_classes_lr(capsys, name) -> None:
    default_lr = inspect.signature(SWITCHES[name]).parameters["lr"].default
    assert default_lr != 1.0  # the quickstart's MoMo lr, which jsonargparse would carry over
    printed, err = print_config(capsys, "--config", str(QUICKSTART), "--optimizer", name)
    assert printed["optimizer"]["class_path"].endswith(f".{name}")
    assert printed["optimizer"]["init_args"]["lr"] == default_lr
    assert f"--optimizer {name} replaces the configuration's MoMo" in err and "lr=1.0" in err


def test_the_same_class_keeps_the_configured_arguments(capsys) -> None:
    printed, err = print_config(capsys, "--config", str(QUICKSTART), "--optimizer", "MoMo")
    assert printed["optimizer"]["init_args"]["lr"] == 1.0 and "replaces" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["--optimizer", "Adam", "--optimizer.lr", "0.05"],
        ["--optimizer=Adam", "--optimizer.init_args.lr=0.05"],
        ["--optimizer.lr=0.05", "--optimizer", "Adam"],
        ["--optimizer", json.dumps({"class_path": "Adam", "init_args": {"lr": 0.05}})],
    ],
    ids=["after", "equals", "before", "mapping"],
)
def test_an_lr_given_on_the_command_line_is_kept(capsys, args) -> None:
    printed, err = print_config(capsys, "--config", str(QUICKSTART), *args)
    assert printed["optimizer"]["class_path"] == "torch.optim.Adam"
    assert printed["optimizer"]["init_args"]["lr"] == 0.05 and "replaces" not in err


def test_without_a_configured_optimizer_nothing_is_reset(capsys) -> None:
    printed, err = print_config(capsys, "--optimizer", "Adam")
    assert printed["optimizer"]["init_args"]["lr"] == 0.001 and "replaces" not in err


def test_a_class_without_a_default_lr_must_be_given_one(capsys) -> None:
    args = ("fit", "--config", str(QUICKSTART), "--optimizer", "lightning_helpers.RequiredLRSGD")
    line = fails(capsys, *args)
    assert "RequiredLRSGD has no default 'lr'" in line and "pass --optimizer.lr" in line
    printed, _ = print_config(capsys, *args[1:], "--optimizer.lr", "0.2")
    assert printed["optimizer"]["init_args"]["lr"] == 0.2


def test_the_run_trains_and_saves_the_new_classes_lr(tmp_path) -> None:
    cli = AdaptiveLRCLI(
        args=["fit", "--config", str(QUICKSTART), "--optimizer", "Adam", "--trainer.max_steps=2", *QUIET,
              "--test_after_fit=false"]
    )
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == 0.001
    saved = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    assert saved["optimizer"]["init_args"]["lr"] == 0.001


# --------------------------------------------------------------------------- where a run writes


def test_default_root_dir_holds_logs_and_checkpoints(tmp_path) -> None:
    AdaptiveLRCLI(args=["fit", "--trainer.default_root_dir=runs", "--trainer.max_epochs=1", *QUIET,
                        "--model.hidden_sizes=[16]"])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    names = everything_under(run)
    assert {"config.yaml", "hparams.yaml", "checkpoints/last.ckpt"} <= set(names), names
    assert any(name.startswith("events.out.tfevents") for name in names)
    assert not (tmp_path / "lightning_logs").exists()
    # hparams.yaml is plain YAML (no !!python/tuple)
    hparams = yaml.safe_load((run / "hparams.yaml").read_text())
    assert hparams["input_shape"] == [1, 8, 8] and hparams["hidden_sizes"] == [16]


def test_sweep_is_not_a_lightning_subcommand_in_python() -> None:
    with pytest.raises(ValueError, match="lalr sweep"):
        AdaptiveLRCLI(args=["sweep", "--quick"])


def test_help_lists_the_sweep(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "{fit,validate,test,sweep}" in out and "Learning-rate sensitivity sweep" in out


# --------------------------------------------------------------------------- failures


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine has: every connection attempt fails at once."""

    def refuse(*args, **kwargs):
        raise OSError("network access disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_a_failed_download_is_one_line_and_leaves_nothing(capsys, tmp_path, offline) -> None:
    line = fails(capsys, "fit", "--data", "MNISTDataModule", "--data.download", "true", "--data.data_dir", "data",
                 "--trainer.max_epochs=1", *QUIET)
    assert "MNISTDataModule: downloading the dataset into" in line and "--data.download false" in line
    assert everything_under(tmp_path) == []  # neither data/MNIST/raw nor lightning_logs/version_0


def test_a_failed_download_into_an_existing_folder_removes_only_what_it_made(capsys, tmp_path, offline) -> None:
    (tmp_path / "data" / "mine").mkdir(parents=True)
    (tmp_path / "data" / "mine" / "keep.txt").write_text("mine")
    fails(capsys, "fit", "--data", "CIFAR10DataModule", "--data.download", "true", "--data.data_dir", "data",
          "--trainer.max_epochs=1", *QUIET)
    assert everything_under(tmp_path) == ["data", "data/mine", "data/mine/keep.txt"]


def make_blocker(tmp_path: Path) -> Path:
    """A file where a folder should be: nothing can be written under it (even by root)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    return blocker


class NotAllowed:
    """An object torch.load(weights_only=True) refuses to unpickle."""


def bad_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    rejected = tmp_path / "rejected.ckpt"
    torch.save({"state_dict": {}, "extra": NotAllowed()}, rejected)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(rejected.read_bytes()[:100])
    return rejected, truncated


FAILURES = {
    "data_dir": (
        ["--data", "MNISTDataModule", "--data.download", "true", "--data.data_dir", "blocker/data"],
        r"MNISTDataModule: downloading the dataset into .*blocker/data failed \(Not a directory",
    ),
    "max_epochs": (["--trainer.max_epochs", "-2"], r"--trainer: `max_epochs` must be a non-negative integer"),
    "weights_only": (
        ["--ckpt_path", "rejected.ckpt"],
        r"--ckpt_path rejected.ckpt: torch.load\(weights_only=True\).*refuses it \(.*Unsupported global",
    ),
    "truncated": (["--ckpt_path", "truncated.ckpt"], r"--ckpt_path truncated.ckpt: not a readable checkpoint"),
    "missing": (["--ckpt_path", "nowhere.ckpt"], r"--ckpt_path: there is no checkpoint at nowhere.ckpt"),
    "no_last": (["--ckpt_path", "last"], r"--ckpt_path last: no last checkpoint .*lightning_logs"),
    "root_dir": (["--trainer.default_root_dir", "blocker/runs", "--trainer.max_steps=1"], r"Not a directory"),
    "refused_by_callback": (
        ["--optimizer", "StepTunedSGD", "--optimizer.same_batch", "true", "--trainer.max_steps=1"],
        r"same_batch=True",
    ),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_failures_are_one_line_exit_2_and_leave_no_run_folder(capsys, tmp_path, offline, case) -> None:
    args, expected = FAILURES[case]
    make_blocker(tmp_path)
    bad_checkpoints(tmp_path)
    before = everything_under(tmp_path)
    line = fails(capsys, "fit", *args, *QUIET)
    assert re.search(expected, line), line
    assert everything_under(tmp_path) == before  # no lightning_logs/version_N, no data folder


def test_a_traceback_on_request(capsys, monkeypatch) -> None:
    monkeypatch.setenv("LALR_TRACEBACK", "1")
    with pytest.raises(Exception, match="max_epochs"):
        main(["fit", "--trainer.max_epochs", "-2", *QUIET])
