"""The learning-rate sensitivity sweep (``lalr sweep``, lightning_adaptive_lr/sweep.py, and its
benchmark entry benchmarks/lr_sensitivity.py): outputs, resuming, the robust-range computation,
divergence.  Small grids, one epoch: a few seconds in all."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import ClassVar

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

    def counting(method: str, lr: float, seed: int, epochs: int, batch_size: int, *rest: object) -> lrs.RunResult:
        calls.append((method, lr, seed))
        result = real(method, lr, seed, epochs, batch_size, *rest)  # type: ignore[arg-type]
        run_results[(method, lr, seed)] = result
        return result

    monkeypatch.setattr(lrs, "train_run", counting)
    return calls


@pytest.fixture
def no_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing the figure (seconds of matplotlib) in tests that do not look at it."""
    monkeypatch.setattr(lrs, "plot", lambda *args, **kwargs: None)


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
        assert float(row["score"]) == measured.score
        assert row["task"] == "mlp" and row["schedule"] == "constant" and row["steps"] == "40"
        assert float(row["seconds"]) > 0.0
        assert row["epochs"] == "1" and row["batch_size"] == "32"
    assert (tmp_path / lrs.PNG_NAME).read_bytes()[:8] == PNG_MAGIC
    table = (tmp_path / lrs.MD_NAME).read_text()
    assert "| **MoMo** |" in table and "| SGD-M (baseline) |" in table
    assert "robust range" in table


def test_divergence_is_recorded(tmp_path: Path, counted_runs: list, no_plot: None) -> None:
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
    accs = {(r["method"], round(math.log10(float(r["lr"])))): float(r["score"]) for r in rows}
    assert accs[("MoMo", 3)] > 0.5
    # The table names the first rate at which a seed diverged.
    lines = (tmp_path / lrs.MD_NAME).read_text().splitlines()
    sgdm = next(line for line in lines if line.startswith("| SGD-M (baseline)"))
    assert sgdm.rstrip().endswith("| 1e2 | 1 of 2 | n/a |")  # no Adam row: no time ratio


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


def test_resuming_skips_the_runs_already_in_the_csv(tmp_path: Path, counted_runs: list, no_plot: None) -> None:
    _quick(tmp_path)
    assert len(counted_runs) == 4

    _quick(tmp_path)  # everything is done: no training at all
    assert len(counted_runs) == 4
    assert len(_csv_rows(tmp_path / lrs.CSV_NAME)) == 4

    _quick(tmp_path, "--seeds", "2")  # only the new seed's runs
    assert len(counted_runs) == 8
    assert {seed for _, _, seed in counted_runs[4:]} == {1}
    assert len(_csv_rows(tmp_path / lrs.CSV_NAME)) == 8


