"""What a parameter-sized pass costs here, timed with torch's fastest kernels, and each method's floor.

The access-count floors (``benchmarks/step_overhead.py``'s ``FLOORS``) price every parameter-sized
read or write alike.  On a CPU two effects make that count optimistic:

* **write-allocate**: writing a buffer the pass does not read first reads its lines into the cache,
  so a copy (1 read, 1 unread write: "2 accesses") costs about what fused SGD's 3 accesses do;
* **reductions**: a read-only pass that sums (dot products, squared norms) may stream slower than
  a pointwise pass over as many tensors.

This benchmark measures both over ResNet-18's parameter shapes (11.7 M, float32; nothing is
downloaded).  Each *primitive pass* is timed in every implementation torch offers that is listed
below (its fused optimizer kernels, ``torch._foreach_*``, per-tensor BLAS, a ``torch.compile``\\ d
loop over the whole list as one graph), and the fastest one is kept:

* ``reduce(k)``: read k lists, return per-tensor sums (k=1: ‖a‖²; k=2: ⟨a,b⟩; k≥3: ⟨a,b⟩, ⟨a,c⟩
  [, ⟨a,d⟩] and the last list's squared norm);
* ``update(r,w,e)``: a pointwise pass that reads r lists, writes w of them in place and writes e
  lists it does not read (``update(2,1,0)`` is SGD's pattern, ``update(3,2,0)`` SGD-M's,
  ``update(4,3,0)`` Adam's); ``+sum`` also returns a per-tensor sum of the values it writes;
* ``copy``: 1 read, 1 unread write (``torch._foreach_copy_``).

A pass's *cost* is the median over rounds of its time divided by fused SGD's time
(``torch.optim.SGD(fused=True).step()``) in the same round; rows are interleaved (one call of
every row per round, the order rotated each round), and before each timed call a buffer larger than
the last-level cache is read so that every pass starts from memory, not from what the previous row
left in the cache.  Each method's *measured floor* is then the sum of the costs of its least pass
structure (``METHODS``: its gate reads the sums before anything is written) divided by the cost of
its fused baseline, timed in the same run; it is shown next to the access-count floor and the
issue's target (1.2 × the access floor): where the measured floor is above the target, the target is
out of reach on this machine whatever the implementation.

    python -m benchmarks.pass_costs                        # cpu, 25 rounds
    python -m benchmarks.pass_costs --device cuda --rounds 50 --markdown pass_costs.md
    python -m benchmarks.pass_costs --eager                # no torch.compile'd candidates (fast)

The first run compiles about a dozen functions over 62 tensors (half a minute each on a 2-core
CPU; Inductor caches them on disk for the next run).  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from benchmarks.step_overhead import (
    ADAM_FUSED,
    ROWS,
    SGD_FUSED,
    SGDM_FUSED,
    emit,
    machine,
    paired_ratio,
    resnet18_parameters,
)

LR, MOMENTUM, BETA1, BETA2, EPS = 1e-3, 0.9, 0.9, 0.999, 1e-8
#: Adam's step count in the fused kernels' state, and the scalars the compiled Adam takes for it.
ADAM_STEP = 10
ADAM_SCALARS = (BETA1, BETA2, LR / (1 - BETA1**ADAM_STEP), (1 - BETA2**ADAM_STEP) ** 0.5, EPS)
#: Bytes read before every timed call to evict the previous row's data (over any CPU's L3, or H200's L2).
FLUSH_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------
# The methods: their least pass structures


@dataclass(frozen=True)
class Method:
    """A method's least pass structure per ``step()`` against torch's fused counterpart.

    Attributes:
        name: as in ``step_overhead.FLOORS`` (the tests check that both count the same accesses).
        baseline: torch's fused row it is compared with (``step_overhead``'s names).
        passes: the primitive passes (``PRIMITIVES``' names) of ``per`` steps, in order.
        accesses: parameter-sized reads and writes per step (the access-count floor's numerator).
        baseline_accesses: the same for ``baseline``.
        per: how many ``step()`` calls ``passes`` cover (StepTunedSGD: its two half-steps).
    """

    name: str
    baseline: str
    passes: tuple[str, ...]
    accesses: float
    baseline_accesses: float
    per: int = 1

    @property
    def access_floor(self) -> float:
        """The least time ratio memory accesses allow, every access priced alike."""
        return self.accesses / self.baseline_accesses

    @property
    def target(self) -> float:
        """The issue's target: within 1.2× of the access floor."""
        return 1.2 * self.access_floor


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        # Reads g, d, x for the sums of the averaged direction, then updates d and x.
        Method("MoMo", SGDM_FUSED, ("reduce(3)", "update(3,2,0)"), 8, 5),
        Method("MoMo-Adam", ADAM_FUSED, ("reduce(4)", "update(4,3,0)"), 11, 7),
        # ‖g‖², the trial step, the fitted move.
        Method("QLAB-sgd", SGD_FUSED, ("reduce(1)", "update(2,1,0)", "update(2,1,0)"), 7, 3),
        # The trial's slope is a sum of the values it writes; the move reads x and the momentum.
        Method("QLAB-sgdm", SGDM_FUSED, ("reduce(1)", "update(3,2,0)+sum", "update(2,1,0)"), 9, 5),
        # The move recomputes Adam's direction from m and v.
        Method("QLAB-adam", ADAM_FUSED, ("reduce(1)", "update(4,3,0)", "update(3,1,0)"), 12, 7),
        # ⟨g, prev⟩, then the step, with g stored as the next step's prev (written, not read).
        Method("HierarchicalHD-sgd", SGD_FUSED, ("reduce(2)", "update(2,1,1)"), 6, 3),
        # Nesterov SGD-M: b ← μb + g, x ← x − η(g + μb), prev ← g.
        Method("HierarchicalHD-sgdn", SGDM_FUSED, ("reduce(2)", "update(3,2,1)"), 8, 5),
        Method("HierarchicalHD-adam", ADAM_FUSED, ("reduce(2)", "update(4,3,1)"), 10, 7),
        # ‖g‖₁, then Adam.
        Method("AdaL", ADAM_FUSED, ("reduce(1)", "update(4,3,0)"), 8, 7),
        # First half: ⟨D, g⟩, x ← x − η·g, first ← g.  Second half: ⟨g_b, g_a⟩,
        # x ← x − η·g_b, D ← βD + (1−β)(g_a − g_b).  The floor is their mean.
        Method(
            "StepTunedSGD (per half-step)",
            SGD_FUSED,
            ("reduce(2)", "update(2,1,1)", "reduce(2)", "update(4,2,0)"),
            7,
            3,
            per=2,
        ),
    )
}


