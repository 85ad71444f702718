"""The optimizers' state layout: release-0.1 checkpoints still load, and
``torch.distributed.checkpoint`` (what Lightning's sharded strategies save with) round-trips them.

Release 0.1 kept the optimizer-wide scalars in ``state["global"]``; today they are in every param
group and ``optimizer.state`` is keyed by parameters only (docs/algorithms.md, DESIGN.md "Every
optimizer").  ``tests/data/legacy_state_dicts.pt`` holds, for every registry case and for
``QLAB.wrap(torch.optim.Adam)``, a state dict the old code saved after 6 steps and the parameters
the old code reached 6 steps later (made by ``tests/make_legacy_state_dicts.py``).

Everything here runs in one process: ``get/set_optimizer_state_dict`` and
``torch.distributed.checkpoint.save/load`` need no process group for an unsharded model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import lightning_adaptive_lr as lalr
from make_legacy_state_dicts import problem
from optimizer_registry import CASES, OptimizerCase, take_step

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled, unavailable or uninitialized:UserWarning"
)

LEGACY_PATH = os.path.join(os.path.dirname(__file__), "data", "legacy_state_dicts.pt")
WRAP_ID = "QLAB.wrap(Adam)"
#: The registry case whose `take_step` (with a probe) drives QLAB.wrap, as in make_legacy_state_dicts.py.
PROBE_CASE = next(case for case in CASES if case.needs_probe)


@dataclass(frozen=True)
class Subject:
    """An optimizer to checkpoint: how to build it on parameters, and the case that steps it."""

    id: str
    make: Callable[..., torch.optim.Optimizer]
    case: OptimizerCase


SUBJECTS = [Subject(case.id, case.make, case) for case in CASES] + [
    Subject(WRAP_ID, lambda params: lalr.QLAB.wrap(torch.optim.Adam(params, lr=0.01)), PROBE_CASE)
]
SUBJECT_IDS = [s.id for s in SUBJECTS]


@pytest.fixture(params=SUBJECTS, ids=SUBJECT_IDS)
def subject(request: pytest.FixtureRequest) -> Subject:
    return request.param


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"parameter {i} differs by {(x - y).abs().max().item():.3g}"


def assert_same_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    """Both optimizers' state dicts hold the same per-parameter state and the same group entries."""
    sa, sb = a.state_dict(), b.state_dict()
    # An empty entry is no state (DCP's flattened layout leaves one for every parameter).
    state_a = {key: entries for key, entries in sa["state"].items() if entries}
    state_b = {key: entries for key, entries in sb["state"].items() if entries}
    assert state_a.keys() == state_b.keys()
    for key, entries in state_a.items():
        assert entries.keys() == state_b[key].keys(), key
        for name, value in entries.items():
            other = state_b[key][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (key, name)
            else:
                assert value == other, (key, name)
    for ga, gb in zip(sa["param_groups"], sb["param_groups"], strict=True):
        assert ga.keys() == gb.keys()
        for name in ga:
            x, y = ga[name], gb[name]
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), name
            elif isinstance(x, (tuple, list)):  # a full state dict turns tuples (betas) into lists
                assert list(x) == list(y), name
            else:
                assert x == y, name


def stream(n: int, seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of the float64 regression problem of ``problem()`` (4 inputs, 2 outputs)."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randn(16, 2, generator=gen, dtype=torch.float64))
        for _ in range(n)
    ]


def assert_keyed_by_parameters(opt: torch.optim.Optimizer, model: nn.Module) -> None:
    params = {id(p) for p in model.parameters()}
    for key in opt.state:
        assert isinstance(key, torch.Tensor) and id(key) in params, f"optimizer.state has the key {key!r}"


# ---------------------------------------------------------------------------------------------
# Release-0.1 state dicts (state["global"]) load and continue as the old code did.

LEGACY = torch.load(LEGACY_PATH, weights_only=True)
#: Settings release 0.1 did not have (so it saved no state dict of them).
SINCE_0_2 = {case.id for case in CASES if case.kwargs.get("capturable")}
LEGACY_SUBJECTS = [s for s in SUBJECTS if s.id not in SINCE_0_2]


