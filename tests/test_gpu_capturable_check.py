"""benchmarks/gpu_capturable_check.py, in the CPU mode the test suite can run (tiny shapes)."""

from __future__ import annotations

import torch

from benchmarks import gpu_capturable_check as check


def test_the_cpu_part_runs_and_finds_parity(capsys) -> None:
    assert check.main(["--steps", "2"], shapes=[torch.Size([16, 8]), torch.Size([16])]) == 0
    out = capsys.readouterr().out
    for name in check.METHODS:
        assert f"{name:10s} parity        ok" in out
        assert f"| {name} capturable |" in out
    assert "parts 1 and 3 need a GPU" in out


def test_parity_sees_a_difference() -> None:
    """The parity check can fail: a capturable step with another cap differs from the default one."""
    original = check.METHODS["MoMo"]
    try:
        check.METHODS["MoMo"] = lambda params, **kw: original(params, **kw) if not kw.get("capturable") else lalr_momo_other_cap(params, **kw)
        result = check.parity("MoMo", torch.device("cpu"))
    finally:
        check.METHODS["MoMo"] = original
    assert not result["ok"] and result["max_rel_diff"] > 1e-3


def lalr_momo_other_cap(params, **kw):
    import lightning_adaptive_lr as lalr

    return lalr.MoMo(params, lr=1e-4, **kw)


def test_the_graph_part_feeds_every_step_its_inputs() -> None:
    """Part 3's plumbing on the CPU, with a stand-in capture that replays by calling the step: the
    static loss, gradients and (QLAB's probe) batch take each step's values, so the replayed run
    equals the eager one.  A feed that missed one of them would differ."""
    for name in ("MoMo", "StepTuned", "QLAB-adam"):
        result = check.graph(name, torch.device("cpu"), steps=12, capture=check.EagerCapture())
        assert result["ok"], (name, result)
        assert result["max_rel_diff"] == 0.0, (name, result)