def measured_floor(method: Method, costs: Mapping[str, float]) -> float:
    """The least time ratio ``method``'s passes take here: the sum of their measured costs (per
    step) over its baseline's cost, all in the same unit (fused SGD's time)."""
    return sum(costs[p] for p in method.passes) / method.per / costs[method.baseline]


# ----------------------------------------------------------------------------------------------
# The tensors every pass works on


class Pool:
    """Parameter-shaped lists shared by the passes (their values stay bounded across calls).

    ``x`` the parameters, ``g`` and ``h`` two gradients (read only), ``m`` a momentum or first
    moment, ``v`` a positive second moment, ``out`` a buffer that is only written.
    """

    def __init__(self, shapes: Sequence[torch.Size], device: torch.device) -> None:
        gen = torch.Generator().manual_seed(1)

        def randn(scale: float) -> list[Tensor]:
            return [torch.randn(s, generator=gen).mul_(scale).to(device) for s in shapes]

        self.device = device
        self.x, self.g, self.h, self.m = randn(5e-2), randn(1e-3), randn(1e-3), randn(1e-3)
        self.v = [t.square().add_(1e-8) for t in randn(1e-3)]
        self.out = [torch.zeros_like(t) for t in self.x]

    def scalar(self, value: float) -> Tensor:
        """A compiled function's scalar: a 0-d tensor (a Python float would be baked in)."""
        return torch.full((), value, dtype=torch.float64, device=self.device)

    def lists(self, names: str) -> list[list[Tensor]]:
        return [getattr(self, n) for n in names.split()]


Run = Callable[[], object]


