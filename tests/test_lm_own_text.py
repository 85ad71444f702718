"""The language-model task on your own text: a folder of text files or one file, split by document."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_adaptive_lr.tasks.language import StdlibTextDataModule, build_corpus, document_split, text_documents

SENTENCE = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "


def _folder(tmp_path: Path, n: int = 30) -> Path:
    for i in range(n):
        (tmp_path / f"d{i}.txt").write_text(f"Document {i}. " + SENTENCE * 10)
    (tmp_path / "notes.md").write_text("A markdown document. " + SENTENCE)
    (tmp_path / "data.bin").write_bytes(b"\x00\x01 not text")  # not a text suffix: left out
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "secret.txt").write_text("left out")  # hidden: left out
    return tmp_path


def test_a_folder_gives_one_document_per_text_file(tmp_path: Path) -> None:
    names = [name for name, _ in text_documents(_folder(tmp_path))]
    assert names == sorted([f"d{i}.txt" for i in range(30)] + ["notes.md"])


def test_one_file_gives_one_document_per_paragraph(tmp_path: Path) -> None:
    path = tmp_path / "book.txt"
    path.write_text("\n\n".join(f"Paragraph {i}." for i in range(12)) + "\n\n\n")
    documents = text_documents(path)
    assert [name for name, _ in documents] == [f"book.txt#{i}" for i in range(12)]
    assert documents[3][1] == "Paragraph 3."


def test_the_corpus_of_a_folder_is_split_by_document_and_encoded(tmp_path: Path) -> None:
    corpus = build_corpus(str(_folder(tmp_path)), 0.2, 0.1)
    expected = [document_split(name, 0.2, 0.1) for name, _ in text_documents(tmp_path)]
    if "val" not in expected:  # the fallback below moves one training document
        expected[expected.index("train")] = "val"
    assert corpus.documents == (expected.count("train"), expected.count("val"), expected.count("test"))
    assert corpus.vocab_size == 97 and len(corpus.train) > len(corpus.val) > 0


def test_a_small_corpus_always_gets_a_validation_document(tmp_path: Path) -> None:
    """30 files whose hashes leave the validation share [0.2, 0.3) empty: one training document
    (the one whose hash lies nearest above it) moves there, instead of an error."""
    for i in range(30):
        (tmp_path / f"d{i}.txt").write_text(SENTENCE * 5)
    splits = [document_split(f"d{i}.txt", 0.1, 0.2) for i in range(30)]
    assert "val" not in splits  # the premise: the hash split alone leaves validation empty
    corpus = build_corpus(str(tmp_path), 0.1, 0.2)
    assert corpus.documents[1] == 1 and corpus.documents[0] == splits.count("train") - 1


def test_the_datamodule_trains_on_a_folder(tmp_path: Path) -> None:
    data = StdlibTextDataModule(source=str(_folder(tmp_path)), context=32, batch_size=4, max_eval_windows=8)
    data.setup()
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 32) and y.shape == (4, 32) and data.num_classes == 97


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_a_source_without_text_is_refused_naming_what_to_give(tmp_path: Path, make) -> None:
    source = make(tmp_path)  # a path that does not exist; an empty folder
    with pytest.raises(ValueError, match="folder|file|no text"):
        StdlibTextDataModule(source=str(source)).setup()


def test_the_sweep_runs_the_lm_task_on_your_text(tmp_path: Path, monkeypatch) -> None:
    from lightning_adaptive_lr import sweep

    monkeypatch.setattr(sweep, "TEXT_SOURCES", {})
    sweep.text_data.cache_clear()
    (tmp_path / "texts").mkdir()
    folder = _folder(tmp_path / "texts")
    monkeypatch.chdir(tmp_path)
    try:
        sweep.main(["--task", "lm", "--quick", "--text", str(folder), "--methods", "Adam", "--jobs", "1"])
    finally:
        sweep.text_data.cache_clear()
    table = (tmp_path / "lr_sensitivity_lm_texts" / "lr_sensitivity.md").read_text()
    assert "on 'texts'" in table and "| Adam |" in table
    expected_val = build_corpus(str(folder)).documents[1]
    assert f"from {expected_val} held-out files" in table


@pytest.mark.parametrize(("argv", "message"), [
    (["--task", "mlp", "--text", "."], "--text is for the LM tasks"),
    (["--task", "lm", "--text", "/nonexistent/texts"], "neither"),
])
def test_the_sweep_refuses_text_it_cannot_use(argv: list[str], message: str, capsys) -> None:
    from lightning_adaptive_lr import sweep

    with pytest.raises(SystemExit) as exited:
        sweep.main(argv)
    assert exited.value.code == 2 and message in capsys.readouterr().err
