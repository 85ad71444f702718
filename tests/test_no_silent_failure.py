"""Issue 13, the parts that live in the shared base: no input outside a method's assumptions
passes silently.

* **Skipping is never quiet**: a warning at the 1st, 10th, 100th, ... skipped step, each saying how
  many and why; ``max_consecutive_skips`` raises with a diagnosis after that many skips in a row;
  :class:`~lightning_adaptive_lr.AdaptiveLRMonitor` logs ``skipped_steps``.
* **Another optimizer's state dict** is refused at load time, naming both classes (also for
  state dicts saved before the class was recorded in them).
* **Argument types**: numbers of any numeric type (Python, numpy, 0-d tensors) are accepted where
  torch.optim accepts them, bools are not; a loss that is not a number is refused naming ``loss``;
  ``lr=0`` is accepted by every optimizer.
* **Complex parameters** follow exactly the trajectory of the same problem written as real pairs
  (``torch.view_as_real``), as torch.optim does, and resume bit for bit.
* **16-bit intermediates**: Adam's denominators, preconditioners and directions of 16-bit tensors
  are computed in float32 (``eps = 1e-8`` is 0 in float16), float32/float64 results unchanged.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from optimizer_registry import CASE_IDS, CASES, OptimizerCase, take_step
from torch import nn

import lightning_adaptive_lr as lalr
from lightning_adaptive_lr import AdaptiveLRMonitor
from lightning_adaptive_lr.optim._base import (
    DEFAULT_MAX_CONSECUTIVE_SKIPS,
    AdaptiveOptimizer,
)
from lightning_adaptive_lr.optim._directions import (
    adam_denominators,
    adam_directions,
    adam_preconditioners,
    adam_step_,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=CASES, ids=CASE_IDS)
def case(request: pytest.FixtureRequest) -> OptimizerCase:
    return request.param


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)


def stream(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(seed + i) for i in range(n)]


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def step_kwargs(case: OptimizerCase, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"loss": loss}
    if case.needs_probe:
        kwargs["probe"] = lambda: nn.functional.mse_loss(model(x), y)
    return kwargs


def bad_step(case: OptimizerCase, opt: torch.optim.Optimizer, model: nn.Module, where: str = "grad") -> None:
    """One step whose gradient (``where="grad"``) or loss (``"loss"``) is NaN: skipped."""
    x, y = batch()
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    if where == "grad":
        next(iter(model.parameters())).grad.fill_(float("nan"))
    else:
        loss = loss * float("nan")
    opt.step(**step_kwargs(case, model, x, y, loss))
    opt.sync_warnings()  # where a capturable optimizer reports (a no-op for the others)


def shared(opt: torch.optim.Optimizer, key: str) -> Any:
    values = [group[key] for group in opt.param_groups]
    assert all(v == values[0] for v in values), (key, values)
    return values[0]


def set_limit(opt: torch.optim.Optimizer, limit: int | None) -> None:
    for group in opt.param_groups:
        group["max_consecutive_skips"] = limit


# ---------------------------------------------------------------------------------------------
# Skipping is never quiet.


def test_skip_warnings_at_1_10_100_say_how_many_and_why(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    set_limit(opt, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(100):
            bad_step(case, opt, model)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 3, messages
    for count, message in zip((1, 10, 100), messages):
        assert f"{count} step" in message and "gradient" in message, message
        assert f"{count} in a row" in message, message
    assert shared(opt, "skipped_steps") == 100
    assert shared(opt, "consecutive_skips") == 100


def test_a_non_finite_loss_is_named_as_the_cause(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bad_step(case, opt, model, where="loss")
    (message,) = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert "loss" in message and "1 step" in message, message


@pytest.mark.parametrize("where", ["grad", "loss"])
def test_max_consecutive_skips_raises_with_a_diagnosis(case: OptimizerCase, where: str) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    set_limit(opt, 5)
    start = params_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(4):
            bad_step(case, opt, model, where)
        with pytest.raises(RuntimeError) as raised:
            bad_step(case, opt, model, where)
    message = str(raised.value)
    assert "5" in message and "in a row" in message and "max_consecutive_skips" in message, message
    assert ("loss" if where == "loss" else "gradient") in message, message
    for advice in ("lr", "clip", "precision"):
        assert advice in message, (advice, message)
    for p, p0 in zip(model.parameters(), start):
        assert torch.equal(p, p0)


def test_a_step_taken_resets_the_run_of_skips(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    set_limit(opt, 5)
    data = stream(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for good in data[:2]:
            for _ in range(4):
                bad_step(case, opt, model)
            assert shared(opt, "consecutive_skips") == 4
            for _ in range(2):  # Step-Tuned SGD: a whole iteration (two half-steps)
                take_step(case, opt, model, good)
            assert shared(opt, "consecutive_skips") == 0
    assert shared(opt, "skipped_steps") == 8


def test_max_consecutive_skips_none_never_raises(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    set_limit(opt, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(DEFAULT_MAX_CONSECUTIVE_SKIPS + 1):
            bad_step(case, opt, model)
    assert shared(opt, "skipped_steps") == DEFAULT_MAX_CONSECUTIVE_SKIPS + 1


def test_the_default_limit_raises(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    assert shared(opt, "max_consecutive_skips") == DEFAULT_MAX_CONSECUTIVE_SKIPS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(DEFAULT_MAX_CONSECUTIVE_SKIPS - 1):
            bad_step(case, opt, model)
        with pytest.raises(RuntimeError, match="in a row"):
            bad_step(case, opt, model)


def test_the_run_of_skips_is_state_and_resumes(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    set_limit(opt, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            bad_step(case, opt, model)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        resumed = case.make(model.parameters())
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert shared(resumed, "consecutive_skips") == 3 and shared(resumed, "max_consecutive_skips") == 4
        with pytest.raises(RuntimeError, match="4 .*in a row"):
            bad_step(case, resumed, model)


class _Minimal(AdaptiveOptimizer):
    """The smallest optimizer on the base: SGD whose gate reads the loss and ‖g‖²."""

    def __init__(self, params: Any, lr: float = 0.1, **kwargs: Any) -> None:
        super().__init__(params, {"lr": lr}, **kwargs)

    def _update(self, loss: torch.Tensor | None) -> None:
        from lightning_adaptive_lr.optim._reduce import sqnorm

        params, grads = [], []
        for group in self.param_groups:
            ps, gs = self._params_and_grads(group)
            params += ps
            grads += gs
        assert loss is not None
        if self._gate(loss=loss, gradient_sqnorm=sqnorm(grads, loss.device)) is None:
            return
        for p, g in zip(params, grads):
            p.add_(g, alpha=-self.param_groups[0]["lr"])
        self._set_shared(step=self._shared("step") + 1)


def test_max_consecutive_skips_is_a_constructor_option_of_the_base() -> None:
    param = nn.Parameter(torch.ones(2))
    opt = _Minimal([param], max_consecutive_skips=2)
    assert opt.defaults["max_consecutive_skips"] == 2 == opt.param_groups[0]["max_consecutive_skips"]
    assert _Minimal([param], max_consecutive_skips=None).param_groups[0]["max_consecutive_skips"] is None
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="`max_consecutive_skips`"):
            _Minimal([param], max_consecutive_skips=bad)
    param.grad = torch.full((2,), float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(loss=1.0)
        with pytest.raises(RuntimeError, match="2 steps in a row"):
            opt.step(loss=1.0)


def test_every_optimizer_takes_max_consecutive_skips(case: OptimizerCase) -> None:
    """The option reaches the base from every constructor (the integrator wires the pass-through)."""
    opt = case.make([nn.Parameter(torch.ones(2))], max_consecutive_skips=7)
    assert shared(opt, "max_consecutive_skips") == 7


def test_the_monitor_logs_skipped_steps_once_per_optimizer() -> None:
    model = make_model()
    params = list(model.parameters())
    momo = lalr.MoMo([{"params": params[:2]}, {"params": params[2:]}])
    wrapped = lalr.QLAB.wrap(torch.optim.SGD(make_model(1).parameters(), lr=0.1))
    plain = torch.optim.SGD(make_model(2).parameters(), lr=0.1)
    momo_case = next(c for c in CASES if c.cls is lalr.MoMo)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(3):
            bad_step(momo_case, momo, model)
    values = AdaptiveLRMonitor().collect([momo, wrapped, plain])
    assert values["adaptive_lr/MoMo/skipped_steps"] == 3.0
    assert values["adaptive_lr/QLAB.wrap(SGD)/skipped_steps"] == 0.0
    assert not any(name.startswith("adaptive_lr/SGD/") and "skipped" in name for name in values)
    assert not any(re.search(r"group\d+/skipped_steps", name) for name in values), sorted(values)


def test_the_monitor_logs_unequal_counts_per_group() -> None:
    opt = torch.optim.SGD([{"params": [nn.Parameter(torch.ones(1))]}, {"params": [nn.Parameter(torch.ones(1))]}])
    opt.param_groups[0]["skipped_steps"], opt.param_groups[1]["skipped_steps"] = 1, 2
    values = AdaptiveLRMonitor().collect([opt])
    assert values["adaptive_lr/SGD/group0/skipped_steps"] == 1.0
    assert values["adaptive_lr/SGD/group1/skipped_steps"] == 2.0


# ---------------------------------------------------------------------------------------------
# load_state_dict: another class's state dict is refused at load time, naming both.

#: One registry case per optimizer class (its first), the six classes of the package.
FIRST_OF_CLASS = {case.cls: case for case in reversed(CASES)}
CLASS_CASES = [FIRST_OF_CLASS[cls] for cls in dict.fromkeys(case.cls for case in CASES)]
PAIRS = [
    pytest.param(saved, loaded, id=f"{saved.cls.__name__}-into-{loaded.cls.__name__}")
    for saved, loaded in itertools.permutations(CLASS_CASES, 2)
]


def stepped_state_dict(case: OptimizerCase, steps: int = 2) -> dict[str, Any]:
    model = make_model()
    opt = case.make(model.parameters())
    for data in stream(steps):
        take_step(case, opt, model, data)
    return opt.state_dict()


def without_class_name(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict as saved before the class was recorded in its groups (release 0.1 and the rebuild)."""
    out = copy.deepcopy(state_dict)
    for group in out["param_groups"]:
        group.pop("optimizer", None)
    return out


