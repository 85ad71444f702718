"""MoMo and MoMo-Adam against docs/algorithms.md §1, computed independently in float64 NumPy loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from conftest import least_squares_loss_and_grads, make_least_squares, vdot
from lightning_adaptive_lr import MoMo, MoMoAdam
from lightning_adaptive_lr.optim import LowerBoundOptimizer
from lightning_adaptive_lr.optim.momo import momo_loss_model, momo_step_size

STEPS = 35


def reference_momo(data, params, groups, beta, bias_correction, estimate_lb, lb_init):
    """docs/algorithms.md §1 MoMo, literally. ``groups``: list of (lr, wd, parameter indices)."""
    x = [p.copy() for p in params]
    d = [np.zeros_like(p) for p in x]
    fbar = gamma = 0.0
    lb = lb_init
    taus = []
    for k, batch in enumerate(data, start=1):
        f, g = least_squares_loss_and_grads(x, batch)
        gx = vdot(g, x)
        if k == 1 and not bias_correction:
            fbar, gamma, d = f, gx, [gi.copy() for gi in g]
        fbar = beta * fbar + (1 - beta) * f
        d = [beta * di + (1 - beta) * gi for di, gi in zip(d, g)]
        gamma = beta * gamma + (1 - beta) * gx
        rho = 1 - beta**k if bias_correction else 1.0
        big_d, big_n = vdot(d, x), vdot(d, d)
        for lr, wd, indices in groups:
            c = 1 + lr * wd
            if estimate_lb:
                cap = c * fbar + big_d - c * gamma
                if cap < c * rho * lb:
                    lb = max(cap / (2 * c * rho), lb_init)
            tau = min(lr / rho, max(c * (fbar - rho * lb) + big_d - c * gamma, 0.0) / big_n) if big_n > 0 else 0.0
            if estimate_lb:
                lb = max((fbar + big_d - gamma - 0.5 * tau * big_n) / rho, lb_init)
            for i in indices:
                x[i] = (x[i] - tau * d[i]) / c
            taus.append(tau)
    return x, taus, lb


def reference_momo_adam(data, params, groups, betas, eps, estimate_lb, lb_init, decoupled):
    """docs/algorithms.md §1 MoMo-Adam, literally."""
    beta1, beta2 = betas
    x = [p.copy() for p in params]
    d = [np.zeros_like(p) for p in x]
    v = [np.zeros_like(p) for p in x]
    fbar = gamma = 0.0
    lb = lb_init
    taus = []
    for k, batch in enumerate(data, start=1):
        f, g = least_squares_loss_and_grads(x, batch)
        gx = vdot(g, x)
        d = [beta1 * di + (1 - beta1) * gi for di, gi in zip(d, g)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, g)]
        gamma = beta1 * gamma + (1 - beta1) * gx
        fbar = beta1 * fbar + (1 - beta1) * f
        rho = 1 - beta1**k
        dn = [np.sqrt(vi / (1 - beta2**k)) + eps for vi in v]
        big_d = vdot(d, x)
        big_n = float(sum(np.sum(di * di / dni) for di, dni in zip(d, dn)))
        for lr, wd, indices in groups:
            c = 1 + lr * wd
            if estimate_lb:
                cap = c * fbar + big_d - c * gamma
                if cap < c * rho * lb:
                    lb = max(cap / (2 * c * rho), lb_init)
            tau = min(lr / rho, max(c * (fbar - rho * lb) + big_d - c * gamma, 0.0) / big_n) if big_n > 0 else 0.0
            if estimate_lb:
                lb = max((fbar + big_d - gamma - 0.5 * tau * big_n) / rho, lb_init)
            for i in indices:
                if decoupled:
                    x[i] = x[i] * (1 - lr * wd)
                    x[i] = x[i] - tau * d[i] / dn[i]
                else:
                    x[i] = (x[i] - tau * d[i] / dn[i]) / c
            taus.append(tau)
    return x, taus, lb


def run_torch(make_optimizer, data, params, groups):
    """The package's optimizer on the same problem, float64; groups as (lr, wd, indices)."""
    tensors = [nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in params]
    opt = make_optimizer([{"params": [tensors[i] for i in idx], "lr": lr, "weight_decay": wd} for lr, wd, idx in groups])
    taus = []
    for x_np, y_np in data:
        x, y = torch.tensor(x_np), torch.tensor(y_np)
        opt.zero_grad()
        loss = ((x @ tensors[0] + tensors[1] - y) ** 2).mean()
        loss.backward()
        opt.step(loss=loss)
        taus.extend(float(group["tau"]) for group in opt.param_groups)
    return [t.detach().numpy() for t in tensors], taus, float(opt.param_groups[0]["current_lb"])


