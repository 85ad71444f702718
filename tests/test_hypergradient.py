"""HierarchicalHD (docs/algorithms.md §3) against independent float64 references and torch.optim.

The reference below is written from docs/algorithms.md in absolute rates (α starts at ``lr``), the way
the specification states it; the optimizer stores rates as multiples of ``lr``.  Agreement to
1e-10 over 40 steps therefore checks the update, not a copy of it.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from lightning_adaptive_lr import HierarchicalHD
from lightning_adaptive_lr.optim.hypergradient import (
    hd_rate,
    project_simplex,
    rate_step_factor,
    scalar_rate,
    weight_hypergradients,
)

LEVEL_ORDER = ("global", "layer", "unit", "param")


# ---------------------------------------------------------------------------- a small problem


Batch = tuple[torch.Tensor, torch.Tensor]


def _problem(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[list[torch.Tensor], list[Batch]]:
    """A two-layer tanh network's initial weights and 4 fixed mini-batches (regression)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (6,), (3, 6), (3,)]
    params = [0.5 * torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    batches = [
        (torch.randn(8, 4, generator=gen, dtype=dtype), torch.randn(8, 3, generator=gen, dtype=dtype)) for _ in range(4)
    ]
    return params, batches


def _loss(params: list[torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    w1, b1, w2, b2 = params
    x, y = batch
    return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()


def _grads(params: list[torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    return [g.detach() for g in torch.autograd.grad(_loss(leaves, batch), leaves)]


def _run_optimizer(
    steps: int, params0: list[torch.Tensor], batches: list[Batch], **kwargs
) -> tuple[list[torch.Tensor], HierarchicalHD, list[dict]]:
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = HierarchicalHD(params, **kwargs)
    records = []
    for t in range(steps):
        opt.zero_grad()
        _loss(params, batches[t % len(batches)]).backward()
        opt.step()
        records.append({k: v for k, v in opt.param_groups[0].items() if k.startswith(("hd_", "effective_lr"))})
    return [p.detach() for p in params], opt, records


# ---------------------------------------------------------------------------- the reference


def _simplex_projection(v: list[float]) -> list[float]:
    """Projection onto the simplex by bisection on the threshold θ (Σ max(v − θ, 0) = 1)."""
    lo, hi = min(v) - 1.0, max(v)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if sum(max(x - mid, 0.0) for x in v) > 1.0:
            lo = mid
        else:
            hi = mid
    theta = 0.5 * (lo + hi)
    return [max(x - theta, 0.0) for x in v]


def _broadcast(level: str, rate, x: torch.Tensor) -> torch.Tensor:
    """A level's rate as a tensor of ``x``'s shape."""
    if level in ("global", "layer"):
        return torch.full_like(x, float(rate))
    if level == "unit":
        return rate.reshape((x.shape[0],) + (1,) * (x.dim() - 1)).expand_as(x).clone()
    return rate.clone()


def reference_hd(
    params0: list[torch.Tensor],
    batches,
    steps: int,
    *,
    base: str,
    lr: float,
    hyper_lr: dict[str, float],
    levels: tuple[str, ...],
    weights: dict[str, float] | None = None,
    learn_weights: bool = False,
    weight_lr: float = 0.0,
    level_pull: dict[str, float] | None = None,
    bounds: tuple[float, float] = (0.0, math.inf),
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[list[torch.Tensor], list[dict]]:
    """docs/algorithms.md §3 step by step, in float64, with absolute rates that start at ``lr``."""
    levels = tuple(level for level in LEVEL_ORDER if level in levels)
    w = dict(weights) if weights else {k: 1.0 / len(levels) for k in levels}
    pull = level_pull or {}
    low, high = bounds[0] * lr, bounds[1] * lr  # the optimizer's bounds are multiples of lr
    x = [p.clone() for p in params0]
    n = len(x)
    rates = {
        "global": lr,
        "layer": [lr] * n,
        "unit": [torch.full((p.shape[0],), lr, dtype=p.dtype) for p in x],
        "param": [torch.full_like(p, lr) for p in x],
    }
    s_prev = [torch.zeros_like(p) for p in x]
    buf = [None] * n
    m = [torch.zeros_like(p) for p in x]
    v = [torch.zeros_like(p) for p in x]
    records = []
    for t in range(1, steps + 1):
        g = [gi + weight_decay * xi for gi, xi in zip(_grads(x, batches[(t - 1) % len(batches)]), x)]
        h = [-gi * si for gi, si in zip(g, s_prev)]
        # Gradients of the weights with the rates that produced the previous step.
        def rate_of(k: str, j: int) -> torch.Tensor:
            return _broadcast(k, rates[k] if k == "global" else rates[k][j], x[j])

        dw = {k: sum(float((h[j] * rate_of(k, j)).sum()) for j in range(n)) for k in levels}
        new = copy.deepcopy(rates)

        def parent_of(k: str):
            coarser = [c for c in levels if LEVEL_ORDER.index(c) < LEVEL_ORDER.index(k)]
            return coarser[-1] if coarser else None

        for k in levels:
            beta, lam, par = hyper_lr[k], pull.get(k, 0.0), parent_of(k)
            if k == "global":
                new[k] = rates[k] - beta * w[k] * sum(float(hj.sum()) for hj in h)
                new[k] = min(max(new[k], low), high)
                continue
            for j in range(n):
                if k == "layer":
                    total = float(h[j].sum())
                elif k == "unit":
                    total = h[j].reshape(x[j].shape[0], -1).sum(1)
                else:
                    total = h[j]
                value = rates[k][j] - beta * w[k] * total
                if par is not None and lam > 0:
                    if par == "global":
                        parent = rates["global"]
                    elif par == "layer":
                        parent = rates["layer"][j]
                    else:  # the unit rate under each element
                        parent = rates["unit"][j].reshape((x[j].shape[0],) + (1,) * (x[j].dim() - 1))
                    value = value - 2 * beta * lam * (rates[k][j] - parent)
                new[k][j] = min(max(value, low), high) if k == "layer" else value.clamp(low, high)
        rates = new
        if learn_weights:
            proj = _simplex_projection([w[k] - weight_lr * dw[k] for k in levels])
            w = dict(zip(levels, proj))
        # The base rule's direction.
        s = []
        for j in range(n):
            if base == "sgd":
                s.append(g[j].clone())
            elif base == "sgdn":
                buf[j] = g[j].clone() if buf[j] is None else momentum * buf[j] + g[j]
                s.append(g[j] + momentum * buf[j])
            else:
                m[j] = betas[0] * m[j] + (1 - betas[0]) * g[j]
                v[j] = betas[1] * v[j] + (1 - betas[1]) * g[j] ** 2
                m_hat = m[j] / (1 - betas[0] ** t)
                v_hat = v[j] / (1 - betas[1] ** t)
                s.append(m_hat / (v_hat.sqrt() + eps))
        applied = []
        for j in range(n):
            a = sum(w[k] * _broadcast(k, rates[k] if k == "global" else rates[k][j], x[j]) for k in levels)
            applied.append(a)
            x[j] = x[j] - a * s[j]
        s_prev = s
        total = sum(a.numel() for a in applied)
        record = {"effective_lr": float(sum(a.sum() for a in applied)) / total}
        record.update({f"hd_weight_{k}": w[k] for k in levels})
        if "global" in levels:
            record["hd_rate_global"] = rates["global"]
        for k in ("layer", "unit", "param"):
            if k in levels:
                full = torch.cat([_broadcast(k, rates[k][j], x[j]).reshape(-1) for j in range(n)])
                record[f"hd_rate_{k}_min"] = float(full.min())
                record[f"hd_rate_{k}_mean"] = float(full.mean())
                record[f"hd_rate_{k}_max"] = float(full.max())
        records.append(record)
    return x, records


def _assert_close_run(got, want, records, want_records, tol: float = 1e-10) -> None:
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=tol, atol=tol), (a - b).abs().max()
    for step, (r, q) in enumerate(zip(records, want_records)):
        assert set(q) <= set(r), set(q) - set(r)
        for key, value in q.items():
            assert math.isclose(float(r[key]), value, rel_tol=tol, abs_tol=tol), (step, key, float(r[key]), value)


# ---------------------------------------------------------------------------- reference tests

STEPS = 40


@pytest.mark.parametrize(
    "base, lr, beta, weight_decay",
    [("sgd", 0.1, 0.05, 0.0), ("sgdn", 0.05, 0.01, 1e-2), ("adam", 0.01, 2e-4, 1e-2)],
)
@pytest.mark.parametrize("foreach", [True, False])
def test_global_level_is_baydin_hypergradient_descent(
    base: str, lr: float, beta: float, weight_decay: float, foreach: bool
) -> None:
    params0, batches = _problem()
    got, opt, records = _run_optimizer(
        STEPS, params0, batches, base=base, lr=lr, hyper_lr=beta, levels=("global",),
        weight_decay=weight_decay, foreach=foreach,
    )
    want, want_records = reference_hd(
        params0, batches, STEPS, base=base, lr=lr, hyper_lr={"global": beta}, levels=("global",),
        weight_decay=weight_decay,
    )
    _assert_close_run(got, want, records, want_records)
    # The rate really moved: a reference test that a frozen rate would also pass proves nothing.
    assert abs(want_records[-1]["hd_rate_global"] / lr - 1.0) > 0.05


@pytest.mark.parametrize("base, lr, beta", [("sgd", 0.1, 0.05), ("sgdn", 0.05, 0.01), ("adam", 0.01, 2e-4)])
@pytest.mark.parametrize("foreach", [True, False])
def test_two_levels_match_reference(base: str, lr: float, beta: float, foreach: bool) -> None:
    params0, batches = _problem(1)
    pull = 0.05 / beta  # closes 10% of the gap to the global rate per step
    kwargs = dict(levels=("layer", "global"), weights=(0.7, 0.3), level_pull=(pull, 0.0), weight_decay=1e-3)
    got, _, records = _run_optimizer(
        STEPS, params0, batches, base=base, lr=lr, hyper_lr=(beta, 2 * beta), foreach=foreach, **kwargs
    )
    want, want_records = reference_hd(
        params0,
        batches,
        STEPS,
        base=base,
        lr=lr,
        hyper_lr={"layer": beta, "global": 2 * beta},
        levels=("global", "layer"),
        weights={"layer": 0.7, "global": 0.3},
        level_pull={"layer": pull},
        weight_decay=1e-3,
    )
    _assert_close_run(got, want, records, want_records)
    spread = want_records[-1]["hd_rate_layer_max"] - want_records[-1]["hd_rate_layer_min"]
    assert spread > 1e-3 * lr  # the layers' rates differ: the layer level did something


@pytest.mark.parametrize("base, lr, beta", [("sgd", 0.1, 0.05), ("sgdn", 0.05, 0.01), ("adam", 0.01, 2e-4)])
@pytest.mark.parametrize("foreach", [True, False])
def test_four_levels_with_learned_weights_match_reference(base: str, lr: float, beta: float, foreach: bool) -> None:
    params0, batches = _problem(2)
    levels = ("global", "layer", "unit", "param")
    weight_lr = 2e3 if base == "adam" else 50.0
    pull = 0.02 / beta  # closes 4% of the gap to the parent per step
    got, opt, records = _run_optimizer(
        STEPS,
        params0,
        batches,
        base=base,
        lr=lr,
        hyper_lr=beta,
        levels=levels,
        learn_weights=True,
        weight_lr=weight_lr,
        level_pull=(0.0, pull, pull, pull),
        rate_bounds=(0.2, 1.5),
        weight_decay=1e-3,
        foreach=foreach,
    )
    want, want_records = reference_hd(
        params0,
        batches,
        STEPS,
        base=base,
        lr=lr,
        hyper_lr={k: beta for k in levels},
        levels=levels,
        learn_weights=True,
        weight_lr=weight_lr,
        level_pull={"layer": pull, "unit": pull, "param": pull},
        bounds=(0.2, 1.5),
        weight_decay=1e-3,
    )
    _assert_close_run(got, want, records, want_records)
    final = want_records[-1]
    assert max(abs(final[f"hd_weight_{k}"] - 0.25) for k in levels) > 1e-3  # the weights were learned
    assert final["hd_rate_param_max"] - final["hd_rate_param_min"] > 1e-3 * lr


# ---------------------------------------------------------------------------- torch.optim equivalence


def _torch_twin(base: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if base == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if base == "sgdn":
        # "sgdn" is torch's Nesterov SGD with zero dampening.
        return torch.optim.SGD(params, lr=lr, momentum=0.8, nesterov=True, weight_decay=weight_decay)
    return torch.optim.Adam(params, lr=lr, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)


@pytest.mark.parametrize("base", ["sgd", "sgdn", "adam"])
@pytest.mark.parametrize("levels", [("global",), ("global", "layer")])
@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_zero_hyper_lr_is_the_torch_optimizer_bit_for_bit(
    base: str, levels: tuple[str, ...], foreach: bool, weight_decay: float
) -> None:
    params0, batches = _problem(3, dtype=torch.float32)
    lr = 0.01 if base == "adam" else 0.05
    ours = [p.clone().requires_grad_(True) for p in params0]
    theirs = [p.clone().requires_grad_(True) for p in params0]
    opt = HierarchicalHD(
        ours, base=base, lr=lr, hyper_lr=0.0, levels=levels, momentum=0.8, betas=(0.8, 0.99), eps=1e-6,
        weight_decay=weight_decay, foreach=foreach,
    )
    twin = _torch_twin(base, theirs, lr, weight_decay)
    for t in range(30):
        for ps, o in ((ours, opt), (theirs, twin)):
            o.zero_grad()
            _loss(ps, batches[t % 4]).backward()
            o.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), (t, (a - b).abs().max())
        assert opt.param_groups[0]["effective_lr"] == lr


@pytest.mark.parametrize("base", ["sgd", "sgdn", "adam"])
def test_zero_hyper_lr_with_all_levels_is_the_torch_optimizer_up_to_rounding(base: str) -> None:
    params0, batches = _problem(3)
    lr = 0.01 if base == "adam" else 0.05
    ours = [p.clone().requires_grad_(True) for p in params0]
    theirs = [p.clone().requires_grad_(True) for p in params0]
    opt = HierarchicalHD(
        ours, base=base, lr=lr, hyper_lr=0.0, levels=LEVEL_ORDER, momentum=0.8, betas=(0.8, 0.99), eps=1e-6
    )
    twin = _torch_twin(base, theirs, lr, 0.0)
    for t in range(30):
        for ps, o in ((ours, opt), (theirs, twin)):
            o.zero_grad()
            _loss(ps, batches[t % 4]).backward()
            o.step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- weights and bounds


def test_learned_weights_stay_on_the_simplex() -> None:
    params0, batches = _problem(4)
    params = [p.clone().requires_grad_(True) for p in params0]
    levels = ("global", "layer", "unit", "param")
    opt = HierarchicalHD(params, base="sgd", lr=0.1, hyper_lr=0.05, levels=levels, learn_weights=True, weight_lr=1e4)
    history = []
    for t in range(40):
        opt.zero_grad()
        _loss(params, batches[t % 4]).backward()
        opt.step()
        w = [opt.param_groups[0][f"hd_weight_{k}"] for k in levels]
        assert all(x >= 0.0 for x in w)
        assert math.isclose(sum(w), 1.0, abs_tol=1e-12)
        assert list(opt.param_groups[0]["level_weights"]) == w
        history.append(w)
    # A large step drives some weight to the boundary: the projection was exercised.
    assert any(min(w) == 0.0 for w in history)
    assert history[-1] != [0.25] * 4


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_rates_stay_within_bounds(base: str) -> None:
    params0, batches = _problem(5)
    params = [p.clone().requires_grad_(True) for p in params0]
    lr, low, high = 0.1, 0.5, 1.25
    opt = HierarchicalHD(
        params, base=base, lr=lr, hyper_lr=1.0 if base == "sgd" else 0.1, levels=LEVEL_ORDER, rate_bounds=(low, high)
    )
    hit = set()
    for t in range(30):
        opt.zero_grad()
        _loss(params, batches[t % 4]).backward()
        opt.step()
        group = opt.param_groups[0]
        for level in LEVEL_ORDER:
            names = ["hd_rate_global"] if level == "global" else [f"hd_rate_{level}_min", f"hd_rate_{level}_max"]
            for name in names:
                value = float(group[name])
                assert low * lr - 1e-12 <= value <= high * lr + 1e-12, (name, value)
                if math.isclose(value, low * lr) or math.isclose(value, high * lr):
                    hit.add(level)
        for p in params:
            assert low <= opt.state[p]["hd_rate_layer"] <= high
            for key in ("hd_rate_unit", "hd_rate_param"):
                assert opt.state[p][key].min() >= low and opt.state[p][key].max() <= high
    assert hit, "the bounds never bound: the test would not notice a missing clip"


def test_default_bounds_keep_rates_non_negative() -> None:
    params0, batches = _problem(6)
    params = [p.clone().requires_grad_(True) for p in params0]
    # A large hyper_lr on this problem drives unbounded rates below zero.
    opt = HierarchicalHD(params, base="sgd", lr=0.1, hyper_lr=1.0, levels=("global", "param"))
    seen_zero = False
    for t in range(30):
        opt.zero_grad()
        _loss(params, batches[t % 4]).backward()
        opt.step()
        assert opt.param_groups[0]["global_rate_multiple"] >= 0.0
        assert all(opt.state[p]["hd_rate_param"].min() >= 0.0 for p in params)
        seen_zero |= any(bool((opt.state[p]["hd_rate_param"] == 0).any()) for p in params)
    assert seen_zero


# ---------------------------------------------------------------------------- groups, schedulers, gate


def test_two_groups_with_equal_options_equal_one_group() -> None:
    params0, batches = _problem(7)
    kwargs = dict(
        base="sgdn", lr=0.05, hyper_lr=0.01, levels=LEVEL_ORDER, learn_weights=True, weight_lr=50.0, level_pull=5.0
    )
    one = [p.clone().requires_grad_(True) for p in params0]
    two = [p.clone().requires_grad_(True) for p in params0]
    opt1 = HierarchicalHD(one, **kwargs)
    opt2 = HierarchicalHD([{"params": two[:2]}, {"params": two[2:]}], **kwargs)
    for t in range(20):
        for ps, o in ((one, opt1), (two, opt2)):
            o.zero_grad()
            _loss(ps, batches[t % 4]).backward()
            o.step()
    for a, b in zip(one, two):
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)
    rates = [o.param_groups[0]["global_rate_multiple"] for o in (opt1, opt2)]
    assert math.isclose(*rates, rel_tol=1e-13)


def test_scheduler_scales_the_learned_rates() -> None:
    params0, batches = _problem(8)
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = HierarchicalHD(params, base="sgd", lr=0.1, hyper_lr=0.05, levels=("global", "layer"))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    for t in range(10):
        opt.zero_grad()
        _loss(params, batches[t % 4]).backward()
        opt.step()
        sched.step()
    multiple = opt.param_groups[0]["global_rate_multiple"]
    assert abs(multiple - 1.0) > 0.01
    before = opt.param_groups[0]["hd_rate_global"]
    assert math.isclose(before, 0.1 * multiple, rel_tol=1e-12)
    # The next step's rate is the halved lr times the learned multiple (plus this step's move).
    opt.zero_grad()
    _loss(params, batches[2]).backward()
    opt.step()
    after = opt.param_groups[0]["hd_rate_global"]
    assert math.isclose(after, 0.05 * opt.param_groups[0]["global_rate_multiple"], rel_tol=1e-12)
    assert after < 0.6 * before


@pytest.mark.parametrize("first", [True, False])
def test_non_finite_gradient_leaves_parameters_and_state_untouched(first: bool) -> None:
    params0, batches = _problem(9)
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = HierarchicalHD(params, base="adam", lr=0.01, hyper_lr=1e-4, levels=LEVEL_ORDER, learn_weights=True)
    for t in range(0 if first else 3):
        opt.zero_grad()
        _loss(params, batches[t % 4]).backward()
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    _loss(params, batches[0]).backward()
    params[1].grad[0] = float("inf")
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before_params))
    after_state = opt.state_dict()
    assert opt.param_groups[0]["skipped_steps"] == 1
    assert set(after_state["state"]) == set(before_state["state"])
    for key, value in before_state["state"].items():
        for name, tensor in value.items():
            other = after_state["state"][key][name]
            assert torch.equal(tensor, other) if isinstance(tensor, torch.Tensor) else tensor == other


def test_on_device_scalar_path_matches_host_path(monkeypatch: pytest.MonkeyPatch) -> None:
    params0, batches = _problem(10)
    kwargs = dict(base="sgd", lr=0.1, hyper_lr=0.05, levels=LEVEL_ORDER, learn_weights=True, weight_lr=50.0)
    got, _, records = _run_optimizer(10, params0, batches, **kwargs)
    monkeypatch.setattr(HierarchicalHD, "host_scalars_on_cpu", False)
    got_dev, _, records_dev = _run_optimizer(10, params0, batches, **kwargs)
    for a, b in zip(got, got_dev):
        assert torch.equal(a, b)
    assert isinstance(records_dev[-1]["hd_rate_param_mean"], torch.Tensor)
    for key, value in records[-1].items():
        assert math.isclose(float(records_dev[-1][key]), float(value), rel_tol=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base": "adamw"},
        {"levels": ()},
        {"levels": ("global", "tensor")},
        {"levels": ("global", "global")},
        {"hyper_lr": -1e-3},
        {"hyper_lr": (1e-3,)},
        {"weights": (0.5, 0.6)},
        {"weights": (1.0,)},
        {"weights": (-0.5, 1.5)},
        {"level_pull": -1.0},
        {"hyper_lr": 0.1, "level_pull": 10.0},
        {"rate_bounds": (1.0, 0.5)},
        {"rate_bounds": (float("nan"), 1.0)},
        {"weight_lr": -1.0},
        {"learn_weights": 1},
    ],
)
def test_invalid_arguments_raise(kwargs: dict) -> None:
    # The error names the invalid argument in backticks: each dict's last key (`weights[0]` for one entry).
    name = list(kwargs)[-1]
    with pytest.raises(ValueError, match=rf"`{re.escape(name)}(\[\d+\])?`"):
        HierarchicalHD([torch.zeros(2, requires_grad=True)], **kwargs)


def test_rates_of_16_bit_parameters_stay_float32_through_state_dict() -> None:
    """torch casts loaded state to the parameter's dtype; the rates must keep their float32."""
    gen = torch.Generator().manual_seed(11)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)

    def train(opt: HierarchicalHD, w: torch.Tensor, steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            ((x.to(w.dtype) @ w.T).float() - y).pow(2).mean().backward()
            opt.step()

    kwargs = dict(base="adam", lr=1e-2, hyper_lr=1e-3, levels=LEVEL_ORDER, learn_weights=True)
    w = torch.randn(3, 4, generator=gen).to(torch.bfloat16).requires_grad_(True)
    opt = HierarchicalHD([w], **kwargs)
    train(opt, w, 3)
    saved = copy.deepcopy(opt.state_dict())
    w2 = w.detach().clone().requires_grad_(True)
    opt2 = HierarchicalHD([w2], **kwargs)
    opt2.load_state_dict(saved)
    for key in ("hd_rate_unit", "hd_rate_param"):
        assert opt2.state[w2][key].dtype == torch.float32
        assert torch.equal(opt2.state[w2][key], opt.state[w][key])
    train(opt, w, 3)
    train(opt2, w2, 3)
    assert torch.equal(w, w2)
    assert torch.equal(opt.state[w]["hd_rate_param"], opt2.state[w2]["hd_rate_param"])


# ---------------------------------------------------------------------------- the scalar rules alone


def test_hd_rate_is_baydins_step_with_pull_and_clip() -> None:
    assert hd_rate(1.0, 2.0, 0.25) == 1.5  # ρ + step·⟨g, s⟩
    assert hd_rate(1.0, -8.0, 0.25) == 0.0  # clipped at the default low bound 0
    assert hd_rate(1.0, 0.0, 0.1, pull=0.5, parent=3.0) == 2.0  # half the gap to the parent closed
    assert hd_rate(1.0, 4.0, 1.0, low=-math.inf, high=2.5) == 2.5
    assert hd_rate(1.0, -4.0, 1.0, low=-math.inf) == -3.0
    got = hd_rate(torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), 0.25)
    assert isinstance(got, torch.Tensor) and float(got) == 1.5


