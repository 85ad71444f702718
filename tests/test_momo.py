"""MoMo and MoMo-Adam against ALGORITHMS.md §1, computed independently in float64 NumPy loops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lightning_adaptive_lr import MoMo, MoMoAdam

STEPS = 35
N_IN, N_OUT, BATCH = 5, 3, 8


def make_problem(seed: int = 0):
    """Noisy linear least squares (its minimal loss is positive, so lower bounds matter)."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(N_IN, N_OUT))
    data = []
    for _ in range(STEPS):
        x = rng.normal(size=(BATCH, N_IN))
        y = x @ w_true + 0.3 * rng.normal(size=(BATCH, N_OUT))
        data.append((x, y))
    w0 = rng.normal(size=(N_IN, N_OUT)) * 0.5
    c0 = rng.normal(size=(N_OUT,)) * 0.5
    return data, [w0, c0]


def loss_and_grads(params, batch):
    """f = mean((xW + c − y)²) and its gradient, by hand."""
    (w, c), (x, y) = params, batch
    r = x @ w + c - y
    scale = 2.0 / r.size
    return float(np.mean(r**2)), [scale * x.T @ r, scale * r.sum(axis=0)]


def vdot(xs, ys) -> float:
    return float(sum(np.sum(a * b) for a, b in zip(xs, ys)))


def reference_momo(data, params, groups, beta, bias_correction, estimate_lb, lb_init):
    """ALGORITHMS.md §1 MoMo, literally. ``groups``: list of (lr, wd, parameter indices)."""
    x = [p.copy() for p in params]
    d = [np.zeros_like(p) for p in x]
    fbar = gamma = 0.0
    lb = lb_init
    taus = []
    for k, batch in enumerate(data, start=1):
        f, g = loss_and_grads(x, batch)
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
    """ALGORITHMS.md §1 MoMo-Adam, literally."""
    beta1, beta2 = betas
    x = [p.copy() for p in params]
    d = [np.zeros_like(p) for p in x]
    v = [np.zeros_like(p) for p in x]
    fbar = gamma = 0.0
    lb = lb_init
    taus = []
    for k, batch in enumerate(data, start=1):
        f, g = loss_and_grads(x, batch)
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
    return [t.detach().numpy() for t in tensors], taus, float(opt.state["global"]["lb"])


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
    data, params = make_problem()
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
    data, params = make_problem(seed=1)
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
    data, params = make_problem(seed=2)
    lb = 0.1
    f, g = loss_and_grads(params, data[0])
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
