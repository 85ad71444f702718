"""HierarchicalHD(capturable=True): the device-side step (docs/algorithms.md, "The device-side step").

Nothing is read to the host in a step (counted as in tests/test_capturable.py), the default path's
steps and skips are taken (NaN gradient, infinite loss, a finite gradient whose outcome overflows,
a screened gradient spike), skipped steps leave parameters and state bit for bit untouched, the
scalars live on the device and are written in place, state dicts move between the two paths, and
``sync_warnings()`` reports the skips.  The default path's own numbers are tested in
tests/test_hypergradient.py, tests/test_hd_compiled.py and tests/test_hd_qlab_robustness.py.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from typing import Any

import pytest
import torch
from test_capturable import CountHostReads, assert_skipped_steps_untouched
from torch import nn

from lightning_adaptive_lr import HierarchicalHD
from lightning_adaptive_lr.optim import _sharding
from lightning_adaptive_lr.optim.hypergradient import (
    hd_rate,
    hypergradient_size,
    project_simplex,
    rate_step_factor,
    reference_lr,
    running_scale,
)

ALL_LEVELS = ("global", "layer", "unit", "param")

#: (id, constructor keywords).  The second group's ``lr`` is three times the first's.
SETTINGS = [
    pytest.param({"base": "sgd", "lr": 0.05}, id="sgd"),
    pytest.param({"base": "sgdn", "lr": 0.02}, id="sgdn"),
    pytest.param({"base": "adam", "lr": 0.01}, id="adam"),
    pytest.param(
        {
            "base": "adam",
            "lr": 0.01,
            "levels": ALL_LEVELS,
            "learn_weights": True,
            "weight_lr": 2e3,
            "level_pull": 100.0,
            "rate_bounds": (0.0, 10.0),
            "weight_decay": 1e-2,
        },
        id="adam-all-levels-learned-wd",
    ),
    pytest.param(
        {"base": "adam", "lr": 0.01, "levels": ALL_LEVELS, "level_pull": 100.0, "weight_decay": 1e-2},
        id="adam-all-levels-pull-wd",
    ),
    pytest.param(
        {"base": "sgd", "lr": 0.05, "levels": ("unit", "param"), "weights": (0.3, 0.7), "hyper_lr": (1e-2, 1e-3)},
        id="sgd-unit-param",
    ),
    pytest.param(
        {
            "base": "sgdn",
            "lr": 0.02,
            "levels": ALL_LEVELS,
            "learn_weights": True,
            "weight_lr": 50.0,
            "level_pull": 1.0,
            "rate_bounds": (0.2, 3.0),
            "foreach": False,
        },
        id="sgdn-all-levels-learned-bounds-single-tensor",
    ),
    pytest.param(
        {"base": "sgdn", "lr": 0.02, "levels": ("global",), "weight_decay": 1e-3, "max_rate_growth": math.inf},
        id="sgdn-global-wd-no-growth-cap",
    ),
]

#: Steps at which the gradient (5: a NaN), the loss (9: inf) or the outcome (13: one gradient entry
#: of 2e38, finite, whose Nesterov direction or Adam square overflows) makes the step skipped; at
#: 16 a gradient ×100 is a spike the screen flags, a step taken after its outcome was checked.
#: Step 13 is an ordinary one where no finite gradient can overflow the outcome (:func:`_overflows`).
BAD = {5: "grad", 9: "loss", 13: "overflow", 16: "spike"}


def _overflows(kwargs: dict[str, Any]) -> bool:
    """Whether step 13's gradient of 2e38 is applied.  Plain SGD's outcome x − lr·ρ·g of a finite
    gradient is finite at these rates (lr·ρ < 1); with learned weights the default path cannot take
    such a gradient (see test_learned_weights_and_an_overflowing_gradient)."""
    return kwargs["base"] != "sgd" and not kwargs.get("learn_weights", False)


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Two param groups with different rates: the per-group step sizes are exercised."""
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3 * lr}]


def _expected_skips(kwargs: dict[str, Any]) -> int:
    return 3 if _overflows(kwargs) else 2


