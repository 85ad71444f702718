"""HierarchicalHD(compiled=True): the base rule's update as one Inductor loop per tensor (Adam's
moments and direction; SGD's kept direction and step; Nesterov's buffer, direction and step).

The reference is the eager path (itself tested against an independent float64 reference in
tests/test_hypergradient.py); only the base rule's update is compiled, so the rates and steps must
be the eager ones up to float rounding, at every level.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adaptive_lr import HierarchicalHD

SETTINGS = [
    pytest.param({}, id="global"),
    pytest.param({"levels": ("global", "layer", "unit", "param")}, id="four-levels"),
    pytest.param({"weight_decay": 0.1, "learn_weights": True, "levels": ("global", "layer")}, id="wd-learned-weights"),
]


def train(
    options: dict, compiled: bool, dtype: torch.dtype, steps: int = 15, base: str = "adam"
) -> tuple[nn.Module, HierarchicalHD]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)
    optimizer = HierarchicalHD(model.parameters(), base=base, lr=1e-2, **options, compiled=compiled)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 5, generator=gen).to(dtype), torch.randn(32, 1, generator=gen).to(dtype)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("base", ["adam", "sgd", "sgdn"])
@pytest.mark.parametrize("options", SETTINGS)
def test_compiled_matches_the_eager_path(options: dict, base: str) -> None:
    for dtype, rtol, atol in ((torch.float64, 1e-12, 1e-14), (torch.float32, 2e-5, 1e-7)):
        (eager, opt_e), (fused, opt_c) = train(options, False, dtype, base=base), train(options, True, dtype, base=base)
        for p, q in zip(eager.parameters(), fused.parameters()):
            torch.testing.assert_close(q, p, rtol=rtol, atol=atol)
            state = {k: v for k, v in opt_e.state[p].items() if isinstance(v, torch.Tensor)}
            assert "prev_direction" in state
            assert set(state) == {k for k, v in opt_c.state[q].items() if isinstance(v, torch.Tensor)}
            for key, value in state.items():
                torch.testing.assert_close(opt_c.state[q][key], value, rtol=rtol, atol=atol)
        assert opt_c.param_groups[0]["hd_rate_global"] == pytest.approx(opt_e.param_groups[0]["hd_rate_global"], rel=rtol * 10)


@pytest.mark.parametrize(("base", "kernel"), [("sgd", "kept_step"), ("sgdn", "nesterov_step"), ("adam", "adam_step")])
def test_the_base_rule_runs_compiled(monkeypatch: pytest.MonkeyPatch, base: str, kernel: str) -> None:
    """The parity above would also hold if the option did nothing: the compiled loop must run."""
    from lightning_adaptive_lr.optim import _compiled

    ran = []
    real = _compiled.run_compiled
    monkeypatch.setattr(_compiled, "run_compiled", lambda owner, f, *a: ran.append(f.__name__) or real(owner, f, *a))
    train({}, True, torch.float32, steps=2, base=base)
    assert set(ran) == {kernel}  # (the first steps' outcome screen also runs it, on copies)


@pytest.mark.usefixtures("no_inductor")
def test_failed_compilation_raises_before_any_state_change() -> None:
    model = nn.Linear(4, 2)
    optimizer = HierarchicalHD(model.parameters(), base="adam", compiled=True)
    model(torch.ones(3, 4)).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"HierarchicalHD\(compiled=True\).*no C\+\+ compiler found"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(len(optimizer.state[p]) == 0 for p in model.parameters())
