"""The ``lalr`` command: LightningCLI with this package's optimizers, tasks and callbacks.

::

    lalr fit --config configs/quickstart.yaml
    lalr fit --config configs/quickstart.yaml --ckpt_path last      # resume the run after a crash
    lalr fit --model.backbone resnet20 --data CIFAR10DataModule --data.download true \\
             --optimizer MoMo --optimizer.lr 1.0 --trainer.max_epochs 50
    lalr fit --config configs/momo_cifar10_resnet20.yaml --print_config

* Subcommands ``fit``, ``validate``, ``test``; and ``lalr sweep``, the learning-rate sensitivity
  sweep of :mod:`lightning_adaptive_lr.sweep` (plain PyTorch, its own options: ``lalr sweep --help``).
* ``--optimizer`` takes a class name of this package (``MoMo``, ``MoMoAdam``, ``QLAB``,
  ``HierarchicalHD``, ``AdaL``, ``StepTunedSGD``) or of ``torch.optim`` (``SGD``, ``Adam``, ...),
  or any import path.  Without ``--optimizer`` the model's default (MoMo, lr 1) is used.
  Switching the class on the command line (``--config quickstart.yaml --optimizer Adam``) starts
  from the new class's own defaults: the arguments the configuration gave the other class
  (MoMo's ``lr: 1.0``, ...) are not carried over, which a line on stderr says; pass
  ``--optimizer.lr`` (and any other argument) after ``--optimizer`` to set them.
* ``--model`` defaults to :class:`~lightning_adaptive_lr.tasks.ImageClassifier` (any
  :class:`~lightning_adaptive_lr.tasks.TaskModule` by class name); ``--data`` to
  :class:`~lightning_adaptive_lr.tasks.DigitsDataModule` (offline); any subclass of
  :class:`~lightning_adaptive_lr.tasks.ImageDataModule` by class name.  The data module's
  ``input_shape`` and ``num_classes`` are passed to the model.
* Logs and checkpoints go to ``<default_root_dir>/lightning_logs/version_N/`` (``default_root_dir``:
  ``--trainer.default_root_dir``, else the working directory): TensorBoard's files, the run's
  ``config.yaml`` and ``hparams.yaml`` (plain YAML), and ``checkpoints/`` with ``last.ckpt``,
  written at the end of every epoch.  ``AdaptiveLRCallback`` (feeds the loss to the optimizers
  that need it) and ``AdaptiveLRMonitor`` (logs the step sizes) are added to the Trainer unless
  the configuration already lists one of the same class.
* **Resuming**: ``--ckpt_path last`` resumes the most recent run under ``default_root_dir`` from
  its ``last.ckpt`` (after a crash, a ``kill``, a lost machine), and goes on logging into that
  run's ``version_N``; an error says so when there is none.  ``--ckpt_path PATH`` resumes from a file.
* ``fit --test_after_fit true`` evaluates the test split after training and prints its metrics.
* Seeded with 0 unless ``--seed_everything`` says otherwise.
* Every failure prints one line on stderr, ``lalr: error: ...``, and exits with status 2: bad input
  (unknown class or option, a value of the wrong type or out of range, a missing or unreadable
  config file or checkpoint, a missing dataset), a failed download (which leaves nothing
  half-made behind: neither partial files nor an empty log folder), a file that cannot be
  written, and the errors this package raises on purpose during training.  Set ``LALR_TRACEBACK=1``
  to get the Python traceback instead.
"""

from __future__ import annotations

import glob
import importlib
import inspect
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from . import optim as _optim  # noqa: F401  (imported so jsonargparse finds the optimizers by class name)
from . import tasks
from .tasks import DatasetNotFoundError, DigitsDataModule, ImageClassifier, ImageDataModule

__all__ = ["AdaptiveLRCLI", "ConfigurationError", "DownloadError", "main", "readable_error"]

#: The callbacks the command adds to every Trainer (when the package provides them) unless the
#: configuration already has one of the class: module path and class name.
DEFAULT_CALLBACKS: tuple[tuple[str, str], ...] = (
    ("lightning_adaptive_lr.callbacks", "AdaptiveLRCallback"),
    ("lightning_adaptive_lr.callbacks", "AdaptiveLRMonitor"),
)

