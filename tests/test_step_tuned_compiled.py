"""StepTunedSGD(compiled=True): each half-step's element-wise work as one Inductor loop per tensor.

The reference is the eager path of the same class (itself tested against an independent float64
reference in tests/test_step_tuned.py).  Only the element-wise updates are compiled (the sums, the
gate and the gain are the eager path's code), so the parameters, every state tensor and the records
must agree to float rounding (``first_grad`` while it is pending: after a second half-step it is a
buffer with no meaning, scratch to the eager path), skipped steps must leave everything bit for bit, and a missing compiler must raise before
anything changes.  Every test steps the same small network, so that each compiled function is
compiled for few sets of shapes (several seconds each).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_adaptive_lr import StepTunedSGD
from lightning_adaptive_lr.optim import _compiled

#: Per-group values the two paths must agree on: the records and the iteration's bookkeeping.
RECORDS = (
    "effective_lr", "gain", "curvature", "step", "skipped_steps", "iteration", "phase", "gamma",
    "half_step_lr", "first_half_avg_dot", "first_half_sqnorm",
)  # fmt: skip

#: ``call index → parameters (by index) whose gradient is dropped`` for the partial-pairs setting:
#: even calls are first half-steps, odd ones second half-steps (``same_batch=False``).  Parameter 1
#: misses a second half (call 1) and a first half (call 6: it takes call 7's second half alone);
#: parameter 2 misses a second half (call 9).
DROPS = {1: (1,), 6: (1,), 9: (2,)}

#: ``(options, drops, the compiled bodies the run takes)``: the first ``g_a`` is stored as a copy (no
#: buffer to copy into yet), later ones copied into it (``kept_step``); with weight decay ``g_a`` is a
#: new tensor, stored as is; with ``same_batch`` it is a copy dropped after the step.
SETTINGS = [
    pytest.param({}, {}, {"kept_step", "difference_average_step"}, id="default"),
    pytest.param({"weight_decay": 0.1}, {}, {"difference_average_step"}, id="weight-decay"),
    pytest.param({"same_batch": True}, {}, {"difference_average_step"}, id="same-batch"),
    pytest.param({}, DROPS, {"kept_step", "difference_average_step"}, id="partial-pairs"),
]
DTYPES = [
    pytest.param(torch.float64, 1e-12, 1e-14, id="float64"),
    pytest.param(torch.float32, 2e-5, 1e-7, id="float32"),
]


def network(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def batches(n: int, dtype: torch.dtype, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, 5, generator=gen).to(dtype), torch.randn(32, 1, generator=gen).to(dtype)) for _ in range(n)
    ]


def take_step(
    model: nn.Module,
    opt: StepTunedSGD,
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    drop: tuple[int, ...] = (),
    poison: bool = False,
) -> None:
    """One ``step()``: a gradient at the batch (with a closure, called twice, under ``same_batch``);
    the parameters in ``drop`` lose theirs, and ``poison`` writes a NaN into the last gradient."""
    params = list(model.parameters())

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        for i in drop:
            params[i].grad = None
        if poison:
            params[-1].grad[0] = float("nan")
        return loss

    if opt.calls_closure_twice:
        opt.step(closure)
    else:
        closure()
        opt.step()


def train(options: dict[str, Any], compiled: bool, dtype: torch.dtype) -> tuple[nn.Module, StepTunedSGD]:
    """15 calls of ``step()``."""
    model = network(dtype)
    opt = StepTunedSGD(model.parameters(), lr=0.2, **options, compiled=compiled)
    for batch in batches(15, dtype):
        take_step(model, opt, batch)
    return model, opt


def assert_close_records(got: dict[str, Any], expected: dict[str, Any], rel: float) -> None:
    for key in RECORDS:
        a, b = got[key], expected[key]
        if b is None or isinstance(b, int):
            assert a == b, key
        else:
            assert a == pytest.approx(b, rel=rel, abs=1e-300, nan_ok=True), key


def assert_same_run(
    model_c: nn.Module, opt_c: StepTunedSGD, model_e: nn.Module, opt_e: StepTunedSGD, rtol: float, atol: float
) -> None:
    """Parameters, every state entry and the records of the compiled run match the eager run's."""
    for q, p in zip(model_c.parameters(), model_e.parameters()):
        torch.testing.assert_close(q, p, rtol=rtol, atol=atol)
        state_c, state_e = opt_c.state[q], opt_e.state[p]
        assert set(state_c) == set(state_e)
        for key, value in state_e.items():
            if key == "first_grad" and not state_e["first_grad_pending"]:
                continue
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(state_c[key], value, rtol=rtol, atol=atol, msg=key)
            else:
                assert state_c[key] == value, key
    for group_c, group_e in zip(opt_c.param_groups, opt_e.param_groups):
        assert_close_records(group_c, group_e, rel=rtol * 50)


@pytest.mark.parametrize(("options", "drops", "bodies"), SETTINGS)
@pytest.mark.parametrize(("dtype", "rtol", "atol"), DTYPES)
def test_compiled_matches_the_eager_path(
    monkeypatch: pytest.MonkeyPatch,
    options: dict[str, Any],
    drops: dict[int, tuple[int, ...]],
    bodies: set[str],
    dtype: torch.dtype,
    rtol: float,
    atol: float,
) -> None:
    """The two paths side by side, compared after every ``step()``; the compiled run takes the fused bodies."""
    ran = set()
    run_compiled = _compiled.run_compiled

    def spy(owner: str, function: Callable[..., Any], *args: Any) -> Any:
        ran.add(function.__name__)
        return run_compiled(owner, function, *args)

    monkeypatch.setattr(_compiled, "run_compiled", spy)
    runs = []
    for compiled in (False, True):
        model = network(dtype)
        runs.append((model, StepTunedSGD(model.parameters(), lr=0.2, **options, compiled=compiled)))
    (model_e, opt_e), (model_c, opt_c) = runs
    for k, batch in enumerate(batches(15, dtype)):
        for model, opt in runs:
            take_step(model, opt, batch, drop=drops.get(k, ()))
        assert_same_run(model_c, opt_c, model_e, opt_e, rtol, atol)
    assert opt_c.param_groups[0]["compiled"] and not opt_e.param_groups[0]["compiled"]
    iterations = 15 if options.get("same_batch") else 7
    assert opt_c.param_groups[0]["iteration"] == iterations  # every step was taken (none skipped)
    assert opt_c.param_groups[0]["skipped_steps"] == 0
    assert ran == bodies