def test_there_are_thirty_ordered_pairs() -> None:
    assert len(CLASS_CASES) == 6 and len(PAIRS) == 30


@pytest.mark.parametrize(("saved", "loaded"), PAIRS)
@pytest.mark.parametrize("recorded", [True, False], ids=["class-recorded", "older-dict"])
def test_another_class_state_dict_is_refused_naming_both(saved: OptimizerCase, loaded: OptimizerCase, recorded: bool) -> None:
    state_dict = stepped_state_dict(saved)
    if not recorded:
        state_dict = without_class_name(state_dict)
    model = make_model()
    opt = loaded.make(model.parameters())
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as raised:
        opt.load_state_dict(state_dict)
    message = str(raised.value)
    assert saved.cls.__name__ in message and loaded.cls.__name__ in message, message
    after = opt.state_dict()  # nothing was loaded
    assert after["param_groups"] == before["param_groups"] and not after["state"]


@pytest.mark.parametrize("recorded", [True, False], ids=["class-recorded", "older-dict"])
def test_the_same_class_loads_and_continues(case: OptimizerCase, recorded: bool) -> None:
    state_dict = stepped_state_dict(case)
    if not recorded:
        state_dict = without_class_name(state_dict)
    model = make_model()
    opt = case.make(model.parameters())
    opt.load_state_dict(state_dict)
    assert shared(opt, "optimizer") == case.cls.__name__
    take_step(case, opt, model, batch(7))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_an_older_state_dict_without_an_option_added_since_loads(case: OptimizerCase) -> None:
    """An option the saving release did not have yet takes this optimizer's value."""
    state_dict = without_class_name(stepped_state_dict(case))
    model = make_model()
    opt = case.make(model.parameters())
    newest = max(opt._option_names() - {"lr"})
    for group in state_dict["param_groups"]:
        del group[newest], group["max_consecutive_skips"]
    set_limit(opt, 9)
    opt.load_state_dict(state_dict)
    assert shared(opt, "max_consecutive_skips") == 9
    assert shared(opt, newest) == case.make([nn.Parameter(torch.zeros(1))]).defaults[newest]
    take_step(case, opt, model, batch(7))


