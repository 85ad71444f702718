"""Step-Tuned SGD's device-side step (``capturable=True``): nothing read to the host, the default path's numbers.

Which half-step a call takes is a device value there (a skipped half-step is taken again at the
next call), so these runs skip first and second half-steps alike and check that both paths take
the same half-steps in the same order, skip the same ones, and leave those bit for bit untouched.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lightning_adaptive_lr as lalr
from conftest import make_least_squares
from lightning_adaptive_lr.optim.step_tuned import (
    FIRST_GRAD_PENDING,
    PENDING,
    step_tuned_curvature,
    step_tuned_fits,
    step_tuned_gain,
    step_tuned_step_size,
)
from test_capturable import CountHostReads, assert_skipped_steps_untouched
from test_step_tuned import LAYOUTS, OPTIONS, reference, torch_options

pytestmark = pytest.mark.usefixtures("one_thread")

#: Bad steps of a float32 run and the half-step each falls on (1: first, 2: second) when the
#: earlier ones were skipped: a NaN gradient and an infinite loss at both halves, and a finite
#: gradient of 1e30 (its square overflows) at a first half.
BAD = {3: "grad", 6: "loss", 10: "overflow", 13: "grad", 16: "loss"}
HALF_OF_BAD = {3: 2, 6: 2, 10: 1, 13: 1, 16: 1}
#: Before this step (a second half-step, after the skips of BAD) the first group's lr is halved by
#: hand, as a scheduler would: the half-step keeps its η_k, the change applies from the next iteration.
LR_CHANGE = 7

SETTINGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"weight_decay": 0.05, "beta": 0.0, "nu": 1.5, "gain_bounds": (0.25, 4.0)}, id="wd-beta0"),
    pytest.param({"lr": 0.6, "delta": 0.1}, id="lr-above-one-half"),
]


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two param groups with their own lr: the per-group step sizes are exercised."""
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.3}]


def _poison(model: nn.Module, bad: str | None, loss: torch.Tensor) -> torch.Tensor:
    """Make this step's gradient or loss bad as ``bad`` says; returns the loss to hand over."""
    grad = model[0].weight.grad
    if bad == "grad":
        grad[0, 0] = float("nan")
    elif bad == "loss":
        loss = loss * float("inf")
    elif bad == "overflow":
        grad.mul_(1e30)
    elif bad == "first-fits":  # float16: finite entries, but |g_a| ≤ ‖g_a‖ is above the largest float16
        grad.fill_(3e4)
    elif bad == "second-fits":  # float16: |g_b| at the largest float16, so |g_a| + |g_b| is above it
        grad.fill_(torch.finfo(torch.float16).max)
    return loss


