"""Export to compressed-tensors, the checkpoint format vLLM and transformers read.

A lowbit model becomes a ``save_pretrained``-style directory: ``config.json`` with a ``quantization_config``
(``quant_method: compressed-tensors``), the tokenizer, and ``model.safetensors`` whose quantized layers hold
compressed-tensors' tensor names. The mapping from lowbit formats (what the bits mean) to compressed-tensors
schemes is data in :func:`scheme_for`:

================================  ===================  ===============================================
lowbit format                     compressed-tensors   tensors per layer
================================  ===================  ===============================================
IntAffine (2-8 bit, integer zero)  ``pack-quantized``   ``weight_packed`` int32, ``weight_scale``,
  sym/asym, group or channel,                           ``weight_zero_point`` (asym; int32-packed along
  act-order with contiguous groups                      rows), ``weight_shape`` (no g_idx: CT >= 0.20
  (GPTQ static_groups)                                  dropped actorder="group")
Int8Rowwise (W8A16, W8A8 int8)     ``int-quantized``    ``weight`` int8, ``weight_scale`` (out, 1)
FP8 e4m3 (weight-only, W8A8)       ``float-quantized``  ``weight`` float8_e4m3fn, ``weight_scale``
Minifloat E4M3fn (methods/fp8)     ``float-quantized``  ``weight`` float8_e4m3fn, ``weight_scale``
================================  ===================  ===============================================

Codes map exactly: lowbit stores unsigned codes ``u`` with ``W = (u - z)·s`` (implicit ``z = 2^(b-1)``
when symmetric); compressed-tensors stores signed ``q = u - 2^(b-1)`` with zero point ``z - 2^(b-1)``, and
``(q - zp)·s`` is the same number. Scales are written in the model's dtype (a widening cast, exact).
compressed-tensors cannot store a shorter last group, HQQ's float zero points, or outliers: those raise a
``ValueError`` naming what it can store.

Loading in transformers (checked with transformers 5.24.0 + compressed-tensors 0.20.0): symmetric schemes load
with plain ``from_pretrained``. Asymmetric ``pack-quantized`` ones (packed zero points) fail on the default
compressed load with a size mismatch on every ``weight_zero_point`` (llm-compressor issue #1618: the skeleton
expects unpacked zero points); ``from_pretrained(..., quantization_config=CompressedTensorsConfig(
run_compressed=False))`` decompresses them on load and gives lowbit's logits exactly.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lowbit.formats.base import Format, QuantizedTensor
from lowbit.io.atomic import atomic_dir
from lowbit.nn.linear import QuantLinear

__all__ = ["export_compressed_tensors", "scheme_for", "layer_tensors", "pack_int32"]

log = logging.getLogger(__name__)

SUPPORTED = ("int_affine (integer zero point, groups dividing the row)", "int8_rowwise", "fp8 (e4m3)",
             "minifloat (E4M3 fn, channel or tensor scales)")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes ``(rows, n)`` densely into int32 words, least significant bits first.

    Element ``i`` of a row occupies global bits ``[i·bits, (i+1)·bits)`` of the row's little-endian word
    stream (compressed-tensors' ``pack-quantized`` layout); rows are padded to whole words.
    """
    rows, n = codes.shape
    n_words = -(-n * bits // 32)
    c = codes.to(torch.int64)
    bitpos = torch.arange(n, dtype=torch.int64) * bits
    words = torch.zeros(rows, n_words + 1, dtype=torch.int64)
    lo_word, lo_off = bitpos // 32, bitpos % 32
    words.scatter_add_(1, lo_word.expand(rows, n), (c << lo_off) & 0xFFFFFFFF)
    spill = lo_off + bits - 32
    m = spill > 0
    if bool(m.any()):
        words.scatter_add_(1, (lo_word[m] + 1).expand(rows, int(m.sum())), c[:, m] >> (bits - spill[m]))
    words = words[:, :n_words]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _codes(q: QuantizedTensor) -> torch.Tensor:
    from lowbit.formats.bitpack import unpack

    return unpack(q["qdata"], q.format.bits, q.shape[1])  # type: ignore[attr-defined]


def scheme_for(fmt: Format, shape: tuple[int, int]) -> dict[str, Any]:
    """The compressed-tensors scheme (weights, input_activations, format) that stores ``fmt`` exactly."""
    kind = fmt.kind
    if kind == "int_affine":
        if fmt.float_zero_point:  # type: ignore[attr-defined]
            raise ValueError("compressed-tensors stores integer zero points only; this IntAffine has float zero "
                             f"points (HQQ/QA-LoRA). Exportable formats: {SUPPORTED}")
        if fmt.per_tensor:  # type: ignore[attr-defined]
            strategy, group = "tensor", None
        elif fmt.group_size is None or fmt.group_size >= shape[1] and not fmt.act_order:  # type: ignore[attr-defined]
            strategy, group = "channel", None
        else:
            strategy, group = "group", int(fmt.group_size)  # type: ignore[attr-defined]
            if shape[1] % group:
                divisors = [g for g in (32, 64, 128, 256) if shape[1] % g == 0]
                raise ValueError(f"compressed-tensors forbids a shorter last group: group_size {group} does not "
                                 f"divide in_features {shape[1]}; group sizes that do: {divisors} (or per-channel)")
        weights = {"num_bits": int(fmt.bits), "type": "int", "symmetric": bool(fmt.symmetric),  # type: ignore[attr-defined]
                   "strategy": strategy, "group_size": group, "dynamic": False,
                   "actorder": "weight" if fmt.act_order else None, "observer": "minmax"}  # type: ignore[attr-defined]
        return {"weights": weights, "input_activations": None, "format": "pack-quantized"}
    if kind == "int8_rowwise":
        if getattr(fmt, "threshold", 0):
            raise ValueError("LLM.int8()'s outlier decomposition has no compressed-tensors equivalent; export "
                             f"threshold=0 (plain W8A8) instead. Exportable formats: {SUPPORTED}")
        strategy = "channel" if fmt.granularity == "channel" else "tensor"  # type: ignore[attr-defined]
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "group_size": None,
                   "dynamic": False, "observer": "minmax"}
        return {"weights": weights, "input_activations": _act_args(fmt, "int"), "format": "int-quantized"}
    if kind == "fp8":
        if fmt.dtype != "e4m3":  # type: ignore[attr-defined]
            raise ValueError(f"compressed-tensors stores FP8 as e4m3 only, got {fmt.dtype}")  # type: ignore[attr-defined]
        strategy = "channel" if fmt.per_channel else "tensor"  # type: ignore[attr-defined]
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "group_size": None,
                   "dynamic": False, "observer": "minmax"}
        return {"weights": weights, "input_activations": _act_args(fmt, "float"), "format": "float-quantized"}
    if kind == "minifloat":  # methods/fp8 (FP8Config): codes are float8_e4m3fn bit patterns
        if (fmt.torch_float8() is not torch.float8_e4m3fn or fmt.granularity not in ("channel", "tensor")  # type: ignore[attr-defined]
                or fmt.lorc_rank):  # type: ignore[attr-defined]
            raise ValueError("compressed-tensors stores minifloat weights only as E4M3 (fn) with per-channel or "
                             f"per-tensor scales and no LoRC; got {fmt}. Exportable formats: {SUPPORTED}")
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": fmt.granularity,  # type: ignore[attr-defined]
                   "group_size": None, "dynamic": False, "observer": "minmax"}
        return {"weights": weights, "input_activations": _act_args(fmt, "float"), "format": "float-quantized"}
    raise ValueError(f"format {kind!r} has no compressed-tensors equivalent; exportable formats: {SUPPORTED}")


