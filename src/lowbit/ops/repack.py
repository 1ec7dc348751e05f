"""Kernel layouts: repack stored weights into the bit-plane layout that ``lowbit::packed_linear`` reads.

A fast kernel wants its own layout; the formats keep theirs (MSB-first rows, see
:mod:`lowbit.formats.bitpack`). :func:`repack_affine` and :func:`repack_lut` are pure functions from a
format's numbers (codes, scales, zero points, codebooks, ``g_idx``) to a :class:`PackedWeight`, and
:func:`dequantize_packed` is their exact inverse up to the float weight, so every repack is tested
against the format's own ``dequantize``.

Layout (``K`` = in_features padded up to a multiple of 32, ``N`` = out_features):

- codes are split into bit planes of 4, 2 and 1 bits (4 = [4], 3 = [2, 1], 2 = [2]); a plane of ``b``
  bits is ``int32 (K·b/32, N)``: word ``j`` of column ``n`` holds codes ``k = j·(32/b) + i`` at bits
  ``[b·i, b·i + b)``. Packing along K with N contiguous lets one tile load serve the GEMV (sum over K)
  and the tiled ``tl.dot`` path, with coalesced loads along N. Code = plane2 | plane1 << 2 for 3 bits.
- ``scale``, ``zero_point``: ``(G, N)`` (transposed so a K-tile reads one contiguous row);
  ``W[n, k] = (code - zero_point[g, n]) · scale[g, n]`` with ``g = k // group_size``.
- ``codebook``: ``(2^bits,)`` shared (NF4, FP4: ``W = codebook[code] · scale[g, n]``) or ``(N, 2^bits)``
  per output row (SqueezeLLM: ``W = codebook[n, code]``).
- GEMV column tiles (:func:`tile_columns`, built on demand by :func:`tiled_columns` and cached on the plane):
  a ``(R, N)`` plane or scale row block reordered to ``(ceil(N/BN), R, BN)``, zero columns past ``N``, so the
  ``BN`` columns of every row of one column tile lie next to each other and a GEMV program that walks K reads one
  contiguous run instead of ``BN``-wide pieces ``N`` words apart.
- ``perm``: ``int32 (K,)`` for act-order (GPTQ ``g_idx``): columns are sorted by group so that groups are
  contiguous; the kernel reads ``x[..., perm]`` (``x W^T = x[:, perm] W[:, perm]^T``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedWeight", "MODES", "planes_of", "pack_planes", "unpack_planes", "repack_affine", "repack_lut",
           "repack_quantized", "dequantize_packed", "tile_columns", "untile_columns", "tiled_columns"]

MODES = ("affine", "lut", "lut_row")
_PLANES = {4: (4,), 3: (2, 1), 2: (2,)}


def planes_of(bits: int) -> tuple[int, ...]:
    """Bit-plane widths used for ``bits``-bit codes."""
    if bits not in _PLANES:
        raise ValueError(f"packed kernels take bits in {sorted(_PLANES)}, got {bits!r}")
    return _PLANES[bits]


def _pad32(k: int) -> int:
    return -(-k // 32) * 32


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight in the kernel layout (see module docstring). ``planes`` maps plane width -> int32 tensor."""

    mode: str
    bits: int
    group_size: int
    in_features: int
    out_features: int
    q4: torch.Tensor
    q2: torch.Tensor
    q1: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    codebook: torch.Tensor | None
    perm: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.q4, self.q2, self.q1, self.scale, self.zero_point, self.codebook, self.perm]

    def to(self, device: torch.device | str) -> "PackedWeight":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedWeight(self.mode, self.bits, self.group_size, self.in_features, self.out_features,
                            *[mv(t) for t in self.tensors()])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


