"""``python -m lightning_adaptive_lr``: the ``lalr`` command (see :mod:`lightning_adaptive_lr.cli`)."""

from .cli import main

if __name__ == "__main__":
    main()
