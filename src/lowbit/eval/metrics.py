"""Quality versus the unquantized model, and size accounting.

* :func:`reference_logits` runs the unquantized model once over the evaluation windows (the same windows as
  :func:`lowbit.eval.perplexity.perplexity`) and keeps, per window, its next-token log-probabilities
  (``float32``, or ``bfloat16`` to halve memory), its arg-max and its summed NLL.
* :func:`compare` runs a (quantized) model over the same windows and returns the mean KL divergence
  ``KL(P_ref || P_model)`` of the next-token distributions (nats, mean over predicted positions, i.e. positions
  ``0..L-2`` of each window), the top-1 agreement (fraction of positions where both arg-maxes are equal), and both
  perplexities. An evaluation of N methods computes :func:`reference_logits` once and calls :func:`compare` N
  times.
* :func:`model_size` counts stored bytes: ``QuantLinear`` weights by their stored tensors
  (``qweight.nbytes``: data, scales, zero points, ...), every other parameter at its dtype.

Memory of a reference: ``n_positions * vocab * (4 or 2)`` bytes, e.g. 16k positions x 49152 vocab in bf16 = 1.6 GB;
cap it with ``max_windows``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lowbit.eval.perplexity import BATCH_TOKENS, _check_tokens, window_logits, window_nll, windows

__all__ = ["ReferenceLogits", "CompareResult", "ModelSize", "reference_logits", "compare", "model_size"]

_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ReferenceLogits:
    """Cached next-token distributions of the reference model over fixed windows.

    Attributes:
        tokens: ``(1, T)`` token ids.
        spans: ``[start, end)`` of each window.
        log_probs: per window ``(L - 1, V)`` log-softmax of positions ``0..L-2``.
        top1: per window ``(L - 1,)`` arg-max token ids (from float32, before any down-cast).
        nll: summed NLL (nats) over all windows.
        n_predicted: number of predicted positions.
    """

    tokens: torch.Tensor
    spans: list[tuple[int, int]]
    log_probs: list[torch.Tensor]
    top1: list[torch.Tensor]
    nll: float
    n_predicted: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n_predicted)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.log_probs)


@dataclass(frozen=True)
class CompareResult:
    """Result of :func:`compare`.

    Attributes:
        kl: mean ``KL(P_ref || P_model)`` over predicted positions, nats.
        kl_max: largest per-position KL, nats.
        top1: fraction of positions whose arg-max tokens agree.
        perplexity: the model's perplexity on the same windows.
        reference_perplexity: the reference's perplexity.
        n_positions: positions compared.
    """

    kl: float
    kl_max: float
    top1: float
    perplexity: float
    reference_perplexity: float
    n_positions: int


@torch.no_grad()
def reference_logits(model: torch.nn.Module, tokens: torch.Tensor, ctx_len: int = 2048,
                     max_windows: int | None = None, dtype: torch.dtype = torch.float32,
                     drop_last: bool = True, progress: Callable[[int, int], None] | None = None,
                     batch_tokens: int = BATCH_TOKENS) -> ReferenceLogits:
    """Run the reference (unquantized) model once and cache what :func:`compare` needs.

    Args:
        model: the reference causal LM.
        tokens: ``(1, T)`` or ``(T,)`` token ids.
        ctx_len, max_windows, drop_last: the windows, as in :func:`lowbit.eval.perplexity.perplexity`.
        dtype: storage dtype of the cached log-probabilities (float32, bfloat16 or float16).
        progress: called as ``progress(done, total)``.
        batch_tokens: stack equal-length windows into forward passes of at most this many tokens.
    """
    if dtype not in _CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype} not supported; valid: {_CACHE_DTYPES}")
    tokens = _check_tokens(tokens)
    spans = windows(tokens, ctx_len, max_windows, drop_last)
    was_training = model.training
    model.eval()
    log_probs, top1, nll, n = [], [], 0.0, 0
    try:
        for i, window, logits in window_logits(model, tokens, spans, batch_tokens):
            nll += window_nll(logits, window).item()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            top1.append(lp.argmax(-1).cpu())
            log_probs.append(lp.to(dtype).cpu())
            n += window.shape[1] - 1
            if progress is not None:
                progress(i + 1, len(spans))
    finally:
        model.train(was_training)
    return ReferenceLogits(tokens, spans, log_probs, top1, nll, n)


@torch.no_grad()
def compare(model: torch.nn.Module, reference: ReferenceLogits | torch.nn.Module, tokens: torch.Tensor | None = None,
            ctx_len: int = 2048, max_windows: int | None = None,
            progress: Callable[[int, int], None] | None = None, batch_tokens: int = BATCH_TOKENS) -> CompareResult:
    """KL divergence and top-1 agreement of ``model`` against a reference, on the same windows.

    Args:
        model: the model under test (e.g. quantized).
        reference: a :class:`ReferenceLogits` (then ``tokens``/``ctx_len``/``max_windows`` come from it and
            ``tokens`` may be omitted), or the reference model itself (computed here in float32).
        tokens: ``(1, T)`` token ids; required when ``reference`` is a model.
        ctx_len, max_windows: the windows when ``reference`` is a model.
        progress: called as ``progress(done, total)``.
        batch_tokens: stack equal-length windows into forward passes of at most this many tokens.

    Returns:
        A :class:`CompareResult`; ``kl`` is ``mean_t sum_v p_ref(v|t) (log p_ref(v|t) - log p_model(v|t))``.
    """
    if isinstance(reference, torch.nn.Module):
        if tokens is None:
            raise ValueError("tokens are required when the reference is a model")
        reference = reference_logits(reference, tokens, ctx_len, max_windows)
    elif not isinstance(reference, ReferenceLogits):
        raise TypeError(f"reference must be ReferenceLogits or an nn.Module, got {type(reference).__name__}")
    elif tokens is not None and not torch.equal(_check_tokens(tokens).cpu(), reference.tokens.cpu()):
        raise ValueError("tokens differ from the tokens the reference was computed on")
    was_training = model.training
    model.eval()
    kl_sum, kl_max, agree, nll, n = 0.0, 0.0, 0, 0.0, 0
    try:
        for i, window, logits in window_logits(model, reference.tokens, reference.spans, batch_tokens):
            ref_lp, ref_top1 = reference.log_probs[i], reference.top1[i]
            nll += window_nll(logits, window).item()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            ref = ref_lp.to(lp.device, torch.float32)
            p_ref = ref.exp()  # where p_ref == 0 the term is 0 (avoids 0 * -inf)
            kl = torch.where(p_ref > 0, p_ref * (ref - lp), torch.zeros_like(lp)).sum(-1)
            kl_sum += kl.double().sum().item()
            kl_max = max(kl_max, kl.max().item())
            agree += int((lp.argmax(-1).cpu() == ref_top1).sum())
            n += window.shape[1] - 1
            if progress is not None:
                progress(i + 1, len(reference.spans))
    finally:
        model.train(was_training)
    return CompareResult(kl=kl_sum / n, kl_max=kl_max, top1=agree / n, perplexity=math.exp(nll / n),
                         reference_perplexity=reference.perplexity, n_positions=n)


@dataclass(frozen=True)
class ModelSize:
    """Stored size of a model.

    Attributes:
        quantized_bytes: stored bytes of all ``QuantLinear`` weights (data + scales + ...; biases excluded).
        quantized_weights: logical weights of those layers (``out_features * in_features`` summed).
        total_bytes: ``quantized_bytes`` + every parameter at its dtype (tied parameters counted once).
        total_weights: ``quantized_weights`` + every parameter's element count.
    """

    quantized_bytes: int
    quantized_weights: int
    total_bytes: int
    total_weights: int

    @property
    def quantized_bits_per_weight(self) -> float:
        """Bits per weight of the quantized linear layers (``nan`` when there are none)."""
        return 8.0 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else float("nan")

    @property
    def bits_per_weight(self) -> float:
        """Bits per weight of the whole model."""
        return 8.0 * self.total_bytes / self.total_weights if self.total_weights else float("nan")


def model_size(model: torch.nn.Module) -> ModelSize:
    """Stored bytes and bits per weight of ``model`` (see :class:`ModelSize`)."""
    from lowbit.nn import QuantLinear

    q_bytes = q_weights = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            q_bytes += module.qweight.nbytes
            q_weights += module.out_features * module.in_features
    seen: set[int] = set()
    f_bytes = f_weights = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        f_bytes += p.numel() * p.element_size()
        f_weights += p.numel()
    return ModelSize(q_bytes, q_weights, q_bytes + f_bytes, q_weights + f_weights)