def test_rate_step_factor() -> None:
    assert rate_step_factor(0.1, 0.1, 1.0) == pytest.approx(10.0)  # β·⟨g, s⟩ in absolute units
    assert rate_step_factor(0.05, 0.1, 2.0) == pytest.approx(10.0)  # scheduled to half, s = 2·prev
    assert rate_step_factor(0.0, 0.1, 1.0) == 0.0
    assert rate_step_factor(0.1, 0.0, 1.0) == 0.0


def test_weight_hypergradients_and_scalar_rate() -> None:
    levels = ("global", "layer", "unit", "param")
    got = weight_hypergradients(
        levels,
        absolute=[0.1, 0.2],
        dots=[1.0, -2.0],
        global_rate=3.0,
        layer_rates=[1.0, 2.0],
        partials={"unit": [4.0, 5.0], "param": [-1.0, 1.0]},
    )
    # h = −g⊙s: ∂/∂w_k = −Σ_j lr_j·scale_j·Σ_i g_i·prev_i·ρ⁽ᵏ⁾_i
    assert got["global"] == pytest.approx(-3.0 * (0.1 * 1.0 + 0.2 * -2.0))
    assert got["layer"] == pytest.approx(-(1.0 * 0.1 * 1.0 + 2.0 * 0.2 * -2.0))
    assert got["unit"] == pytest.approx(-(0.1 * 4.0 + 0.2 * 5.0))
    assert got["param"] == pytest.approx(-(0.1 * -1.0 + 0.2 * 1.0))
    assert set(weight_hypergradients(("layer",), [1.0], [1.0], 1.0, [1.0], {})) == {"layer"}
    assert scalar_rate({"global": 0.25, "layer": 0.75}, 2.0, 4.0) == 3.5
    assert scalar_rate({"layer": 0.5, "unit": 0.5}, 2.0, 4.0) == 2.0  # the tensor levels are not scalar


