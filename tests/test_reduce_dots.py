"""``tensor_dots`` and ``sqnorm`` against float64 sums by hand, on every kind of list they take: the
plain case (one real float32 or float64 dtype, one BLAS dot per pair) and the ones that convert
(mixed or 16-bit dtypes, complex tensors, ``None`` partners, non-contiguous views)."""

from __future__ import annotations

import pytest
import torch

from lightning_adaptive_lr.optim._reduce import sqnorm, tensor_dots

CPU = torch.device("cpu")


def _lists(kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 2), ()]
    xs = [torch.randn(s, generator=gen) for s in shapes]
    ys: list[torch.Tensor | None] = [torch.randn(s, generator=gen) for s in shapes]
    if kind == "float64":
        xs, ys = [x.double() for x in xs], [y.double() for y in ys]
    elif kind == "mixed":
        xs[1], ys[1] = xs[1].double(), ys[1].double()
    elif kind == "float16":
        xs, ys = [x.half() for x in xs], [y.half() for y in ys]
    elif kind == "complex":
        xs[0] = torch.complex(xs[0], xs[0] * 2)
        ys[0] = torch.complex(ys[0], -ys[0])
    elif kind == "none":
        ys[2] = None
    elif kind == "strided":
        xs[0], ys[0] = xs[0].t(), ys[0].t()
    return xs, ys


def _reference(x: torch.Tensor, y: torch.Tensor | None) -> float:
    if y is None:
        return 0.0
    if x.is_complex():
        x, y = torch.view_as_real(x), torch.view_as_real(y)
    return float((x.double() * y.double()).sum())


@pytest.mark.parametrize("kind", ["float32", "float64", "mixed", "float16", "complex", "none", "strided"])
def test_tensor_dots_and_sqnorm_are_the_sums_by_hand(kind: str) -> None:
    xs, ys = _lists(kind)
    got = tensor_dots(xs, ys, CPU)
    assert got.dtype == torch.float64 and got.shape == (len(xs),)
    want = torch.tensor([_reference(x, y) for x, y in zip(xs, ys)], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    squares = sum(_reference(x, x) for x in xs)
    assert float(sqnorm(xs, CPU)) == pytest.approx(squares, rel=1e-6)


def test_a_none_partner_keeps_a_non_finite_tensor_visible() -> None:
    xs, ys = _lists("none")
    xs[2][0] = float("nan")
    assert torch.isnan(tensor_dots(xs, ys, CPU)[2])