def test_the_legacy_file_covers_every_registry_case() -> None:
    assert SINCE_0_2 and set(LEGACY) == set(SUBJECT_IDS) - SINCE_0_2
    for entry in LEGACY.values():
        assert "global" in entry["state_dict"]["state"]  # really the old layout


@pytest.mark.parametrize("subject", LEGACY_SUBJECTS, ids=[s.id for s in LEGACY_SUBJECTS])
def test_legacy_state_dict_resumes_as_the_old_code_did(subject: Subject) -> None:
    entry = LEGACY[subject.id]
    model, batch = problem()
    with torch.no_grad():
        for p, saved in zip(model.parameters(), entry["params_at_save"], strict=True):
            p.copy_(saved)
    opt = subject.make(model.parameters())
    opt.load_state_dict(copy.deepcopy(entry["state_dict"]))

    assert_keyed_by_parameters(opt, model)
    legacy_global = entry["state_dict"]["state"]["global"]
    for group in opt.param_groups:
        assert group["step"] == legacy_global["step"] and group["skipped_steps"] == legacy_global["skipped_steps"]

    for _ in range(6):
        take_step(subject.case, opt, model, batch)
    for i, (p, expected) in enumerate(zip(model.parameters(), entry["params_after"], strict=True)):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=0.0, msg=lambda m, i=i: f"parameter {i}: {m}")
    assert all(group["step"] == legacy_global["step"] + 6 for group in opt.param_groups)


# ---------------------------------------------------------------------------------------------
# torch.distributed.checkpoint.state_dict: get/set_optimizer_state_dict.

OPTIONS = {
    "default": StateDictOptions(),
    "full": StateDictOptions(full_state_dict=True),
    "flatten": StateDictOptions(flatten_optimizer_state_dict=True),
}


def trained(subject: Subject, steps: int, data: list) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, _ = problem()
    opt = subject.make(model.parameters())
    for batch in data[:steps]:
        take_step(subject.case, opt, model, batch)
    return model, opt


def test_get_optimizer_state_dict_after_steps(subject: Subject) -> None:
    data = stream(4)
    model, opt = trained(subject, 4, data)
    before = params_of(model)
    saved = get_optimizer_state_dict(model, opt)
    names = [name for name, _ in model.named_parameters()]
    assert set(saved["state"]) <= set(names)  # keyed by parameter names, nothing else
    assert [name for group in saved["param_groups"] for name in group["params"]] == names
    assert all(group["step"] == 4 for group in saved["param_groups"])
    assert_same_params(before, params_of(model))


#: Registry cases whose optimizer keeps no tensor at all (QLAB on plain SGD): torch cannot load
#: a *full* optimizer state dict without a tensor in it (see the test after the round trips).
WITHOUT_TENSOR_STATE = ("QLAB-sgd",)
ROUND_TRIPS = [
    pytest.param(subject, option, id=f"{subject.id}-{option}")
    for subject in SUBJECTS
    for option in OPTIONS
    if not (option == "full" and subject.id in WITHOUT_TENSOR_STATE)
]


@pytest.mark.parametrize(("subject", "option"), ROUND_TRIPS)
def test_set_optimizer_state_dict_continues_bit_identically(subject: Subject, option: str) -> None:
    options = OPTIONS[option]
    data = stream(8)
    model, opt = trained(subject, 4, data)
    saved_model = copy.deepcopy(get_model_state_dict(model, options=options))
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))  # it holds live tensors

    restored_model, _ = problem(seed=99)  # other parameters: the model's state dict must replace them
    restored = subject.make(restored_model.parameters())
    set_model_state_dict(restored_model, saved_model, options=options)
    set_optimizer_state_dict(restored_model, restored, saved, options=options)
    assert_keyed_by_parameters(restored, restored_model)
    assert_same_params(params_of(model), params_of(restored_model))

    for batch in data[4:]:
        take_step(subject.case, opt, model, batch)
        take_step(subject.case, restored, restored_model, batch)
    assert_same_params(params_of(model), params_of(restored_model))
    assert_same_state(opt, restored)


