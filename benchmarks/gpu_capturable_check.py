"""GPU check of the device-side step (``capturable=True``): no stall, a CUDA graph, the same numbers.

For every optimizer with ``capturable=True`` (MoMo, MoMo-Adam and AdaL also with ``compiled=True``: rows
``-c``; QLAB with its probe, a forward pass of the model, inside the captured step), this checks,
on one CUDA device:

1. **no host synchronization**: steps run under ``torch.cuda.set_sync_debug_mode("error")``, which
   raises on any device-to-host wait (the default path, which reads its gate once per step, is
   shown to trip it);
2. **parity**: 30 steps of a small MLP with a NaN gradient at step 5 and an infinite loss at step 9,
   ``capturable=True`` against the default path: the largest relative parameter difference and
   both skip counts;
3. **a CUDA graph**: after 3 eager warm-up steps, one ``step()`` is captured with
   ``torch.cuda.graph`` and replayed on 30 new gradients and losses (a NaN one among them), against
   the same steps taken eagerly with ``capturable=True``;
4. **time per step** on ResNet-18's parameters (11.7 M, random gradients): default, capturable,
   capturable replayed as a graph, and ``torch.optim`` fused SGD-M / Adam, by CUDA events.

Without CUDA it runs parts 2 and 4 on the CPU (what the test suite does, tiny) and says that parts 1
and 3 need a GPU.  Exits 1 if a check fails.

Run: ``python benchmarks/gpu_capturable_check.py [--steps 50]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import lightning_adaptive_lr as lalr

METHODS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "MoMo": lambda params, **kw: lalr.MoMo(params, lr=1.0, **kw),
    "MoMoAdam": lambda params, **kw: lalr.MoMoAdam(params, lr=1e-2, **kw),
    # compiled=True too: the compiled passes, the gate's decision on the device (the GPU's best path)
    "MoMo-c": lambda params, **kw: lalr.MoMo(params, lr=1.0, compiled=True, **kw),
    "MoMoAdam-c": lambda params, **kw: lalr.MoMoAdam(params, lr=1e-2, compiled=True, **kw),
    "AdaL": lambda params, **kw: lalr.AdaL(params, lr=1e-3, **kw),
    "AdaL-c": lambda params, **kw: lalr.AdaL(params, lr=1e-3, compiled=True, **kw),
    # each step() one half-step; which half is due is a device value, so one captured step does both
    "StepTuned": lambda params, **kw: lalr.StepTunedSGD(params, lr=0.1, **kw),
    "HD-adam": lambda params, **kw: lalr.HierarchicalHD(params, base="adam", lr=1e-3, **kw),
    "HD-sgdn": lambda params, **kw: lalr.HierarchicalHD(params, base="sgdn", lr=0.05, **kw),
    # QLAB's step also calls the probe (the loss at the trial point: a forward pass, in the graph too)
    "QLAB-sgdm": lambda params, **kw: lalr.QLAB(params, base="sgdm", lr=0.05, **kw),
    "QLAB-adam": lambda params, **kw: lalr.QLAB(params, base="adam", lr=1e-3, **kw),
}
#: The methods whose step takes a probe.
PROBED = frozenset(name for name in METHODS if name.startswith("QLAB"))


def _step(name: str, opt: torch.optim.Optimizer, loss: torch.Tensor, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One ``step(loss=...)``, with QLAB's probe on ``batch`` (the tensors themselves, so that a graph
    captured with them reads what is copied into them before each replay)."""
    if name in PROBED:
        opt.step(loss=loss, probe=lambda: nn.functional.mse_loss(model(batch[0]), batch[1]))
    else:
        opt.step(loss=loss)
#: Steps whose gradient (5) or loss (9) is not finite: skipped by both paths.
BAD = {5: "grad", 9: "loss"}


def _batches(device: torch.device, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(64, 16, generator=gen).to(device), torch.randn(64, 1, generator=gen).to(device)) for _ in range(steps)]


def _mlp(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)


def _loss_and_grads(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], k: int) -> torch.Tensor:
    model.zero_grad()
    loss = nn.functional.mse_loss(model(batch[0]), batch[1])
    loss.backward()
    if BAD.get(k) == "grad":
        model[0].weight.grad[0, 0] = float("nan")
    return loss.detach() * float("inf") if BAD.get(k) == "loss" else loss.detach()


def parity(name: str, device: torch.device, steps: int = 30) -> dict[str, Any]:
    """Part 2: the capturable path against the default one."""
    results = []
    for capturable in (False, True):
        model = _mlp(device)
        opt = METHODS[name](model.parameters(), capturable=capturable)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for k, batch in enumerate(_batches(device, steps)):
                _step(name, opt, _loss_and_grads(model, batch, k), model, batch)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), int(opt.param_groups[0]["skipped_steps"])))
    (a, skipped_a), (b, skipped_b) = results
    diff = ((a - b).abs().max() / a.abs().max()).item()
    return {"max_rel_diff": diff, "skipped": (skipped_a, skipped_b), "ok": diff < 1e-5 and skipped_a == skipped_b == len(BAD)}


