"""AdaL's device-side step (``capturable=True``): nothing read to the host, the default path's numbers.

The checks of tests/test_capturable.py for AdaL: no host read in a step, parity with the default
path over steps with a NaN gradient, an infinite loss and a finite gradient whose outcome does not
fit the dtype (skipped there by :func:`adal_step_fits`, here by the same rule folded into the
gate's decision), skipped steps bit for bit untouched, state dicts moving both ways, skips reported
by ``sync_warnings()`` with the host path's cause.
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

from lightning_adaptive_lr import AdaL
from lightning_adaptive_lr.optim.adal import (
    _dtype_limits,
    adal_rate,
    adal_scalars,
    adal_step_fits,
)

SETTINGS = [
    pytest.param({}, id="l1-preconditioner"),
    pytest.param({"transform": "tensor_l1", "eps_mode": "denominator", "weight_decay": 0.1}, id="tensor_l1-denominator-wd"),
    pytest.param({"transform": "none", "lr_decay": "inv_sqrt", "lr": 1e-2}, id="none-inv_sqrt"),
    pytest.param({"transform": "none", "eps_mode": "denominator", "weight_decay": 1e-2}, id="none-denominator-wd"),
    pytest.param({"transform": "tensor_l1", "eps": 0.0, "weight_decay": 0.1}, id="tensor_l1-eps0-wd"),
    pytest.param({"eps_mode": "denominator", "lr_decay": "inv_sqrt", "betas": (0.9, 0.5)}, id="l1-denominator-beta1sq-above-beta2"),
    pytest.param({"eps": 1e-3, "lr_decay": "inv_sqrt", "weight_decay": 0.1}, id="l1-large-eps-inv_sqrt-wd"),
]

#: Steps at which the gradient (5), the loss (9) or a finite gradient whose outcome does not fit the
#: dtype (13: g² overflows) makes the step skipped.
BAD = {5: "grad", 9: "loss", 13: "overflow"}
#: The gate values a capturable AdaL skip can name, and what sync_warnings then says.
CAUSES = {"grad": "non-finite gradient (norms)", "loss": "non-finite loss (loss)", "overflow": "non-finite step outcome (step size)"}


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two param groups with their own lr and weight decay: the per-group scalars are exercised."""
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.05}]


def _overflow_(grad: torch.Tensor) -> None:
    """A finite gradient whose square does not fit the dtype: |g| beyond √(largest/2)."""
    largest = torch.finfo(grad.dtype).max
    grad.mul_(4.0 * math.sqrt(largest / 2) / float(grad.abs().max()))
    assert torch.isfinite(grad).all()


def _large_(grad: torch.Tensor) -> None:
    """A gradient whose entries fit (|g| at half of √(largest/2)) but whose ‖g‖₁ does not: float16's
    gate reads the gradients' range for this case."""
    largest = torch.finfo(grad.dtype).max
    grad.mul_(0.5 * math.sqrt(largest / 2) / float(grad.abs().max()))


