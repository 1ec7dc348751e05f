"""Training text: read, tokenize and cut into fixed-length blocks of token ids.

``data`` for :func:`lowbit.train.finetune` may be a path (a text file, or a directory whose ``*.txt``,
``*.md``, ``*.py`` and ``*.jsonl`` files are read; ``jsonl`` rows give their ``"text"`` field), a list of
strings, or a ready ``(n_blocks, seq_len)`` LongTensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

__all__ = ["ByteTokenizer", "TextSource", "read_texts", "token_blocks", "split_blocks", "stdlib_texts"]

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".rst")


class Tokenizer(Protocol):
    def encode(self, text: str) -> Any: ...


TextSource = str | os.PathLike[str] | Sequence[str] | torch.Tensor


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256): an offline tokenizer for tiny models and tests."""

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def read_texts(source: str | os.PathLike[str] | Sequence[str], max_chars: int | None = None) -> list[str]:
    """Texts from a file, a directory (recursively, sorted) or a list of strings, up to ``max_chars`` in all."""
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source):
        p = Path(source)
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES) if p.is_dir() else [p]
        if not files:
            raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {str(p)!r}")
        texts: list[str] = []
        total = 0
        for f in files:
            raw = f.read_text(encoding="utf-8", errors="replace")
            if f.suffix == ".jsonl":
                got = [json.loads(line).get("text", "") for line in raw.splitlines() if line.strip()]
            else:
                got = [raw]
            for t in got:
                texts.append(t)
                total += len(t)
            if max_chars is not None and total >= max_chars:
                break
        return texts
    if isinstance(source, str):
        raise ValueError(f"data path {source!r} does not exist (pass a file, a directory or a list of strings)")
    if isinstance(source, Sequence) and all(isinstance(t, str) for t in source):
        return list(source)
    raise TypeError(f"data must be a path, a list of strings or a LongTensor, got {type(source).__name__}")


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def token_blocks(tokenizer: Tokenizer, data: TextSource, seq_len: int, *, max_blocks: int | None = None,
                 max_chars: int | None = None) -> torch.Tensor:
    """Concatenate the tokenized texts (separated by EOS if the tokenizer has one) and cut ``seq_len`` blocks.

    Returns:
        ``(n_blocks, seq_len)`` int64 token ids; the tail shorter than ``seq_len`` is dropped.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype != torch.long:
            raise ValueError(f"token data must be a (n_blocks, seq_len) int64 tensor, got {tuple(data.shape)} {data.dtype}")
        return data[:max_blocks] if max_blocks else data
    texts = read_texts(data, max_chars=max_chars)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for t in texts:
        ids += _encode(tokenizer, t)
        if eos is not None:
            ids.append(int(eos))
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"data gives {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def split_blocks(blocks: torch.Tensor, eval_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle (seeded) and split blocks into (train, eval); eval gets at least one block when asked for."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(blocks.shape[0], generator=g)
    n_eval = 0 if eval_fraction == 0 else max(1, int(round(eval_fraction * blocks.shape[0])))
    if n_eval >= blocks.shape[0]:
        raise ValueError(f"{blocks.shape[0]} block(s) cannot be split with eval_fraction={eval_fraction}")
    return blocks[perm[n_eval:]], blocks[perm[:n_eval]]


def stdlib_texts(package: str = "email", max_chars: int = 200_000) -> list[str]:
    """Python sources of one standard-library package: real, offline text for tests and demos."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"standard-library package {package!r} not found")
    root = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
    return read_texts(str(root), max_chars=max_chars)
