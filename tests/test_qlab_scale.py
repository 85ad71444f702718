"""QLAB on adaptive bases keeps the base's scale: ``max_lr_scale`` (docs/algorithms.md §2.5).

On Adam the plain rule lets the fitted rate double every step up to ``max_lr``; the anchored rule
keeps it within ``max_lr_scale`` times the group's ``lr`` (the user's or the scheduler's rate, which
QLAB then never writes).  Checked against an independent float64 loop of the rule, on a problem
where the plain rule runs away, under schedulers, through state dicts (also ones saved before the
option existed), and for its validation.
"""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import least_squares_loss_and_grads, make_least_squares, vdot
from lightning_adaptive_lr import QLAB
from lightning_adaptive_lr.optim.qlab import DEFAULT_ADAPTIVE_MAX_LR_SCALE

STEPS = 40


def regression(seed: int = 0) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A small float64 MLP and fixed mini-batches of a smooth regression target."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
        batches.append((x, torch.sin(x.sum(dim=1, keepdim=True))))
    return model, batches


def train(model: nn.Module, opt: torch.optim.Optimizer, batches, scheduler=None) -> list[tuple[float, float]]:
    """Steps with loss and probe; returns (lr, effective_lr) of group 0 after each step."""
    seen = []
    for x, y in batches:

        def probe(x=x, y=y) -> torch.Tensor:
            return nn.functional.mse_loss(model(x), y)

        opt.zero_grad()
        loss = probe()
        loss.backward()
        opt.step(loss=loss, probe=probe)
        if scheduler is not None:
            scheduler.step()
        seen.append((float(opt.param_groups[0]["lr"]), float(opt.param_groups[0]["effective_lr"])))
    return seen


ADAM_LIKE = [
    lambda ps, lr: QLAB(ps, base="adam", lr=lr),
    lambda ps, lr: QLAB(ps, base="adamw", lr=lr),
    lambda ps, lr: QLAB.wrap(torch.optim.Adam(ps, lr=lr)),
    lambda ps, lr: QLAB.wrap(torch.optim.AdamW(ps, lr=lr)),
    lambda ps, lr: QLAB.wrap(torch.optim.RAdam(ps, lr=lr)),
]
ADAM_IDS = ["adam", "adamw", "wrap-Adam", "wrap-AdamW", "wrap-RAdam"]


# ---------------------------------------------------------------------------------------------
# The rate stays within the bound where the plain rule runs away.


def test_the_plain_rule_runs_away_on_this_problem() -> None:
    """The problem the bound is tested on: the plain rule's rate leaves Adam's scale."""
    model, batches = regression()
    seen = train(model, QLAB(model.parameters(), base="adam", lr=1e-3, max_lr_scale=None), batches)
    assert max(rate for _, rate in seen) > 100 * 1e-3
    assert all(lr == rate for lr, rate in seen)  # the plain rule writes its rate into lr


@pytest.mark.parametrize("make", ADAM_LIKE, ids=ADAM_IDS)
def test_default_rate_stays_within_the_scale_of_lr(make) -> None:
    model, batches = regression()
    opt = make(model.parameters(), 1e-3)
    seen = train(model, opt, batches)
    assert max(rate for _, rate in seen) <= DEFAULT_ADAPTIVE_MAX_LR_SCALE * 1e-3 * (1 + 1e-12)
    assert all(lr == 1e-3 for lr, _ in seen)  # lr is the user's: QLAB never writes it
    assert opt.param_groups[0]["max_lr_scale"] == DEFAULT_ADAPTIVE_MAX_LR_SCALE
    group = opt.param_groups[0]
    assert group["lr_scale"] == pytest.approx(group["effective_lr"] / 1e-3, rel=1e-12)


@pytest.mark.parametrize("make", ADAM_LIKE, ids=ADAM_IDS)
def test_the_fit_still_shortens_a_step_that_overshoots(make) -> None:
    """At an lr far above Adam's scale the fitted rate falls to a fraction of lr."""
    model, batches = regression()
    seen = train(model, make(model.parameters(), 1.0), batches)
    assert min(rate for _, rate in seen) < 0.5


