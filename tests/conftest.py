"""Test configuration and the fixtures several test files share.

Runs stay deterministic and single-threaded enough for a 2-core machine.  Shared here, once:

* ``one_thread``: run a test with one intra-op thread (tiny models run fastest so and leave the
  other core to the rest of the suite).  Opt in per file with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``.
* ``least_squares``: the noisy linear least-squares problem the float64 reference tests use
  (:func:`make_least_squares`), with its loss and gradient by hand (:func:`least_squares_loss_and_grads`).
* :func:`vdot`: the inner product of two lists of arrays, for the float64 reference loops.

The plain functions are imported by the test files, ``from conftest import make_least_squares``
(this folder is on ``sys.path``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the registry and shared test helpers
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

#: One mini-batch (inputs, targets) and the starting point [W, c] of the least-squares problem.
Batch = tuple[np.ndarray, np.ndarray]


def make_least_squares(
    n_batches: int,
    seed: int = 0,
    *,
    n_in: int = 5,
    n_out: int = 3,
    batch: int = 8,
    noise: float = 0.3,
    dead_feature: int | None = None,
) -> tuple[list[Batch], list[np.ndarray]]:
    """A stream of mini-batches of noisy linear least squares, and a starting point.

    The loss is f(W, c) = mean((xW + c − y)²) with y = x W* + noise, so its minimum is positive
    (lower bounds matter).  The numbers drawn (W*, then each batch's x and noise, then W₀ and c₀,
    from ``numpy.random.default_rng(seed)``) do not depend on ``dead_feature``: the inputs' column
    ``dead_feature``, if given, is set to zero after drawing.

    Returns:
        ``(batches, [W0, c0])`` in float64 numpy arrays.
    """
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=(n_in, n_out))
    data = []
    for _ in range(n_batches):
        x = rng.normal(size=(batch, n_in))
        if dead_feature is not None:
            x[:, dead_feature] = 0.0
        data.append((x, x @ w_true + noise * rng.normal(size=(batch, n_out))))
    w0 = rng.normal(size=(n_in, n_out)) * 0.5
    c0 = rng.normal(size=(n_out,)) * 0.5
    return data, [w0, c0]


def least_squares_loss_and_grads(params: list[np.ndarray], batch: Batch) -> tuple[float, list[np.ndarray]]:
    """f = mean((xW + c − y)²) and its gradient [∂f/∂W, ∂f/∂c], by hand."""
    (w, c), (x, y) = params, batch
    r = x @ w + c - y
    scale = 2.0 / r.size
    return float(np.mean(r**2)), [scale * x.T @ r, scale * r.sum(axis=0)]


def vdot(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    """Σᵢ ⟨xᵢ, yᵢ⟩ over two lists of arrays, as a float (the reference loops' inner product)."""
    return float(sum(np.sum(a * b) for a, b in zip(xs, ys)))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run the test with one intra-op thread, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def least_squares() -> Callable[..., tuple[list[Batch], list[np.ndarray]]]:
    """The least-squares problem factory :func:`make_least_squares` (``least_squares(n_batches, seed)``)."""
    return make_least_squares


@pytest.fixture
def no_inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` fails as it does without a C++ compiler, for the ``compiled=True`` paths;
    the package's caches of compiled functions and checked devices start empty."""
    from lightning_adaptive_lr.optim import _compiled

    def broken_compile(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(_compiled.torch, "compile", broken_compile)
    monkeypatch.setattr(_compiled, "_INDUCTOR_CHECKED", set())
    monkeypatch.setattr(_compiled, "_COMPILED", {})
