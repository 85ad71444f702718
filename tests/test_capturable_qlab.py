"""QLAB's device-side step (``capturable=True``): nothing read to the host, the default path's numbers.

The checks of tests/test_capturable.py for QLAB's built-in bases: no host read in a step (the
probe is called, its tensor never read), parity with the default path over steps with a NaN
gradient, an infinite loss and a finite gradient that overflows ‖g‖², skipped steps bit for bit
untouched, the rate (``lr`` or ``lr_scale``), the fit's records, the counters and Adam's counts as
0-d device tensors written in place, state dicts moving both ways, skips and the trial-floor
warning reported by ``sync_warnings()``, and what cannot run on the device refused by name.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
from test_capturable import CountHostReads, assert_skipped_steps_untouched
from torch import nn

from lightning_adaptive_lr import QLAB
from lightning_adaptive_lr.optim.qlab import qlab_rate, qlab_step_factor

SETTINGS = [
    pytest.param({"base": "sgd"}, id="sgd"),
    pytest.param({"base": "sgd", "weight_decay": 0.05, "max_lr_scale": 2.0}, id="sgd-wd-anchored"),
    pytest.param({"base": "sgdm", "lr": 0.05, "weight_decay": 1e-2}, id="sgdm-wd"),
    pytest.param({"base": "sgdm", "lr": 0.05, "foreach": False}, id="sgdm-per-tensor"),
    pytest.param({"base": "adam", "lr": 1e-2}, id="adam"),
    pytest.param({"base": "adam", "lr": 1e-2, "max_lr_scale": None, "foreach": False}, id="adam-plain-per-tensor"),
    pytest.param({"base": "adamw", "lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99)}, id="adamw-wd"),
]

#: Steps at which the gradient (5), the loss (9) or a finite gradient whose square overflows (13)
#: makes the step skipped.
BAD = {5: "grad", 9: "loss", 13: "overflow"}

#: The records a QLAB step writes into every param group it steps.
RECORDS = ("effective_lr", "fitted_lr", "trial_loss", "directional_derivative", "curvature")


def _model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _groups(model: nn.Module, second_lr: float = 0.03) -> list[dict[str, Any]]:
    """Two param groups with their own rates: the per-group rates and bounds are exercised."""
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": second_lr}]


def _data(dtype: torch.dtype = torch.float32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(64, 5, generator=gen).to(dtype), torch.randn(64, 1, generator=gen).to(dtype)


def _group_numbers(opt: QLAB) -> list[dict[str, float]]:
    """Every group's rate and records, as floats."""
    keys = ("lr", "lr_scale", *RECORDS)
    return [{key: float(group[key]) for key in keys if key in group} for group in opt.param_groups]


def _train(kwargs: dict[str, Any], capturable: bool, steps: int = 20, dtype: torch.dtype = torch.float32):
    """``steps`` steps with :data:`BAD` steps; the host reads of every ``step()`` and a snapshot
    (parameters and state before, parameters and state after, the groups' rates and records after)
    of every bad step."""
    model = _model(dtype)
    opt = QLAB(_groups(model), **kwargs, capturable=capturable)
    x, y = _data(dtype)

    def probe() -> torch.Tensor:
        return nn.functional.mse_loss(model(x), y)

    reads, snapshots = [], {}
    for k in range(steps):
        opt.zero_grad()
        loss = probe()
        loss.backward()
        bad = BAD.get(k)
        if bad == "grad":
            model[0].weight.grad[0, 0] = float("nan")
        elif bad == "loss":
            loss = loss * float("inf")
        elif bad == "overflow":
            model[0].weight.grad.mul_(1e30)
        before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
        with CountHostReads() as counter:
            opt.step(loss=loss, probe=probe)
        reads += counter.reads
        if bad:
            after = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
            snapshots[k] = (*before, *after, _group_numbers(opt))
    return model, opt, reads, snapshots


