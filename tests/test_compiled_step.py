"""``MoMoAdam(compiled=True)``: the same steps as the ``foreach`` path.

Compilation is slow, so the networks are tiny and every test reuses the same two shape sets
(one per param group); each compiled function is compiled once per shape set in the process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adaptive_lr import MoMoAdam
from lightning_adaptive_lr.optim import momo as momo_module

STEPS = 20


def tiny_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def param_groups(model: nn.Module) -> list[dict]:
    """Two groups with different ``lr`` and ``weight_decay`` (and so two compiled shape sets)."""
    first, second = model[0], model[2]
    return [
        {"params": list(first.parameters())},
        {"params": list(second.parameters()), "lr": 0.3, "weight_decay": 1e-2},
    ]


def run(make, steps: int = STEPS) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    """Train the tiny network on fixed least-squares batches; returns the model, optimizer, step sizes."""
    model = tiny_network()
    optimizer = make(param_groups(model))
    gen = torch.Generator().manual_seed(1)
    taus = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen)
        y = torch.randn(8, 2, generator=gen)
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        optimizer.step(loss=loss.detach())
        taus.append(float(optimizer.param_groups[0]["effective_lr"]))
    return model, optimizer, taus


def assert_close_states(reference: torch.optim.Optimizer, compiled: torch.optim.Optimizer) -> None:
    for p_ref, p_cmp in zip(
        (p for g in reference.param_groups for p in g["params"]),
        (p for g in compiled.param_groups for p in g["params"]),
    ):
        for key, value in reference.state[p_ref].items():
            torch.testing.assert_close(compiled.state[p_cmp][key], value, rtol=1e-5, atol=1e-7)


CASES = {
    "MoMoAdam": lambda **kw: (lambda groups: MoMoAdam(groups, lr=0.05, weight_decay=1e-3, **kw)),
    "MoMoAdam decoupled lb-estimate": lambda **kw: (
        lambda groups: MoMoAdam(groups, lr=0.05, decoupled_weight_decay=True, estimate_lb=True, **kw)
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_foreach(name: str) -> None:
    reference_model, reference, reference_taus = run(CASES[name]())
    compiled_model, compiled, compiled_taus = run(CASES[name](compiled=True))
    assert reference_taus[0] != reference_taus[-1]  # the step size adapts: the comparison is not trivial
    torch.testing.assert_close(compiled_taus, reference_taus, rtol=1e-5, atol=0.0)
    for p_ref, p_cmp in zip(reference_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_cmp, p_ref, rtol=1e-5, atol=1e-7)
    assert_close_states(reference, compiled)
    for key in ("step", "loss_avg", "gamma", "lb", "skipped_steps"):
        assert compiled.state["global"][key] == pytest.approx(reference.state["global"][key], rel=1e-5)


def test_compiled_gate_skips_nonfinite_loss() -> None:
    model, optimizer, _ = run(CASES["MoMoAdam"](compiled=True), steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step(loss=torch.tensor(float("nan")))
    assert optimizer.state["global"]["skipped_steps"] == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_compiled_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="compiled"):
        MoMoAdam(tiny_network().parameters(), compiled="yes")


def test_compiled_is_shared_by_param_groups() -> None:
    model = tiny_network()
    with pytest.raises(ValueError, match="compiled"):
        MoMoAdam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "compiled": True}])


def test_failed_compilation_raises_before_any_state_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback: a broken Inductor is a clear error, and the optimizer is left untouched."""

    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(momo_module.torch, "compile", broken_compile)
    monkeypatch.setattr(momo_module, "_INDUCTOR_CHECKED", set())
    monkeypatch.setattr(momo_module, "_COMPILED", {})
    model = tiny_network()
    optimizer = MoMoAdam(model.parameters(), compiled=True)
    loss = model(torch.ones(3, 4)).pow(2).mean()
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"compiled=True.*no C\+\+ compiler found.*compiled=False"):
        optimizer.step(loss=loss.detach())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert optimizer.global_state == {"step": 0, "skipped_steps": 0}
    assert all(len(optimizer.state[p]) == 0 for p in model.parameters())


def test_direction_buffers_are_not_state_and_resume_alike() -> None:
    """The reused direction buffers stay out of the state; a resumed optimizer rebuilds them and steps alike."""
    import copy

    model, optimizer, _ = run(CASES["MoMoAdam"](compiled=True), steps=3)
    assert all(set(s) == {"grad_avg", "grad_avg_sq"} for p, s in optimizer.state.items() if p != "global")
    twin_model = copy.deepcopy(model)
    twin = MoMoAdam(param_groups(twin_model), lr=0.05, weight_decay=1e-3, compiled=True)
    twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    for m, opt in ((model, optimizer), (twin_model, twin)):
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss.detach())
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)