def _full_round_trip_error(make: Callable[[Any], torch.optim.Optimizer], case: OptimizerCase | None) -> str | None:
    """Save and load a full optimizer state dict after two steps (``case``'s, or plain ``step()``
    for a torch optimizer); the error's type and message, or None if it loads."""
    options = OPTIONS["full"]
    model, _ = problem()
    opt = make(model.parameters())
    for x, y in stream(2):
        if case is not None:
            take_step(case, opt, model, (x, y))
            continue
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    restored_model, _ = problem(seed=99)
    try:
        set_optimizer_state_dict(restored_model, make(restored_model.parameters()), saved, options=options)
    except Exception as err:  # torch raises RuntimeError today; compare whatever it raises
        return f"{type(err).__name__}: {err}"
    return None


@pytest.mark.parametrize("case_id", WITHOUT_TENSOR_STATE)
def test_full_state_dict_without_tensors_loads_as_torch_sgd_does(case_id: str) -> None:
    """A state without any tensor meets torch's full-state-dict loader exactly as torch's own
    ``SGD`` without momentum does (today both fail with "Expected device to be set"; when torch
    fixes it, both load and this still holds)."""
    case = next(c for c in CASES if c.id == case_id)
    ours = _full_round_trip_error(case.make, case)
    torch_sgd = _full_round_trip_error(lambda params: torch.optim.SGD(params, lr=0.1), None)
    assert ours == torch_sgd


def test_state_dict_of_a_never_stepped_optimizer(subject: Subject) -> None:
    """DCP lays out the state of an optimizer without state by stepping it once with zero
    gradients, every lr at 0 and no loss: that must not move the parameters, and must create the
    state a real step creates (per-parameter entries, names, shapes, dtypes; the param-group keys).

    DCP then loads a saved state into that layout: a tensor the layout lacks is dropped when a
    full state dict is loaded, and a group key it lacks makes the load fail."""
    model, batch = problem()
    before = params_of(model)
    opt = subject.make(model.parameters())
    lrs = [group["lr"] for group in opt.param_groups]
    saved = get_optimizer_state_dict(model, opt)
    assert_same_params(before, params_of(model))
    assert [group["lr"] for group in opt.param_groups] == lrs
    assert all(p.grad is None for p in model.parameters())
    assert_keyed_by_parameters(opt, model)

    stepped_model, _ = problem()
    stepped = subject.make(stepped_model.parameters())
    take_step(subject.case, stepped, stepped_model, batch)
    expected_dict = get_optimizer_state_dict(stepped_model, stepped)
    # The group entries too: loading a full state dict (StateDictOptions(full_state_dict=True))
    # fails on a group key that the initialized optimizer lacks.
    for group, expected_group in zip(saved["param_groups"], expected_dict["param_groups"], strict=True):
        missing = sorted(set(expected_group) - set(group))
        assert not missing, f"param-group keys a step writes but the state initialization does not: {missing}"
    expected = expected_dict["state"]
    assert saved["state"].keys() == expected.keys()
    for name, entries in expected.items():
        assert saved["state"][name].keys() == entries.keys(), name
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                got = saved["state"][name][key]
                assert isinstance(got, torch.Tensor), (name, key)
                assert (got.shape, got.dtype) == (value.shape, value.dtype), (name, key)
                assert torch.isfinite(got).all(), (name, key)


def test_distributed_checkpoint_save_and_load(subject: Subject, tmp_path) -> None:
    data = stream(8)
    model, opt = trained(subject, 4, data)
    saved = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(saved, checkpoint_id=tmp_path)

    restored_model, _ = problem(seed=99)
    restored = subject.make(restored_model.parameters())
    state = {"model": get_model_state_dict(restored_model), "optim": get_optimizer_state_dict(restored_model, restored)}
    dcp.load(state, checkpoint_id=tmp_path)
    set_model_state_dict(restored_model, state["model"])
    set_optimizer_state_dict(restored_model, restored, state["optim"])
    assert_same_params(params_of(model), params_of(restored_model))

    for batch in data[4:]:
        take_step(subject.case, opt, model, batch)
        take_step(subject.case, restored, restored_model, batch)
    assert_same_params(params_of(model), params_of(restored_model))
    assert_same_state(opt, restored)