def _train(kwargs: dict[str, Any], capturable: bool, steps: int = 20, dtype: torch.dtype = torch.float32):
    model = _model(dtype)
    opt = HierarchicalHD(_groups(model, kwargs["lr"]), **kwargs, capturable=capturable)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=gen).to(dtype), torch.randn(64, 1, generator=gen).to(dtype)
    reads: list[str] = []
    snapshots = {}
    for k in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        bad = BAD.get(k)
        if bad == "grad":
            model[0].weight.grad[0, 0] = float("nan")
        elif bad == "loss":
            loss = loss * float("inf")
        elif bad == "overflow" and _overflows(kwargs):
            model[2].weight.grad[0, 0] = 2e38
        elif bad == "spike":
            model[0].weight.grad.mul_(100.0)
        before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
        with CountHostReads() as counter:
            opt.step(loss=loss)
        reads += counter.reads
        if bad:
            after = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
            snapshots[k] = (*before, *after)
    return model, opt, reads, snapshots


def _skipped_snapshots(snapshots: dict, opt_default: HierarchicalHD, kwargs: dict[str, Any]) -> dict:
    """The snapshots of the steps the default path skipped, as assert_skipped_steps_untouched takes them."""
    skipped = {k: s for k, s in snapshots.items() if BAD[k] in ("grad", "loss") or (BAD[k] == "overflow" and _overflows(kwargs))}
    assert len(skipped) == opt_default.param_groups[0]["skipped_steps"]
    return {k: ((params, state), params_after, state_after) for k, (params, state, params_after, state_after) in skipped.items()}


def _quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return function(*args, **kwargs)


def _assert_same_number(b: Any, a: Any, what: str, rel: float = 1e-6) -> None:
    """A default path's number ``a`` and the capturable path's 0-d tensor ``b``."""
    assert isinstance(b, torch.Tensor) and b.dim() == 0, what
    if isinstance(a, int) and not isinstance(a, bool):
        assert b.dtype == torch.int64 and int(b) == a, what
    else:
        assert b.dtype == torch.float64, what
        assert float(b) == pytest.approx(a, rel=rel, abs=1e-12), what


# ---------------------------------------------------------------------------- no host read, the same steps


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_a_capturable_step_reads_nothing_to_the_host(kwargs: dict[str, Any]) -> None:
    *_, default_reads, _ = _quiet(_train, kwargs, capturable=False)
    *_, reads, _ = _quiet(_train, kwargs, capturable=True)
    assert len(default_reads) >= 20  # the counter does see the default path's gate (one read a step at least)
    assert reads == []


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_a_capturable_step_takes_the_default_paths_steps_and_skips(kwargs: dict[str, Any]) -> None:
    model_a, opt_a, _, _ = _quiet(_train, kwargs, capturable=False)
    model_b, opt_b, _, snapshots = _quiet(_train, kwargs, capturable=True)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        state_a, state_b = opt_a.state[p_a], opt_b.state[p_b]
        assert set(state_b) == set(state_a)
        for key, value in state_a.items():
            if isinstance(value, torch.Tensor):
                assert state_b[key].dtype == value.dtype, key  # state dicts move between the paths as they are
                # float32 rounding (the sums are added in another order), grown over 20 steps:
                # the directions and buffers measured up to 2.4e-6 apart (float64: 1e-12, below)
                torch.testing.assert_close(state_b[key], value, rtol=2e-5, atol=5e-6)
            else:
                _assert_same_number(state_b[key], value, key, rel=1e-5)
    group_a, group_b = opt_a.param_groups[0], opt_b.param_groups[0]
    assert group_a["skipped_steps"] == _expected_skips(kwargs)
    for key in ("step", "skipped_steps", "consecutive_skips"):
        _assert_same_number(group_b[key], group_a[key], key)
    # The learned weights are the most sensitive numbers: measured up to 9e-6 apart (relative).
    for key in ("global_rate_multiple", "hypergradient_scale"):
        _assert_same_number(group_b[key], group_a[key], key, rel=5e-5)
    assert len(group_b["level_weights"]) == len(group_a["level_weights"])
    for w_b, w_a in zip(group_b["level_weights"], group_a["level_weights"]):
        _assert_same_number(w_b, w_a, "level_weights", rel=5e-5)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        _assert_same_number(gb["hd_reference_lr"], ga["hd_reference_lr"], "hd_reference_lr")
        recorded = [k for k in ga if k.startswith(("hd_rate_", "hd_weight_")) or k == "effective_lr"]
        assert recorded and set(recorded) <= set(gb)
        for key in recorded:
            _assert_same_number(gb[key], ga[key], key, rel=5e-5)
    assert_skipped_steps_untouched(_skipped_snapshots(snapshots, opt_a, kwargs))


