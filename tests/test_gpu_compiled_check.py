"""benchmarks/gpu_compiled_check.py in the CPU mode the test suite can run (Inductor's C++ kernels)."""

from __future__ import annotations

import torch

from benchmarks import gpu_compiled_check as check


def test_the_cpu_run_finds_parity_and_equal_skips(capsys) -> None:
    assert check.main(["--steps", "8", "--only", "QLAB-sgdm", "StepTunedSGD", "HierarchicalHD-sgdn"]) == 0
    out = capsys.readouterr().out
    for name in ("QLAB-sgdm", "StepTunedSGD", "HierarchicalHD-sgdn"):
        assert f"{name:20s} ok" in out
    assert "'skipped': (1, 1)" in out


def test_parity_sees_a_difference(monkeypatch) -> None:
    """The check can fail: a compiled optimizer built with another lr differs from the eager one."""
    make, probe, tolerance = check.METHODS["HierarchicalHD-sgd"]
    other = lambda p, **kw: make(p, **kw) if not kw.get("compiled") else make([{"params": list(p), "lr": 0.5}], **kw)  # noqa: E731
    monkeypatch.setitem(check.METHODS, "HierarchicalHD-sgd", (other, probe, tolerance))
    result = check.parity("HierarchicalHD-sgd", torch.device("cpu"), steps=8)
    assert not result["ok"] and result["max_rel_diff"] > 1e-3