def group_layouts(lr: float, wd: float):
    """One group with everything; two groups with different lr and weight decay."""
    return {
        "one-group": [(lr, wd, [0, 1])],
        "two-groups": [(lr, wd, [0]), (lr * 0.3, wd * 2.0, [1])],
    }


MOMO_GRID = list(itertools.product([False, True], [False, True], [0.0, 0.05], [0.0, 0.2], ["one-group", "two-groups"]))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("bias_correction,estimate_lb,weight_decay,lb,layout", MOMO_GRID)
def test_momo_matches_reference(bias_correction, estimate_lb, weight_decay, lb, layout, foreach):
    data, params = make_least_squares(STEPS)
    groups = group_layouts(0.7, weight_decay)[layout]
    beta = 0.9
    expected, expected_taus, expected_lb = reference_momo(data, params, groups, beta, bias_correction, estimate_lb, lb)
    got, taus, got_lb = run_torch(
        lambda g: MoMo(g, beta=beta, lb=lb, bias_correction=bias_correction, estimate_lb=estimate_lb, foreach=foreach),
        data,
        params,
        groups,
    )
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(taus, expected_taus, rtol=1e-10, atol=1e-12)
    assert got_lb == pytest.approx(expected_lb, rel=1e-10, abs=1e-12)
    # The grid must exercise both regimes of the step size: capped and Polyak.
    if layout == "one-group" and not estimate_lb and lb == 0.0:
        assert min(expected_taus) < max(expected_taus)


