"""All six optimizers in a bare PyTorch training loop (no Lightning).

A small MLP learns scikit-learn's bundled 8×8 handwritten digits (offline) once per method, from
the same initial weights, and the test accuracy of each is printed.  What each step needs from
the loop:

* ``MoMo``, ``MoMoAdam``: the mini-batch loss, ``optimizer.step(loss=loss)``.
* ``QLAB``: the loss and a *probe*, a function that re-evaluates the same mini-batch's loss
  without backward; QLAB calls it once, at its trial point, and fits the step size from it.
* ``HierarchicalHD``, ``AdaL``, ``StepTunedSGD``: only the gradient.  A loss passed anyway is
  checked: a NaN or infinite loss skips the step instead of corrupting the weights.

So one loop serves all six: always pass ``loss=``, and ``probe=`` for QLAB.  After each step,
``param_groups[0]["effective_lr"]`` holds the step size the method actually used.

Run::

    python examples/plain_pytorch.py            # 10 epochs per method, a few seconds each
    python examples/plain_pytorch.py --fast     # 1 epoch per method (what the tests run)
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adaptive_lr import QLAB, AdaL, HierarchicalHD, MoMo, MoMoAdam, StepTunedSGD

# Each entry builds one optimizer over the model's parameters.  The learning rates are each
# method's usual starting point; for MoMo and MoMo-Adam ``lr`` is only a cap on the step size.
OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = {
    "MoMo": lambda params: MoMo(params, lr=1.0),
    "MoMoAdam": lambda params: MoMoAdam(params, lr=1e-2),
    "QLAB (on SGD)": lambda params: QLAB(params, base="sgd", lr=0.1),  # lr: the first trial rate
    "HierarchicalHD (on SGD-Nesterov)": lambda params: HierarchicalHD(params, base="sgdn", lr=1e-2),
    "AdaL": lambda params: AdaL(params, lr=1e-3),
    "StepTunedSGD": lambda params: StepTunedSGD(params, lr=0.5),
}


def digits(batch_size: int = 64) -> tuple[DataLoader, TensorDataset]:
    """Training batches and the test set: 1437 and 360 images, standardized with the training statistics."""
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1437], order[1437:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size, shuffle=True)
    return loader, TensorDataset(x[test], y[test])


def make_model() -> nn.Module:
    # No dropout or BatchNorm here: QLAB's probe re-runs the forward pass, and with dropout it would
    # draw a different mask (in Lightning, AdaptiveLRCallback replays the mask for you).
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(name: str, epochs: int, loader: DataLoader, test_set: TensorDataset) -> tuple[float, float]:
    """Train a fresh model with one method; return its test accuracy and its last step size."""
    torch.manual_seed(0)  # the same initial weights and batch order for every method
    model = make_model()
    optimizer = OPTIMIZERS[name](model.parameters())

    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if isinstance(optimizer, QLAB):
                # The same mini-batch's loss at whatever parameters the model holds when called.
                optimizer.step(loss=loss, probe=lambda: F.cross_entropy(model(x), y))
            else:
                optimizer.step(loss=loss)

    with torch.no_grad():
        x, y = test_set.tensors
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    return accuracy, float(optimizer.param_groups[0]["effective_lr"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fast", action="store_true", default=os.environ.get("LALR_EXAMPLE_FAST") == "1")
    args = parser.parse_args(argv)
    epochs = 1 if args.fast else args.epochs

    loader, test_set = digits()
    accuracies = {}
    for name in OPTIMIZERS:
        accuracy, step_size = train(name, epochs, loader, test_set)
        accuracies[name] = accuracy
        print(f"{name:34s} test accuracy {accuracy:.3f}   last step size {step_size:.3g}")
    return accuracies


if __name__ == "__main__":
    main()
