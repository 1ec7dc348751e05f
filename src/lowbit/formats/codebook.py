"""Lookup-table formats: NF4/FP4 with block-wise absmax (QLoRA storage) and per-row learned codebooks.

:class:`Codebook` — QLoRA's 4-bit storage (Dettmers et al., arXiv 2305.14314), byte-compatible with
``bitsandbytes.functional.quantize_4bit``:

- ``qdata``: ``uint8 (ceil(numel·bits/8),)``, the indices of the row-major flattened weight; for 4 bits two
  per byte, first element in the high nibble (an odd count is padded with the code of 0.0, as bitsandbytes
  does); NF2/NF3 codes are packed densely (MSB first).
- without double quantization: ``absmax`` float32 ``(n_blocks,)``, one per ``block_size`` consecutive elements.
- with double quantization: ``absmax`` uint8 ``(n_blocks,)``, indices into the signed 8-bit dynamic map
  (:func:`lowbit.formats.dynamic_map.create_dynamic_map`) of ``absmax - absmax_offset`` in blocks of
  ``double_block_size``; ``absmax_scale`` float32 ``(ceil(n_blocks/double_block_size),)`` their block absmax;
  ``absmax_offset`` float32 ``(1,)`` the mean of the first-level absmax.

Dequantization: ``W = code[qdata] · absmax[block]`` in float32, cast to the weight's dtype.

:class:`RowCodebook` — a learned lookup table per output row (SqueezeLLM, arXiv 2306.07629):
``codebook (out, 2^bits)`` in ``codebook_dtype`` and ``qdata`` bit-packed per row; ``W[i, j] = codebook[i, qdata[i, j]]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.formats.base import Format, QuantizedTensor, check_weight
from lowbit.formats.bitpack import pack, packed_len, unpack
from lowbit.formats.blockwise import dequantize_blockwise, nearest_code, quantize_blockwise
from lowbit.formats.dynamic_map import create_dynamic_map, dynamic_map_on

__all__ = ["Codebook", "RowCodebook", "NF4_CODE", "FP4_CODE", "code_table", "code_table_on", "normal_float_values"]

# The 16 NF4 values of bitsandbytes (create_normal_map(offset=0.9677083, use_extra_value=True)): quantiles of
# N(0, 1), 7 negative, an exact zero and 8 positive, normalized to [-1, 1]. Index = position (sorted).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# bitsandbytes' FP4 (sign + 2 exponent bits + 1 mantissa bit, exponent bias 2) in bit-pattern order: index
# bit 3 is the sign, the low 3 bits map to {0, 1/16, 8, 12, 4, 6, 2, 3}; divided by the largest value, 12.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
FP4_CODE = tuple(m / 12.0 for m in _FP4_MAGNITUDES) + tuple(-m / 12.0 for m in _FP4_MAGNITUDES)
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
_NAMES = ("nf2", "nf3", "nf4", "fp4")
QLORA_OFFSET = 0.9677083


def normal_float_values(bits: int = 4, offset: float = QLORA_OFFSET) -> torch.Tensor:
    """NF-k values: quantiles of N(0, 1) normalized to [-1, 1] (QLoRA eq. 4, arXiv 2305.14314).

    bitsandbytes' asymmetric split: ``2^(k-1)`` positive quantiles ``Φ⁻¹(linspace(δ, 1/2, 2^(k-1)+1)[:-1])``,
    ``2^(k-1) - 1`` negative ones and an exact zero, ``δ = 0.9677083``. Probabilities on a float32 grid (as
    bitsandbytes and LoftQ build them), quantiles in float64 (``torch.special.ndtri``), table in float32. At
    ``bits=4`` this reproduces the 16 values bitsandbytes hard-codes.

    Returns:
        float32 ``(2^bits,)``, sorted ascending.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, half + 1)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, half)[:-1].double())
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values
    return v / v.max()


def code_table(name: str) -> torch.Tensor:
    """The float32 code of ``"nf2"``, ``"nf3"``, ``"nf4"`` or ``"fp4"`` (indexed by the stored value)."""
    return code_table_on(name, torch.device("cpu")).clone()


@functools.lru_cache(maxsize=64)
def code_table_on(name: str, device: torch.device) -> torch.Tensor:
    """:func:`code_table` built once per process and device: read-only (never modify it)."""
    if device.type != "cpu":
        return code_table_on(name, torch.device("cpu")).to(device)
    if name in _CODES:
        return torch.tensor(_CODES[name], dtype=torch.float32)
    if name in _NAMES:
        return normal_float_values(int(name[2:]))
    raise ValueError(f"unknown code {name!r}; valid choices: {list(_NAMES)}")


