"""Recorded fp32 perplexity of the default model on the default evaluation split (slow: minutes on 2 cores).

Measured 2026-11-25 with Python 3.11.7 (pydoc topics text), torch 2.13.0 CPU, transformers 5.24, fp32:
evaluation split = 21365 SmolLM2 tokens; ctx 1024 -> 20 windows, PPL 9.6449; ctx 2048 -> 10 windows, PPL 8.7391.
The corpus follows the Python version, so the test skips on other minor versions.
"""

from __future__ import annotations

import sys

import pytest

RECORDED = {1024: 9.6449, 2048: 8.7391}


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="recorded on the Python 3.11 pydoc topics text")
@pytest.mark.parametrize("ctx_len", sorted(RECORDED))
def test_default_model_fp32_perplexity_matches_record(ctx_len: int) -> None:
    from lowbit.data.corpora import evaluation_tokens
    from lowbit.data.models import load_model
    from lowbit.eval.perplexity import perplexity

    try:
        model, tok = load_model(None)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    tokens = evaluation_tokens(tok)
    assert perplexity(model, tokens, ctx_len=ctx_len) == pytest.approx(RECORDED[ctx_len], rel=1e-3)
