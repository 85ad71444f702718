"""Every registry case in float32, bfloat16, float64 and float16.

On a small least-squares problem whose inputs have a dead column (so some gradient entries are
exactly 0, where an ``eps`` that underflows shows), for each dtype: the multi-tensor and
per-tensor paths agree within the dtype's rounding, a few steps decrease the loss, nothing is
NaN, and the state keeps the parameter's dtype (16-bit parameters may keep the state the method
documents in float32, ``OptimizerCase.float32_state``).  Release 0.1 wrote NaN into float16
parameters with every Adam-based method (``eps=1e-8`` is 0 in float16); Adam's intermediates of
16-bit tensors are now computed in float32.
"""

from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
from torch import nn

from conftest import make_least_squares
from optimizer_registry import CASES, OptimizerCase, take_step

STEPS = 8
#: Steps over which 16-bit paths are compared: a line search (QLAB) or a momentum buffer carries a
#: one-rounding difference between the paths into the fitted rate, which grows step by step.
STEPS_16BIT = 3
DEAD_FEATURE = 2
DATA, START = make_least_squares(STEPS, dead_feature=DEAD_FEATURE)

#: (rtol, atol) of the foreach-vs-per-tensor comparison.  For 16-bit dtypes the absolute tolerance
#: is this many units in the last place of the tensor's largest element (measured: ≤ 2.3).
TOLERANCE = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-6, 1e-7)}
ULPS_16BIT = 4.0

CASE_BY_ID = {case.id: case for case in CASES}
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
SUPPORTED = [
    pytest.param(case, dtype, id=f"{case.id}-{str(dtype).removeprefix('torch.')}")
    for case in CASES
    for dtype in DTYPES
]


def batches(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype)) for x, y in DATA]


def least_squares_model(dtype: torch.dtype) -> nn.Linear:
    model = nn.Linear(5, 3).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(START[0].T))
        model.bias.copy_(torch.tensor(START[1]))
    return model


def full_loss(model: nn.Linear) -> float:
    """The loss over every batch, in float64 at the model's (rounded) parameters."""
    w, c = (p.detach().double() for p in model.parameters())
    losses = [((torch.tensor(x) @ w.T + c - torch.tensor(y)) ** 2).mean() for x, y in DATA]
    return float(torch.stack(losses).mean())


def trajectory(case: OptimizerCase, dtype: torch.dtype, foreach: bool, steps: int):
    """``steps`` steps of ``case`` on the least-squares problem in ``dtype`` (run once per argument set)."""
    return _trajectory(case.id, dtype, foreach, steps)


@functools.cache
def _trajectory(case_id: str, dtype: torch.dtype, foreach: bool, steps: int):
    case = CASE_BY_ID[case_id]
    model = least_squares_model(dtype)
    opt = case.make(model.parameters(), foreach=foreach)
    before = full_loss(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a skipped (non-finite) step fails the test
        for batch in batches(dtype)[:steps]:
            take_step(case, opt, model, batch)
    return model, opt, before, full_loss(model)


@pytest.mark.parametrize(("case", "dtype"), SUPPORTED)
def test_foreach_matches_per_tensor(case: OptimizerCase, dtype: torch.dtype) -> None:
    steps = STEPS_16BIT if dtype.itemsize == 2 else STEPS
    fast, _, _, _ = trajectory(case, dtype, True, steps)
    plain, _, _, _ = trajectory(case, dtype, False, steps)
    for x, y in zip(fast.parameters(), plain.parameters(), strict=True):
        assert x.dtype == y.dtype == dtype
        if dtype.itemsize == 2:
            rtol, atol = 0.0, ULPS_16BIT * torch.finfo(dtype).eps * float(y.detach().abs().max())
        else:
            rtol, atol = TOLERANCE[dtype]
        torch.testing.assert_close(x.detach(), y.detach(), rtol=rtol, atol=atol)


@pytest.mark.parametrize(("case", "dtype"), SUPPORTED)
def test_a_few_steps_decrease_the_loss(case: OptimizerCase, dtype: torch.dtype) -> None:
    for foreach in (True, False):
        model, _, before, after = trajectory(case, dtype, foreach, STEPS)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        assert after < before, (foreach, before, after)


@pytest.mark.parametrize(("case", "dtype"), SUPPORTED)
def test_state_keeps_the_parameter_dtype_and_is_finite(case: OptimizerCase, dtype: torch.dtype) -> None:
    model, opt, _, _ = trajectory(case, dtype, True, STEPS)
    wide = torch.promote_types(dtype, torch.float32)
    for p in model.parameters():
        assert p.dtype == dtype
        for name, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all(), name
                if value.is_floating_point() and value.dim() > 0:
                    expected = wide if name in case.float32_state else dtype
                    assert value.dtype == expected, (name, value.dtype)
            elif isinstance(value, float):
                assert math.isfinite(value), name
    for group in opt.param_groups:
        for name in getattr(opt, "group_state", {}):
            values = group[name] if isinstance(group[name], (tuple, list)) else (group[name],)
            # None: a value not in use (MoMo's loss_min with a numeric lb)
            assert all(math.isfinite(float(v)) for v in values if v is not None), name
