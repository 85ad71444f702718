"""GPU check of every ``compiled=True`` path: the Triton kernels give the eager path's numbers.

The test suite checks each fused path against its eager path on the CPU, where TorchInductor emits
C++.  On a GPU the same functions become Triton kernels, with their own rounding, NaN handling and
reductions; this script runs, on one device (CUDA when present, else the CPU), 30 steps of a small
MLP in float32 for each method, eager and compiled side by side from the same start, with a NaN
gradient at step 5 that both must skip, and reports the largest relative parameter difference, the
skip counts and the slowest compiled step (the one that compiled).  Exits 1 if a method differs by more than its
tolerance or skips differently.

Run on a GPU machine, with the other prepared checks::

    python benchmarks/gpu_compiled_check.py
    python benchmarks/gpu_capturable_check.py
    python -m benchmarks.step_overhead --device cuda
    python -m benchmarks.pass_costs --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import lightning_adaptive_lr as lalr

#: name → (constructor taking ``compiled=``, whether ``step()`` needs QLAB's probe, tolerance).
#: QLAB's fit magnifies float32 rounding (``a2 = f̃ − f − a1``), hence its wider tolerance.
METHODS: dict[str, tuple[Callable[..., torch.optim.Optimizer], bool, float]] = {
    "MoMo": (lambda p, **kw: lalr.MoMo(p, lr=1.0, **kw), False, 1e-5),
    "MoMoAdam": (lambda p, **kw: lalr.MoMoAdam(p, lr=1e-2, **kw), False, 1e-5),
    "AdaL": (lambda p, **kw: lalr.AdaL(p, lr=1e-2, **kw), False, 1e-5),
    "QLAB-sgdm": (lambda p, **kw: lalr.QLAB(p, base="sgdm", lr=0.05, weight_decay=0.01, **kw), True, 1e-3),
    "QLAB-adamw": (lambda p, **kw: lalr.QLAB(p, base="adamw", lr=1e-2, weight_decay=0.01, **kw), True, 1e-3),
    "HierarchicalHD-sgd": (lambda p, **kw: lalr.HierarchicalHD(p, base="sgd", lr=0.05, **kw), False, 1e-5),
    "HierarchicalHD-sgdn": (lambda p, **kw: lalr.HierarchicalHD(p, base="sgdn", lr=0.05, **kw), False, 1e-5),
    "HierarchicalHD-adam": (lambda p, **kw: lalr.HierarchicalHD(p, base="adam", lr=1e-2, **kw), False, 1e-5),
    "StepTunedSGD": (lambda p, **kw: lalr.StepTunedSGD(p, lr=0.05, **kw), False, 1e-5),
}
#: The step whose gradient is NaN: both paths skip it.
BAD_STEP = 5


def _mlp(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1)).to(device)


def parity(name: str, device: torch.device, steps: int = 30) -> dict[str, Any]:
    """``steps`` steps of the eager and the compiled path side by side; the largest relative
    parameter difference at the end, both skip counts, and the slowest compiled step's seconds."""
    make, probe, tolerance = METHODS[name]
    runs = []
    for compiled in (False, True):
        model = _mlp(device)
        runs.append((model, make(model.parameters(), compiled=compiled)))
    gen = torch.Generator().manual_seed(1)
    slowest = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped step's warning
        for k in range(steps):
            x, y = torch.randn(64, 16, generator=gen).to(device), torch.randn(64, 1, generator=gen).to(device)
            for model, opt in runs:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                if k == BAD_STEP:
                    model[0].weight.grad[0, 0] = float("nan")
                kwargs: dict[str, Any] = {"loss": loss.detach()}
                if probe:
                    kwargs["probe"] = lambda m=model: nn.functional.mse_loss(m(x), y)
                start = time.perf_counter()
                opt.step(**kwargs)
                if opt is runs[1][1]:
                    slowest = max(slowest, time.perf_counter() - start)
    (eager, opt_e), (fused, opt_c) = runs
    a = torch.cat([p.detach().flatten() for p in eager.parameters()])
    b = torch.cat([p.detach().flatten() for p in fused.parameters()])
    diff = ((a - b).abs().max() / a.abs().max()).item()
    skipped = (int(opt_e.param_groups[0]["skipped_steps"]), int(opt_c.param_groups[0]["skipped_steps"]))
    ok = diff <= tolerance and skipped[0] == skipped[1] >= 1
    return {"max_rel_diff": diff, "tolerance": tolerance, "skipped": skipped, "slowest_step_s": round(slowest, 2), "ok": ok}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per method (default 30)")
    parser.add_argument("--only", nargs="*", help="methods to check (default: all)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no CUDA: Inductor's C++ kernels, not Triton)"
    print(f"device: {label}, torch {torch.__version__}")
    failed = False
    for name in args.only or METHODS:
        result = parity(name, device, args.steps)
        failed |= not result["ok"]
        print(f"{name:20s} {'ok  ' if result['ok'] else 'FAIL'} {result}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
