"""Real-model checks on the default model (SmolLM2-135M-Instruct, publisher-quantized Q4_1 weights).

Thresholds live in ``thresholds.json`` beside this file, with the command and numbers they came from.
The evaluation is the docs-topics evaluation split, first 2048 tokens, windows of 512 (kept small so the
default test run stays fast; the demo and results/ tables use longer evaluations).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.data.corpora import evaluation_tokens
from lowbit.data.models import load_model
from lowbit.eval.perplexity import perplexity
from lowbit.formats.affine import IntAffine
from lowbit.methods.hqq.api import HQQConfig
from lowbit.methods.rtn.api import RTNConfig

THRESHOLDS = json.loads((Path(__file__).with_name("thresholds.json")).read_text())
CTX, TOKENS = THRESHOLDS["ctx_len"], THRESHOLDS["tokens"]


@pytest.fixture(scope="module")
def base_and_tokens():
    torch.manual_seed(0)
    model, tok = load_model(None)
    return model, evaluation_tokens(tok, max_tokens=TOKENS)


def ppl_of(model, tokens) -> float:
    return perplexity(model, tokens, ctx_len=CTX)


def quantized_ppl(base, tokens, cfg) -> float:
    m = copy.deepcopy(base)
    lowbit.quantize_(m, cfg)
    return ppl_of(m, tokens)


def test_rtn_4bit_g128_within_recorded_threshold(base_and_tokens) -> None:
    base, tokens = base_and_tokens
    ref = ppl_of(base, tokens)
    got = quantized_ppl(base, tokens, RTNConfig(format=IntAffine(bits=4, group_size=128)))
    assert ref < got <= ref * THRESHOLDS["rtn4_g128_max_ratio"], got


@pytest.mark.xfail(strict=True, reason=(
    "known failure, open in issue 2: on this publisher-quantized model HQQ 3-bit g128 gives PPL 230.6 vs RTN's 73.1 "
    "(2048 tokens, ctx 512). HQQ's weight error is lower in every layer, but its float zero point (range [min, max], "
    "zero not exactly representable) biases outputs on outlier activation channels: RTN with a float zero point "
    "alone reaches 102.3 at g64, HQQ 102.1, integer-zero RTN 41.6. strict: passing would flag the fix."))
def test_hqq_no_worse_than_rtn_at_3_bits(base_and_tokens) -> None:
    base, tokens = base_and_tokens
    rtn = quantized_ppl(base, tokens, RTNConfig(format=IntAffine(bits=3, group_size=128)))
    hqq = quantized_ppl(base, tokens, HQQConfig.for_bits(3, 128))
    assert hqq <= rtn, (hqq, rtn)