def no_sync(name: str, device: torch.device) -> dict[str, Any]:
    """Part 1: steps under ``set_sync_debug_mode("error")``."""
    tripped = {}
    for capturable in (False, True):
        model = _mlp(device)
        opt = METHODS[name](model.parameters(), capturable=capturable)
        batch = _batches(device, 1)[0]
        _step(name, opt, _loss_and_grads(model, batch, 0), model, batch)  # the first step creates the state
        loss = _loss_and_grads(model, batch, 1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(name, opt, loss, model, batch)
            tripped[capturable] = False
        except RuntimeError:
            tripped[capturable] = True
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return {"default path syncs": tripped[False], "capturable syncs": tripped[True], "ok": tripped[False] and not tripped[True]}


class CudaCapture:
    """Capture one step in a CUDA graph: eager warm-up steps on a side stream, as torch requires."""

    def warm_up(self, step: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        return captured.replay

    def synchronize(self) -> None:
        torch.cuda.synchronize()


class EagerCapture:
    """The CPU stand-in the tests use: "replaying" calls the step again on the same static tensors,
    which checks how the inputs are fed (not the CUDA graph itself)."""

    def warm_up(self, step: Callable[[], None]) -> None:
        step()

    def capture(self, step: Callable[[], None]) -> Callable[[], None]:
        return step  # a capture runs nothing: the replays do

    def synchronize(self) -> None:
        pass


def graph(name: str, device: torch.device, steps: int = 30, capture: CudaCapture | EagerCapture | None = None) -> dict[str, Any]:
    """Part 3: one captured step replayed, against eager capturable steps on the same inputs."""
    capture = CudaCapture() if capture is None else capture
    batches = _batches(device, steps + 3)
    # The inputs of every step, computed once: gradients and losses (NaN at the BAD steps).
    model = _mlp(device)
    inputs = []
    for k, batch in enumerate(batches):
        loss = _loss_and_grads(model, batch, k - 3)
        inputs.append((loss, [p.grad.clone() for p in model.parameters()], batch))
    eager = _mlp(device)
    opt_e = METHODS[name](eager.parameters(), capturable=True)
    for loss, grads, batch in inputs:
        for p, g in zip(eager.parameters(), grads):
            p.grad = g.clone()
        _step(name, opt_e, loss, eager, batch)
    graphed = _mlp(device)
    opt_g = METHODS[name](graphed.parameters(), capturable=True)
    static_loss = inputs[0][0].clone()
    static_batch = tuple(t.clone() for t in inputs[0][2])
    for p, g in zip(graphed.parameters(), inputs[0][1]):
        p.grad = g.clone()

    def feed(loss: torch.Tensor, grads: list[torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        static_loss.copy_(loss)
        for p, g in zip(graphed.parameters(), grads):
            p.grad.copy_(g)
        for static, value in zip(static_batch, batch):
            static.copy_(value)

    def step() -> None:
        _step(name, opt_g, static_loss, graphed, static_batch)

    for loss, grads, batch in inputs[:3]:  # eager warm-up: the state and the device numbers exist
        feed(loss, grads, batch)
        capture.warm_up(step)
    replay = capture.capture(step)
    for loss, grads, batch in inputs[3:]:
        feed(loss, grads, batch)
        replay()
    capture.synchronize()
    a = torch.cat([p.detach().flatten() for p in eager.parameters()])
    b = torch.cat([p.detach().flatten() for p in graphed.parameters()])
    diff = ((a - b).abs().max() / a.abs().max()).item()
    skipped = (int(opt_e.param_groups[0]["skipped_steps"]), int(opt_g.param_groups[0]["skipped_steps"]))
    return {"max_rel_diff": diff, "skipped": skipped, "ok": diff < 1e-6 and skipped[0] == skipped[1] == len(BAD)}


def timing(device: torch.device, steps: int, shapes: list[torch.Size] | None = None) -> dict[str, float]:
    """Part 4: milliseconds per step (median), default / capturable / graph / torch fused."""
    if shapes is None:
        import torchvision

        torch.manual_seed(0)
        shapes = [p.shape for p in torchvision.models.resnet18().parameters()]
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(s, generator=gen).mul_(1e-3).to(device) for s in shapes]
    loss = torch.tensor(2.3, device=device)
    rows: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "torch SGD momentum (fused)": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
        "torch Adam (fused)": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    }
    for name, make in METHODS.items():
        rows[f"{name}"] = lambda p, make=make: make(p)
        rows[f"{name} capturable"] = lambda p, make=make: make(p, capturable=True)
    cuda = device.type == "cuda"
    results = {}
    for row, make in rows.items():
        params = [nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g
        opt = make(params)
        kwargs = {} if row.startswith("torch") else {"loss": loss}
        if row.split(" ")[0] in PROBED:  # the probe's forward is not this benchmark's: the loss itself
            kwargs["probe"] = lambda: loss
        run = lambda: opt.step(**kwargs)  # noqa: E731
        for _ in range(3):
            run()
        if cuda and row.endswith("capturable"):
            captured = torch.cuda.CUDAGraph()
            with torch.cuda.graph(captured):
                opt.step(**kwargs)
            results[f"{row} (graph replay)"] = _median_ms(captured.replay, steps, cuda)
        results[row] = _median_ms(run, steps, cuda)
    return results


def _median_ms(run: Callable[[], Any], steps: int, cuda: bool) -> float:
    times = []
    for _ in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None, shapes: list[torch.Size] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per row (default 50)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu (no CUDA: parts 1 and 3 need a GPU)'}, torch {torch.__version__}")
    failed = False
    for name in METHODS:
        checks = {"parity": parity(name, device)}
        if device.type == "cuda":
            checks["no host sync"] = no_sync(name, device)
            checks["CUDA graph"] = graph(name, device)
        for check, result in checks.items():
            failed |= not result["ok"]
            print(f"{name:10s} {check:13s} {'ok  ' if result['ok'] else 'FAIL'} {result}")
    print("| step | ms |\n|---|---:|")
    for row, ms in timing(device, args.steps, shapes).items():
        print(f"| {row} | {ms:.3f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
