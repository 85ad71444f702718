"""The device-side step (``capturable=True``): nothing read to the host, the default path's numbers.

A ``capturable`` step must be able to run inside a CUDA graph, so it may not read a tensor to the
host: no ``.item()``, ``.tolist()``, ``float()``, ``bool()`` (an ``if`` on a tensor), ``int()`` or
``.numpy()``.  These tests count such reads with a ``TorchFunctionMode`` on the CPU, and check that
the capturable path takes the default path's steps (to float32 rounding), skips the same steps and
leaves them bit for bit untouched, and reports skips through ``sync_warnings()``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import lightning_adaptive_lr as lalr

#: Tensor methods that hand a value to Python: each is a device-to-host read (a stall on a GPU).
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__format__", "__complex__"}


class CountHostReads(TorchFunctionMode):
    """Record every :data:`HOST_READS` call made inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") in HOST_READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_every_kind_of_read() -> None:
    t = torch.tensor(1.5)
    with CountHostReads() as counter:
        float(t), t.item(), t.tolist(), int(t), f"{t}"
        if t > 0:
            pass
    assert counter.reads == ["__float__", "item", "tolist", "__int__", "__format__", "__bool__"]


SETTINGS = [
    pytest.param(lalr.MoMo, {}, id="MoMo"),
    pytest.param(lalr.MoMo, {"bias_correction": True, "weight_decay": 0.1, "lr": 0.5}, id="MoMo-bc-wd"),
    pytest.param(lalr.MoMo, {"lb": None}, id="MoMo-lb-None"),
    pytest.param(lalr.MoMo, {"estimate_lb": True}, id="MoMo-estimate-lb"),
    pytest.param(lalr.MoMo, {"lb": 0.6}, id="MoMo-lb-above-the-losses"),
    pytest.param(lalr.MoMoAdam, {}, id="MoMoAdam"),
    pytest.param(lalr.MoMoAdam, {"lb": None, "lr": 0.1}, id="MoMoAdam-lb-None"),
    pytest.param(lalr.MoMoAdam, {"estimate_lb": True, "weight_decay": 0.1}, id="MoMoAdam-estimate-lb-wd"),
    pytest.param(lalr.MoMoAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}, id="MoMoAdam-decoupled"),
]

