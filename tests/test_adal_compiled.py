"""AdaL(compiled=True): one Inductor loop per tensor takes the eager body's steps.

The reference is the eager path of the same class (itself tested against an independent float64
reference in tests/test_adal.py); the compiled pass must agree with it to float rounding for every
transform, eps placement, weight decay and schedule, skip what the eager path skips, and leave the
optimizer untouched when Inductor is missing.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_adaptive_lr import AdaL

SETTINGS = [
    pytest.param({}, id="l1-preconditioner"),
    pytest.param({"transform": "tensor_l1"}, id="tensor_l1"),
    pytest.param({"transform": "none", "eps_mode": "denominator"}, id="none-denominator"),
    pytest.param({"eps_mode": "denominator", "weight_decay": 0.1}, id="denominator-wd"),
    pytest.param({"lr_decay": "inv_sqrt", "lr": 0.05, "weight_decay": 0.01}, id="inv_sqrt-wd"),
    pytest.param({"eps": 0.0}, id="eps-0"),
]


def network(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def train(options: dict, compiled: bool, steps: int = 12, dtype: torch.dtype = torch.float32, groups: bool = False):
    model = network(dtype)
    params = (
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}]
        if groups
        else model.parameters()
    )
    optimizer = AdaL(params, **options, compiled=compiled)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=gen).to(dtype), torch.randn(8, 2, generator=gen).to(dtype)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize("options", SETTINGS)
def test_compiled_matches_the_eager_body(options: dict) -> None:
    (eager, opt_e), (fused, opt_c) = train(options, False, groups=True), train(options, True, groups=True)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=2e-6, atol=1e-8)
    for p, q in zip(eager.parameters(), fused.parameters()):
        for key in ("grad_avg", "grad_avg_sq"):  # ‖g‖₁ is summed in another order (a compiled graph): 1e-5
            torch.testing.assert_close(opt_c.state[q][key], opt_e.state[p][key], rtol=1e-5, atol=1e-12)
        assert opt_c.state[q]["step"] == opt_e.state[p]["step"]
        assert opt_c.state[q]["scale_avg"] == pytest.approx(opt_e.state[p]["scale_avg"], rel=1e-6)


def test_compiled_in_float64_matches_to_its_rounding() -> None:
    (eager, _), (fused, _) = train({"transform": "tensor_l1"}, False, dtype=torch.float64), train(
        {"transform": "tensor_l1"}, True, dtype=torch.float64
    )
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-13, atol=1e-15)


def test_compiled_skips_a_non_finite_gradient_untouched() -> None:
    model, optimizer = train({}, True, steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(optimizer.state_dict()["state"])
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    after = optimizer.state_dict()["state"]
    for index, entry in state.items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(after[index][key]), torch.as_tensor(value)), key


def test_compiled_resumes_the_eager_state_and_back() -> None:
    """The state is the eager path's: a run switching paths through a state dict continues alike."""
    reference, _ = train({}, False, steps=8)
    model = network()
    optimizer = AdaL(model.parameters(), compiled=True)
    gen = torch.Generator().manual_seed(1)
    for k in range(8):
        if k == 4:
            saved = optimizer.state_dict()
            optimizer = AdaL(model.parameters(), compiled=False)
            optimizer.load_state_dict(saved)
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for p, q in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=2e-6, atol=1e-8)


@pytest.mark.usefixtures("no_inductor")
def test_failed_compilation_raises_before_any_state_change() -> None:
    model = network()
    optimizer = AdaL(model.parameters(), compiled=True)
    model(torch.ones(3, 4)).pow(2).mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"AdaL\(compiled=True\).*no C\+\+ compiler found.*compiled=False"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(len(optimizer.state[p]) == 0 for p in model.parameters())
    assert optimizer.param_groups[0]["step"] == 0


def test_compiled_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`compiled`"):
        AdaL(network().parameters(), compiled="yes")


def test_the_l1_norms_run_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """With compiled=True the gate's ‖g‖₁ is one compiled graph too (one read of each gradient)."""
    from lightning_adaptive_lr.optim import _reduce

    ran = []
    real = _reduce.run_compiled
    monkeypatch.setattr(_reduce, "run_compiled", lambda owner, f, *a: ran.append((owner, f.__name__)) or real(owner, f, *a))
    train({}, True, groups=True)
    assert ran and set(ran) == {("AdaL", "_l1_sums")}


def test_compiled_l1_norms_are_the_eager_ones() -> None:
    """Complex (as real pairs), float16 (summed in float32) and empty tensors, per bucket and in order."""
    from lightning_adaptive_lr.optim import _reduce

    gen = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(5, 3, generator=gen),
        torch.randn(4, dtype=torch.complex64, generator=gen),
        torch.randn(6, generator=gen).half(),
        torch.zeros(0),
        torch.randn((), generator=gen),
    ]
    cpu = torch.device("cpu")
    expected = torch.tensor([float(torch.view_as_real(x).abs().sum()) if x.is_complex() else float(x.float().abs().sum()) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(_reduce.l1_norms(xs, cpu, foreach=True, compiled_by="AdaL"), expected, rtol=1e-6, atol=0)
