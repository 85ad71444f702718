"""The plain-PyTorch examples run in fast mode, and the traces plot is drawn from an event file."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"lalr_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_pytorch_example_trains_all_six_optimizers(capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    example = load(EXAMPLES / "plain_pytorch.py")
    accuracies = example.main(["--fast"])
    methods = ("MoMo", "MoMoAdam", "QLAB", "HierarchicalHD", "AdaL", "StepTunedSGD")
    assert [name.split()[0] for name in accuracies] == list(methods)
    # One epoch on the digits (1437 images): every method learns well beyond chance (0.1).
    low = {name: acc for name, acc in accuracies.items() if not acc > 0.5}
    assert not low, low
    printed = capsys.readouterr().out
    assert len(re.findall(r"test accuracy \d\.\d{3}", printed)) == 6


@pytest.mark.multiprocess
def test_ddp_example_keeps_the_replicas_identical() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "ddp.py"), "--fast"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # exit status 1 means the replicas differ
    assert "replicas identical: True (largest parameter difference 0)" in done.stdout, done.stdout
    accuracy = float(re.search(r"test accuracy (\d\.\d+)", done.stdout).group(1))
    assert 0.2 < accuracy <= 1.0  # 8 steps of MoMo moved the model off chance level


# ----------------------------------------------------------------------------- docs/make_traces_plot.py


def write_events(logdir: Path) -> dict[str, list[float]]:
    """A tiny run with the tags AdaptiveLRMonitor and ImageClassifier write: MoMo capped, then not."""
    from torch.utils.tensorboard import SummaryWriter

    values = {
        "train_loss": [2.3, 1.4, 0.8, 0.5, 0.3, 0.2],
        "adaptive_lr/MoMo/group0/lr": [1.0] * 6,
        "adaptive_lr/MoMo/group0/effective_lr": [1.0, 1.0, 0.4, 0.3, 0.35, 1.0],
        "adaptive_lr/MoMo/group0/tau": [1.0, 1.0, 0.4, 0.3, 0.35, 1.0],
        "adaptive_lr/MoMo/group0/lower_bound": [0.0] * 6,
        "epoch": [0.0, 0.0, 1.0, 1.0, 2.0, 2.0],
    }
    writer = SummaryWriter(str(logdir / "version_0"))
    for step in range(6):
        for tag, series in values.items():
            writer.add_scalar(tag, series[step], global_step=step)
    writer.close()
    return values


def test_traces_plot_reads_the_monitor_tags_and_writes_a_png(tmp_path: Path) -> None:
    plot = load(ROOT / "docs" / "make_traces_plot.py")
    written = write_events(tmp_path / "logs")

    scalars = plot.load_scalars(plot.find_run(tmp_path / "logs"))
    for tag, series in written.items():
        steps, values = scalars[tag]
        assert steps.tolist() == list(range(6))
        assert values.tolist() == pytest.approx(series)  # stored as float32 by TensorBoard

    out = plot.main([str(tmp_path / "logs"), "--out", str(tmp_path / "picture" / "traces.png"), "--window", "3"])
    assert out == tmp_path / "picture" / "traces.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_traces_plot_says_when_the_run_has_no_step_sizes(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    plot = load(ROOT / "docs" / "make_traces_plot.py")
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("train_loss", 1.0, global_step=0)
    writer.close()
    with pytest.raises(ValueError, match="AdaptiveLRMonitor"):
        plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        empty = tmp_path / "empty"
        empty.mkdir()
        plot.find_run(empty)
