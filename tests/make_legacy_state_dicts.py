"""Write tests/data/legacy_state_dicts.pt: state dicts in the layout of release 0.x (``state["global"]``).

Run once with the release whose layout is frozen (commit 849bf86); `test_state_layout.py` loads the
file and checks that today's optimizers resume from it exactly as the old code continued.
For each registry case: the state dict after 6 steps, and the parameters after 6 more steps.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimizer_registry import CASES, OptimizerCase, take_step  # noqa: E402

import lightning_adaptive_lr as lalr  # noqa: E402


def problem(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    return model, (x, y)


def _snapshot(state_dict: dict) -> dict:
    """A deep copy: torch's state_dict() holds the live state tensors and dicts."""
    return copy.deepcopy(state_dict)


def _record(case: OptimizerCase, make: Callable[[Any], torch.optim.Optimizer]) -> dict[str, Any]:
    """The state dict after 6 steps, with the parameters then and 6 steps later."""
    torch.manual_seed(0)
    model, batch = problem()
    opt = make(model.parameters())
    for _ in range(6):
        take_step(case, opt, model, batch)
    saved = _snapshot(opt.state_dict())
    params_at_save = [p.detach().clone() for p in model.parameters()]
    for _ in range(6):
        take_step(case, opt, model, batch)
    return {"state_dict": saved, "params_at_save": params_at_save, "params_after": [p.detach().clone() for p in model.parameters()]}


def main() -> None:
    out = {case.id: _record(case, case.make) for case in CASES}
    probing = next(c for c in CASES if c.needs_probe)
    out["QLAB.wrap(Adam)"] = _record(probing, lambda params: lalr.QLAB.wrap(torch.optim.Adam(params, lr=0.01)))
    torch.save(out, os.path.join(os.path.dirname(__file__), "data", "legacy_state_dicts.pt"))
    print("wrote", len(out), "cases")


if __name__ == "__main__":
    main()