@dataclass(frozen=True)
class Impl:
    """One way to run a pass: ``build(pool)`` returns the call to time."""

    label: str
    build: Callable[[Pool], Run]
    compiled: bool = False
    #: The timed row's name when it is one of torch's fused optimizers (``step_overhead``'s name).
    row: str = ""


@dataclass(frozen=True)
class Primitive:
    name: str
    accesses: int
    what: str
    impls: tuple[Impl, ...]


def row_name(primitive: Primitive, impl: Impl) -> str:
    return impl.row or f"{primitive.name} · {impl.label}"


# --- sums


def _pairs(k: int) -> list[tuple[int, int]]:
    """Which lists a ``reduce(k)`` pass multiplies: every list is read, the first against the others."""
    if k == 1:
        return [(0, 0)]
    if k == 2:
        return [(0, 1)]
    return [(0, i) for i in range(1, k)] + [(k - 1, k - 1)]


def _c_reduce(*lists: list[Tensor]) -> list[Tensor]:
    sums = []
    for ts in zip(*lists):
        sums.extend((ts[i] * ts[j]).sum() for i, j in _pairs(len(ts)))
    return sums


def _per_tensor_dots(dot: Callable[[Tensor, Tensor], Tensor], names: str) -> Callable[[Pool], Run]:
    def build(pool: Pool) -> Run:
        flat = [[t.view(-1) for t in ts] for ts in zip(*pool.lists(names))]
        pairs = _pairs(len(names.split()))
        return lambda: [dot(ts[i], ts[j]) for ts in flat for i, j in pairs]

    return build


# --- pointwise updates (compiled bodies: one loop per tensor, scalars as 0-d tensors)


def _c_sgd(xs: list[Tensor], gs: list[Tensor], lr: Tensor) -> None:
    for x, g in zip(xs, gs):
        x.sub_(g * lr)


def _c_sgdm(xs: list[Tensor], gs: list[Tensor], bs: list[Tensor], lr: Tensor, mu: Tensor) -> None:
    for x, g, b in zip(xs, gs, bs):
        b_new = b * mu + g
        b.copy_(b_new)
        x.sub_(b_new * lr)


def _c_sgdm_sum(xs: list[Tensor], gs: list[Tensor], bs: list[Tensor], lr: Tensor, mu: Tensor) -> list[Tensor]:
    sums = []
    for x, g, b in zip(xs, gs, bs):
        b_new = b * mu + g
        b.copy_(b_new)
        x.sub_(b_new * lr)
        sums.append((g * b_new).sum())
    return sums


def _adam(
    x: Tensor, g: Tensor, m: Tensor, v: Tensor, b1: Tensor, b2: Tensor, step_size: Tensor, bc2_sqrt: Tensor, eps: Tensor
) -> None:
    """torch's Adam (``_fused_adam_``'s arithmetic), bias corrections folded into two scalars."""
    m_new = m * b1 + g * (1 - b1)
    v_new = v * b2 + g * g * (1 - b2)
    m.copy_(m_new)
    v.copy_(v_new)
    x.sub_(m_new / (v_new.sqrt() / bc2_sqrt + eps) * step_size)


def _c_adam(xs: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], *scalars: Tensor) -> None:
    for x, g, m, v in zip(xs, gs, ms, vs):
        _adam(x, g, m, v, *scalars)


def _c_adam_prev(
    xs: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor], prevs: list[Tensor], *scalars: Tensor
) -> None:
    for x, g, m, v, prev in zip(xs, gs, ms, vs, prevs):
        _adam(x, g, m, v, *scalars)
        prev.copy_(g)


def _c_sgd_prev(xs: list[Tensor], gs: list[Tensor], prevs: list[Tensor], lr: Tensor) -> None:
    for x, g, prev in zip(xs, gs, prevs):
        x.sub_(g * lr)
        prev.copy_(g)


def _c_two_grads(
    xs: list[Tensor], gas: list[Tensor], gbs: list[Tensor], ds: list[Tensor], lr: Tensor, beta: Tensor
) -> None:
    for x, ga, gb, d in zip(xs, gas, gbs, ds):
        x.sub_(gb * lr)
        d.copy_(d * beta + (ga - gb) * (1 - beta))


