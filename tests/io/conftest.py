"""Shared fixtures of the io tests."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture()
def word_tokenizer() -> Any:
    """A small word-level ``PreTrainedTokenizerFast`` built in memory (no download), 96 tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(93)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
