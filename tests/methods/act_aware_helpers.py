"""Tiny Llama models for the activation-aware method tests (AWQ, SmoothQuant, LLM.int8(), FP8, ZeroQuant-FP)."""

from __future__ import annotations

import torch
import transformers
from torch import nn

OUTLIER_DIMS = (3, 17, 41)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, outliers: float = 0.0, layers: int = 2) -> nn.Module:
    """A 2-block Llama (hidden 64, GQA 4/2 heads, MLP 160).

    ``outliers > 0`` injects outlier features as LLM.int8() describes them: the norm weights of a few hidden
    dimensions are multiplied by ``outliers`` and the reading Linear columns divided by it, so the float model
    computes the same function while those input features of q/k/v and gate/up become ``outliers``× larger.
    """
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval().to(dtype)
    if outliers:
        with torch.no_grad():
            for blk in model.model.layers:
                for norm, fcs in ((blk.input_layernorm, (blk.self_attn.q_proj, blk.self_attn.k_proj, blk.self_attn.v_proj)),
                                  (blk.post_attention_layernorm, (blk.mlp.gate_proj, blk.mlp.up_proj))):
                    for d in OUTLIER_DIMS:
                        norm.weight[d] *= outliers
                        for fc in fcs:
                            fc.weight[:, d] /= outliers
    return model


def token_ids(n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 96, (n, seq), generator=torch.Generator().manual_seed(seed))


def logit_mse(model: nn.Module, ref: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits.to(torch.float64) - ref.to(torch.float64)).pow(2).mean())
