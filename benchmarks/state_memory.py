"""Optimizer memory per parameter: what each method keeps between steps, beside its torch counterpart.

Each optimizer takes three steps over ResNet-18's parameters (float32, random gradients, no weights
downloaded); then every tensor it holds is counted once (by storage): ``optimizer.state``, tensors
in its param groups other than the parameters, and buffers it keeps on itself between steps (the
eager CPU bodies' spare buffers, for example).  The result is in *parameter-sized buffers*: bytes
divided by 4 bytes × the number of parameters.  Tensors of fewer than 1 % of a parameter's
elements (per-tensor or per-unit scalars) are summed as well, so small per-tensor state shows up as
a fraction.

    python -m benchmarks.state_memory                # every row, markdown table on stdout
    python -m benchmarks.state_memory --device cuda  # the buffers an accelerator's path keeps
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import lightning_adaptive_lr as lalr


@dataclass(frozen=True)
class MemoryRow:
    """One optimizer: ``make(params)``, what its step needs (loss, probe) and its torch counterpart."""

    name: str
    make: Callable[[list[Tensor]], torch.optim.Optimizer]
    counterpart: str = ""
    needs: str = "loss"  # "loss", "probe" (loss and probe) or "" (gradient only)
    #: Parameter-sized buffers the method's math keeps between steps (docs/algorithms.md).
    math: float | None = None


SGDM, ADAM = "torch SGD momentum", "torch Adam"

ROWS: list[MemoryRow] = [
    MemoryRow("torch SGD", lambda p: torch.optim.SGD(p, lr=0.1), needs="", math=0),
    MemoryRow(SGDM, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), needs="", math=1),
    MemoryRow(ADAM, lambda p: torch.optim.Adam(p, lr=1e-3), needs="", math=2),
    MemoryRow("MoMo", lambda p: lalr.MoMo(p), SGDM, math=1),
    MemoryRow("MoMo (compiled)", lambda p: lalr.MoMo(p, compiled=True), SGDM, math=1),
    MemoryRow("MoMo (capturable)", lambda p: lalr.MoMo(p, capturable=True), SGDM, math=1),
    MemoryRow("MoMoAdam", lambda p: lalr.MoMoAdam(p), ADAM, math=2),
    MemoryRow("MoMoAdam (compiled)", lambda p: lalr.MoMoAdam(p, compiled=True), ADAM, math=2),
    MemoryRow("MoMoAdam (capturable)", lambda p: lalr.MoMoAdam(p, capturable=True), ADAM, math=2),
    MemoryRow("MoMoAdam (compiled, capturable)", lambda p: lalr.MoMoAdam(p, compiled=True, capturable=True), ADAM, math=2),
    MemoryRow("QLAB-sgd", lambda p: lalr.QLAB(p, base="sgd"), "torch SGD", "probe", math=0),
    MemoryRow("QLAB-sgdm", lambda p: lalr.QLAB(p, base="sgdm"), SGDM, "probe", math=1),
    MemoryRow("QLAB-adam", lambda p: lalr.QLAB(p, base="adam", lr=1e-3), ADAM, "probe", math=2),
    MemoryRow("QLAB-adam (capturable)", lambda p: lalr.QLAB(p, base="adam", lr=1e-3, capturable=True), ADAM, "probe", math=2),
    MemoryRow("QLAB.wrap(Adam)", lambda p: lalr.QLAB.wrap(torch.optim.Adam(p, lr=1e-3)), ADAM, "probe", math=2),
    MemoryRow("HierarchicalHD-sgd", lambda p: lalr.HierarchicalHD(p, base="sgd", lr=0.1), "torch SGD", "", math=1),
    MemoryRow("HierarchicalHD-sgdn", lambda p: lalr.HierarchicalHD(p, base="sgdn", lr=0.1), SGDM, "", math=2),
    MemoryRow("HierarchicalHD-adam", lambda p: lalr.HierarchicalHD(p, base="adam", lr=1e-3), ADAM, "", math=3),
    MemoryRow(
        "HierarchicalHD-adam 4 levels",
        lambda p: lalr.HierarchicalHD(p, base="adam", lr=1e-3, levels=("global", "layer", "unit", "param")),
        ADAM,
        "",
        math=4,
    ),
    MemoryRow("HierarchicalHD-adam (capturable)", lambda p: lalr.HierarchicalHD(p, base="adam", lr=1e-3, capturable=True), ADAM, "", math=3),
    MemoryRow("AdaL", lambda p: lalr.AdaL(p, lr=1e-3), ADAM, "", math=2),
    MemoryRow("AdaL (compiled)", lambda p: lalr.AdaL(p, lr=1e-3, compiled=True), ADAM, "", math=2),
    MemoryRow("AdaL (capturable)", lambda p: lalr.AdaL(p, lr=1e-3, capturable=True), ADAM, "", math=2),
    MemoryRow("StepTunedSGD", lambda p: lalr.StepTunedSGD(p, lr=0.1), "torch SGD", "", math=2),
    MemoryRow("StepTunedSGD (capturable)", lambda p: lalr.StepTunedSGD(p, lr=0.1, capturable=True), "torch SGD", "", math=2),
]


def _tensors(value: Any, skip: set[int], seen: set[int]) -> Iterable[Tensor]:
    """Every tensor inside ``value`` (dicts, lists, tuples, objects' ``__dict__``), once each."""
    if isinstance(value, Tensor):
        if id(value) not in skip:
            yield value
        return
    if id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type(None))):
        return
    seen.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, Tensor) and id(key) not in skip:  # state keyed by a tensor
                yield key
            yield from _tensors(item, skip, seen)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _tensors(item, skip, seen)
    elif hasattr(value, "__dict__") and not callable(value):
        yield from _tensors(vars(value), skip, seen)