def _untouched(snapshots: dict) -> dict:
    """The snapshots as :func:`assert_skipped_steps_untouched` takes them."""
    return {k: ((params, state), params_after, state_after) for k, (params, state, params_after, state_after, _) in
            snapshots.items()}


def _quiet_train(kwargs: dict[str, Any], capturable: bool, **options: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _train(kwargs, capturable, **options)


def _as_float64(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64)


def _largest_differences(model_a: nn.Module, opt_a: QLAB, model_b: nn.Module, opt_b: QLAB) -> dict[str, float]:
    """The largest relative difference of the parameters, of the state and of the groups' rates and
    records between the default run (a) and the capturable run (b)."""
    out = {"params": 0.0, "state": 0.0, "groups": 0.0}

    def relative(a: Any, b: Any) -> float:
        a, b = _as_float64(a), _as_float64(b)
        return float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))

    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        out["params"] = max(out["params"], relative(p_a, p_b))
        for key, value in opt_a.state[p_a].items():
            out["state"] = max(out["state"], relative(value, opt_b.state[p_b][key]))
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        for key in ("lr", "lr_scale", *RECORDS):
            if key in group_a:
                out["groups"] = max(out["groups"], relative(group_a[key], group_b[key]))
    return out


def _assert_same_run(model_a: nn.Module, opt_a: QLAB, model_b: nn.Module, opt_b: QLAB) -> None:
    """The capturable run (b) took the default run's (a) steps: parameters, state, counters,
    rates and records, to float32 rounding (so far they agree bit for bit on the CPU)."""
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        assert opt_a.state[p_a].keys() == opt_b.state[p_b].keys()
        for key, value in opt_a.state[p_a].items():
            torch.testing.assert_close(_as_float64(opt_b.state[p_b][key]), _as_float64(value), rtol=1e-6, atol=1e-9)
    for key in ("step", "skipped_steps", "consecutive_skips"):
        assert int(opt_b.param_groups[0][key]) == opt_a.param_groups[0][key], key
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        for key in ("lr", "lr_scale", *RECORDS):
            assert (key in group_a) == (key in group_b), key
            if key in group_a:
                assert float(group_b[key]) == pytest.approx(float(group_a[key]), rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_a_capturable_step_reads_nothing_to_the_host(kwargs: dict[str, Any]) -> None:
    *_, default_reads, _ = _quiet_train(kwargs, capturable=False)
    *_, reads, _ = _quiet_train(kwargs, capturable=True)
    assert default_reads  # the counter does see the default path's reads (the gate, the fit)
    assert reads == []


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_a_capturable_step_takes_the_default_paths_steps_and_skips(kwargs: dict[str, Any]) -> None:
    model_a, opt_a, _, snapshots_a = _quiet_train(kwargs, capturable=False)
    model_b, opt_b, _, snapshots = _quiet_train(kwargs, capturable=True)
    assert opt_a.param_groups[0]["skipped_steps"] == len(BAD)
    _assert_same_run(model_a, opt_a, model_b, opt_b)
    assert_skipped_steps_untouched(_untouched(snapshots))
    for k in BAD:  # a skipped step keeps the rate and the records of the last step taken
        for numbers_b, numbers_a in zip(snapshots[k][-1], snapshots_a[k][-1], strict=True):
            assert numbers_b == pytest.approx(numbers_a, rel=1e-6), k
    assert opt_a.param_groups[0]["lr"] != opt_a.defaults["lr"] or "lr_scale" in opt_a.param_groups[0]  # the fit acted


@pytest.mark.parametrize("kwargs", [SETTINGS[0], SETTINGS[4]])
def test_float64_runs_agree_too(kwargs: dict[str, Any]) -> None:
    """In float64 the gradient ×1e30 is finite: two skipped steps, the rest the same."""
    model_a, opt_a, _, _ = _quiet_train(kwargs, capturable=False, dtype=torch.float64)
    model_b, opt_b, _, snapshots = _quiet_train(kwargs, capturable=True, dtype=torch.float64)
    assert opt_a.param_groups[0]["skipped_steps"] == 2
    _assert_same_run(model_a, opt_a, model_b, opt_b)
    assert_skipped_steps_untouched({k: v for k, v in _untouched(snapshots).items() if BAD[k] != "overflow"})


def test_the_largest_differences_are_float32_rounding() -> None:
    """What the parity tests allow, measured over every setting: the largest relative difference
    of parameters, state and group numbers stays at float32 rounding (0 on this CPU)."""
    largest = {"params": 0.0, "state": 0.0, "groups": 0.0}
    for param in SETTINGS:
        (kwargs,) = param.values
        model_a, opt_a, _, _ = _quiet_train(kwargs, capturable=False)
        model_b, opt_b, _, _ = _quiet_train(kwargs, capturable=True)
        for key, value in _largest_differences(model_a, opt_a, model_b, opt_b).items():
            largest[key] = max(largest[key], value)
    assert max(largest.values()) <= 1e-6, largest


@pytest.mark.parametrize("kwargs", [SETTINGS[0], SETTINGS[2], SETTINGS[4]])
def test_the_step_numbers_are_device_tensors_written_in_place(kwargs: dict[str, Any]) -> None:
    """After the first step the optimizer-wide counts (int64), the rate the step writes (``lr`` under
    the plain rule, ``lr_scale`` under the anchored one), the records (float64) and Adam's
    per-parameter counts (int64) are 0-d tensors on the parameters' device; later steps write the
    same tensors (a captured graph reads and writes the same memory at every replay)."""
    model = _model()
    opt = QLAB(_groups(model), **kwargs, capturable=True)
    x, y = _data()

    def step() -> None:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss, probe=lambda: nn.functional.mse_loss(model(x), y))

    def tensors() -> dict[Any, torch.Tensor]:
        found = {}
        for i, group in enumerate(opt.param_groups):
            rate = "lr_scale" if group["max_lr_scale"] is not None else "lr"
            for key in ("step", "skipped_steps", "consecutive_skips", rate, *RECORDS):
                found[(i, key)] = group[key]
        for j, p in enumerate(model.parameters()):
            for key, value in opt.state[p].items():
                found[(j, key)] = value
        return found

    step()
    first = tensors()
    for (_, key), value in first.items():
        assert isinstance(value, torch.Tensor) and value.device == model[0].weight.device, key
        if key in ("step", "skipped_steps", "consecutive_skips"):
            assert value.dim() == 0 and value.dtype == torch.int64, key
        elif key in ("lr", "lr_scale", *RECORDS):
            assert value.dim() == 0 and value.dtype == torch.float64, key
    if opt.param_groups[0]["max_lr_scale"] is not None:  # the anchor stays the number the user set
        assert opt.param_groups[0]["lr"] == opt.defaults["lr"] and isinstance(opt.param_groups[0]["lr"], float)
    step()
    step()
    assert tensors() == first  # the very same tensors (identity), written in place
    assert int(opt.param_groups[0]["step"]) == 3
    if "step" in opt.state[model[0].weight]:
        assert int(opt.state[model[0].weight]["step"]) == 3