def test_project_simplex() -> None:
    assert project_simplex([0.25, 0.75]) == [0.25, 0.75]  # already on the simplex
    assert project_simplex([2.0, 0.0]) == [1.0, 0.0]
    assert project_simplex([1.0, 1.0, 1.0]) == pytest.approx([1 / 3] * 3)
    assert project_simplex([0.6, 0.6]) == pytest.approx(project_simplex([5.6, 5.6]))  # shift invariant


# ---------------------------------------------------------------------------- distributed-checkpoint initialization


@pytest.mark.parametrize("base", ["sgd", "sgdn", "adam"])
def test_state_initialization_step_creates_the_state_and_moves_nothing(base: str) -> None:
    """torch.distributed.checkpoint steps a state-less optimizer with zero gradients and lr = 0."""
    params0, batches = _problem(12)
    params = [p.clone().requires_grad_(True) for p in params0]
    opt = HierarchicalHD(params, base=base, lr=0.1, hyper_lr=0.05, levels=LEVEL_ORDER, learn_weights=True)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    assert all(torch.equal(p, p0) for p, p0 in zip(params, params0))
    group = opt.param_groups[0]
    assert (group["step"], group["global_rate_multiple"], group["level_weights"]) == (0, 1.0, (0.25,) * 4)
    for p in params:
        state = opt.state[p]
        assert torch.equal(state["prev_direction"], torch.zeros_like(p))
        assert state["hd_rate_layer"] == 1.0
        assert torch.equal(state["hd_rate_param"], torch.ones_like(p))
        assert torch.equal(state["hd_rate_unit"], torch.ones(p.shape[0], dtype=p.dtype))
        if base == "sgdn":
            assert torch.equal(state["momentum_buffer"], torch.zeros_like(p))
        if base == "adam":
            assert state["step"] == 0 and state["direction_scale"] == 1.0
            assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    assert "hd_rate_param_mean" in group  # recorded like a real step, so group layouts match

    # Then training from there is training from scratch.
    group["lr"] = 0.1
    fresh = [p.clone().requires_grad_(True) for p in params0]
    twin = HierarchicalHD(fresh, base=base, lr=0.1, hyper_lr=0.05, levels=LEVEL_ORDER, learn_weights=True)
    for t in range(5):
        for ps, o in ((params, opt), (fresh, twin)):
            o.zero_grad()
            _loss(ps, batches[t % 4]).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, fresh))
