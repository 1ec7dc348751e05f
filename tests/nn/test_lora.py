"""LoRA adapters: math, freezing, peft-format save/load (checked against peft itself), merging."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lowbit.nn.lora import (LoRALinear, LoRASpec, add_lora, load_adapter, lora_layers, lora_parameters,
                            lora_state_dict, merge_lora, save_adapter)
from lowbit.train.toy import tiny_llama


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in lora_layers(model).values():
        with torch.no_grad():
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))


def test_forward_is_base_plus_scaled_low_rank_update_float64():
    torch.manual_seed(0)
    base = nn.Linear(12, 7, dtype=torch.float64)
    m = LoRALinear(base, LoRASpec(r=3, alpha=6.0))
    A, B = torch.randn(3, 12, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    m.set_factors(A, B)
    x = torch.randn(5, 12, dtype=torch.float64)
    ref = x @ (base.weight + 2.0 * B @ A).T + base.bias
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.delta_weight(), (2.0 * B @ A).float())


def test_zero_init_keeps_outputs_and_only_lora_trains():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 16))
    ref = model(input_ids=ids).logits
    names = add_lora(model, LoRASpec(r=4, alpha=8))
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    torch.testing.assert_close(model(input_ids=ids).logits, ref)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n


def test_bad_spec_values_are_named():
    with pytest.raises(ValueError, match="rank r"):
        LoRASpec(r=0)
    with pytest.raises(ValueError, match="alpha"):
        LoRASpec(alpha=float("nan"))
    with pytest.raises(ValueError, match="dropout"):
        LoRASpec(dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear or QuantLinear"):
        LoRALinear(nn.Conv1d(2, 2, 1), LoRASpec())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no Linear"):
        add_lora(tiny_llama(), LoRASpec(), targets=["nothing_matches"])


def test_state_dict_uses_peft_key_names():
    model = tiny_llama()
    add_lora(model, LoRASpec(r=2, alpha=2))
    keys = set(lora_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 14


def test_peft_loads_our_adapter_and_gives_the_same_delta(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=3)
    ours = copy.deepcopy(base)
    add_lora(ours, LoRASpec(r=4, alpha=16, dropout=0.1))
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path="tiny")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["peft_type"] == "LORA"

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    ours.eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(pm(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # layer by layer: peft's delta weight equals ours
    for name, m in lora_layers(ours).items():
        pl = pm.base_model.model.get_submodule(name)
        torch.testing.assert_close(pl.get_delta_weight("default"), m.delta_weight(), rtol=1e-6, atol=1e-7)
    # and the adapter changes the output (the comparison above is not trivially equal)
    assert (base(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max() > 1e-3


def test_we_load_an_adapter_saved_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=4)
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    g = torch.Generator().manual_seed(2)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            with torch.no_grad():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(str(tmp_path / "p"))
    ours = copy.deepcopy(base)
    names = load_adapter(ours, tmp_path / "p")
    assert len(names) == 6
    ids = torch.randint(0, 256, (1, 20))
    torch.testing.assert_close(ours.eval()(input_ids=ids).logits, pm.eval()(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_merge_gives_plain_linear_with_same_output():
    model = tiny_llama()
    add_lora(model, LoRASpec(r=4, alpha=4))
    _randomize_b(model)
    ids = torch.randint(0, 256, (2, 16))
    ref = model(input_ids=ids).logits
    merged = merge_lora(model)
    assert merged and not lora_layers(model) and not lora_parameters(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in merged)
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