#: Where the default logger writes, under ``default_root_dir``: ``lightning_logs/version_N``.
LOG_FOLDER = "lightning_logs"

#: Set to 1 to see the Python traceback of a failure instead of its one-line message.
TRACEBACK_VARIABLE = "LALR_TRACEBACK"

_SUBCOMMANDS = ("fit", "validate", "test")
#: ``--ckpt_path`` values that name no file: Lightning resolves them.
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")

#: The base class of ``--model`` (every ready module of :mod:`.tasks`).
_MODEL_BASE: type = getattr(tasks, "TaskModule", ImageClassifier)


def _default_callback_classes() -> list[type[Callback]]:
    """The classes of :data:`DEFAULT_CALLBACKS` that exist in this installation.

    Imported here, not at module level, so the command works while a callback is not yet
    available, and so jsonargparse finds them by class name in ``--trainer.callbacks``.
    """
    classes = []
    for module_name, class_name in DEFAULT_CALLBACKS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is not None and module_name.startswith(err.name):
                continue  # the subpackage itself is absent; a missing dependency inside it is a real error
            raise
        cls = getattr(module, class_name, None)
        if isinstance(cls, type) and issubclass(cls, Callback):
            classes.append(cls)
    return classes


class ConfigurationError(ValueError):
    """The configuration names valid classes, but one of them rejected its arguments."""


class DownloadError(ConfigurationError):
    """A data module asked to download its dataset could not (no network, a folder not writable)."""


def _is_rank_zero() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def _notice(message: str) -> None:
    """A line on stderr (once, from the first process) about a choice the command made for the user."""
    if _is_rank_zero():
        sys.stderr.write(f"lalr: {message}\n")