def _train(
    kwargs: dict[str, Any], capturable: bool, steps: int = 20, dtype: torch.dtype = torch.float32, bad: dict[int, str] = BAD
):
    model = _model(dtype)
    opt = AdaL(_groups(model), **kwargs, capturable=capturable)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=gen).to(dtype), torch.randn(64, 1, generator=gen).to(dtype)
    reads, snapshots = [], {}
    for k in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        what = bad.get(k)
        if what == "grad":
            model[0].weight.grad[0, 0] = float("nan")
        elif what == "loss":
            loss = loss * float("inf")
        elif what == "overflow":
            _overflow_(model[0].weight.grad)
        elif what == "large":
            _large_(model[0].weight.grad)
        before = [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
        with CountHostReads() as counter:
            opt.step(loss=loss)
        reads += counter.reads
        if what:
            snapshots[k] = before, [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
    return model, opt, reads, snapshots


def _quiet_train(*args: Any, **kwargs: Any):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _train(*args, **kwargs)


def _close(b: torch.Tensor, a: torch.Tensor, tolerance: tuple[float, float] | float) -> None:
    """``(rtol, atol)``, or for 16-bit tensors a number of units in the last place of ``a``'s largest entry."""
    if isinstance(tolerance, tuple):
        torch.testing.assert_close(b, a, rtol=tolerance[0], atol=tolerance[1])
    else:
        atol = tolerance * torch.finfo(a.dtype).eps * float(a.abs().max())
        torch.testing.assert_close(b, a, rtol=0.0, atol=atol)


def _assert_same_run(
    opt_a: AdaL,
    opt_b: AdaL,
    model_a: nn.Module,
    model_b: nn.Module,
    params: tuple[float, float] | float,
    moments: tuple[float, float] | float,
    scalar_rtol: float,
) -> None:
    """The capturable run (b) took the default run's (a) steps: parameters, state, counters, records.

    ``params``, ``moments``: tolerances (see :func:`_close`); ``scalar_rtol``: of Λ1, Λ2 and the
    recorded scale, sums of gradients at parameters that differ by the paths' rounding."""
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        _close(b, a, params)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        state_a, state_b = opt_a.state[p_a], opt_b.state[p_b]
        assert state_a.keys() == state_b.keys()
        assert int(state_b["step"]) == state_a["step"]
        for key in ("scale_avg", "scale_sq_avg"):
            assert float(state_b[key]) == pytest.approx(state_a[key], rel=scalar_rtol), key
        for key in ("grad_avg", "grad_avg_sq"):
            _close(state_b[key], state_a[key], moments)
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        for key in ("step", "skipped_steps", "consecutive_skips"):
            assert int(group_b[key]) == group_a[key], key
        assert float(group_b["effective_lr"]) == pytest.approx(group_a["effective_lr"], rel=1e-12)
        assert float(group_b["grad_scale"]) == pytest.approx(group_a["grad_scale"], rel=scalar_rtol)


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_a_capturable_step_reads_nothing_to_the_host(kwargs: dict[str, Any]) -> None:
    *_, default_reads, _ = _quiet_train(kwargs, capturable=False)
    *_, reads, _ = _quiet_train(kwargs, capturable=True)
    assert default_reads  # the counter does see the default path's gate
    assert reads == []


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_a_capturable_step_takes_the_default_paths_steps_and_skips(kwargs: dict[str, Any]) -> None:
    model_a, opt_a, _, _ = _quiet_train(kwargs, capturable=False)
    model_b, opt_b, _, snapshots = _quiet_train(kwargs, capturable=True)
    assert opt_a.param_groups[0]["skipped_steps"] == len(BAD)
    assert opt_a.param_groups[0]["step"] == 20 - len(BAD)
    _assert_same_run(opt_a, opt_b, model_a, model_b, params=(2e-5, 2e-6), moments=(2e-5, 2e-7), scalar_rtol=1e-5)
    assert_skipped_steps_untouched(snapshots)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="l1-preconditioner"),
        pytest.param({"transform": "tensor_l1", "eps_mode": "denominator", "weight_decay": 0.1}, id="tensor_l1-denominator-wd"),
        pytest.param({"transform": "none", "lr_decay": "inv_sqrt", "lr": 1e-2}, id="none-inv_sqrt"),
    ],
)
def test_float16_parameters_match_and_skip_alike(kwargs: dict[str, Any]) -> None:
    """float16 parameters: the gate reads their gradients' range on the device too; a gradient of
    |g| > √(65504/2), finite in float16, is an outcome skip on both paths.  The device body computes
    in float32 and rounds once where the host body rounds after each operation; the gradients then
    differ by the parameters' last bits.  Measured: the parameters within 0.7 units in the last place
    of their largest entry, the moments within 6 (tolerances 2 and 16)."""
    bad = {**BAD, 16: "large"}  # taken: its entries fit, though ‖g‖₁ > √(65504/2)
    model_a, opt_a, reads_a, _ = _quiet_train(kwargs, capturable=False, dtype=torch.float16, bad=bad)
    model_b, opt_b, reads_b, snapshots = _quiet_train(kwargs, capturable=True, dtype=torch.float16, bad=bad)
    assert reads_a and reads_b == []
    assert opt_a.param_groups[0]["skipped_steps"] == len(BAD)
    del snapshots[16]
    _assert_same_run(opt_a, opt_b, model_a, model_b, params=2.0, moments=16.0, scalar_rtol=2e-3)
    assert_skipped_steps_untouched(snapshots)


@pytest.mark.parametrize("eps_mode", ["preconditioner", "denominator"])
def test_a_tensor_that_never_moved_stays_bit_for_bit(eps_mode: str) -> None:
    """A tensor whose ĝ has been 0 at every step (Λ2 = 0) does not move, as on the host path: no
    0/0 in the denominator form, and a -0.0 entry stays -0.0 (adding a zero step would make it +0.0)."""

    def run(capturable: bool) -> tuple[nn.Module, AdaL]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
        with torch.no_grad():
            model[0].bias.copy_(torch.tensor([-0.0, 0.5, -1.0]))
        opt = AdaL(model.parameters(), transform="tensor_l1", eps_mode=eps_mode, capturable=capturable)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        for _ in range(4):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            model[0].bias.grad.zero_()
            opt.step()
        return model, opt

    (model_a, opt_a), (model_b, opt_b) = run(False), run(True)
    start = torch.tensor([-0.0, 0.5, -1.0])
    for model in (model_a, model_b):
        assert torch.equal(model[0].bias.detach().view(torch.int32), start.view(torch.int32))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    assert float(opt_b.state[model_b[0].bias]["scale_sq_avg"]) == opt_a.state[model_a[0].bias]["scale_sq_avg"] == 0.0


