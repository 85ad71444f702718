"""A character-level language-model task on text that every Python installation carries.

* :func:`stdlib_documents`: real human-written English, read offline and deterministically from the
  source files of the running interpreter's standard library, **without importing them**: the
  docstrings (modules, classes, functions; through :mod:`ast`) or the comments (through
  :mod:`tokenize`).  One document per source file, files in sorted order, test folders left out.
* :class:`CharVocabulary`: 97 symbols: newline, the 95 printable ASCII characters and one symbol
  for every other character, so one token is one character and the loss is in nats per character.
* :func:`build_corpus`: the documents split **by document** into train / validation / test (a
  stable hash of each file's path decides, so the split does not move when a file is added) and
  encoded as three token streams.
* :class:`CharTransformer`: a small causal (GPT-style, pre-LayerNorm) Transformer: token and learned
  position embeddings, ``n_layers`` blocks of causal self-attention and a GELU MLP, a final
  LayerNorm and a linear read-out.  Plain :class:`torch.nn.Module`, used by the sweep as is.
* :class:`CharLanguageModel` (LightningModule) and :class:`StdlibTextDataModule`
  (LightningDataModule) for ``lalr fit`` (``configs/lm_transformer_momo_adam.yaml``).

The corpus depends on the Python version (its standard library is the text), and is the same on
every machine with that version.  On CPython 3.11: 661 source files outside the test folders, about
1.8 million characters of docstrings (from 645 of them) and 1.9 million of comments (684).

Example:
    >>> from lightning_adaptive_lr.tasks.language import CharTransformer, CharVocabulary
    >>> vocab = CharVocabulary()
    >>> ids = vocab.encode("Return the value.\\n")
    >>> vocab.decode(ids)
    'Return the value.\\n'
    >>> net = CharTransformer(vocab.size, context=16, n_layers=1, d_model=32, n_heads=2)
    >>> net(ids[None, :16]).shape
    torch.Size([1, 16, 97])
"""

from __future__ import annotations

import ast
import io
import math
import re
import sysconfig
import tokenize
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..optim import MoMoAdam
from .data import ImageDataModule
from .module import TaskModule

__all__ = [
    "CharLanguageModel",
    "CharTransformer",
    "CharVocabulary",
    "StdlibTextDataModule",
    "TextCorpus",
    "TextSource",
    "WindowDataset",
    "build_corpus",
    "evaluation_windows",
    "random_windows",
    "stdlib_documents",
    "stdlib_root",
    "text_documents",
]

#: ``"docstrings"`` or ``"comments"`` of the standard library, or the path of your own text: a
#: folder (every text file below it is a document) or one file (its paragraphs are the documents).
TextSource = Union[Literal["docstrings", "comments"], str]
STDLIB_SOURCES = ("docstrings", "comments")
#: File name endings read as text from a folder given as the source.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
#: Folders of the standard library that hold tests (code-like strings, fixtures), not prose.
SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


