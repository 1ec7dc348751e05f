"""finetune(): QLoRA end to end (NF4+DQ base, LoRA everywhere, progress, loss plot, peft adapter), gradient
checkpointing, bf16 compute, merged export; bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit.formats.codebook import Codebook
from lowbit.nn.linear import QuantLinear
from lowbit.nn.lora import LoRALinear, LoRASpec, add_lora, lora_layers
from lowbit.train import ByteTokenizer, finetune
from lowbit.train.data import stdlib_texts, token_blocks
from lowbit.train.export import merge_and_quantize
from lowbit.train.prepare import quantize_base
from lowbit.train.toy import pretrained_tiny, tiny_llama

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def texts():
    return stdlib_texts("email", max_chars=60_000)


def test_qlora_end_to_end_outputs_and_peft_roundtrip(tmp_path, texts):
    peft = pytest.importorskip("peft")
    model = pretrained_tiny()
    float_base = copy.deepcopy(model)
    seen = []
    res = finetune(model, TOK, texts[1:], method="qlora", steps=12, lr=2e-3, batch_size=8, seq_len=64, r=8,
                   alpha=16, dropout=0.05, eval_data=texts[:1], max_blocks=300, output_dir=str(tmp_path),
                   progress=seen.append)
    # frozen NF4 + double-quant base, LoRA on every linear layer but lm_head
    layers = lora_layers(model)
    assert len(layers) == 14
    for m in layers.values():
        assert isinstance(m.base_layer, QuantLinear)
        fmt = m.base_layer.format
        assert isinstance(fmt, Codebook) and fmt.name == "nf4" and fmt.double_quant and fmt.block_size == 64
    assert [s.step for s in seen] == list(range(1, 13)) and all(s.loss == l for s, l in zip(seen, res.losses))
    assert res.eval_loss_after < res.eval_loss_before
    assert res.trainable_params == sum(m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in layers.values())
    png = (tmp_path / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["losses"] == res.losses
    # peft loads the adapter on the unquantized base and gets our delta
    pm = peft.PeftModel.from_pretrained(float_base, res.adapter_path)
    for name, m in layers.items():
        torch.testing.assert_close(pm.base_model.model.get_submodule(name).get_delta_weight("default"),
                                   m.delta_weight().detach(), rtol=1e-5, atol=1e-7)
    assert max(float(m.lora_B.weight.detach().abs().max()) for m in layers.values()) > 0


def test_base_gets_no_gradient_and_checkpointing_gives_same_gradients():
    model = tiny_llama(seed=1)
    quantize_base(model, "nf4", 4, None)
    add_lora(model, LoRASpec(r=4, alpha=8))
    for m in lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    model.train()

    def grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), [m.lora_A.weight.grad.clone() for m in lora_layers(model).values()]

    l0, g0 = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    l1, g1 = grads()
    assert l0 == pytest.approx(l1, rel=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(b.grad is None for n, b in model.named_parameters() if "lora_" not in n)
    assert all(not b.requires_grad for n, b in model.named_buffers())


def test_bf16_compute_runs_and_tracks_fp32(texts):
    a, b = tiny_llama(seed=2), tiny_llama(seed=2)
    kw = dict(method="qlora", steps=3, lr=1e-3, batch_size=2, seq_len=32, max_blocks=50, eval_fraction=0.2)
    ra = finetune(a, TOK, texts, compute_dtype="float32", **kw)
    rb = finetune(b, TOK, texts, compute_dtype="bfloat16", gradient_checkpointing=True, **kw)
    assert all(abs(x - y) < 0.05 * x for x, y in zip(ra.losses, rb.losses)), (ra.losses, rb.losses)


def test_merged_export_reports_the_error_it_adds():
    model = tiny_llama(seed=3)
    quantize_base(model, "nf4", 4, None)
    add_lora(model, LoRASpec(r=4, alpha=8))
    for m in lora_layers(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.05)
    merged_ref = {n: m.merged_linear().weight.detach().clone() for n, m in lora_layers(model).items()}
    ids = torch.randint(0, 256, (2, 16))
    rep = merge_and_quantize(model, "rtn", 8, None, tokens=ids)
    assert not lora_layers(model)
    for n, W in merged_ref.items():
        q = model.get_submodule(n)
        assert isinstance(q, QuantLinear) and q.format.bits == 8
        direct = float(torch.linalg.norm(W - q.dequantize().float()) / torch.linalg.norm(W))
        assert rep.layer_rel_error[n] == pytest.approx(direct, rel=1e-6)
        assert 0 < direct < 0.02
    assert rep.logit_rmse is not None and 0 < rep.logit_rmse < 0.05 * rep.logit_rmse_ref
    def nf4_lora(std):
        m4 = tiny_llama(seed=3)
        quantize_base(m4, "nf4", 4, None)
        add_lora(m4, LoRASpec(r=4, alpha=8))
        for m in lora_layers(m4).values():
            torch.nn.init.normal_(m.lora_B.weight, std=std, generator=torch.Generator().manual_seed(0))
        return m4

    rep4 = merge_and_quantize(nf4_lora(0.05), "nf4", 4, None)
    assert rep4.mean_rel_error > 5 * rep.mean_rel_error  # 4-bit re-quantization costs more than 8-bit
    # with a zero adapter NF4 -> NF4 is nearly idempotent (only double quantization re-rounds the absmax)
    assert merge_and_quantize(nf4_lora(0.0), "nf4", 4, None).mean_rel_error < 1e-3


def test_bad_arguments_name_the_choices(texts):
    with pytest.raises(ValueError, match="valid choices"):
        finetune(tiny_llama(), TOK, texts, method="qlorax")
    with pytest.raises(ValueError, match="compute_dtype"):
        finetune(tiny_llama(), TOK, texts, compute_dtype="fp8")
    with pytest.raises(ValueError, match="steps"):
        finetune(tiny_llama(), TOK, texts, steps=0)
    with pytest.raises(ValueError, match="does not exist"):
        finetune(tiny_llama(), TOK, "/no/such/file.txt")
    with pytest.raises(ValueError, match="seq_len"):
        token_blocks(TOK, texts, seq_len=1)


@pytest.mark.slow
def test_qlora_on_the_default_model(tmp_path, texts):
    from lowbit.loading import load_with_tokenizer

    model, tok = load_with_tokenizer(None)
    res = finetune(model, tok, texts[1:], method="qlora", steps=6, lr=1e-3, batch_size=2, seq_len=128, r=8,
                   alpha=16, eval_data=texts[:1], max_blocks=64, gradient_checkpointing=True, output_dir=str(tmp_path))
    print(f"default-model QLoRA: eval loss {res.eval_loss_before:.4f} -> {res.eval_loss_after:.4f}, "
          f"train losses {[round(x, 3) for x in res.losses]}")
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists() and (tmp_path / "loss.png").exists()
    assert res.eval_loss_after < res.eval_loss_before, (res.eval_loss_before, res.eval_loss_after)


@pytest.mark.parametrize("method", ["lora", "qlora", "loftq", "qa_lora", "peqa", "qft"])
def test_every_method_trains_through_finetune(method, texts):
    from lowbit.train import METHODS

    assert method in METHODS
    res = finetune(tiny_llama(seed=7), TOK, texts, method=method, steps=3, lr=3e-3, batch_size=2, seq_len=32,
                   max_blocks=24, eval_fraction=0.2)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(res.losses)))
    assert res.eval_loss_after < res.eval_loss_before, (res.eval_loss_before, res.eval_loss_after)