def kept_bytes(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> int:
    """Bytes of every tensor ``optimizer`` holds that is not a parameter or a gradient, by storage."""
    skip = {id(p) for p in params} | {id(p.grad) for p in params if p.grad is not None}
    storages: dict[int, int] = {}
    for t in _tensors(vars(optimizer), skip, set()):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(storages.values())


def resnet18_parameters(device: torch.device) -> list[Tensor]:
    import torchvision

    torch.manual_seed(0)
    return [torch.nn.Parameter(p.detach().to(device)) for p in torchvision.models.resnet18().parameters()]


def measure(row: MemoryRow, params: list[Tensor], steps: int = 3) -> float:
    """Parameter-sized buffers ``row``'s optimizer keeps after ``steps`` steps."""
    gen = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).mul_(1e-3).to(p.device)
    optimizer = row.make(params)
    loss = torch.tensor(2.3, device=params[0].device)
    kwargs: dict[str, Any] = {"loss": loss} if row.needs else {}
    if row.needs == "probe":
        kwargs["probe"] = lambda: loss * 0.9
    for _ in range(steps):
        optimizer.step(**kwargs)
    size = sum(p.numel() * p.element_size() for p in params)
    return kept_bytes(optimizer, params) / size


def table(rows: list[MemoryRow], device: torch.device) -> str:
    shapes = resnet18_parameters(device)
    results = {}
    for row in rows:
        params = [torch.nn.Parameter(p.detach().clone()) for p in shapes]
        results[row.name] = measure(row, params)
    lines = [
        "| optimizer | kept between steps (parameter-sized buffers) | the math's own | torch counterpart | counterpart keeps |",
        "|---|---:|---:|---|---:|",
    ]
    for row in rows:
        other = f"{results[row.counterpart]:.2f}" if row.counterpart else ""
        math_ = "" if row.math is None else f"{row.math}"
        lines.append(f"| {row.name} | {results[row.name]:.2f} | {math_} | {row.counterpart} | {other} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="substrings of row names (their counterparts come along)")
    args = parser.parse_args(argv)
    rows = ROWS
    if args.only:
        chosen = [r for r in ROWS if any(o.lower() in r.name.lower() for o in args.only)]
        needed = {r.counterpart for r in chosen}
        rows = [r for r in ROWS if r in chosen or r.name in needed]
    text = f"ResNet-18 parameters (11.7 M, float32), {args.device}, torch {torch.__version__}, after 3 steps\n\n"
    text += table(rows, torch.device(args.device))
    print(text)
    return text


if __name__ == "__main__":
    main()
