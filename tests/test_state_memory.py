"""benchmarks/state_memory.py counts what an optimizer keeps between steps (small parameters here)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import state_memory


def _params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(256, 64)), torch.nn.Parameter(torch.randn(256))]


@pytest.mark.parametrize(
    ("name", "buffers"),
    [
        # torch's own: Adam keeps exp_avg and exp_avg_sq (its 0-d step counts are negligible).
        ("torch Adam", 2.0),
        ("torch SGD momentum", 1.0),
        # MoMo's math keeps d; its eager CPU body keeps a spare for the next average (docs/benchmarks.md).
        ("MoMo", 2.0),
        ("MoMo (capturable)", 1.0),
        ("MoMoAdam (capturable)", 2.0),
        # the other device-side steps keep what the math needs too (no spare for the skipped step)
        ("QLAB-adam (capturable)", 2.0),
        ("HierarchicalHD-adam (capturable)", 3.0),
        ("AdaL (capturable)", 2.0),
        ("StepTunedSGD (capturable)", 2.0),
        ("QLAB-sgd", 0.0),
    ],
)
def test_parameter_sized_buffers(name: str, buffers: float) -> None:
    row = next(r for r in state_memory.ROWS if r.name == name)
    measured = state_memory.measure(row, _params())
    # 0-d step counters and per-tensor scalars add a few bytes to 66 KB of parameters.
    assert measured == pytest.approx(buffers, abs=0.02)


def test_parameters_and_gradients_are_not_counted() -> None:
    params = _params()
    opt = torch.optim.SGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert state_memory.kept_bytes(opt, params) == 0
    opt.extra = [torch.zeros(10)]  # a buffer kept on the optimizer itself is found
    assert state_memory.kept_bytes(opt, params) == 40
