"""Text for calibration and evaluation.

Default corpus (needs no download): the CPython documentation topics shipped with every Python
(``pydoc_data.topics.topics``), keys sorted, each topic's text stripped and separated by a blank line. It is
split **by topic into a contiguous 80 % / 20 %**: the calibration part is the first topics (sorted order) up to
the first topic boundary at or past 80 % of the characters, the evaluation part is the remaining topics. The
two parts share no topic; each part is coherent running text. (Topic sizes vary 100-fold, so "every 5th topic"
would give an evaluation part of only 7 % of the text.) The text follows the running Python's version (3.11:
79 topics, about 465k characters; the evaluation part is about 22k SmolLM2 tokens), so compare numbers within
one Python version.

Other sources: :func:`load_text` (a file, or a folder of ``.txt``/``.md``/``.rst`` files), :func:`wikitext2` and
:func:`c4` through the ``datasets`` package (``pip install datasets``), joined as in the GPTQ evaluation code
(wikitext-2: rows joined by ``"\\n\\n"``; C4: documents joined by ``" "``).

Token helpers tokenize the whole text once without special tokens (no BOS is inserted into windows):

* :func:`calibration_tokens`: ``n_samples`` windows of ``seq_len`` tokens at seeded random start positions.
* :func:`evaluation_tokens`: the whole evaluation text as one ``(1, T)`` row, optionally cut to ``max_tokens``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = ["CALIBRATION_FRACTION", "TEXT_SUFFIXES", "default_corpus", "load_text", "wikitext2", "c4", "tokenize",
           "calibration_tokens", "evaluation_tokens"]

logger = logging.getLogger(__name__)

CALIBRATION_FRACTION = 0.8
TEXT_SUFFIXES = (".txt", ".md", ".rst")
_PARTS = ("calibration", "evaluation", "all")
DATASETS_HINT = "pip install datasets"


def default_corpus(part: Literal["calibration", "evaluation", "all"] = "calibration") -> str:
    """The embedded CPython-docs corpus, or its calibration or evaluation part (split by topic, see module doc).

    Args:
        part: ``"calibration"`` (first 80 % of the text, whole topics), ``"evaluation"`` (the rest) or ``"all"``.
    """
    if part not in _PARTS:
        raise ValueError(f"unknown corpus part {part!r}; valid: {_PARTS}")
    from pydoc_data.topics import topics

    texts = [topics[k].strip() for k in sorted(topics)]
    if part != "all":
        total, acc, cut = sum(len(t) for t in texts), 0, len(texts)
        for i, t in enumerate(texts):
            acc += len(t)
            if acc >= CALIBRATION_FRACTION * total:
                cut = i + 1
                break
        texts = texts[:cut] if part == "calibration" else texts[cut:]
    return "\n\n".join(texts)


def load_text(path: str | os.PathLike[str]) -> str:
    """Text of a file, or of every ``.txt``/``.md``/``.rst`` file under a folder (sorted paths, blank-line joined).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a folder holds no such file, or the text is empty.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such text file or folder: {p}")
    if p.is_file():
        files = [p]
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {p} holds no {'/'.join(TEXT_SUFFIXES)} files")
    text = "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
    if not text.strip():
        raise ValueError(f"{p} contains no text")
    return text


def _load_dataset(*args: Any, **kwargs: Any) -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"wikitext2()/c4() need the 'datasets' package: {DATASETS_HINT}") from exc
    return datasets.load_dataset(*args, **kwargs)


def wikitext2(split: Literal["train", "validation", "test"] = "test") -> str:
    """WikiText-2 raw (``wikitext-2-raw-v1``) as one string, rows joined by ``"\\n\\n"`` (GPTQ/AWQ protocol)."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"unknown wikitext2 split {split!r}; valid: 'train', 'validation', 'test'")
    ds = _load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    return "\n\n".join(ds["text"])


_C4_FILES = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}


def c4(split: Literal["train", "validation"] = "validation", n: int = 1100) -> str:
    """The first ``n`` documents of the first C4 (``allenai/c4``, en) shard of ``split``, joined by ``" "``.

    GPTQ evaluates on the first 1100 validation documents (then the first ``256 * 2048`` tokens).
    """
    if split not in _C4_FILES:
        raise ValueError(f"unknown c4 split {split!r}; valid: {sorted(_C4_FILES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    ds = _load_dataset("allenai/c4", data_files={split: _C4_FILES[split]}, split=split)
    n = min(n, len(ds))
    return " ".join(ds[i]["text"] for i in range(n))


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """All tokens of ``text`` without special tokens: LongTensor ``(T,)``."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty str, got {type(text).__name__} of length "
                         f"{len(text) if hasattr(text, '__len__') else '?'}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no "longer than max" warning
    return torch.tensor(ids, dtype=torch.long)


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def calibration_tokens(tokenizer: Any, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                       text: str | None = None) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from the calibration text.

    Start positions are drawn uniformly (``torch.Generator`` seeded with ``seed``) from ``[0, T - seq_len]``;
    windows may overlap each other (not the evaluation text, when ``text`` is the default calibration part).

    Args:
        tokenizer: a transformers tokenizer.
        n_samples: number of windows.
        seq_len: tokens per window.
        seed: RNG seed.
        text: source text; default :func:`default_corpus` ``("calibration")``.

    Returns:
        LongTensor ``(n_samples, seq_len)``.

    Raises:
        ValueError: bad counts, or a text shorter than ``seq_len`` tokens.
    """
    _positive_int("n_samples", n_samples)
    _positive_int("seq_len", seq_len, 2)
    tokens = tokenize(tokenizer, default_corpus("calibration") if text is None else text)
    if tokens.numel() < seq_len:
        raise ValueError(f"the calibration text has {tokens.numel()} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n_samples,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def evaluation_tokens(tokenizer: Any, max_tokens: int | None = None, text: str | None = None) -> torch.Tensor:
    """The evaluation text as one row of tokens.

    Args:
        tokenizer: a transformers tokenizer.
        max_tokens: keep only the first ``max_tokens`` tokens (``None``: all).
        text: source text; default :func:`default_corpus` ``("evaluation")``.

    Returns:
        LongTensor ``(1, T)``.
    """
    tokens = tokenize(tokenizer, default_corpus("evaluation") if text is None else text)
    if max_tokens is not None:
        tokens = tokens[:_positive_int("max_tokens", max_tokens)]
    return tokens.unsqueeze(0)
