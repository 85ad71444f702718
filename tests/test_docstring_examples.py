"""The ``>>>`` examples in the docstrings run and print what they show (they are the users' first code)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import lightning_adaptive_lr

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lightning_adaptive_lr.__path__, prefix="lightning_adaptive_lr.")
    if info.name.split(".")[1] in ("optim", "callbacks") or info.name.endswith(".mixins")
)


def test_the_public_classes_have_examples() -> None:
    missing = [
        name
        for name in ("MoMo", "MoMoAdam", "QLAB", "HierarchicalHD", "AdaL", "StepTunedSGD")
        if ">>>" not in (getattr(lightning_adaptive_lr, name).__doc__ or "")
    ]
    assert missing == []
    assert ">>>" in (lightning_adaptive_lr.QLAB.wrap.__doc__ or "")


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    torch.manual_seed(0)
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