def test_the_parity_is_not_vacuous() -> None:
    """The rates and weights really moved, and the spike step was screened (a step taken on the
    default path after its outcome was checked, taken on the device too)."""
    kwargs = SETTINGS[3].values[0]
    _, opt, _, _ = _quiet(_train, kwargs, capturable=True)
    group = opt.param_groups[0]
    assert abs(float(group["global_rate_multiple"]) - 1.0) > 1e-3
    assert max(abs(float(w) - 0.25) for w in group["level_weights"]) > 1e-3
    assert float(group["hd_rate_param_max"] - group["hd_rate_param_min"]) > 0
    assert int(group["step"]) == 18 and float(group["hypergradient_scale"]) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_read_nothing_and_take_the_default_paths_skips(dtype: torch.dtype) -> None:
    """16-bit parameters (every default step screened: float16) and float64: no read, the same
    skips, finite values; float64 agrees to its own rounding."""
    kwargs = SETTINGS[3].values[0]
    model_a, opt_a, _, _ = _quiet(_train, kwargs, capturable=False, dtype=dtype)
    model_b, opt_b, reads, _ = _quiet(_train, kwargs, capturable=True, dtype=dtype)
    assert reads == []
    assert int(opt_b.param_groups[0]["skipped_steps"]) == opt_a.param_groups[0]["skipped_steps"]
    assert all(torch.isfinite(p).all() for p in model_b.parameters())
    if dtype == torch.float64:
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("capturable", [False, True], ids=["default", "capturable"])
def test_learned_weights_and_an_overflowing_gradient(capturable: bool) -> None:
    """With learned weights a gradient of 2e38 gives weight hypergradients near 1e40.  Projected
    onto the simplex as they are, ``(Σv − 1)/i`` at 1e40 loses the 1 and the new weights came out
    near 4e39, finite: the default path then stopped with a RuntimeError (a step size float32
    cannot hold).  Shifted by their largest entry first (the projection ignores a shift), the
    weights stay on the simplex; the step's outcome is not finite and both paths skip it untouched."""
    kwargs = SETTINGS[3].values[0]
    model = _model()
    opt = HierarchicalHD(_groups(model, kwargs["lr"]), **kwargs, capturable=capturable)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    for k in range(8):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if k == 6:
            model[2].weight.grad[0, 0] = 2e38
            before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
        _quiet(opt.step)
        if k == 6:
            after = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
    assert int(opt.param_groups[0]["skipped_steps"]) == 1 and int(opt.param_groups[0]["step"]) == 7
    for x_before, x_after in zip(before[0], after[0]):
        assert torch.equal(x_before, x_after)
    for index, entry in before[1].items():  # numbers in the default path's state, tensors in the other's
        for key, value in entry.items():
            kept = after[1][index][key]
            assert torch.equal(kept, value) if isinstance(value, torch.Tensor) else kept == value, key
    assert all(torch.isfinite(p).all() for p in model.parameters())
    weights = [float(w) for w in opt.param_groups[0]["level_weights"]]
    assert min(weights) >= 0.0 and sum(weights) == pytest.approx(1.0)


def test_the_simplex_projection_keeps_huge_differences() -> None:
    """Entries 1e40 apart: all the weight goes to the largest, on the host and on the device."""
    assert project_simplex([1e40, 0.0, -3.0]) == [1.0, 0.0, 0.0]
    on_device = project_simplex([torch.tensor(v, dtype=torch.float64) for v in (1e40, 0.0, -3.0)])
    assert on_device.tolist() == [1.0, 0.0, 0.0]


def test_a_skipped_first_step_creates_the_state_and_changes_nothing_else() -> None:
    """The device-side step creates the state at the first step, taken or not (the default path
    only at the first step taken): the following steps are the default path's all the same."""

    def run(capturable: bool) -> tuple[nn.Module, HierarchicalHD]:
        model = _model()
        opt = HierarchicalHD(model.parameters(), base="adam", lr=0.01, levels=ALL_LEVELS, capturable=capturable)
        x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(2)), torch.zeros(16, 1)
        for k in range(6):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if k == 0:
                model[2].bias.grad.fill_(float("nan"))
            _quiet(opt.step)
        return model, opt

    (model_a, opt_a), (model_b, opt_b) = run(False), run(True)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    assert int(opt_b.param_groups[0]["step"]) == opt_a.param_groups[0]["step"] == 5
    assert int(opt_b.state[model_b[0].weight]["step"]) == opt_a.state[model_a[0].weight]["step"] == 5


