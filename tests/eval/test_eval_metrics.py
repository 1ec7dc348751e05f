"""lowbit.eval: perplexity against float64 textbook computations, KL/top-1, size accounting."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit.eval.metrics import compare, model_size, reference_logits
from lowbit.eval.perplexity import perplexity, windows


class Bigram(nn.Module):
    """logits[t] = table[token_t]: a model whose exact NLL is known in closed form."""

    def __init__(self, vocab: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def _textbook_ppl(logits_fn, tokens: torch.Tensor, spans: list[tuple[int, int]]) -> float:
    """float64: PPL = exp(sum over windows and predicted positions of -log softmax / count)."""
    total, count = 0.0, 0
    for s, e in spans:
        z = logits_fn(tokens[:, s:e])[0].double()
        for t in range(e - s - 1):
            row = z[t]
            m = row.max()
            log_p = row[tokens[0, s + t + 1]] - m - torch.log(torch.exp(row - m).sum())
            total -= log_p.item()
            count += 1
    return math.exp(total / count)


def test_windows_are_non_overlapping_and_drop_the_tail() -> None:
    t = torch.arange(50)
    assert windows(t, 16) == [(0, 16), (16, 32), (32, 48)]
    assert windows(t, 16, drop_last=False) == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert windows(t, 16, max_windows=2) == [(0, 16), (16, 32)]
    assert windows(torch.arange(49), 16, drop_last=False) == [(0, 16), (16, 32), (32, 48)]  # 1 leftover: nothing
    assert windows(torch.arange(10), 16) == [(0, 10)]  # shorter than one window: one short window


@pytest.mark.parametrize("drop_last", [True, False])
def test_perplexity_equals_float64_textbook_bigram(drop_last: bool) -> None:
    model = Bigram(11, 0)
    tokens = torch.randint(0, 11, (1, 70), generator=torch.Generator().manual_seed(1))
    spans = windows(tokens, 16, drop_last=drop_last)
    expect = _textbook_ppl(lambda w: model.double()(w), tokens, spans)
    model.float()
    got = perplexity(model, tokens, ctx_len=16, drop_last=drop_last)
    assert got == pytest.approx(expect, rel=1e-6)
    # the first token of each window is context only: a per-stream computation would differ
    stream = _textbook_ppl(lambda w: model.double()(w), tokens, [(0, 70)])
    assert got != pytest.approx(stream, rel=1e-6)


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_equals_float64_textbook_tiny_llama() -> None:
    model = _tiny_llama()
    tokens = torch.randint(0, 64, (1, 100), generator=torch.Generator().manual_seed(2))
    progress = []
    got = perplexity(model, tokens, ctx_len=32, progress=lambda i, n: progress.append((i, n)))
    ref64 = _tiny_llama().double()
    expect = _textbook_ppl(lambda w: ref64(w).logits, tokens, windows(tokens, 32))
    assert got == pytest.approx(expect, rel=1e-5)
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert perplexity(model, tokens, ctx_len=32, max_windows=1) == pytest.approx(
        _textbook_ppl(lambda w: ref64(w).logits, tokens, [(0, 32)]), rel=1e-5)


def test_equal_windows_are_batched_up_to_batch_tokens_with_the_same_result() -> None:
    model = _tiny_llama()
    shapes = []
    model.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)) if args else None)
    tokens = torch.randint(0, 64, (1, 170), generator=torch.Generator().manual_seed(5))
    one_by_one = perplexity(model, tokens, ctx_len=32, batch_tokens=1)
    assert shapes == [(1, 32)] * 5
    shapes.clear()
    batched = perplexity(model, tokens, ctx_len=32, batch_tokens=96, drop_last=False)
    assert shapes == [(3, 32), (2, 32), (1, 10)]  # equal-length windows stacked; the short tail alone
    shapes.clear()
    assert perplexity(model, tokens, ctx_len=32, batch_tokens=96) == pytest.approx(one_by_one, rel=1e-6)
    assert batched != one_by_one  # the kept tail changes it: the tail really was evaluated
    with pytest.raises(ValueError, match="batch_tokens"):
        perplexity(model, tokens, ctx_len=32, batch_tokens=0)


def test_perplexity_rejects_bad_input() -> None:
    model = Bigram(5, 0)
    with pytest.raises(ValueError, match="ctx_len"):
        perplexity(model, torch.zeros(1, 10, dtype=torch.long), ctx_len=1)
    with pytest.raises(ValueError, match=r"shape \(1, T\)"):
        perplexity(model, torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="token ids"):
        perplexity(model, torch.zeros(1, 10))
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, torch.zeros(1, 10, dtype=torch.long), max_windows=0)


def test_kl_of_model_with_itself_is_zero_and_top1_is_one() -> None:
    model = _tiny_llama()
    tokens = torch.randint(0, 64, (1, 80), generator=torch.Generator().manual_seed(3))
    res = compare(model, model, tokens, ctx_len=32)
    assert res.kl == 0.0 and res.kl_max == 0.0 and res.top1 == 1.0
    assert res.perplexity == res.reference_perplexity == pytest.approx(perplexity(model, tokens, 32), rel=1e-12)
    assert res.n_positions == 2 * 31


def test_kl_and_top1_equal_float64_textbook() -> None:
    ref, other = Bigram(13, 0), Bigram(13, 1)
    with torch.no_grad():  # a close model, so top-1 agreement is neither 0 nor 1
        other.table.copy_(ref.table + 0.8 * other.table)
    tokens = torch.randint(0, 13, (1, 90), generator=torch.Generator().manual_seed(4))
    cache = reference_logits(ref, tokens, ctx_len=20)
    res = compare(other, cache)
    kl, agree, n = 0.0, 0, 0
    for s, e in windows(tokens, 20):
        p = torch.softmax(ref.table.double()[tokens[0, s:e - 1]], -1)
        q = torch.softmax(other.table.double()[tokens[0, s:e - 1]], -1)
        kl += (p * (p.log() - q.log())).sum().item()
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += e - s - 1
    assert res.n_positions == n == 4 * 19
    assert res.kl == pytest.approx(kl / n, rel=1e-5)
    assert res.top1 == agree / n and 0 < res.top1 < 1
    assert res.reference_perplexity == pytest.approx(perplexity(ref, tokens, 20), rel=1e-9)
    assert res.perplexity == pytest.approx(perplexity(other, tokens, 20), rel=1e-9)
    # a bf16 cache halves memory and moves KL only slightly
    cache16 = reference_logits(ref, tokens, ctx_len=20, dtype=torch.bfloat16)
    assert cache16.nbytes * 2 == cache.nbytes
    assert compare(other, cache16).kl == pytest.approx(res.kl, rel=2e-2)
    with pytest.raises(ValueError, match="tokens differ"):
        compare(other, cache, tokens.flip(1))


def test_model_size_counts_quantlinear_storage_and_float_params() -> None:
    from lowbit.formats.affine import IntAffine
    from lowbit.nn import QuantLinear

    torch.manual_seed(0)
    emb = nn.Embedding(10, 64)
    head = nn.Linear(64, 10, bias=False)
    head.weight = emb.weight  # tied: counted once
    lin = nn.Linear(64, 96)
    q = QuantLinear(IntAffine(bits=4, group_size=32).quantize(lin.weight.detach()), lin.bias)
    model = nn.ModuleDict({"emb": emb, "q": q, "head": head})
    size = model_size(model)
    stored = sum(t.numel() * t.element_size() for t in q.qweight.tensors().values())
    assert size.quantized_bytes == stored == q.qweight.nbytes
    assert size.quantized_weights == 96 * 64
    # 4-bit codes + fp16 scale and zero point per 32 weights: 4 + 2*16/32 = 5 bits, give or take packing
    assert 4.0 < size.quantized_bits_per_weight <= 5.0 + 1e-9
    assert size.total_bytes == stored + 10 * 64 * 4 + 96 * 4
    assert size.total_weights == 96 * 64 + 10 * 64 + 96
    plain = model_size(nn.Linear(8, 4))
    assert plain.quantized_bytes == 0 and math.isnan(plain.quantized_bits_per_weight) and plain.bits_per_weight == 32
