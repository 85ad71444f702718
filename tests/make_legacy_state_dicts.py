"""Write tests/data/legacy_state_dicts.pt: state dicts in the layout of release 0.x (``state["global"]``).

Run once with the release whose layout is frozen (commit 849bf86); `test_state_layout.py` loads the
file and checks that today's optimizers resume from it exactly as the old code continued.
For each registry case: the state dict after 6 steps, and the parameters after 6 more steps.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from optimizer_registry import CASES, take_step  # noqa: E402

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


def main() -> None:
    out = {}
    cases = list(CASES)
    for case in cases:
        torch.manual_seed(0)
        model, batch = problem()
        opt = case.make(model.parameters())
        for _ in range(6):
            take_step(case, opt, model, batch)
        saved = _snapshot(opt.state_dict())
        params_at_save = [p.detach().clone() for p in model.parameters()]
        for _ in range(6):
            take_step(case, opt, model, batch)
        out[case.id] = {
            "state_dict": saved,
            "params_at_save": params_at_save,
            "params_after": [p.detach().clone() for p in model.parameters()],
        }
    # QLAB.wrap on torch's Adam
    torch.manual_seed(0)
    model, batch = problem()
    opt = lalr.QLAB.wrap(torch.optim.Adam(model.parameters(), lr=0.01))
    case = next(c for c in CASES if c.needs_probe)
    for _ in range(6):
        take_step(case, opt, model, batch)
    saved = _snapshot(opt.state_dict())
    params_at_save = [p.detach().clone() for p in model.parameters()]
    for _ in range(6):
        take_step(case, opt, model, batch)
    out["QLAB.wrap(Adam)"] = {
        "state_dict": saved,
        "params_at_save": params_at_save,
        "params_after": [p.detach().clone() for p in model.parameters()],
    }
    torch.save(out, os.path.join(os.path.dirname(__file__), "data", "legacy_state_dicts.pt"))
    print("wrote", len(out), "cases")


if __name__ == "__main__":
    main()
