"""llama-quantize's per-tensor type choices ("mixes" such as Q4_K_M), as data and one pure function.

Ported from llama.cpp ``src/llama-quant.cpp`` (``llama_tensor_get_type_impl``, ``tensor_type_fallback``,
``tensor_allows_quantization``, ``llama_ftype_get_default_type``) for dense (non-MoE, non-Falcon) decoder
models, so that ``export_gguf(..., type="Q4_K_M")`` writes the same tensor types as
``llama-quantize model-f32.gguf out.gguf Q4_K_M``. Tensors are visited in llama-quantize's order (layer, then
name) because the ``attn_v`` counter of some mixes depends on it.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from lowbit.formats.ggml import GGML_TYPES

__all__ = ["LLAMA_FTYPE", "MIX_DEFAULT_TYPE", "tensor_types", "is_mix", "use_more_bits"]

#: llama_ftype values written to ``general.file_type`` (include/llama.h).
LLAMA_FTYPE: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ4_NL": 25, "IQ4_XS": 30, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
}

#: ``llama_ftype_get_default_type``: the base block type of each mix.
MIX_DEFAULT_TYPE: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
    "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
    "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0",
}

#: ``tensor_type_fallback``: what a type becomes when a row does not split into its blocks (then F16).
FALLBACK: dict[str, str] = {
    "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ssm_conv1d", "attn_rel_b.weight", "time_mix_")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def is_mix(name: str) -> bool:
    """Whether ``name`` is a llama-quantize file type (mix) rather than only a block type."""
    return name.upper() in MIX_DEFAULT_TYPE


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer selector for the extra-bits tensors of the ``_M`` mixes (C integer division)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and not any(s in name for s in _NOT_QUANTIZED)


def _order_key(name: str) -> tuple[int, str]:
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def _fallback(t: str, ncols: int) -> str:
    if ncols % GGML_TYPES[t].block_size == 0:
        return t
    r = FALLBACK.get(t)
    if r is None:
        raise ValueError(f"no fallback type for {t} with rows of {ncols}")
    return r if ncols % GGML_TYPES[r].block_size == 0 else "F16"


def tensor_types(tensors: Iterable[tuple[str, tuple[int, ...]]], mix: str, n_layer: int, n_head: int,
                 n_head_kv: int, has_imatrix: bool = False, pure: bool = False,
                 unquantized_type: str = "F32") -> dict[str, str]:
    """The GGML type of every tensor of a model for a llama-quantize mix or a single block type.

    Args:
        tensors: ``(gguf_name, numpy_shape)`` pairs (shape last dim = row length = ggml ``ne[0]``).
        mix: a file type of :data:`MIX_DEFAULT_TYPE` (``"Q4_K_M"``), or any block type of
            :data:`~lowbit.formats.ggml.GGML_TYPES` (used pure, with llama-quantize's shape fallbacks).
        n_layer, n_head, n_head_kv: model geometry (``n_gqa = n_head / n_head_kv``).
        has_imatrix: llama-quantize changes a few choices when an importance matrix is given.
        pure: like ``llama-quantize --pure``: no per-tensor mixing, only the shape fallbacks.
        unquantized_type: type of tensors llama-quantize copies (norms, biases, 1-D): F32.

    Returns:
        ``{gguf_name: type_name}`` in llama-quantize's processing order.

    Raises:
        ValueError: unknown mix, naming the valid ones.
    """
    key = mix.upper()
    if key in MIX_DEFAULT_TYPE:
        default = MIX_DEFAULT_TYPE[key]
        ftype = key
    elif key in GGML_TYPES:
        default, ftype, pure = key, key, True
    else:
        raise ValueError(f"unknown GGUF type {mix!r}; valid mixes: {sorted(MIX_DEFAULT_TYPE)}; "
                         f"valid block types: {sorted(GGML_TYPES)}")
    items = sorted(((n, tuple(s)) for n, s in tensors), key=lambda t: _order_key(t[0]))
    names = [n for n, _ in items]
    tied = "output.weight" not in names
    n_gqa = n_head // max(n_head_kv, 1)
    quantized = GGML_TYPES[default].block_size > 1
    i_attn_v = i_ffn_down = 0
    n_attn_v = sum(1 for n in names if "attn_v.weight" in n or "attn_qkv.weight" in n)
    out: dict[str, str] = {}
    for name, shape in items:
        if not _allows_quantization(name, shape):
            out[name] = unquantized_type
            continue
        t = default
        ncols = shape[-1]
        if quantized and not pure:
            t, i_attn_v, i_ffn_down = _mix_rule(name, t, ftype, ncols, tied, n_gqa, n_layer, n_attn_v, i_attn_v,
                                                i_ffn_down, has_imatrix)
        elif quantized and pure:
            i_attn_v += "attn_v.weight" in name
            i_ffn_down += "ffn_down" in name
        out[name] = _fallback(t, ncols) if quantized else t
    return out


def _mix_rule(name: str, t: str, ftype: str, ncols: int, tied: bool, n_gqa: int, n_layer: int, n_attn_v: int,
              i_attn_v: int, i_ffn_down: int, has_imatrix: bool) -> tuple[str, int, int]:
    """``llama_tensor_get_type_impl`` for dense LLaMA-like models (categories by name, as upstream)."""
    is_output = name == "output.weight"
    is_embd = name == "token_embd.weight"
    if is_output or (tied and is_embd):
        if ncols % GGML_TYPES[t].block_size != 0:
            t = "Q8_0"
        elif t != "Q8_0":
            t = "Q6_K"
        return t, i_attn_v, i_ffn_down
    if is_embd:
        if ftype in ("TQ1_0", "TQ2_0"):
            t = "Q4_K"
        return t, i_attn_v, i_ffn_down
    if "attn_v.weight" in name:
        if ftype == "Q2_K":
            t = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if i_attn_v < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            t = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_attn_v, n_attn_v):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and i_attn_v < 4:
            t = "Q5_K"
        return t, i_attn_v + 1, i_ffn_down
    if "ffn_down" in name:
        i, n = i_ffn_down, n_layer
        if ftype == "Q2_K":
            t = "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype == "Q4_K_M":
            if use_more_bits(i, n):
                t = "Q6_K"
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
            t = "Q5_K"
        elif ftype == "Q5_K_M" and use_more_bits(i, n):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and i < n // 8:
            t = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            t = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        return t, i_attn_v, i_ffn_down + 1
    if "attn_output.weight" in name:
        t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, t)
    return t, i_attn_v, i_ffn_down


def mix_summary(types: Mapping[str, str]) -> dict[str, int]:
    """How many tensors got each type (for logs and tests)."""
    out: dict[str, int] = {}
    for t in types.values():
        out[t] = out.get(t, 0) + 1
    return dict(sorted(out.items()))