# --------------------------------------------------------------------------- the text


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library (``sysconfig``'s ``stdlib`` path)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files outside test folders, sorted by their relative path.

    Example:
        >>> files = stdlib_files()
        >>> any(f.name == "textwrap.py" for f in files)
        True
    """
    root = stdlib_root() if root is None else root
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if not SKIPPED_FOLDERS & set(relative.parts[:-1]):
            found.append(relative)
    return [root / relative for relative in sorted(found, key=lambda p: p.as_posix())]


def _docstrings(source: bytes) -> str:
    """The module, class and function docstrings of one file, in source order, blank-line separated."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # a file for another Python version (lib2to3 fixtures, ...)
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text:
                parts.append((getattr(node, "lineno", 0), text))
    return "\n\n".join(text for _, text in sorted(parts, key=lambda item: item[0]))


def _comments(source: bytes) -> str:
    """The ``#`` comments of one file, without the ``#`` and the shebang/encoding lines; a comment
    block stays one paragraph, blocks are blank-line separated."""
    lines: list[str] = []
    last_row = -2
    try:
        for token in tokenize.tokenize(io.BytesIO(source).readline):
            if token.type != tokenize.COMMENT:
                continue
            text = token.string.lstrip("#").strip()
            if not text or text.startswith("!") or "-*-" in text:
                continue
            if lines and token.start[0] != last_row + 1:
                lines.append("")
            lines.append(text)
            last_row = token.start[0]
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        pass
    return "\n".join(lines)


@cache
def stdlib_documents(source: TextSource = "docstrings") -> tuple[tuple[str, str], ...]:
    """``(relative path, text)`` of every standard-library file with some text of ``source``.

    Read from the files, never imported; the same on every run with the same Python (cached per
    process).  About 2-4 seconds for the whole library.

    Example:
        >>> docs = stdlib_documents("docstrings")
        >>> path, text = next((p, t) for p, t in docs if p == "textwrap.py")
        >>> "Text wrapping and filling." in text
        True
    """
    if source not in ("docstrings", "comments"):
        raise ValueError(f"source must be 'docstrings' or 'comments', got {source!r}")
    extract = _docstrings if source == "docstrings" else _comments
    root = stdlib_root()
    documents = []
    for path in stdlib_files(root):
        text = extract(path.read_bytes())
        if text.strip():
            documents.append((path.relative_to(root).as_posix(), text))
    return tuple(documents)


def text_documents(path: str | Path) -> tuple[tuple[str, str], ...]:
    """``(name, text)`` of your own text: every file ending in :data:`TEXT_SUFFIXES` below a folder
    (sorted by relative path; hidden files and folders left out), or the paragraphs of one file
    (separated by blank lines, named ``file#i``).  Read as UTF-8 (undecodable bytes replaced).

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "a.txt").write_text("First document.")
        >>> _ = (folder / "b.md").write_text("Second one.")
        >>> [name for name, _ in text_documents(folder)]
        ['a.txt', 'b.md']
    """
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(
            (f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES),
            key=lambda f: f.relative_to(root).as_posix(),
        )
        files = [f for f in files if not any(part.startswith(".") for part in f.relative_to(root).parts)]
        documents = [(f.relative_to(root).as_posix(), f.read_text("utf-8", errors="replace")) for f in files]
    elif root.is_file():
        paragraphs = re.split(r"\n\s*\n", root.read_text("utf-8", errors="replace"))
        documents = [(f"{root.name}#{i}", text.strip()) for i, text in enumerate(paragraphs)]
    else:
        raise ValueError(
            f"text source {str(path)!r} is neither 'docstrings', 'comments', a folder nor a file; give the "
            f"path of a folder of text files (ending in {', '.join(TEXT_SUFFIXES)}) or of one text file"
        )
    documents = [(name, text) for name, text in documents if text.strip()]
    if not documents:
        raise ValueError(f"text source {str(path)!r} holds no text (files ending in {', '.join(TEXT_SUFFIXES)})")
    return tuple(documents)


# --------------------------------------------------------------------------- characters


class CharVocabulary:
    """Newline, the 95 printable ASCII characters (space to ``~``) and ``UNKNOWN`` for any other.

    Token ids: ``\\n`` → 0, ``chr(32 + i)`` → ``1 + i``, anything else → 96.

    Example:
        >>> v = CharVocabulary()
        >>> v.size, v.encode("a\\n").tolist(), v.decode(v.encode("é"))
        (97, [66, 0], '\\x7f')
    """

    #: The character that stands for every character outside the vocabulary, in decoded text.
    UNKNOWN = "\x7f"
    _OUTSIDE = re.compile(r"[^\n\x20-\x7e]")

    def __init__(self) -> None:
        table = np.full(128, 96, dtype=np.uint8)
        table[10] = 0
        table[32:127] = np.arange(1, 96, dtype=np.uint8)
        self._table = table
        self._chars = "\n" + "".join(chr(c) for c in range(32, 127)) + self.UNKNOWN

    @property
    def size(self) -> int:
        """Number of symbols (97)."""
        return len(self._chars)

    def encode(self, text: str) -> Tensor:
        """Token ids of ``text`` (one per character), ``uint8``."""
        ascii_text = self._OUTSIDE.sub(self.UNKNOWN, text).encode("ascii")
        return torch.from_numpy(self._table[np.frombuffer(ascii_text, dtype=np.uint8)].copy())

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """The text of token ids (``UNKNOWN`` for the symbol of the characters outside)."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return "".join(self._chars[int(i)] for i in values)


@dataclass(frozen=True)
class TextCorpus:
    """The three token streams of a corpus, documents joined by a blank line.

    Attributes:
        train, val, test: ``uint8`` token ids.
        documents: number of documents in each split, ``(train, val, test)``.
        source: which text (``"docstrings"`` or ``"comments"``).
        vocab_size: number of symbols.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    documents: tuple[int, int, int]
    source: str
    vocab_size: int


def _hash_unit(path: str) -> float:
    """A document's place in [0, 1): the CRC-32 of its path (see :func:`document_split`)."""
    return zlib.crc32(path.encode("utf-8")) / 2**32


def document_split(path: str, val_fraction: float, test_fraction: float) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a document, from a CRC-32 hash of its path: stable
    across runs, machines and library versions (adding a file moves no other file).

    Example:
        >>> document_split("textwrap.py", 0.1, 0.05) in ("train", "val", "test")
        True
    """
    u = _hash_unit(path)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


@cache
def build_corpus(source: TextSource = "docstrings", val_fraction: float = 0.1, test_fraction: float = 0.05) -> TextCorpus:
    """``source``'s text (the standard library's, or yours: :func:`text_documents`) split by
    document and encoded (cached per process).

    Example:
        >>> corpus = build_corpus("docstrings")
        >>> corpus.train.dtype, corpus.vocab_size, len(corpus.train) > 10 * len(corpus.val) / 2
        (torch.uint8, 97, True)
    """
    if not (0.0 < val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise ValueError(
            f"val_fraction must lie in (0, 1), test_fraction in [0, 1), their sum below 1; got {val_fraction}, {test_fraction}"
        )
    vocab = CharVocabulary()
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    documents = stdlib_documents(source) if source in STDLIB_SOURCES else text_documents(source)  # type: ignore[arg-type]
    splits = [document_split(path, val_fraction, test_fraction) for path, _ in documents]
    if "val" not in splits and splits.count("train") > 1:
        # A small corpus can leave the validation share empty: it then takes the training document
        # whose hash lies nearest above it (as stable as the split itself).
        nearest = min((i for i, split in enumerate(splits) if split == "train"), key=lambda i: _hash_unit(documents[i][0]))
        splits[nearest] = "val"
    for (_, text), split in zip(documents, splits):
        parts[split].append(text)
    if not parts["train"] or not parts["val"]:
        where = f"the standard library at {stdlib_root()}" if source in STDLIB_SOURCES else repr(source)
        raise RuntimeError(
            f"{where} gave too few documents ({len(documents)}) for a training and a validation split: "
            "give more files (or, for one file, more paragraphs separated by blank lines)"
        )
    streams = {name: vocab.encode("\n\n".join(docs)) for name, docs in parts.items()}
    return TextCorpus(
        train=streams["train"],
        val=streams["val"],
        test=streams["test"],
        documents=(len(parts["train"]), len(parts["val"]), len(parts["test"])),
        source=source,
        vocab_size=vocab.size,
    )


def random_windows(stream: Tensor, batch_size: int, context: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A batch of ``batch_size`` windows at uniformly random offsets: inputs and next characters.

    Example:
        >>> x, y = random_windows(torch.arange(100), 4, 8, torch.Generator().manual_seed(0))
        >>> x.shape, bool((y[:, :-1] == x[:, 1:]).all())
        (torch.Size([4, 8]), True)
    """
    starts = torch.randint(0, len(stream) - context, (batch_size,), generator=generator)
    index = starts[:, None] + torch.arange(context + 1)
    window = stream[index].long()
    return window[:, :-1], window[:, 1:]


