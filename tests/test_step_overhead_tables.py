"""benchmarks/step_overhead.py's tables from given times (nothing is timed here)."""

from __future__ import annotations

from benchmarks import step_overhead as so


def test_the_floor_table_takes_the_fastest_path_and_judges_it_against_1_2_times_the_floor() -> None:
    # MoMo's floor is 8/5 = 1.6 accesses against fused SGD-M: target 1.92.
    times = {so.SGDM_FUSED: [1.0, 2.0, 1.0], "MoMo (compiled)": [1.9, 3.8, 1.9], "MoMo": [3.0, 6.0, 3.0]}
    table = so.floor_table(times)
    row = next(line for line in table.splitlines() if line.startswith("| MoMo |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "8 / 5" and cells[3] == "1.60" and cells[4] == "1.92"
    assert cells[5] == "MoMo (compiled)" and cells[6] == "1.90 met" and cells[7] == "1.19"
    slower = so.floor_table({so.SGDM_FUSED: [1.0], "MoMo": [2.5]})
    assert "| MoMo | " in slower and "2.50 missed" in slower and "1.56 |" in slower


def test_methods_without_a_measured_row_are_left_out() -> None:
    assert so.floor_table({so.ADAM_FUSED: [1.0]}).count("\n") == 1  # the header only


def test_a_method_measured_without_its_fused_baseline_is_left_out() -> None:
    assert so.floor_table({"MoMo": [2.0], so.ADAM: [1.0]}).count("\n") == 1


def test_host_only_keeps_the_tensor_count_and_cuts_every_tensor() -> None:
    import torch

    full = so.resnet18_parameters(torch.device("cpu"))
    cut = so.resnet18_parameters(torch.device("cpu"), host_only=True)
    assert len(cut) == len(full) == 62
    for a, b in zip(full, cut):
        assert b.numel() == min(a.numel(), so.HOST_ONLY_ELEMENTS)
        assert torch.equal(b, a.reshape(-1)[: b.numel()])
