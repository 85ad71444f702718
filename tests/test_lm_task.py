"""The language-model task (lightning_adaptive_lr/tasks/language.py): the offline standard-library
text, its split by document, the character vocabulary, the causal Transformer, and its config
trained for a few steps through the command's LightningCLI.  About 10 s on an idle core."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from lightning_adaptive_lr import sweep
from lightning_adaptive_lr.cli import AdaptiveLRCLI
from lightning_adaptive_lr.tasks import (
    CharLanguageModel,
    CharTransformer,
    StdlibTextDataModule,
    TaskModule,
)
from lightning_adaptive_lr.tasks.language import (
    SKIPPED_FOLDERS,
    CharVocabulary,
    _comments,
    _docstrings,
    build_corpus,
    evaluation_windows,
    random_windows,
    stdlib_documents,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "lm_transformer_momo_adam.yaml"


def test_vocabulary_by_hand() -> None:
    v = CharVocabulary()
    assert v.size == 97
    # newline → 0, space → 1, 'A' (65) → 65 − 32 + 1 = 34, '~' (126) → 95, anything else → 96.
    assert v.encode("\n A~").tolist() == [0, 1, 34, 95]
    assert v.encode("é\t→").tolist() == [96, 96, 96]
    text = "Return the value of x.\n  >>> f(1)\n"
    assert v.decode(v.encode(text)) == text


def test_docstrings_are_read_without_importing() -> None:
    source = b'''"""Module doc."""
raise SystemExit("importing this file would stop the interpreter")

class C:
    """Class doc."""

    def f(self):
        """Function doc."""
        return "not a docstring"
'''
    assert _docstrings(source) == "Module doc.\n\nClass doc.\n\nFunction doc."
    assert _docstrings(b"def broken(:\n") == ""  # a file the parser rejects gives no text


def test_comments_by_hand() -> None:
    source = b"#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n# hello\n# world\nx = 1  # inline\n\n# later\n"
    # Shebang and coding lines dropped; consecutive lines form one block; blocks are blank-line separated.
    assert _comments(source) == "hello\nworld\ninline\n\nlater"


def test_stdlib_documents_are_sorted_prose_outside_test_folders() -> None:
    docs = stdlib_documents("docstrings")
    paths = [p for p, _ in docs]
    assert paths == sorted(paths) and len(paths) == len(set(paths)) and len(paths) > 300
    assert not any(SKIPPED_FOLDERS & set(p.split("/")[:-1]) for p in paths)
    textwrap_doc = dict(docs)["textwrap.py"]
    assert textwrap_doc.startswith("Text wrapping and filling.")


def test_split_is_by_document() -> None:
    corpus = build_corpus("docstrings")
    n_train, n_val, n_test = corpus.documents
    assert n_train + n_val + n_test == len(stdlib_documents("docstrings"))
    assert 0.05 < n_val / (n_train + n_val + n_test) < 0.15  # asked for 10 %
    vocab = CharVocabulary()
    train_text = vocab.decode(corpus.train)
    val_text = vocab.decode(corpus.val)
    # Every training document is in the training stream and none of them is in the validation one
    # (documents long enough not to be a common phrase).
    docs = dict(stdlib_documents("docstrings"))
    long_train = [t for p, t in docs.items() if len(t) > 2000 and vocab.decode(vocab.encode(t)) in train_text]
    assert len(long_train) > 50
    assert not any(vocab.decode(vocab.encode(t)) in val_text for t in long_train[:50])
    assert build_corpus("docstrings") is corpus  # built once per process


def test_windows_by_hand() -> None:
    x, y = evaluation_windows(torch.arange(10), 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    x, _ = evaluation_windows(torch.arange(100), 3, max_windows=3)  # 33 windows, 3 evenly spaced
    assert x[:, 0].tolist() == [0, 48, 96]
    a = random_windows(torch.arange(50), 4, 5, torch.Generator().manual_seed(3))
    b = random_windows(torch.arange(50), 4, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], a[0] + 1)


def test_transformer_is_causal_and_starts_near_uniform() -> None:
    torch.manual_seed(0)
    net = CharTransformer(97, context=12, n_layers=2, d_model=32, n_heads=4)
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (ids[:, 7] + 1) % 97
    with torch.no_grad():
        a, b = net(ids), net(changed)
    assert torch.equal(a[:, :7], b[:, :7])  # the past does not see the future
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    loss = torch.nn.functional.cross_entropy(a.reshape(-1, 97), ids.roll(-1, 1).reshape(-1))
    assert abs(loss.item() - math.log(97)) < 0.1  # small initial weights: about uniform
    with pytest.raises(ValueError, match="exceed the context of 12"):
        net(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="n_heads must divide d_model"):
        CharTransformer(97, 8, d_model=30, n_heads=4)


def test_data_module_states_what_it_yields() -> None:
    data = StdlibTextDataModule(context=32, batch_size=4, max_eval_windows=10)
    assert data.input_shape == (32,) and data.num_classes == 97
    data.setup()
    assert len(data.val_set) == 10
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 32) and x.dtype == torch.long and y.shape == (4, 32)
    model = CharLanguageModel.for_datamodule(data, n_layers=1, d_model=16, n_heads=2)
    assert isinstance(model, TaskModule) and model.net.context == 32
    with pytest.raises(ValueError, match="source must be 'docstrings', 'comments' or the path"):
        StdlibTextDataModule(source="poems")  # type: ignore[arg-type]


def test_config_matches_the_sweep_task() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    assert {k: model[k] for k in sweep.LM_SIZE} == sweep.LM_SIZE
    assert data["context"] == sweep.LM_CONTEXT and data["batch_size"] == sweep.TASKS["lm"].batch_size
    assert data["max_eval_windows"] == sweep.LM_EVAL_WINDOWS
    assert config["trainer"]["max_steps"] == sweep.TASKS["lm"].epochs * sweep.TASKS["lm"].steps_per_epoch


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_the_config_trains_for_a_few_steps(tmp_path: Path) -> None:
    # The command's LightningCLI, as `lalr fit --config configs/lm_transformer_momo_adam.yaml` runs it.
    cli = AdaptiveLRCLI(
        args=[
            "fit", "--config", str(CONFIG),
            "--trainer.max_steps", "8", "--trainer.val_check_interval", "4",
            "--data.max_eval_windows", "16", "--test_after_fit", "false",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", str(tmp_path),
        ],
    )  # fmt: skip
    assert isinstance(cli.model, CharLanguageModel)
    assert type(cli.trainer.optimizers[0]).__name__ == "MoMoAdam"
    assert cli.trainer.global_step == 8
    metrics = cli.trainer.callback_metrics
    val = metrics["val_loss"].item()
    # Nats per character: below the uniform guess ln 97 = 4.575 after 8 steps, bits = nats / ln 2.
    assert 2.0 < val < math.log(97)
    assert metrics["val_bpc"].item() == pytest.approx(val / math.log(2), rel=1e-5)


@pytest.mark.parametrize(
    "name",
    ["lightning_adaptive_lr.tasks.language", "lightning_adaptive_lr.tasks.module", "lightning_adaptive_lr.sweep"],
)
def test_docstring_examples_run(name: str) -> None:
    import doctest
    import importlib

    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