@pytest.mark.parametrize("scheduler", ["step", "onecycle"])
def test_schedulers_move_the_reference_rate_as_on_the_default_path(scheduler: str) -> None:
    """``hd_reference_lr`` (the largest scheduled lr) is a device tensor, kept only where a step
    is taken; under a schedule the capturable path takes the default path's steps."""

    def run(capturable: bool) -> tuple[nn.Module, HierarchicalHD]:
        model = _model()
        opt = HierarchicalHD(_groups(model, 0.02), base="sgdn", lr=0.02, capturable=capturable)
        if scheduler == "step":
            schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        else:
            schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.05, 0.15], total_steps=16)
        gen = torch.Generator().manual_seed(1)
        for k in range(15):
            x, y = torch.randn(32, 5, generator=gen), torch.randn(32, 1, generator=gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            _quiet(opt.step, loss=loss * float("inf") if k == 6 else loss)
            schedule.step()
        return model, opt

    (model_a, opt_a), (model_b, opt_b) = run(False), run(True)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
        _assert_same_number(gb["hd_reference_lr"], ga["hd_reference_lr"], "hd_reference_lr")
        assert float(gb["effective_lr"]) == pytest.approx(ga["effective_lr"], rel=1e-5)


# ---------------------------------------------------------------------------- the state on the device


def test_the_scalars_are_device_tensors_written_in_place() -> None:
    """After the first step every optimizer-wide and per-tensor scalar is a 0-d tensor (counts
    int64, the rest float64 here; ``level_weights`` a tuple of them), and later steps, taken or
    skipped, write into the same memory (what a captured CUDA graph replays)."""
    kwargs = SETTINGS[3].values[0]
    model = _model()
    opt = HierarchicalHD(_groups(model, kwargs["lr"]), **kwargs, capturable=True)
    x, y = torch.randn(16, 5), torch.randn(16, 1)

    def step(factor: float = 1.0) -> None:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        _quiet(opt.step, loss=loss * factor)

    def memory() -> dict[str, int]:
        out = {}
        for i, group in enumerate(opt.param_groups):
            for key, value in group.items():
                if isinstance(value, torch.Tensor):
                    out[f"group{i}.{key}"] = value.data_ptr()
            for j, w in enumerate(group["level_weights"]):
                out[f"group{i}.level_weights[{j}]"] = w.data_ptr()
        for j, p in enumerate(model.parameters()):
            for key, value in opt.state[p].items():
                out[f"param{j}.{key}"] = value.data_ptr()
        return out

    step()
    group = opt.param_groups[0]
    for key in ("step", "skipped_steps", "consecutive_skips"):
        assert group[key].dtype == torch.int64 and group[key].dim() == 0, key
    for key in ("global_rate_multiple", "hypergradient_scale", "hd_reference_lr", "effective_lr", "hd_weight_unit"):
        assert group[key].dtype == torch.float64 and group[key].dim() == 0, key
    assert len(group["level_weights"]) == 4
    assert all(w.dtype == torch.float64 and w.dim() == 0 for w in group["level_weights"])
    for p in model.parameters():
        state = opt.state[p]
        assert state["step"].dtype == torch.int64 and state["step"].dim() == 0
        for key in ("hd_rate_layer", "direction_scale"):
            assert state[key].dtype == torch.float64 and state[key].dim() == 0, key
    for later in opt.param_groups[1:]:
        for key in ("step", "global_rate_multiple", "level_weights", "hypergradient_scale"):
            assert later[key] is group[key], key  # one tensor, held by every group
    before = memory()
    step()
    step(float("nan"))
    step()
    assert memory() == before
    assert int(group["skipped_steps"]) == 1 and int(group["step"]) == 3


@pytest.mark.parametrize("base", ["sgd", "sgdn", "adam"])
def test_state_dicts_move_between_capturable_and_default(base: str) -> None:
    """Either way a resumed run continues as the uninterrupted one (to float32 rounding): the
    numbers become tensors on the device and back (as in tests/test_capturable.py, the option is
    restored from the state dict and switched by setting it after loading)."""
    kwargs = {"base": base, "lr": 0.02, "levels": ALL_LEVELS, "learn_weights": True, "weight_lr": 10.0}

    def run(first: bool, second: bool, steps: int = 12, switch: int = 6) -> list[torch.Tensor]:
        model = _model()
        opt = HierarchicalHD(_groups(model, 0.02), capturable=first, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for k in range(steps):
            if k == switch:
                saved = copy.deepcopy(opt.state_dict())
                opt = HierarchicalHD(_groups(model, 0.02), capturable=second, **kwargs)
                opt.load_state_dict(saved)
                assert opt.param_groups[0]["capturable"] is first
                for group in opt.param_groups:
                    group["capturable"] = second
            x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            _quiet(opt.step, loss=loss * float("nan") if k == 3 else loss)
        assert isinstance(opt.param_groups[0]["global_rate_multiple"], torch.Tensor) is second
        layer = opt.state[model[0].weight]["hd_rate_layer"]
        assert isinstance(layer, torch.Tensor) is second and (not second or layer.dtype == torch.float64)
        if base == "adam":
            count = opt.state[model[0].weight]["step"]
            assert count == 11 and (not second or count.dtype == torch.int64)
        return [p.detach().clone() for p in model.parameters()]

    reference = run(False, False)
    for first, second in ((True, False), (False, True), (True, True)):
        for a, b in zip(reference, run(first, second)):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------- skips, warnings, refusals


def test_sync_warnings_names_the_cause_and_raises_after_the_limit() -> None:
    model = _model()
    opt = HierarchicalHD(model.parameters(), base="adam", lr=0.01, capturable=True, max_consecutive_skips=4)
    x, y = torch.randn(8, 5), torch.randn(8, 1)

    def step(edit=None) -> None:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if edit is not None:
            edit()
        opt.step()

    def nan_gradient() -> None:
        model[0].weight.grad[0, 0] = float("nan")

    def overflowing_gradient() -> None:  # finite; its square overflows Adam's v: the outcome
        model[2].weight.grad[0, 0] = 2e38

    step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(nan_gradient)
        assert caught == []  # the step itself says nothing: it cannot read
        opt.sync_warnings()
        opt.sync_warnings()  # nothing new: no second warning
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "non-finite gradient (dots)" in message and "1 step skipped so far, 1 in a row" in message, message
    for _ in range(3):  # each skipped for the step's outcome
        step(overflowing_gradient)
    with pytest.raises(RuntimeError, match=r"4 steps in a row were skipped.*non-finite step outcome \(new_state\)"):
        opt.sync_warnings()
    opt.param_groups[0]["max_consecutive_skips"] = None
    for _ in range(6):
        step(overflowing_gradient)
    with pytest.warns(RuntimeWarning, match=r"non-finite step outcome \(new_state\).*10 steps skipped so far, 10 in a row"):
        opt.sync_warnings()
    step()  # taken: the run of skips ends
    assert int(opt.param_groups[0]["consecutive_skips"]) == 0 and int(opt.param_groups[0]["skipped_steps"]) == 10


def test_the_default_path_is_not_capturable_and_syncs_nothing() -> None:
    model = _model()
    opt = HierarchicalHD(model.parameters())
    with CountHostReads() as counter, warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.sync_warnings()
    assert counter.reads == [] and opt.param_groups[0]["capturable"] is False


def test_compiled_with_capturable_is_refused() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"`compiled` and `capturable` cannot both be True.*compiled=False"):
        HierarchicalHD(model.parameters(), base="adam", compiled=True, capturable=True)
    with pytest.raises(ValueError, match="`capturable` must be True or False"):
        HierarchicalHD(model.parameters(), capturable=1)
    opt = HierarchicalHD(model.parameters(), base="adam", capturable=True)
    for group in opt.param_groups:  # switched on afterwards: refused at the step, before any change
        group["compiled"] = True
    nn.functional.mse_loss(model(torch.randn(4, 5)), torch.zeros(4, 1)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="`compiled` and `capturable` cannot both be True"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_parameters_on_several_devices_are_refused_at_the_step() -> None:
    """The step's scalars live on one device: parameters on two (here the CPU and ``meta``) are
    refused with a message naming them, before anything changes."""
    first, second = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, device="meta"))
    opt = HierarchicalHD([first, second], capturable=True)
    first.grad, second.grad = torch.ones(3), torch.ones(2, device="meta")
    with pytest.raises(RuntimeError, match=r"parameters lie on several \(\['cpu', 'meta'\]\).*capturable=False"):
        opt.step()
    assert torch.equal(first, torch.ones(3)) and len(opt.state) == 0


