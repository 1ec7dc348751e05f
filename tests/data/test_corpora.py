"""lowbit.data.corpora: the embedded corpus split, text loading, datasets sources, token windows."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from lowbit.data import corpora
from lowbit.data.corpora import calibration_tokens, default_corpus, evaluation_tokens, load_text, tokenize

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def tokenizer():
    from lowbit.data.models import default_model_path
    from lowbit.io.gguf_model import gguf_tokenizer
    from lowbit.io.gguf_reader import read_gguf

    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    with read_gguf(path) as g:
        return gguf_tokenizer(g)


def test_default_corpus_split_by_topic_is_disjoint_and_complete() -> None:
    from pydoc_data.topics import topics

    texts = [topics[k].strip() for k in sorted(topics)]
    cal, ev, everything = default_corpus("calibration"), default_corpus("evaluation"), default_corpus("all")
    assert everything == "\n\n".join(texts)
    assert cal + "\n\n" + ev == everything  # contiguous split at a topic boundary, nothing lost
    cut = next(i for i in range(len(texts) + 1) if "\n\n".join(texts[:i]) == cal)
    assert "\n\n".join(texts[cut:]) == ev
    assert sum(map(len, texts[:cut])) >= 0.8 * sum(map(len, texts)) > sum(map(len, texts[:cut - 1]))
    for t in texts[cut:]:  # no evaluation topic leaks into calibration
        assert t not in cal
    assert 0.1 < len(ev) / len(everything) <= 0.2
    assert default_corpus("evaluation") == ev  # deterministic
    with pytest.raises(ValueError, match="unknown corpus part 'test'"):
        default_corpus("test")  # type: ignore[arg-type]


def test_load_text_file_and_sorted_folder(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("second\n")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.rst").write_text("third")
    (tmp_path / "skip.py").write_text("not text")
    assert load_text(tmp_path) == "first\n\nsecond\n\nthird"
    assert load_text(tmp_path / "b.md") == "second"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .txt/.md/.rst files"):
        load_text(empty)
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")


class _FakeDataset:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [r[key] for r in self.rows]
        return self.rows[key]


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        name = "wikitext2_sample.jsonl" if args[0] == "wikitext" else "c4_sample.jsonl"
        rows = [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]
        return _FakeDataset(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_wikitext2_joins_rows_like_gptq(fake_datasets: list) -> None:
    text = corpora.wikitext2("test")
    rows = [json.loads(line)["text"] for line in (FIXTURES / "wikitext2_sample.jsonl").read_text().splitlines()]
    assert text == "\n\n".join(rows)
    assert fake_datasets == [(("wikitext", "wikitext-2-raw-v1"), {"split": "test"})]
    with pytest.raises(ValueError, match="unknown wikitext2 split 'dev'"):
        corpora.wikitext2("dev")  # type: ignore[arg-type]


def test_c4_takes_first_n_documents(fake_datasets: list) -> None:
    text = corpora.c4("validation", n=2)
    docs = [json.loads(line)["text"] for line in (FIXTURES / "c4_sample.jsonl").read_text().splitlines()]
    assert text == docs[0] + " " + docs[1]
    args, kwargs = fake_datasets[0]
    assert args == ("allenai/c4",) and kwargs["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert corpora.c4("train", n=100) == " ".join(docs)  # fewer documents than asked: all of them
    with pytest.raises(ValueError, match="n must be a positive int"):
        corpora.c4("train", n=0)


def test_missing_datasets_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        corpora.wikitext2()


def test_calibration_windows_are_seeded_slices_of_the_calibration_text(tokenizer) -> None:
    x = calibration_tokens(tokenizer, n_samples=8, seq_len=64, seed=0)
    assert x.shape == (8, 64) and x.dtype == torch.long
    assert torch.equal(x, calibration_tokens(tokenizer, n_samples=8, seq_len=64, seed=0))
    assert not torch.equal(x, calibration_tokens(tokenizer, n_samples=8, seq_len=64, seed=1))
    stream = tokenize(tokenizer, default_corpus("calibration"))
    windows = stream.unfold(0, 64, 1)
    for row in x:
        assert (windows == row).all(1).any()  # every sample is a contiguous window of the calibration stream


def test_evaluation_tokens(tokenizer) -> None:
    ev = evaluation_tokens(tokenizer)
    assert ev.shape[0] == 1 and ev.shape[1] > 10_000
    assert tokenizer.decode(ev[0]) == default_corpus("evaluation")  # byte-level BPE round-trips exactly
    assert torch.equal(evaluation_tokens(tokenizer, max_tokens=100), ev[:, :100])
    assert evaluation_tokens(tokenizer, text="hello world").shape == (1, 2)


def test_bad_arguments(tokenizer) -> None:
    with pytest.raises(ValueError, match="n_samples"):
        calibration_tokens(tokenizer, n_samples=0)
    with pytest.raises(ValueError, match="seq_len"):
        calibration_tokens(tokenizer, seq_len=1)
    with pytest.raises(ValueError, match="fewer than seq_len=512"):
        calibration_tokens(tokenizer, text="too short")
    with pytest.raises(ValueError, match="max_tokens"):
        evaluation_tokens(tokenizer, max_tokens=-1)
    with pytest.raises(ValueError, match="non-empty str"):
        evaluation_tokens(tokenizer, text="")