def test_a_mixed_dtype_group_takes_each_dtypes_scalars() -> None:
    """One group holding float32 and float64 tensors: one set of scalars per dtype (its eps floor, its
    range), as the host path judges each tensor with its own dtype."""

    def run(capturable: bool) -> tuple[list[torch.Tensor], AdaL]:
        torch.manual_seed(0)
        first, second = nn.Linear(4, 3), nn.Linear(3, 1).double()
        opt = AdaL([*first.parameters(), *second.parameters()], transform="tensor_l1", eps_mode="denominator", capturable=capturable)
        x, y = torch.randn(8, 4), torch.randn(8, 1, dtype=torch.float64)
        for _ in range(6):
            opt.zero_grad()
            nn.functional.mse_loss(second(first(x).double()), y).backward()
            opt.step()
        return [p.detach().clone() for p in (*first.parameters(), *second.parameters())], opt

    (params_a, opt_a), (params_b, opt_b) = run(False), run(True)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    assert int(opt_b.param_groups[0]["step"]) == opt_a.param_groups[0]["step"] == 6


def test_scalars_are_device_tensors_written_in_place() -> None:
    """Per parameter ``step`` (int64), ``scale_avg`` and ``scale_sq_avg`` (float64), the shared counters
    and the records are 0-d tensors on the parameters' device, made at the first step and then
    written in place (what a captured CUDA graph needs)."""
    model, opt, _, _ = _quiet_train({}, capturable=True, steps=2, bad={})
    first = model[0].weight
    kinds = {"step": torch.int64, "scale_avg": torch.float64, "scale_sq_avg": torch.float64}
    for key, dtype in kinds.items():
        value = opt.state[first][key]
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == dtype, key
    group_keys = ("step", "skipped_steps", "consecutive_skips", "effective_lr", "grad_scale")
    for key in group_keys:
        assert isinstance(opt.param_groups[0][key], torch.Tensor) and opt.param_groups[0][key].dim() == 0, key
    held_state = {key: opt.state[first][key] for key in kinds}
    held_group = {key: opt.param_groups[1][key] for key in group_keys}
    x, y = torch.randn(4, 5), torch.randn(4, 1)
    for factor in (1.0, float("nan")):  # a step taken and a step skipped
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        model[0].weight.grad.mul_(factor)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
    for key, value in held_state.items():
        assert opt.state[first][key] is value, key
    for key, value in held_group.items():
        assert opt.param_groups[1][key] is value, key
    assert opt.param_groups[0]["step"] is opt.param_groups[1]["step"]
    assert int(opt.state[first]["step"]) == 3 and int(opt.param_groups[0]["skipped_steps"]) == 1