@pytest.mark.parametrize("base", ["sgd", "sgdm", "adam"])
def test_state_dicts_move_between_capturable_and_default(base: str) -> None:
    """Either way, a resumed run continues as the uninterrupted one: the numbers become tensors on
    the device and back.  A state dict restores the option it was saved with (as torch's optimizers
    restore ``capturable``): the path is switched by setting the option after loading."""
    kwargs = {"base": base, "lr": 0.05 if base != "adam" else 1e-2, "max_lr_scale": None if base != "adam" else "auto"}

    def run(first: bool, second: bool, steps: int = 12, switch: int = 6) -> list[torch.Tensor]:
        model = _model()
        opt = QLAB(_groups(model), capturable=first, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for k in range(steps):
            if k == switch:
                saved = copy.deepcopy(opt.state_dict())
                opt = QLAB(_groups(model), capturable=second, **kwargs)
                opt.load_state_dict(saved)
                assert opt.param_groups[0]["capturable"] is first
                for group in opt.param_groups:
                    group["capturable"] = second
            x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss, probe=lambda x=x, y=y: nn.functional.mse_loss(model(x), y))
        assert isinstance(opt.param_groups[0]["step"], torch.Tensor) is second
        if base == "adam":
            assert isinstance(opt.state[model[0].weight]["step"], torch.Tensor) is second
        return [p.detach().clone() for p in model.parameters()]

    reference = run(False, False)
    for first, second in ((True, False), (False, True), (True, True)):
        for a, b in zip(reference, run(first, second)):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_sync_warnings_names_the_cause_and_raises_after_the_limit() -> None:
    model = _model()
    opt = QLAB(model.parameters(), base="adam", lr=1e-2, capturable=True, max_consecutive_skips=4)
    x, y = _data()

    def step(loss_factor: float = 1.0) -> None:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss * loss_factor, probe=lambda: nn.functional.mse_loss(model(x), y))

    step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(float("nan"))
        assert caught == []  # the step itself says nothing: it cannot read
        opt.sync_warnings()
        opt.sync_warnings()  # nothing new: no second warning
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "non-finite loss (loss)" in message and "1 step skipped so far, 1 in a row" in message, message
    for _ in range(2):
        step(float("nan"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.sync_warnings()
    step(float("nan"))
    with pytest.raises(RuntimeError, match="4 steps in a row were skipped.*non-finite loss"):
        opt.sync_warnings()


def _regression(dtype: torch.dtype, seed: int = 6):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 1)).to(dtype)
    x = torch.randn(256, 20)
    y = x[:, :3].sum(1, keepdim=True).sin()
    x, y = x.to(dtype), y.to(dtype)
    return model, lambda: nn.functional.mse_loss(model(x).float(), y.float())


