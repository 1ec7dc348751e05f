"""PEQA: only scales train, integer codes stay bit-identical, eval loss falls on real text."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lowbit.formats.affine import IntAffine
from lowbit.methods.peqa.api import PEQAConfig, PEQALinear, apply_peqa, finish_peqa, scale_parameters
from lowbit.methods.peqa.core import scale_grad
from lowbit.nn.linear import QuantLinear
from lowbit.train import ByteTokenizer, finetune
from lowbit.train.data import stdlib_texts
from lowbit.train.toy import pretrained_tiny, tiny_llama


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("group_size", [None, 32])
def test_scale_gradient_matches_textbook_float64(group_size):
    W = torch.randn(12, 70, dtype=torch.float64)
    layer = PEQALinear(IntAffine(bits=3, group_size=group_size, scale_dtype=torch.float32).quantize(W.float()))
    layer.scale.data = layer.scale.data.double()
    x = torch.randn(6, 70, dtype=torch.float64)
    gy = torch.randn(6, 12, dtype=torch.float64)
    (layer(x) * gy).sum().backward()
    grad_W = gy.T @ x
    ref = scale_grad(grad_W, layer.codes, layer.zero_point, layer.groups, layer.scale.shape[1])
    torch.testing.assert_close(layer.scale.grad, ref, rtol=1e-10, atol=1e-10)
    # before tuning the layer reproduces the quantized weight exactly
    torch.testing.assert_close(layer.weight().float(), layer.to_quant_linear().dequantize().float())


def test_only_scales_train_one_per_channel():
    model = tiny_llama()
    apply_peqa(model, PEQAConfig.for_bits(4))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scale") for n, _ in trainable)
    layers = [m for m in model.modules() if isinstance(m, PEQALinear)]
    assert sum(p.numel() for _, p in trainable) == sum(m.out_features for m in layers)
    model_g = tiny_llama()
    apply_peqa(model_g, PEQAConfig.for_bits(4, group_size=32))
    assert sum(p.numel() for p in scale_parameters(model_g)) == sum(
        m.out_features * -(-m.in_features // 32) for m in model_g.modules() if isinstance(m, PEQALinear))


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="bits=1"):
        PEQAConfig.for_bits(1)
    with pytest.raises(ValueError, match="act_order"):
        PEQAConfig(format=IntAffine(bits=4, group_size=32, act_order=True))


def test_tuning_lowers_eval_loss_and_keeps_codes_bit_identical():
    model = pretrained_tiny()
    cfg = PEQAConfig.for_bits(3)
    before = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and "lm_head" not in n:
            q = cfg.quantize_weight(m.weight.detach())
            before[n] = (_hash(q["qdata"]), _hash(q["zero_point"]), q["scale"].clone())
    texts = stdlib_texts("email", max_chars=60_000)
    res = finetune(model, ByteTokenizer(), texts[1:], method="peqa", bits=3, steps=15, lr=2e-3, batch_size=8,
                   seq_len=64, eval_data=texts[:1], max_blocks=300, max_grad_norm=None)
    assert res.eval_loss_after < res.eval_loss_before - 0.01, (res.eval_loss_before, res.eval_loss_after)
    assert res.trainable_params == sum(model.get_submodule(n).out_features for n in before)
    for n, (h_q, h_z, s0) in before.items():
        m = model.get_submodule(n)
        assert isinstance(m, QuantLinear)
        assert (_hash(m.qdata), _hash(m.zero_point)) == (h_q, h_z), n
    assert sum(not torch.equal(model.get_submodule(n).scale, s0.float()) for n, (_, _, s0) in before.items()) == len(before)
