r"""Draw the step-size traces of a training run from its TensorBoard event files.

Makes ``docs/quickstart_traces.png``, the picture in the README: the training loss and the step
size MoMo chose at each step (``effective_lr``, which is MoMo's ``tau``) beneath its cap ``lr``.
The values are those that :class:`~lightning_adaptive_lr.AdaptiveLRMonitor` logs under
``adaptive_lr/<Optimizer>/group<i>/...``, next to the task's ``train_loss``.  Any optimizer of this
package works; ``--optimizer`` picks one when a run has several.

To remake the README's picture (about a minute on two CPU cores), log every step and plot::

    cd "$(mktemp -d)"
    lalr fit --config /path/to/repo/configs/quickstart.yaml --trainer.log_every_n_steps 1
    python /path/to/repo/docs/make_traces_plot.py lightning_logs --out /path/to/repo/docs/quickstart_traces.png \
        --title "Quickstart: MoMo (lr = 1) on the digits MLP"

``LOGDIR`` may be an event file, a run's directory, or a directory of runs (then the run whose
event files were written last is used).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

__all__ = ["find_run", "load_scalars", "main", "plot_traces"]

#: Where the README expects the picture.
DEFAULT_OUT = Path(__file__).resolve().parent / "quickstart_traces.png"
#: The monitor's tag for the step size: ``adaptive_lr/<Optimizer>/group<i>/effective_lr``.
_EFFECTIVE_LR = re.compile(r"^adaptive_lr/(?P<optimizer>[^/]+)/group(?P<group>\d+)/effective_lr$")

Series = tuple[np.ndarray, np.ndarray]


def _event_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("events.out.tfevents.*") if p.is_file())


def find_run(logdir: Path) -> list[Path]:
    """The event files of one run: ``logdir`` itself, its own event files, or the latest run below it."""
    if logdir.is_file():
        return [logdir]
    if not logdir.is_dir():
        raise FileNotFoundError(f"no such file or directory: {logdir}")
    own = _event_files(logdir)
    if own:
        return own
    runs = {p.parent for p in logdir.rglob("events.out.tfevents.*") if p.is_file()}
    if not runs:
        raise FileNotFoundError(f"no TensorBoard event files under {logdir}")
    latest = max(runs, key=lambda run: max(p.stat().st_mtime for p in _event_files(run)))
    return _event_files(latest)


def load_scalars(files: list[Path]) -> dict[str, Series]:
    """Every scalar tag of the files as ``(steps, values)``, sorted by step (files merged)."""
    merged: dict[str, dict[int, float]] = {}
    for path in files:
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: keep every point
        events.Reload()
        for tag in events.Tags()["scalars"]:
            points = merged.setdefault(tag, {})
            for event in events.Scalars(tag):
                points[event.step] = event.value  # a later file's value wins at the same step
    return {
        tag: (np.array(sorted(points), dtype=np.int64), np.array([points[s] for s in sorted(points)], dtype=np.float64))
        for tag, points in merged.items()
    }


def _rolling_median(values: np.ndarray, window: int) -> np.ndarray:
    """Median over ``window`` points centred on each point (fewer at the ends): the trend through
    the per-step noise, without the lag of a trailing window."""
    half = window // 2
    return np.array([np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))])


def _steps_per_epoch(scalars: dict[str, Series]) -> float | None:
    """From the ``epoch`` tag Lightning logs: the median number of steps between epoch starts."""
    if "epoch" not in scalars:
        return None
    steps, epochs = scalars["epoch"]
    starts = [steps[epochs == e].min() for e in np.unique(epochs)]
    if len(starts) < 3:
        return None
    gap = float(np.median(np.diff(starts)))
    return gap if gap > 0 else None


def plot_traces(
    scalars: dict[str, Series],
    out: Path,
    optimizer: str | None = None,
    group: int = 0,
    window: int = 20,
    title: str | None = None,
) -> Path:
    """Two panels sharing the step axis: the training loss, and the step size under ``lr``.

    Args:
        scalars: tag → ``(steps, values)``, as :func:`load_scalars` returns.
        out: the PNG to write (its directory is created).
        optimizer: the ``<Optimizer>`` part of the tags; ``None`` takes the first one found.
        group: the param group.
        window: steps in the rolling median drawn over the raw traces (1: none).
        title: the figure's title; ``None`` names the optimizer.
    """
    found = sorted(
        {(m["optimizer"], int(m["group"])) for m in map(_EFFECTIVE_LR.match, scalars) if m is not None}
    )
    if not found:
        raise ValueError("no adaptive_lr/<Optimizer>/group<i>/effective_lr tag: was AdaptiveLRMonitor in the run?")
    if optimizer is None:
        optimizer = found[0][0]
    if (optimizer, group) not in found:
        raise ValueError(f"no step sizes for {optimizer!r} group {group}; the run has {found}")
    prefix = f"adaptive_lr/{optimizer}/group{group}"
    is_momo = optimizer.startswith("MoMo")

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6.4), sharex=True, height_ratios=(1, 1.25))
    raw = {"color": "tab:blue", "alpha": 0.3, "linewidth": 0.8}
    trend = {"color": "tab:blue", "linewidth": 1.8}

    if "train_loss" in scalars:
        steps, loss = scalars["train_loss"]
        ax_loss.plot(steps, loss, **raw, label="per step")
        if window > 1:
            ax_loss.plot(steps, _rolling_median(loss, window), **trend, label=f"median of {window} steps")
        if (loss > 0).all():
            ax_loss.set_yscale("log")
        ax_loss.legend(loc="upper right", fontsize=9)
    else:
        ax_loss.text(0.5, 0.5, "no train_loss in this run", transform=ax_loss.transAxes, ha="center")
    ax_loss.set_ylabel("training loss")
    ax_loss.grid(True, which="major", alpha=0.3)

    steps, step_size = scalars[f"{prefix}/effective_lr"]
    name = "step size τ (effective_lr)" if is_momo else "step size (effective_lr)"
    ax_lr.plot(steps, step_size, **raw, label=f"{name}, per step")
    if window > 1:
        ax_lr.plot(steps, _rolling_median(step_size, window), **trend, label=f"median of {window} steps")
    if f"{prefix}/lr" in scalars:
        lr_steps, lr = scalars[f"{prefix}/lr"]
        ax_lr.plot(lr_steps, lr, color="tab:red", linestyle="--", linewidth=1.4, label="lr (the cap)" if is_momo else "lr")
        if is_momo:
            # Steps where the cap decided the step size, as ticks just under the cap line.
            cap = np.interp(steps, lr_steps, lr)
            capped = step_size >= cap * (1 - 1e-6)
            ax_lr.plot(
                steps[capped], cap[capped] * 0.93, linestyle="none", marker="|", markersize=6, color="tab:red",
                alpha=0.6, label=f"cap binding ({capped.mean():.0%} of steps)",
            )
    if (step_size > 0).all():
        ax_lr.set_yscale("log")
    ax_lr.set_ylabel("step size")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(True, which="major", alpha=0.3)
    ax_lr.legend(loc="lower right", fontsize=9, framealpha=0.9)

    per_epoch = _steps_per_epoch(scalars)
    if per_epoch is not None:
        top = ax_loss.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")
        top.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_lr.set_xlim(0, max(int(steps.max()), 1))

    fig.suptitle(title if title is not None else f"{optimizer}: training loss and step size", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", nargs="?", default="lightning_logs", type=Path, help="event file or log directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the PNG to write (default {DEFAULT_OUT})")
    parser.add_argument("--optimizer", default=None, help="the <Optimizer> part of the tags (default: the first)")
    parser.add_argument("--group", type=int, default=0, help="the param group (default 0)")
    parser.add_argument("--window", type=int, default=20, help="steps of the rolling median (1: none)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    scalars = load_scalars(find_run(args.logdir))
    out = plot_traces(scalars, args.out, args.optimizer, args.group, max(1, args.window), args.title)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