@pytest.mark.parametrize(
    ("kwargs", "dtype", "size"),
    [
        pytest.param({"base": "sgd", "lr": 1e24, "max_lr": 1e30}, torch.float32, 1e15, id="sgd-float32"),
        pytest.param(
            {"base": "sgdm", "lr": 1e24, "max_lr": 1e30, "weight_decay": 1e-3}, torch.float32, 1e15, id="sgdm-wd-float32"
        ),
        pytest.param({"base": "sgd", "lr": 5.0}, torch.float16, 3e4, id="sgd-float16"),
        pytest.param({"base": "adam", "lr": 1e5, "max_lr": 1e6}, torch.float16, 3e4, id="adam-float16"),
    ],
)
def test_an_overflowing_trial_step_is_skipped_untouched(kwargs: dict[str, Any], dtype: torch.dtype, size: float) -> None:
    """A finite gradient whose trial or fitted point does not fit the dtype: the default path's
    screen and copies skip it; the device step's range of everything it could write does too,
    with the parameters and the state bit for bit as they were, the cause the step's outcome."""
    model, loss_fn = _regression(dtype)
    opt = QLAB(model.parameters(), **kwargs, capturable=True)
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    for p in model.parameters():
        p.grad.copy_(torch.where(p.grad >= 0, size, -size).to(dtype))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    params, state = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
    with CountHostReads() as counter:
        opt.step(loss=loss, probe=loss_fn)
    assert counter.reads == []
    assert int(opt.param_groups[0]["skipped_steps"]) == 1 and int(opt.param_groups[0]["step"]) == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), params))
    after = opt.state_dict()["state"]
    for index, entry in after.items():  # the state made at this first step holds the starting values
        for key, value in entry.items():
            assert torch.equal(value, state[index][key]) if index in state else not value.any(), key
    with pytest.warns(RuntimeWarning, match=r"non-finite step outcome \(trial_step\)"):
        opt.sync_warnings()
    # and the default path skips the same step
    model_a, loss_fn_a = _regression(dtype)
    opt_a = QLAB(model_a.parameters(), **kwargs)
    loss_a = loss_fn_a()
    loss_a.backward()
    for p in model_a.parameters():
        p.grad.copy_(torch.where(p.grad >= 0, size, -size).to(dtype))
    with pytest.warns(RuntimeWarning, match="outcome"):
        opt_a.step(loss=loss_a, probe=loss_fn_a)
    assert opt_a.param_groups[0]["skipped_steps"] == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_probe_keeps_the_rate_as_on_the_host(bad: float) -> None:
    runs = []
    for capturable in (False, True):
        p = nn.Parameter(torch.tensor([1.0]))
        opt = QLAB([p], lr=0.1, max_lr_scale=None, capturable=capturable)
        p.grad = torch.tensor([1.0])
        opt.step(loss=0.5, probe=lambda: torch.tensor(bad))
        runs.append((p.detach().clone(), opt.param_groups[0]))
    (p_a, group_a), (p_b, group_b) = runs
    assert torch.equal(p_a, p_b) and p_b.item() == pytest.approx(0.9)
    assert float(group_b["lr"]) == group_a["lr"] == 0.1
    assert int(group_b["skipped_steps"]) == 0 and int(group_b["step"]) == 1
    for key in RECORDS:  # the non-finite trial loss and curvature recorded alike
        assert str(float(group_b[key])) == str(group_a[key]), key
    assert not math.isfinite(group_a["curvature"])


