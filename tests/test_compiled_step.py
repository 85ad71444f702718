"""``MoMo(compiled=True)`` and ``MoMoAdam(compiled=True)``: the same steps as the ``foreach`` path.

Compilation is slow, so the networks are tiny and every test reuses the same two shape sets
(one per param group); each compiled function is compiled once per shape set in the process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_adaptive_lr import MoMo, MoMoAdam
from lightning_adaptive_lr.optim import _compiled as compiled_module

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


def run(make, steps: int = STEPS, late: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, list[float]]:
    """Train the tiny network on fixed least-squares batches; returns the model, optimizer, step sizes.

    ``late``: the first layer's bias gets no gradient for that many steps (its state starts later).
    """
    model = tiny_network()
    optimizer = make(param_groups(model))
    gen = torch.Generator().manual_seed(1)
    taus = []
    for step in range(steps):
        x = torch.randn(8, 4, generator=gen)
        y = torch.randn(8, 2, generator=gen)
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if step < late:
            model[0].bias.grad = None
        optimizer.step(loss=loss.detach())
        taus.append(float(optimizer.param_groups[0]["effective_lr"]))
    return model, optimizer, taus


def assert_close_states(reference: torch.optim.Optimizer, compiled: torch.optim.Optimizer) -> None:
    for p_ref, p_cmp in zip(
        (p for g in reference.param_groups for p in g["params"]),
        (p for g in compiled.param_groups for p in g["params"]),
    ):
        for key, value in reference.state[p_ref].items():
            torch.testing.assert_close(compiled.state[p_cmp][key], value, rtol=1e-5, atol=1e-6)


CASES = {
    "MoMo": lambda **kw: (lambda groups: MoMo(groups, lr=2.0, weight_decay=1e-3, **kw)),
    "MoMo bias-correction lb-estimate": lambda **kw: (
        lambda groups: MoMo(groups, lr=2.0, bias_correction=True, estimate_lb=True, **kw)
    ),
    "MoMoAdam": lambda **kw: (lambda groups: MoMoAdam(groups, lr=0.05, weight_decay=1e-3, **kw)),
    "MoMoAdam decoupled lb-estimate": lambda **kw: (
        lambda groups: MoMoAdam(groups, lr=0.05, decoupled_weight_decay=True, estimate_lb=True, **kw)
    ),
}
CLASSES = {"MoMo": MoMo, "MoMoAdam": MoMoAdam}


@pytest.mark.parametrize("late", [0, 3], ids=["all-grads", "late-grad"])
@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_foreach(name: str, late: int) -> None:
    reference_model, reference, reference_taus = run(CASES[name](), late=late)
    compiled_model, compiled, compiled_taus = run(CASES[name](compiled=True), late=late)
    assert reference_taus[0] != reference_taus[-1]  # the step size adapts: the comparison is not trivial
    torch.testing.assert_close(compiled_taus, reference_taus, rtol=1e-5, atol=0.0)
    for p_ref, p_cmp in zip(reference_model.parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_cmp, p_ref, rtol=1e-5, atol=1e-6)
    assert_close_states(reference, compiled)
    for key in ("step", "loss_avg", "gamma", "current_lb", "skipped_steps"):
        for compiled_group, reference_group in zip(compiled.param_groups, reference.param_groups):
            assert compiled_group[key] == pytest.approx(reference_group[key], rel=1e-5)


def test_compiled_momo_with_a_binding_cap_is_dampened_sgd_momentum() -> None:
    """The cap binds at every step (tiny lr): MoMo is SGD(momentum=β, dampening=β), computed apart."""
    def make(groups: list[dict]) -> MoMo:
        return MoMo([{"params": g["params"]} for g in groups], lr=1e-3, compiled=True)  # one lr, no decay

    model, optimizer, taus = run(make, steps=6)
    twin = tiny_network()
    sgd = torch.optim.SGD(twin.parameters(), lr=1e-3, momentum=0.9, dampening=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 2, generator=gen)
        sgd.zero_grad()
        ((twin(x) - y) ** 2).mean().backward()
        sgd.step()
    assert taus == [1e-3] * 6 and optimizer.param_groups[1]["effective_lr"] == 1e-3
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", ["loss", "gradient"])
@pytest.mark.parametrize("name", ["MoMo", "MoMoAdam"])
def test_compiled_gate_skips_a_nonfinite_step(name: str, bad: str) -> None:
    model, optimizer, _ = run(CASES[name](compiled=True), steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    state_before = {key: value.clone() for key, value in optimizer.state[model[0].weight].items()}
    loss = torch.tensor(float("nan") if bad == "loss" else 1.0)
    if bad == "gradient":
        model[2].weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step(loss=loss)
    assert all(group["skipped_steps"] == 1 for group in optimizer.param_groups)
    assert all(group["step"] == 2 for group in optimizer.param_groups)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for key, value in state_before.items():
        assert torch.equal(optimizer.state[model[0].weight][key], value)


def test_a_skipped_first_step_stores_no_state() -> None:
    model = tiny_network()
    optimizer = MoMo(model.parameters(), compiled=True)
    model(torch.ones(2, 4)).sum().backward()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        optimizer.step(loss=torch.tensor(float("inf")))
    assert all(len(optimizer.state[p]) == 0 for p in model.parameters())


@pytest.mark.parametrize("cls", list(CLASSES.values()), ids=list(CLASSES))
def test_compiled_must_be_a_bool(cls: type) -> None:
    with pytest.raises(ValueError, match="compiled"):
        cls(tiny_network().parameters(), compiled="yes")


@pytest.mark.parametrize("cls", list(CLASSES.values()), ids=list(CLASSES))
def test_compiled_is_shared_by_param_groups(cls: type) -> None:
    model = tiny_network()
    with pytest.raises(ValueError, match="compiled"):
        cls([{"params": model[0].parameters()}, {"params": model[2].parameters(), "compiled": True}])


@pytest.mark.parametrize("cls", list(CLASSES.values()), ids=list(CLASSES))
@pytest.mark.usefixtures("no_inductor")
def test_failed_compilation_raises_before_any_state_change(cls: type) -> None:
    """No silent fallback: a broken Inductor is a clear error, and the optimizer is left untouched."""

    model = tiny_network()
    optimizer = cls(model.parameters(), compiled=True)
    loss = model(torch.ones(3, 4)).pow(2).mean()
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=rf"{cls.__name__}\(compiled=True\).*no C\+\+ compiler found.*compiled=False"):
        optimizer.step(loss=loss.detach())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all({key: group[key] for key in cls.group_state} == cls.group_state for group in optimizer.param_groups)
    assert all(len(optimizer.state[p]) == 0 for p in model.parameters())


@pytest.mark.parametrize("name", ["MoMo", "MoMoAdam"])
def test_compiled_state_is_the_foreach_state_and_resumes_alike(name: str) -> None:
    """The state holds the same keys as the foreach path's; a resumed optimizer (either path) steps alike."""
    import copy

    model, optimizer, _ = run(CASES[name](compiled=True), steps=3)
    keys = {"grad_avg"} if name == "MoMo" else {"grad_avg", "grad_avg_sq"}
    assert all(isinstance(p, torch.Tensor) and set(s) == keys for p, s in optimizer.state.items())
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    twins = []
    for compiled in (True, False):
        twin_model = copy.deepcopy(model)
        twin = CASES[name](compiled=compiled)(param_groups(twin_model))
        twin.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        twins.append((twin_model, twin))
    for m, opt in ((model, optimizer), *twins):
        opt.zero_grad()
        loss = ((m(x) - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss.detach())
    for p, q, r in zip(model.parameters(), twins[0][0].parameters(), twins[1][0].parameters()):
        assert torch.equal(p, q)
        torch.testing.assert_close(r, p, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_an_empty_parameter_steps_like_the_eager_path(cls: type) -> None:
    """A tensor with no elements (what FSDP2 leaves a rank of an unevenly sharded parameter) has no
    largest element: the compiled sums give it 0 (MoMo-Adam's failed to compile, and under sharding
    the other rank then waited for ever)."""
    results = []
    for compiled in (True, False):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.zeros(0, 3))]
        opt = cls(params, compiled=compiled)
        for _ in range(3):
            params[0].grad, params[1].grad = params[0].detach().clone(), torch.zeros(0, 3)
            opt.step(loss=params[0].detach().pow(2).sum())
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _double(t: torch.Tensor) -> torch.Tensor:
    return t * 2.0


def test_many_sets_of_shapes_in_one_process_each_compile() -> None:
    """A sweep steps many models in one process: each set of shapes compiles its own variant
    (torch's default allows 8 per function, then fullgraph compilation raised)."""
    for n in range(1, 12):
        out = compiled_module.run_compiled("MoMo", _double, torch.ones(n))
        assert torch.equal(out, torch.full((n,), 2.0))