def _train(
    kwargs: dict[str, Any], capturable: bool, bad: dict[int, str], steps: int = 20, dtype: torch.dtype = torch.float32
):
    """``steps`` half-steps; returns the model, the optimizer, the host reads of its steps, the
    snapshots around the bad steps and the half-step (1 or 2) each bad step fell on."""
    model = _model(dtype)
    opt = lalr.StepTunedSGD(_groups(model), **kwargs, capturable=capturable)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=gen).to(dtype), torch.randn(64, 1, generator=gen).to(dtype)
    reads, snapshots, halves = [], {}, {}
    for k in range(steps):
        if k == LR_CHANGE:
            opt.param_groups[0]["lr"] *= 0.5
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        loss = _poison(model, bad.get(k), loss)
        before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
        if k in bad:
            halves[k] = int(opt.param_groups[0]["phase"]) + 1
        with CountHostReads() as counter:
            opt.step(loss=loss)
        reads += counter.reads
        if k in bad:
            snapshots[k] = before, [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
    return model, opt, reads, snapshots, halves


def _quiet_train(*args: Any, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _train(*args, **kwargs)


def _assert_same_run(
    opt_a, opt_b, model_a, model_b, *, rtol: float, atol: float, scalar_rtol: float = 1e-5
) -> dict[str, float]:
    """The capturable run ``b`` took the default run ``a``'s steps; returns the largest differences.

    ``rtol``, ``atol``: for the parameters and the state; ``scalar_rtol``: for γ and the records."""
    largest = {"params": 0.0, "state": 0.0, "gamma": 0.0}
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
        largest["params"] = max(largest["params"], (b.double() - a.double()).abs().max().item())
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        for key, value in opt_a.state[p_a].items():
            got = opt_b.state[p_b][key]
            if key == FIRST_GRAD_PENDING:
                assert bool(got) is value, key
                continue
            torch.testing.assert_close(got.to(value.dtype), value, rtol=rtol, atol=atol)
            largest["state"] = max(largest["state"], (got.double() - value.double()).abs().max().item())
    for key in ("step", "skipped_steps", "consecutive_skips", "iteration", "phase"):
        assert int(opt_b.param_groups[0][key]) == opt_a.param_groups[0][key], key
    gamma_a, gamma_b = opt_a.param_groups[0]["gamma"], float(opt_b.param_groups[0]["gamma"])
    assert gamma_b == pytest.approx(gamma_a, rel=scalar_rtol)
    largest["gamma"] = abs(gamma_b - gamma_a) / abs(gamma_a)
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        assert float(group_b["effective_lr"]) == pytest.approx(group_a["effective_lr"], rel=scalar_rtol)
        assert float(group_b["gain"]) == pytest.approx(group_a["gain"], rel=scalar_rtol)
        assert float(group_b["curvature"]) == pytest.approx(group_a["curvature"], rel=10 * scalar_rtol, abs=1e-9)
        for key in PENDING:  # the pending iteration's η_k and sums (None: none pending)
            value = float(group_b[key])
            assert (group_a[key] is None) == np.isinf(value), key  # +inf: none pending
            if group_a[key] is not None:
                assert value == pytest.approx(group_a[key], rel=10 * scalar_rtol, abs=1e-8), key  # ⟨D, g_a⟩ cancels
    return largest


# ----------------------------------------------------------------------------- host reads and parity


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_a_capturable_step_reads_nothing_to_the_host(kwargs: dict[str, Any]) -> None:
    *_, default_reads, _, _ = _quiet_train(kwargs, capturable=False, bad=BAD)
    *_, reads, _, _ = _quiet_train(kwargs, capturable=True, bad=BAD)
    assert default_reads  # the counter does see the default path's gate
    assert reads == []


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_a_capturable_step_takes_the_default_paths_half_steps_and_skips(kwargs: dict[str, Any]) -> None:
    model_a, opt_a, _, _, halves_a = _quiet_train(kwargs, capturable=False, bad=BAD)
    model_b, opt_b, _, snapshots, halves_b = _quiet_train(kwargs, capturable=True, bad=BAD)
    assert halves_a == halves_b == HALF_OF_BAD  # both halves are skipped, and taken again after
    assert opt_a.param_groups[0]["phase"] == 1  # the run ends between two half-steps
    assert opt_a.param_groups[0]["skipped_steps"] == len(BAD)
    _assert_same_run(opt_a, opt_b, model_a, model_b, rtol=2e-5, atol=2e-6)
    assert_skipped_steps_untouched(snapshots)


def test_float16_outcome_checks_skip_the_same_half_steps() -> None:
    """float16 parameters: a first half-step whose ``|g_a|`` bound and a second whose ``|g_a| + |g_b|``
    are above the largest float16 are skipped on the device too, and named by ``sync_warnings``."""
    bad = {4: "first-fits", 8: "second-fits", 11: "grad"}
    model_a, opt_a, _, _, halves_a = _quiet_train({}, capturable=False, bad=bad, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model_b, opt_b, reads, snapshots, halves_b = _train({}, capturable=True, bad=bad, dtype=torch.float16)
    assert reads == []
    assert halves_a == halves_b == {4: 1, 8: 2, 11: 2}
    assert opt_a.param_groups[0]["skipped_steps"] == 3
    # float16 rounding: the half-steps' adds differ in the last bit at times, which the gain,
    # made of differences of float16 gradients, amplifies
    _assert_same_run(opt_a, opt_b, model_a, model_b, rtol=2e-3, atol=2e-3, scalar_rtol=2e-2)
    assert_skipped_steps_untouched(snapshots)


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        ("first-fits", r"step outcome \(first half-step\)"),
        ("second-fits", r"step outcome \(second half-step\)"),
    ],
)
def test_sync_warnings_names_the_outcome_check(bad: str, named: str) -> None:
    half = {"first-fits": 2, "second-fits": 3}[bad]  # a first (third call) or a second half-step (fourth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, opt, *_ = _train({}, capturable=True, bad={half: bad}, steps=half + 1, dtype=torch.float16)
        assert caught == []
        opt.sync_warnings()
    assert len(caught) == 1
    assert int(opt.param_groups[0]["skipped_steps"]) == 1
    assert re.search(named, str(caught[0].message)), str(caught[0].message)


def test_sync_warnings_names_the_cause_and_raises_after_the_limit() -> None:
    model = _model()
    opt = lalr.StepTunedSGD(model.parameters(), capturable=True, max_consecutive_skips=3)
    x, y = torch.randn(8, 5), torch.randn(8, 1)

    def step(bad: str | None = None) -> None:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=_poison(model, bad, loss))

    step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step("grad")  # a second half-step
        assert caught == []  # the step itself says nothing: it cannot read
        opt.sync_warnings()
        opt.sync_warnings()  # nothing new: no second warning
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "non-finite gradient (cross_dots)" in message and "1 step skipped so far, 1 in a row" in message, message
    step("loss")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.sync_warnings()
    step("loss")
    with pytest.raises(RuntimeError, match="3 steps in a row were skipped.*non-finite loss"):
        opt.sync_warnings()