@pytest.mark.parametrize("cap", [1.0, 4.0, 30.0])
def test_explicit_cap_bounds_the_rate(cap: float) -> None:
    model, batches = regression()
    seen = train(model, QLAB(model.parameters(), base="adam", lr=1e-3, max_lr_scale=cap), batches)
    assert max(rate for _, rate in seen) <= cap * 1e-3 * (1 + 1e-12)
    if cap > 1.0:  # the fit wants more on this problem: it reaches the cap
        assert max(rate for _, rate in seen) == pytest.approx(cap * 1e-3, rel=1e-12)


def test_sgd_bases_keep_the_plain_rule() -> None:
    """``"auto"`` means the plain rule on SGD, SGD-M and wrapped non-adaptive optimizers."""
    for make in (
        lambda ps: QLAB(ps, base="sgd", lr=0.05),
        lambda ps: QLAB(ps, base="sgdm", lr=0.05),
        lambda ps: QLAB.wrap(torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    ):
        model, batches = regression()
        opt = make(model.parameters())
        assert opt.param_groups[0]["max_lr_scale"] is None
        model_plain, _ = regression()
        plain = QLAB(model_plain.parameters(), base="sgd", lr=0.05, max_lr_scale=None)
        if opt.param_groups[0].get("base") == "sgd":
            a, b = train(model, opt, batches), train(model_plain, plain, batches)
            assert a == b
            for p, q in zip(model.parameters(), model_plain.parameters()):
                assert torch.equal(p, q)


def test_auto_with_another_wrapped_optimizer_is_the_plain_rule() -> None:
    class Mine(torch.optim.SGD):
        pass

    model, _ = regression()
    assert QLAB.wrap(Mine(model.parameters(), lr=0.1))._shared("max_lr_scale") is None
    assert QLAB.wrap(Mine(model.parameters(), lr=0.1), max_lr_scale=3)._shared("max_lr_scale") == 3.0


# ---------------------------------------------------------------------------------------------
# An independent float64 loop of the anchored rule (docs/algorithms.md §2.5).


def reference_anchored(data, start, groups, cap, min_lr, max_lr, min_trial_lr, max_growth, betas=(0.9, 0.99)):
    """Adam base; ``groups``: list of (lr, indices).  Each group keeps its own multiplier s."""
    beta1, beta2 = betas
    x = [p.copy() for p in start]
    m = [np.zeros_like(p) for p in x]
    v = [np.zeros_like(p) for p in x]
    scales = [1.0 for _ in groups]
    history, events = [], {"floor": 0, "cap": 0}
    for k, batch in enumerate(data, start=1):
        f, g = least_squares_loss_and_grads(x, batch)
        delta, trials = [None] * len(x), []
        for j, (anchor, indices) in enumerate(groups):
            eta = max(anchor * scales[j], min(min_trial_lr, anchor))
            events["floor"] += eta > anchor * scales[j]
            trials.append(eta)
            for i in indices:
                m[i] = beta1 * m[i] + (1 - beta1) * g[i]
                v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
                d = (m[i] / (1 - beta1**k)) / (np.sqrt(v[i] / (1 - beta2**k)) + 1e-8)
                delta[i] = -eta * d
        f_trial, _ = least_squares_loss_and_grads([a + b for a, b in zip(x, delta)], batch)
        a1 = vdot(g, delta)
        a2 = f_trial - f - a1
        t = -a1 / (2 * a2) if (a1 < 0 and a2 > 0) else 1.0
        rates = []
        for j, (anchor, indices) in enumerate(groups):
            upper = min(max_lr, cap * anchor)
            proposed = min(t, max_growth) * trials[j]
            events["cap"] += proposed > upper
            new = min(max(proposed, min_lr), upper)
            for i in indices:
                x[i] = x[i] + (new / trials[j]) * delta[i]
            scales[j] = new / anchor
            rates.append(new)
        history.append(rates)
    return x, history, events


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_float64_reference_of_the_anchored_rule(foreach: bool) -> None:
    data, start = make_least_squares(30, seed=7)
    options = {"min_lr": 1e-6, "max_lr": 0.5, "min_trial_lr": 0.01, "max_growth": 2.0}
    groups = [(0.02, [0]), (0.004, [1])]  # the second group's lr is below min_trial_lr
    cap = 2.5
    expected, history, events = reference_anchored(data, start, groups, cap, **options)
    w, c = (nn.Parameter(torch.tensor(p)) for p in start)
    opt = QLAB(
        [{"params": [w], "lr": 0.02}, {"params": [c], "lr": 0.004}],
        base="adam",
        betas=(0.9, 0.99),
        max_lr_scale=cap,
        foreach=foreach,
        **options,
    )
    for (x, y), rates in zip(data, history):
        x, y = torch.tensor(x), torch.tensor(y)

        def loss_now() -> torch.Tensor:
            return ((x @ w + c - y) ** 2).mean()

        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step(loss=loss, probe=loss_now)
        for group, rate, (anchor, _) in zip(opt.param_groups, rates, groups):
            assert group["effective_lr"] == pytest.approx(rate, rel=1e-10)
            assert group["lr"] == anchor
            assert group["lr_scale"] == pytest.approx(rate / anchor, rel=1e-10)
    for p, e in zip((w, c), expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-10, atol=1e-12)
    assert events["cap"] > 0  # the run exercises the cap


def test_no_floor_warning_for_an_anchor_below_the_trial_floor() -> None:
    """Anchored, the floor never lifts a trial above lr: an Adam lr of 1e-4 is not warned about."""
    import warnings

    model, batches = regression()
    opt = QLAB(model.parameters(), base="adam", lr=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        seen = train(model, opt, batches[:5])
    assert all(rate <= 1e-4 * DEFAULT_ADAPTIVE_MAX_LR_SCALE * (1 + 1e-12) for _, rate in seen)


# ---------------------------------------------------------------------------------------------
# Schedulers act on the anchor.


def test_chainable_scheduler_moves_the_anchor_without_compounding() -> None:
    model, batches = regression()
    opt = QLAB(model.parameters(), base="adam", lr=1e-2, max_lr_scale=4.0)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    seen = train(model, opt, batches, scheduler)
    for k, (lr, rate) in enumerate(seen, start=1):
        assert lr == pytest.approx(1e-2 * 0.9**k, rel=1e-12)  # exactly the schedule, never the fit
    # The rate of step k is bounded by the anchor in force during that step (0.9^(k-1)·lr).
    for k, (_, rate) in enumerate(seen):
        assert rate <= 4.0 * 1e-2 * 0.9**k * (1 + 1e-12)


def test_absolute_scheduler_sets_the_anchor() -> None:
    model, batches = regression()
    opt = QLAB(model.parameters(), base="adam", lr=1e-2, max_lr_scale=2.0)
    factor = lambda k: 1.0 if k < 10 else 0.1  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    seen = train(model, opt, batches, scheduler)
    for k, (_, rate) in enumerate(seen):
        assert rate <= 2.0 * 1e-2 * factor(k) * (1 + 1e-12)
    assert seen[-1][0] == pytest.approx(1e-3, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# State dicts.


@pytest.mark.parametrize("wrapped", [False, True], ids=["builtin", "wrap"])
def test_resume_keeps_the_multiplier(wrapped: bool) -> None:
    def make(ps):
        return QLAB.wrap(torch.optim.Adam(ps, lr=1e-2), max_lr_scale=4.0) if wrapped else QLAB(
            ps, base="adam", lr=1e-2, max_lr_scale=4.0
        )

    model, batches = regression()
    opt = make(model.parameters())
    train(model, opt, batches[:15])
    scale = opt.param_groups[0]["lr_scale"]
    assert scale != 1.0
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, batches[15:])
    finished = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["param_groups"][0]["lr_scale"] == scale
    model2, _ = regression()
    model2.load_state_dict(saved["model"])
    opt2 = make(model2.parameters())
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr_scale"] == scale
    train(model2, opt2, batches[15:])
    for a, b in zip(finished, model2.parameters()):
        assert torch.equal(a, b)


def test_state_dict_from_before_the_option_continues_as_it_was_saved() -> None:
    """A state dict saved before ``max_lr_scale`` existed holds a fitted rate in lr: it continues
    under the plain rule whatever the loading optimizer's option, as the code that saved it would."""
    model, batches = regression()
    old = QLAB(model.parameters(), base="adam", lr=1e-2, max_lr_scale=None)
    train(model, old, batches[:10])
    state = copy.deepcopy(old.state_dict())
    for group in state["param_groups"]:
        del group["max_lr_scale"]
    fitted = state["param_groups"][0]["lr"]
    at_save = copy.deepcopy(model)
    uninterrupted = train(model, old, batches[10:])

    for cap in (None, "auto", 4.0):
        work = copy.deepcopy(at_save)
        opt = QLAB(work.parameters(), base="adam", lr=1e-2, max_lr_scale=cap)
        opt.load_state_dict(copy.deepcopy(state))
        assert opt.param_groups[0]["lr"] == fitted and opt.param_groups[0]["max_lr_scale"] is None
        assert train(work, opt, batches[10:]) == uninterrupted
        for p, q in zip(work.parameters(), model.parameters()):
            assert torch.equal(p, q)

    # Anchoring after the load: the saved lr becomes the anchor, the multiplier starts at 1.
    work = copy.deepcopy(at_save)
    opt = QLAB(work.parameters(), base="adam", lr=1e-2)
    opt.load_state_dict(copy.deepcopy(state))
    opt.param_groups[0]["max_lr_scale"] = 1.0
    seen = train(work, opt, batches[10:])
    assert all(lr == fitted for lr, _ in seen)
    assert max(rate for _, rate in seen) <= fitted * (1 + 1e-12)
    assert seen[0][1] != uninterrupted[0][1]


def test_plain_rule_state_dict_has_no_multiplier() -> None:
    model, batches = regression()
    opt = QLAB(model.parameters(), base="sgd", lr=0.05)
    train(model, opt, batches[:3])
    assert "lr_scale" not in opt.state_dict()["param_groups"][0]


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("bad", [0.5, 0.0, -1.0, math.nan, "always", True, [2.0]])
def test_bad_max_lr_scale(bad) -> None:
    model, _ = regression()
    with pytest.raises(ValueError, match="max_lr_scale"):
        QLAB(model.parameters(), base="adam", max_lr_scale=bad)
    with pytest.raises(ValueError, match="max_lr_scale"):
        QLAB.wrap(torch.optim.Adam(model.parameters()), max_lr_scale=bad)
    with pytest.raises(ValueError, match="max_lr_scale"):
        QLAB([{"params": list(model.parameters()), "max_lr_scale": bad}], base="adam")


@pytest.mark.parametrize("good", [1, 1.0, 10.0, math.inf, None, "auto"])
def test_good_max_lr_scale(good) -> None:
    model, batches = regression()
    opt = QLAB(model.parameters(), base="adam", lr=1e-3, max_lr_scale=good)
    resolved = DEFAULT_ADAPTIVE_MAX_LR_SCALE if good == "auto" else (None if good is None else float(good))
    assert opt.param_groups[0]["max_lr_scale"] == resolved
    train(model, opt, batches[:3])


def test_per_group_auto_is_resolved() -> None:
    model, _ = regression()
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = QLAB([{"params": first}, {"params": second, "max_lr_scale": "auto"}], base="adam", max_lr_scale=3.0)
    assert [g["max_lr_scale"] for g in opt.param_groups] == [3.0, DEFAULT_ADAPTIVE_MAX_LR_SCALE]
