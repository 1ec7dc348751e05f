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


def test_hqq_no_worse_than_rtn_at_3_bits(base_and_tokens) -> None:
    """HQQ against RTN on the same 3-bit g128 grid (HQQ's float zero-point storage; the integer one: slow test).

    HQQ's own storage is a float zero point (``HQQConfig.for_bits``): there it beats RTN clearly (measured 230.6
    vs 338.9). On an integer-zero grid HQQ keeps the best *rounded* zero point per group and so never does worse
    than RTN; on this model's weights it never finds a better one, so the two are equal (73.08).

    Across storages, integer-zero RTN (73.1) beats float-zero HQQ (230.6) on this publisher-quantized model: with
    a float zero point, zero is not on the grid, so the many near-zero weights of a group all round to the same
    offset and bias the outputs. HQQ's l_p objective does not see that bias (started from the integer zero
    point, float-zero HQQ still drifts to 80.3). Results tables say which storage each HQQ row uses.
    """
    base, tokens = base_and_tokens
    rtn_float = quantized_ppl(base, tokens, RTNConfig(format=IntAffine(bits=3, group_size=128, float_zero_point=True)))
    hqq_float = quantized_ppl(base, tokens, HQQConfig.for_bits(3, 128))
    assert hqq_float < rtn_float, (hqq_float, rtn_float)


@pytest.mark.slow
def test_hqq_on_integer_zero_grid_no_worse_than_rtn_at_3_bits(base_and_tokens) -> None:
    """HQQ on RTN's own storage (integer zero point, 3-bit g128) is at most RTN's perplexity."""
    base, tokens = base_and_tokens
    rtn_int = quantized_ppl(base, tokens, RTNConfig(format=IntAffine(bits=3, group_size=128)))
    hqq_int = quantized_ppl(base, tokens, HQQConfig(format=IntAffine(bits=3, group_size=128)))
    assert hqq_int <= rtn_int, (hqq_int, rtn_int)
