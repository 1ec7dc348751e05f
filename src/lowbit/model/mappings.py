"""Smooth/balance layer pairs per architecture, as regex data, and the one fold that applies a scale to them.

A :class:`ScaleMapping` says: the output channels of ``smooth`` (a norm, or a Linear's last rows) feed the input
channels of the ``balance`` Linears, so ``smooth ÷ s`` and ``balance · s`` leave the block's function unchanged.
AWQ (arXiv 2306.00978) and SmoothQuant (arXiv 2211.10438) both search ``s`` and fold it with :func:`fold_scale`.
``inspect`` names the sub-module whose output AWQ's loss compares (llm-awq's ``module2inspect``).

Tables are keyed by a regex over the block's class name (``LlamaDecoderLayer``), so a new architecture is a
new row, not a new file. Names are regexes relative to the decoder block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ScaleMapping", "MAPPINGS", "mappings_for", "resolve", "fold_scale", "ResolvedMapping"]


@dataclass(frozen=True)
class ScaleMapping:
    """One smooth → balance pair (regexes relative to a decoder block).

    Attributes:
        smooth: the module whose output channels are divided by ``s`` (RMSNorm/LayerNorm or Linear).
        balance: the Linear layers whose input channels are multiplied by ``s``.
        inspect: the module whose output AWQ's loss compares; ``None`` means the single balance layer.
    """

    smooth: str
    balance: tuple[str, ...]
    inspect: str | None = None


_LLAMA = (
    ScaleMapping(r"^input_layernorm$", (r"^self_attn\.q_proj$", r"^self_attn\.k_proj$", r"^self_attn\.v_proj$"),
                 "self_attn"),
    ScaleMapping(r"^self_attn\.v_proj$", (r"^self_attn\.o_proj$",)),
    ScaleMapping(r"^post_attention_layernorm$", (r"^mlp\.gate_proj$", r"^mlp\.up_proj$"), "mlp"),
    ScaleMapping(r"^mlp\.up_proj$", (r"^mlp\.down_proj$",)),
)
_OPT = (
    ScaleMapping(r"^self_attn_layer_norm$", (r"^self_attn\.q_proj$", r"^self_attn\.k_proj$", r"^self_attn\.v_proj$"),
                 "self_attn"),
    ScaleMapping(r"^self_attn\.v_proj$", (r"^self_attn\.out_proj$",)),
    ScaleMapping(r"^final_layer_norm$", (r"^fc1$",), None),
)

MAPPINGS: tuple[tuple[str, tuple[ScaleMapping, ...]], ...] = (
    (r"^(Llama|Mistral|Qwen2|Qwen3|Gemma|Gemma2|Phi3|Granite|Olmo2?|SmolLM3)DecoderLayer$", _LLAMA),
    (r"^OPTDecoderLayer$", _OPT),
)
"""``(block class-name regex, mappings)`` rows, tried in order."""


@dataclass
class ResolvedMapping:
    """A mapping resolved to modules of one block."""

    smooth_name: str
    smooth: nn.Module
    balance_names: list[str]
    balance: list[nn.Linear]
    inspect_name: str
    inspect: nn.Module

    @property
    def smooth_is_linear(self) -> bool:
        return isinstance(self.smooth, nn.Linear)


def mappings_for(block: nn.Module) -> tuple[ScaleMapping, ...]:
    """The mappings of ``block``'s architecture; ``ValueError`` naming the known classes if none matches."""
    import re

    name = type(block).__name__
    for pat, maps in MAPPINGS:
        if re.search(pat, name):
            return maps
    raise ValueError(f"no smooth/balance mappings for block class {name!r}; known: {[p for p, _ in MAPPINGS]} "
                     "(add a row to lowbit.model.mappings.MAPPINGS)")


def resolve(block: nn.Module, maps: tuple[ScaleMapping, ...] | None = None,
            only: set[str] | None = None) -> list[ResolvedMapping]:
    """Resolve ``maps`` (default: :func:`mappings_for`) against ``block``'s modules.

    A mapping is skipped (as llm-awq does) when a pattern matches nothing, when a balance layer is outside
    ``only`` (the layers being quantized), or when a Linear smooth layer's output width differs from the balance
    layers' input width (grouped-query attention: ``v_proj`` is narrower than ``o_proj``'s input).
    """
    import re

    maps = mappings_for(block) if maps is None else maps
    named = dict(block.named_modules())
    out: list[ResolvedMapping] = []
    for m in maps:
        smooth = [n for n in named if n and re.search(m.smooth, n)]
        bal = [n for pat in m.balance for n in named if n and re.search(pat, n) and isinstance(named[n], nn.Linear)]
        if len(smooth) != 1 or not bal or (only is not None and not set(bal) <= only):
            continue
        sm = named[smooth[0]]
        width = {named[n].in_features for n in bal}  # type: ignore[union-attr]
        if len(width) != 1:
            continue
        if isinstance(sm, nn.Linear):
            if sm.out_features != next(iter(width)):
                continue
        elif getattr(sm, "weight", None) is None or sm.weight.shape[-1] != next(iter(width)):
            continue
        insp = m.inspect if m.inspect is not None else bal[0]
        if insp not in named:
            continue
        out.append(ResolvedMapping(smooth[0], sm, bal, [named[n] for n in bal], insp, named[insp]))  # type: ignore[misc]
    return out


@torch.no_grad()
def fold_scale(smooth: nn.Module, balance: list[nn.Linear], s: torch.Tensor) -> None:
    """``smooth`` output ÷ ``s``, every ``balance`` input · ``s``, in place; the composition is unchanged.

    Args:
        smooth: a norm (``weight`` and optional ``bias`` of length ``d``) or a Linear whose *last* ``d`` output
            rows are divided (fused projections, as llm-awq does).
        balance: Linears with ``in_features == d``.
        s: ``(d,)`` positive scales.
    """
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError("scales must be finite and positive")
    d = s.numel()
    if isinstance(smooth, nn.Linear):
        smooth.weight[-d:].div_(s.to(smooth.weight.dtype).view(-1, 1))
        if smooth.bias is not None:
            smooth.bias[-d:].div_(s.to(smooth.bias.dtype))
    else:
        # Gemma-style norms scale by (1 + weight); dividing would need weight' = (1 + w)/s - 1
        if "Gemma" in type(smooth).__name__:
            w = smooth.weight
            w.copy_((1 + w) / s.to(w.dtype) - 1)
        else:
            smooth.weight.div_(s.to(smooth.weight.dtype))
        if getattr(smooth, "bias", None) is not None:
            smooth.bias.div_(s.to(smooth.bias.dtype))
    for fc in balance:
        fc.weight.mul_(s.to(fc.weight.dtype).view(1, -1))
