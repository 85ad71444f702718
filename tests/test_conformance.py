"""The checks every optimizer of the package must pass (run over tests/optimizer_registry.py).

Modelled on PyTorch's own optimizer tests: one list of optimizers, one list of checks.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
import re
import warnings

import pytest
import torch
from torch import nn

from optimizer_registry import CASE_IDS, CASES, OptimizerCase, take_step

STEPS = 20


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small network with matrices, vectors and a nonlinearity (several tensors of several shapes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A stream of mini-batches of a fixed smooth regression problem (the same for every run)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 2, generator=gen)
    out = []
    for _ in range(n):
        x = torch.randn(16, 6, generator=gen)
        out.append((x.to(dtype), torch.tanh(x @ w).to(dtype)))
    return out


def run(case: OptimizerCase, model: nn.Module, opt: torch.optim.Optimizer, data) -> list[float]:
    return [take_step(case, opt, model, batch) for batch in data]


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def flat_state(opt: torch.optim.Optimizer) -> dict:
    """Every tensor and number of the optimizer's state, keyed by position (for exact comparison).

    Per-parameter state under ``(index, name)``; the optimizer-wide scalars, which every param
    group holds (``type(opt).group_state``), under ``("group", i, name)``.
    """
    out = {}
    state_dict = opt.state_dict()
    for key, value in state_dict["state"].items():
        for name, item in value.items():
            out[(key, name)] = item.clone() if isinstance(item, torch.Tensor) else copy.deepcopy(item)
    for i, group in enumerate(state_dict["param_groups"]):
        for name in getattr(opt, "group_state", {}):
            item = group[name]
            out[("group", i, name)] = item.clone() if isinstance(item, torch.Tensor) else copy.deepcopy(item)
    return out


def skipped_steps(opt: torch.optim.Optimizer) -> int:
    """The count of skipped steps, which every param group holds equally (a number: a capturable
    optimizer's count is a device tensor it updates in place)."""
    counts = {int(group["skipped_steps"]) for group in opt.param_groups}
    assert len(counts) == 1, counts
    return counts.pop()


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):  # bit for bit; NaN (a capturable optimizer's "not yet") equals NaN
            assert x.dtype == y.dtype and torch.equal(x.isnan(), y.isnan()), key
            assert torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0)), key
        else:
            assert x == y, key


def assert_same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request) -> OptimizerCase:
    return request.param


