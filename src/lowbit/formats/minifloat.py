"""ExMy minifloat formats, simulated exactly: FP8 (E5M2, E4M3, E3M4, E2M5), FP4 (E2M1) and any other split.

After "FP8 Quantization: The Power of the Exponent" (Kuzmin et al., arXiv 2208.09225): a value with ``E``
exponent bits, ``M`` mantissa bits and exponent bias ``b`` is

* normal (exponent field ``e ≥ 1``): ``(-1)^s · 2^(e-b) · (1 + f/2^M)``
* subnormal (``e = 0``): ``(-1)^s · 2^(1-b) · (f/2^M)``

Rounding to the grid is integer rounding with an input-dependent power-of-two step (as the paper's code does):
``step = 2^(max(floor(log2|x|), 1-b) - M)``, ``q = round_half_even(x/step)·step``, after clamping ``x`` to the
largest finite value (saturation). ``floor(log2|x|)`` comes from :func:`torch.frexp`, so it is exact.

Which codes are finite is the ``special`` field:

* ``"ieee"``: the top exponent field is reserved for inf/NaN (torch ``float8_e5m2``; max 57344 for E5M2);
* ``"fn"``: only the all-ones code is NaN (torch ``float8_e4m3fn``; max 448 for E4M3);
* ``"none"``: every code is finite, as in the paper's simulation and in FP4 E2M1 (max 6).

With the IEEE bias ``b = 2^(E-1) - 1`` the stored codes of E4M3 ("fn") and E5M2 ("ieee") are bit-identical to
torch's float8 casts (tested). A real-valued bias (the paper's learnable max value) is the same as a scale:
``x ≈ scale · Q(x / scale)``; :func:`search_maxval` picks it by minimising the quantization MSE over a grid.

Storage: ``qdata`` holds the codes (``uint8``; two 4-bit codes per byte when ``1+E+M ≤ 4``), ``scale`` one
positive float per tensor, row or (row, group); ``lora_a``/``lora_b`` an optional low-rank correction
(ZeroQuant-FP's LoRC) added at dequantization; ``act_scale`` a static activation scale when ``act`` asks for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.formats.act_quant import ActQuant, act_linear, quantize_activation
from lowbit.formats.base import Format, QuantizedTensor, check_weight

__all__ = ["Minifloat", "MinifloatGrid", "round_to_grid", "search_maxval", "best_exponent_bits", "PRESETS"]

SPECIALS = ("ieee", "fn", "none")
GRANULARITIES = ("tensor", "channel", "group")
POW2_MODES = ("none", "ceil", "row")

PRESETS: dict[str, tuple[int, int, str]] = {
    "e5m2": (5, 2, "ieee"), "e4m3": (4, 3, "fn"), "e3m4": (3, 4, "none"), "e2m5": (2, 5, "none"),
    "e2m1": (2, 1, "none"), "fp4": (2, 1, "none"),
}


@dataclass(frozen=True)
class MinifloatGrid:
    """The value grid of one ExMy format (no scale). ``bias`` None means the IEEE bias ``2^(E-1) - 1``."""

    exponent_bits: int
    mantissa_bits: int
    special: str = "none"
    bias: int | None = None

    def __post_init__(self) -> None:
        E, M = self.exponent_bits, self.mantissa_bits
        if not isinstance(E, int) or not 1 <= E <= 8:
            raise ValueError(f"exponent_bits={E!r} out of range; valid choices: 1..8")
        if not isinstance(M, int) or not 0 <= M <= 10:
            raise ValueError(f"mantissa_bits={M!r} out of range; valid choices: 0..10")
        if self.special not in SPECIALS:
            raise ValueError(f"special={self.special!r} unknown; valid choices: {list(SPECIALS)}")
        if self.special == "fn" and M == 0:
            raise ValueError("special='fn' needs mantissa_bits >= 1 (the all-ones code is NaN)")

    @property
    def b(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1 if self.bias is None else self.bias

    @property
    def total_bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def max_exponent_field(self) -> int:
        top = (1 << self.exponent_bits) - 1
        return top - 1 if self.special == "ieee" else top

    @property
    def max_value(self) -> float:
        """Largest finite magnitude."""
        M = self.mantissa_bits
        top_mant = (1 << M) - (2 if self.special == "fn" else 1)
        return math.ldexp(1.0 + top_mant / (1 << M), self.max_exponent_field - self.b)

    @property
    def min_subnormal(self) -> float:
        return math.ldexp(1.0, 1 - self.b - self.mantissa_bits)

    def values(self) -> torch.Tensor:
        """Every finite non-negative value of the grid, ascending (float64)."""
        M, out = self.mantissa_bits, []
        for e in range(self.max_exponent_field + 1):
            for f in range(1 << M):
                v = math.ldexp(f / (1 << M), 1 - self.b) if e == 0 else math.ldexp(1 + f / (1 << M), e - self.b)
                if v <= self.max_value:
                    out.append(v)
        return torch.tensor(sorted(set(out)), dtype=torch.float64)

    # -- rounding and codes --------------------------------------------------------------------
    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` (already divided by its scale) to the nearest grid value, ties to even, saturating."""
        return round_to_grid(x, self)

    def encode(self, q: torch.Tensor) -> torch.Tensor:
        """Codes (``int32``, sign in bit ``E+M``) of values ``q`` that lie on the grid."""
        E, M, b = self.exponent_bits, self.mantissa_bits, self.b
        a = q.abs().to(torch.float64)
        _, ex = torch.frexp(a)
        e_unb = (ex - 1).clamp(min=1 - b)
        normal = a >= math.ldexp(1.0, 1 - b)
        e_field = torch.where(normal, e_unb + b, torch.zeros_like(e_unb))
        frac = a * torch.pow(2.0, (M - e_unb).to(torch.float64))
        mant = torch.where(normal, frac - (1 << M), frac).round().to(torch.int32)
        sign = (q < 0) | ((q == 0) & torch.signbit(q))
        return (sign.to(torch.int32) << (E + M)) | (e_field.to(torch.int32) << M) | mant

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Values (float32) of ``codes``; inverse of :meth:`encode`."""
        E, M, b = self.exponent_bits, self.mantissa_bits, self.b
        c = codes.to(torch.int32)
        mant = (c & ((1 << M) - 1)).to(torch.float32)
        e_field = (c >> M) & ((1 << E) - 1)
        sign = torch.where(((c >> (E + M)) & 1) == 1, -1.0, 1.0)
        e_unb = torch.where(e_field == 0, torch.full_like(e_field, 1 - b), e_field - b).to(torch.float32)
        sig = torch.where(e_field == 0, mant / (1 << M), 1.0 + mant / (1 << M))
        return sign * sig * torch.pow(2.0, e_unb)


def round_to_grid(x: torch.Tensor, grid: MinifloatGrid) -> torch.Tensor:
    """Nearest ExMy value of each element of ``x`` (round half to even, saturating at ±max), in ``x``'s dtype.

    Args:
        x: any shape, float; NaN stays NaN (formats reject NaN weights before rounding).
        grid: the ExMy grid.
    """
    mx = grid.max_value
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32  # every ExMy value (M ≤ 10) is exact in fp32
    xc = x.to(wide).clamp(-mx, mx)
    native = _TORCH_NATIVE.get((grid.exponent_bits, grid.mantissa_bits, grid.special, grid.bias))
    if native is not None:  # same grid, same round-half-even: torch's cast is the fast path (tested equal)
        return xc.to(native).to(x.dtype)
    _, ex = torch.frexp(xc)  # |xc| = m·2^ex with m in [0.5, 1): floor(log2|xc|) = ex - 1, exact
    step = torch.ldexp(torch.ones_like(xc), (ex - 1).clamp_(min=1 - grid.b) - grid.mantissa_bits)
    q = torch.round(xc / step) * step  # division by a power of two is exact; torch.round is half-to-even
    return q.clamp_(-mx, mx).to(x.dtype)


_TORCH_NATIVE: dict[tuple[int, int, str, int | None], torch.dtype] = {
    (4, 3, "fn", None): torch.float8_e4m3fn, (5, 2, "ieee", None): torch.float8_e5m2,
}


def _expand_rows(scale: torch.Tensor, n_in: int, granularity: str, group_size: int) -> torch.Tensor:
    """Broadcast ``scale`` (tensor/row/(row, group)) to ``(out, in)``."""
    if granularity == "tensor":
        return scale.reshape(1, 1).expand(-1, n_in)
    if granularity == "channel":
        return scale.reshape(-1, 1).expand(-1, n_in)
    if scale.dim() == 2 and scale.shape[1] == 1 and n_in <= group_size:  # one group: GPTQ's single columns
        return scale.expand(-1, n_in)
    return scale.repeat_interleave(group_size, dim=1)[:, :n_in]


def _group_absmax(W: torch.Tensor, granularity: str, group_size: int) -> torch.Tensor:
    A = W.abs().to(torch.float32)
    if granularity == "tensor":
        return A.amax().reshape(1)
    if granularity == "channel":
        return A.amax(dim=1)
    n_out, n_in = A.shape
    ng = -(-n_in // group_size)
    pad = ng * group_size - n_in  # a shorter last group: pad with zeros (they never raise an absmax)
    return torch.nn.functional.pad(A, (0, pad)).reshape(n_out, ng, group_size).amax(dim=2)


def search_maxval(x: torch.Tensor, grid: MinifloatGrid, n_grid: int = 100, min_ratio: float = 0.2,
                  dim: int | None = None) -> torch.Tensor:
    """The clipping value ``maxval`` (mapped to the grid's max) that minimises ``‖x - Q(x)‖²``.

    The paper (arXiv 2208.09225, Sec. 3) treats the exponent bias as a free real parameter; a real bias is
    the same as a scale ``maxval / grid.max_value``. Candidates are ``absmax · r`` for ``n_grid`` ratios ``r``
    evenly spaced in ``[min_ratio, 1]``.

    Args:
        x: values; with ``dim`` the search runs independently per slice along ``dim`` (e.g. ``dim=1``: per row).
        grid: the ExMy grid.
    Returns:
        ``maxval``: a scalar tensor, or one per slice.
    """
    if n_grid < 1:
        raise ValueError(f"n_grid={n_grid} must be >= 1")
    xf = x.to(torch.float32)
    if dim is None:
        xf, red = xf.reshape(1, -1), 1
    else:
        xf, red = xf.movedim(dim, -1).reshape(-1, xf.shape[dim]), 1
    absmax = xf.abs().amax(dim=red).clamp(min=1e-12)
    best_err = torch.full_like(absmax, float("inf"))
    best = absmax.clone()
    for r in torch.linspace(min_ratio, 1.0, n_grid).tolist():
        mv = absmax * r
        s = (mv / grid.max_value).unsqueeze(1)
        err = (round_to_grid(xf / s, grid) * s - xf).pow(2).sum(dim=red)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, mv, best)
    return best if dim is not None else best.reshape(())


def best_exponent_bits(x: torch.Tensor, total_bits: int = 8, n_grid: int = 100) -> tuple[int, dict[int, float]]:
    """For a fixed bit budget, the exponent width whose MSE-searched ExMy grid quantizes ``x`` best.

    The paper's finding (arXiv 2208.09225, Sec. 4): the heavier the tails (outliers), the more exponent bits.
    Returns ``(E, {E: mse})`` over ``E = 1 .. total_bits - 2`` (``M = total_bits - 1 - E``, all codes finite).
    """
    if total_bits < 3:
        raise ValueError(f"total_bits={total_bits} must be >= 3")
    errs: dict[int, float] = {}
    for E in range(1, total_bits - 1):
        g = MinifloatGrid(E, total_bits - 1 - E, "none")
        s = search_maxval(x, g, n_grid=n_grid) / g.max_value
        errs[E] = float((round_to_grid(x / s, g) * s - x).pow(2).mean())
    return min(errs, key=errs.__getitem__), errs


@dataclass(frozen=True)
class Minifloat(Format):
    """ExMy floating-point weights with a scale per tensor, output channel or (channel, group).

    Args:
        exponent_bits, mantissa_bits: ``E`` and ``M`` (E4M3: 4, 3; FP4 E2M1: 2, 1).
        special: which codes are finite (``"ieee"``, ``"fn"``, ``"none"``; see the module docstring).
        bias: exponent bias; None for the IEEE bias ``2^(E-1) - 1``.
        granularity: ``"tensor"``, ``"channel"`` (one scale per output row) or ``"group"``.
        group_size: inputs per group, set exactly for ``"group"`` (a row that it does not divide gets a shorter
            last group); a slice narrower than a group (GPTQ fitting one group) gets one group.
        scale_search: pick each scale by the MSE max-value search (:func:`search_maxval`) instead of absmax.
        pow2_scale: ZeroQuant-FP's power-of-two constraint (arXiv 2307.09782, Sec. 4) so that FP4 → FP8 is an
            exponent shift: ``"ceil"`` rounds every scale up to a power of two (M1); ``"row"`` keeps a real
            per-row scale and makes each group scale that row scale times a power of two (M2); ``"none"``.
        lorc_rank: rank of the stored low-rank error correction (``lora_b @ lora_a``, fp16); 0 for none.
            The method computes it (``quantize(W, lora_a=..., lora_b=...)``); its bytes count.
        act: activation quantization applied by :meth:`linear` (W8A8 / W4A8); None for weight-only.
    """

    kind: ClassVar[str] = "minifloat"

    exponent_bits: int = 4
    mantissa_bits: int = 3
    special: str = "fn"
    bias: int | None = None
    granularity: str = "channel"
    group_size: int | None = None
    scale_search: bool = False
    pow2_scale: str = "none"
    lorc_rank: int = 0
    act: ActQuant | None = None

    def __post_init__(self) -> None:
        self.grid  # validates E, M, special
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} unknown; valid choices: {list(GRANULARITIES)}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise ValueError(f"group_size={self.group_size!r} is set exactly when granularity='group' "
                             f"(got granularity={self.granularity!r})")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} must be a positive int")
        if self.pow2_scale not in POW2_MODES:
            raise ValueError(f"pow2_scale={self.pow2_scale!r} unknown; valid choices: {list(POW2_MODES)}")
        if self.pow2_scale == "row" and self.granularity != "group":
            raise ValueError("pow2_scale='row' constrains group scales relative to a row scale; use granularity='group'")
        if not isinstance(self.lorc_rank, int) or self.lorc_rank < 0:
            raise ValueError(f"lorc_rank={self.lorc_rank!r} must be an int >= 0")

    @classmethod
    def preset(cls, name: str, **kw: object) -> "Minifloat":
        """``Minifloat.preset("e4m3")``; names: e5m2, e4m3, e3m4, e2m5, e2m1 (= fp4)."""
        if name.lower() not in PRESETS:
            raise ValueError(f"unknown minifloat preset {name!r}; valid choices: {sorted(PRESETS)}")
        E, M, sp = PRESETS[name.lower()]
        return cls(exponent_bits=E, mantissa_bits=M, special=sp, **kw)  # type: ignore[arg-type]

    @property
    def grid(self) -> MinifloatGrid:
        return MinifloatGrid(self.exponent_bits, self.mantissa_bits, self.special, self.bias)

    @property
    def bits(self) -> int:
        return self.grid.total_bits

    @property
    def _packed(self) -> bool:
        return self.bits <= 4

    def tensor_names(self) -> tuple[str, ...]:
        names = ["qdata", "scale"]
        if self.lorc_rank:
            names += ["lora_a", "lora_b"]
        if self.act is not None and self.act.static:
            names.append("act_scale")
        return tuple(names)

    def validate_shape(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"minifloat stores 2-D weights, got shape {shape}")
        if self.lorc_rank > min(shape):
            raise ValueError(f"lorc_rank={self.lorc_rank} exceeds min(shape)={min(shape)} of weight {shape}")

    def _gs(self, n_in: int) -> int:
        return self.group_size if self.group_size is not None else n_in

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """RTN (or MSE-searched) scales: ``(1,)``, ``(out,)`` or ``(out, n_groups)`` float32."""
        grid, n_in = self.grid, W.shape[1]
        if self.scale_search:
            if self.granularity == "tensor":
                amax = search_maxval(W, grid).reshape(1)
            elif self.granularity == "channel":
                amax = search_maxval(W, grid, dim=1)
            else:
                gs = self._gs(n_in)
                ng = -(-n_in // gs)
                amax = torch.stack([search_maxval(W[:, g * gs:(g + 1) * gs], grid, dim=1) for g in range(ng)], 1)
        else:
            amax = _group_absmax(W, self.granularity, self._gs(n_in))
        scale = (amax / grid.max_value).clamp(min=torch.finfo(torch.float32).tiny * 2 ** 24)
        if self.pow2_scale == "ceil":
            scale = torch.pow(2.0, torch.ceil(torch.log2(scale)))
        elif self.pow2_scale == "row":
            row = scale.amax(dim=1, keepdim=True)
            scale = row * torch.pow(2.0, torch.ceil(torch.log2(scale / row)))
        return {"scale": scale.to(torch.float32)}

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        check_weight(W)
        self.validate_shape(tuple(W.shape))
        unknown = set(params) - {"scale", "lora_a", "lora_b", "act_scale"}
        if unknown:
            raise ValueError(f"unknown minifloat parameter(s) {sorted(unknown)}; valid: scale, lora_a, lora_b, act_scale")
        n_out, n_in = W.shape
        scale = params.get("scale")
        if scale is None:
            scale = self.params(W)["scale"]
        scale = scale.to(torch.float32)
        S = _expand_rows(scale, n_in, self.granularity, self._gs(n_in))
        q = round_to_grid(W.to(torch.float32) / S, self.grid)
        codes = self.grid.encode(q).to(torch.uint8) & ((1 << self.bits) - 1)
        data: dict[str, torch.Tensor] = {"qdata": _pack4(codes) if self._packed else codes, "scale": scale}
        if self.lorc_rank:
            a, b = params.get("lora_a"), params.get("lora_b")
            if a is None or b is None or a.shape != (self.lorc_rank, n_in) or b.shape != (n_out, self.lorc_rank):
                raise ValueError(f"lorc_rank={self.lorc_rank} needs lora_a ({self.lorc_rank}, {n_in}) and lora_b "
                                 f"({n_out}, {self.lorc_rank}); the zeroquant_fp method computes them")
            data["lora_a"], data["lora_b"] = a.to(torch.float16), b.to(torch.float16)
        if self.act is not None and self.act.static:
            if "act_scale" not in params:
                raise ValueError("static activation quantization needs act_scale (calibrated); pass act_scale=...")
            data["act_scale"] = params["act_scale"].to(torch.float32).reshape(1)
        return QuantizedTensor(self, (n_out, n_in), W.dtype, data)

    def fake_quantize(self, W: torch.Tensor, **params: torch.Tensor) -> torch.Tensor:
        """``quantize`` then ``dequantize`` without encoding and packing the codes (GPTQ's per-column hot path).

        Values on the grid survive encode/decode exactly, so this equals the round trip (a property test checks
        it for every example format); with LoRC or a static activation scale it is the round trip itself.
        """
        if self.lorc_rank or (self.act is not None and self.act.static) or set(params) - {"scale"}:
            return super().fake_quantize(W, **params)
        check_weight(W)
        self.validate_shape(tuple(W.shape))
        scale = params["scale"] if "scale" in params else self.params(W)["scale"]
        S = _expand_rows(scale.to(torch.float32), W.shape[1], self.granularity, self._gs(W.shape[1]))
        return (round_to_grid(W.to(torch.float32) / S, self.grid) * S).to(W.dtype)

    def codes(self, q: QuantizedTensor) -> torch.Tensor:
        """The ``(out, in)`` integer codes of a quantized weight."""
        c = q["qdata"]
        return _unpack4(c, q.shape[1]) if self._packed else c

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        n_out, n_in = q.shape
        v = self.grid.decode(self.codes(q))
        W = v * _expand_rows(q["scale"], n_in, self.granularity, self._gs(n_in))
        if self.lorc_rank:
            W = W + q["lora_b"].to(torch.float32) @ q["lora_a"].to(torch.float32)
        return W.to(q.dtype)

    def torch_float8(self) -> torch.dtype | None:
        """The torch float8 dtype whose codes this grid shares (E4M3 "fn", E5M2 "ieee", IEEE bias), else None."""
        key = (self.exponent_bits, self.mantissa_bits, self.special, self.bias)
        return {(4, 3, "fn", None): torch.float8_e4m3fn, (5, 2, "ieee", None): torch.float8_e5m2}.get(key)

    def linear(self, x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ Wᵀ + b`` with the activations quantized as ``act`` says (weight-only when ``act`` is None).

        FP8 × FP8 (torch-native E4M3/E5M2 weights and activations, per-tensor/channel scales, no LoRC) runs
        ``torch._scaled_mm`` where this build has it; everything else, and the oracle, is :func:`act_linear`.
        """
        if self.act is not None and _scaled_mm_ok(self, q, x):
            return fp8_scaled_linear(x, q, bias)
        return act_linear(x, self.dequantize(q).to(x.dtype), bias, self.act, q.get("act_scale"))

    @classmethod
    def examples(cls) -> list[Format]:
        return [cls.preset("e4m3"), cls.preset("e5m2"), cls.preset("e3m4"), cls.preset("e2m5"),
                cls.preset("e2m1", granularity="group", group_size=32),
                cls.preset("e2m1", granularity="group", group_size=64, pow2_scale="row"),
                cls.preset("e4m3", granularity="tensor", scale_search=True)]


def _scaled_mm_ok(fmt: Minifloat, q: QuantizedTensor, x: torch.Tensor) -> bool:
    if not hasattr(torch, "_scaled_mm") or fmt.lorc_rank or fmt.granularity == "group" or fmt.act is None:
        return False
    if fmt.torch_float8() is None or fmt.act.dtype not in ("e4m3", "e5m2"):
        return False
    m = x.numel() // x.shape[-1]
    return m % 16 == 0 and q.shape[0] % 16 == 0 and q.shape[1] % 16 == 0  # the layouts CUDA's kernel accepts


def fp8_scaled_linear(x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """FP8 W8A8 with ``torch._scaled_mm``: ``(s_x ⊗ s_w) · (X_fp8 W_fp8ᵀ)``, fp32 accumulation.

    Args:
        x: ``(..., in)``; q: a :class:`Minifloat` weight with a torch float8 grid and ``act`` set.
    """
    fmt: Minifloat = q.format  # type: ignore[assignment]
    assert fmt.act is not None
    x2 = x.reshape(-1, x.shape[-1])
    xv, sx = quantize_activation(x2, fmt.act, q.get("act_scale"))
    adt = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt.act.dtype]
    xf8 = xv.to(adt)  # exact: xv lies on the grid
    wdt = fmt.torch_float8()
    wf8 = q["qdata"].view(wdt)  # type: ignore[arg-type]
    n_out = q.shape[0]
    sw = q["scale"].reshape(1, -1).expand(1, n_out).contiguous().to(torch.float32)
    sa = sx.reshape(-1, 1).expand(x2.shape[0], 1).contiguous().to(torch.float32)
    try:
        y = torch._scaled_mm(xf8, wf8.t(), scale_a=sa, scale_b=sw, out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError):
        y = (xv * sa) @ (fmt.grid.decode(q["qdata"]) * sw.reshape(-1, 1)).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)


def _pack4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the input dimension (low nibble first); odd widths are zero-padded."""
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def _unpack4(packed: torch.Tensor, n_in: int) -> torch.Tensor:
    out = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1)
    return out[:, :n_in]
