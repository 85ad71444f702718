"""QLAB(compiled=True): the Adam bases' moments and direction as one Inductor loop per tensor.

The reference is QLAB's eager path (itself tested against an independent float64 reference in
tests/test_qlab.py and tests/test_qlab_scale.py); only the base direction is compiled, so the fits
and moves must be the eager ones up to float rounding.
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
    ],
)
def test_compiled_matches_the_eager_path_in_float64(options: dict) -> None:
    (eager, opt_e), (fused, opt_c) = train(options, False, torch.float64), train(options, True, torch.float64)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_c.state[q][key], opt_e.state[p][key], rtol=1e-10, atol=1e-14)
    for g_e, g_c in zip(opt_e.param_groups, opt_c.param_groups):
        assert g_c["effective_lr"] == pytest.approx(g_e["effective_lr"], rel=1e-9)


def test_compiled_matches_the_eager_path_in_float32() -> None:
    (eager, _), (fused, _) = train({"base": "adam", "lr": 1e-2}, False), train({"base": "adam", "lr": 1e-2}, True)
    for p, q in zip(eager.parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_sgd_bases_are_unaffected() -> None:
    (eager, _), (fused, _) = train({"base": "sgdm"}, False), train({"base": "sgdm"}, True)
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
def test_failed_compilation_raises_before_any_state_change() -> None:
    model = network(torch.float32)
    optimizer = QLAB(model.parameters(), base="adam", lr=1e-2, compiled=True)
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