MOMO_ADAM_GRID = list(itertools.product([False, True], [0.0, 0.05], [0.0, 0.2], [False, True], ["one-group", "two-groups"]))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("estimate_lb,weight_decay,lb,decoupled,layout", MOMO_ADAM_GRID)
def test_momo_adam_matches_reference(estimate_lb, weight_decay, lb, decoupled, layout, foreach):
    data, params = make_least_squares(STEPS, seed=1)
    groups = group_layouts(0.05, weight_decay)[layout]
    betas, eps = (0.9, 0.999), 1e-8
    expected, expected_taus, expected_lb = reference_momo_adam(data, params, groups, betas, eps, estimate_lb, lb, decoupled)
    got, taus, got_lb = run_torch(
        lambda g: MoMoAdam(
            g, betas=betas, eps=eps, lb=lb, estimate_lb=estimate_lb, decoupled_weight_decay=decoupled, foreach=foreach
        ),
        data,
        params,
        groups,
    )
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(taus, expected_taus, rtol=1e-10, atol=1e-12)
    assert got_lb == pytest.approx(expected_lb, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("lr", [1e-3, 10.0], ids=["cap-binds", "polyak"])
def test_first_step_is_truncated_polyak_step(lr):
    data, params = make_least_squares(STEPS, seed=2)
    lb = 0.1
    f, g = least_squares_loss_and_grads(params, data[0])
    step = min(lr, max(f - lb, 0.0) / vdot(g, g))
    expected = [p - step * gi for p, gi in zip(params, g)]
    got, taus, _ = run_torch(lambda groups: MoMo(groups, lb=lb), data[:1], params, [(lr, 0.0, [0, 1])])
    assert taus[0] == pytest.approx(step, rel=1e-12)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
def test_binding_cap_equals_sgd_with_dampened_momentum(beta):
    """With the cap binding every step (a lower bound far below the loss), MoMo is
    ``SGD(momentum=beta, dampening=beta)``."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    momo = MoMo(models[0].parameters(), lr=0.05, beta=beta, lb=-1e6)
    sgd = torch.optim.SGD(models[1].parameters(), lr=0.05, momentum=beta, dampening=beta)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
        y = torch.randn(8, 1, generator=gen, dtype=torch.float64)
        for model, opt in zip(models, (momo, sgd)):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step(loss=loss) if opt is momo else opt.step()
        assert float(momo.param_groups[0]["tau"]) == 0.05
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_beta_must_be_shared_by_groups():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="beta"):
        MoMo([{"params": [a]}, {"params": [b], "beta": 0.5}])
    with pytest.raises(ValueError, match="betas"):
        MoMoAdam([{"params": [a]}, {"params": [b], "betas": (0.5, 0.9)}])


def test_one_device_to_host_read_per_step(monkeypatch):
    """On accelerators (simulated: scalars kept as tensors) a step reads the device once."""
    monkeypatch.setattr(MoMo, "host_scalars_on_cpu", False)
    reads = 0
    original = torch.Tensor.tolist

    def counting_tolist(self):
        nonlocal reads
        reads += 1
        return original(self)

    model = nn.Linear(3, 1)
    opt = MoMo(model.parameters(), estimate_lb=True)
    loss = model(torch.randn(4, 3)).pow(2).mean()
    loss.backward()
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() called during step"))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: pytest.fail("float() called during step"))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("bool() called during step"))
    opt.step(loss=loss)
    assert reads == 1


def test_step_size_rule_on_floats():
    """The pure rule (docs/algorithms.md §1 step 5) on plain floats: Polyak, cap, N = 0, lower-bound reset."""
    common = dict(weight_decay=0.0, gamma=0.0, d_dot_x=0.0, rho=1.0, lb_floor=0.0, estimate_lb=False)
    assert momo_step_size(lr=10.0, loss_avg=2.0, d_sqnorm=4.0, lb=0.0, **common) == (0.5, 0.0)
    assert momo_step_size(lr=0.1, loss_avg=2.0, d_sqnorm=4.0, lb=0.0, **common) == (0.1, 0.0)
    assert momo_step_size(lr=10.0, loss_avg=2.0, d_sqnorm=0.0, lb=0.0, **common) == (0.0, 0.0)
    assert momo_step_size(lr=10.0, loss_avg=1.0, d_sqnorm=4.0, lb=3.0, **common) == (0.0, 3.0)  # [·]₊
    # c = 1 + lr·wd and ρ enter as written: τ = min(lr/ρ, [c(f̄ − ρ·lb) + D − cγ]₊ / N)
    tau, _ = momo_step_size(
        lr=2.0, weight_decay=0.5, loss_avg=3.0, gamma=1.0, d_dot_x=0.5, d_sqnorm=10.0, rho=0.5, lb=1.0,
        lb_floor=0.0, estimate_lb=False,
    )
    assert tau == pytest.approx((2.0 * (3.0 - 0.5) + 0.5 - 2.0) / 10.0, rel=1e-15)
    # estimate_lb: a bound above the model's value is reset to half of it, then re-estimated
    estimate = dict(common, estimate_lb=True)
    tau, lb = momo_step_size(lr=10.0, loss_avg=1.0, d_sqnorm=4.0, lb=3.0, **estimate)
    assert tau == pytest.approx(0.5 / 4.0) and lb == pytest.approx(1.0 - 0.5 * tau * 4.0)
    # floats and 0-d tensors give the same numbers
    as_tensor = momo_step_size(lr=10.0, loss_avg=1.0, d_sqnorm=torch.tensor(4.0, dtype=torch.float64),
                               lb=torch.tensor(3.0, dtype=torch.float64), **estimate)
    assert (float(as_tensor[0]), float(as_tensor[1])) == (tau, lb)


def test_loss_model_starts_at_the_first_values_or_at_zero():
    assert momo_loss_model(5.0, 7.0, 2.0, 4.0, 0.9, restart=True) == (2.0, 4.0)
    f, g = momo_loss_model(5.0, 7.0, 2.0, 4.0, 0.9, restart=False)
    assert f == 0.9 * 5.0 + (1 - 0.9) * 2.0 and g == 0.9 * 7.0 + (1 - 0.9) * 4.0


def _trained(cls, estimate_lb: bool, steps: int = 3):
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    opt = cls(model.parameters(), estimate_lb=estimate_lb, lb=0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(torch.randn(6, 3, dtype=torch.float64)) - 1.0).pow(2).mean()
        loss.backward()
        opt.step(loss=loss)
    return model, opt


@pytest.mark.parametrize("on_device", [False, True], ids=["float-bound", "tensor-bound"])
@pytest.mark.parametrize("estimate_lb", [False, True])
@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_set_lower_bound_sets_option_and_bound_in_use(cls, estimate_lb, on_device):
    """``set_lower_bound`` (the LowerBoundOptimizer protocol): every group's ``lb`` and the bound in use,
    raised to at least ``lb`` when it is estimated online, replaced otherwise."""
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = cls([{"params": [a]}, {"params": [b], "lr": 0.5}], estimate_lb=estimate_lb)
    assert isinstance(opt, LowerBoundOptimizer)
    opt.set_lower_bound(0.3)  # before the first step: the bound in use is `lb`
    assert [g["lb"] for g in opt.param_groups] == [0.3, 0.3]
    assert all(g["current_lb"] is None for g in opt.param_groups)
    for current in (0.7, 0.1):
        opt._set_shared(current_lb=torch.tensor(current, dtype=torch.float64) if on_device else current)
        opt.set_lower_bound(0.5)
        assert [g["lb"] for g in opt.param_groups] == [0.5, 0.5]
        expected = max(current, 0.5) if estimate_lb else 0.5
        assert [float(g["current_lb"]) for g in opt.param_groups] == [expected, expected]
        assert all(isinstance(g["current_lb"], torch.Tensor) == on_device for g in opt.param_groups)
    with pytest.raises(ValueError, match="lb"):
        opt.set_lower_bound(float("nan"))


@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_set_lower_bound_is_used_by_the_next_step(cls):
    """After ``set_lower_bound`` the next step equals that of an optimizer built with that ``lb``."""
    model, opt = _trained(cls, estimate_lb=False)
    twin_model, twin = _trained(cls, estimate_lb=False)
    state = twin.state_dict()
    for group in state["param_groups"]:
        group["lb"] = group["current_lb"] = 0.25
    twin.load_state_dict(state)
    opt.set_lower_bound(0.25)
    _step_both_on_one_batch((model, opt), (twin_model, twin))
    assert opt.param_groups[0]["lower_bound"] == 0.25
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def _step_both_on_one_batch(*pairs: tuple[nn.Module, torch.optim.Optimizer]) -> None:
    """One step of each (model, optimizer) on the same random batch (drawn once)."""
    x = torch.randn(6, 3, dtype=torch.float64)
    for m, o in pairs:
        o.zero_grad()
        loss = (m(x) - 1.0).pow(2).mean()
        loss.backward()
        o.step(loss=loss)


@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_state_initialization_step_creates_state_without_moving(cls):
    """torch.distributed.checkpoint's initialization (zero grads, every lr = 0, no loss) creates the
    per-parameter state and leaves the parameters where they are."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    opt = cls([{"params": model[0].parameters()}, {"params": model[1].parameters(), "weight_decay": 0.1}])
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    keys = {"grad_avg"} if cls is MoMo else {"grad_avg", "grad_avg_sq"}
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
        assert set(opt.state[p]) == keys
        assert all(not bool(t.any()) for t in opt.state[p].values())


@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_distributed_checkpoint_state_dict_round_trip(cls):
    """get/set_optimizer_state_dict (what Lightning's sharded checkpoints use) resume bit for bit."""
    import copy

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model, opt = _trained(cls, estimate_lb=True)
    saved = get_optimizer_state_dict(model, opt)
    twin_model = copy.deepcopy(model)
    twin = cls(twin_model.parameters(), estimate_lb=True, lb=0.0)
    set_optimizer_state_dict(twin_model, twin, copy.deepcopy(saved))
    assert twin.param_groups[0]["step"] == 3
    _step_both_on_one_batch((model, opt), (twin_model, twin))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [MoMo, MoMoAdam])
def test_release_0_1_bound_in_use_loads_as_current_lb(cls):
    """``state["global"]["lb"]`` of release 0.1 was the bound in use: it becomes ``current_lb``, not the floor."""
    model, opt = _trained(cls, estimate_lb=True)
    state = opt.state_dict()
    groups = [{k: v for k, v in g.items() if k not in cls.group_state} for g in state["param_groups"]]
    old_global = {"step": 3, "skipped_steps": 0, "lb": 0.42, "loss_avg": 1.5, "gamma": 2.5}
    legacy = {"state": {**state["state"], "global": old_global}, "param_groups": groups}
    twin = cls(nn.Linear(3, 1).double().parameters(), estimate_lb=True, lb=0.0)
    twin.load_state_dict(legacy)
    group = twin.param_groups[0]
    assert group["lb"] == 0.0 and group["current_lb"] == 0.42
    assert (group["step"], group["skipped_steps"], group["loss_avg"], group["gamma"]) == (3, 0, 1.5, 2.5)
    assert all(isinstance(p, torch.Tensor) for p in twin.state)
