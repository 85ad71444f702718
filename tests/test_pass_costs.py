"""benchmarks/pass_costs.py: the floor arithmetic from given costs, and a tiny real run (no timing asserted)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import pass_costs as pc
from benchmarks import step_overhead as so

#: Made-up costs in units of fused SGD (nothing timed).
FAKE = {
    "reduce(1)": 0.5,
    "reduce(2)": 0.8,
    "reduce(3)": 1.1,
    "reduce(4)": 1.4,
    "update(2,1,0)": 0.9,
    "update(3,2,0)": 1.6,
    "update(3,2,0)+sum": 2.2,
    "update(4,3,0)": 2.0,
    "update(2,1,1)": 1.5,
    "update(4,3,1)": 2.6,
    "update(3,2,1)": 2.1,
    "update(4,2,0)": 1.9,
    "update(3,1,0)": 1.2,
    "copy": 1.0,
    so.SGD_FUSED: 1.0,
    so.SGDM_FUSED: 1.6,
    so.ADAM_FUSED: 2.0,
}


def _cells(table: str, method: str) -> list[str]:
    row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
    return [c.strip() for c in row.strip("|").split("|")]


def test_the_measured_floor_is_the_sum_of_the_pass_costs_over_the_baselines_cost() -> None:
    # MoMo: reduce(3) + update(3,2,0) against fused SGD-M.
    assert pc.measured_floor(pc.METHODS["MoMo"], FAKE) == pytest.approx((1.1 + 1.6) / 1.6)
    # QLAB-sgd: reduce(1) + two update(2,1,0) against fused SGD.
    assert pc.measured_floor(pc.METHODS["QLAB-sgd"], FAKE) == pytest.approx(0.5 + 0.9 + 0.9)
    # StepTunedSGD: the mean of its two half-steps.
    half_steps = (0.8 + 1.5) + (0.8 + 1.9)
    assert pc.measured_floor(pc.METHODS["StepTunedSGD (per half-step)"], FAKE) == pytest.approx(half_steps / 2)


def test_the_method_table_shows_the_access_floor_the_target_and_the_measured_floor() -> None:
    table = pc.method_table(FAKE)
    assert table.count("\n") == 1 + len(pc.METHODS)
    momo = _cells(table, "MoMo")
    assert momo[1] == so.SGDM_FUSED and momo[3] == "8 / 5" and momo[4] == "1.60" and momo[5] == "1.92"
    assert momo[6] == "1.69" and momo[8] == "yes"  # 2.7 / 1.6 = 1.6875 <= 1.92
    hd = _cells(table, "HierarchicalHD-sgd")
    assert hd[3] == "6 / 3" and hd[4] == "2.00" and hd[5] == "2.40"
    assert hd[6] == "2.30" and hd[8] == "yes"
    qlab = _cells(pc.method_table({**FAKE, "update(2,1,0)": 1.5}), "QLAB-sgd")
    assert qlab[4] == "2.33" and qlab[5] == "2.80" and qlab[6] == "3.50" and qlab[8] == "no (3.50 > 2.80)"
    # A method whose passes were not all measured is left out.
    assert "| MoMo |" not in pc.method_table({k: v for k, v in FAKE.items() if k != "reduce(3)"})


@pytest.mark.parametrize(
    ("name", "accesses", "baseline_accesses"),
    [
        ("MoMo", 8, 5),
        ("MoMo-Adam", 11, 7),
        ("QLAB-sgd", 7, 3),
        ("QLAB-sgdm", 9, 5),
        ("QLAB-adam", 12, 7),
        ("HierarchicalHD-sgd", 6, 3),
        ("HierarchicalHD-sgdn", 8, 5),
        ("HierarchicalHD-adam", 10, 7),
        ("AdaL", 8, 7),
        ("StepTunedSGD (per half-step)", 7, 3),
    ],
)
def test_the_access_floors_are_the_counts_given_and_the_passes_add_up_to_them(
    name: str, accesses: int, baseline_accesses: int
) -> None:
    method = pc.METHODS[name]
    assert (method.accesses, method.baseline_accesses) == (accesses, baseline_accesses)
    assert method.access_floor == pytest.approx(accesses / baseline_accesses)
    assert method.target == pytest.approx(1.2 * accesses / baseline_accesses)
    assert sum(pc.PRIMITIVES[p].accesses for p in method.passes) / method.per == accesses
    # The baseline is the fused kernel of one primitive pass with as many accesses.
    fused = next(p for p in pc.PRIMITIVES.values() for i in p.impls if i.row == method.baseline)
    assert fused.accesses == baseline_accesses


def test_every_pass_a_method_names_is_measured_with_an_eager_implementation() -> None:
    # Every method step_overhead judges against its floor, with the same access counts.
    for name, floor in so.FLOORS.items():
        method = pc.METHODS[name]
        assert (method.baseline, method.accesses, method.baseline_accesses) == (
            floor.fused, floor.accesses, floor.baseline_accesses,
        ), name
    for method in pc.METHODS.values():
        assert method.baseline in pc.BASELINES
        for name in method.passes:
            assert name in pc.PRIMITIVES, (method.name, name)
            assert any(not impl.compiled for impl in pc.PRIMITIVES[name].impls), name
    for baseline in pc.BASELINES:  # each baseline is timed as one of its pass's implementations
        assert sum(impl.row == baseline for p in pc.PRIMITIVES.values() for impl in p.impls) == 1


def test_a_tiny_real_run_gives_one_row_per_method_with_finite_positive_numbers() -> None:
    shapes = [(64, 32), (32,), (16, 8, 3, 3)]
    times = pc.measure("cpu", rounds=2, warmup=1, shapes=shapes, compiled=False, flush=False)
    assert all(len(t) == 2 and all(s > 0 for s in t) for t in times.values())
    costs = pc.unit_costs(times)
    assert set(costs) == set(pc.PRIMITIVES) | set(pc.BASELINES)
    assert costs[so.SGD_FUSED] == 1.0
    for cost in pc.pass_costs(times).values():
        assert math.isfinite(cost.cost) and cost.cost > 0 and cost.ms > 0
        assert cost.best in {impl.label for impl in pc.PRIMITIVES[cost.primitive].impls}
    text = pc.report(times, "cpu", 2)
    primitives, methods = text.split("Per method:")
    for name in pc.PRIMITIVES:
        assert _cells(primitives, name)[3] == pc.pass_costs(times)[name].best
    for method in pc.METHODS.values():
        floor = pc.measured_floor(method, costs)
        assert math.isfinite(floor) and floor > 0
        assert _cells(methods, method.name)[8].startswith(("yes", "no"))
    assert methods.count("\n| ") == 1 + len(pc.METHODS)  # the header, then one row per method


def test_the_compiled_candidates_compute_what_the_eager_ones_do() -> None:
    # One compiled pass on two small tensors (one compile, a few seconds): the same update as the
    # fused kernel, and the same sums as per-tensor dot products.
    shapes = [torch.Size((8, 4)), torch.Size((5,))]
    device = torch.device("cpu")
    primitive = pc.PRIMITIVES["update(3,2,0)+sum"]
    eager, compiled = (next(i for i in primitive.impls if i.compiled == c) for c in (False, True))
    pools = [pc.Pool(shapes, device), pc.Pool(shapes, device)]
    eager.build(pools[0])()
    sums = compiled.build(pools[1])()
    for name in ("x", "m"):
        for a, b in zip(getattr(pools[0], name), getattr(pools[1], name)):
            torch.testing.assert_close(a, b)
    expected = [torch.dot(g.view(-1), m.view(-1)) for g, m in zip(pools[0].g, pools[0].m)]
    torch.testing.assert_close(torch.stack(sums), torch.stack(expected))