def test_a_torch_optimizer_state_dict_is_named() -> None:
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    nn.functional.mse_loss(model(batch()[0]), batch()[1]).backward()
    adam.step()
    with pytest.raises(ValueError, match=r"AdaL.*torch\.optim\.Adam"):
        lalr.AdaL(model.parameters()).load_state_dict(adam.state_dict())


def test_wrapped_optimizers_of_other_classes_are_refused() -> None:
    x, y = batch()
    model = make_model()
    saved = lalr.QLAB.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    nn.functional.mse_loss(model(x), y).backward()
    saved.step(loss=1.0, probe=lambda: nn.functional.mse_loss(model(x), y))
    other = lalr.QLAB.wrap(torch.optim.Adam(make_model().parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"QLAB\.wrap\(SGD\).*QLAB\.wrap\(Adam\)|QLAB\.wrap\(Adam\).*QLAB\.wrap\(SGD\)"):
        other.load_state_dict(saved.state_dict())
    same = lalr.QLAB.wrap(torch.optim.SGD(make_model().parameters(), lr=0.1))
    same.load_state_dict(saved.state_dict())
    assert same.param_groups[0]["step"] == 1


def test_unequal_shared_options_are_refused() -> None:
    """An option every group must share (MoMo's ``beta``) that differs between the saved groups."""
    model = make_model()
    params = list(model.parameters())
    opt = lalr.MoMo([{"params": params[:2]}, {"params": params[2:]}])
    state_dict = opt.state_dict()
    state_dict["param_groups"][1]["beta"] = 0.5
    with pytest.raises(ValueError, match="`beta`"):
        lalr.MoMo([{"params": params[:2]}, {"params": params[2:]}]).load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------
# Argument types.

NUMERIC_TYPES = {
    "int": int,
    "numpy-float64": np.float64,
    "numpy-float32": np.float32,
    "tensor-0d": lambda v: torch.tensor(v),
    "tensor-0d-float64": lambda v: torch.tensor(v, dtype=torch.float64),
}


def default_lr(case: OptimizerCase) -> float:
    return case.make([nn.Parameter(torch.zeros(1))]).defaults["lr"]


@pytest.mark.parametrize("kind", NUMERIC_TYPES)
def test_lr_of_any_numeric_type(case: OptimizerCase, kind: str) -> None:
    lr = 1 if kind == "int" else default_lr(case)
    value = NUMERIC_TYPES[kind](lr)
    opt = case.make(make_model().parameters(), lr=value)
    stored = opt.param_groups[0]["lr"]
    assert type(stored) is float and stored == pytest.approx(float(value), rel=1e-6)
    model = make_model()
    opt = case.make(model.parameters(), lr=value)
    take_step(case, opt, model, batch())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_every_numeric_option_of_any_numeric_type(case: OptimizerCase) -> None:
    """Every float option of the case's constructor (and every element of ``betas``), given as a
    numpy scalar or a 0-d tensor, is accepted and stored as a float."""
    reference = case.make([nn.Parameter(torch.zeros(1))])
    options = {k: v for k, v in reference.defaults.items() if type(v) is float and k in _signature(case.cls)}
    assert "lr" in options
    for convert in (np.float64, torch.tensor):
        kwargs: dict[str, Any] = {k: convert(v) for k, v in options.items()}
        if "betas" in reference.defaults:
            kwargs["betas"] = tuple(convert(b) for b in reference.defaults["betas"])
        opt = case.make([nn.Parameter(torch.zeros(1))], **kwargs)
        for name, value in options.items():
            assert type(opt.defaults[name]) is float and opt.defaults[name] == pytest.approx(value), name
        if "betas" in kwargs:
            assert all(type(b) is float for b in opt.defaults["betas"])


def _signature(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


@pytest.mark.parametrize("bad", [True, torch.tensor(True), np.bool_(True), "0.1", torch.tensor([0.1, 0.2]), None])
def test_lr_that_is_not_a_number_is_refused(case: OptimizerCase, bad: Any) -> None:
    with pytest.raises(ValueError, match="`lr`"):
        case.make([nn.Parameter(torch.zeros(1))], lr=bad)


NOT_A_LOSS = {
    "str": "0.5",
    "bool": True,
    "numpy-bool": np.bool_(True),
    "bool-tensor": torch.tensor(True),
    "complex-tensor": torch.tensor(1 + 1j),
    "object": object(),
    "list": [0.5],
}


@pytest.mark.parametrize("kind", NOT_A_LOSS)
def test_a_loss_that_is_not_a_number_is_refused(case: OptimizerCase, kind: str) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    start = params_of(model)
    x, y = batch()
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises((TypeError, ValueError), match="`loss`"):
        opt.step(**step_kwargs(case, model, x, y, NOT_A_LOSS[kind]))
    with pytest.raises((TypeError, ValueError), match="`loss`"):
        opt.set_loss(NOT_A_LOSS[kind])
    for p, p0 in zip(model.parameters(), start):
        assert torch.equal(p, p0)
    assert shared(opt, "step") == 0 and shared(opt, "skipped_steps") == 0


def test_a_closure_returning_something_else_is_named(case: OptimizerCase) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    x, y = batch()

    def closure() -> str:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        return "done"

    kwargs = {"probe": lambda: nn.functional.mse_loss(model(x), y)} if case.needs_probe else {}
    with pytest.raises(TypeError, match="closure"):
        opt.step(closure, **kwargs)


@pytest.mark.parametrize("kind", ["float", "numpy", "tensor-float64", "tensor-int"])
def test_numeric_losses_of_any_type_are_taken(case: OptimizerCase, kind: str) -> None:
    model = make_model()
    opt = case.make(model.parameters())
    x, y = batch()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    value = {
        "float": loss.item(),
        "numpy": np.float32(loss.item()),
        "tensor-float64": loss.detach().double(),
        "tensor-int": torch.tensor(1),
    }[kind]
    opt.step(**step_kwargs(case, model, x, y, value))
    assert shared(opt, "skipped_steps") == 0


def test_lr_zero_is_accepted_and_freezes(case: OptimizerCase) -> None:
    """``lr=0`` is meaningful everywhere: a frozen optimizer (as torch.optim), except QLAB, for
    which ``lr`` is only the first trial rate (the trial then uses ``min_trial_lr``)."""
    model = make_model()
    opt = case.make(model.parameters(), lr=0.0)
    start = params_of(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for data in stream(4):
            take_step(case, opt, model, data)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert shared(opt, "skipped_steps") == 0
    if not case.adapts_lr:
        for p, p0 in zip(model.parameters(), start):
            assert torch.equal(p, p0)


# ---------------------------------------------------------------------------------------------
# Complex parameters: the real view, as torch.optim.

COMPLEX_STEPS = 12


class ComplexModel(nn.Module):
    """``y = (x @ W + b)·s`` with complex ``W`` and ``b`` and a real scale ``s``.

    With ``pairs=True`` the same function with ``W`` and ``b`` held as real pairs (``(..., 2)``
    float64 parameters, the real view of the complex ones).
    """

    def __init__(self, pairs: bool, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(5, 3, dtype=torch.complex128, generator=gen) * 0.5
        b = torch.randn(3, dtype=torch.complex128, generator=gen) * 0.5
        s = 1.0 + 0.1 * torch.randn(3, dtype=torch.float64, generator=gen)
        self.pairs = pairs
        self.w = nn.Parameter(torch.view_as_real(w).clone() if pairs else w)
        self.b = nn.Parameter(torch.view_as_real(b).clone() if pairs else b)
        self.s = nn.Parameter(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.view_as_complex(self.w) if self.pairs else self.w
        b = torch.view_as_complex(self.b) if self.pairs else self.b
        return (x @ w + b) * self.s


def complex_data(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    w_true = torch.randn(5, 3, dtype=torch.complex128, generator=gen)
    out = []
    for _ in range(n):
        x = 0.5 * torch.randn(8, 5, dtype=torch.complex128, generator=gen)
        out.append((x, x @ w_true + 0.1 * torch.randn(8, 3, dtype=torch.complex128, generator=gen)))
    return out


def complex_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).abs().pow(2).mean()


def complex_step(case: OptimizerCase, opt: torch.optim.Optimizer, model: nn.Module, data: tuple) -> None:
    x, y = data
    opt.zero_grad()
    loss = complex_loss(model, x, y)
    loss.backward()
    kwargs: dict[str, Any] = {"loss": loss}
    if case.needs_probe:
        kwargs["probe"] = lambda: complex_loss(model, x, y)
    opt.step(**kwargs)


def real_view(model: ComplexModel) -> list[torch.Tensor]:
    """The parameters as real tensors (complex ones as their real pairs)."""
    return [torch.view_as_real(p.detach()).clone() if p.is_complex() else p.detach().clone() for p in model.parameters()]


def test_the_complex_problem_is_the_real_pair_problem() -> None:
    """The two models compute the same function and their gradients are real views of each other."""
    x, y = complex_data(1)[0]
    complex_model, pair_model = ComplexModel(False), ComplexModel(True)
    complex_loss(complex_model, x, y).backward()
    complex_loss(pair_model, x, y).backward()
    for p, q in zip(complex_model.parameters(), pair_model.parameters()):
        g = torch.view_as_real(p.grad) if p.is_complex() else p.grad
        torch.testing.assert_close(g, q.grad, rtol=1e-13, atol=1e-15)


def test_reductions_count_complex_tensors_as_real_pairs() -> None:
    """Every reduction of optim/_reduce.py gives for a complex tensor what it gives for its real
    pairs (release 0.1 dropped the imaginary part of ⟨z, w⟩)."""
    from lightning_adaptive_lr.optim import _reduce as r

    gen = torch.Generator().manual_seed(0)
    zs = [torch.randn(3, 2, dtype=torch.complex128, generator=gen), torch.randn((), dtype=torch.complex128, generator=gen)]
    ws = [torch.randn(3, 2, dtype=torch.complex128, generator=gen), torch.randn((), dtype=torch.complex128, generator=gen)]
    real = [torch.view_as_real(z) for z in zs]
    real_w = [torch.view_as_real(w) for w in ws]
    cpu = torch.device("cpu")
    same = torch.testing.assert_close
    same(r.dot(zs, ws, cpu), r.dot(real, real_w, cpu))
    conj_pairs = [torch.view_as_real(w.conj().resolve_conj()) for w in ws]
    same(r.dot(zs, [w.conj() for w in ws], cpu), r.dot(real, conj_pairs, cpu))  # a lazy conjugate too
    same(r.sqnorm(zs, cpu), r.sqnorm(real, cpu))
    same(r.tensor_dots(zs, [ws[0], None], cpu), r.tensor_dots(real, [real_w[0], None], cpu))
    same(r.tensor_sums(zs, cpu), r.tensor_sums(real, cpu))
    same(r.tensor_extrema(zs, cpu), r.tensor_extrema(real, cpu))
    for foreach in (True, False):
        same(r.l1_norms(zs, cpu, foreach=foreach), r.l1_norms(real, cpu, foreach=foreach))
    for z, w in zip(zs, ws):  # units along dim 0; a 0-d tensor is one unit
        units = z.shape[0] if z.dim() else 1
        expected = (torch.view_as_real(z).reshape(units, -1) * torch.view_as_real(w).reshape(units, -1)).sum(-1)
        same(r.unit_dots(z, w), expected)


def test_complex_parameters_follow_the_real_pair_trajectory(case: OptimizerCase) -> None:
    data = complex_data(COMPLEX_STEPS)
    results = []
    for pairs in (False, True):
        model = ComplexModel(pairs)
        opt = case.make(model.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for item in data:
                complex_step(case, opt, model, item)
        assert shared(opt, "skipped_steps") == 0
        results.append((real_view(model), opt))
    (complex_params, complex_opt), (pair_params, pair_opt) = results
    for a, b in zip(complex_params, pair_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert complex_params[0].sub(ComplexModel(True).w.detach()).abs().max() > 1e-3  # it moved
    # The state is the real pairs' state, keyed by the complex parameters themselves.
    complex_model_params = list(complex_opt.param_groups[0]["params"])
    for p, q in zip(complex_model_params, pair_opt.param_groups[0]["params"]):
        state, expected = complex_opt.state[p], pair_opt.state[q]
        assert state.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert state[key].dtype == value.dtype and state[key].shape == value.shape, key
                torch.testing.assert_close(state[key], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("base", ["SGD", "Adam"])
def test_qlab_wrap_of_complex_parameters_follows_the_real_pairs(base: str) -> None:
    """QLAB.wrap shares the wrapped optimizer's state (torch's own complex handling) and works on
    the real views for its fit: the same trajectory as the real pairs."""
    qlab_case = next(c for c in CASES if c.needs_probe)
    results = []
    for pairs in (False, True):
        model = ComplexModel(pairs)
        opt = lalr.QLAB.wrap(getattr(torch.optim, base)(model.parameters(), lr=0.05))
        for item in complex_data(8):
            complex_step(qlab_case, opt, model, item)
        assert opt.state is opt.base_optimizer.state
        results.append(real_view(model))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_complex_state_dict_resumes_bit_identically(case: OptimizerCase) -> None:
    data = complex_data(COMPLEX_STEPS)
    half = len(data) // 2
    model = ComplexModel(False)
    opt = case.make(model.parameters())
    for item in data[:half]:
        complex_step(case, opt, model, item)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for item in data[half:]:
        complex_step(case, opt, model, item)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = ComplexModel(False, seed=9)
    resumed_model.load_state_dict(saved["model"])
    resumed = case.make(resumed_model.parameters())
    resumed.load_state_dict(saved["opt"])
    for item in data[half:]:
        complex_step(case, resumed, resumed_model, item)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for p, q in zip(opt.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        for key, value in opt.state[p].items():
            other = resumed.state[q][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, key


def test_complex_parameters_deepcopy_and_pickle(case: OptimizerCase) -> None:
    import pickle

    data = complex_data(4)
    model = ComplexModel(False)
    opt = case.make(model.parameters())
    complex_step(case, opt, model, data[0])
    for clone in (copy.deepcopy, lambda obj: pickle.loads(pickle.dumps(obj))):
        model_copy, opt_copy = clone((model, opt))
        reference_model, reference = copy.deepcopy((model, opt))
        for item in data[1:]:
            complex_step(case, opt_copy, model_copy, item)
            complex_step(case, reference, reference_model, item)
        for a, b in zip(model_copy.parameters(), reference_model.parameters()):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# 16-bit intermediates of Adam's rules in float32.


def _v_and_m(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    v = torch.tensor([0.0, 1e-7, 4e-6, 1.0, 3e4], dtype=dtype)  # 0: a coordinate never seen
    m = torch.tensor([0.0, 3e-4, 1e-3, 0.5, 100.0], dtype=dtype)
    return [v, v[:3].clone()], [m, m[:3].clone()]


def _exact(vs: list[torch.Tensor], ms: list[torch.Tensor], root: float, eps: float) -> list[torch.Tensor]:
    return [m.double() / (v.double().sqrt() / root + eps) for m, v in zip(ms, vs)]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_adam_denominators_keep_eps(foreach: bool, dtype: torch.dtype) -> None:
    vs, ms = _v_and_m(dtype)
    root, eps = math.sqrt(1 - 0.999), 1e-8
    denominators = adam_denominators(vs, root, eps, foreach=foreach)
    assert all(d.dtype == torch.float32 for d in denominators)
    assert all(bool((d > 0).all()) for d in denominators)  # eps survives: never 0/0
    directions = adam_directions(ms, denominators, foreach=foreach)
    for u, expected in zip(directions, _exact(vs, ms, root, eps)):
        assert torch.isfinite(u).all()
        torch.testing.assert_close(u.double(), expected, rtol=1e-6, atol=0.0)
    # with `out` (a 16-bit buffer: the direction is written back in its dtype)
    out = [torch.empty_like(m) for m in ms]
    written = adam_directions(ms, denominators, foreach=foreach, out=out)
    assert all(w is o and w.dtype == dtype for w, o in zip(written, out))
    for w, u in zip(written, directions):
        assert torch.equal(w, u.to(dtype))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_adam_step_is_computed_in_float32(foreach: bool, dtype: torch.dtype) -> None:
    vs, ms = _v_and_m(dtype)
    root, eps, step = math.sqrt(1 - 0.999), 1e-8, -1e-6
    params = [torch.ones_like(m) for m in ms]
    adam_step_(params, ms, adam_denominators(vs, root, eps, foreach=foreach), step, foreach=foreach)
    for p, u in zip(params, _exact(vs, ms, root, eps)):
        assert p.dtype == dtype and torch.isfinite(p).all()
        assert torch.equal(p, (1.0 + step * u).to(dtype))  # one rounding, of the float32 result
    # the other eps placement: m·(root/√v + eps), 1/√v capped at the parameter dtype's cap
    params = [torch.ones_like(m) for m in ms]
    preconditioners = adam_preconditioners(vs, root, eps, foreach=foreach)
    assert all(q.dtype == torch.float32 and torch.isfinite(q).all() for q in preconditioners)
    adam_step_(params, ms, preconditioners, step, divide=False, foreach=foreach)
    assert all(torch.isfinite(p).all() for p in params)
    assert params[0][0] == 1.0  # m = 0, v = 0: no move


def test_float16_eps_underflow_no_longer_writes_nan() -> None:
    """The failure of release 0.1: ``√v + eps`` in float16 is 0 where ``v = 0``, and ``0/0``."""
    v = [torch.zeros(4, dtype=torch.float16)]
    m = [torch.zeros(4, dtype=torch.float16)]
    p = [torch.ones(4, dtype=torch.float16)]
    adam_step_(p, m, adam_denominators(v, 1.0, 1e-8, foreach=True), -1e-3, foreach=True)
    assert torch.equal(p[0], torch.ones(4, dtype=torch.float16))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_32_and_64_bit_results_are_torch_adams_operations(foreach: bool, dtype: torch.dtype) -> None:
    """float32/float64 stay bit for bit what torch.optim.Adam computes (√v / root + eps, addcdiv)."""
    gen = torch.Generator().manual_seed(0)
    vs = [torch.rand(7, generator=gen, dtype=dtype), torch.rand(3, 2, generator=gen, dtype=dtype)]
    ms = [torch.randn(7, generator=gen, dtype=dtype), torch.randn(3, 2, generator=gen, dtype=dtype)]
    root, eps, step = 0.3, 1e-8, -1e-3
    denominators = adam_denominators(vs, root, eps, foreach=foreach)
    for d, v in zip(denominators, vs):
        assert d.dtype == dtype and torch.equal(d, v.sqrt().div(root).add(eps))
    params = [torch.ones_like(m) for m in ms]
    adam_step_(params, ms, denominators, step, foreach=foreach)
    for p, m, d in zip(params, ms, denominators):
        assert torch.equal(p, torch.ones_like(m).addcdiv(m, d, value=step))
    for u, m, d in zip(adam_directions(ms, denominators, foreach=foreach), ms, denominators):
        assert u.dtype == dtype and torch.equal(u, m / d)


def test_classes_derived_at_run_time_do_not_disturb_the_check() -> None:
    """Lightning derives a class from every optimizer it wraps (``LightningMoMo``); the check of an
    older state dict (no class recorded) looked at such classes too and crashed in them."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    LightningOptimizer(lalr.MoMo(make_model().parameters()))
    saved = lalr.MoMo(make_model().parameters()).state_dict()
    for group in saved["param_groups"]:
        del group["optimizer"]  # as saved before the class was recorded
    for _ in range(2):  # probing such a class derives another one from it: the second check met it
        with pytest.raises(ValueError, match="MoMo"):
            lalr.AdaL(make_model().parameters()).load_state_dict(saved)