def test_a_failing_probe_puts_the_parameters_back() -> None:
    model = _model()
    opt = QLAB(model.parameters(), base="sgdm", lr=0.05, capturable=True)
    x, y = _data()
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()

    def probe() -> torch.Tensor:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(loss=loss, probe=probe)
    for a, b in zip(model.parameters(), before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert int(opt.param_groups[0]["step"]) == 0


def test_lr_zero_freezes_a_group_on_the_device() -> None:
    """A group whose lr is 0 does not move and keeps lr 0; its buffers are updated; the other group
    fits its rate; the same numbers as the default path (which does not call the probe when no
    group moves; the device step calls it, and records as if it had not)."""
    results = []
    for capturable in (False, True):
        model = _model()
        opt = QLAB(_groups(model, second_lr=0.0), base="sgdm", lr=0.05, capturable=capturable)
        x, y = _data()
        frozen = [p.detach().clone() for p in model[2].parameters()]
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss, probe=lambda model=model, x=x, y=y: nn.functional.mse_loss(model(x), y))
        assert all(torch.equal(a, b) for a, b in zip(model[2].parameters(), frozen))
        assert all("momentum_buffer" in opt.state[p] for p in model[2].parameters())
        group = opt.param_groups[1]
        assert float(group["lr"]) == 0.0 and float(group["effective_lr"]) == 0.0 and float(group["fitted_lr"]) == 0.0
        results.append((model, opt))
    _assert_same_run(*results[0], *results[1])

    # Nothing moves: the probe's value is called but not used (the trial loss recorded is the loss).
    p = nn.Parameter(torch.tensor([1.0]))
    opt = QLAB([p], lr=0.0, capturable=True)
    p.grad = torch.tensor([1.0])
    opt.step(loss=0.5, probe=lambda: torch.tensor(123.0))
    group = opt.param_groups[0]
    assert p.item() == 1.0 and float(group["trial_loss"]) == 0.5 and float(group["curvature"]) == 0.0