def _c_sgdn_prev(
    xs: list[Tensor], gs: list[Tensor], bs: list[Tensor], prevs: list[Tensor], lr: Tensor, mu: Tensor
) -> None:
    for x, g, b, prev in zip(xs, gs, bs, prevs):
        b_new = b * mu + g
        b.copy_(b_new)
        x.sub_((g + b_new * mu) * lr)
        prev.copy_(g)


def _c_adam_move(xs: list[Tensor], ms: list[Tensor], vs: list[Tensor], lr: Tensor, eps: Tensor) -> None:
    for x, m, v in zip(xs, ms, vs):
        x.sub_(m / (v.sqrt() + eps) * lr)


def _c_copy(dsts: list[Tensor], srcs: list[Tensor]) -> None:
    for dst, src in zip(dsts, srcs):
        dst.copy_(src)


def _compiled(function: Callable[..., object], names: str, *scalars: float) -> Impl:
    def build(pool: Pool) -> Run:
        compiled = torch.compile(function, backend="inductor", fullgraph=True, dynamic=False)
        args = (*pool.lists(names), *(pool.scalar(s) for s in scalars))
        return lambda: compiled(*args)

    return Impl("torch.compile'd loop", build, compiled=True)


# --- torch's kernels, called directly


def _fused_sgd(pool: Pool, xs: list[Tensor], gs: list[Tensor], momentum: float = 0.0, nesterov: bool = False) -> None:
    torch._fused_sgd_(
        xs, gs, pool.m if momentum else [], weight_decay=0.0, momentum=momentum, lr=LR, dampening=0.0,
        nesterov=nesterov, maximize=False, is_first_step=False,
    )  # fmt: skip


def _fused_adam(copy_prev: bool = False) -> Callable[[Pool], Run]:
    """``torch._fused_adam_`` on the pool (then ``prev ← g`` by ``torch._foreach_copy_``)."""

    def build(pool: Pool) -> Run:
        steps = [torch.full((), float(ADAM_STEP), device=pool.device) for _ in pool.x]

        def run() -> None:
            torch._fused_adam_(
                pool.x, pool.g, pool.m, pool.v, [], steps, lr=LR, beta1=BETA1, beta2=BETA2,
                weight_decay=0.0, eps=EPS, amsgrad=False, maximize=False,
            )  # fmt: skip
            if copy_prev:
                torch._foreach_copy_(pool.out, pool.g)

        return run

    return build


def _fused_sgd_then_copy(momentum: float = 0.0, nesterov: bool = False) -> Callable[[Pool], Run]:
    """``torch._fused_sgd_`` on the pool, then ``prev ← g`` by ``torch._foreach_copy_``."""

    def build(pool: Pool) -> Run:
        def run() -> None:
            _fused_sgd(pool, pool.x, pool.g, momentum, nesterov)
            torch._foreach_copy_(pool.out, pool.g)

        return run

    return build


def _optimizer(row: str, label: str) -> Impl:
    """``step()`` of torch's fused optimizer ``row`` (``step_overhead``'s factory) on its own copy of
    the parameters, with the pool's gradient."""
    make = next(r.make for r in ROWS if r.name == row)

    def build(pool: Pool) -> Run:
        params = [torch.nn.Parameter(x.clone()) for x in pool.x]
        for p, g in zip(params, pool.g):
            p.grad = g
        return make(params).step

    return Impl(label, build, row=row)


def _adam_move_eager(pool: Pool) -> Run:
    def run() -> None:
        denom = torch._foreach_sqrt(pool.v)
        torch._foreach_add_(denom, EPS)
        torch._foreach_addcdiv_(pool.x, pool.m, denom, value=-LR)

    return run


def _two_grads_eager(pool: Pool) -> Run:
    def run() -> None:
        _fused_sgd(pool, pool.x, pool.h)
        torch._foreach_mul_(pool.m, BETA1)
        torch._foreach_add_(pool.m, pool.g, alpha=1 - BETA1)
        torch._foreach_add_(pool.m, pool.h, alpha=-(1 - BETA1))

    return run


