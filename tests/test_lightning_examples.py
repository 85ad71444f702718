"""The Lightning examples run (fast mode: a few steps) and the optimizers load without Lightning."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from lightning_helpers import QUIET

pytestmark = [pytest.mark.filterwarnings(w) for w in QUIET] + [pytest.mark.usefixtures("one_thread")]

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name: str) -> dict[str, float]:
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--fast"])


#: The digits have 10 classes: chance is 0.1.  After the fast mode's 5 steps the examples reach
#: 0.63 (QLAB on SGD) and 0.49 (MoMo) on the validation batch; this bar is three times chance.
LEARNED = 0.3


def test_existing_trainer_example_puts_qlab_on_the_modules_sgd() -> None:
    result = run_example("existing_trainer")
    assert result["val_acc"] > LEARNED
    assert result["lr"] != 0.05  # QLAB fitted the rate: it is no longer the module's SGD setting


def test_mixin_example_trains_with_momo() -> None:
    result = run_example("mixin")
    assert result["val_acc"] > LEARNED
    assert 0.0 < result["tau"] <= 1.0  # MoMo's step size, capped at lr


def test_optimizers_import_without_lightning() -> None:
    code = (
        "import sys, lightning_adaptive_lr, lightning_adaptive_lr.optim;"
        "loaded = [m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning'))];"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
