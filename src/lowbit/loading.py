"""One entry point for every model source: the default model, a GGUF file, a transformers directory or a
lowbit checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load", "load_with_tokenizer"]


def load_with_tokenizer(path: str | os.PathLike[str] | None = None, *,
                        dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)`` from ``path``.

    ``path`` may be None (the embedded default model, SmolLM2-135M-Instruct), a ``.gguf`` file, a
    transformers model directory, or a lowbit checkpoint directory (``lowbit.json`` inside).
    """
    from lowbit.io import checkpoint

    if path is not None and checkpoint.is_checkpoint(path):
        from transformers import AutoTokenizer

        model = checkpoint.load(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True) if _has_tokenizer(Path(path)) else None
        return model, tok
    from lowbit.data.models import load_model

    return load_model(None if path is None else str(path), dtype=dtype)


def load(path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a model (see :func:`load_with_tokenizer`); quantized layers come back as ``QuantLinear``."""
    return load_with_tokenizer(path, dtype=dtype)[0]


def _has_tokenizer(root: Path) -> bool:
    return any((root / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