def _sgdm_foreach(pool: Pool) -> Run:
    def run() -> None:
        torch._foreach_mul_(pool.m, MOMENTUM)
        torch._foreach_add_(pool.m, pool.g)
        torch._foreach_add_(pool.x, pool.m, alpha=-LR)

    return run


def _sgdm_then_dots(pool: Pool) -> Run:
    dots = _per_tensor_dots(torch.dot, "g m")(pool)

    def run() -> None:
        _fused_sgd(pool, pool.x, pool.g, MOMENTUM)
        dots()

    return run


def _reduce(k: int) -> Primitive:
    names = " ".join("g m v x".split()[:k])
    impls = [
        Impl("torch.dot per tensor", _per_tensor_dots(torch.dot, names)),
        Impl("torch.linalg.vecdot per tensor", _per_tensor_dots(torch.linalg.vecdot, names)),
        _compiled(_c_reduce, names),
    ]
    if k == 1:
        impls.insert(0, Impl("torch._foreach_norm", lambda pool: lambda: torch._foreach_norm(pool.g)))
    sums = ", ".join(("‖{0}‖²" if i == j else "⟨{0},{1}⟩").format("abcd"[i], "abcd"[j]) for i, j in _pairs(k))
    return Primitive(f"reduce({k})", k, f"per tensor: {sums}", tuple(impls))


PRIMITIVES: dict[str, Primitive] = {
    p.name: p
    for p in (
        *(_reduce(k) for k in (1, 2, 3, 4)),
        Primitive(
            "update(2,1,0)",
            3,
            "x ← x − η·g (SGD)",
            (
                _optimizer(SGD_FUSED, "torch.optim.SGD(fused=True).step()"),
                Impl("torch._fused_sgd_", lambda pool: lambda: _fused_sgd(pool, pool.x, pool.g)),
                Impl("torch._foreach_add_", lambda pool: lambda: torch._foreach_add_(pool.x, pool.g, alpha=-LR)),
                _compiled(_c_sgd, "x g", LR),
            ),
        ),
        Primitive(
            "update(3,2,0)",
            5,
            "b ← μb + g, x ← x − η·b (SGD-M)",
            (
                _optimizer(SGDM_FUSED, "torch.optim.SGD(momentum, fused=True).step()"),
                Impl("torch._fused_sgd_ (momentum)", lambda pool: lambda: _fused_sgd(pool, pool.x, pool.g, MOMENTUM)),
                Impl("3 torch._foreach_ ops", _sgdm_foreach),
                _compiled(_c_sgdm, "x g m", LR, MOMENTUM),
            ),
        ),
        Primitive(
            "update(3,2,0)+sum",
            5,
            "SGD-M and per tensor ⟨g, b_new⟩",
            (
                Impl("torch._fused_sgd_ (momentum) + torch.dot per tensor", _sgdm_then_dots),
                _compiled(_c_sgdm_sum, "x g m", LR, MOMENTUM),
            ),
        ),
        Primitive(
            "update(4,3,0)",
            7,
            "Adam (m, v, x)",
            (
                _optimizer(ADAM_FUSED, "torch.optim.Adam(fused=True).step()"),
                Impl("torch._fused_adam_", _fused_adam()),
                _compiled(_c_adam, "x g m v", *ADAM_SCALARS),
            ),
        ),
        Primitive(
            "update(2,1,1)",
            4,
            "x ← x − η·g, prev ← g",
            (
                Impl("torch._fused_sgd_ + torch._foreach_copy_", _fused_sgd_then_copy()),
                _compiled(_c_sgd_prev, "x g out", LR),
            ),
        ),
        Primitive(
            "update(4,3,1)",
            8,
            "Adam, prev ← g",
            (
                Impl("torch._fused_adam_ + torch._foreach_copy_", _fused_adam(copy_prev=True)),
                _compiled(_c_adam_prev, "x g m v out", *ADAM_SCALARS),
            ),
        ),
        Primitive(
            "update(3,2,1)",
            6,
            "Nesterov SGD-M, prev ← g",
            (
                Impl("torch._fused_sgd_ (nesterov) + torch._foreach_copy_", _fused_sgd_then_copy(MOMENTUM, True)),
                _compiled(_c_sgdn_prev, "x g m out", LR, MOMENTUM),
            ),
        ),
        Primitive(
            "update(4,2,0)",
            6,
            "x ← x − η·g_b, D ← βD + (1−β)(g_a − g_b)",
            (
                Impl("torch._fused_sgd_ + 3 torch._foreach_ ops", _two_grads_eager),
                _compiled(_c_two_grads, "x g h m", LR, BETA1),
            ),
        ),
        Primitive(
            "update(3,1,0)",
            4,
            "x ← x − η·m/(√v + ε)",
            (
                Impl("torch._foreach_sqrt + _add_ + _addcdiv_", _adam_move_eager),
                _compiled(_c_adam_move, "x m v", LR, EPS),
            ),
        ),
        Primitive(
            "copy",
            2,
            "out ← g (out not read)",
            (
                Impl("torch._foreach_copy_", lambda pool: lambda: torch._foreach_copy_(pool.out, pool.g)),
                Impl("Tensor.copy_ per tensor", lambda pool: lambda: [o.copy_(g) for o, g in zip(pool.out, pool.g)]),
                _compiled(_c_copy, "out g"),
            ),
        ),
    )
}

