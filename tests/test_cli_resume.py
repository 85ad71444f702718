"""Resume after a crash: `lalr fit` is killed with SIGKILL mid-run, then the same command with
`--ckpt_path last` goes on from the last checkpoint, in the same run folder, to the end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

EPOCHS, BATCHES = 30, 4  # 120 optimizer steps; a checkpoint at the end of every epoch

CONFIG = {
    "seed_everything": 0,
    "trainer": {
        "max_epochs": EPOCHS,
        "limit_train_batches": BATCHES,
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    },
    "model": {"class_path": "lightning_adaptive_lr.tasks.ImageClassifier", "init_args": {"hidden_sizes": [16]}},
    "data": {"class_path": "lightning_adaptive_lr.tasks.DigitsDataModule", "init_args": {"batch_size": 32}},
    "optimizer": {"class_path": "lightning_adaptive_lr.MoMo", "init_args": {"lr": 1.0}},
}


def command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lightning_adaptive_lr", "fit", "--config", str(config), *extra]


def wait_for_checkpoint(process: subprocess.Popen, path: Path, timeout: float = 240.0) -> None:
    """Until ``path`` exists and the process is still running (it writes the file atomically)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def train_loss_steps(run: Path) -> list[list[int]]:
    """The steps of `train_loss` in each event file of ``run``, in the order the files were written."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = sorted(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    steps = []
    for file in files:
        found = []
        for event in EventFileLoader(str(file)).Load():
            if any(value.tag == "train_loss" for value in event.summary.value):
                found.append(event.step)
        steps.append(found)
    return steps


@pytest.mark.slow
def test_a_killed_fit_resumes_with_ckpt_path_last(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = tmp_path / "lightning_logs" / "version_0"
    last = run / "checkpoints" / "last.ckpt"

    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command(config), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_checkpoint(process, last)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished
    killed_at = torch.load(last, weights_only=True, map_location="cpu")["global_step"]
    assert 0 < killed_at < EPOCHS * BATCHES

    done = subprocess.run(
        command(config, "--ckpt_path", "last"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    restored = re.search(r"Restored all states from the checkpoint at (\S+)", done.stderr)
    assert restored and (tmp_path / restored.group(1)).resolve() == last.resolve(), done.stderr[-3000:]
    # The same run folder, carried to the end.
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    final = torch.load(last, weights_only=True, map_location="cpu")
    assert final["global_step"] == EPOCHS * BATCHES and final["epoch"] == EPOCHS - 1
    # The resumed process logged only the steps after the checkpoint: it did not start from scratch.
    killed_steps, resumed_steps = train_loss_steps(run)
    assert killed_steps[0] == 0 and resumed_steps[0] >= killed_at and resumed_steps[-1] == EPOCHS * BATCHES - 1
    saved = yaml.safe_load((run / "config.yaml").read_text())["ckpt_path"]  # the file, not "last"
    assert (tmp_path / saved).resolve() == last.resolve()