class AdaptiveLRCLI(LightningCLI):
    """LightningCLI with this package's defaults (see the module docstring).

    Usable from Python as ``AdaptiveLRCLI(args=["fit", "--config", "configs/quickstart.yaml"])``.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        self._default_callbacks = _default_callback_classes()
        self._run_folder: _RunFolder | None = None
        self._resume_version: int | None = None
        # Reproducible unless asked otherwise (LightningCLI's own default draws a seed).
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("model_class", _MODEL_BASE)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        # A run's config.yaml is written next to its logs (overwritten when a run is resumed).
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Errors are raised (and turned into one line by main()) rather than printed with the usage.
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("exit_on_error", False)
        parser_kwargs.setdefault("prog", "lalr")
        parser_kwargs.setdefault("description", _DESCRIPTION)
        for subcommand in _SUBCOMMANDS:
            parser_kwargs.setdefault(subcommand, {}).setdefault("exit_on_error", False)
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)) and argv[:1] == ["sweep"]:
            raise ConfigurationError(
                "`sweep` is not a Lightning subcommand: run `lalr sweep ...` or lightning_adaptive_lr.sweep.main([...])"
            )
        try:
            with warnings.catch_warnings():
                # Lightning's own use of a torch API deprecated since torch 2.10: noise in every run.
                warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
                super().__init__(args=args, run=run, parser_kwargs=parser_kwargs, **kwargs)
        except BaseException:
            if self._run_folder is not None:
                self._run_folder.discard_if_unused(getattr(self, "trainer", None))
            raise

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (no ``predict``: the tasks define no prediction)."""
        return {name: spec for name, spec in LightningCLI.subcommands().items() if name in _SUBCOMMANDS}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `lalr sweep` never reaches this parser (main() hands it to the sweep's own); listed for --help.
        action = getattr(parser, "_subcommands_action", None)
        if action is not None:
            from jsonargparse import ArgumentParser

            action.add_subcommand("sweep", ArgumentParser(prog="lalr sweep", description=_SWEEP_HELP), help=_SWEEP_HELP)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": f"{ImageClassifier.__module__}.{ImageClassifier.__name__}"},
                "data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__name__}"},
            }
        )
        # The network's input and output sizes are the data's: taken from the data module once
        # it exists, so no configuration has to repeat them.  As a list, so that hparams.yaml stays
        # plain YAML (a tuple would be written as !!python/tuple, which yaml.safe_load refuses).
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", compute_fn=list, apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, evaluate the test split with the final weights and print its metrics "
            "(ignored by `validate` and `test`).",
        )

    # ------------------------------------------------------------------ parsing

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        if args is None:  # the console script: the command line itself
            self.config = parser.parse_args(_without_inherited_optimizer_arguments(parser, sys.argv[1:]))
        elif isinstance(args, (list, tuple)):
            super().parse_arguments(parser, _without_inherited_optimizer_arguments(parser, list(args)))
        else:
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._resolve_checkpoint(self.config[subcommand], subcommand)

    def _resolve_checkpoint(self, config: Any, subcommand: str) -> None:
        """``--ckpt_path last`` → the most recent run's ``last.ckpt``; any file: readable, or one line."""
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is None:
            return
        if ckpt_path == "last":
            found = _find_last_checkpoint(config)
            config["ckpt_path"] = ckpt_path = str(found)
            if subcommand == "fit" and _uses_default_logger(config):
                self._resume_version = _version_of(found, _default_log_root(config))
        _check_checkpoint(str(ckpt_path))

    # ------------------------------------------------------------------ building the classes

    def instantiate_classes(self) -> None:
        # A ValueError/TypeError here comes from a constructor rejecting its configured arguments
        # (an optimizer's range check, a backbone too large for the images, ...): bad input.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            if isinstance(err, ConfigurationError):
                raise
            raise ConfigurationError(readable_error(str(err))) from err
        if isinstance(self.datamodule, LightningDataModule):
            _guard_download(self.datamodule)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # ImageClassifier's own configure_optimizers is only the fallback for runs without
        # --optimizer; replacing it is the intended behaviour, not worth a warning.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden")
            super()._add_configure_optimizers_method_to_model(subcommand)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        root = Path(config.get("default_root_dir") or os.getcwd())
        if config.get("logger") in (None, True) and "logger" not in kwargs:
            # Lightning's default logger, but with the version of the run being resumed.
            logger = TensorBoardLogger(save_dir=str(root), name=LOG_FOLDER, version=self._resume_version)
            kwargs["logger"] = logger
            if self._resume_version is None:
                self._run_folder = _RunFolder(Path(logger.root_dir), Path(logger.log_dir))
        if config.get("enable_checkpointing") is not False and not any(
            isinstance(cb, Checkpoint) for cb in config.get("callbacks") or []
        ):
            # Lightning's default checkpoint, plus `last.ckpt` for --ckpt_path last.
            config["callbacks"] = [*(config.get("callbacks") or []), ModelCheckpoint(save_last=True)]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError, TypeError) as err:
            # The Trainer's own checks (`max_epochs=-2`, ...): bad input too.
            raise ConfigurationError(f"--trainer: {_one_line(err)}") from err
        present = {type(cb) for cb in trainer.callbacks}
        missing = [cls() for cls in self._default_callbacks if not any(issubclass(p, cls) for p in present)]
        # Lightning puts checkpoint callbacks back at the end when fitting starts.
        trainer.callbacks.extend(missing)
        return trainer

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


# ----------------------------------------------------------------------------- switching --optimizer


def _yaml_value(value: Any) -> str:
    """``value`` as a command-line value that jsonargparse reads back unchanged (flow-style YAML)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _optimizer_tokens(argv: Sequence[str]) -> Iterator[tuple[int, int, str, str | None]]:
    """``(start, end, option, value)`` for every ``--optimizer`` / ``--optimizer.*`` argument."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--optimizer" or token.startswith(("--optimizer=", "--optimizer.")):
            option, equals, value = token.partition("=")
            if not equals:  # `--optimizer NAME`: the value is the next token
                value = argv[i + 1] if i + 1 < len(argv) else None
                yield i, i + 2, option, value
                i += 2
                continue
            yield i, i + 1, option, value
        i += 1


def _explicit_optimizer_arguments(argv: Sequence[str]) -> tuple[int | None, set[str]]:
    """Where the last class given with ``--optimizer`` ends in ``argv`` (``None``: no class given
    there), and the names of the arguments given on the command line."""
    import yaml

    end: int | None = None
    names: set[str] = set()
    for _, stop, option, value in _optimizer_tokens(argv):
        if option in ("--optimizer", "--optimizer.class_path"):
            end = stop
            try:
                parsed = yaml.safe_load(value) if value is not None else None
            except yaml.YAMLError:
                parsed = None
            if isinstance(parsed, dict) and isinstance(parsed.get("init_args"), dict):
                names |= set(parsed["init_args"])
        else:
            names.add(option.removeprefix("--optimizer.").removeprefix("init_args."))
    return end, names