def test_the_floor_warning_waits_for_sync_warnings() -> None:
    """A scheduled lr below ``min_trial_lr`` (the trial runs at the floor, the lr has no effect): the
    default step warns at once; a capturable step cannot read the lr, keeps the finding on the
    device, and ``sync_warnings()`` gives the same warning, once.  A rate the fit wrote below the
    floor is not warned about."""
    model, loss_fn = _regression(torch.float32, seed=5)
    opt = QLAB(model.parameters(), base="sgd", lr=0.1, min_trial_lr=1e-3, capturable=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1e-3)  # lr = 1e-4 from the next step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            with CountHostReads() as counter:
                opt.step(loss=loss, probe=loss_fn)
            assert counter.reads == []
            sched.step()
        assert caught == []
        opt.sync_warnings()
        opt.sync_warnings()
    floor = [w for w in caught if issubclass(w.category, UserWarning) and "min_trial_lr" in str(w.message)]
    assert len(floor) == 1, [str(w.message) for w in caught]
    assert "param group 0 has lr=0.0001" in str(floor[0].message) and "lr=0 freezes" in str(floor[0].message)

    model, loss_fn = _regression(torch.float32, seed=5)
    opt = QLAB(model.parameters(), base="sgd", lr=1.0, min_lr=1e-8, min_trial_lr=1.0, capturable=True)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for _ in range(4):
            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step(loss=loss, probe=loss_fn)
            rates.append(float(opt.param_groups[0]["lr"]))
        opt.sync_warnings()
    assert min(rates) < 1.0  # the fit's own rate went below the floor


def test_a_scheduler_writes_the_device_rate_in_place() -> None:
    """torch's schedulers fill a tensor ``lr`` in place: the next trial runs at the scheduled rate,
    and the tensor (the memory a captured graph reads) stays the same."""
    model, loss_fn = _regression(torch.float32, seed=7)
    opt = QLAB(model.parameters(), base="sgd", lr=0.1, capturable=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    opt.step(loss=loss, probe=loss_fn)
    rate = opt.param_groups[0]["lr"]
    fitted = float(rate)
    sched.step()
    assert opt.param_groups[0]["lr"] is rate and float(rate) == pytest.approx(0.5 * fitted)
    trials = []
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    start = [p.detach().clone() for p in model.parameters()]

    def probe() -> torch.Tensor:
        trials.append([p.detach().clone() for p in model.parameters()])
        return loss_fn()

    opt.step(loss=loss, probe=probe)
    (trial,) = trials
    torch.testing.assert_close(trial[0], start[0] - 0.5 * fitted * model[0].weight.grad, rtol=1e-6, atol=1e-7)
    assert opt.param_groups[0]["lr"] is rate


def test_the_scalar_rules_take_tensors() -> None:
    """:func:`qlab_step_factor` and :func:`qlab_rate` give the same numbers on 0-d tensors as on
    floats (one source of truth for both paths), including the fallbacks."""
    values = [-2.0, -0.5, 0.0, 1e-300, 3.0, math.inf, -math.inf, math.nan]
    for a1 in values:
        for a2 in values:
            expected = qlab_step_factor(a1, a2)
            got = qlab_step_factor(torch.tensor(a1, dtype=torch.float64), torch.tensor(a2, dtype=torch.float64))
            assert isinstance(got, torch.Tensor) and float(got) == expected, (a1, a2)
    for t_star in (0.25, 1.0, 50.0):
        for rate in (1e-9, 0.4, 20.0):
            expected = qlab_rate(t_star, rate, max_growth=2.0, min_lr=1e-6, max_lr=10.0)
            got = qlab_rate(
                torch.tensor(t_star, dtype=torch.float64),
                torch.tensor(rate, dtype=torch.float64),
                max_growth=2.0,
                min_lr=1e-6,
                max_lr=10.0,
            )
            assert float(got) == expected


def test_what_cannot_run_on_the_device_is_refused_by_name() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"`compiled` cannot be combined with `capturable=True`.*compiled=False"):
        QLAB(params, base="adam", compiled=True, capturable=True)
    with pytest.raises(ValueError, match=r"`compiled`"):
        QLAB([{"params": params, "compiled": True}], base="sgdm", capturable=True)
    opt = QLAB(params, base="sgdm", capturable=True)
    with pytest.raises(ValueError, match=r"`compiled`"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "compiled": True})
    with pytest.raises(ValueError, match=r"`capturable` is shared by all param groups"):
        QLAB([{"params": params}, {"params": [nn.Parameter(torch.zeros(1))], "capturable": False}], capturable=True)
    with pytest.raises(ValueError, match=r"`capturable` must be True or False"):
        QLAB(params, capturable="yes")
    sgd = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match=r"QLAB\.wrap: `capturable=True` is not supported.*QLAB\(params, base="):
        QLAB.wrap(sgd, capturable=True)
    with pytest.raises(ValueError, match=r"`capturable` must be True or False"):
        QLAB.wrap(sgd, capturable=1)
    assert QLAB.wrap(sgd, capturable=False).param_groups is sgd.param_groups

    # A flag set by hand after construction is refused at the step, before anything changes.
    opt.param_groups[0]["compiled"] = True
    params[0].grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"`compiled`"):
        opt.step(loss=1.0, probe=lambda: torch.tensor(1.0))
    assert not params[0].any() and not opt.state


