"""CPU fast paths of ``lowbit::qlinear``: ATen's packed-weight matmuls, ``torch._int_mm``, and small hand-written
x86 kernels (AVX-512, with AVX2 variants) where ATen has nothing that fits or is slower.

- W8A8 (``Int8Rowwise`` with int8 activations: SmoothQuant O1/O2/O3, LLM.int8() with its outlier columns) ->
  ``torch._int_mm`` (int8 × int8 → int32) on the CPU, for every number of rows (the reference's
  :func:`~lowbit.formats.act_quant.int8_matmul` takes it only for ``M > 16``, CUDA's limit, and otherwise an exact
  float64 matmul). Same activation quantizer, same integer products, same float epilogue in the same order as
  the reference: this path is **exact** (bit-identical outputs; tested).
- weight-only int8 (``Int8Rowwise`` without ``act``, W8A16) and 4-bit affine with group sizes that are multiples
  of 128 (``IntAffine`` bits=4, any zero point, act-order) -> the VNNI kernels of :mod:`lowbit.ops.cpu_vnni`:
  float inputs split into int8 limbs (3 for float32 inputs: error ≤ 6.1e-8·max|x|, float32's level; 2 for
  bf16/fp16: ≤ 1.6e-5·max|x|), integer dot products, float epilogue. Not bit-identical to the reference; tested
  against float64.
- 4-bit codebooks (NF4/FP4 ``Codebook``, double quantization or not), and 4-bit affine groups the VNNI kernel does
  not take with float32 inputs -> the lookup-table kernels of :mod:`lowbit.ops.cpu_lut4`: the AVX-512 span-64
  kernel for group sizes that are multiples of 64 (float32 math; for bf16 inputs on codebooks the weights are
  ``bf16(code·absmax)`` exactly as the reference dequantizes them for bf16 inputs, exact products, float32
  accumulation), else the span-32 kernel (groups of 32·k, and AVX2 machines; float32 math).
- otherwise 4-bit affine -> ``aten._weight_int4pack_mm_for_cpu``, which computes ``x · ((q − 8)·s + z')ᵀ`` per
  group; lowbit's ``(q − zero_point)·scale`` maps exactly to it with ``z' = (8 − zero_point)·scale`` (group sizes
  32, 64, 128, 256; K padded to a whole group); weight-only int8 -> ``aten._weight_int8pack_mm``.

The hand-written kernels (compiled on first use by :mod:`lowbit.ops.cpu_native`) are absent without a C compiler
or the instructions; the ATen paths or the reference take over. They serve up to 256 input rows (decoding, short prompts); more
rows (prefill) go, through the op, to ATen's kernel in the input's dtype for bf16/fp16 inputs (built on first
use, a second copy of the weight) and to the reference (dequantize + matmul) otherwise. ATen's int4/int8 kernels are fast in bf16/fp16 only (13-32× slower in
float32, a scalar loop): float32 inputs are cast to bf16 for them (``float32_compute``, :func:`compute_dtype`), and
outputs then differ from the float32 reference by bf16 rounding (relative error ≈ 2e-3 per layer on random data,
bounded by the tests at 1e-2).

Nothing here changes the default op dispatch: :func:`pack` returns ``None`` for formats it does not cover,
and :func:`enable_qlinear_fast_path` (opt-in) registers it as the CPU kernel of ``lowbit::qlinear``. The
reference path stays the oracle; tests compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from lowbit.formats.act_quant import has_int_mm
from lowbit.formats.base import format_from_spec
from lowbit.formats.int8_rowwise import w8a8_matmul
from lowbit.ops import cpu_lut4, cpu_vnni
from lowbit.ops.repack import PackedWeight, repack_quantized, unpack_planes

__all__ = ["CpuInt4Weight", "CpuInt8Weight", "CpuW8A8Weight", "pack_int4", "int4_linear", "pack_int8", "int8_linear",
           "pack_w8a8", "w8a8_linear", "compute_dtype", "cached_entry", "FLOAT32_COMPUTE", "pack", "linear", "enable_qlinear_fast_path",
           "disable_qlinear_fast_path", "enabled", "qlinear"]

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


@dataclass(frozen=True, eq=False)
class CpuW8A8Weight:
    """int8 weights with int8 activations: ``qdata (N, K) int8``, ``scale (N,)`` or ``(1,)`` float32, and how
    inputs are quantized (``act``, the static ``act_scale`` if any, LLM.int8()'s ``threshold``)."""

    qdata: torch.Tensor
    scale: torch.Tensor
    act: object
    act_scale: torch.Tensor | None
    threshold: float


@lru_cache(maxsize=1)
def has_cpu_int_mm() -> bool:
    """Whether this torch build runs ``torch._int_mm`` on the CPU (checked once per process)."""
    return has_int_mm("cpu")


def pack_w8a8(q) -> CpuW8A8Weight:  # type: ignore[no-untyped-def]
    """The W8A8 layout of an ``Int8Rowwise`` tensor with int8 activations (no copy: it keeps ``qdata``).

    Raises:
        ValueError: another format, or no ``torch._int_mm`` on the CPU in this torch build.
    """
    fmt = q.format
    if fmt.kind != "int8_rowwise" or fmt.act is None or fmt.act.dtype != "int8":
        raise ValueError(f"the W8A8 path takes int8_rowwise weights with int8 activations, got {fmt.spec()}")
    if not has_cpu_int_mm():
        raise ValueError(f"torch {torch.__version__} has no torch._int_mm on the CPU")
    return CpuW8A8Weight(q["qdata"], q["scale"].reshape(-1).to(torch.float32), fmt.act, q.get("act_scale"),
                         float(fmt.threshold))


def w8a8_linear(x: torch.Tensor, w: CpuW8A8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``Int8Rowwise.linear`` on the packed W8A8 weight: the same function
    (:func:`lowbit.formats.int8_rowwise.w8a8_matmul`), whose int8 GEMM runs on ``torch._int_mm`` on the CPU for any
    number of rows (bit-identical to the reference, which it is)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = w8a8_matmul(x2, w.qdata, w.scale, w.act, w.act_scale, w.threshold)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.qdata.shape[0])


FLOAT32_COMPUTE = ("auto", "bfloat16", "float32")
CpuWeight = CpuInt4Weight | CpuInt8Weight | CpuW8A8Weight | cpu_lut4.Lut4Weight | cpu_vnni.W8Weight


def compute_dtype(x_dtype: torch.dtype, float32_compute: str = "auto", fmt=None) -> torch.dtype:  # type: ignore[no-untyped-def]
    """The dtype the weight-only kernels run in for inputs of ``x_dtype`` and weights of format ``fmt``.

    bf16/fp16 inputs: their own dtype. float32 inputs: ``"float32"`` keeps float32; ``"bfloat16"`` casts;
    ``"auto"`` keeps float32 where a fast float32 kernel exists (4-bit affine on the VNNI or the AVX-512 lut4
    kernel) and casts to bf16 otherwise (ATen's packed kernels are 13-32× slower in float32).
    """
    if float32_compute not in FLOAT32_COMPUTE:
        raise ValueError(f"float32_compute={float32_compute!r} unknown; valid choices: {list(FLOAT32_COMPUTE)}")
    if x_dtype in (torch.bfloat16, torch.float16):
        return x_dtype
    if float32_compute == "auto":  # float32 where a hand-written kernel is faster than ATen's in bf16
        own = fmt is not None and fmt.kind == "int_affine" and fmt.bits == 4 and (cpu_lut4.isa() == "avx512"
                                                                                  or cpu_vnni.available())
        # 4-bit codebooks: float32 inputs stay float32 on the lut4 kernels
        own = own or (fmt is not None and fmt.kind == "codebook" and fmt.bits == 4)
        return torch.float32 if own else torch.bfloat16
    return torch.bfloat16 if float32_compute == "bfloat16" else torch.float32


def pack(q, dtype: torch.dtype = torch.bfloat16) -> CpuWeight | None:  # type: ignore[no-untyped-def]
    """CPU fast layout of a :class:`~lowbit.formats.base.QuantizedTensor`, or ``None`` if none applies.

    The hand-written kernels come first where they build and take the layout: 4-bit affine with group sizes
    that are multiples of 128 -> :func:`lowbit.ops.cpu_vnni.int4_linear` (int8 limbs of the inputs); other 4-bit
    affine groups -> the lut4 kernels (span 64 where the groups are multiples of 64 and it builds here, else span
    32) if ``dtype`` is float32, else ATen's int4 kernel in ``dtype``; NF4/FP4 -> the same lut4 kernels for every
    ``dtype`` (the span-64 kernel picks bf16 weights for bf16 inputs at call time); weight-only int8 -> the VNNI int8 kernel, else ATen's int8 kernel
    in ``dtype``; W8A8 -> ``torch._int_mm`` (int32 / float32). ``dtype`` is the compute dtype of the ATen kernels.
    """
    fmt = q.format
    if fmt.kind == "int8_rowwise":
        act = getattr(fmt, "act", None)
        if act is None:
            if cpu_vnni.available():
                return cpu_vnni.pack_w8(q["qdata"], q["scale"])
            return pack_int8(q["qdata"], q["scale"], dtype)
        return pack_w8a8(q) if act.dtype == "int8" and has_cpu_int_mm() else None
    if fmt.kind == "int_affine" and fmt.bits == 4:
        packers = []
        if cpu_vnni.available():
            packers.append(cpu_vnni.pack_int4)  # group sizes that are multiples of 128 (or one group per row)
        if dtype == torch.float32 and cpu_lut4.span64_available():
            packers.append(lambda q: cpu_lut4.pack_affine4(q, span=64))  # groups that are multiples of 64
        if dtype == torch.float32 and cpu_lut4.available():
            packers.append(cpu_lut4.pack_affine4)
        packers.append(lambda q: _aten_pack(q, dtype))
        return _first_fit(packers, q)
    if fmt.kind == "codebook" and fmt.bits == 4:
        packers = []
        if cpu_lut4.span64_available():
            packers.append(lambda q: cpu_lut4.pack_codebook(q, span=64))  # groups that are multiples of 64
        if cpu_lut4.available():
            packers.append(cpu_lut4.pack_codebook)
        return _first_fit(packers, q)
    return None


def _aten_pack(q, dtype: torch.dtype) -> CpuInt4Weight | CpuInt8Weight:  # type: ignore[no-untyped-def]
    """ATen's layout of a 4-bit affine or weight-only int8 tensor (for inputs the hand-written kernels do not take).

    Raises:
        ValueError: another format, or a group size ATen does not take.
    """
    fmt = q.format
    if fmt.kind == "int8_rowwise" and fmt.act is None:
        return pack_int8(q["qdata"], q["scale"], dtype)
    if fmt.kind == "int_affine" and fmt.bits == 4:
        return pack_int4(repack_quantized(q), dtype)
    raise ValueError(f"no ATen kernel for {fmt.spec()}")


def _first_fit(packers, q):  # type: ignore[no-untyped-def]
    """The first packer that takes ``q`` (a ``ValueError`` means: not this layout), or None."""
    for packer in packers:
        try:
            return packer(q)
        except ValueError:
            continue
    return None


def linear(x: torch.Tensor, w: CpuWeight, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``x @ Wᵀ + b`` through the fast path of ``w`` (from :func:`pack`); output in ``x``'s dtype.

    ``None`` when that path does not take this input: more than ``MAX_ROWS`` (256) rows on the lut4 or VNNI
    kernels (they re-read the weight per 2-4 rows; time grows linearly with the rows).
    """
    if isinstance(w, CpuInt4Weight):
        return int4_linear(x, w, bias)
    if isinstance(w, CpuW8A8Weight):
        return w8a8_linear(x, w, bias)
    if isinstance(w, cpu_lut4.Lut4Weight):
        if x.numel() > cpu_lut4.MAX_ROWS * x.shape[-1]:
            return None
        return cpu_vnni.int4_linear(x, w, bias) if w.span == 128 else cpu_lut4.lut4_linear(x, w, bias)
    if isinstance(w, cpu_vnni.W8Weight):
        if x.numel() > cpu_vnni.MAX_ROWS * x.shape[-1]:
            return None
        return cpu_vnni.w8_linear(x, w, bias)
    return int8_linear(x, w, bias)


_ENABLED: str | None = None
_REGISTERED = False
_ATTR = "_lowbit_cpu_packed"  # the packed weights live on the stored qdata tensor (per input dtype), and die with it


def enable_qlinear_fast_path(float32_compute: str = "auto") -> None:
    """Opt in: make the CPU kernel of ``lowbit::qlinear`` use the fast paths where they apply.

    Args:
        float32_compute: the dtype ATen's weight-only kernels run float32 inputs in, where no hand-written kernel
            takes the weight: ``"auto"`` (float32 for 4-bit affine when a hand-written kernel exists here, so the
            lut4 kernel takes the groups the VNNI one does not; bf16 otherwise), ``"bfloat16"`` (bf16 rounding
            error) or ``"float32"`` (ATen's float32 loops are 13-32× slower). See :func:`compute_dtype`. The
            hand-written kernels and the exact W8A8 path are used whatever this says.

    The packed weight is built once per stored ``qdata`` tensor (kept as an attribute of that tensor) and rebuilt
    if it changes. Calling again with another ``float32_compute`` switches it.
    """
    global _ENABLED, _REGISTERED
    compute_dtype(torch.float32, float32_compute)  # validate
    _ENABLED = float32_compute
    if _REGISTERED:
        return

    @torch.library.register_kernel("lowbit::qlinear", "cpu")
    def _qlinear_cpu(x, data, spec, shape, bias):  # type: ignore[no-untyped-def]
        return qlinear(x, data, spec, shape, bias)

    _REGISTERED = True


def enabled() -> bool:
    """Whether :func:`enable_qlinear_fast_path` is in force (and not undone by :func:`disable_qlinear_fast_path`)."""
    return _ENABLED is not None


def qlinear(x: torch.Tensor, data: list[torch.Tensor], spec: str, shape: list[int],
            bias: torch.Tensor | None) -> torch.Tensor:
    """The CPU kernel of ``lowbit::qlinear`` (the op's arguments): the fast path where one applies, else the
    reference. ``QuantLinear`` calls it directly, without the op dispatcher, when no gradient is wanted (4-bit
    4096² at one row: 0.349 -> 0.307 ms, results/cpu.md runs 5 and 5b)."""
    from lowbit.ops import reference

    if _ENABLED is None:  # disable_qlinear_fast_path()
        return reference.qlinear(x, data, spec, shape, bias)
    dt = compute_dtype(x.dtype, _ENABLED, format_from_spec(spec))
    stamp = (spec, dt, tuple(t.data_ptr() for t in data), tuple(t._version for t in data))
    entries = getattr(data[0], _ATTR, None)
    if entries is None:
        entries = {}
        setattr(data[0], _ATTR, entries)
    hit = entries.get(x.dtype)
    if hit is None or hit[0] != stamp:
        # one entry per input dtype, so a layer called with float32 and bf16 inputs in turn keeps both; entries of
        # weights that changed since (another stamp) are dropped
        for d in [d for d, e in entries.items() if e[0][0] != spec or e[0][2:] != stamp[2:]]:
            del entries[d]
        hit = [stamp, pack(reference.as_quantized(data, spec, shape, x.dtype), dt), None]
        entries[x.dtype] = hit
    y = None if hit[1] is None else linear(x, hit[1], bias)
    if y is None and isinstance(hit[1], (cpu_lut4.Lut4Weight, cpu_vnni.W8Weight)) \
            and x.dtype in (torch.bfloat16, torch.float16):
        # more rows than the hand-written kernels take: ATen's kernel in the input's dtype, built on first use
        if hit[2] is None:
            q = reference.as_quantized(data, spec, shape, x.dtype)
            hit[2] = _first_fit([lambda q: _aten_pack(q, x.dtype)], q) or False
        if hit[2]:
            y = linear(x, hit[2], bias)
    return reference.qlinear(x, data, spec, shape, bias) if y is None else y


def cached_entry(qdata: torch.Tensor, x_dtype: torch.dtype) -> list | None:
    """What :func:`qlinear` keeps for the weight stored in ``qdata`` and inputs of ``x_dtype``:
    ``[stamp, packed weight or None, ATen fallback (None: not built; False: none)]``, or ``None`` before a call."""
    return (getattr(qdata, _ATTR, None) or {}).get(x_dtype)


def disable_qlinear_fast_path() -> None:
    """Undo :func:`enable_qlinear_fast_path`: the CPU kernel of ``lowbit::qlinear`` is the reference again."""
    global _ENABLED
    _ENABLED = None
