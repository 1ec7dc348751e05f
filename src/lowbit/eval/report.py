"""One evaluation row: perplexity, KL and top-1 against the unquantized model, size and bits per weight.

:class:`Evaluator` runs the reference model once (cached next-token log-probabilities) and then scores any
number of quantized models on the same windows; ``lowbit eval`` and ``lowbit demo`` both use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lowbit.eval.metrics import compare, model_size, reference_logits
from lowbit.eval.perplexity import perplexity
from lowbit.model.walk import iter_targets

__all__ = ["Evaluator", "evaluate_against", "linear_size"]


def _callback(progress: Callable[..., Iterable[Any]] | None, desc: str) -> Callable[[int, int], None] | None:
    """Adapt a tqdm-like wrapper to the ``(done, total)`` callbacks of :mod:`lowbit.eval.metrics`."""
    if progress is None:
        return None
    state: dict[str, Any] = {}

    def cb(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = progress(iter(()), total=total, desc=desc)
        bar = state["bar"]
        if hasattr(bar, "update"):
            bar.update(done - getattr(bar, "n", done - 1))
            if done == total and hasattr(bar, "close"):
                bar.close()

    return cb


def linear_size(model: nn.Module) -> tuple[int, float]:
    """Bytes and bits per weight of the layers lowbit quantizes by default (QuantLinear, or the float
    Linear layers that would be quantized: lm_head and embeddings excluded)."""
    ms = model_size(model)
    if ms.quantized_weights:
        return ms.quantized_bytes, ms.quantized_bits_per_weight
    nbytes = numel = 0
    for _, lin in iter_targets(model):
        nbytes += lin.weight.numel() * lin.weight.element_size()
        numel += lin.weight.numel()
    return nbytes, (8.0 * nbytes / numel if numel else float("nan"))


class Evaluator:
    """Scores models against a fixed reference on fixed evaluation windows.

    Args:
        reference: the unquantized model.
        tokens: ``(1, T)`` evaluation token ids.
        ctx_len: window length (non-overlapping windows, GPTQ/AWQ protocol).
        cache_dtype: dtype of the cached reference log-probabilities (bf16 halves memory, KL error ~1e-3 rel).
    """

    def __init__(self, reference: nn.Module, tokens: torch.Tensor, ctx_len: int = 2048,
                 cache_dtype: torch.dtype = torch.float32, progress: Callable[..., Iterable[Any]] | None = None) -> None:
        self.progress = progress
        self.reference = reference_logits(reference, tokens, ctx_len=ctx_len, dtype=cache_dtype,
                                          progress=_callback(progress, "reference"))

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        r = compare(model, self.reference, progress=_callback(self.progress, "evaluate"))
        nbytes, bpw = linear_size(model)
        return {"ppl": r.perplexity, "kl": r.kl, "top1": r.top1, "bits_per_weight": bpw, "bytes": nbytes,
                "reference_ppl": r.reference_perplexity, "positions": r.n_positions}


def evaluate_against(model: nn.Module, tokenizer: Any, *, reference: nn.Module | None = None, text: str | None = None,
                     ctx_len: int = 2048, max_tokens: int | None = None,
                     progress: Callable[..., Iterable[Any]] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` on ``text`` (default: the docs-topics evaluation split).

    The result has ``ppl, kl, top1, bits_per_weight, bytes``. Without a ``reference`` (an unquantized model
    evaluated alone) the model is its own reference, so ``kl`` is 0 and ``top1`` is 1 by definition.
    """
    from lowbit.data.corpora import evaluation_tokens

    tokens = evaluation_tokens(tokenizer, max_tokens=max_tokens, text=text)
    if reference is None:
        nbytes, bpw = linear_size(model)
        ppl = perplexity(model, tokens, ctx_len=ctx_len)
        return {"ppl": ppl, "kl": 0.0, "top1": 1.0, "bits_per_weight": bpw, "bytes": nbytes,
                "reference": "self", "tokens": int(tokens.numel()), "ctx_len": ctx_len}
    out = Evaluator(reference, tokens, ctx_len=ctx_len, progress=progress).evaluate(model)
    out.update(tokens=int(tokens.numel()), ctx_len=ctx_len)
    return out