def _without_optimizer_arguments(argv: Sequence[str]) -> list[str]:
    drop = {i for start, stop, _, _ in _optimizer_tokens(argv) for i in range(start, stop)}
    return [token for i, token in enumerate(argv) if i not in drop]


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _without_inherited_optimizer_arguments(parser: LightningArgumentParser, argv: list[str]) -> list[str]:
    """``argv`` with the arguments another optimizer class would pass on reset to the new class's defaults.

    jsonargparse keeps the arguments of the configured optimizer that the class given with
    ``--optimizer`` also takes: ``--config quickstart.yaml --optimizer Adam`` would train Adam at
    MoMo's ``lr: 1.0``.  Here the class given on the command line starts from its own defaults,
    updated only by the arguments given on the command line; the values set back are listed on
    stderr.  An argument without a default (an ``lr`` some optimizer requires) must be given.
    """
    if any(token in ("-h", "--help") for token in argv):
        return argv
    end, explicit = _explicit_optimizer_arguments(argv)
    if end is None:
        return argv
    quiet = [token for token in argv if not token.startswith("--print_config")]
    try:
        before = parser.parse_args(_without_optimizer_arguments(quiet))
        after = parser.parse_args(quiet)
    except (Exception, SystemExit):
        return argv  # the real parse below reports what is wrong
    subcommand = after.get("subcommand")
    old = before.get(f"{subcommand}.optimizer") if subcommand else before.get("optimizer")
    new = after.get(f"{subcommand}.optimizer") if subcommand else after.get("optimizer")
    if not old or not new or old.get("class_path") == new.get("class_path"):
        return argv
    old_args, new_args = dict(old.get("init_args") or {}), dict(new.get("init_args") or {})
    cls = _import(new["class_path"])
    parameters = inspect.signature(cls.__init__).parameters
    new_name, old_name = new["class_path"].rsplit(".", 1)[-1], old["class_path"].rsplit(".", 1)[-1]
    reset: dict[str, Any] = {}
    for name in [n for n in old_args if n in new_args and n not in explicit]:
        default = parameters[name].default if name in parameters else inspect.Parameter.empty
        if default is inspect.Parameter.empty:
            raise ConfigurationError(
                f"--optimizer {new_name}: {new_name} has no default {name!r} and the configuration's "
                f"{name}={new_args[name]!r} is {old_name}'s; pass --optimizer.{name}"
            )
        if new_args[name] != default:
            reset[name] = default
    if not reset:
        return argv
    changes = ", ".join(f"{n}={new_args[n]!r}" for n in reset)
    defaults = ", ".join(f"{n}={v!r}" for n, v in reset.items())
    _notice(
        f"--optimizer {new_name} replaces the configuration's {old_name}: {new_name} starts from its own "
        f"defaults ({defaults}), not from {old_name}'s {changes}; pass --optimizer.NAME after --optimizer to set them"
    )
    added = [f"--optimizer.init_args.{name}={_yaml_value(value)}" for name, value in reset.items()]
    return [*argv[:end], *added, *argv[end:]]


# ----------------------------------------------------------------------------- checkpoints and resuming


def _uses_default_logger(config: Any) -> bool:
    return config.get("trainer.logger") in (None, True)


def _root_dir(config: Any) -> Path:
    return Path(config.get("trainer.default_root_dir") or os.getcwd())


def _default_log_root(config: Any) -> Path:
    return _root_dir(config) / LOG_FOLDER


def _configured_checkpoints(config: Any) -> list[Any]:
    """The ``ModelCheckpoint`` entries of ``--trainer.callbacks`` (parsed, not built)."""
    return [
        callback
        for callback in config.get("trainer.callbacks") or []
        if hasattr(callback, "get") and str(callback.get("class_path", "")).endswith("ModelCheckpoint")
    ]