#: Torch's fused optimizers: the unit (fused SGD) and the methods' baselines.
BASELINES = (SGD_FUSED, SGDM_FUSED, ADAM_FUSED)


# ----------------------------------------------------------------------------------------------
# Timing


def measure(
    device: torch.device | str = "cpu",
    rounds: int = 25,
    warmup: int = 3,
    *,
    shapes: Sequence[Sequence[int]] | None = None,
    compiled: bool = True,
    passes: Sequence[str] | None = None,
    flush: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds of every implementation of every pass (and of the fused baselines) in each round.

    Args:
        shapes: the tensors' shapes (default: ResNet-18's parameters).
        compiled: also time the ``torch.compile``\\ d candidates (each compiles on its first call).
        passes: only these primitives (the fused baselines are always timed).
        flush: read a buffer larger than the last-level cache before each timed call.
    """
    device = torch.device(device)
    say = progress or (lambda _: None)
    if shapes is None:
        shapes = [p.shape for p in resnet18_parameters(device)]
    pool = Pool([torch.Size(s) for s in shapes], device)
    rows: dict[str, Run] = {}
    chosen = [PRIMITIVES[name] for name in (passes if passes is not None else PRIMITIVES)]
    needed = [(p, i) for p in PRIMITIVES.values() for i in p.impls if i.row in BASELINES]
    needed += [(p, i) for p in chosen for i in p.impls if (compiled or not i.compiled) and not i.row]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=4096):
        for n, (primitive, impl) in enumerate(needed, 1):
            name = row_name(primitive, impl)
            say(f"[{n}/{len(needed)}] {'compiling' if impl.compiled else 'setting up'} {name}")
            rows[name] = impl.build(pool)
            rows[name]()  # compiles; allocates the optimizers' state
            sync()
        scratch = torch.ones(FLUSH_BYTES // 4, device=device) if flush else None
        times: dict[str, list[float]] = {name: [] for name in rows}
        order = list(rows)
        for round_ in range(warmup + rounds):
            if round_ >= warmup and (round_ - warmup) % 5 == 0:
                say(f"round {round_ - warmup + 1} of {rounds}")
            shift = round_ % len(order)
            for name in order[shift:] + order[:shift]:
                if scratch is not None:
                    scratch.sum()
                sync()
                start = time.perf_counter()
                rows[name]()
                sync()
                if round_ >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class Cost:
    """A primitive's fastest implementation and what the others cost."""

    primitive: str
    best: str
    cost: float  # median over rounds of its time / fused SGD's, same round
    ms: float
    others: dict[str, float]


def pass_costs(times: Mapping[str, list[float]]) -> dict[str, Cost]:
    """Per primitive timed in ``times``: its fastest implementation, in units of fused SGD."""
    costs = {}
    for primitive in PRIMITIVES.values():
        measured = {
            impl.label: (paired_ratio(times, row_name(primitive, impl), SGD_FUSED), row_name(primitive, impl))
            for impl in primitive.impls
            if row_name(primitive, impl) in times
        }
        if not measured:
            continue
        best = min(measured, key=lambda label: measured[label][0])
        costs[primitive.name] = Cost(
            primitive.name,
            best,
            measured[best][0],
            statistics.median(times[measured[best][1]]) * 1e3,
            {label: ratio for label, (ratio, _) in measured.items() if label != best},
        )
    return costs