def test_sync_warnings_names_the_cause_as_the_host_path_does() -> None:
    """The step says nothing (it cannot read); sync_warnings warns with the host path's cause, the
    outcome check by its name, and raises after ``max_consecutive_skips`` skips in a row."""
    model, host_model = _model(), _model()
    host = AdaL(host_model.parameters())
    opt = AdaL(model.parameters(), capturable=True, max_consecutive_skips=3)
    x, y = torch.randn(8, 5), torch.randn(8, 1)

    def step(optimizer: AdaL, net: nn.Module, what: str | None = None) -> None:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        if what == "overflow":
            _overflow_(net[0].weight.grad)
        elif what == "grad":
            net[0].weight.grad[0, 0] = float("nan")
        optimizer.step(loss=loss * float("inf") if what == "loss" else loss)

    with pytest.warns(RuntimeWarning, match=r"non-finite step outcome \(step size\)"):  # the host path's words
        step(host, host_model, "overflow")
    step(opt, model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(opt, model, "overflow")
        assert caught == []
        opt.sync_warnings()
        opt.sync_warnings()  # nothing new: no second warning
    assert len(caught) == 1
    message = str(caught[0].message)
    assert CAUSES["overflow"] in message and "1 step skipped so far, 1 in a row" in message, message
    step(opt, model, "grad")
    step(opt, model, "loss")
    with pytest.raises(RuntimeError, match=r"3 steps in a row were skipped.*non-finite loss \(loss\)"):
        opt.sync_warnings()
    assert int(opt.param_groups[0]["step"]) == 1


@pytest.mark.parametrize("what", ["grad", "loss", "overflow"])
def test_each_cause_is_reported(what: str) -> None:
    _, opt, _, _ = _quiet_train({}, capturable=True, steps=3, bad={2: what})
    with pytest.warns(RuntimeWarning, match=f"{CAUSES[what].replace('(', '[(]').replace(')', '[)]')}.*1 step skipped"):
        opt.sync_warnings()


@pytest.mark.parametrize("kwargs", [SETTINGS[0], SETTINGS[1], SETTINGS[2]])
def test_state_dicts_move_between_capturable_and_default(kwargs: dict[str, Any]) -> None:
    """Either way, a resumed run continues as the uninterrupted one (to float32 rounding): the
    per-parameter ``step``, Λ1, Λ2 become numbers in a state dict's load and device tensors at the
    next capturable step.  The option comes back with the state dict (as torch's optimizers restore
    ``capturable``): the path is switched by setting it after loading."""

    def run(first: bool, second: bool, steps: int = 12, switch: int = 6) -> list[torch.Tensor]:
        model = _model()
        opt = AdaL(_groups(model), capturable=first, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for k in range(steps):
            if k == switch:
                saved = copy.deepcopy(opt.state_dict())
                opt = AdaL(_groups(model), capturable=second, **kwargs)
                opt.load_state_dict(saved)
                assert opt.param_groups[0]["capturable"] is first
                for group in opt.param_groups:
                    group["capturable"] = second
                loaded = opt.state[model[0].weight]
                assert type(loaded["step"]) is int and type(loaded["scale_sq_avg"]) is float
            x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert isinstance(opt.state[model[0].weight]["scale_avg"], torch.Tensor) is second
        assert isinstance(opt.param_groups[0]["step"], torch.Tensor) is second
        assert int(opt.param_groups[0]["step"]) == steps
        return [p.detach().clone() for p in model.parameters()]

    reference = run(False, False)
    for first, second in ((True, False), (False, True), (True, True)):
        for a, b in zip(reference, run(first, second)):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


def test_a_float16_state_dict_keeps_its_float64_scalars() -> None:
    """torch.optim casts a state dict's tensors to the parameter's dtype: Λ1, Λ2 of float16 parameters
    are loaded as numbers instead, exactly, and continue bit for bit."""
    model, opt, _, _ = _quiet_train({}, capturable=True, steps=3, dtype=torch.float16, bad={})
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    resumed = AdaL(_groups(twin), capturable=True)
    resumed.load_state_dict(copy.deepcopy(saved))
    for index, entry in saved["state"].items():
        for key in ("step", "scale_avg", "scale_sq_avg"):
            assert resumed.state_dict()["state"][index][key] == entry[key].item(), key
    x, y = torch.randn(8, 5).half(), torch.randn(8, 1).half()
    for optimizer, net in ((opt, model), (resumed, twin)):
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for p_a, p_b in zip(model.parameters(), twin.parameters()):
        for key, value in opt.state[p_a].items():
            assert value.dtype == resumed.state[p_b][key].dtype and torch.equal(value, resumed.state[p_b][key]), key


@pytest.mark.parametrize("kwargs", [SETTINGS[0], SETTINGS[1], SETTINGS[2]])
def test_compiled_and_capturable_together(kwargs: dict[str, Any]) -> None:
    """The compiled pass under capturable=True: no host read, and the compiled host-gated path's
    steps and skips (the same kernel; the table built on the device), skipped steps untouched."""
    model_a, opt_a, _, _ = _quiet_train({**kwargs, "compiled": True}, capturable=False)
    model_b, opt_b, reads, snapshots = _quiet_train({**kwargs, "compiled": True}, capturable=True)
    assert reads == []
    assert opt_a.param_groups[0]["skipped_steps"] == len(BAD)
    _assert_same_run(opt_a, opt_b, model_a, model_b, params=(2e-5, 2e-6), moments=(2e-5, 2e-7), scalar_rtol=1e-5)
    assert_skipped_steps_untouched(snapshots)


def test_the_capturable_flag_is_checked() -> None:
    with pytest.raises(ValueError, match="capturable"):
        AdaL([nn.Parameter(torch.zeros(2))], capturable=1)


def test_a_group_added_between_steps_joins_the_shared_numbers() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(4, 3), nn.Linear(3, 1)
    opt = AdaL(first.parameters(), capturable=True)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def step() -> list[str]:
        opt.zero_grad()
        nn.functional.mse_loss(second(first(x)), y).backward()
        with CountHostReads() as counter:
            opt.step()
        return counter.reads

    step()
    opt.add_param_group({"params": second.parameters(), "lr": 3e-3})
    assert step() == [] and step() == []
    for key in ("step", "skipped_steps"):
        assert opt.param_groups[1][key] is opt.param_groups[0][key], key
    assert int(opt.param_groups[1]["step"]) == 3
    assert int(opt.state[second.weight]["step"]) == 2 and int(opt.state[first.weight]["step"]) == 3


SCALAR_CASES = [
    # (scale, Λ1, Λ2, k): a first step, a running one, a tensor that never moved, a zero scale,
    # an s² beyond float64, a non-finite scale
    (4.0, 0.0, 0.0, 1),
    (0.7, 2.5, 9.0, 7),
    (0.0, 0.0, 0.0, 3),
    (0.0, 1.5, 4.0, 12),
    (1e160, 1.0, 1.0, 4),
    (math.inf, 1.0, 1.0, 2),
    (1e-30, 1e-30, 1e-60, 5),
]


@pytest.mark.parametrize("eps_mode", ["preconditioner", "denominator"])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.9, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_scalar_rules_give_the_same_values_on_tensors(eps_mode: str, betas: tuple[float, float], dtype: torch.dtype) -> None:
    """adal_scalars and adal_step_fits, one source of truth: on 1-d float64 tensors (the capturable
    step's buckets) every entry is the number the host path computes."""
    eps, lr = 1e-8, 1e-3
    in_denominator = eps_mode == "denominator"
    cap, largest, largest_work = _dtype_limits(dtype)
    options = {"betas": betas, "eps": eps, "eps_in_denominator": in_denominator, "floor": 1.0 / cap if in_denominator else 0.0}
    limits = {"betas": betas, "eps_in_denominator": in_denominator, "largest": largest, "largest_work": largest_work, "cap": cap}
    columns = [torch.tensor(column, dtype=torch.float64) for column in zip(*SCALAR_CASES)]
    rule_t = adal_scalars(*columns, lr=lr, **options)
    bounds = torch.tensor([1.0, 1e3, 0.0, 5.0, 1e160, 1.0, 1e-30], dtype=torch.float64)
    fits_t = adal_step_fits(rule_t, bounds, **limits)
    assert isinstance(fits_t, torch.Tensor) and fits_t.dtype == torch.bool
    for i, (case, bound) in enumerate(zip(SCALAR_CASES, bounds.tolist())):
        rule = adal_scalars(*case, lr=lr, **options)
        for name in ("scale_avg", "scale_sq_avg", "avg_weight", "sq_weight", "step_size", "shift"):
            number, entry = getattr(rule, name), float(getattr(rule_t, name)[i])
            assert entry == pytest.approx(number, rel=1e-12, nan_ok=True), (case, name)
        assert bool(rule_t.moves[i]) == rule.moves, case
        assert bool(fits_t[i]) == adal_step_fits(rule, bound, **limits), case


def test_the_rate_on_a_device_step_count() -> None:
    k = torch.tensor(4.0, dtype=torch.float64)
    assert float(adal_rate(0.1, k, "inv_sqrt")) == adal_rate(0.1, 4, "inv_sqrt") == 0.05
    assert adal_rate(0.1, k, "none") == 0.1


def test_the_state_initialization_lays_out_the_device_state() -> None:
    """torch.distributed.checkpoint's layout step (zero gradients, every lr 0, no loss) makes the
    state a capturable step makes: the same keys, 0-d tensors of the same dtypes; nothing moves."""
    model, stepped_model = _model(), _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt, stepped = AdaL(_groups(model), capturable=True), AdaL(_groups(stepped_model), capturable=True)
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    nn.functional.mse_loss(stepped_model(torch.randn(4, 5)), torch.randn(4, 1)).backward()
    stepped.step()
    for p, q, start in zip(model.parameters(), stepped_model.parameters(), before):
        assert torch.equal(p, start)
        assert opt.state[p].keys() == stepped.state[q].keys()
        for key, value in stepped.state[q].items():
            assert (opt.state[p][key].dtype, opt.state[p][key].shape) == (value.dtype, value.shape), key
    for group, stepped_group in zip(opt.param_groups, stepped.param_groups):
        for key in ("step", "skipped_steps", "effective_lr", "grad_scale"):
            assert isinstance(group[key], torch.Tensor) and group[key].dtype == stepped_group[key].dtype, key
    assert int(opt.param_groups[0]["step"]) == 0