def test_missing_gradients_follow_the_documented_rule_on_the_device() -> None:
    """A parameter without a gradient at one half-step takes the other and stays out of the gain
    (docs/algorithms.md §5): the float64 reference loop of tests/test_step_tuned.py, at 1e-10,
    with the records of every step."""
    data, params = make_least_squares(40, seed=3)
    has_grad = [[True, True] for _ in data]
    # first halves, second halves, a whole iteration, and a second half then the next first half
    # (the mark the second half clears must not pair the gradient of the half after them)
    for j in (2, 7, 12, 13, 21, 22, 30):
        has_grad[j][1] = False
    has_grad[16][0] = False
    groups = LAYOUTS["two-groups"](0.3, 0.05)
    expected, expected_records = reference(data, params, groups, same_batch=False, has_grad=has_grad, **OPTIONS)
    for foreach in (True, False):
        tensors = [nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in params]
        opt = lalr.StepTunedSGD(
            [{"params": [tensors[i] for i in idx], "lr": lr, "weight_decay": wd} for lr, wd, idx in groups],
            foreach=foreach,
            capturable=True,
            **torch_options(OPTIONS),
        )
        for j, (lrs_ref, gain_ref, curvature_ref) in enumerate(expected_records):
            x, y = (torch.tensor(a) for a in data[j])
            opt.zero_grad()
            loss = ((x @ tensors[0] + tensors[1] - y) ** 2).mean()
            loss.backward()
            for i, t in enumerate(tensors):
                if not has_grad[j][i]:
                    t.grad = None
            with CountHostReads() as counter:
                opt.step(loss=loss)
            assert counter.reads == []
            lrs = [float(g["effective_lr"]) for g in opt.param_groups]
            np.testing.assert_allclose(lrs, lrs_ref, rtol=1e-10, atol=0)
            assert float(opt.param_groups[0]["gain"]) == pytest.approx(gain_ref, rel=1e-10, abs=0)
            curvature = float(opt.param_groups[0]["curvature"])
            if np.isnan(curvature_ref):
                assert np.isnan(curvature)
            else:
                assert curvature == pytest.approx(curvature_ref, rel=1e-9, abs=1e-13)
        for t, ref in zip(tensors, expected):
            np.testing.assert_allclose(t.detach().numpy(), ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- same_batch=True

#: Bad steps of a same_batch run: step → (what, which closure call, 1 or 2, it poisons).  A NaN
#: gradient and an infinite loss at either call, and a gradient of 1e30 at a first call (the
#: first half-step's outcome; at a second call it is taken, by both paths).
SAME_BATCH_BAD = {3: ("grad", 2), 6: ("loss", 1), 10: ("overflow", 1), 13: ("grad", 1), 16: ("loss", 2)}
#: The numbers a skipped step leaves as they were (the skip counters aside).
KEPT_NUMBERS = ("step", "iteration", "phase", "gamma", "effective_lr", "gain", "curvature", *PENDING)


def _numbers(opt: lalr.StepTunedSGD) -> list[list[float]]:
    return [[np.nan if group[key] is None else float(group[key]) for key in KEPT_NUMBERS] for group in opt.param_groups]


def _train_same_batch(
    kwargs: dict[str, Any],
    capturable: bool,
    bad: dict[int, tuple[str, int]],
    steps: int = 20,
    dtype: torch.dtype = torch.float32,
):
    """``steps`` iterations of ``step(closure)`` (two closure calls each, ``bad`` poisoning one);
    returns the model, the optimizer, the host reads of its steps, the snapshots around the bad
    steps (parameters and state, and the optimizer's numbers) and the first group's records
    (``η``, ``γ``, curvature) after every step."""
    model = _model(dtype)
    opt = lalr.StepTunedSGD(_groups(model), **kwargs, same_batch=True, capturable=capturable)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=gen).to(dtype), torch.randn(64, 1, generator=gen).to(dtype)
    reads, snapshots, numbers, history = [], {}, {}, []
    for k in range(steps):
        if k == LR_CHANGE:
            opt.param_groups[0]["lr"] *= 0.5
        what, at = bad.get(k, (None, 0))
        calls = []

        def closure() -> torch.Tensor:
            calls.append(k)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return _poison(model, what, loss) if len(calls) == at else loss

        before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
        numbers_before = _numbers(opt) if k in bad and k > 0 else None
        with CountHostReads() as counter:
            returned = opt.step(closure)
        assert len(calls) == 2 and isinstance(returned, torch.Tensor)
        reads += counter.reads
        if k in bad:
            snapshots[k] = before, [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
            numbers[k] = numbers_before, _numbers(opt)
        history.append([float(opt.param_groups[0][key]) for key in ("effective_lr", "gain", "curvature")])
    return model, opt, reads, snapshots, numbers, np.array(history)


def _quiet_same_batch(*args: Any, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _train_same_batch(*args, **kwargs)


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_same_batch_a_capturable_step_reads_nothing_to_the_host(kwargs: dict[str, Any]) -> None:
    _, _, default_reads, *_ = _quiet_same_batch(kwargs, capturable=False, bad=SAME_BATCH_BAD)
    _, _, reads, *_ = _quiet_same_batch(kwargs, capturable=True, bad=SAME_BATCH_BAD)
    assert default_reads  # the counter does see the default path's gate
    assert reads == []  # the closure reads nothing either


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_same_batch_a_capturable_step_takes_the_default_paths_steps_and_skips(kwargs: dict[str, Any]) -> None:
    model_a, opt_a, _, _, _, history_a = _quiet_same_batch(kwargs, capturable=False, bad=SAME_BATCH_BAD)
    model_b, opt_b, _, snapshots, numbers, history_b = _quiet_same_batch(kwargs, capturable=True, bad=SAME_BATCH_BAD)
    # every step's η, γ and curvature (NaN before the first iteration), the unclipped gains included
    np.testing.assert_allclose(history_b, history_a, rtol=1e-4, atol=1e-9)
    assert opt_a.param_groups[0]["skipped_steps"] == len(SAME_BATCH_BAD)
    assert opt_a.param_groups[0]["iteration"] == opt_a.param_groups[0]["step"] == 20 - len(SAME_BATCH_BAD)
    _assert_same_run(opt_a, opt_b, model_a, model_b, rtol=2e-5, atol=2e-6)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        assert set(opt_b.state[p_b]) == set(opt_a.state[p_a]) == {"neg_grad_diff_avg"}
    assert_skipped_steps_untouched(snapshots)
    for k, (before, after) in numbers.items():
        assert np.array_equal(before, after, equal_nan=True), k


def test_same_batch_float16_outcome_checks_skip_the_same_steps() -> None:
    """float16: an iteration whose first half-step (``|g_a|``) or second (``|g_a| + |g_b|``) would
    not fit is skipped on the device too, and ``sync_warnings`` names the check."""
    bad = {4: ("first-fits", 1), 8: ("second-fits", 2), 11: ("grad", 2)}
    model_a, opt_a, *_ = _quiet_same_batch({}, capturable=False, bad=bad, dtype=torch.float16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model_b, opt_b, reads, snapshots, *_ = _train_same_batch({}, capturable=True, bad=bad, dtype=torch.float16)
        assert caught == []
    assert reads == []
    assert opt_a.param_groups[0]["skipped_steps"] == 3
    _assert_same_run(opt_a, opt_b, model_a, model_b, rtol=2e-3, atol=2e-3, scalar_rtol=2e-2)
    assert_skipped_steps_untouched(snapshots)
    for k, named in ((4, r"step outcome \(first half-step\)"), (8, r"step outcome \(second half-step\)")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, opt, *_ = _train_same_batch({}, capturable=True, bad={k: bad[k]}, steps=k + 1, dtype=torch.float16)
            opt.sync_warnings()
        assert len(caught) == 1 and int(opt.param_groups[0]["skipped_steps"]) == 1
        assert re.search(named, str(caught[0].message)), str(caught[0].message)


def test_same_batch_missing_gradients_match_the_default_step() -> None:
    """A parameter with a gradient at one closure call only takes that half-step and stays out of
    the gain, as in the default step (the pairs are matched on the host: no read).  In float64: the
    curvature of these steps is small, a difference that float32 rounding would blur."""
    results = []
    for capturable in (False, True):
        model = _model(torch.float64)
        opt = lalr.StepTunedSGD(_groups(model), same_batch=True, capturable=capturable)
        gen = torch.Generator().manual_seed(5)
        x, y = torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randn(16, 1, generator=gen, dtype=torch.float64)
        for k in range(6):
            calls = []

            def closure() -> torch.Tensor:
                calls.append(k)
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                if (k, len(calls)) in ((1, 2), (3, 1)):  # the last bias misses g_b, then g_a
                    model[2].bias.grad = None
                return loss

            with CountHostReads() as counter:
                opt.step(closure)
            assert (counter.reads == []) is capturable
        results.append((model, opt))
    (model_a, opt_a), (model_b, opt_b) = results
    assert opt_a.param_groups[0]["iteration"] == 6
    _assert_same_run(opt_a, opt_b, model_a, model_b, rtol=1e-12, atol=1e-14, scalar_rtol=1e-10)


def test_same_batch_state_dicts_move_between_capturable_and_default() -> None:
    """Either way, a resumed same_batch run continues as the uninterrupted one (float32 rounding)."""
    switch, kwargs = 5, {"weight_decay": 0.01, "same_batch": True}

    def run(first: bool, second: bool, steps: int = 10) -> tuple[list[torch.Tensor], Any]:
        model = _model()
        opt = lalr.StepTunedSGD(_groups(model), capturable=first, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for k in range(steps):
            if k == switch:
                saved = copy.deepcopy(opt.state_dict())
                assert all(set(entry) == {"neg_grad_diff_avg"} for entry in saved["state"].values())
                opt = lalr.StepTunedSGD(_groups(model), capturable=second, **kwargs)
                opt.load_state_dict(saved)
                for group in opt.param_groups:
                    group["capturable"] = second
            x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            with CountHostReads() as counter:
                opt.step(closure)
            assert (counter.reads == []) is (second if k >= switch else first)
        assert isinstance(opt.param_groups[0]["gamma"], torch.Tensor) is second
        return [p.detach().clone() for p in model.parameters()], opt

    reference_params, reference_opt = run(False, False)
    for first, second in ((True, False), (False, True), (True, True)):
        params, opt = run(first, second)
        for a, b in zip(reference_params, params):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
        assert float(opt.param_groups[0]["gamma"]) == pytest.approx(reference_opt.param_groups[0]["gamma"], rel=1e-5)
        assert int(opt.param_groups[0]["iteration"]) == reference_opt.param_groups[0]["iteration"] == 10
        for group in opt.param_groups:
            assert all((group[key] is None) is (not second) for key in PENDING)  # +inf tensors when capturable


def test_same_batch_refuses_a_state_held_between_the_half_steps() -> None:
    """A state saved between the two half-steps of a same_batch=False run (its phase a number) is
    refused as by the default step."""
    model = _model()
    opt = lalr.StepTunedSGD(model.parameters())
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        group.update(same_batch=True, capturable=True)
    resumed = lalr.StepTunedSGD(model.parameters(), same_batch=True, capturable=True)
    resumed.load_state_dict(saved)

    def closure() -> torch.Tensor:
        resumed.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="between the two half-steps"):
        resumed.step(closure)


# ----------------------------------------------------------------------------- state


def test_the_numbers_are_device_tensors_written_in_place() -> None:
    model = _model()
    opt = lalr.StepTunedSGD(_groups(model), capturable=True)
    x, y = torch.randn(8, 5), torch.randn(8, 1)

    def step() -> None:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss)

    step()
    shared = {key: opt.param_groups[0][key] for key in ("step", "skipped_steps", "consecutive_skips", "iteration", "phase", "gamma")}
    for key, value in shared.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
        assert value.dtype == (torch.float64 if key == "gamma" else torch.int64), key
        assert all(group[key] is value for group in opt.param_groups), key
    groups = [{key: group[key] for key in (*PENDING, "effective_lr", "gain", "curvature")} for group in opt.param_groups]
    for values in groups:
        assert all(v.dtype == torch.float64 and v.dim() == 0 for v in values.values())
    state = {p: dict(opt.state[p]) for p in model.parameters()}
    for entry in state.values():
        assert entry[FIRST_GRAD_PENDING].dtype == torch.bool and entry[FIRST_GRAD_PENDING].dim() == 0
    for _ in range(5):
        step()
    for key, value in shared.items():
        assert opt.param_groups[0][key] is value, key
    for group, values in zip(opt.param_groups, groups):
        for key, value in values.items():
            assert group[key] is value, key
    for p, entry in state.items():
        for key, value in entry.items():
            assert opt.state[p][key] is value, key
    assert int(opt.param_groups[0]["step"]) == 6 and int(opt.param_groups[0]["iteration"]) == 3


@pytest.mark.parametrize("switch", [5, 6], ids=["between-the-halves", "after-an-iteration"])
def test_state_dicts_move_between_capturable_and_default(switch: int) -> None:
    """Either way, a resumed run continues as the uninterrupted one (to float32 rounding), also when
    saved between the two half-steps (the pending ``g_a``, ``η_k`` and sums move along).  A state
    dict restores the option it was saved with (as torch's optimizers do): the path is switched by
    setting the option after loading."""
    kwargs = {"weight_decay": 0.01}

    def run(first: bool, second: bool, steps: int = 14) -> tuple[list[torch.Tensor], Any]:
        model = _model()
        opt = lalr.StepTunedSGD(_groups(model), capturable=first, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for k in range(steps):
            if k == switch:
                saved = copy.deepcopy(opt.state_dict())
                opt = lalr.StepTunedSGD(_groups(model), capturable=second, **kwargs)
                opt.load_state_dict(saved)
                assert opt.param_groups[0]["capturable"] is first
                for group in opt.param_groups:
                    group["capturable"] = second
            x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            if k == switch:  # the first step after loading reads nothing either
                with CountHostReads() as counter:
                    opt.step(loss=loss)
                assert (counter.reads == []) is second
            else:
                opt.step(loss=loss)
        assert isinstance(opt.param_groups[0]["gamma"], torch.Tensor) is second
        return [p.detach().clone() for p in model.parameters()], opt

    reference_params, reference_opt = run(False, False)
    assert reference_opt.param_groups[0]["phase"] == 0
    for first, second in ((True, False), (False, True), (True, True)):
        params, opt = run(first, second)
        for a, b in zip(reference_params, params):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
        assert float(opt.param_groups[0]["gamma"]) == pytest.approx(reference_opt.param_groups[0]["gamma"], rel=1e-5)
        assert int(opt.param_groups[0]["iteration"]) == reference_opt.param_groups[0]["iteration"]


def test_a_group_added_between_the_half_steps_takes_the_current_step_size() -> None:
    """A group added between the two half-steps has no first half: it takes the current ``η_k``
    and stays out of the gain, as in the default step (and reads nothing doing so)."""
    results = []
    for capturable in (False, True):
        torch.manual_seed(0)
        first, second = nn.Linear(4, 3), nn.Linear(3, 1)
        opt = lalr.StepTunedSGD(first.parameters(), capturable=capturable)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for k in range(7):
            if k == 3:
                opt.add_param_group({"params": second.parameters(), "lr": 0.5})
            opt.zero_grad()
            nn.functional.mse_loss(second(first(x)), y).backward()
            with CountHostReads() as counter:
                opt.step()
            assert (counter.reads == []) is capturable
        results.append(([p.detach().clone() for p in (*first.parameters(), *second.parameters())], opt))
    (params_a, opt_a), (params_b, opt_b) = results
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    assert float(opt_b.param_groups[1]["gamma"]) == pytest.approx(opt_a.param_groups[1]["gamma"], rel=1e-5)
    assert opt_b.param_groups[1]["step"] is opt_b.param_groups[0]["step"]


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compiled": True}, r"`compiled` and `capturable` cannot both be True.*Use capturable=True alone"),
        ({"capturable": "yes"}, r"`capturable` must be True or False"),
    ],
)
def test_unsupported_combinations_are_refused(kwargs: dict[str, Any], match: str) -> None:
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=match):
        lalr.StepTunedSGD([w], **{"capturable": True, **kwargs})


def test_same_batch_is_accepted() -> None:
    w = nn.Parameter(torch.ones(3))
    opt = lalr.StepTunedSGD([w], capturable=True, same_batch=True)
    assert opt.calls_closure_twice and opt.param_groups[0]["capturable"]


def test_a_param_group_that_asks_for_compiled_is_refused() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=r"`compiled` and `capturable` cannot both be True"):
        lalr.StepTunedSGD([{"params": [a]}, {"params": [b], "compiled": True}], capturable=True)
    opt = lalr.StepTunedSGD([a], capturable=True)
    with pytest.raises(ValueError, match=r"`compiled` and `capturable` cannot both be True"):
        opt.add_param_group({"params": [b], "compiled": True})