def test_a_group_added_later_joins_the_shared_numbers() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 3), nn.Linear(3, 1)
    opt = HierarchicalHD(first.parameters(), base="sgdn", lr=0.02, levels=ALL_LEVELS, capturable=True)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def step() -> list[str]:
        opt.zero_grad()
        nn.functional.mse_loss(second(first(x)), y).backward()
        with CountHostReads() as counter:
            opt.step()
        return counter.reads

    step()
    opt.add_param_group({"params": second.parameters(), "lr": 0.05})
    assert step() == [] and step() == []
    for key in ("step", "global_rate_multiple", "level_weights", "skipped_steps"):
        assert opt.param_groups[1][key] is opt.param_groups[0][key], key
    assert int(opt.param_groups[1]["step"]) == 3
    assert isinstance(opt.param_groups[1]["hd_rate_param_mean"], torch.Tensor)


def test_the_sharded_records_are_the_default_paths() -> None:
    """With a (one-process) sharding layout the records go through the completed statistics, on
    the device as on the host: the same numbers, nothing read."""
    kwargs = {"base": "sgd", "lr": 0.05, "levels": ALL_LEVELS}
    layout = _sharding.Layout(group=None, size=1, units_intact=True, what="one process")
    records = []
    for capturable in (False, True):
        model = _model()
        opt = HierarchicalHD(_groups(model, 0.05), capturable=capturable, **kwargs)
        opt._find_layout = lambda: layout  # type: ignore[method-assign]
        x, y = torch.randn(16, 5), torch.randn(16, 1)
        reads = []
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            with CountHostReads() as counter:
                opt.step()
            reads += counter.reads
        assert bool(reads) is not capturable
        records.append(opt.param_groups[1])
    host, device = records
    keys = [k for k in host if k.startswith("hd_rate_") or k == "effective_lr"]
    assert len(keys) == 11
    for key in keys:
        _assert_same_number(device[key], host[key], key, rel=1e-6)