def _checkpoint_folders(config: Any) -> list[Path | str]:
    """Where the Trainer of ``config`` writes checkpoints; a ``*`` stands for any run's version."""
    folders: list[Path | str] = []
    for callback in _configured_checkpoints(config):
        dirpath = (callback.get("init_args") or {}).get("dirpath")
        if dirpath:
            folders.append(Path(dirpath))
    logger = config.get("trainer.logger")
    first = logger[0] if isinstance(logger, list) and logger else logger
    root = _root_dir(config)
    if first in (None, True):
        folders.append(_default_log_root(config) / "*" / "checkpoints")
    elif first is False or not hasattr(first, "get"):
        folders.append(root / "checkpoints")
    else:  # a configured logger: <save_dir>/<name>/<version>/checkpoints
        init_args = first.get("init_args") or {}
        save_dir = Path(init_args.get("save_dir") or root)
        name = init_args.get("name")
        folders.append(save_dir / (LOG_FOLDER if name is None else str(name)) / "*" / "checkpoints")
    return folders


def _find_last_checkpoint(config: Any) -> Path:
    """The most recently written ``last*.ckpt`` where this configuration's runs keep checkpoints."""
    folders = _checkpoint_folders(config)
    found: list[Path] = []
    for folder in folders:
        pattern = os.path.join(*(part if part == "*" else glob.escape(part) for part in Path(folder).parts))
        found += [Path(p) for p in glob.glob(os.path.join(pattern, "last*.ckpt"))]
    if not found:
        places = " or ".join(str(f) for f in folders)
        own = bool(_configured_checkpoints(config))
        raise ConfigurationError(
            f"--ckpt_path last: no last checkpoint (last.ckpt) in {places}; a run writes one at the end of every "
            f"epoch{' if its ModelCheckpoint has save_last=True' if own else ''}. Start the run without "
            "--ckpt_path (or give the --trainer.default_root_dir where it ran)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _version_of(checkpoint: Path, log_root: Path) -> int | None:
    """``N`` when ``checkpoint`` is ``<log_root>/version_N/checkpoints/...``, else ``None``."""
    run = checkpoint.parent.parent
    match = re.fullmatch(r"version_(\d+)", run.name)
    if checkpoint.parent.name != "checkpoints" or match is None or run.parent.resolve() != log_root.resolve():
        return None
    return int(match.group(1))


def _check_checkpoint(path: str) -> None:
    """One line, before anything is built, when ``--ckpt_path`` is not a checkpoint the command can load.

    LightningCLI reads the model's hyperparameters from it with ``torch.load(weights_only=True)``.
    """
    if path in _CKPT_KEYWORDS or "://" in path or Path(path).is_dir():
        return  # resolved by Lightning, remote, or a distributed checkpoint folder
    if not Path(path).exists():
        raise ConfigurationError(f"--ckpt_path: there is no checkpoint at {path}")
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # a file of the old format
    except pickle.UnpicklingError as err:
        reason = next((line for line in _lines(err) if "Unsupported global" in line), _one_line(err))
        raise ConfigurationError(
            f"--ckpt_path {path}: torch.load(weights_only=True), with which the command reads checkpoints, refuses "
            f"it ({reason.split(' Please use')[0].strip()}); a checkpoint that `lalr fit` wrote always loads"
        ) from err
    except Exception as err:  # a truncated or foreign file
        raise ConfigurationError(
            f"--ckpt_path {path}: not a readable checkpoint ({_one_line(err)}); if writing it was interrupted, "
            "resume from an earlier one"
        ) from err


class _RunFolder:
    """The log folder a new run gets, removed again when the run fails before its first step."""

    def __init__(self, root: Path, log_dir: Path) -> None:
        self.root, self.log_dir = root, log_dir
        self.root_existed = root.exists()

    def discard_if_unused(self, trainer: Trainer | None) -> None:
        if trainer is not None and trainer.global_step > 0:
            return
        if self.log_dir.is_dir() and not any(self.log_dir.rglob("*.ckpt")):
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if not self.root_existed and self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()


# ----------------------------------------------------------------------------- downloads


class _NewPaths:
    """What appears under ``folder`` from now on, to be removed if what creates it fails."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        self.first_missing = missing[-1] if missing else None
        self.before = set(folder.rglob("*")) if folder.is_dir() else set()

    def remove(self) -> None:
        if self.first_missing is not None:
            if self.first_missing.is_dir():
                shutil.rmtree(self.first_missing, ignore_errors=True)
            elif self.first_missing.exists():
                self.first_missing.unlink()
            return
        for path in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path in self.before:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _download_reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    lines = _lines(err)
    return lines[-1].strip("<>") if lines else type(err).__name__


def _guard_download(datamodule: LightningDataModule) -> None:
    """Turn a failed download of ``datamodule`` into one line, after removing what it left behind."""
    if getattr(datamodule, "download", False) is not True or not hasattr(datamodule, "data_dir"):
        return
    original: Callable[[], None] = datamodule.prepare_data

    def prepare_data() -> None:
        folder = Path(datamodule.data_dir)  # type: ignore[attr-defined]
        new = _NewPaths(folder)
        try:
            original()
        except Exception as err:
            new.remove()
            raise DownloadError(
                f"{type(datamodule).__name__}: downloading the dataset into {folder.resolve()} failed "
                f"({_download_reason(err)}); check the network connection and that the folder can be written, "
                "or put a copy of the dataset there and run with --data.download false"
            ) from err

    datamodule.prepare_data = prepare_data  # type: ignore[method-assign]


# ----------------------------------------------------------------------------- error messages

_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED_GOT = re.compile(r"Expected an? (.+?)\. Got value: (.*)")
_SUBTYPES = re.compile(r"Subtypes: \[(.*)\]")
_GIVEN = re.compile(r"Given value: (.*)")
_UNKNOWN_CLASS = ("Expected a dot import path string", "does not correspond to a subclass", "not accessible or invalid")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

#: What to suggest when a class name is not found, by the option's first part.
_CLASS_HINTS = {
    "optimizer": "this package's MoMo, MoMoAdam, QLAB, HierarchicalHD, AdaL, StepTunedSGD, torch.optim's "
    "SGD, Adam, AdamW, ..., or an import path",
    "lr_scheduler": "a torch.optim.lr_scheduler class such as StepLR or CosineAnnealingLR, or an import path",
    "model": "ImageClassifier, CharLanguageModel (or a subclass of TaskModule, by import path)",
    "data": "DigitsDataModule, MNISTDataModule, CIFAR10DataModule, FakeDataModule, StdlibTextDataModule "
    "(or a subclass, by import path)",
    "trainer": "a Callback class such as AdaptiveLRMonitor or ModelCheckpoint, or an import path",
}


def _lines(err: BaseException | str) -> list[str]:
    return [line.strip() for line in _ANSI.sub("", str(err)).splitlines() if line.strip()]


def _one_line(err: BaseException | str) -> str:
    """An error's message on one line (its lines joined, terminal colours removed)."""
    text = " ".join(_lines(err))
    return text or (type(err).__name__ if isinstance(err, BaseException) else "")


def _type_name(text: str) -> str:
    """``"<class 'int'>"`` → ``int``; ``"<class 'NoneType'>"`` → ``None``; ``"typing.Literal['a']"`` → ``one of 'a'``."""
    text = text.strip()
    match = re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", text)
    if match:
        return "None" if match.group(1) == "NoneType" else match.group(1)
    match = re.fullmatch(r"typing\.Literal\[(.*)\]", text)
    if match:
        return f"one of {match.group(1)}"
    return text


def _fold(text: str) -> str:
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _first_alternative_error(text: str) -> str | None:
    """The real reason in jsonargparse's "Does not validate against any of the Union subtypes"
    listing: the first error that is not about the ``None`` alternative."""
    if "Errors:" not in text:
        return None
    for line in text.split("Errors:", 1)[1].splitlines():
        line = line.strip()
        if line.startswith("- ") and "NoneType" not in line:
            return line[2:]
    return None


def readable_error(message: str) -> str:
    """One line saying which option is wrong and why, from a (multi-line) jsonargparse error."""
    text = str(message)
    keys = _KEY.findall(text)
    if not keys:
        unknown = _NOT_ACCEPTED.search(text)
        if unknown and "class_path" not in text:
            return f"unknown option {unknown.group(1)!r}"
        # A constructor's own error, which jsonargparse wraps in its listing of alternatives.
        reason = _first_alternative_error(text)
        if reason is None:
            return _fold(text)
        owner = re.search(r"class_path='(?:[\w.]+\.)?(\w+)'", text)
        return f"{owner.group(1)}: {reason}" if owner else reason
    root = keys[0]
    given_match = _GIVEN.search(text)
    given = given_match.group(1).strip() if given_match else ""
    if any(marker in text for marker in _UNKNOWN_CLASS):
        hint = _CLASS_HINTS.get(root.split(".")[0], "a class name or an import path")
        return f"--{root}: unknown class {given!r}; expected {hint}"
    problem = _CLASS_PROBLEM.search(text)
    not_accepted = _NOT_ACCEPTED.search(text)
    if problem and not_accepted:
        cls, option = problem.group(1), not_accepted.group(1)
        if cls in ("torch.optim.Optimizer", "torch.optim.optimizer.Optimizer"):
            return f"--{root}.{option} was given without an optimizer class: add --{root} NAME (e.g. --{root} MoMo)"
        return f"--{root}: {cls.rsplit('.', 1)[-1]} has no argument {option!r}"
    expected_got = _EXPECTED_GOT.search(text)
    if expected_got:
        return f"--{'.'.join(keys)}: expected {_type_name(expected_got.group(1))}, got {expected_got.group(2).strip()!r}"
    subtypes = _SUBTYPES.search(text)
    if subtypes and len(keys) == 1:
        names = [_type_name(t) for t in re.split(r",\s*(?=<|typing|list|dict|tuple)", subtypes.group(1))]
        return f"--{root}: expected {' or '.join(names)}, got {given!r}"
    return f"--{root}: {_fold(_KEY.sub('', text, count=1).lstrip(': '))}"


_DESCRIPTION = (
    "Train with the adaptive-learning-rate optimizers of lightning_adaptive_lr (LightningCLI). "
    "`lalr sweep` runs the learning-rate sensitivity sweep instead (see `lalr sweep --help`). "
    "Resume a run after a crash with the same command and `--ckpt_path last`."
)
_SWEEP_HELP = "Learning-rate sensitivity sweep (plain PyTorch; its own options: `lalr sweep --help`)."


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"lalr: error: {message}\n")
    raise SystemExit(2)


