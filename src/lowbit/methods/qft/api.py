"""``QFTConfig``: quantized full-parameter tuning (arXiv 2310.07147): int8 weights, gradients and momentum.

``opt = apply_qft(model, QFTConfig.for_bits(8), lr=1e-4)`` replaces every ``nn.Linear`` (``lm_head``
included: all parameters train) and ``nn.Embedding`` by int8 dense-and-sparse layers and returns
:class:`QFTLion`, the optimizer that owns their int8 gradients and momentum. Train with the usual
``loss.backward(); opt.step(); opt.zero_grad()``.

The weight gradient never lands in an fp32 ``.grad``: each layer's autograd function computes it in
backward, quantizes it to int8 block-wise at once and pushes it on the optimizer's stack (the paper's
stack-based gradient flow, O(1) per layer); :meth:`QFTLion.step` pops them. Parameters that are not
weights of those layers (norms) are small and keep fp32 weights and momentum. :meth:`QFTLion.model_state_bytes`
counts every byte of weights, gradients and optimizer state; fp32 AdamW needs 16 bytes per parameter.

:func:`to_quant_linear` exports a trained layer as ``QuantLinear`` in ``Outliers(Int8Rowwise)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.base import Format, QuantizedTensor
from lowbit.methods.base import MethodConfig
from lowbit.methods.qft.core import dense_sparse_split, dense_sparse_weight, round_codes, row_scale
from lowbit.optim.blockwise import dequantize_blockwise, quantize_blockwise, state_codebook
from lowbit.optim.core import lion_rule

__all__ = ["QFTConfig", "QFTLinear", "QFTEmbedding", "QFTLion", "apply_qft", "adamw_fp32_state_bytes"]


class _Int8DenseSparse(nn.Module):
    """Shared storage: ``qdata`` int8 ``(rows, cols)``, ``scale`` fp32 ``(rows, 1)``, ``outlier_idx`` int32
    flat indices and ``outlier_val`` fp32 of the critical entries."""

    def __init__(self, W: torch.Tensor, outlier_fraction: float) -> None:
        super().__init__()
        D, idx, val = dense_sparse_split(W.detach(), outlier_fraction)
        s = row_scale(D)
        self.register_buffer("qdata", round_codes(D / s, stochastic=False))
        self.register_buffer("scale", s)
        self.register_buffer("outlier_idx", idx.to(torch.int32))
        self.register_buffer("outlier_val", val.float())
        # A zero-size trainable anchor makes autograd call our backward even when the input needs no grad.
        self.anchor = nn.Parameter(torch.zeros(0))
        self.stack: list[tuple[Any, ...]] | None = None

    def weight_fp32(self) -> torch.Tensor:
        return dense_sparse_weight(self.qdata, self.scale, self.outlier_idx.long(), self.outlier_val)

    def push_grad(self, G: torch.Tensor) -> None:
        if self.stack is None:
            raise RuntimeError("QFT layer has no optimizer stack; build the optimizer with apply_qft/QFTLion")
        idx = self.outlier_idx.long()
        g_out = G.reshape(-1)[idx].float().clone()
        code = state_codebook(8, signed=True, device=G.device)
        qg, absmax = quantize_blockwise(G, code, 256, 8)
        self.stack.append((self, qg, absmax, g_out))

    def state_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in (self.qdata, self.scale, self.outlier_idx, self.outlier_val))


class _QFTLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, layer: "QFTLinear") -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        W = layer.weight_fp32().to(x.dtype)
        return nn.functional.linear(x, W, None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        W = layer.weight_fp32().to(g.dtype)  # recomputed, not saved: no fp32 copy lives between passes
        layer.push_grad(g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float())
        return (g @ W if ctx.needs_input_grad[0] else None), None, None


class _QFTEmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, anchor: torch.Tensor, layer: "QFTEmbedding") -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(ids)
        return nn.functional.embedding(ids, layer.weight_fp32(), layer.padding_idx)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        layer = ctx.layer
        G = torch.zeros(layer.num_embeddings, layer.embedding_dim, dtype=torch.float32, device=g.device)
        G.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]).float())
        if layer.padding_idx is not None:
            G[layer.padding_idx] = 0
        layer.push_grad(G)
        return None, None, None


class QFTLinear(_Int8DenseSparse):
    """``y = x @ Wᵀ + b`` with ``W`` int8 dense-and-sparse; its gradient goes int8 onto the optimizer stack."""

    def __init__(self, linear: nn.Linear, outlier_fraction: float) -> None:
        super().__init__(linear.weight, outlier_fraction)
        self.out_features, self.in_features = linear.out_features, linear.in_features
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QFTLinearFn.apply(x, self.anchor, self)

    def to_quant_linear(self) -> Any:
        """Export as ``QuantLinear`` in ``Outliers(Int8Rowwise, fp32 values)`` (bit-exact dequantization)."""
        from lowbit.formats.int8_rowwise import Int8Rowwise
        from lowbit.formats.outliers import Outliers
        from lowbit.nn.linear import QuantLinear

        fmt = Outliers(base=Int8Rowwise(), value_dtype=torch.float32)
        W = self.weight_fp32()
        mask = torch.zeros(W.numel(), dtype=torch.bool)
        mask[self.outlier_idx.long()] = True
        q = fmt.quantize(W, outlier_mask=mask.view_as(W), scale=self.scale.reshape(-1))
        return QuantLinear(q, None if self.bias is None else self.bias.detach())


class QFTEmbedding(_Int8DenseSparse):
    """An embedding table stored int8 dense-and-sparse (rows = tokens, scale per row)."""

    def __init__(self, emb: nn.Embedding, outlier_fraction: float) -> None:
        super().__init__(emb.weight, outlier_fraction)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx = emb.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _QFTEmbeddingFn.apply(ids, self.anchor, self)


class QFTLion(torch.optim.Optimizer):
    """Lion over int8 dense-and-sparse layers (int8 momentum and gradients) and fp32 small parameters.

    Args:
        layers: the QFT layers; their gradients arrive on this optimizer's stack.
        params: the remaining trainable float parameters (norms, biases): fp32 Lion.
        lr, betas, weight_decay: Lion's η, (β1, β2), λ (arXiv 2302.06675 defaults betas (0.9, 0.99)).
        stochastic: stochastic rounding of updated dense weights (False: nearest — the control that stalls).
        block_size: block of the int8 gradient and momentum codes.
        seed: seeds the stochastic rounding.
    """

    def __init__(self, layers: Sequence[_Int8DenseSparse], params: Iterable[nn.Parameter], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0, *, stochastic: bool = True,
                 block_size: int = 256, seed: int = 0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.layers = list(layers)
        anchors = [m.anchor for m in self.layers]
        self._float = [p for p in params if p.requires_grad]
        super().__init__(self._float + anchors, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self.stack: list[tuple[Any, ...]] = []
        for m in self.layers:
            m.stack = self.stack
        self.stochastic, self.block_size = stochastic, block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.code = state_codebook(8, signed=True)
        self.m_int8: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.m_fp32: dict[int, torch.Tensor] = {}

    def float_params(self) -> list[nn.Parameter]:
        return list(self._float)

    def n_params(self) -> int:
        return sum(m.qdata.numel() for m in self.layers) + sum(p.numel() for p in self._float)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.stack.clear()
        for p in self._float:
            p.grad = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        group = self.param_groups[0]
        lr, (β1, β2), λ = group["lr"], group["betas"], group["weight_decay"]
        for p in self._float:
            if p.grad is None:
                continue
            m = self.m_fp32.setdefault(id(p), torch.zeros_like(p, dtype=torch.float32))
            θ = p.detach().float()
            lion_rule(θ, p.grad.float(), m, lr=lr, β1=β1, β2=β2, λ=λ)
            p.copy_(θ)
        grads: dict[int, tuple[_Int8DenseSparse, torch.Tensor, torch.Tensor]] = {}
        while self.stack:
            layer, qg, absmax, g_out = self.stack.pop()
            G = dequantize_blockwise(qg, absmax, self.code, layer.qdata.shape, self.block_size, 8)
            idx = layer.outlier_idx.long()
            if idx.numel():
                G.view(-1)[idx] = g_out
            if id(layer) in grads:  # a layer used twice in one forward (tied weights): gradients add
                G = G + grads[id(layer)][1]
            grads[id(layer)] = (layer, G, idx)
        for layer, G, idx in grads.values():
            self._update_layer(layer, G, idx, lr, β1, β2, λ)

    def _update_layer(self, layer: _Int8DenseSparse, G: torch.Tensor, idx: torch.Tensor, lr: float, β1: float,
                      β2: float, λ: float) -> None:
        shape = layer.qdata.shape
        key = id(layer)
        if key in self.m_int8:
            mq, mabs = self.m_int8[key]
            m = dequantize_blockwise(mq, mabs, self.code, shape, self.block_size, 8)
        else:
            m = torch.zeros(shape)
        θ = layer.weight_fp32()
        lion_rule(θ, G, m, lr=lr, β1=β1, β2=β2, λ=λ)
        self.m_int8[key] = quantize_blockwise(m, self.code, self.block_size, 8)
        if idx.numel():
            layer.outlier_val.copy_(θ.view(-1)[idx])
            θ.view(-1)[idx] = 0
        layer.qdata.copy_(round_codes(θ / layer.scale, self.stochastic, self.generator))

    def model_state_bytes(self) -> int:
        """Bytes of weights + gradients + optimizer state over everything that trains (gradients at their
        int8 size, as they sit on the stack between backward and step)."""
        total = 0
        for m in self.layers:
            n = m.qdata.numel()
            n_blocks = -(-n // self.block_size)
            grad = n + 4 * n_blocks + 4 * m.outlier_idx.numel()
            momentum = n + 4 * n_blocks
            total += m.state_bytes() + grad + momentum
        total += sum(3 * p.numel() * 4 for p in self._float)  # fp32 weight, grad, momentum
        return total


def adamw_fp32_state_bytes(model: nn.Module) -> int:
    """Model-state bytes of plain fp32 AdamW training: weight, grad, m, v = 16 bytes per parameter."""
    return 16 * sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class QFTConfig(MethodConfig):
    """QFT settings.

    Attributes:
        format: ``Outliers(Int8Rowwise)``, the dense-and-sparse int8 weight.
        outlier_fraction: share of largest-magnitude weights kept fp32 (ρ).
        stochastic: stochastic rounding of weight updates (the paper's point; False is the control).
    """

    kind: ClassVar[str] = "qft"
    bits_choices: ClassVar[tuple[int, ...]] = (8,)
    summary: ClassVar[str] = "QFT: full-parameter tuning with int8 weights, gradients and Lion momentum"
    paper: ClassVar[str] = "arXiv:2310.07147"

    format: Format
    outlier_fraction: float = 0.005
    stochastic: bool = True

    def __post_init__(self) -> None:
        from lowbit.formats.outliers import Outliers

        if not isinstance(self.format, Outliers):
            raise TypeError(f"QFTConfig.format must be Outliers(base=Int8Rowwise()), got {type(self.format).__name__}")
        if not isinstance(self.outlier_fraction, (int, float)) or not 0.0 <= self.outlier_fraction < 0.5:
            raise ConfigError(f"outlier_fraction must be in [0, 0.5), got {self.outlier_fraction!r}")

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """The dense-and-sparse int8 starting point of one weight."""
        D, idx, _ = dense_sparse_split(W.detach(), self.outlier_fraction)
        mask = torch.zeros(W.numel(), dtype=torch.bool)
        mask[idx] = True
        return self.format.quantize(W, outlier_mask=mask.view_as(W), scale=row_scale(D).reshape(-1))

    @classmethod
    def for_bits(cls, bits: int = 8, group_size: int | None = None, **options: Any) -> "QFTConfig":
        from lowbit.formats.int8_rowwise import Int8Rowwise
        from lowbit.formats.outliers import Outliers

        cls.check_bits(bits)
        return cls(format=Outliers(base=Int8Rowwise(), value_dtype=torch.float32), **options)


def apply_qft(model: nn.Module, config: QFTConfig, *, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
              weight_decay: float = 0.0, seed: int = 0) -> QFTLion:
    """Convert every ``nn.Linear`` and ``nn.Embedding`` of ``model`` to int8 dense-and-sparse, in place, and
    return the :class:`QFTLion` that trains all parameters."""
    from lowbit.model.walk import set_submodule

    layers: list[_Int8DenseSparse] = []
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear or Embedding layer for QFT")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied:
        raise ValueError("QFT does not support tied input/output embeddings yet; untie them first")
    for name, mod in targets:
        new = (QFTLinear(mod, config.outlier_fraction) if isinstance(mod, nn.Linear)
               else QFTEmbedding(mod, config.outlier_fraction))
        set_submodule(model, name, new)
        layers.append(new)
    for p in model.parameters():
        p.requires_grad_(True)
    rest = [p for n, p in model.named_parameters() if not n.endswith(".anchor")]
    return QFTLion(layers, rest, lr=lr, betas=betas, weight_decay=weight_decay, stochastic=config.stochastic,
                   seed=seed)
