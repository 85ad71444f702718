"""The learning-rate sensitivity sweep (``lalr sweep``, lightning_adaptive_lr/sweep.py, and its
benchmark entry benchmarks/lr_sensitivity.py): outputs, resuming, the robust-range computation,
divergence.  Small grids, one epoch: a few seconds in all."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import lr_sensitivity as benchmark_entry
from lightning_adaptive_lr import cli
from lightning_adaptive_lr import sweep as lrs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: On top of --quick: 2 rates per method and 1 epoch.
TINY = ("--points", "2", "--epochs", "1")


@pytest.fixture
def run_results() -> dict[tuple[str, float, int], lrs.RunResult]:
    """What each training run of ``counted_runs`` returned, by (method, lr, seed)."""
    return {}


@pytest.fixture
def counted_runs(
    monkeypatch: pytest.MonkeyPatch, run_results: dict[tuple[str, float, int], lrs.RunResult]
) -> list[tuple[str, float, int]]:
    """Replace the training function by one that records each call and then trains for real."""
    calls: list[tuple[str, float, int]] = []
    real = lrs.train_run

    def counting(method: str, lr: float, seed: int, epochs: int, batch_size: int) -> lrs.RunResult:
        calls.append((method, lr, seed))
        result = real(method, lr, seed, epochs, batch_size)
        run_results[(method, lr, seed)] = result
        return result

    monkeypatch.setattr(lrs, "train_run", counting)
    return calls


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _quick(out: Path, *extra: str) -> None:
    # MoMo's grid with 2 points is {1e-3, 1e3}; SGD-M's is {1e-4, 1e2}, where plain SGD with
    # momentum blows up within a few steps.
    lrs.main(["--quick", "--methods", "MoMo,SGD-M", *TINY, "--jobs", "1", "--out", str(out), *extra])


def test_quick_mode_writes_the_csv_the_plot_and_the_table(
    tmp_path: Path, counted_runs: list, run_results: dict
) -> None:
    _quick(tmp_path)

    done = sorted((method, round(math.log10(lr)), seed) for method, lr, seed in counted_runs)
    assert done == [("MoMo", -3, 0), ("MoMo", 3, 0), ("SGD-M", -4, 0), ("SGD-M", 2, 0)]
    rows = _csv_rows(tmp_path / lrs.CSV_NAME)
    assert len(rows) == 4
    assert set(rows[0]) == set(lrs.FIELDS)
    for row in rows:
        # Each row holds what its run measured, unrounded.
        measured = run_results[(row["method"], float(row["lr"]), int(row["seed"]))]
        assert float(row["test_acc"]) == measured.test_acc
        assert float(row["seconds"]) > 0.0
        assert row["epochs"] == "1" and row["batch_size"] == "32"
    assert (tmp_path / lrs.PNG_NAME).read_bytes()[:8] == PNG_MAGIC
    table = (tmp_path / lrs.MD_NAME).read_text()
    assert "| **MoMo** |" in table and "| SGD-M (baseline) |" in table
    assert "robust range" in table


def test_divergence_is_recorded(tmp_path: Path, counted_runs: list) -> None:
    _quick(tmp_path)
    rows = _csv_rows(tmp_path / lrs.CSV_NAME)
    flags = {(r["method"], round(math.log10(float(r["lr"])))): r["diverged"] for r in rows}
    # SGD with momentum 0.9 at lr 100 on a standardized-input MLP: the loss overflows at once.
    assert flags[("SGD-M", 2)] == "True"
    # Tiny rates learn little in one epoch but do not diverge; MoMo's step is capped by its model.
    assert flags[("SGD-M", -4)] == "False"
    assert flags[("MoMo", -3)] == "False"
    assert flags[("MoMo", 3)] == "False"
    # ...and MoMo at lr 1e3 learns in one epoch (10 classes: chance is 0.1; measured 0.88).
    accs = {(r["method"], round(math.log10(float(r["lr"])))): float(r["test_acc"]) for r in rows}
    assert accs[("MoMo", 3)] > 0.5
    # The table names the first rate at which a seed diverged.
    lines = (tmp_path / lrs.MD_NAME).read_text().splitlines()
    sgdm = next(line for line in lines if line.startswith("| SGD-M (baseline)"))
    assert sgdm.rstrip().endswith("| 1e2 |")


def test_finite_but_no_progress_counts_as_diverged(monkeypatch: pytest.MonkeyPatch) -> None:
    # Gradient *ascent* keeps every loss finite but ends above the initial loss.
    def make(params: lrs.Params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, maximize=True)

    ascent = lrs.Method("ascent", make, (-2, -2), "sgd", step_kind="plain")
    monkeypatch.setitem(lrs.METHOD_BY_NAME, "ascent", ascent)
    result = lrs.train_run("ascent", 1e-2, 0, 1, 32)
    assert math.isfinite(result.train_loss)
    assert result.diverged
    # ...and a sensible run is not flagged.
    ok = lrs.train_run("SGD-M", 3e-2, 0, 1, 32)
    assert not ok.diverged and ok.test_acc > 0.5


def test_resuming_skips_the_runs_already_in_the_csv(tmp_path: Path, counted_runs: list) -> None:
    _quick(tmp_path)
    assert len(counted_runs) == 4

    _quick(tmp_path)  # everything is done: no training at all
    assert len(counted_runs) == 4
    assert len(_csv_rows(tmp_path / lrs.CSV_NAME)) == 4

    _quick(tmp_path, "--seeds", "2")  # only the new seed's runs
    assert len(counted_runs) == 8
    assert {seed for _, _, seed in counted_runs[4:]} == {1}
    assert len(_csv_rows(tmp_path / lrs.CSV_NAME)) == 8


def test_resuming_after_an_interruption_mid_write(tmp_path: Path, counted_runs: list) -> None:
    _quick(tmp_path)
    path = tmp_path / lrs.CSV_NAME
    lines = path.read_text().splitlines(keepends=True)
    cut = lines[-1][: len(lines[-1]) // 2]  # the last row half written, no newline
    path.write_text("".join(lines[:-1]) + cut)
    lost = lines[-1].split(",")
    del counted_runs[:]

    _quick(tmp_path)

    assert counted_runs == [(lost[0], float(lost[2]), int(lost[3]))]  # only the cut row is run again
    assert len(lrs.read_rows(path)) == 4


def test_robust_range_by_hand() -> None:
    # Rates given out of order on purpose.  Sorted: 1e-3 .. 1e2 with accuracies
    # 0.50, 0.96, 0.98, 0.99, 0.90, 0.97.  Best 0.99 at lr 1; 97 % of it is 0.9603.
    # Left of the best: 0.98 (lr 0.1) qualifies, 0.96 (lr 0.01) does not.  Right: 0.90 does not;
    # 0.97 at lr 100 would, but it is not contiguous with the best.  Range: 0.1 .. 1, one decade.
    lrs_ = [1.0, 1e-3, 1e2, 1e-1, 1e-2, 10.0]
    accs = [0.99, 0.50, 0.97, 0.98, 0.96, 0.90]
    r = lrs.robust_range(lrs_, accs)
    assert r.low == pytest.approx(0.1) and r.high == pytest.approx(1.0)
    assert r.decades == pytest.approx(1.0)
    assert not r.open_low and not r.open_high

    # Best at the top of the grid: 0.96 → threshold 0.9312; 0.95 qualifies, 0.90 does not.
    r = lrs.robust_range([1.0, 10.0, 100.0], [0.90, 0.95, 0.96])
    assert (r.low, r.high, r.decades) == (10.0, 100.0, pytest.approx(1.0))
    assert r.open_high and not r.open_low

    # A lone best point: zero decades; half-decade grid: 10^-0.5 .. 10^0.5 is one decade.
    assert lrs.robust_range([1e-2, 1e-1, 1.0], [0.2, 0.9, 0.3]).decades == 0.0
    half = [10.0 ** (k / 2) for k in range(-2, 3)]
    r = lrs.robust_range(half, [0.5, 0.95, 0.96, 0.94, 0.5])
    assert r.decades == pytest.approx(1.0) and r.low == pytest.approx(10**-0.5)


def _row(method: str, lr: float, seed: int, acc: float, diverged: bool = False) -> lrs.Row:
    return lrs.Row(method, method == "Adam", lr, seed, 10, 32, acc, 0.1, 0.5, diverged, 1.0)


def test_table_from_hand_made_runs() -> None:
    # Three seeds at four rates; medians by hand: 1e-4: 0.60, 1e-3: 0.95, 1e-2: 0.97, 1e-1: 0.11.
    # Best 0.97 at 1e-2, threshold 0.9409: 1e-3 (0.95) is in, 1e-1 is not → 1e-3 .. 1e-2, 1 decade.
    accs = {1e-4: (0.60, 0.50, 0.70), 1e-3: (0.95, 0.96, 0.90), 1e-2: (0.97, 0.98, 0.96), 1e-1: (0.11, 0.09, 0.12)}
    rows = [
        _row("Adam", lr, seed, acc, diverged=lr == 1e-1 and seed == 2)
        for lr, seeds in accs.items()
        for seed, acc in enumerate(seeds)
    ]
    rows.append(_row("MoMo", 1.0, 0, 0.5))  # another method's run: not mixed in
    (curve,) = lrs.curves(rows, [lrs.METHOD_BY_NAME["Adam"]])
    assert curve.median == pytest.approx([0.60, 0.95, 0.97, 0.11])
    assert curve.low == pytest.approx([0.50, 0.90, 0.96, 0.09])
    assert curve.high == pytest.approx([0.70, 0.96, 0.98, 0.12])
    assert curve.diverged == [0, 0, 0, 1]

    line = next(x for x in lrs.markdown([curve], "t").splitlines() if x.startswith("| Adam (baseline)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "0.970 [0.960, 0.980]"
    assert cells[3] == "1e-2"
    assert cells[5] == "1.0 decades"  # neither end of the grid reached: no "≥"
    assert cells[6] == "1e-3 .. 1e-2"
    assert cells[7] == "1e-1"


def test_non_finite_logits_count_as_wrong() -> None:
    logits = torch.tensor([[math.nan, 0.0], [1.0, 0.0], [0.0, 1.0], [math.inf, 0.0]])
    labels = torch.tensor([0, 0, 0, 0])
    assert lrs._accuracy(logits, labels) == pytest.approx(1 / 4)


@pytest.mark.slow
def test_two_worker_processes(tmp_path: Path) -> None:
    # The process pool (spawned interpreters) gives the same results as the in-process loop.
    lrs.main(["--quick", "--methods", "MoMo", *TINY, "--jobs", "2", "--out", str(tmp_path / "a")])
    lrs.main(["--quick", "--methods", "MoMo", *TINY, "--jobs", "1", "--out", str(tmp_path / "b")])

    def measured(folder: str) -> list[tuple[str, str, str]]:
        rows = _csv_rows(tmp_path / folder / lrs.CSV_NAME)
        return sorted((r["lr"], r["test_acc"], r["train_loss"]) for r in rows)

    assert len(measured("a")) == 2
    assert measured("a") == measured("b")


def test_lalr_sweep_runs_the_sweep(tmp_path: Path, counted_runs: list, capsys: pytest.CaptureFixture) -> None:
    cli.main(["sweep", "--quick", "--methods", "Adam", *TINY, "--jobs", "1", "--out", str(tmp_path)])

    assert sorted(round(math.log10(lr)) for _, lr, _ in counted_runs) == [-5, 1]
    assert len(_csv_rows(tmp_path / lrs.CSV_NAME)) == 2
    assert "| Adam (baseline) |" in (tmp_path / lrs.MD_NAME).read_text()
    assert "wall time" in capsys.readouterr().out


def test_lalr_sweep_rejects_an_unknown_method_by_name(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "--methods", "Momo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "lalr sweep" in err and "unknown method(s) Momo" in err and "MoMoAdam" in err


def test_the_benchmark_entry_writes_into_its_results_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_runs: list
) -> None:
    monkeypatch.setattr(benchmark_entry, "DEFAULT_OUT", tmp_path / "results")
    benchmark_entry.main(["--quick", "--methods", "MoMo", *TINY, "--jobs", "1"])
    assert len(_csv_rows(tmp_path / "results" / lrs.CSV_NAME)) == 2

    # An explicit --out wins over the entry's default.
    benchmark_entry.main(["--quick", "--methods", "MoMo", *TINY, "--jobs", "1", "--out", str(tmp_path / "mine")])
    assert len(_csv_rows(tmp_path / "mine" / lrs.CSV_NAME)) == 2


def test_without_matplotlib_the_csv_and_table_are_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_runs: list, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    _quick(tmp_path)

    assert len(_csv_rows(tmp_path / lrs.CSV_NAME)) == 4
    assert (tmp_path / lrs.MD_NAME).exists()
    assert not (tmp_path / lrs.PNG_NAME).exists()
    assert "needs matplotlib" in capsys.readouterr().err


def test_a_table_read_back_from_the_csv_says_so(tmp_path: Path, counted_runs: list) -> None:
    _quick(tmp_path)
    _quick(tmp_path)  # everything is in runs.csv already
    assert len(counted_runs) == 4
    assert "read back from an earlier invocation" in (tmp_path / lrs.MD_NAME).read_text()
