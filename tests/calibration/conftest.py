"""Tiny random decoder models of the three families the runner must handle."""

from __future__ import annotations

import pytest
import torch
import transformers

FAMILIES = ("llama", "mistral", "qwen2")


def tiny_model(family: str = "llama", layers: int = 2, seed: int = 0) -> torch.nn.Module:
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[family](**common)
    cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
           "qwen2": transformers.Qwen2ForCausalLM}[family]
    torch.manual_seed(seed)
    return cls(cfg).eval()


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, 96, (6, 24), generator=torch.Generator().manual_seed(1))