def test_trains(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    data = batches(STEPS)
    before = sum(nn.functional.mse_loss(model(x), y).item() for x, y in data)
    run(case, model, opt, data * 3)
    after = sum(nn.functional.mse_loss(model(x), y).item() for x, y in data)
    assert after < before
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_foreach_matches_per_tensor(case: OptimizerCase, monkeypatch) -> None:
    results = []
    for foreach in (True, False):
        # The multi-tensor body even for classes that run tensor by tensor on the CPU (its default there).
        monkeypatch.setattr(case.cls, "single_tensor_on_cpu", not foreach, raising=False)
        model = make_model()
        opt = case.make(model.parameters(), foreach=foreach)
        run(case, model, opt, batches(STEPS))
        results.append(params_of(model))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_on_device_scalars_match_host_scalars(case: OptimizerCase, monkeypatch) -> None:
    """The path accelerators take (step sizes kept as 0-d tensors, no sync) matches the host path."""
    results = []
    for on_host in (True, False):
        monkeypatch.setattr(case.cls, "host_scalars_on_cpu", on_host, raising=False)
        model = make_model(dtype=torch.float64)
        opt = case.make(model.parameters())
        run(case, model, opt, batches(STEPS, dtype=torch.float64))
        results.append(params_of(model))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_state_dict_resume_is_bit_identical(case: OptimizerCase) -> None:
    data = batches(2 * STEPS)
    model = make_model()
    opt = case.make(model.parameters())
    run(case, model, opt, data[:STEPS])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    run(case, model, opt, data[STEPS:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed_model = make_model(seed=123)
    resumed_model.load_state_dict(saved["model"])
    resumed = case.make(resumed_model.parameters())
    resumed.load_state_dict(saved["opt"])
    run(case, resumed_model, resumed, data[STEPS:])

    assert_same_params(params_of(model), params_of(resumed_model))
    assert_same_state(flat_state(opt), flat_state(resumed))


def test_deepcopy_and_pickle_continue_identically(case: OptimizerCase) -> None:
    data = batches(2 * STEPS)
    model = make_model()
    opt = case.make(model.parameters())
    run(case, model, opt, data[:STEPS])
    for clone in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        model_copy, opt_copy = clone((model, opt))
        run(case, model_copy, opt_copy, data[STEPS:])
        reference_model, reference_opt = copy.deepcopy((model, opt))
        run(case, reference_model, reference_opt, data[STEPS:])
        assert_same_params(params_of(model_copy), params_of(reference_model))


def test_split_into_groups_equals_one_group(case: OptimizerCase) -> None:
    """Global quantities must span every group: two groups with equal settings = one group.

    Where the method's groups interact by design (``case.groups_interact`` says how), the split
    must make a difference instead: the documented interaction is really there.
    """
    results = []
    for split in (False, True):
        model = make_model()
        params = list(model.parameters())
        groups = [{"params": params[:3]}, {"params": params[3:]}] if split else params
        opt = case.make(groups)
        run(case, model, opt, batches(STEPS))
        results.append(params_of(model))
    if case.groups_interact:
        assert any(not torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(*results))
    else:
        for x, y in zip(*results):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_groups_with_their_own_lr_and_weight_decay(case: OptimizerCase) -> None:
    model = make_model()
    params = list(model.parameters())
    lr = case.make([torch.zeros(1, requires_grad=True)]).defaults["lr"]
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": lr * 0.5, "weight_decay": 1e-2}]
    opt = case.make(groups)
    assert opt.param_groups[1]["lr"] == lr * 0.5 and opt.param_groups[1]["weight_decay"] == 1e-2
    run(case, model, opt, batches(STEPS))
    assert all(torch.isfinite(p).all() for p in params)
    for group in opt.param_groups:
        assert "effective_lr" in group
    # The group's own lr must matter: the same run with both groups at the default lr differs.
    other = make_model()
    other_params = list(other.parameters())
    opt2 = case.make([{"params": other_params[:3]}, {"params": other_params[3:], "weight_decay": 1e-2}])
    run(case, other, opt2, batches(STEPS))
    assert any(not torch.equal(a, b) for a, b in zip(params[3:], other_params[3:]))


def test_parameters_without_gradient_are_left_alone(case: OptimizerCase) -> None:
    model = make_model()
    unused = nn.Parameter(torch.randn(3, 3))
    frozen = model[0].weight
    frozen.requires_grad_(False)
    frozen_before = frozen.detach().clone()
    unused_before = unused.detach().clone()
    opt = case.make([*model.parameters(), unused])
    run(case, model, opt, batches(5))
    assert torch.equal(frozen, frozen_before)
    assert torch.equal(unused, unused_before)
    assert unused not in opt.state and frozen not in opt.state


def test_lr_scheduler_changes_the_rate(case: OptimizerCase) -> None:
    results = []
    for gamma in (1.0, 0.1):
        model = make_model()
        opt = case.make(model.parameters())
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=gamma)
        for batch in batches(STEPS):
            take_step(case, opt, model, batch)
            scheduler.step()
        if not case.adapts_lr:
            initial = case.make([torch.zeros(1, requires_grad=True)]).defaults["lr"]
            assert opt.param_groups[0]["lr"] == pytest.approx(initial * gamma ** (STEPS // 5))
        results.append(params_of(model))
    assert any(not torch.equal(a, b) for a, b in zip(*results))


def test_records_what_it_did(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    run(case, model, opt, batches(3))
    for group in opt.param_groups:
        for key in ("effective_lr", *case.recorded):
            assert key in group, key
            value = float(group[key])
            assert math.isfinite(value), (key, value)


@pytest.mark.parametrize("where", ["loss", "grad"])
def test_non_finite_step_is_skipped(case: OptimizerCase, where: str) -> None:
    # A loss given to a gradient-only method is checked too: a NaN loss skips its step as well.
    model = make_model()
    opt = case.make(model.parameters())
    data = batches(6)
    run(case, model, opt, data[:4])
    params_before, state_before = params_of(model), flat_state(opt)
    skipped_before = skipped_steps(opt)

    x, y = data[4]
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if where == "loss":
        loss = loss * float("nan")
    else:
        next(iter(model.parameters())).grad[0, 0] = float("inf")
    kwargs = {"loss": loss}
    if case.needs_probe:
        kwargs["probe"] = lambda: nn.functional.mse_loss(model(x), y)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        opt.step(**kwargs)

    assert_same_params(params_before, params_of(model))
    after = flat_state(opt)
    for i in range(len(opt.param_groups)):  # the skip counters count it; nothing else changes
        for counter in ("skipped_steps", "consecutive_skips"):
            after[("group", i, counter)] = after[("group", i, counter)] - 1
    assert_same_state(state_before, after)
    assert skipped_steps(opt) == skipped_before + 1
    run(case, model, opt, data[5:])  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_warns_once(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    x, y = batches(1)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            next(iter(model.parameters())).grad.fill_(float("nan"))
            kwargs = {"loss": loss}
            if case.needs_probe:
                kwargs["probe"] = lambda: nn.functional.mse_loss(model(x), y)
            opt.step(**kwargs)
            opt.sync_warnings()  # where a capturable optimizer reports (a no-op for the others)
    assert sum("non-finite" in str(w.message) for w in caught) == 1
    assert skipped_steps(opt) == 3


def test_missing_loss_names_the_fixes(case: OptimizerCase) -> None:
    """Without a loss, a method that needs one names the fixes; a gradient-only method takes the
    same step it takes when given the loss."""
    model = make_model()
    start = params_of(model)
    opt = case.make(model.parameters())
    batch = batches(1)[0]
    x, y = batch
    nn.functional.mse_loss(model(x), y).backward()
    if case.requires_loss:
        with pytest.raises(RuntimeError, match=r"loss=.*AdaptiveLRCallback"):
            opt.step()
        assert_same_params(start, params_of(model))
    else:
        opt.step()
        reference_model = make_model()
        take_step(case, case.make(reference_model.parameters()), reference_model, batch)
        assert_same_params(params_of(reference_model), params_of(model))
        assert any(not torch.equal(a, b) for a, b in zip(start, params_of(model)))


def test_loss_intake_order(case: OptimizerCase) -> None:
    """`loss=` wins over a loss handed over with set_loss, which wins over the closure's value;
    the closure is called exactly once.

    The losing values are wrong: scaled for methods that use the loss's value, NaN for
    gradient-only methods (which check only its finiteness, so a NaN that won would skip the step).
    """
    wrong_closure, wrong_handed = (7.0, 5.0) if case.requires_loss else (float("nan"), float("nan"))
    data = batches(STEPS)
    reference_model = make_model()
    reference = case.make(reference_model.parameters())
    run(case, reference_model, reference, data)

    model = make_model()
    opt = case.make(model.parameters())
    calls = 0
    for x, y in data:
        def closure():
            nonlocal calls
            calls += 1
            opt.zero_grad()
            out = nn.functional.mse_loss(model(x), y)
            out.backward()
            return out * wrong_closure  # must lose against set_loss
        with torch.no_grad():
            true_loss = nn.functional.mse_loss(model(x), y)
        opt.set_loss(true_loss * wrong_handed)  # must lose against loss=
        kwargs = {"probe": lambda: nn.functional.mse_loss(model(x), y)} if case.needs_probe else {}
        opt.step(closure, loss=true_loss, **kwargs)
    assert calls == len(data)
    assert skipped_steps(opt) == 0
    for a, b in zip(params_of(reference_model), params_of(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_closure_loss_is_used(case: OptimizerCase) -> None:
    """A closure alone drives the step: its loss (where the method needs one) and its gradient."""
    data = batches(STEPS)
    reference_model = make_model()
    reference = case.make(reference_model.parameters())
    run(case, reference_model, reference, data)
    model = make_model()
    opt = case.make(model.parameters())
    for x, y in data:
        def closure():
            opt.zero_grad()
            out = nn.functional.mse_loss(model(x), y)
            out.backward()
            return out
        kwargs = {"probe": lambda: nn.functional.mse_loss(model(x), y)} if case.needs_probe else {}
        returned = opt.step(closure, **kwargs)
        assert isinstance(returned, torch.Tensor)
    for a, b in zip(params_of(reference_model), params_of(model)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def names_of(bad: dict) -> str:
    """A pattern matching an error message that names one of ``bad``'s arguments (`name` or `name[i]`)."""
    return "|".join(rf"`{re.escape(name)}(`|\[)" for name in bad)


def test_invalid_arguments_raise_value_error(case: OptimizerCase) -> None:
    params = [nn.Parameter(torch.zeros(2))]
    for bad in case.invalid:
        with pytest.raises(ValueError, match=names_of(bad)):
            case.make(params, **bad)
    with pytest.raises(ValueError, match=names_of({"foreach": "yes"})):
        case.make(params, foreach="yes")


def test_state_is_keyed_by_parameters_only(case: OptimizerCase) -> None:
    """What torch.distributed.checkpoint needs: ``optimizer.state`` holds parameters only, and the
    optimizer-wide scalars are in every param group, equal."""
    model = make_model()
    opt = case.make([{"params": list(model.parameters())[:3]}, {"params": list(model.parameters())[3:]}])
    run(case, model, opt, batches(3))
    params = {id(p) for group in opt.param_groups for p in group["params"]}
    for key in opt.state:
        assert isinstance(key, torch.Tensor) and id(key) in params, key
    assert all(isinstance(key, int) for key in opt.state_dict()["state"])
    first = opt.param_groups[0]
    for name in ("step", "skipped_steps", *getattr(opt, "group_state", {})):
        assert all(group[name] == first[name] for group in opt.param_groups), name
    assert first["step"] == 3


def test_sparse_gradients_are_refused(case: OptimizerCase) -> None:
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = case.make(embedding.parameters())
    out = embedding(torch.tensor([1, 2])).pow(2).sum()
    out.backward()
    kwargs = {"loss": out}
    if case.needs_probe:
        kwargs["probe"] = lambda: embedding(torch.tensor([1, 2])).pow(2).sum()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step(**kwargs)


# ---------------------------------------------------------------------------------------------
# LR schedulers and Lightning's LearningRateMonitor (issue 13): every optimizer works with torch's
# schedulers at their defaults (OneCycleLR and CyclicLR cycling the momentum), follows the lr and
# the momentum they set, and shows that momentum to Lightning's LearningRateMonitor.

#: A rate the optimizer may take relative to the scheduled ``lr`` (``effective_lr / lr``) before it
#: counts as blown up: MoMo's bias-corrected cap ``lr/ρ`` is 10·lr at the first step, Step-Tuned's
#: second half-step uses the rate of the first (×10 across a StepLR decay); the failure seen was 1e20.
MAX_RATE_MULTIPLE = 100.0

SCHEDULERS = {
    "StepLR": lambda opt, lr: torch.optim.lr_scheduler.StepLR(opt, step_size=5),
    "CosineAnnealingLR": lambda opt, lr: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 1),
    "OneCycleLR": lambda opt, lr: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=STEPS),
    "CyclicLR": lambda opt, lr: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=lr / 10, max_lr=lr, step_size_up=5),
}
#: The schedulers that cycle the momentum (their default ``cycle_momentum=True``).
CYCLE_MOMENTUM = ("OneCycleLR", "CyclicLR")


def momentum_used(case: OptimizerCase, group: dict) -> float:
    """The momentum coefficient the method reads (``case.momentum``: a key, or a key and an index)."""
    value = group[case.momentum[0]]
    return value[case.momentum[1]] if len(case.momentum) > 1 else value


def momentum_scheduled(opt: torch.optim.Optimizer, group: dict) -> float:
    """What torch's momentum-cycling schedulers and Lightning's monitor read and write: ``betas[0]``
    when the optimizer's defaults have ``betas``, else ``momentum``."""
    return group["betas"][0] if "betas" in opt.defaults else group["momentum"]


def full_loss(model: nn.Module, data) -> float:
    with torch.no_grad():
        return sum(nn.functional.mse_loss(model(x), y).item() for x, y in data) / len(data)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_lr_schedulers_at_their_defaults(case: OptimizerCase, scheduler: str) -> None:
    """Each scheduler runs (momentum cycling included), the run does not blow up (finite
    parameters, no skipped step, the loss decreases, the step size stays within
    ``MAX_RATE_MULTIPLE`` of the scheduled lr), the optimizer keeps the lr the scheduler set
    (QLAB sets it itself: its next trial rate) and uses the momentum it set.

    The step size is compared with the larger of this step's and the previous step's scheduled lr:
    a Step-Tuned SGD iteration spans two steps and keeps the rate of its first half.
    """
    model = make_model()
    opt = case.make(model.parameters())
    lr = opt.defaults["lr"]
    sched = SCHEDULERS[scheduler](opt, lr)
    data = batches(STEPS)
    before = full_loss(model, data)
    previous = [group["lr"] for group in opt.param_groups]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a skipped step fails the test
        for batch in data:
            scheduled = [group["lr"] for group in opt.param_groups]
            cycled = case.momentum and scheduler in CYCLE_MOMENTUM
            momenta = [momentum_scheduled(opt, group) for group in opt.param_groups] if cycled else []
            take_step(case, opt, model, batch)
            for group, rate, last in zip(opt.param_groups, scheduled, previous):
                if not case.adapts_lr:
                    assert group["lr"] == rate
                    bound = MAX_RATE_MULTIPLE * max(rate, last)
                    assert float(group["effective_lr"]) <= bound, (rate, last, group["effective_lr"])
            for group, momentum in zip(opt.param_groups, momenta):
                assert momentum_used(case, group) == pytest.approx(momentum), "the method ignores the scheduled momentum"
            previous = scheduled
            sched.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert skipped_steps(opt) == 0
    assert full_loss(model, data) < before


def test_reduce_lr_on_plateau(case: OptimizerCase) -> None:
    """A metric that stops improving cuts the lr by ``factor`` after ``patience`` steps; the
    optimizer goes on from there (with the reduced lr, or, for QLAB, the reduced trial rate)."""
    model = make_model()
    opt = case.make(model.parameters())
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    data = batches(STEPS)
    before = full_loss(model, data)
    lrs = []
    for batch in data:
        take_step(case, opt, model, batch)
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(1.0)  # a plateau
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert skipped_steps(opt) == 0
    assert full_loss(model, data) < before
    if not case.adapts_lr:
        initial = opt.defaults["lr"]
        assert lrs[:12] == [initial] * 12 and lrs[-1] == pytest.approx(0.1 * initial)


def test_lightning_learning_rate_monitor_logs_the_momentum(case: OptimizerCase) -> None:
    """``LearningRateMonitor(log_momentum=True)`` reads ``betas[0]`` when the optimizer's defaults
    have ``betas``, else ``momentum`` (0 and a warning when neither).  A momentum set under that key
    (as a scheduler sets it) is the one the method uses and the one the monitor logs.  The
    monitor's extraction is run on the optimizer directly."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    model = make_model()
    opt = case.make(model.parameters())
    assert "momentum" in opt.defaults or "betas" in opt.defaults, "the monitor would warn and log momentum 0"
    for group in opt.param_groups:  # what a momentum-cycling scheduler writes
        if "betas" in opt.defaults:
            group["betas"] = (0.77, group["betas"][1])
        else:
            group["momentum"] = 0.77
    take_step(case, opt, model, batches(1)[0])
    monitor = LearningRateMonitor(log_momentum=True)
    names = [f"lr-{type(opt).__name__}/pg{i}" for i in range(len(opt.param_groups))]
    monitor.lrs = {name: [] for name in names}
    stats = monitor._get_optimizer_stats(opt, names)
    for name, group in zip(names, opt.param_groups):
        assert stats[name] == group["lr"]
        if case.momentum:
            assert momentum_used(case, group) == pytest.approx(0.77), "the method ignores the momentum set"
            assert stats[f"{name}-momentum"] == pytest.approx(0.77)