# ---------------------------------------------------------------------------- the rules on 0-d tensors


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def test_project_simplex_on_the_device_is_the_host_projection() -> None:
    rng = random.Random(0)
    for n in range(1, 6):
        for _ in range(500):
            values = [rng.uniform(-3, 3) * 10 ** rng.randint(-3, 3) for _ in range(n)]
            assert project_simplex([_t(v) for v in values]).tolist() == project_simplex(values)


def test_the_scalar_rules_take_0d_tensors() -> None:
    """One source of truth: the rules give the same numbers on floats and on 0-d tensors."""
    cases = [
        (hd_rate, (1.2, 0.3, 0.5), {"pull": 0.1, "parent": 0.9, "low": 0.1, "high": 5.0, "growth": 2.0}),
        (hd_rate, (0.5, 40.0, 0.5), {"growth": 2.0}),
        (hd_rate, (0.5, 40.0, 0.5), {"growth": math.inf}),
        (hd_rate, (0.5, -40.0, 0.5), {}),
        (running_scale, (0.0, 3.0), {}),
        (running_scale, (2.0, 0.0), {}),
        (running_scale, (2.0, 3.0), {}),
    ]
    for rule, args, kwargs in cases:
        host = rule(*args, **kwargs)
        device = rule(*(_t(a) for a in args), **{k: _t(v) if k in ("parent", "growth") else v for k, v in kwargs.items()})
        assert isinstance(device, torch.Tensor) and float(device) == host, (rule.__name__, args, kwargs)
    assert float(rate_step_factor(0.1, _t(0.2), _t(1.5))) == rate_step_factor(0.1, 0.2, 1.5)
    assert rate_step_factor(0.0, _t(0.2), _t(1.5)) == 0.0
    assert float(reference_lr(0.05, 0.1, None, _t(0.3))) == reference_lr(0.05, 0.1, None, 0.3) == 0.3
    dots = [2.0, -3.0, 0.5]
    assert float(hypergradient_size([0.5, 1.0, 2.0], torch.tensor(dots, dtype=torch.float64))) == pytest.approx(
        hypergradient_size([0.5, 1.0, 2.0], dots), rel=1e-15
    )
