"""Slow: issue 4 item 6 on the default model, re-measured with the configs and protocol of the recorded table.

``benchmarks/act_aware_default_model.py`` (``PROTOCOL``, ``config_for``) defines both: the first 4096 held-out
docs-topics tokens in windows of 1024, 16 x 256 calibration tokens, SmoothQuant alpha 0.5, AWQ's alpha search on
4 of the 16 samples; CUDA when available. The recorded numbers are in results/act_aware_default_model.md.
The injected-outlier and synthetic-FP8 claims of item 6 are unit tests (test_llm_int8, test_smoothquant,
test_fp8). Two claims do not hold on this model and are marked strict xfail with the measured numbers (a pass
would be reported as XPASS and fail the run, so the marks cannot hide a change).
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch

from lowbit.quantize import quantize_

pytestmark = pytest.mark.slow


def _bench():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import act_aware_default_model

    return act_aware_default_model


@functools.lru_cache(maxsize=1)
def _setup():  # type: ignore[no-untyped-def]
    from lowbit.data.corpora import calibration_tokens, evaluation_tokens
    from lowbit.data.models import load_model
    from lowbit.eval.report import Evaluator

    P = _bench().PROTOCOL
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tok = load_model(None, dtype=torch.float32)
    base = base.to(dev).eval()
    tokens = evaluation_tokens(tok, max_tokens=P["max_eval_tokens"]).to(dev)
    calib = calibration_tokens(tok, n_samples=P["calib_samples"], seq_len=P["calib_seq_len"], seed=0).to(dev)
    return base, calib, Evaluator(base, tokens, ctx_len=P["ctx_len"])


@functools.lru_cache(maxsize=None)
def _ppl(run: str) -> float:
    """Perplexity of benchmark run ``run`` (``"unquantized"`` or a key of its ``RUNS``)."""
    base, calib, ev = _setup()
    if run == "unquantized":
        return float(ev.evaluate(base)["ppl"])
    cfg = _bench().config_for(run)
    model = copy.deepcopy(base)
    quantize_(model, cfg, calibration=calib if cfg.stats else None)
    return float(ev.evaluate(model)["ppl"])


@pytest.mark.parametrize("bits", [4, 3])
def test_awq_below_rtn_g128(bits: int) -> None:
    awq, rtn = _ppl(f"awq{bits}_g128"), _ppl(f"rtn{bits}_g128")
    assert awq < rtn, (awq, rtn)


def test_smoothquant_o1_within_2_percent_and_below_naive_w8a8() -> None:
    sq, naive, fp = _ppl("sq_O1"), _ppl("w8a8_naive"), _ppl("unquantized")
    assert sq <= 1.02 * fp, (sq, fp)
    assert sq < naive, (sq, naive)


@pytest.mark.xfail(strict=True, reason="does not hold on this model at the paper's threshold 6.0: PPL 10.842 vs "
                   "10.614 (+2.15 %) here, +1.39 % on the foundation's full protocol (results/"
                   "act_aware_default_model_full.md); inlier activations have per-token absmax/rms ~10, so per-token "
                   "int8 of the non-outlier columns costs ~1-2 %; threshold 4.0 reaches +1.00 % there")
def test_llm_int8_within_1_percent() -> None:
    q, fp = _ppl("llm_int8"), _ppl("unquantized")
    assert q <= 1.01 * fp, (q, fp)


@pytest.mark.xfail(strict=True, reason="does not hold on this model even with GPTQ-rounded E4M3 weights: PPL 10.773 "
                   "vs 10.614 (+1.49 %) here, +1.43 % on the foundation's full protocol (round-to-nearest weights: "
                   "+3.7 % / +3.5 %); on top of the weights' +0.20 %, E4M3 (3 mantissa bits) on every activation adds ~1.2 %")
def test_fp8_e4m3_w8a8_within_1_percent() -> None:
    q, fp = _ppl("fp8_e4m3_gptq"), _ppl("unquantized")
    assert q <= 1.01 * fp, (q, fp)


def test_fp8_gptq_weights_below_round_to_nearest() -> None:
    assert _ppl("fp8_e4m3_gptq") < _ppl("fp8_e4m3"), (_ppl("fp8_e4m3_gptq"), _ppl("fp8_e4m3"))


def test_zeroquant_fp_w4a8_lorc_below_without() -> None:
    lorc, plain = _ppl("zqfp_w4a8_lorc8"), _ppl("zqfp_w4a8")
    assert lorc < plain, (lorc, plain)
