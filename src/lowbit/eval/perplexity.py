"""Perplexity by the GPTQ/AWQ protocol (arXiv:2210.17323 section 5, arXiv:2306.00978 section 5).

The token stream ``(1, T)`` is cut into **non-overlapping** windows of ``ctx_len`` tokens (stride =
``ctx_len``, no context carried across windows); each window is one forward pass starting from an empty cache.
In a window of ``L`` tokens the logits at positions ``0 .. L-2`` predict tokens ``1 .. L-1``, so every window
contributes ``L - 1`` predicted tokens (its first token is only context). The negative log-likelihoods (natural
log) are summed over all predicted tokens of all windows and

    PPL = exp( sum NLL / number of predicted tokens ).

A shorter final window (``T % ctx_len`` leftover tokens) is **dropped** by default, as GPTQ/AWQ do
(``nsamples = T // ctx_len``), so published numbers are comparable; ``drop_last=False`` keeps it (when it has at
least 2 tokens). A text shorter than one window is evaluated as a single window of all its tokens.

Windows of equal length run as one batch of up to ``batch_tokens`` tokens (default 2048; windows are
independent, so this changes only float summation order, not the protocol): a quantized layer then
dequantizes its weight once per batch rather than once per window.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["perplexity", "windows", "window_nll", "window_logits"]

BATCH_TOKENS = 2048


def _check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"tokens must have shape (1, T) or (T,), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64/int32 token ids, got {tokens.dtype}")
    if tokens.shape[1] < 2:
        raise ValueError(f"need at least 2 tokens to predict one, got {tokens.shape[1]}")
    return tokens


def windows(tokens: torch.Tensor, ctx_len: int = 2048, max_windows: int | None = None,
            drop_last: bool = True) -> list[tuple[int, int]]:
    """``[start, end)`` spans of the non-overlapping evaluation windows (see the module docstring).

    Args:
        tokens: ``(1, T)`` or ``(T,)`` token ids.
        ctx_len: window length (>= 2).
        max_windows: keep only the first ``max_windows`` windows.
        drop_last: drop a shorter final window.
    """
    tokens = _check_tokens(tokens)
    if isinstance(ctx_len, bool) or not isinstance(ctx_len, int) or ctx_len < 2:
        raise ValueError(f"ctx_len must be an int >= 2, got {ctx_len!r}")
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)
                                    or max_windows < 1):
        raise ValueError(f"max_windows must be None or an int >= 1, got {max_windows!r}")
    total = tokens.shape[1]
    spans = [(s, s + ctx_len) for s in range(0, total - ctx_len + 1, ctx_len)]
    tail = spans[-1][1] if spans else 0
    if (not spans or not drop_last) and total - tail >= 2:
        spans.append((tail, total))
    return spans[:max_windows] if max_windows is not None else spans


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def window_logits(model: torch.nn.Module, tokens: torch.Tensor, spans: list[tuple[int, int]],
                  batch_tokens: int = BATCH_TOKENS) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(index, window (1, L), logits (L, V) float32)`` for each span, in order.

    Consecutive spans of equal length are stacked into one forward pass of at most ``batch_tokens`` tokens
    (always at least one window).
    """
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
    i = 0
    while i < len(spans):
        length = spans[i][1] - spans[i][0]
        j = i + 1
        while j < len(spans) and spans[j][1] - spans[j][0] == length and (j - i + 1) * length <= batch_tokens:
            j += 1
        batch = torch.cat([tokens[:, s:e] for s, e in spans[i:j]], dim=0)
        out: Any = model(batch.to(_device(model)))
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
        for k in range(j - i):
            s, e = spans[i + k]
            yield i + k, tokens[:, s:e], logits[k].float()
        del out, logits
        i = j


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Summed NLL (nats, float64 scalar) of tokens ``1..L-1`` given ``logits`` ``(L, V)`` of window ``(1, L)``."""
    target = window[0, 1:].to(logits.device)
    return F.cross_entropy(logits[:-1].float(), target, reduction="sum").double()


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, ctx_len: int = 2048, max_windows: int | None = None,
               progress: Callable[[int, int], None] | None = None, drop_last: bool = True,
               batch_tokens: int = BATCH_TOKENS) -> float:
    """Perplexity of ``model`` on ``tokens`` (GPTQ/AWQ protocol, see the module docstring).

    Args:
        model: a causal LM; ``model(ids)`` returns ``.logits`` ``(1, L, V)``.
        tokens: ``(1, T)`` or ``(T,)`` token ids.
        ctx_len: window length and stride.
        max_windows: evaluate only the first ``max_windows`` windows.
        progress: called as ``progress(done, total)`` after each window.
        drop_last: drop a shorter final window (default, as GPTQ/AWQ).
        batch_tokens: stack equal-length windows into forward passes of at most this many tokens.

    Returns:
        ``exp(mean NLL)`` over all predicted tokens.
    """
    spans = windows(tokens, ctx_len, max_windows, drop_last)
    tokens = _check_tokens(tokens)
    was_training = model.training
    model.eval()
    nll, count = torch.zeros((), dtype=torch.float64), 0
    try:
        for i, window, logits in window_logits(model, tokens, spans, batch_tokens):
            nll += window_nll(logits, window).cpu()
            count += window.shape[1] - 1
            if progress is not None:
                progress(i + 1, len(spans))
    finally:
        model.train(was_training)
    return math.exp(nll.item() / count)