def test_resuming_after_an_interruption_mid_write(tmp_path: Path, counted_runs: list, no_plot: None) -> None:
    _quick(tmp_path)
    path = tmp_path / lrs.CSV_NAME
    lines = path.read_text().splitlines(keepends=True)
    cut = lines[-1][: len(lines[-1]) // 2]  # the last row half written, no newline
    path.write_text("".join(lines[:-1]) + cut)
    lost = lines[-1].split(",")
    del counted_runs[:]

    _quick(tmp_path)

    field = {name: i for i, name in enumerate(lrs.FIELDS)}
    cut_run = (lost[field["method"]], float(lost[field["lr"]]), int(lost[field["seed"]]))
    assert counted_runs == [cut_run]  # only the cut row is run again
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
    assert cells[8] == "1 of 12"
    assert cells[9] == "1.00x"  # its own time per step


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
        return sorted((r["lr"], r["score"], r["train_loss"]) for r in rows)

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


def test_a_table_read_back_from_the_csv_says_so(tmp_path: Path, counted_runs: list, no_plot: None) -> None:
    _quick(tmp_path)
    _quick(tmp_path)  # everything is in runs.csv already
    assert len(counted_runs) == 4
    assert "read back from an earlier invocation" in (tmp_path / lrs.MD_NAME).read_text()


# --------------------------------------------------------------------------- tasks, schedules, competitors


def test_the_default_task_is_the_digits_mlp_with_its_eleven_rows() -> None:
    # `lalr sweep` without --task: today's sweep, so earlier outputs and docs stay comparable.
    assert lrs.TASKS["mlp"].methods == (
        "MoMo", "QLAB-sgd", "HierarchicalHD-sgdn", "HD-sgdn-global", "StepTunedSGD", "MoMoAdam",
        "QLAB-adam", "AdaL", "SGD-M damp=0.9", "SGD-M", "Adam",
    )  # fmt: skip
    assert lrs.task_grid(lrs.TASKS["mlp"], lrs.METHOD_BY_NAME["MoMo"], 13)[0] == pytest.approx(1e-3)
    assert lrs.default_out("mlp", "constant") == Path("lr_sensitivity")
    assert lrs.default_out("lm", "warmup-cosine") == Path("lr_sensitivity_lm_warmup-cosine")


def test_robust_range_of_a_loss_by_hand() -> None:
    # Losses at 1e-3 .. 1e1 (rates out of order): sorted 3.10, 2.70, 2.64, 2.60, 2.66, 2.61, inf.
    # Best 2.60 at 1e-1; within 0.05 nats: 2.64 (1e-2) yes, 2.70 no; 2.66 (3e-1... here 1e0) no,
    # so 2.61 beyond it does not count.  Range 1e-2 .. 1e-1: one decade.
    rates = [1e-1, 1e-3, 1e-2, 3e-3, 1.0, 3.0, 10.0]
    losses = [2.60, 3.10, 2.64, 2.70, 2.66, 2.61, math.inf]
    r = lrs.robust_range(rates, losses, higher_is_better=False, tolerance=0.05)
    assert (r.low, r.high) == (pytest.approx(1e-2), pytest.approx(1e-1))
    assert r.decades == pytest.approx(1.0) and not r.open_low and not r.open_high
    # A NaN is the worst score, never the best.
    r = lrs.robust_range([1e-2, 1e-1, 1.0], [math.nan, 2.5, 2.52], higher_is_better=False, tolerance=0.05)
    assert (r.low, r.high, r.open_high) == (pytest.approx(0.1), pytest.approx(1.0), True)
    # The LM tasks use 0.05 nats; the CNN keeps rates within 0.5 % of the best accuracy.
    lm, cnn = lrs.TASKS["lm"], lrs.TASKS["cnn"]
    assert lrs.task_robust_range(lm, [1e-3, 1e-2, 1e-1], [2.66, 2.60, 2.651]).decades == pytest.approx(0.0)
    assert lrs.task_robust_range(lm, [1e-3, 1e-2, 1e-1], [2.66, 2.60, 2.649]).decades == pytest.approx(1.0)
    # 0.995 · 0.990 = 0.98505: 0.986 is in, 0.984 is out.
    assert lrs.task_robust_range(cnn, [1e-3, 1e-2, 1e-1], [0.984, 0.990, 0.986]).decades == pytest.approx(1.0)


def test_loss_table_takes_the_lowest_median() -> None:
    rows = [
        lrs.Row("Adam", True, lr, seed, 4, 16, loss, 2.5, 2.9, False, 1.0, "lm", "constant", 400)
        for lr, losses in {1e-3: (2.70, 2.72), 1e-2: (2.60, 2.64), 1e-1: (2.64, 2.70)}.items()
        for seed, loss in enumerate(losses)
    ]
    (curve,) = lrs.curves(rows, [lrs.METHOD_BY_NAME["Adam"]])
    text = lrs.markdown([curve], "t", lrs.TASKS["lm"])
    line = next(x for x in text.splitlines() if x.startswith("| Adam (baseline)"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # Medians 2.71, 2.62, 2.67: the best is 2.62 at 1e-2; 2.67 is within 0.05, 2.71 is not.
    assert cells[2] == "2.620 [2.600, 2.640]" and cells[3] == "1e-2"
    assert cells[5] == "≥ 1.0 decades" and cells[6] == "1e-2 .. 1e-1"
    assert "best val loss" in text and "within 0.05 of the best" in text
    assert cells[9] == "1.00x"


def test_warmup_cosine_factor_by_hand() -> None:
    f = lrs.schedule_factor("warmup-cosine", 40)  # 4 warm-up steps, then 36 of cosine
    assert [f(k) for k in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(22) == pytest.approx(0.5)  # half-way through the decay: cos(π/2) = 0
    assert f(39) == pytest.approx(0.5 * (1 + math.cos(math.pi * 35 / 36)))
    assert lrs.schedule_factor("constant", 40)(17) == 1.0
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lrs.schedule_factor("linear", 10)


class _RecordingSGD(torch.optim.SGD):
    """Plain SGD that records the lr of every step, and (as Schedule-Free does) train/eval calls."""

    log: ClassVar[list[object]] = []

    def step(self, closure=None):  # type: ignore[override]
        self.log.append(self.param_groups[0]["lr"])
        return super().step(closure)

    def train(self) -> None:
        self.log.append("train")

    def eval(self) -> None:
        self.log.append("eval")


def test_the_schedule_is_applied_to_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    _RecordingSGD.log = []
    method = lrs.Method("rec", lambda p, lr: _RecordingSGD(p, lr=lr), (-2, -2), "sgd", step_kind="plain")
    monkeypatch.setitem(lrs.METHOD_BY_NAME, "rec", method)
    lrs.train_run("rec", 0.02, 0, 1, 32, "mlp", "warmup-cosine")  # 40 steps
    f = lrs.schedule_factor("warmup-cosine", 40)
    assert _RecordingSGD.log == pytest.approx([0.02 * f(k) for k in range(40)])


def test_schedule_free_switching_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # train() before the first step, eval() around every evaluation and train() again after it:
    # initial loss, after epoch 1, final training loss, test accuracy (MLP, 2 epochs of 40 steps).
    _RecordingSGD.log = []
    method = lrs.Method(
        "sf", lambda p, lr: _RecordingSGD(p, lr=lr), (-2, -2), "sgd", step_kind="plain", schedule_free=True
    )
    monkeypatch.setitem(lrs.METHOD_BY_NAME, "sf", method)
    lrs.train_run("sf", 0.01, 0, 2, 32)
    modes = ["train", "eval", "train"]
    steps = [0.01] * 40
    assert _RecordingSGD.log == ["train", *modes[1:], *steps, *modes[1:], *steps, *modes[1:], *modes[1:]]


def test_schedule_free_batchnorm_statistics_use_the_evaluation_weights() -> None:
    # eval() doubles the weight (as if moving to the averaged point), train() halves it back.
    class Doubling(torch.optim.SGD):
        def eval(self) -> None:
            with torch.no_grad():
                model[0].weight.mul_(2.0)

        def train(self) -> None:
            with torch.no_grad():
                model[0].weight.div_(2.0)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2, bias=False), torch.nn.BatchNorm1d(2))
    optimizer = Doubling(model.parameters(), lr=0.1)
    method = lrs.Method("sf", lambda p, lr: optimizer, (0, 0), "sgd", schedule_free=True)
    batches = [torch.randn(8, 3), torch.randn(5, 3)]
    model(torch.randn(4, 3))  # some running statistics from training
    before = [model[1].running_mean.clone(), model[1].running_var.clone()]
    weight = model[0].weight.detach().clone()

    with lrs.evaluating(model, optimizer, method, batches):
        assert not model.training
        # Cumulative averages, over the two batches, of the doubled weights' batch statistics.
        outs = [x @ (2 * weight).T for x in batches]
        assert model[1].running_mean == pytest.approx(((outs[0].mean(0) + outs[1].mean(0)) / 2).tolist())
        var = [o.var(0, unbiased=True) for o in outs]
        assert model[1].running_var == pytest.approx(((var[0] + var[1]) / 2).tolist(), rel=1e-5)

    assert model.training
    assert torch.equal(model[0].weight, weight)  # train() undid eval()
    assert torch.equal(model[1].running_mean, before[0]) and torch.equal(model[1].running_var, before[1])


def test_qlab_probe_leaves_batchnorm_statistics_alone() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    optimizer = lrs.METHOD_BY_NAME["QLAB-adam"].make(model.parameters(), 1e-2)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    after_training_pass = model[1].running_mean.clone()
    probes = []

    def probe() -> torch.Tensor:
        probes.append(1)
        return torch.nn.functional.cross_entropy(model(x), y)

    lrs._step(optimizer, "probe", loss.detach(), model, probe)
    assert probes == [1]  # QLAB ran the probe: a training-mode forward pass...
    assert torch.equal(model[1].running_mean, after_training_pass)  # ...that moved no statistic


def test_shift_moves_each_image_by_at_most_one_pixel() -> None:
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    out = lrs._shift(x, torch.Generator().manual_seed(0), background=-1.0)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    for i in range(2):
        windows = [padded[i, :, dy : dy + 4, dx : dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_cnn_task_learns_the_digits() -> None:
    result = lrs.train_run("Adam", 3e-3, 0, 1, 32, "cnn")  # one epoch, 40 steps
    assert not result.diverged
    assert result.score > 0.6  # chance is 0.1; measured 0.93


def test_language_model_sweep_writes_nats_per_character(tmp_path: Path, counted_runs: list, no_plot: None) -> None:
    lrs.main(["--task", "lm", "--methods", "Adam,MoMo-Adam", "--points", "2", "--seeds", "1", "--epochs", "1",
              "--steps-per-epoch", "4", "--jobs", "1", "--out", str(tmp_path)])  # fmt: skip
    rows = _csv_rows(tmp_path / lrs.CSV_NAME)
    assert sorted((r["method"], round(math.log10(float(r["lr"])))) for r in rows) == [
        ("Adam", -4), ("Adam", 0), ("MoMoAdam", -4), ("MoMoAdam", 0),
    ]  # fmt: skip
    for row in rows:
        assert row["task"] == "lm" and row["steps"] == "4" and row["batch_size"] == "16"
        # ln 97 = 4.575 nats per character is the uniform guess; 4 steps stay near it.
        assert 3.0 < float(row["score"]) < 6.0 or row["diverged"] == "True"
    table = (tmp_path / lrs.MD_NAME).read_text()
    assert "best val loss" in table and "nats per character" in table


def test_missing_competitors_are_skipped_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_runs: list, capsys: pytest.CaptureFixture, no_plot: None
) -> None:
    for name in ("prodigyopt", "schedulefree", "dadaptation"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    lrs.main(["--quick", "--methods", "Adam,Prodigy,SF-AdamW,DAdapt-Adam", *TINY, "--jobs", "1", "--out", str(tmp_path)])

    assert {m for m, _, _ in counted_runs} == {"Adam"}
    err = capsys.readouterr().err
    for method, package in (("Prodigy", "prodigyopt"), ("ScheduleFree-AdamW", "schedulefree"), ("DAdapt-Adam", "dadaptation")):
        assert f"skipped {method}: needs the optional package {package}" in err
    assert "[bench]" in err
    assert "Skipped: Prodigy" in (tmp_path / lrs.MD_NAME).read_text()


def test_only_skipped_methods_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(SystemExit) as exit_info:
        lrs.main(["--methods", "Prodigy", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "every method asked for was skipped" in capsys.readouterr().err


def test_a_present_competitor_is_trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counted_runs: list, no_plot: None) -> None:
    # Stand-ins for the optional packages, so this runs whether or not they are installed.
    fake = type(sys)("prodigyopt")
    fake.Prodigy = lambda params, lr: torch.optim.SGD(params, lr=lr)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "prodigyopt", fake)
    lrs.main(["--quick", "--methods", "Prodigy", *TINY, "--jobs", "1", "--out", str(tmp_path)])
    rows = _csv_rows(tmp_path / lrs.CSV_NAME)
    assert sorted(round(math.log10(float(r["lr"]))) for r in rows) == [-3, 3]
    assert {r["baseline"] for r in rows} == {"True"}


def test_help_lists_every_method_and_a_quoting_free_alias(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        lrs.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in (*lrs.METHOD_BY_NAME, "SGD-M-damp", "SF-AdamW", "lm-comments", "warmup-cosine"):
        assert name in out
    assert lrs.resolve_method("SGD-M-damp") is lrs.METHOD_BY_NAME["SGD-M damp=0.9"]


def test_alias_runs_the_method(tmp_path: Path, counted_runs: list, no_plot: None) -> None:
    lrs.main(["--quick", "--methods", "SGD-M-damp", *TINY, "--jobs", "1", "--out", str(tmp_path)])
    assert {m for m, _, _ in counted_runs} == {"SGD-M damp=0.9"}


def test_unwritable_out_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "--quick", "--methods", "Adam", "--out", str(blocker / "sub")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write to --out" in err and "Traceback" not in err


def test_a_csv_of_the_earlier_layout_is_read_and_resumed(tmp_path: Path, counted_runs: list, no_plot: None) -> None:
    # The header and one row as the sweep wrote them before tasks and schedules existed.
    old = (
        "method,baseline,lr,seed,epochs,batch_size,test_acc,train_loss,first_epoch_loss,diverged,seconds\n"
        "MoMo,False,0.001,0,1,32,0.25,2.0,2.1,False,0.5\n"
    )
    (tmp_path / lrs.CSV_NAME).write_text(old)
    (row,) = lrs.read_rows(tmp_path / lrs.CSV_NAME)
    assert (row.task, row.schedule, row.score, row.steps) == ("mlp", "constant", 0.25, 40)

    lrs.main(["--quick", "--methods", "MoMo", *TINY, "--jobs", "1", "--out", str(tmp_path)])
    assert [round(math.log10(lr)) for _, lr, _ in counted_runs] == [3]  # 1e-3 was already there
    rows = _csv_rows(tmp_path / lrs.CSV_NAME)
    assert len(rows) == 2 and set(rows[0]) == set(lrs.FIELDS)
    assert rows[0]["score"] == "0.25"


def test_the_benchmark_entry_names_the_task_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmark_entry, "DEFAULT_OUT", tmp_path / "results" / "lr_sensitivity")
    assert benchmark_entry.output_folder(["--quick"]) == tmp_path / "results" / "lr_sensitivity"
    assert benchmark_entry.output_folder(["--task", "lm"]) == tmp_path / "results" / "lr_sensitivity_lm"
    assert (
        benchmark_entry.output_folder(["--task", "cnn", "--schedule", "warmup-cosine"])
        == tmp_path / "results" / "lr_sensitivity_cnn_warmup-cosine"
    )


def test_bench_extra_lists_the_competitors() -> None:
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    bench = config["options.extras_require"]["bench"]
    for package in ("prodigyopt", "schedulefree", "dadaptation"):
        assert package in bench
        assert package in {m.requires for m in lrs.METHODS}


def test_lb_none_rows_sit_beside_their_lb_zero_rows_on_the_language_models() -> None:
    for name in ("lm", "lm-comments"):
        methods = lrs.TASKS[name].methods
        assert methods.index("MoMo lb=None") == methods.index("MoMo") + 1
        assert methods.index("MoMoAdam lb=None") == methods.index("MoMoAdam") + 1
        assert lrs.TASKS[name].grid_of(lrs.METHOD_BY_NAME["MoMoAdam lb=None"]) == (-4.0, 0.0)
    for name in ("mlp", "cnn"):  # there they run when asked for (--methods)
        assert not set(lrs.LB_NONE) & set(lrs.TASKS[name].methods)
    assert lrs.resolve_method("MoMo-lbNone") is lrs.METHOD_BY_NAME["MoMo lb=None"]
    assert lrs.resolve_method("MoMo-Adam-lbNone") is lrs.METHOD_BY_NAME["MoMoAdam lb=None"]


def test_each_row_builds_the_optimizer_it_names() -> None:
    params = [torch.nn.Parameter(torch.zeros(3))]
    for name, lb in (("MoMo", 0.0), ("MoMo lb=None", None), ("MoMoAdam", 0.0), ("MoMoAdam lb=None", None)):
        group = lrs.METHOD_BY_NAME[name].make(params, 0.1).param_groups[0]
        assert group["lb"] == lb and group["lr"] == 0.1
    # QLAB-adam: the constructor's defaults, which anchor its rate to lr on Adam.
    qlab = lrs.METHOD_BY_NAME["QLAB-adam"].make(params, 1e-3).param_groups[0]
    assert qlab["base"] == "adam" and qlab["max_lr_scale"] == 1.0


def test_lb_none_alias_trains_on_the_language_model(tmp_path: Path, counted_runs: list, no_plot: None) -> None:
    lrs.main(["--task", "lm", "--methods", "MoMo-Adam-lbNone", "--points", "1", "--seeds", "1", "--epochs", "1",
              "--steps-per-epoch", "3", "--jobs", "1", "--out", str(tmp_path)])  # fmt: skip
    (row,) = _csv_rows(tmp_path / lrs.CSV_NAME)
    assert row["method"] == "MoMoAdam lb=None" and row["baseline"] == "False"
    assert "MoMoAdam lb=None" in (tmp_path / lrs.MD_NAME).read_text()


def _write_rows(folder: Path, rows: list[lrs.Row]) -> None:
    folder.mkdir(parents=True)
    appender = lrs.CsvAppender(folder / lrs.CSV_NAME)
    for row in rows:
        appender.write(row)
    appender.close()


def test_sweep_tables_show_a_changed_row_before_and_after(tmp_path: Path) -> None:
    from benchmarks import sweep_tables

    def row(method: str, lr: float, score: float) -> lrs.Row:
        return lrs.Row(method, False, lr, 0, 4, 16, score, score, score, False, 1.0, "lm", "constant", 400)

    lrs_grid = (1e-4, 1e-3, 1e-2)
    _write_rows(tmp_path / "after" / "lm", [row(m, lr, s) for m, scores in (
        ("Adam", (3.0, 2.6, 2.8)), ("QLAB-adam", (3.0, 2.5, 2.7)), ("MoMoAdam lb=None", (2.9, 2.6, 2.62)),
    ) for lr, s in zip(lrs_grid, scores)])  # fmt: skip
    _write_rows(tmp_path / "before" / "lm", [row(m, lr, s) for m, scores in (
        ("Adam", (9.0, 9.0, 9.0)), ("QLAB-adam", (2.8, 2.8, 2.9)),
    ) for lr, s in zip(lrs_grid, scores)])  # fmt: skip
    text = sweep_tables.tables(tmp_path / "after", tmp_path / "before", ["QLAB-adam"])
    lines = [line for line in text.splitlines() if line.startswith("| **") or line.startswith("| Adam")]
    # The task's order (MoMoAdam lb=None before QLAB-adam), the before row right after its own,
    # unchanged methods only from the current folder.
    assert [line.split("|")[1].strip() for line in lines[:4]] == [
        "**MoMoAdam lb=None**", "**QLAB-adam**", "**QLAB-adam (before)**", "Adam (baseline)",
    ]  # fmt: skip
    assert "| **QLAB-adam (before)** | 1e-4 .. 1e-2 | 2.800 [2.800, 2.800] | 1e-4 |" in text
    assert "9.000" not in text
    with pytest.raises(SystemExit):
        sweep_tables.main(["--results", str(tmp_path / "after"), "--changed", "QLAB-adam"])  # no --before


@pytest.mark.parametrize("task", ["mlp", "lm"])
def test_a_run_the_optimizer_stops_counts_as_diverged(monkeypatch: pytest.MonkeyPatch, task: str) -> None:
    """Finite losses but non-finite gradients (HierarchicalHD met them at large rates on the MLP):
    after ``max_consecutive_skips`` skipped steps the optimizer stops the run with a RuntimeError;
    the sweep records a diverged run instead of crashing."""
    import lightning_adaptive_lr as lalr

    method = lrs.Method("MoMo-stops", lambda p, lr: lalr.MoMo(p, lr=lr, max_consecutive_skips=3), (-3, 3), "sgd")
    monkeypatch.setitem(lrs.METHOD_BY_NAME, method.name, method)
    real = lrs._step

    def with_nan_gradients(optimizer, kind, loss, model, probe) -> None:
        for p in model.parameters():
            p.grad.fill_(math.nan)
        real(optimizer, kind, loss, model, probe)

    monkeypatch.setattr(lrs, "_step", with_nan_gradients)
    result = lrs.train_run("MoMo-stops", 1.0, 0, 1, 32, task, "constant", 10)
    assert result.diverged


def test_other_errors_of_a_step_are_not_taken_for_divergence(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug, not a divergence")

    monkeypatch.setattr(lrs, "_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        lrs.train_run("MoMo", 1.0, 0, 1, 32)
