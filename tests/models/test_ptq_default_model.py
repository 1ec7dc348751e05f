"""Real-model checks of GPTQ / SpQR / SqueezeLLM on the default model (slow; numbers in results/ptq_default_model.md).

The default model (SmolLM2-135M-Instruct) ships Q4_1-quantized by its publisher, so "fp32" here means its
dequantized weights. Calibration: random 512-token windows of the default corpus' calibration part; evaluation:
the held-out part, GPTQ protocol (non-overlapping 2048-token windows). Run with ``pytest -m slow tests/models``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow

N_SAMPLES, SEQ_LEN, CTX, WINDOWS = 16, 512, 2048, 4


@functools.lru_cache(maxsize=1)
def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from lowbit.data.corpora import calibration_tokens, evaluation_tokens
    from lowbit.data.models import load_model

    model, tok = load_model()
    return model.eval(), calibration_tokens(tok, N_SAMPLES, SEQ_LEN, seed=0), evaluation_tokens(tok)


@functools.lru_cache(maxsize=None)
def ppl(name: str) -> float:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from ptq_default_model import CONFIGS, dequantized_copy

    from lowbit.eval.perplexity import perplexity
    from lowbit.quantize import quantize_

    model, calib, evalt = _setup()
    m = copy.deepcopy(model)
    cfg = CONFIGS[name]()
    quantize_(m, cfg, calibration=calib if cfg.stats else None)
    with torch.no_grad():
        return perplexity(dequantized_copy(m), evalt, ctx_len=CTX, max_windows=WINDOWS)


def test_gptq_3bit_g128_beats_rtn_and_hqq() -> None:
    assert ppl("gptq3") < ppl("rtn3")
    assert ppl("gptq3") < ppl("hqq3")


def test_gptq_4bit_g128_beats_rtn() -> None:
    assert ppl("gptq4") < ppl("rtn4")


def test_spqr_about_3_6_bits_beats_gptq_3bit_g128() -> None:
    assert ppl("spqr3t1") < ppl("gptq3")


def test_squeezellm_3bit_beats_rtn_per_channel_and_sparse_beats_dense() -> None:
    assert ppl("sqllm3") < ppl("rtn3pc")
    assert ppl("sqllm3s") < ppl("sqllm3")


def test_gptq_hessian_weighted_error_at_most_rtn_on_the_default_models_first_block() -> None:
    """tr((W-Q)H(W-Q)ᵀ) of GPTQ ≤ RTN's on every Linear of block 0, with the Hessians of real inputs."""
    from lowbit.calibration.hooks import collect_input_stats
    from lowbit.formats.affine import IntAffine
    from lowbit.methods.gptq import GPTQConfig

    model, calib, _ = _setup()
    block = model.model.layers[0]
    lins = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad(), collect_input_stats(lins, ["hessian"]) as acc:
        model(calib[:4])
    fmt = IntAffine(bits=3, group_size=128)
    for n, lin in lins.items():
        W, H = lin.weight.detach(), acc[n].result()["hessian"].double()
        Q = GPTQConfig(format=fmt, act_order=True, static_groups=True).quantize_weight(W, {"hessian": H.float()})
        err = lambda D: float(torch.trace(D.double() @ H @ D.double().T))  # noqa: E731
        assert err(W - Q.dequantize()) <= err(W - fmt.fake_quantize(W)), n