def unit_costs(times: Mapping[str, list[float]]) -> dict[str, float]:
    """The costs ``measured_floor`` reads: each primitive's fastest, and each fused baseline's."""
    costs = {name: c.cost for name, c in pass_costs(times).items()}
    costs.update({b: paired_ratio(times, b, SGD_FUSED) for b in BASELINES if b in times})
    return costs


# ----------------------------------------------------------------------------------------------
# Tables


def primitive_table(costs: Mapping[str, Cost]) -> str:
    lines = [
        "| pass | accesses | what | fastest implementation | cost (× fused SGD) | ms | per access (fused SGD = 1) | other implementations (cost) |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]
    for name, c in costs.items():
        primitive = PRIMITIVES[name]
        others = "; ".join(f"{label} {ratio:.2f}" for label, ratio in sorted(c.others.items(), key=lambda kv: kv[1]))
        per_access = c.cost / primitive.accesses * PRIMITIVES["update(2,1,0)"].accesses
        lines.append(
            f"| {name} | {primitive.accesses} | {primitive.what} | {c.best} | {c.cost:.2f} | {c.ms:.2f} | "
            f"{per_access:.2f} | {others} |"
        )
    return "\n".join(lines)


def method_table(costs: Mapping[str, float]) -> str:
    """Per method whose passes and baseline were measured: the access floor, the target and the
    measured floor, and whether the target is reachable here."""
    lines = [
        "| method | fused baseline | passes | accesses (method / baseline) | access floor | target (1.2 × access floor) | measured floor | measured / access floor | target reachable here |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for method in METHODS.values():
        if method.baseline not in costs or any(p not in costs for p in method.passes):
            continue
        floor = measured_floor(method, costs)
        passes = " + ".join(method.passes) + (f" (over {method.per} steps)" if method.per > 1 else "")
        reachable = "yes" if floor <= method.target else f"no ({floor:.2f} > {method.target:.2f})"
        lines.append(
            f"| {method.name} | {method.baseline} | {passes} | {method.accesses:g} / {method.baseline_accesses:g} | "
            f"{method.access_floor:.2f} | {method.target:.2f} | {floor:.2f} | {floor / method.access_floor:.2f} | {reachable} |"
        )
    return "\n".join(lines)


def report(times: Mapping[str, list[float]], device: str, rounds: int) -> str:
    costs = pass_costs(times)
    units = unit_costs(times)
    sgd_ms = statistics.median(times[SGD_FUSED]) * 1e3
    text = (
        f"Primitive passes over ResNet-18's parameter shapes (float32), {device}, {machine()}; median of "
        f"{rounds} interleaved rounds; cost = median over rounds of the pass's time / fused SGD's "
        f"({SGD_FUSED}: {sgd_ms:.2f} ms) in the same round; the fastest implementation of each pass is kept.\n\n"
    )
    text += primitive_table(costs)
    text += "\n\nFused baselines (× fused SGD): " + ", ".join(
        f"{b} {units[b]:.2f} ({statistics.median(times[b]) * 1e3:.2f} ms)" for b in BASELINES
    )
    text += (
        "\n\nPer method: its least pass structure priced with the costs above, against its fused baseline "
        "(the measured floor), beside the access-count floor and the target:\n\n"
    )
    text += method_table(units)
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--rounds", type=int, default=25, help="measured rounds (default 25)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (default 3)")
    parser.add_argument("--eager", action="store_true", help="leave out the torch.compile'd implementations")
    parser.add_argument("--no-flush", action="store_true", help="do not evict the caches before each timed call")
    parser.add_argument("--markdown", help="also write the report to this file")
    args = parser.parse_args(argv)
    times = measure(
        args.device,
        args.rounds,
        args.warmup,
        compiled=not args.eager,
        flush=not args.no_flush,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    return emit(report(times, args.device, args.rounds), args.markdown)


if __name__ == "__main__":
    main()
