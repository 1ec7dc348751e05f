"""LoRA adapters around any linear layer (``nn.Linear`` or :class:`~lowbit.nn.linear.QuantLinear`).

LoRA (Hu et al., arXiv 2106.09685) adds a trainable low-rank update beside a frozen weight::

    y = base(x) + s · B A dropout(x),    s = alpha / r,
    A: (r, in_features),  B: (out_features, r)

so the layer's effective weight is ``W + s·B A``. The base may be quantized (QLoRA, arXiv 2305.14314): its
weight stays frozen and only ``A`` and ``B`` train.

Naming follows peft so that adapters move between the two libraries unchanged: the wrapped layer is
``base_layer``, the factors are the ``nn.Linear`` modules ``lora_A`` and ``lora_B``, and a saved adapter file
holds ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` beside an ``adapter_config.json``
that peft's ``PeftModel.from_pretrained`` reads (:func:`save_adapter`).

A subclass may feed ``lora_A`` a transformed input (QA-LoRA pools it by quantization group) by overriding
:meth:`LoRALinear.adapter_input` and :meth:`LoRALinear.delta_weight`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.model.walk import DEFAULT_IGNORE, compile_patterns, set_submodule
from lowbit.nn.linear import QuantLinear

__all__ = ["LoRALinear", "LoRASpec", "add_lora", "lora_layers", "lora_parameters", "lora_state_dict",
           "save_adapter", "load_adapter", "merge_lora", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX"]

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, QuantLinear)


@dataclass(frozen=True)
class LoRASpec:
    """Shape of the adapters added to every selected layer.

    Attributes:
        r: rank of ``A`` and ``B`` (>= 1).
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter's input, in ``[0, 1)``.
    """

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.r


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``s·B A``.

    Args:
        base_layer: ``nn.Linear`` or ``QuantLinear`` with weight ``(out_features, in_features)``; its
            parameters are frozen.
        spec: rank, alpha and dropout.
        adapter_in_features: width of ``lora_A``'s input (default ``in_features``; QA-LoRA passes the
            number of groups).
    """

    def __init__(self, base_layer: nn.Module, spec: LoRASpec, adapter_in_features: int | None = None) -> None:
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"LoRA wraps nn.Linear or QuantLinear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.spec = spec
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        n_in = self.in_features if adapter_in_features is None else adapter_in_features
        dtype = _float_dtype(base_layer)
        self.lora_A = nn.Linear(n_in, spec.r, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(spec.r, self.out_features, bias=False, dtype=dtype)
        self.lora_dropout: nn.Module = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @property
    def scaling(self) -> float:
        return self.spec.scaling

    def reset_lora_parameters(self) -> None:
        """peft's default init: ``A`` as an ``nn.Linear`` (Kaiming uniform, a=√5), ``B = 0`` (so ΔW = 0)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Set ``A: (r, adapter_in)`` and ``B: (out_features, r)`` (e.g. from LoftQ)."""
        if tuple(A.shape) != tuple(self.lora_A.weight.shape) or tuple(B.shape) != tuple(self.lora_B.weight.shape):
            raise ValueError(f"LoRA factors must be A{tuple(self.lora_A.weight.shape)} and "
                             f"B{tuple(self.lora_B.weight.shape)}, got A{tuple(A.shape)} and B{tuple(B.shape)}")
        with torch.no_grad():
            self.lora_A.weight.copy_(A)
            self.lora_B.weight.copy_(B)

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """What ``lora_A`` sees: ``x`` itself for plain LoRA."""
        return x

    def lora_output(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B A dropout(x)``: ``x (..., in) -> (..., out)``."""
        h = self.adapter_input(self.lora_dropout(x)).to(self.lora_A.weight.dtype)
        return self.lora_B(self.lora_A(h)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.lora_output(x).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update to the weight, ``s · B A``: ``(out_features, in_features)``, fp32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight, dequantized if needed: ``(out_features, in_features)``, fp32."""
        if isinstance(self.base_layer, QuantLinear):
            return self.base_layer.dequantize().float()
        return self.base_layer.weight.detach().float()

    def merged_linear(self) -> nn.Linear:
        """A float ``nn.Linear`` whose weight is ``W + s·B A`` (base dequantized first if quantized)."""
        W = self.base_weight() + self.delta_weight().detach()
        bias = self.base_layer.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, dtype=torch.float32)
        with torch.no_grad():
            out.weight.copy_(W)
            if bias is not None:
                out.bias.copy_(bias.detach().float())
        return out

    def extra_repr(self) -> str:
        return f"r={self.spec.r}, alpha={self.spec.alpha}, dropout={self.spec.dropout}"


def _float_dtype(layer: nn.Module) -> torch.dtype:
    if isinstance(layer, QuantLinear):
        dt = layer.compute_dtype
    else:
        dt = layer.weight.dtype
    return dt if dt in (torch.float32, torch.float64) else torch.float32


def iter_linear(model: nn.Module, targets: Sequence[str] = ("Linear",),
                ignore: Sequence[str] = ()) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for each ``nn.Linear``/``QuantLinear`` selected, with :mod:`lowbit.model.walk`'s
    pattern rules (``"Linear"`` = every linear layer; ``lm_head`` and embeddings only when named)."""
    tpats = compile_patterns([t for t in targets if t != "Linear"], "target")
    all_linear = "Linear" in targets
    ipats, dpats = compile_patterns(ignore, "ignore"), compile_patterns(DEFAULT_IGNORE, "default ignore")
    inside_lora = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for name, mod in model.named_modules():
        if not isinstance(mod, LINEAR_TYPES) or any(name.startswith(p + ".") for p in inside_lora):
            continue
        explicit = any(p.search(name) for p in tpats)
        if not (explicit or all_linear) or any(p.search(name) for p in ipats):
            continue
        if not explicit and any(p.search(name) for p in dpats):
            continue
        yield name, mod


def add_lora(model: nn.Module, spec: LoRASpec, *, targets: Sequence[str] = ("Linear",), ignore: Sequence[str] = (),
             factory: Callable[[str, nn.Module, LoRASpec], LoRALinear] | None = None,
             freeze_base: bool = True) -> list[str]:
    """Wrap every selected linear layer of ``model`` in a :class:`LoRALinear`, in place.

    Args:
        model: any module; transformers models keep working (forward, generate, checkpointing).
        spec: rank, alpha, dropout.
        targets: regexes of module names, or ``"Linear"`` for all linear layers except ``lm_head``.
        ignore: regexes of module names to skip.
        factory: builds the wrapper for one layer (QA-LoRA, LoftQ pass their own); default ``LoRALinear``.
        freeze_base: freeze every parameter of ``model`` that is not a LoRA factor.

    Returns:
        The dotted names of the wrapped layers (peft's ``target_modules``).
    """
    if not isinstance(spec, LoRASpec):
        raise TypeError(f"spec must be a LoRASpec, got {type(spec).__name__}")
    layers = list(iter_linear(model, targets, ignore))
    if not layers:
        raise ValueError(f"no Linear/QuantLinear layer matched targets={list(targets)} ignore={list(ignore)}")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    make = factory or (lambda _n, layer, s: LoRALinear(layer, s))
    for name, layer in layers:
        set_submodule(model, name, make(name, layer, spec))
    log.info("added LoRA r=%d alpha=%g to %d layers", spec.r, spec.alpha, len(layers))
    return [n for n, _ in layers]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model`` by dotted name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors (``lora_A``/``lora_B`` weights) of ``model``."""
    out = []
    for m in lora_layers(model).values():
        out += [m.lora_A.weight, m.lora_B.weight]
    return out


def lora_state_dict(model: nn.Module, prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's key names: ``base_model.model.<path>.lora_{A,B}.weight``."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_layers(model).items():
        out[f"{prefix}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().clone()
        out[f"{prefix}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().clone()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike[str], *, base_model_name_or_path: str | None = None,
                 task_type: str = "CAUSAL_LM") -> str:
    """Save the adapters of ``model`` in peft's format (``adapter_config.json`` + ``adapter_model.safetensors``).

    peft's ``PeftModel.from_pretrained(base, path)`` loads the result onto the unquantized base. Only plain
    LoRA layers are peft-compatible; QA-LoRA's pooled ``lora_A`` has no peft equivalent with a merge and is
    refused here (save it with :func:`lora_state_dict`).

    Returns:
        The directory written.
    """
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save; call add_lora first")
    specs = {m.spec for m in layers.values()}
    if len(specs) != 1:
        raise ValueError(f"all LoRA layers must share one (r, alpha, dropout) for peft's config, got {sorted(map(str, specs))}")
    odd = [n for n, m in layers.items() if type(m).adapter_input is not LoRALinear.adapter_input]
    if odd:
        raise ValueError(f"layers {odd[:3]}... transform lora_A's input ({type(layers[odd[0]]).__name__}); "
                         "peft's LoRA format cannot describe them")
    spec = specs.pop()
    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "bias": "none",
        "target_modules": sorted(layers), "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    save_file(lora_state_dict(model), os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return str(path)


def load_adapter(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Wrap ``model``'s layers named in a peft adapter directory and load its factors, in place.

    Works for adapters written by :func:`save_adapter` or by peft (``save_pretrained``) with plain LoRA.
    """
    from safetensors.torch import load_file

    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"adapter at {path} has peft_type {cfg.get('peft_type')!r}; only 'LORA' is supported")
    tensors = load_file(os.path.join(path, ADAPTER_WEIGHTS))
    names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if k.startswith(PEFT_PREFIX)})
    spec = LoRASpec(r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=float(cfg.get("lora_dropout", 0.0)))
    targets = [f"^{re.escape(n)}$" for n in names]
    add_lora(model, spec, targets=targets)
    for n in names:
        m = model.get_submodule(n)
        assert isinstance(m, LoRALinear)
        m.set_factors(tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"])
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Replace each :class:`LoRALinear` by a float ``nn.Linear`` holding ``W + s·B A``, in place.

    A quantized base is dequantized first; re-quantize the result with ``quantize_`` (see
    :func:`lowbit.train.export.merge_and_quantize`, which also reports the error the re-quantization adds).
    """
    names = list(lora_layers(model))
    for name in names:
        m = model.get_submodule(name)
        set_submodule(model, name, m.merged_linear())
    return names