def snapshot(model: nn.Module, opt: StepTunedSGD) -> tuple[list[torch.Tensor], dict[str, Any]]:
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_untouched(before: tuple[list[torch.Tensor], dict[str, Any]], model: nn.Module, opt: StepTunedSGD) -> None:
    """Parameters and per-parameter state bit for bit as ``before``; the group bookkeeping too, but
    for the skip counters."""
    params, saved = before
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params))
    now = opt.state_dict()
    assert now["state"].keys() == saved["state"].keys()
    for index, entry in saved["state"].items():
        assert now["state"][index].keys() == entry.keys()
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(now["state"][index][key]), torch.as_tensor(value)), key
    ignored = {"skipped_steps", "consecutive_skips", "params"}
    for group_now, group_saved in zip(now["param_groups"], saved["param_groups"]):
        assert group_now.keys() == group_saved.keys()
        for key in group_saved.keys() - ignored:
            a, b = group_now[key], group_saved[key]
            assert a == b or (isinstance(b, float) and math.isnan(a) and math.isnan(b)), key


@pytest.mark.parametrize("same_batch", [False, True], ids=["next-batch", "same-batch"])
def test_a_skipped_step_leaves_everything_untouched(same_batch: bool) -> None:
    """A NaN gradient at a first half-step (call 2: skipped, so call 3 takes the first half) and at a
    second one (call 4); with ``same_batch`` both are whole iterations.  The compiled run changes
    nothing bit for bit there, counts the skips as the eager run does, and both go on alike."""
    dtype, poisoned = torch.float64, {2, 4}
    runs = []
    for compiled in (False, True):
        model = network(dtype)
        opt = StepTunedSGD(model.parameters(), lr=0.2, same_batch=same_batch, compiled=compiled)
        phases = []
        for k, batch in enumerate(batches(9, dtype)):
            before = snapshot(model, opt)
            if k in poisoned:
                phases.append(opt.param_groups[0]["phase"])
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                take_step(model, opt, batch, poison=k in poisoned)
            if k in poisoned:
                assert_untouched(before, model, opt)
        assert phases == ([0, 0] if same_batch else [0, 1])
        assert opt.param_groups[0]["skipped_steps"] == 2
        runs.append((model, opt))
    (model_e, opt_e), (model_c, opt_c) = runs
    assert_same_run(model_c, opt_c, model_e, opt_e, rtol=1e-12, atol=1e-14)


@pytest.mark.usefixtures("no_inductor")
@pytest.mark.parametrize("same_batch", [False, True], ids=["next-batch", "same-batch"])
def test_failed_compilation_raises_before_any_state_change(same_batch: bool) -> None:
    """Raised before anything moves (with ``same_batch``, before the closure is evaluated)."""
    model = network(torch.float32)
    opt = StepTunedSGD(model.parameters(), same_batch=same_batch, compiled=True)
    x, y = batches(1, torch.float32)[0]
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"StepTunedSGD\(compiled=True\).*no C\+\+ compiler found"):
        if same_batch:
            opt.step(closure)
        else:
            closure()
            opt.step()
    assert len(calls) == (0 if same_batch else 1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(len(opt.state[p]) == 0 for p in model.parameters())
    group = opt.param_groups[0]
    assert (group["step"], group["phase"], group["skipped_steps"], group["half_step_lr"]) == (0, 0, 0, None)


@pytest.mark.parametrize(
    ("first", "second"), [(True, False), (False, True)], ids=["compiled-to-eager", "eager-to-compiled"]
)
def test_a_state_dict_resumes_on_the_other_path(first: bool, second: bool) -> None:
    """Saved between the two half-steps of an iteration (``first_grad`` pending) and loaded into an
    optimizer of the other path, the run continues as the uninterrupted eager run.  The state dict
    restores the option it was saved with (as torch's flags do); the path is switched after loading."""
    dtype, switch = torch.float64, 7
    reference = train({}, False, dtype)
    model = network(dtype)
    opt = StepTunedSGD(model.parameters(), lr=0.2, compiled=first)
    for k, batch in enumerate(batches(15, dtype)):
        if k == switch:
            assert opt.param_groups[0]["phase"] == 1
            saved = copy.deepcopy(opt.state_dict())
            opt = StepTunedSGD(model.parameters(), lr=0.2, compiled=second)
            opt.load_state_dict(saved)
            assert opt.param_groups[0]["compiled"] is first
            for group in opt.param_groups:
                group["compiled"] = second
        take_step(model, opt, batch)
    assert_same_run(model, opt, *reference, rtol=1e-12, atol=1e-14)


def test_compiled_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="`compiled`"):
        StepTunedSGD(network(torch.float32).parameters(), compiled="yes")


def test_compiled_is_documented_and_keyword_only() -> None:
    parameter = inspect.signature(StepTunedSGD).parameters["compiled"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is False
    assert "compiled:" in (StepTunedSGD.__doc__ or "")