def test_the_wrapper_is_never_capturable() -> None:
    """The wrapper steps on the host even when the wrapped optimizer's groups hold torch's own
    ``capturable=True`` (``torch.optim.Adam``'s option on a GPU): its run of skips ends at the next
    step taken, as for any host-side step."""
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.05)
    for group in base.param_groups:
        group["capturable"] = True
    opt = QLAB.wrap(base)
    x, y = _data()
    for loss_factor in (float("nan"), 1.0):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(loss=loss * loss_factor, probe=lambda: nn.functional.mse_loss(model(x), y))
    group = opt.param_groups[0]
    assert (group["skipped_steps"], group["consecutive_skips"], group["step"]) == (1, 0, 1)


def test_a_group_added_between_steps_joins_the_device_numbers() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 3), nn.Linear(3, 1)
    opt = QLAB(first.parameters(), base="adam", lr=1e-2, capturable=True)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def step() -> list[str]:
        opt.zero_grad()
        loss = nn.functional.mse_loss(second(first(x)), y)
        loss.backward()
        with CountHostReads() as counter:
            opt.step(loss=loss, probe=lambda: nn.functional.mse_loss(second(first(x)), y))
        return counter.reads

    assert step() == []
    opt.add_param_group({"params": second.parameters(), "lr": 3e-3})
    assert step() == [] and step() == []
    for key in ("step", "skipped_steps", "consecutive_skips"):
        assert opt.param_groups[1][key] is opt.param_groups[0][key], key
    assert int(opt.param_groups[1]["step"]) == 3 and int(opt.state[second.weight]["step"]) == 2


def test_in_lightning_the_callback_drives_a_capturable_qlab() -> None:
    """Through AdaptiveLRCallback (its probe replays the batch) a capturable QLAB trains; a batch with
    a NaN loss is skipped on the device, and the monitor's logging step reports it."""
    from lightning_helpers import Classifier, loader, trainer

    from lightning_adaptive_lr import AdaptiveLRCallback, AdaptiveLRMonitor

    class NaNAtBatch2(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 2 else loss

    module = NaNAtBatch2(lambda params: QLAB(params, base="sgdm", lr=0.05, capturable=True))
    monitor = AdaptiveLRMonitor(logging_interval=1)
    with pytest.warns(RuntimeWarning, match=r"non-finite loss \(loss, .*step skipped.*1 step skipped so far"):
        trainer(max_steps=5, callbacks=[AdaptiveLRCallback(), monitor]).fit(module, loader(n=160))
    opt = module.trainer.optimizers[0]
    group = opt.param_groups[0]
    assert int(group["skipped_steps"]) == 1 and int(group["step"]) == 4
    assert isinstance(group["lr"], torch.Tensor) and math.isfinite(float(group["lr"]))