def pack_planes(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``(N, K)`` in ``[0, 2^bits)`` -> planes ``(q4, q2, q1)``, each ``int32 (Kp·b/32, N)`` or ``(0, N)``.

    ``Kp`` is ``K`` rounded up to 32; padding codes are 0.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D (out_features, in_features), got shape {tuple(codes.shape)}")
    widths = planes_of(bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    N, K = c.shape
    Kp = _pad32(K)
    c = torch.nn.functional.pad(c, (0, Kp - K)).t()  # (Kp, N)
    out: dict[int, torch.Tensor] = {}
    low = 0
    for b in widths:
        per = 32 // b
        part = (c >> low) & ((1 << b) - 1)  # (Kp, N)
        part = part.view(Kp // per, per, N)
        shifts = (torch.arange(per, device=c.device) * b).view(1, per, 1)
        word = (part << shifts).sum(1)  # < 2^32, fits int64
        out[b] = (word - ((word >= 2**31).to(torch.int64) << 32)).to(torch.int32).contiguous()
        low += b
    empty = torch.zeros((0, N), dtype=torch.int32, device=codes.device)
    return out.get(4, empty), out.get(2, empty), out.get(1, empty)


def unpack_planes(q4: torch.Tensor, q2: torch.Tensor, q1: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes`: codes ``int64 (N, K)``."""
    codes = None
    low = 0
    for b in planes_of(bits):
        w = {4: q4, 2: q2, 1: q1}[b].to(torch.int64) & 0xFFFFFFFF
        per = 32 // b
        shifts = (torch.arange(per, device=w.device) * b).view(1, per, 1)
        part = ((w.unsqueeze(1) >> shifts) & ((1 << b) - 1)).reshape(-1, w.shape[1])  # (Kp, N)
        codes = part << low if codes is None else codes | (part << low)
        low += b
    assert codes is not None
    return codes[:K].t().contiguous()


def tile_columns(t: torch.Tensor, BN: int) -> torch.Tensor:
    """``(R, N)`` -> ``(ceil(N/BN), R, BN)`` contiguous: column tile ``j`` holds columns ``[j·BN, j·BN + BN)`` of
    every row, rows one after another; columns past ``N`` are zero."""
    if t.dim() != 2:
        raise ValueError(f"tile_columns takes a 2-D (rows, columns) tensor, got shape {tuple(t.shape)}")
    if BN < 1:
        raise ValueError(f"BN must be a positive column count, got {BN}")
    R, N = t.shape
    NT = -(-N // BN)
    if NT * BN != N:
        t = torch.nn.functional.pad(t, (0, NT * BN - N))
    return t.reshape(R, NT, BN).permute(1, 0, 2).contiguous()


def untile_columns(t: torch.Tensor, N: int) -> torch.Tensor:
    """Inverse of :func:`tile_columns`: ``(NT, R, BN)`` -> ``(R, N)``."""
    NT, R, BN = t.shape
    if not (NT - 1) * BN < N <= NT * BN:
        raise ValueError(f"N={N} does not fit {NT} column tiles of {BN}")
    return t.permute(1, 0, 2).reshape(R, NT * BN)[:, :N].contiguous()


_TILED = "_lowbit_tiled_columns"  # {BN: (stamp, tiled copy)} on the plane itself: dies with it


def tiled_columns(t: torch.Tensor, BN: int) -> torch.Tensor:
    """:func:`tile_columns` of ``t``, built once per ``(t, BN)`` and cached on ``t`` (rebuilt when ``t`` is
    changed in place or its storage moves). The copy costs as much memory as ``t``."""
    stamp = (t.data_ptr(), t._version, tuple(t.shape))
    cache = getattr(t, _TILED, None)
    if cache is None:
        cache = {}
        setattr(t, _TILED, cache)
    hit = cache.get(BN)
    if hit is None or hit[0] != stamp:
        hit = (stamp, tile_columns(t, BN))
        cache[BN] = hit
    return hit[1]


def _perm_from_g_idx(g_idx: torch.Tensor, group_size: int, K: int) -> torch.Tensor | None:
    g = g_idx.to(torch.int64)
    if g.shape != (K,):
        raise ValueError(f"g_idx must have shape ({K},), got {tuple(g.shape)}")
    perm = torch.argsort(g, stable=True)
    expected = torch.arange(K, device=g.device) // group_size
    if not torch.equal(g[perm], expected):
        raise ValueError("g_idx does not sort into contiguous groups of group_size columns "
                         "(the act-order layout of GPTQ); use the reference path for this weight")
    if torch.equal(perm, torch.arange(K, device=g.device)):
        return None
    return perm.to(torch.int32)


def _check_group(group_size: int | None, K: int) -> int:
    if group_size is None or group_size >= K:
        return _pad32(K)  # one group per row
    if group_size % 32:
        raise ValueError(f"packed kernels need group_size a multiple of 32 (or per-channel), got {group_size}")
    return group_size


def repack_affine(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                  group_size: int | None, g_idx: torch.Tensor | None = None) -> PackedWeight:
    """Affine weight ``W[n, k] = (codes[n, k] - zero_point[n, g]) · scale[n, g]`` -> kernel layout.

    Args:
        codes: ``(N, K)`` integer codes in ``[0, 2^bits)``.
        scale: ``(N, G)`` float (kept in its dtype).
        zero_point: ``(N, G)`` integer or float zero points (HQQ: float); stored in ``scale``'s dtype
            if it is a float dtype of enough range, otherwise float32.
        bits: 2, 3 or 4.
        group_size: columns per group (``None`` = per channel).
        g_idx: optional ``(K,)`` group of each column (GPTQ act-order).
    """
    N, K = codes.shape
    gs = _check_group(group_size, K)
    if scale.dim() != 2 or scale.shape[0] != N:
        raise ValueError(f"scale must be (out_features={N}, n_groups), got {tuple(scale.shape)}")
    perm = None if g_idx is None else _perm_from_g_idx(g_idx, gs, K)
    if perm is not None:
        codes = codes[:, perm.long()]
    q4, q2, q1 = pack_planes(codes, bits)
    zdtype = scale.dtype if scale.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    zero = zero_point.to(zdtype)
    if zero.float().sub(zero_point.float()).abs().max() > 0:  # an HQQ zero not exact in fp16/bf16
        zero = zero_point.float()
    return PackedWeight("affine", bits, gs, K, N, q4, q2, q1, scale.t().contiguous(), zero.t().contiguous(),
                        None, perm)


def repack_lut(codes: torch.Tensor, codebook: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
               group_size: int | None = None) -> PackedWeight:
    """Codebook weight -> kernel layout.

    ``codebook (2^bits,)`` with ``scale (N, G)``: ``W = codebook[code] · scale`` (NF4/FP4, absmax per
    block of ``group_size``); ``codebook (N, 2^bits)`` without scale: ``W[n] = codebook[n, code]``
    (SqueezeLLM per-row look-up tables).
    """
    N, K = codes.shape
    ncode = 1 << bits
    q4, q2, q1 = pack_planes(codes, bits)
    if codebook.dim() == 2:
        if codebook.shape != (N, ncode):
            raise ValueError(f"per-row codebook must be ({N}, {ncode}), got {tuple(codebook.shape)}")
        if scale is not None:
            raise ValueError("a per-row codebook takes no scale")
        return PackedWeight("lut_row", bits, _pad32(K), K, N, q4, q2, q1, None, None, codebook.contiguous(), None)
    if codebook.shape != (ncode,):
        raise ValueError(f"shared codebook must have {ncode} entries for bits={bits}, got {tuple(codebook.shape)}")
    if scale is None:
        raise ValueError("a shared codebook needs a scale (N, n_groups)")
    gs = _check_group(group_size, K)
    return PackedWeight("lut", bits, gs, K, N, q4, q2, q1, scale.t().contiguous(), None,
                        codebook.float().contiguous(), None)


def dequantize_packed(pw: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight ``(N, K)`` (original column order) of a :class:`PackedWeight`."""
    K, N = pw.in_features, pw.out_features
    codes = unpack_planes(pw.q4, pw.q2, pw.q1, pw.bits, K)  # (N, K) in kernel column order
    g = torch.arange(K, device=codes.device) // pw.group_size
    if pw.mode == "affine":
        assert pw.scale is not None and pw.zero_point is not None
        W = (codes.float() - pw.zero_point.float()[g].t()) * pw.scale.float()[g].t()
    elif pw.mode == "lut":
        assert pw.scale is not None and pw.codebook is not None
        W = pw.codebook.float()[codes] * pw.scale.float()[g].t()
    else:
        assert pw.codebook is not None
        W = torch.gather(pw.codebook.float(), 1, codes)
    if pw.perm is not None:
        out = torch.empty_like(W)
        out[:, pw.perm.long()] = W
        W = out
    return W.to(dtype)


def repack_quantized(q) -> PackedWeight:  # type: ignore[no-untyped-def]
    """Repack a :class:`~lowbit.formats.base.QuantizedTensor` of a supported format.

    Supported: ``int_affine`` with bits 2-4 (symmetric, asymmetric, float zero point, act-order);
    ``codebook`` (NF4/FP4, double quantization dequantized once to a float32 absmax) when blocks do not
    straddle rows; ``row_codebook`` (SqueezeLLM) with bits 2-4. Raises ``ValueError`` naming the format otherwise.
    """
    from lowbit.formats.bitpack import unpack

    fmt = q.format
    N, K = q.shape
    if fmt.kind == "codebook":
        if K % fmt.block_size or fmt.block_size % 32:
            raise ValueError(f"codebook blocks of {fmt.block_size} straddle rows of {K} (or are not a multiple of 32); "
                             "no packed kernel layout")
        codes = unpack(q["qdata"].unsqueeze(0), 4, N * K).reshape(N, K)
        absmax = fmt.absmax(q).to(torch.float32).reshape(N, K // fmt.block_size)
        return repack_lut(codes, fmt.code.to(codes.device), 4, absmax, fmt.block_size)
    if fmt.kind == "row_codebook" and fmt.bits in _PLANES:
        return repack_lut(unpack(q["qdata"], fmt.bits, K), q["codebook"], fmt.bits)
    if fmt.kind == "int_affine" and fmt.bits in _PLANES and not fmt.per_tensor:
        codes = unpack(q["qdata"], fmt.bits, K)
        scale = q["scale"]
        zero = q.get("zero_point")
        if zero is None:
            zero = torch.full(scale.shape, float(1 << (fmt.bits - 1)), dtype=scale.dtype, device=scale.device)
        return repack_affine(codes, scale, zero, fmt.bits, fmt.group_size, q.get("g_idx"))
    raise ValueError(f"no packed kernel layout for format {fmt.kind!r} ({fmt.spec()}); "
                     "supported: int_affine with bits 2, 3, 4 and grouped or per-channel scales")