def _check_positive_int(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class Codebook(Format):
    """NF4 / FP4 (and NF2 / NF3) with block-wise absmax scaling and optional double quantization (QLoRA).

    ``nf2``/``nf3`` (LoftQ's NF-k quantizer) pack their codes densely with :mod:`lowbit.formats.bitpack`
    (MSB first), which for 4 bits is bitsandbytes' nibble order.

    Args:
        name: ``"nf4"`` or ``"fp4"`` (bitsandbytes' tables), ``"nf2"`` or ``"nf3"``.
        block_size: weights per absmax block, over the row-major flattened weight (bnb: 64).
        double_quant: quantize the absmax to 8 bits (bnb's ``compress_statistics``).
        double_block_size: absmax values per second-level block (bnb: 256).
    """

    kind = "codebook"

    name: str = "nf4"
    block_size: int = 64
    double_quant: bool = True
    double_block_size: int = 256

    def __post_init__(self) -> None:
        if self.name not in _NAMES:
            raise ValueError(f"unknown Codebook name {self.name!r}; valid choices: {list(_NAMES)}")
        _check_positive_int("block_size", self.block_size)
        _check_positive_int("double_block_size", self.double_block_size)

    @classmethod
    def nf(cls, bits: int, block_size: int = 64, double_quant: bool = False,
           double_block_size: int = 256) -> "Codebook":
        """NF-``bits`` codebook format (2, 3 or 4 bits)."""
        if bits not in (2, 3, 4):
            raise ValueError(f"NF codebooks exist for bits 2, 3, 4; got {bits!r}")
        return cls(f"nf{bits}", block_size, double_quant, double_block_size)

    @property
    def bits(self) -> int:
        return 3 if self.name == "nf3" else 2 if self.name == "nf2" else 4

    @property
    def code(self) -> torch.Tensor:
        return code_table(self.name)

    def tensor_names(self) -> tuple[str, ...]:
        return ("qdata", "absmax", "absmax_scale", "absmax_offset") if self.double_quant else ("qdata", "absmax")

    def validate_shape(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"Codebook stores 2-D weights with positive sizes, got shape {tuple(shape)}")

    def n_blocks(self, numel: int) -> int:
        return -(-numel // self.block_size)

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """``absmax``: float32 ``(n_blocks,)``, the max ``|W|`` of each block of the flattened weight."""
        check_weight(W)
        flat = W.reshape(-1).float()
        pad = self.n_blocks(flat.numel()) * self.block_size - flat.numel()
        return {"absmax": torch.nn.functional.pad(flat, (0, pad)).reshape(-1, self.block_size).abs().amax(-1)}

    def _codes(self, W: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        flat = W.reshape(-1).float()
        n = flat.numel()
        pad = absmax.numel() * self.block_size - n
        blocks = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, self.block_size)
        x = torch.clamp(blocks * (1.0 / absmax.float().clamp(min=1e-38)).unsqueeze(-1), -1, 1).reshape(-1)[:n]
        return nearest_code(x, self.code)

    def _store_absmax(self, absmax: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.double_quant:
            return {"absmax": absmax.float().contiguous()}
        offset = absmax.float().mean()
        idx, scale2 = quantize_blockwise(absmax.float() - offset, create_dynamic_map(True, 7, 8), self.double_block_size)
        return {"absmax": idx.to(torch.uint8), "absmax_scale": scale2, "absmax_offset": offset.reshape(1)}

    def absmax(self, q: QuantizedTensor) -> torch.Tensor:
        """The float32 first-level absmax ``(n_blocks,)`` of a stored tensor (undoing double quantization)."""
        if not self.double_quant:
            return q["absmax"].float()
        a = dequantize_blockwise(q["absmax"], q["absmax_scale"], dynamic_map_on(q["absmax"].device, True, 7, 8),
                                 self.double_block_size, q["absmax"].numel())
        return a + q["absmax_offset"].float()

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        """Quantize ``W: (out, in)``; ``absmax`` (float32 ``(n_blocks,)``) may be given instead of RTN's."""
        check_weight(W)
        unknown = set(params) - {"absmax"}
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {self.kind}; valid: ['absmax']")
        nb = self.n_blocks(W.numel())
        absmax = params["absmax"] if "absmax" in params else self.params(W)["absmax"]
        if absmax.shape != (nb,) or not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
            raise ValueError(f"absmax must be finite, non-negative, shape ({nb},); got shape {tuple(absmax.shape)}")
        idx = self._codes(W, absmax).to(torch.uint8)
        if self.bits == 4 and idx.numel() % 2:
            # bitsandbytes pads the scaled values with 0.0 before rounding: the pad nibble is the code of 0.
            idx = torch.cat([idx, nearest_code(torch.zeros(1, device=idx.device), self.code).to(torch.uint8)])
        qdata = pack(idx.unsqueeze(0), self.bits).reshape(-1)
        return QuantizedTensor(self, tuple(W.shape), W.dtype, {"qdata": qdata, **self._store_absmax(absmax)})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        numel = q.numel
        n_codes = numel + (numel % 2 if self.bits == 4 else 0)
        idx = unpack(q["qdata"].unsqueeze(0), self.bits, n_codes).reshape(-1)[:numel]
        W = dequantize_blockwise(idx, self.absmax(q), code_table_on(self.name, idx.device), self.block_size, numel)
        return W.reshape(q.shape).to(q.dtype)

    def bits_per_weight_formula(self, shape: tuple[int, int]) -> float:
        numel = shape[0] * shape[1]
        nb = self.n_blocks(numel)
        bits = 8 * packed_len(numel, self.bits)
        if self.double_quant:
            bits += 8 * nb + 32 * (-(-nb // self.double_block_size)) + 32
        else:
            bits += 32 * nb
        return bits / numel

    @classmethod
    def examples(cls) -> list["Format"]:
        return [cls("nf4", 64, True), cls("nf4", 64, False), cls("fp4", 64, True), cls("fp4", 128, False),
                cls("nf4", 32, True, 16), cls("nf2", 64, False), cls("nf3", 64, True)]


@dataclass(frozen=True)
class RowCodebook(Format):
    """A ``2^bits``-entry lookup table per output row (SqueezeLLM's non-uniform LUT).

    Round-to-nearest's table (:meth:`params`) is a uniform grid from the row's min to its max; methods give
    their own (e.g. Fisher-weighted k-means centroids) as ``codebook``.

    Args:
        bits: index width, 1..8.
        codebook_dtype: dtype of the stored table.
    """

    kind = "row_codebook"

    bits: int = 4
    codebook_dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"RowCodebook bits must be an int in 1..8, got {self.bits!r}")
        if self.codebook_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"codebook_dtype must be float16, bfloat16 or float32, got {self.codebook_dtype}")

    def tensor_names(self) -> tuple[str, ...]:
        return ("qdata", "codebook")

    def validate_shape(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"RowCodebook stores 2-D weights with positive sizes, got shape {tuple(shape)}")

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """``codebook (out, 2^bits)``: a uniform grid from each row's min to its max."""
        check_weight(W)
        lo, hi = W.float().amin(1, keepdim=True), W.float().amax(1, keepdim=True)
        t = torch.linspace(0, 1, 1 << self.bits, device=W.device)
        return {"codebook": (lo + (hi - lo) * t).to(self.codebook_dtype)}

    def codes(self, W: torch.Tensor, codebook: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Index (int64, ``(out, in)``) of the nearest table entry of each weight (ties: lower index)."""
        C = codebook.float()
        Wf = W.float()
        out = torch.empty(W.shape, dtype=torch.int64, device=W.device)
        for r in range(0, W.shape[0], chunk):
            d = (Wf[r:r + chunk, :, None] - C[r:r + chunk, None, :]).abs()
            out[r:r + chunk] = d.argmin(-1)
        return out

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        """Quantize ``W: (out, in)`` to the nearest entry of ``codebook`` (given, or a uniform RTN grid)."""
        check_weight(W)
        unknown = set(params) - {"codebook"}
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)} for {self.kind}; valid: ['codebook']")
        cb = params["codebook"] if "codebook" in params else self.params(W)["codebook"]
        want = (W.shape[0], 1 << self.bits)
        if tuple(cb.shape) != want:
            raise ValueError(f"codebook must have shape {want}, got {tuple(cb.shape)}")
        if not bool(torch.isfinite(cb).all()):
            raise ValueError("codebook has NaN/Inf entries")
        cb = cb.to(self.codebook_dtype).contiguous()
        return QuantizedTensor(self, tuple(W.shape), W.dtype,
                               {"qdata": pack(self.codes(W, cb), self.bits), "codebook": cb})

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        idx = unpack(q["qdata"], self.bits, q.shape[1]).long()
        return torch.gather(q["codebook"].float(), 1, idx).to(q.dtype)

    def bits_per_weight_formula(self, shape: tuple[int, int]) -> float:
        out, n = shape
        return (out * packed_len(n, self.bits) * 8 + out * (1 << self.bits) * torch.finfo(self.codebook_dtype).bits) / (out * n)

    @classmethod
    def examples(cls) -> list["Format"]:
        return [cls(3), cls(4), cls(2, torch.float32)]
