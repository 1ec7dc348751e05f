"""Symmetric int8 weights with one absmax scale per output row (or per tensor), optionally with int8 inputs.

This is the storage of LLM.int8() (Dettmers et al., arXiv 2208.07339, Sec. 3: vector-wise quantization) and of
SmoothQuant's W8A8 (Xiao et al., arXiv 2211.10438, Table 2: O1-O3):

* ``qdata: (out, in) int8 = round(W / scale)`` in ``[-127, 127]``; ``scale: (out,)`` or ``(1,)`` float32
  ``= max|W_row| / 127`` (bitsandbytes stores ``SCB = 127·scale``).
* ``act``: how inputs are quantized at the matmul; int8 inputs run an int8 × int8 → int32 GEMM
  (``torch._int_mm`` where it runs, else an exact reference) and are rescaled by ``s_x ⊗ s_w``.
* ``threshold`` (LLM.int8()'s mixed-precision decomposition, Sec. 3.2): input columns holding any
  ``|x| ≥ threshold`` run in the input's float precision against the weight's dequantized columns (as
  bitsandbytes does), the rest in int8. 0 disables it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lowbit.formats.act_quant import ActQuant, act_linear, int8_matmul, quantize_activation
from lowbit.formats.base import Format, QuantizedTensor, check_weight

__all__ = ["Int8Rowwise", "w8a8_matmul", "int8_mixed_linear"]

GRANULARITIES = ("channel", "tensor")


@dataclass(frozen=True)
class Int8Rowwise(Format):
    """int8 absmax weights per output channel (or tensor); W8A8 when ``act`` is set.

    Args:
        granularity: ``"channel"`` (one scale per output row) or ``"tensor"``.
        act: activation quantization (``ActQuant("int8", "token")`` for W8A8 O1); None for W8A16.
        threshold: LLM.int8() outlier threshold on ``|x|`` (needs int8 per-token ``act``); 0 disables.
    """

    kind: ClassVar[str] = "int8_rowwise"

    granularity: str = "channel"
    act: ActQuant | None = None
    threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity={self.granularity!r} unknown; valid choices: {list(GRANULARITIES)}")
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0 or self.threshold != self.threshold:
            raise ValueError(f"threshold={self.threshold!r} must be a number >= 0 (0 disables outlier columns)")
        if self.threshold > 0 and (self.act is None or self.act.dtype != "int8" or self.act.granularity != "token"):
            raise ValueError("threshold > 0 (LLM.int8() decomposition) needs act=ActQuant('int8', 'token'), "
                             f"got act={self.act!r}")

    @property
    def bits(self) -> int:
        return 8

    def tensor_names(self) -> tuple[str, ...]:
        return ("qdata", "scale", "act_scale") if self.act is not None and self.act.static else ("qdata", "scale")

    def validate_shape(self, shape: tuple[int, int]) -> None:
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"int8_rowwise stores 2-D weights, got shape {shape}")

    def params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        A = W.detach().abs().to(torch.float32)
        amax = A.amax(dim=1) if self.granularity == "channel" else A.amax().reshape(1)
        return {"scale": (amax / 127.0).clamp(min=1e-12)}

    def quantize(self, W: torch.Tensor, **params: torch.Tensor) -> QuantizedTensor:
        check_weight(W)
        unknown = set(params) - {"scale", "act_scale"}
        if unknown:
            raise ValueError(f"unknown int8_rowwise parameter(s) {sorted(unknown)}; valid: scale, act_scale")
        scale = params.get("scale")
        scale = (self.params(W)["scale"] if scale is None else scale).to(torch.float32).reshape(-1)
        qdata = torch.round(W.to(torch.float32) / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        data = {"qdata": qdata, "scale": scale}
        if "act_scale" in self.tensor_names():
            if "act_scale" not in params:
                raise ValueError("static activation quantization needs act_scale (calibrated); pass act_scale=...")
            data["act_scale"] = params["act_scale"].to(torch.float32).reshape(1)
        return QuantizedTensor(self, tuple(W.shape), W.dtype, data)

    def dequantize(self, q: QuantizedTensor) -> torch.Tensor:
        return (q["qdata"].to(torch.float32) * q["scale"].reshape(-1, 1)).to(q.dtype)

    def linear(self, x: torch.Tensor, q: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ Wᵀ + b``; int8 GEMM when inputs are int8 (with LLM.int8() outlier columns if ``threshold``)."""
        if self.act is None or self.act.dtype != "int8":
            return act_linear(x, self.dequantize(q).to(x.dtype), bias, self.act, q.get("act_scale"))
        x2 = x.reshape(-1, x.shape[-1])
        y = w8a8_matmul(x2, q["qdata"], q["scale"], self.act, q.get("act_scale"), self.threshold)
        if bias is not None:
            y = y + bias.to(torch.float32)
        return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])

    @classmethod
    def examples(cls) -> list[Format]:
        return [cls(), cls(granularity="tensor"), cls(act=ActQuant("int8", "token")),
                cls(act=ActQuant("int8", "token"), threshold=6.0)]


def w8a8_matmul(x: torch.Tensor, Wq: torch.Tensor, w_scale: torch.Tensor, act: ActQuant,
                act_scale: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """``(tokens, out)`` float32 product of ``x: (tokens, in)`` with int8 ``Wq: (out, in)`` (scales ``w_scale``)
    with int8 activations: LLM.int8()'s decomposition when ``threshold > 0``, else ``act``'s quantization of every
    column (per token, per tensor or static ``act_scale``); the int8 GEMM is :func:`int8_matmul` (``torch._int_mm``
    where it runs). The reference of ``Int8Rowwise.linear`` and of the CPU fast path."""
    if threshold > 0:
        return int8_mixed_linear(x, Wq, w_scale, threshold)
    xq, sx = quantize_activation(x, act, act_scale)
    return int8_matmul(xq, Wq.t()).to(torch.float32) * sx * w_scale.reshape(1, -1)


def int8_mixed_linear(x: torch.Tensor, Wq: torch.Tensor, w_scale: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8() matmul (arXiv 2208.07339, Eq. 3): ``X_O W_Oᵀ`` in float + ``s_x ⊗ s_w · (X_I8 W_I8ᵀ)``.

    Args:
        x: ``(tokens, in)`` float inputs.
        Wq: ``(out, in)`` int8 weights; ``w_scale: (out,)`` their scales.
        threshold: columns of ``x`` holding any ``|x| ≥ threshold`` form the outlier set ``O``.
    Returns:
        ``(tokens, out)`` float32.

    As bitsandbytes does, the per-token absmax ignores the outlier values themselves and the outlier weight
    columns are the dequantized int8 ones (the float weight is not kept).
    """
    xf = x.to(torch.float32)
    outl = xf.abs() >= threshold
    cols = torch.nonzero(outl.any(dim=0)).flatten()
    xin = xf.masked_fill(outl, 0.0)
    sx = (xin.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    xq = torch.round(xin / sx).clamp(-127, 127).to(torch.int8)
    if cols.numel():
        xq[:, cols] = 0
    y = int8_matmul(xq, Wq.t()).to(torch.float32) * sx * w_scale.reshape(1, -1)
    if cols.numel():
        W_o = Wq[:, cols].to(torch.float32) * w_scale.reshape(-1, 1)
        y = y + xf[:, cols] @ W_o.t()
    return y
