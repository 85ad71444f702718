"""The ``lalr`` command: LightningCLI with this package's optimizers, tasks and callbacks.

::

    lalr fit --config configs/quickstart.yaml
    lalr fit --model.backbone resnet20 --data CIFAR10DataModule --data.download true \\
             --optimizer MoMo --optimizer.lr 1.0 --trainer.max_epochs 50
    lalr fit --config configs/momo_cifar10_resnet20.yaml --print_config

* Subcommands ``fit``, ``validate``, ``test``; and ``lalr sweep``, the learning-rate sensitivity
  sweep of :mod:`lightning_adaptive_lr.sweep` (plain PyTorch, its own options: ``lalr sweep --help``).
* ``--optimizer`` takes a class name of this package (``MoMo``, ``MoMoAdam``, ``QLAB``,
  ``HierarchicalHD``, ``AdaL``, ``StepTunedSGD``) or of ``torch.optim`` (``SGD``, ``Adam``, ...),
  or any import path.  Without ``--optimizer`` the model's default (MoMo, lr 1) is used.
* ``--model`` defaults to :class:`~lightning_adaptive_lr.tasks.ImageClassifier` (or a subclass);
  ``--data`` to :class:`~lightning_adaptive_lr.tasks.DigitsDataModule` (offline); any subclass of
  :class:`~lightning_adaptive_lr.tasks.ImageDataModule` by class name.  The data module's
  ``input_shape`` and ``num_classes`` are passed to the model.
* Logging to TensorBoard under ``lightning_logs/`` by default.  ``AdaptiveLRCallback`` (feeds the
  loss to the optimizers that need it) and ``AdaptiveLRMonitor`` (logs the step sizes) are added
  to the Trainer unless the configuration already lists one of the same class.
* ``fit --test_after_fit true`` evaluates the test split after training and prints its metrics.
* Seeded with 0 unless ``--seed_everything`` says otherwise.
* Bad input (unknown class, wrong type, missing file, missing dataset) prints one line on stderr
  and exits with status 2.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from . import optim as _optim  # noqa: F401  (imported so jsonargparse finds the optimizers by class name)
from .tasks import DatasetNotFoundError, DigitsDataModule, ImageClassifier, ImageDataModule

__all__ = ["AdaptiveLRCLI", "ConfigurationError", "main", "readable_error"]

#: The callbacks the command adds to every Trainer (when the package provides them) unless the
#: configuration already has one of the class: module path and class name.
DEFAULT_CALLBACKS: tuple[tuple[str, str], ...] = (
    ("lightning_adaptive_lr.callbacks", "AdaptiveLRCallback"),
    ("lightning_adaptive_lr.callbacks", "AdaptiveLRMonitor"),
)

_SUBCOMMANDS = ("fit", "validate", "test")


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


class AdaptiveLRCLI(LightningCLI):
    """LightningCLI with this package's defaults (see the module docstring).

    Usable from Python as ``AdaptiveLRCLI(args=["fit", "--config", "configs/quickstart.yaml"])``.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        self._default_callbacks = _default_callback_classes()
        # Reproducible unless asked otherwise (LightningCLI's own default draws a seed).
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("model_class", ImageClassifier)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("datamodule_class", ImageDataModule)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault(
            "trainer_defaults",
            {
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": ""},
                }
            },
        )
        # A run's config.yaml is written next to its logs; a new version directory each run.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Errors are raised (and turned into one line by main()) rather than printed with the usage.
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("exit_on_error", False)
        parser_kwargs.setdefault("prog", "lalr")
        parser_kwargs.setdefault("description", _DESCRIPTION)
        for subcommand in _SUBCOMMANDS:
            parser_kwargs.setdefault(subcommand, {}).setdefault("exit_on_error", False)
        super().__init__(args=args, run=run, parser_kwargs=parser_kwargs, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (no ``predict``: the tasks define no prediction)."""
        return {name: spec for name, spec in LightningCLI.subcommands().items() if name in _SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults(
            {
                "model": {"class_path": f"{ImageClassifier.__module__}.{ImageClassifier.__name__}"},
                "data": {"class_path": f"{DigitsDataModule.__module__}.{DigitsDataModule.__name__}"},
            }
        )
        # The network's input and output sizes are the data's: taken from the data module once
        # it exists, so no configuration has to repeat them.
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After `fit`, evaluate the test split with the final weights and print its metrics "
            "(ignored by `validate` and `test`).",
        )

    def instantiate_classes(self) -> None:
        # A ValueError/TypeError here comes from a constructor rejecting its configured arguments
        # (an optimizer's range check, a backbone too large for the images, ...): bad input.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            raise ConfigurationError(readable_error(str(err))) from err

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # ImageClassifier's own configure_optimizers is only the fallback for runs without
        # --optimizer; replacing it is the intended behaviour, not worth a warning.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*configure_optimizers` will be overridden")
            super()._add_configure_optimizers_method_to_model(subcommand)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        present = {type(cb) for cb in trainer.callbacks}
        missing = [cls() for cls in self._default_callbacks if not any(issubclass(p, cls) for p in present)]
        # Lightning puts checkpoint callbacks back at the end when fitting starts.
        trainer.callbacks.extend(missing)
        return trainer

    def after_fit(self) -> None:
        if self.config.fit.get("test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


class ConfigurationError(ValueError):
    """The configuration names valid classes, but one of them rejected its arguments."""


# ----------------------------------------------------------------------------- error messages

_KEY = re.compile(r'Parser key "([^"]+)"')
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)'")
_NOT_ACCEPTED = re.compile(r"Option '([^']+)' is not accepted")
_EXPECTED_GOT = re.compile(r"Expected an? (.+?)\. Got value: (.*)")
_SUBTYPES = re.compile(r"Subtypes: \[(.*)\]")
_GIVEN = re.compile(r"Given value: (.*)")
_UNKNOWN_CLASS = ("Expected a dot import path string", "does not correspond to a subclass", "not accessible or invalid")

#: What to suggest when a class name is not found, by the option's first part.
_CLASS_HINTS = {
    "optimizer": "this package's MoMo, MoMoAdam, QLAB, HierarchicalHD, AdaL, StepTunedSGD, torch.optim's "
    "SGD, Adam, AdamW, ..., or an import path",
    "lr_scheduler": "a torch.optim.lr_scheduler class such as StepLR or CosineAnnealingLR, or an import path",
    "model": "ImageClassifier (or a subclass, by import path)",
    "data": "DigitsDataModule, MNISTDataModule, CIFAR10DataModule, FakeDataModule (or a subclass, by import path)",
    "trainer": "a Callback class such as AdaptiveLRMonitor or ModelCheckpoint, or an import path",
}


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
    "`lalr sweep` runs the learning-rate sensitivity sweep instead (see `lalr sweep --help`)."
)


def _fail(message: str) -> NoReturn:
    sys.stderr.write(f"lalr: error: {message}\n")
    raise SystemExit(2)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lalr`` command (``python -m lightning_adaptive_lr.cli``).

    Exits with status 2 and one line on stderr for bad input: an unknown class or option, a value
    of the wrong type, a missing config file, arguments a class rejects, a dataset not on disk.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["sweep"]:  # not a Lightning subcommand: no jsonargparse, no Trainer
        from .sweep import main as sweep_main

        sweep_main(argv[1:])
        return
    try:
        from jsonargparse import ArgumentError
    except ImportError:
        sys.stderr.write("lalr: error: the command needs jsonargparse: pip install 'lightning-adaptive-lr[cli]'\n")
        raise SystemExit(1) from None

    # Lightning announces the seed on stderr before the classes are built; an error in building
    # them must stay the only line there (the seed is in the run's saved config.yaml).
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    try:
        # None (not sys.argv[1:]) from the console script: LightningCLI warns when given both.
        AdaptiveLRCLI(args=None if args is None else argv)
    except ArgumentError as err:
        _fail(readable_error(str(err)))
    except (ConfigurationError, DatasetNotFoundError) as err:
        _fail(str(err))


if __name__ == "__main__":
    main()