def _act_args(fmt: Format, typ: str) -> dict[str, Any] | None:
    act = getattr(fmt, "act", None)
    if act is None:
        return None
    gran = getattr(act, "granularity", "token")
    static = getattr(act, "static", False)
    if static:
        raise ValueError("static activation scales are not exported yet; use dynamic (per-token or per-tensor)")
    return {"num_bits": 8, "type": typ, "symmetric": True, "strategy": "token" if gran == "token" else "tensor",
            "dynamic": True, "observer": None}


def layer_tensors(q: QuantizedTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """compressed-tensors' tensors (local names) for one quantized weight."""
    fmt = q.format
    out, n = q.shape
    if fmt.kind == "int_affine":
        bits = int(fmt.bits)  # type: ignore[attr-defined]
        half = 1 << (bits - 1)
        t = {"weight_packed": pack_int32(_codes(q), bits), "weight_shape": torch.tensor([out, n], dtype=torch.int64),
             "weight_scale": q["scale"].to(dtype).reshape(q["scale"].shape[0], -1)}
        if not fmt.symmetric:  # type: ignore[attr-defined]
            z = q["zero_point"].to(torch.int64).reshape(t["weight_scale"].shape)
            if fmt.per_tensor:  # type: ignore[attr-defined]  # stored unpacked, signed
                t["weight_zero_point"] = (z - half).to(torch.int8)
            else:  # group/channel zero points are packed along rows (dim 0)
                t["weight_zero_point"] = pack_int32(z.T.contiguous(), bits).T.contiguous()
        if fmt.act_order:  # type: ignore[attr-defined]
            # compressed-tensors >= 0.20 removed actorder="group" (a stored g_idx); "weight" act-order keeps the
            # groups contiguous, which lowbit's g_idx must then be
            gs = fmt.group_size if fmt.group_size is not None and not fmt.per_tensor else n  # type: ignore[attr-defined]
            contiguous = torch.arange(n, device=q["g_idx"].device) // gs
            if not torch.equal(q["g_idx"].to(torch.int64).reshape(-1), contiguous):
                raise ValueError("this act-order weight has non-contiguous groups (g_idx); compressed-tensors >= 0.20 "
                                 "stores act-order only with contiguous groups (actorder='weight'): quantize with "
                                 "GPTQ static_groups=True, or without act_order")
        return t
    if fmt.kind == "int8_rowwise":
        return {"weight": q["qdata"].to(torch.int8), "weight_scale": q["scale"].to(dtype).reshape(-1, 1)}
    if fmt.kind == "fp8":
        return {"weight": q["qdata"], "weight_scale": q["scale"].to(dtype).reshape(-1, 1)}
    if fmt.kind == "minifloat":
        w = fmt.codes(q).to(torch.uint8).view(torch.float8_e4m3fn)  # type: ignore[attr-defined]
        return {"weight": w, "weight_scale": q["scale"].to(dtype).reshape(-1, 1)}
    raise ValueError(f"format {fmt.kind!r} has no compressed-tensors equivalent; exportable formats: {SUPPORTED}")


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike[str], *, tokenizer: Any = None,
                              overwrite: bool = False) -> Path:
    """Write ``model`` (with ``QuantLinear`` layers) as a compressed-tensors directory, atomically."""
    groups: dict[str, dict[str, Any]] = {}
    group_of: dict[str, str] = {}
    state: dict[str, torch.Tensor] = {}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    quantized: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        q = mod.qweight
        scheme = scheme_for(q.format, q.shape)
        key = json.dumps(scheme, sort_keys=True)
        group_of.setdefault(key, f"group_{len(group_of)}")
        g = groups.setdefault(group_of[key], {**scheme, "targets": []})
        g["targets"].append(name)
        for k, v in layer_tensors(q, dtype).items():
            state[f"{name}.{k}"] = v.contiguous()
        if mod.bias is not None:
            state[f"{name}.bias"] = mod.bias.detach().to(dtype).contiguous()
        quantized.append(name)
    if not quantized:
        raise ValueError("the model has no quantized (QuantLinear) layers to export; run lowbit.quantize_ first")
    if any(g["format"] == "pack-quantized" and not g["weights"]["symmetric"] for g in groups.values()):
        log.warning("asymmetric pack-quantized layers: transformers (5.24, compressed-tensors 0.20) loads them only "
                    "with quantization_config=CompressedTensorsConfig(run_compressed=False) (llm-compressor #1618)")
    prefixes = tuple(f"{n}." for n in quantized)
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        if k.startswith(prefixes):
            continue
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():  # tied weights (embedding / lm_head): store once, config says tied
            continue
        seen.add(ptr)
        state[k] = v.detach().contiguous()
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    qcfg = {"quant_method": "compressed-tensors", "format": _overall_format(groups),
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": None, "global_compression_ratio": None}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = model.config.to_dict()  # type: ignore[union-attr]
        cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(path)


def _overall_format(groups: dict[str, dict[str, Any]]) -> str:
    fmts = {g["format"] for g in groups.values()}
    return fmts.pop() if len(fmts) == 1 else "mixed-precision"