def test_the_scalar_rules_take_0_d_tensors() -> None:
    """One source of truth: the rules give the same numbers on 0-d tensors as on floats."""

    def t(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float64)

    assert step_tuned_step_size(0.1, t(2.0), t(3.0), 0.01).item() == step_tuned_step_size(0.1, 2.0, 3, 0.01)
    args = ([0.5, 0.2], [0.1, -0.3], [4.0, 2.0], [1.0, 0.5])
    floats = step_tuned_curvature(*args, beta=0.9, iteration=2)
    tensors = step_tuned_curvature(*([t(v) for v in column] for column in args), beta=0.9, iteration=t(2.0))
    assert [v.item() for v in tensors] == pytest.approx(floats, rel=1e-15)
    for curvature, dx in ((1.5, 1.0), (-1.0, 1.0), (0.0, 1.0), (1e-9, 1.0), (float("nan"), 1.0)):
        expected = step_tuned_gain(curvature, dx, nu=1.25, bounds=(0.5, 2.0))
        assert step_tuned_gain(t(curvature), t(dx), nu=1.25, bounds=(0.5, 2.0)).item() == expected
    for lr, bounds, largest in (
        (0.1, [4e4, 4e4], 65504.0),
        (0.1, [4e4, 1.0], 65504.0),
        (0.8, [1e38], 3.4e38),
        (0.8, [1e37], 3.4e38),
        (0.3, [float("nan")], 65504.0),
        (0.0, [float("inf")], 65504.0),
    ):
        expected = step_tuned_fits(lr, bounds, largest)
        assert isinstance(expected, bool)
        assert bool(step_tuned_fits(t(lr), [t(b) for b in bounds], largest)) is expected, (lr, bounds)