def _raised_by_this_package(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's own code (a message meant for the user)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module == __package__ or module.startswith(f"{__package__}.")


def _failure_message(err: Exception, argument_error: type[BaseException] | None) -> str | None:
    """The one line for a failure of the command; ``None`` for a bug (shown with its traceback)."""
    if argument_error is not None and isinstance(err, argument_error):
        return readable_error(str(err))
    if isinstance(err, (ConfigurationError, DatasetNotFoundError, MisconfigurationException, OSError)):
        return _one_line(err)
    if isinstance(err, (RuntimeError, ValueError, TypeError, pickle.UnpicklingError)) and _raised_by_this_package(err):
        return _one_line(err)
    return None


def _run_reporting_failures(run: Callable[[], Any], argument_error: type[BaseException] | None = None) -> None:
    try:
        run()
    except Exception as err:
        message = _failure_message(err, argument_error)
        if message is None or os.environ.get(TRACEBACK_VARIABLE, "0") not in ("", "0"):
            raise
        _fail(message)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lalr`` command (``python -m lightning_adaptive_lr``).

    Every failure is one line on stderr and exit status 2 (see the module docstring); a bug shows
    its traceback, and ``LALR_TRACEBACK=1`` shows it for every failure.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["sweep"]:  # not a Lightning subcommand: no jsonargparse, no Trainer
        from .sweep import main as sweep_main

        _run_reporting_failures(lambda: sweep_main(argv[1:]))
        return
    try:
        from jsonargparse import ArgumentError
    except ImportError:
        sys.stderr.write("lalr: error: the command needs jsonargparse: pip install 'lightning-adaptive-lr[cli]'\n")
        raise SystemExit(2) from None

    # Lightning announces the seed on stderr before the classes are built; an error in building
    # them must stay the only line there (the seed is in the run's saved config.yaml).
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # None (not sys.argv[1:]) from the console script: LightningCLI warns when given both.
    _run_reporting_failures(lambda: AdaptiveLRCLI(args=None if args is None else argv), ArgumentError)


if __name__ == "__main__":
    main()
