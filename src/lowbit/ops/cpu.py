"""CPU fast paths through ATen's packed-weight matmuls (no hand-written kernels).

- 4-bit affine weights (``IntAffine`` bits=4, any zero point, act-order) -> ``aten._weight_int4pack_mm_for_cpu``,
  which computes ``x · ((q − 8)·s + z')ᵀ`` per group; lowbit's ``(q − zero_point)·scale`` maps exactly to it with
  ``z' = (8 − zero_point)·scale``. Group sizes 32, 64, 128, 256; K is padded to a whole group (zero inputs).
- 8-bit weights (``Int8Rowwise`` without activation quantization, i.e. W8A16) -> ``aten._weight_int8pack_mm``.

Nothing here changes the default op dispatch: :func:`linear` returns ``None`` for formats it does not cover,
and :func:`enable_qlinear_fast_path` (opt-in) registers it as the CPU kernel of ``lowbit::qlinear``. The
reference path stays the oracle; tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.ops.repack import PackedWeight, repack_quantized, unpack_planes

__all__ = ["CpuInt4Weight", "CpuInt8Weight", "pack_int4", "int4_linear", "pack_int8", "int8_linear", "pack", "linear",
           "enable_qlinear_fast_path"]

INT4_GROUPS = (32, 64, 128, 256)


@dataclass(frozen=True, eq=False)
class CpuInt4Weight:
    """ATen int4 layout: ``packed (N, Kp/2) uint8``, ``scale_zero (Kp/g, N, 2)`` in the compute dtype."""

    packed: torch.Tensor
    scale_zero: torch.Tensor
    group_size: int
    in_features: int
    padded_in: int
    perm: torch.Tensor | None
    out_features: int


@dataclass(frozen=True, eq=False)
class CpuInt8Weight:
    """``qdata (N, K) int8`` and per-row ``scale (N,)`` in the compute dtype."""

    qdata: torch.Tensor
    scale: torch.Tensor


def pack_int4(pw: PackedWeight, dtype: torch.dtype = torch.bfloat16) -> CpuInt4Weight:
    """Repack a 4-bit affine :class:`PackedWeight` for ``aten._weight_int4pack_mm_for_cpu``.

    Raises:
        ValueError: not affine 4-bit, or a group size ATen does not take.
    """
    if pw.mode != "affine" or pw.bits != 4:
        raise ValueError(f"the ATen int4 path takes affine 4-bit weights, got mode={pw.mode!r} bits={pw.bits}")
    K = pw.in_features
    g = pw.group_size
    if g >= K:  # per channel: one group, rounded up to a size ATen takes
        g = next((c for c in INT4_GROUPS if c >= K), 256)
    if g not in INT4_GROUPS:
        raise ValueError(f"group_size={pw.group_size} is not one of ATen's int4 group sizes {INT4_GROUPS}")
    assert pw.scale is not None and pw.zero_point is not None
    codes = unpack_planes(pw.q4, pw.q2, pw.q1, 4, K)  # (N, K), kernel (permuted) column order
    Kp = -(-K // g) * g
    N = codes.shape[0]
    Np = -(-N // 16) * 16  # ATen packs 16 output rows at a time; padded rows are sliced off the result
    codes = torch.nn.functional.pad(codes, (0, Kp - K, 0, Np - N), value=8).to(torch.int32).contiguous()
    s = pw.scale.float()
    z = pw.zero_point.float()
    G = Kp // g
    if s.shape[0] != G:  # per-channel scale stored as one group of the padded row
        s, z = s[:1].expand(G, -1), z[:1].expand(G, -1)
    scale_zero = torch.stack([s, (8.0 - z) * s], dim=-1)
    scale_zero = torch.nn.functional.pad(scale_zero, (0, 0, 0, Np - N)).to(dtype).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return CpuInt4Weight(packed, scale_zero, g, K, Kp, pw.perm, N)


def int4_linear(x: torch.Tensor, w: CpuInt4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., K) -> (..., N)`` through ATen's int4 CPU matmul (computes in ``w.scale_zero``'s dtype)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(w.scale_zero.dtype)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm.long())
    if w.padded_in != w.in_features:
        x2 = torch.nn.functional.pad(x2, (0, w.padded_in - w.in_features))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), w.packed, w.group_size, w.scale_zero)
    if y.shape[-1] != w.out_features:
        y = y[:, : w.out_features]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


def pack_int8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> CpuInt8Weight:
    """Per-row int8 weight ``W = qdata · scale[:, None]`` for ``aten._weight_int8pack_mm``."""
    if qdata.dtype != torch.int8 or qdata.dim() != 2:
        raise ValueError(f"qdata must be 2-D int8, got {qdata.dtype} with shape {tuple(qdata.shape)}")
    s = scale.reshape(-1)
    if s.numel() == 1:
        s = s.expand(qdata.shape[0])
    return CpuInt8Weight(qdata.contiguous(), s.to(dtype).contiguous())


def int8_linear(x: torch.Tensor, w: CpuInt8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(w.scale.dtype).contiguous()
    y = torch.ops.aten._weight_int8pack_mm(x2, w.qdata, w.scale)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


def pack(q, dtype: torch.dtype = torch.bfloat16) -> CpuInt4Weight | CpuInt8Weight | None:  # type: ignore[no-untyped-def]
    """CPU fast layout of a :class:`~lowbit.formats.base.QuantizedTensor`, or ``None`` if none applies."""
    fmt = q.format
    if fmt.kind == "int8_rowwise" and getattr(fmt, "act", None) is None:
        return pack_int8(q["qdata"], q["scale"], dtype)
    if fmt.kind == "int_affine" and fmt.bits == 4:
        try:
            return pack_int4(repack_quantized(q), dtype)
        except ValueError:
            return None
    return None


def linear(x: torch.Tensor, w: CpuInt4Weight | CpuInt8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return int4_linear(x, w, bias) if isinstance(w, CpuInt4Weight) else int8_linear(x, w, bias)


_ENABLED = False
_ATTR = "_lowbit_cpu_packed"  # the packed weight lives on the stored qdata tensor, and dies with it


def enable_qlinear_fast_path() -> None:
    """Opt in: make the CPU kernel of ``lowbit::qlinear`` use the ATen packed matmuls where they apply.

    The packed weight is built once per stored ``qdata`` tensor (kept as an attribute of that tensor) and rebuilt if it changes.
    """
    global _ENABLED
    if _ENABLED:
        return
    from lowbit.ops import reference

    @torch.library.register_kernel("lowbit::qlinear", "cpu")
    def _qlinear_cpu(x, data, spec, shape, bias):  # type: ignore[no-untyped-def]
        key = data[0]
        stamp = (spec, x.dtype, tuple(t.data_ptr() for t in data), tuple(t._version for t in data))
        hit = getattr(key, _ATTR, None)
        if hit is None or hit[0] != stamp:
            dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
            w = pack(reference.as_quantized(data, spec, shape, x.dtype), dt)
            hit = (stamp, w)
            setattr(key, _ATTR, hit)
        if hit[1] is None:
            return reference.qlinear(x, data, spec, shape, bias)
        return linear(x, hit[1], bias)

    _ENABLED = True
