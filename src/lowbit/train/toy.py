"""Tiny decoder models for tests, examples and CPU experiments (random init or briefly pretrained)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["tiny_llama", "pretrain"]


def tiny_llama(vocab_size: int = 256, hidden_size: int = 64, intermediate_size: int = 128, num_layers: int = 2,
               num_heads: int = 4, seed: int = 0) -> nn.Module:
    """A random ``transformers.LlamaForCausalLM`` (fp32, eval mode) small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                      max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return model.eval()


def pretrain(model: nn.Module, blocks: torch.Tensor, steps: int, *, lr: float = 3e-3, batch_size: int = 8,
             seed: int = 0) -> list[float]:
    """Plain fp32 AdamW language-model training of every parameter (to make a toy model non-random)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, blocks.shape[0], (batch_size,), generator=g)
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


_PRETRAINED: dict[tuple[object, ...], tuple[dict[str, torch.Tensor], object]] = {}


def pretrained_tiny(steps: int = 40, seq_len: int = 64, hidden_size: int = 64, seed: int = 0,
                    package: str = "json") -> nn.Module:
    """A :func:`tiny_llama` pretrained for ``steps`` AdamW steps on the sources of a stdlib ``package``
    (byte tokens). Cached per process (a fresh copy each call), so several tests can share one."""
    import copy

    from lowbit.train.data import ByteTokenizer, stdlib_texts, token_blocks

    key = (steps, seq_len, hidden_size, seed, package)
    if key not in _PRETRAINED:
        model = tiny_llama(hidden_size=hidden_size, intermediate_size=2 * hidden_size, seed=seed)
        blocks = token_blocks(ByteTokenizer(), stdlib_texts(package), seq_len, max_blocks=2000)
        pretrain(model, blocks, steps, seed=seed)
        _PRETRAINED[key] = (copy.deepcopy(model.state_dict()), model.config)
    state, config = _PRETRAINED[key]
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model.eval()
