"""QLAB(compiled=True): the Adam bases' moments and direction, and the ``"sgdm"`` base's buffer
with its trial step, as one Inductor loop per tensor.

The reference is QLAB's eager path (itself tested against an independent float64 reference in
tests/test_qlab.py and tests/test_qlab_scale.py); only the base rule's update is compiled, so the
fits and moves must be the eager ones up to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_adaptive_lr import QLAB


def network(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def train(options: dict, compiled: bool, dtype: torch.dtype = torch.float32, steps: int = 15):
    model = network(dtype)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}]
    optimizer = QLAB(groups, **options, compiled=compiled)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 5, generator=gen).to(dtype), torch.randn(32, 1, generator=gen).to(dtype)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step(loss=loss, probe=lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
    return model, optimizer


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"base": "adam", "lr": 1e-2}, id="adam"),
        pytest.param({"base": "adamw", "lr": 1e-2, "weight_decay": 0.1}, id="adamw-wd"),
        pytest.param({"base": "adam", "lr": 1e-2, "weight_decay": 0.05, "max_lr_scale": None}, id="adam-plain-rule"),
        pytest.param({"base": "sgdm", "lr": 1e-2}, id="sgdm"),
        pytest.param({"base": "sgdm", "lr": 1e-2, "momentum": 0.5, "weight_decay": 0.1}, id="sgdm-wd"),
    ],
)
def test_compiled_matches_the_eager_path_in_float64(options: dict) -> None:
    (eager, opt_e), (fused, opt_c) = train(options, False, torch.float64), train(options, True, torch.float64)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
        state = {k: v for k, v in opt_e.state[p].items() if isinstance(v, torch.Tensor)}
        assert state and set(state) == {k for k, v in opt_c.state[q].items() if isinstance(v, torch.Tensor)}
        for key, value in state.items():
            torch.testing.assert_close(opt_c.state[q][key], value, rtol=1e-10, atol=1e-14)
    for g_e, g_c in zip(opt_e.param_groups, opt_c.param_groups):
        assert g_c["effective_lr"] == pytest.approx(g_e["effective_lr"], rel=1e-9)
        assert g_c["directional_derivative"] == pytest.approx(g_e["directional_derivative"], rel=1e-9)


@pytest.mark.parametrize(("base", "rtol", "atol"), [("adam", 1e-5, 1e-7), ("sgdm", 2e-4, 5e-6)])
def test_compiled_matches_the_eager_path_in_float32(base: str, rtol: float, atol: float) -> None:
    """The fit ``a2 = f̃ − f − a1`` magnifies float32 rounding (the compiled loop rounds once where the
    foreach kernels round after each operation): on ``"sgdm"`` 15 steps drift apart by 1.6e-6."""
    (eager, _), (fused, _) = train({"base": base, "lr": 1e-2}, False), train({"base": base, "lr": 1e-2}, True)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol)


def test_a_frozen_sgdm_group_updates_its_buffers_only() -> None:
    """lr = 0 freezes a group (nothing moves) while its buffers take the step, as on the eager path."""
    runs = []
    for compiled in (False, True):
        model = network(torch.float64)
        groups = [{"params": model[0].parameters(), "lr": 0.0}, {"params": model[2].parameters()}]
        optimizer = QLAB(groups, base="sgdm", lr=1e-2, compiled=compiled)
        frozen = [p.detach().clone() for p in model[0].parameters()]
        x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
        for _ in range(3):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step(loss=loss, probe=lambda: nn.functional.mse_loss(model(x), y))
        assert all(torch.equal(p, f) for p, f in zip(model[0].parameters(), frozen))
        runs.append([optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)


def test_the_sgd_base_is_unaffected() -> None:
    (eager, _), (fused, _) = train({"base": "sgd"}, False), train({"base": "sgd"}, True)
    for p, q in zip(eager.parameters(), fused.parameters()):
        assert torch.equal(p, q)


def test_the_state_is_the_eager_paths() -> None:
    """A compiled run's state dict continues on the eager path as the compiled run continues."""
    runs = []
    for switch in (False, True):
        model, optimizer = train({"base": "adam", "lr": 1e-2}, True, torch.float64, steps=4)
        if switch:
            saved = copy.deepcopy(optimizer.state_dict())
            groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}]
            optimizer = QLAB(groups, base="adam", lr=1e-2)
            optimizer.load_state_dict(saved)
        gen = torch.Generator().manual_seed(5)
        for _ in range(3):
            x, y = torch.randn(32, 5, generator=gen, dtype=torch.float64), torch.randn(32, 1, generator=gen, dtype=torch.float64)
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step(loss=loss, probe=lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("no_inductor")
@pytest.mark.parametrize("base", ["adam", "sgdm"])
def test_failed_compilation_raises_before_any_state_change(base: str) -> None:
    model = network(torch.float32)
    optimizer = QLAB(model.parameters(), base=base, lr=1e-2, compiled=True)
    x = torch.ones(3, 5)
    loss = model(x).pow(2).mean()
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"QLAB\(compiled=True\).*no C\+\+ compiler found"):
        optimizer.step(loss=loss.detach(), probe=lambda: model(x).pow(2).mean())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(len(optimizer.state[p]) == 0 for p in model.parameters())


def test_compiled_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`compiled`"):
        QLAB(network(torch.float32).parameters(), base="adam", compiled="yes")


def test_the_sgdm_trial_step_runs_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parity above would also hold if the option did nothing: the compiled loop must run."""
    from lightning_adaptive_lr.optim import _compiled

    ran = []
    real = _compiled.run_compiled
    monkeypatch.setattr(_compiled, "run_compiled", lambda owner, f, *a: ran.append(f.__name__) or real(owner, f, *a))
    train({"base": "sgdm", "lr": 1e-2}, True, steps=2)
    assert ran == ["heavy_ball_step"] * 4  # two param groups, two steps
