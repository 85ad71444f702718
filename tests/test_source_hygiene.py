"""The package's sources compile without warnings (an invalid escape in a docstring is a
DeprecationWarning on Python 3.11 and a SyntaxWarning from 3.12, shown to every user at import)."""

from __future__ import annotations

import pathlib
import warnings

import pytest

import lightning_adaptive_lr

ROOT = pathlib.Path(lightning_adaptive_lr.__file__).parent
SOURCES = sorted(ROOT.rglob("*.py"))


def test_the_package_has_sources() -> None:
    assert len(SOURCES) > 20


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_source_compiles_without_warnings(path: pathlib.Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