def evaluation_windows(stream: Tensor, context: int, max_windows: int | None = None) -> tuple[Tensor, Tensor]:
    """The stream cut into consecutive windows (each character predicted once), inputs and targets.

    With ``max_windows``, that many windows evenly spaced over the stream (deterministic).

    Example:
        >>> x, y = evaluation_windows(torch.arange(21), 4)
        >>> x.tolist()[:2], y.tolist()[:2]
        ([[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 8]])
    """
    n = (len(stream) - 1) // context
    if n < 1:
        raise ValueError(f"a stream of {len(stream)} tokens holds no window of {context} + 1")
    starts = torch.arange(n) * context
    if max_windows is not None and max_windows < n:
        starts = starts[torch.linspace(0, n - 1, max_windows).round().long()]
    window = stream[starts[:, None] + torch.arange(context + 1)].long()
    return window[:, :-1], window[:, 1:]


class WindowDataset(Dataset[tuple[Tensor, Tensor]]):
    """Consecutive windows of a token stream, as ``(inputs, targets)`` pairs of ``context`` tokens."""

    def __init__(self, stream: Tensor, context: int, max_windows: int | None = None) -> None:
        self.inputs, self.targets = evaluation_windows(stream, context, max_windows)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.inputs[index], self.targets[index]


# --------------------------------------------------------------------------- the network


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask (``scaled_dot_product_attention``)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A small causal Transformer over characters (GPT-2 layout and initialisation).

    Args:
        vocab_size: number of symbols (97 for :class:`CharVocabulary`).
        context: the longest input (positions learned up to it).
        n_layers: Transformer blocks.
        d_model: width.
        n_heads: attention heads (must divide ``d_model``).
        d_ff: hidden width of each block's MLP (default ``4·d_model``).
        dropout: dropout in attention and after each block's MLP (0: none).

    Example:
        >>> net = CharTransformer(97, context=8, n_layers=1, d_model=16, n_heads=2)
        >>> net(torch.zeros(3, 8, dtype=torch.long)).shape
        torch.Size([3, 8, 97])
    """

    def __init__(
        self,
        vocab_size: int,
        context: int,
        n_layers: int = 2,
        d_model: int = 64,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("context", context), ("n_layers", n_layers),
                            ("d_model", d_model), ("n_heads", n_heads)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if d_model % n_heads:
            raise ValueError(f"n_heads must divide d_model, got d_model={d_model}, n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.context = context
        self.token = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2·layers)
            for layer in (block.attn.proj, block.mlp[2]):
                nn.init.normal_(layer.weight, 0.0, 0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits ``(batch, time, vocab)`` of the next character at every position of ``ids`` (integers)."""
        ids = ids.long()  # the corpus is stored as uint8
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"inputs of {t} tokens exceed the context of {self.context}")
        x = self.token(ids) + self.position(torch.arange(t, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def nats_per_char(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every predicted character (nats per character)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


# --------------------------------------------------------------------------- Lightning


class StdlibTextDataModule(ImageDataModule):
    """The standard library's docstrings (or comments) as character windows, split by document.

    The splits are the consecutive ``context``-character windows of each split's token stream
    (every character predicted once per epoch; the DataLoader shuffles the training windows).
    Like the image data modules it states what it yields: ``input_shape = (context,)`` and
    ``num_classes`` = the vocabulary size, which ``lalr`` passes to :class:`CharLanguageModel`.

    Args:
        source: ``"docstrings"`` (default) or ``"comments"`` of the standard library, or the path
            of your own text: a folder (every ``.txt``/``.md``/``.rst`` file below it is a document)
            or one file (its paragraphs are the documents); split by document as the library is.
        context: characters per window.
        batch_size: windows per batch.
        val_fraction: share of the documents held out for validation.
        test_fraction: share of the documents held out for testing.
        max_eval_windows: at most this many (evenly spaced) windows in validation and test
            (``None``: all of them).
        num_workers: DataLoader worker processes.

    Example:
        >>> data = StdlibTextDataModule(context=32, batch_size=4, max_eval_windows=8)
        >>> data.setup()
        >>> x, y = next(iter(data.val_dataloader()))
        >>> x.shape, data.num_classes
        (torch.Size([4, 32]), 97)
    """

    def __init__(
        self,
        source: TextSource = "docstrings",
        context: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.05,
        max_eval_windows: int | None = 512,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        if source not in STDLIB_SOURCES and not Path(source).expanduser().exists():
            raise ValueError(
                f"source must be 'docstrings', 'comments' or the path of a folder or file of your text; "
                f"{source!r} does not exist"
            )
        if context < 1:
            raise ValueError(f"context must be at least 1, got {context}")
        if max_eval_windows is not None and max_eval_windows < 1:
            raise ValueError(f"max_eval_windows must be at least 1 or None, got {max_eval_windows}")
        self.source = source
        self.context = context
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_eval_windows = max_eval_windows
        self.input_shape = (context,)
        self.num_classes = CharVocabulary().size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        corpus = build_corpus(self.source, self.val_fraction, self.test_fraction)
        self.train_set = WindowDataset(corpus.train, self.context)
        self.val_set = WindowDataset(corpus.val, self.context, self.max_eval_windows)
        test = corpus.test if len(corpus.test) > self.context else corpus.val
        self.test_set = WindowDataset(test, self.context, self.max_eval_windows)


class CharLanguageModel(TaskModule):
    """Next-character prediction with :class:`CharTransformer`; losses in nats per character.

    Logs ``train_loss`` (every step), ``val_loss`` and ``test_loss`` (nats/char) and
    ``val_bpc`` (bits per character).  Without ``--optimizer``, :class:`~lightning_adaptive_lr.MoMoAdam`
    with its defaults is used.

    ``num_classes`` (the vocabulary size) and ``input_shape`` (``(context,)``) are the data's: the
    ``lalr`` command links them from :class:`StdlibTextDataModule`, as for the image tasks; in
    Python :meth:`for_datamodule` does the same.

    Args:
        num_classes: vocabulary size.
        input_shape: ``(context,)``: the longest input.
        n_layers: Transformer blocks.
        d_model: width.
        n_heads: attention heads.
        d_ff: MLP hidden width (default ``4·d_model``).
        dropout: dropout rate.

    Example:
        >>> model = CharLanguageModel(num_classes=97, input_shape=(16,), n_layers=1, d_model=32, n_heads=2)
        >>> x = torch.zeros(2, 16, dtype=torch.long)
        >>> round(model.adaptive_lr_loss((x, x)).item(), 1)  # about ln 97 at initialisation
        4.6
    """

    def __init__(
        self,
        *,
        num_classes: int,
        input_shape: tuple[int, ...],
        n_layers: int = 2,
        d_model: int = 64,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        shape = tuple(int(d) for d in input_shape)
        if len(shape) != 1:
            raise ValueError(f"input_shape must be (context,), got {tuple(input_shape)}")
        self.num_classes = int(num_classes)
        self.input_shape = shape
        self.net = CharTransformer(self.num_classes, shape[0], n_layers, d_model, n_heads, d_ff, dropout)

    def forward(self, ids: Tensor) -> Tensor:
        """Next-character logits ``(batch, time, vocab)``."""
        return self.net(ids)

    def adaptive_lr_loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        """The training loss of ``batch`` (nothing logged): QLAB's probe through the callback."""
        x, y = batch
        return nats_per_char(self(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = self.adaptive_lr_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss = self.adaptive_lr_loss(batch)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_bpc", loss / math.log(2), sync_dist=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("test_loss", self.adaptive_lr_loss(batch), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """MoMo-Adam with its defaults; replaced by ``lalr ... --optimizer`` (LightningCLI)."""
        return MoMoAdam(self.parameters())

