"""Emulation of llama.cpp's CPU matmul numerics for a PyTorch model loaded from a GGUF file.

llama.cpp does not multiply dequantized weights with float activations: its CPU backend first converts each
matmul input to the weight type's ``vec_dot_type`` and multiplies blocks in integers. A dequantize-then-matmul
evaluation therefore differs from llama.cpp by that activation rounding; on a model with outlier activations
(the default model's down-projection inputs reach ~2800) those differences change a few percent of the argmax
tokens. ``emulate_llamacpp_cpu`` registers forward pre-hooks that round every quantized matmul input exactly as the
x86 AVX2 build of ggml does (``ggml-cpu/arch/x86/quants.c`` and ``repack.cpp``):

- Q8_0 (for Q4_0, Q5_0, Q8_0, IQ4_NL) and Q8_1 (for Q4_1, Q5_1): 32-blocks, ``amax = max|x|``,
  ``q = round_half_even(x * (127 / amax))`` in float32, scale stored as ``fp16(amax / 127)``. For Q8_1 the block
  sum ``s = fp16((amax / 127) * sum(q))`` replaces ``scale * sum(q)`` in the weight-minimum term; the hook adds that
  difference so the result is exact.
- Q8_K (for the K-quants, IQ4_XS, TQ1_0, TQ2_0): 256-blocks, ``q = round_half_even(x * (127 / amax))``, scale
  ``1 / (127 / amax)`` in float32 (the sign convention of ``quantize_row_q8_K_ref`` does not change ``q * scale``).
- F16 / BF16 weights: the input is rounded to that type.

Rows whose width is not a multiple of the block are left alone (ggml would refuse such a file). What this does not
emulate: float summation order inside ggml's kernels, and attention numerics (an f16 KV cache and flash attention
round K, V, Q and the softmax to fp16; compare with llama.cpp run with an f32 KV cache and flash attention off).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: vec_dot_type of each GGML weight type on ggml's CPU backend (``type_traits_cpu`` in ggml-cpu.c).
VEC_DOT_TYPE: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0",
    "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "IQ4_XS": "Q8_K",
    "TQ1_0": "Q8_K", "TQ2_0": "Q8_K",
}
_BLOCK = {"Q8_0": 32, "Q8_1": 32, "Q8_K": 256}


def _blocks(x: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 blocks of ``bs``, their integer codes (round half to even of ``x * 127/amax``) and ``amax``."""
    v = x.reshape(-1, bs).to(torch.float32)
    amax = v.abs().amax(1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return v, torch.round(v * inv), amax


def quantize_activations(x: torch.Tensor, vec_dot_type: str) -> torch.Tensor:
    """``x`` as ggml's CPU backend rounds a matmul input for ``vec_dot_type`` (Q8_0, Q8_1, Q8_K, F16, BF16, F32),
    returned dequantized in ``x``'s dtype."""
    if vec_dot_type == "F32":
        return x
    if vec_dot_type in ("F16", "BF16"):
        return x.to(torch.float16 if vec_dot_type == "F16" else torch.bfloat16).to(x.dtype)
    if vec_dot_type not in _BLOCK:
        raise ValueError(f"unknown vec_dot_type {vec_dot_type!r}; valid: F32, F16, BF16, {', '.join(_BLOCK)}")
    _, q, amax = _blocks(x, _BLOCK[vec_dot_type])
    if vec_dot_type == "Q8_K":
        inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
        scale = torch.where(amax > 0, 1 / inv, torch.zeros_like(inv))
    else:
        scale = (amax / 127).to(torch.float16).to(torch.float32)
    return (q * scale).reshape(x.shape).to(x.dtype)


def _q8_1_sum_correction(x: torch.Tensor) -> torch.Tensor:
    """Per 32-block ``fp16(d * sum(q)) - fp16(d) * sum(q)``: what Q8_1's stored block sum adds to the exact sum."""
    _, q, amax = _blocks(x, 32)
    d = amax / 127
    s = q.sum(1, keepdim=True)
    return ((d * s).to(torch.float16).to(torch.float32) - d.to(torch.float16).to(torch.float32) * s)[:, 0]


def _weight_mins(raw: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """The per-block minimum ``m`` (the fp16 at bytes 2-3 of each Q4_1/Q5_1 block), shape (rows, cols/32)."""
    b = np.ascontiguousarray(raw).reshape(rows, cols // 32, -1)
    return torch.from_numpy(b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))


class _Rounding:
    """Pre-hook rounding a Linear's input for ``vec_dot_type``; for Q8_1 a forward hook then adds the block-sum
    term (needs the unrounded input, kept from the pre-hook)."""

    def __init__(self, vdt: str, mins: torch.Tensor | None = None) -> None:
        self.vdt, self.mins, self.x = vdt, mins, None

    def pre(self, mod: torch.nn.Module, args: tuple) -> tuple:
        if self.mins is not None:
            self.x = args[0]
        return (quantize_activations(args[0], self.vdt), *args[1:])

    def post(self, mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x, self.x = self.x, None
        corr = _q8_1_sum_correction(x).reshape(*x.shape[:-1], -1)
        return out + (corr @ self.mins.T).to(out.dtype)


def emulate_llamacpp_cpu(model: torch.nn.Module, gguf_path: str | os.PathLike[str]) -> list[Any]:
    """Register hooks on ``model`` (loaded from ``gguf_path`` by ``load_gguf_model``) so that each ``nn.Linear``
    rounds its input as llama.cpp's x86 CPU backend does for that weight's GGML type. Returns the hook handles
    (``h.remove()`` undoes it)."""
    from lowbit.io.gguf_export import hf_to_gguf_name
    from lowbit.io.gguf_model import unpermute_qk
    from lowbit.io.gguf_reader import read_gguf

    cfg = getattr(model, "config", None)
    g = read_gguf(gguf_path)
    try:
        types = {n: t.ggml_type.name for n, t in g.tensors.items()}
        handles: list[Any] = []
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            gname = hf_to_gguf_name(name)
            tname = f"{gname}.weight" if gname else None
            if name == "lm_head" and tname not in types:
                tname = "output.weight" if "output.weight" in types else "token_embd.weight"
            t = types.get(tname) if tname else None
            if t is None:
                log.warning("no GGUF tensor for %s: its input is not rounded", name)
                continue
            vdt = VEC_DOT_TYPE.get(t)
            if vdt is None:
                raise ValueError(f"{tname}: no llama.cpp CPU vec_dot_type known for {t}; known: {sorted(VEC_DOT_TYPE)}")
            if vdt in _BLOCK and mod.in_features % _BLOCK[vdt]:
                log.warning("%s: %d columns are not a multiple of %s's block; input not rounded", name,
                            mod.in_features, vdt)
                continue
            mins = None
            if vdt == "Q8_1":
                mins = _weight_mins(g.raw(tname), mod.out_features, mod.in_features)
                if tname.endswith((".attn_q.weight", ".attn_k.weight")):
                    heads = cfg.num_attention_heads if ".attn_q." in tname else cfg.num_key_value_heads
                    mins = unpermute_qk(mins, heads)
            r = _Rounding(vdt, mins)
            handles.append(mod.register_forward_pre_hook(r.pre))
            if mins is not None:
                handles.append(mod.register_forward_hook(r.post))
        return handles
    finally:
        g.close()