#: Steps at which the gradient (5), the loss (9) or a huge gradient (13: finite, but ‖d‖² overflows)
#: makes the step skipped.
BAD = {5: "grad", 9: "loss", 13: "overflow"}


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(dtype)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two param groups with different caps: the per-group step sizes are exercised."""
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.3}]


def _train(cls: type, kwargs: dict[str, Any], capturable: bool, steps: int = 20, dtype=torch.float32):
    model = _model(dtype)
    opt = cls(_groups(model), **kwargs, capturable=capturable)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 5, generator=gen).to(dtype), torch.randn(64, 1, generator=gen).to(dtype)
    reads, snapshots = [], {}
    for k in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
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
            opt.step(loss=loss)
        reads += counter.reads
        if bad:
            snapshots[k] = before, [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()["state"])
    return model, opt, reads, snapshots


def assert_skipped_steps_untouched(snapshots: dict) -> None:
    """A skipped step left the parameters and the state bit for bit as they were."""
    for k, (before, params_after, state_after) in snapshots.items():
        for x, y in zip(before[0], params_after):
            assert torch.equal(x, y), k
        for index, entry in before[1].items():
            for key, value in entry.items():
                assert torch.equal(state_after[index][key], value), (k, key)


@pytest.mark.parametrize(("cls", "kwargs"), SETTINGS)
def test_a_capturable_step_reads_nothing_to_the_host(cls: type, kwargs: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        *_, default_reads, _ = _train(cls, kwargs, capturable=False)
        *_, reads, _ = _train(cls, kwargs, capturable=True)
    assert default_reads  # the counter does see the default path's gate
    assert reads == []


@pytest.mark.parametrize(("cls", "kwargs"), SETTINGS)
def test_a_capturable_step_takes_the_default_paths_steps_and_skips(cls: type, kwargs: dict[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model_a, opt_a, _, _ = _train(cls, kwargs, capturable=False)
        model_b, opt_b, _, snapshots = _train(cls, kwargs, capturable=True)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    for p_a, p_b in zip(model_a.parameters(), model_b.parameters()):
        for key, value in opt_a.state[p_a].items():
            torch.testing.assert_close(opt_b.state[p_b][key], value, rtol=2e-5, atol=1e-7)
    for key in ("step", "skipped_steps", "consecutive_skips", "lb_lowered"):
        assert int(opt_b.param_groups[0][key]) == opt_a.param_groups[0][key], key
    assert opt_a.param_groups[0]["skipped_steps"] == len(BAD)
    for key in ("loss_avg", "gamma", "loss_min", "current_lb"):
        a, b = opt_a.param_groups[0][key], opt_b.param_groups[0][key]
        assert (a is None) == (b is None), key
        if a is not None:
            assert float(b) == pytest.approx(a, rel=1e-5, abs=1e-9), key
    for group_a, group_b in zip(opt_a.param_groups, opt_b.param_groups):
        assert float(group_b["effective_lr"]) == pytest.approx(group_a["effective_lr"], rel=1e-5)
    assert_skipped_steps_untouched(snapshots)


def test_sync_warnings_names_the_cause_and_raises_after_the_limit() -> None:
    model = _model()
    opt = lalr.MoMoAdam(model.parameters(), capturable=True, max_consecutive_skips=4)
    x, y = torch.randn(8, 5), torch.randn(8, 1)

    def step(loss_factor: float = 1.0) -> None:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss=loss * loss_factor)

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


def test_sync_warnings_tells_of_a_lowered_bound() -> None:
    """A loss below ``lb``: the bound is lowered on the device, and sync_warnings says so once."""
    model = _model()
    opt = lalr.MoMo(model.parameters(), capturable=True, lb=5.0)
    x, y = torch.randn(8, 5), torch.randn(8, 1)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step(loss=loss)
    assert int(opt.param_groups[0]["lb_lowered"]) == 1
    assert float(opt.param_groups[0]["lb"]) == pytest.approx(2 * loss.item() - 5.0)
    with pytest.warns(RuntimeWarning, match="lb is lowered to"):
        opt.sync_warnings()


def test_the_non_capturable_optimizers_sync_nothing() -> None:
    model = _model()
    opt = lalr.MoMo(model.parameters())
    with CountHostReads() as counter, warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.sync_warnings()
    assert counter.reads == []


@pytest.mark.parametrize("cls", [lalr.MoMo, lalr.MoMoAdam])
def test_state_dicts_move_between_capturable_and_default(cls: type) -> None:
    """Either way, a resumed run continues as the uninterrupted one (to float32 rounding): the
    shared numbers become tensors on the device and back.  A state dict restores the option it was
    saved with (as torch's optimizers restore ``foreach`` or ``capturable``): the path is switched
    by setting the option after loading."""
    kwargs = {"lb": None}

    def run(first: bool, second: bool, steps: int = 12, switch: int = 6) -> list[torch.Tensor]:
        model = _model()
        opt = cls(model.parameters(), capturable=first, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for k in range(steps):
            if k == switch:
                saved = copy.deepcopy(opt.state_dict())
                opt = cls(model.parameters(), capturable=second, **kwargs)
                opt.load_state_dict(saved)
                assert opt.param_groups[0]["capturable"] is first
                for group in opt.param_groups:
                    group["capturable"] = second
            x, y = torch.randn(16, 5, generator=gen), torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step(loss=loss)
        assert isinstance(opt.param_groups[0]["loss_avg"], torch.Tensor) is second
        return [p.detach().clone() for p in model.parameters()]

    reference = run(False, False)
    for first, second in ((True, False), (False, True), (True, True)):
        for a, b in zip(reference, run(first, second)):
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(("cls", "kwargs"), [SETTINGS[1], SETTINGS[2], SETTINGS[5], SETTINGS[8]])
def test_compiled_and_capturable_together(cls: type, kwargs: dict[str, Any]) -> None:
    """capturable=True with compiled=True: the compiled passes, the gate's decision on the device;
    the default path's steps and skips (skipped steps bit for bit), nothing read to the host."""
    kwargs = {**kwargs, "compiled": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model_a, opt_a, _, _ = _train(cls, kwargs, capturable=False)
        model_b, opt_b, reads, snapshots = _train(cls, kwargs, capturable=True)
    assert reads == []
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6)
    assert int(opt_b.param_groups[0]["skipped_steps"]) == opt_a.param_groups[0]["skipped_steps"] == len(BAD)
    assert int(opt_b.param_groups[0]["step"]) == opt_a.param_groups[0]["step"]
    assert_skipped_steps_untouched(snapshots)


def test_in_lightning_the_monitor_reports_a_capturable_optimizers_skips() -> None:
    """Through AdaptiveLRCallback, a batch with a NaN loss is skipped on the device; the monitor's
    logging step reads the count and warns, naming the loss."""
    from lightning_helpers import Classifier, loader, trainer

    from lightning_adaptive_lr import AdaptiveLRCallback, AdaptiveLRMonitor

    class NaNAtBatch2(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 2 else loss

    module = NaNAtBatch2(lambda params: lalr.MoMo(params, capturable=True))
    monitor = AdaptiveLRMonitor(logging_interval=1)
    with pytest.warns(RuntimeWarning, match=r"non-finite loss \(loss, .*step skipped.*1 step skipped so far"):
        trainer(max_steps=5, callbacks=[AdaptiveLRCallback(), monitor]).fit(module, loader(n=160))
    opt = module.trainer.optimizers[0]
    assert int(opt.param_groups[0]["skipped_steps"]) == 1 and int(opt.param_groups[0]["step"]) == 4


def test_a_group_added_between_steps_joins_the_shared_numbers() -> None:
    """add_param_group copies the optimizer-wide numbers into the new group; the next capturable
    step makes every group hold the same device tensors again (and reads nothing doing so)."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 3), nn.Linear(3, 1)
    opt = lalr.MoMo(first.parameters(), capturable=True)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def step() -> list[str]:
        opt.zero_grad()
        loss = nn.functional.mse_loss(second(first(x)), y)
        loss.backward()
        with CountHostReads() as counter:
            opt.step(loss=loss)
        return counter.reads

    step()
    opt.add_param_group({"params": second.parameters(), "lr": 0.5})
    assert step() == [] and step() == []
    for key in ("step", "loss_avg", "gamma", "skipped_steps"):
        assert opt.param_groups[1][key] is opt.param_groups[0][key], key
    assert int(opt.param_groups[1]["step"]) == 3
