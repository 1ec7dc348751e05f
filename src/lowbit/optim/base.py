"""The driver shared by every lowbit optimizer: state layout, quantization, overrides, NaN skip, paging.

8-bit optimizers via block-wise quantization (Dettmers et al., arXiv 2110.02861): each state tensor of a
parameter with at least ``min_8bit_size`` elements is stored block-wise quantized (:mod:`.blockwise`); per
step it is dequantized to fp32, updated by the family's rule (:mod:`.core`), and quantized again with the
new per-block absmax. Smaller parameters (biases, norms) keep fp32 state, as in bitsandbytes.

State of one parameter (``optimizer.state[p]``), all entries plain tensors or ints:

- ``step``: int, number of updates applied.
- ``bits``: 32, 8 or 4; ``block_size``: int (quantized only).
- per state slot ``name`` (e.g. ``exp_avg``): ``name`` (fp32, 32-bit) or ``name.qdata`` (uint8) and
  ``name.absmax`` (fp32, one per block). Codes are not stored: they are fixed by ``bits`` and the slot's sign.
- ``options``: per-parameter overrides set by :meth:`QuantStateOptimizer.override`, if any.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch

from lowbit.optim.blockwise import BLOCK_SIZES, dequantize_blockwise, quantize_blockwise, state_codebook
from lowbit.optim.paged import StatePager

__all__ = ["OPTIM_BITS", "QuantStateOptimizer", "state_nbytes"]

logger = logging.getLogger(__name__)

OPTIM_BITS: tuple[int, ...] = (4, 8, 32)
_OPTION_KEYS: tuple[str, ...] = ("optim_bits", "block_size", "min_8bit_size")


def state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by all tensors in ``optimizer.state`` (any torch optimizer), nested dicts included."""

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        return 0

    return sum(walk(s) for s in optimizer.state.values())


def _check_options(options: dict[str, Any]) -> None:
    unknown = set(options) - set(_OPTION_KEYS)
    if unknown:
        raise ValueError(f"unknown state option(s) {sorted(unknown)}; valid: {list(_OPTION_KEYS)}")
    bits = options.get("optim_bits", 32)
    if bits not in OPTIM_BITS:
        raise ValueError(f"optim_bits={bits!r} is not supported; choose one of {OPTIM_BITS}")
    block = options.get("block_size", 256)
    if block not in BLOCK_SIZES:
        raise ValueError(f"block_size={block!r} is not supported; choose one of {BLOCK_SIZES}")
    size = options.get("min_8bit_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"min_8bit_size={size!r} must be an int >= 0")


def check_hyper(name: str, value: Any, low: float, high: float | None = None, *, open_high: bool = False) -> None:
    """Raise ValueError unless ``low <= value`` (``< high`` or ``<= high``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name}={value!r} must be a real number")
    ok = value >= low and (high is None or (value < high if open_high else value <= high))
    if not ok:
        bound = "" if high is None else (f" and < {high}" if open_high else f" and <= {high}")
        raise ValueError(f"{name}={value!r} out of range; valid: >= {low}{bound}")


class QuantStateOptimizer(torch.optim.Optimizer):
    """Base of all lowbit optimizers; a family defines ``slots`` and :meth:`_update`.

    Args:
        params: parameters or param groups. A group may set ``optim_bits``, ``block_size`` and
            ``min_8bit_size`` of its own (e.g. ``{"params": emb.parameters(), "optim_bits": 32}``).
        defaults: the family's hyper-parameters.
        optim_bits: 32, 8 or 4: width of the stored state.
        block_size: elements per quantization block (256 default; 2048 as in the paper).
        min_8bit_size: parameters with fewer elements keep 32-bit state.
        paged: keep state of large CUDA parameters in pinned CPU memory between steps (:mod:`.paged`).
    """

    #: (state name, signed) per state tensor of the family, e.g. (("exp_avg", True), ("exp_avg_sq", False)).
    slots: ClassVar[tuple[tuple[str, bool], ...]] = ()

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, optim_bits: int = 32,
                 block_size: int = 256, min_8bit_size: int = 4096, paged: bool = False) -> None:
        options = {"optim_bits": optim_bits, "block_size": block_size, "min_8bit_size": min_8bit_size}
        _check_options(options)
        self._pager = StatePager(bool(paged))
        self._warned_nonfinite = False
        self.skipped: int = 0  # parameter updates skipped for non-finite gradients
        super().__init__(params, {**defaults, **options})

    # -- configuration ---------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _check_options({k: param_group[k] for k in _OPTION_KEYS if k in param_group})
        super().add_param_group(param_group)

    def override(self, param: torch.Tensor, **options: Any) -> None:
        """Per-parameter state options, e.g. ``opt.override(model.embed.weight, optim_bits=32)``.

        Options: ``optim_bits``, ``block_size``, ``min_8bit_size``. If the parameter already has state, it is
        converted to the new layout (dequantized, then stored again), so training continues.
        """
        _check_options(options)
        if not any(param is p for g in self.param_groups for p in g["params"]):
            raise ValueError(f"override: parameter of shape {tuple(param.shape)} is not in this optimizer")
        state = self.state[param]
        merged = {**state.get("options", {}), **options}
        if "step" not in state:
            state["options"] = merged
            return
        group = next(g for g in self.param_groups if any(param is p for p in g["params"]))
        paged = self._pager.is_paged(param)
        values = self._load(param, state, paged)
        values = [v.clone() for v in values]
        state["options"] = merged
        for name, _ in self.slots:
            for key in (name, f"{name}.qdata", f"{name}.absmax"):
                state.pop(key, None)
        self._layout(param, group, state, paged)
        self._store(param, state, values, paged)
        self._pager.finish()

    def override_modules(self, model: torch.nn.Module, types: type | tuple[type, ...] = torch.nn.Embedding,
                         **options: Any) -> int:
        """:meth:`override` every parameter of ``model``'s modules of ``types`` that this optimizer holds.

        E.g. ``opt.override_modules(model, torch.nn.Embedding, optim_bits=32)`` keeps embedding state in 32 bits,
        as the 8-bit optimizer paper recommends (arXiv 2110.02861, Sec. 2.3). Returns the number of parameters.
        """
        held = {id(p) for g in self.param_groups for p in g["params"]}
        count = 0
        for module in model.modules():
            if isinstance(module, types):
                for param in module.parameters(recurse=False):
                    if id(param) in held:
                        self.override(param, **options)
                        count += 1
        return count

    def _options(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> tuple[int, int]:
        opts = {k: group[k] for k in _OPTION_KEYS}
        opts.update(state.get("options", {}))
        bits = 32 if param.numel() < max(1, opts["min_8bit_size"]) else opts["optim_bits"]
        return bits, opts["block_size"]

    # -- state layout ----------------------------------------------------------------------------------
    def _active_slots(self, group: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
        """Slots this group needs (SGD without momentum needs none)."""
        return self.slots

    def _layout(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any], paged: bool) -> None:
        bits, block = self._options(param, group, state)
        state["bits"] = bits
        if bits != 32:
            state["block_size"] = block
        else:
            state.pop("block_size", None)
        n = param.numel()
        n_blocks = -(-n // block)
        for name, _ in self._active_slots(group):
            if bits == 32:
                state[name] = self._pager.empty(param.shape, torch.float32, param, paged)
            else:
                q_len = n if bits == 8 else (n + 1) // 2
                state[f"{name}.qdata"] = self._pager.empty((q_len,), torch.uint8, param, paged)
                state[f"{name}.absmax"] = self._pager.empty((max(1, n_blocks),), torch.float32, param, paged)

    def _present_slots(self, state: dict[str, Any]) -> list[tuple[str, bool]]:
        return [(n, signed) for n, signed in self.slots if n in state or f"{n}.qdata" in state]

    def _load(self, param: torch.Tensor, state: dict[str, Any], paged: bool) -> list[torch.Tensor]:
        """fp32 state tensors on the parameter's device, in slot order."""
        out = []
        for name, signed in self._present_slots(state):
            if state["bits"] == 32:
                out.append(self._pager.fetch(state[name], param, paged))
            else:
                qdata = self._pager.fetch(state[f"{name}.qdata"], param, paged)
                absmax = self._pager.fetch(state[f"{name}.absmax"], param, paged)
                code = state_codebook(state["bits"], signed, param.device)
                out.append(dequantize_blockwise(qdata, absmax, code, param.shape, state["block_size"],
                                                state["bits"]))
        return out

    def _store(self, param: torch.Tensor, state: dict[str, Any], values: list[torch.Tensor], paged: bool) -> None:
        for (name, signed), value in zip(self._present_slots(state), values, strict=True):
            if state["bits"] == 32:
                self._pager.write_back(state[name], value, paged)
            else:
                code = state_codebook(state["bits"], signed, value.device)
                # unsigned = a second moment: never stored as 0 (see blockwise's module docstring)
                qdata, absmax = quantize_blockwise(value, code, state["block_size"], state["bits"],
                                                   keep_nonzero=not signed)
                self._pager.write_back(state[f"{name}.qdata"], qdata, paged)
                self._pager.write_back(state[f"{name}.absmax"], absmax, paged)

    # -- the step --------------------------------------------------------------------------------------
    def _fused_step(self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, Any], group: dict[str, Any],
                    paged: bool) -> bool:
        """A family may run the whole step as one fused kernel; returns whether it did (default: never)."""
        return False

    def _update(self, param: torch.Tensor, grad: torch.Tensor, states: list[torch.Tensor],
                group: dict[str, Any], step: int) -> None:
        """Apply the family's rule in place on fp32 ``param`` and ``states``."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient.

        A parameter whose gradient holds NaN or Inf is left unchanged (weights, state and step count);
        the first such skip is logged as a warning, later ones at debug level; ``self.skipped`` counts them.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._step_param(p, p.grad, group)
        self._pager.finish()
        return loss

    def _step_param(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients (parameter of shape "
                            f"{tuple(p.shape)}); use dense gradients")
        if not bool(torch.isfinite(grad).all()):
            self.skipped += 1
            level = logging.DEBUG if self._warned_nonfinite else logging.WARNING
            logger.log(level, "%s: non-finite gradient for parameter of shape %s; update skipped "
                       "(weights and optimizer state unchanged)", type(self).__name__, tuple(p.shape))
            self._warned_nonfinite = True
            return
        state = self.state[p]
        paged = self._pager.is_paged(p)
        if "step" not in state:
            state["step"] = 0
            self._layout(p, group, state, paged)
        if self._fused_step(p, grad, state, group, paged):
            return
        states = self._load(p, state, paged)
        state["step"] += 1
        θ = p.data if p.dtype == torch.float32 else p.data.float()
        self._update(θ, grad.float(), states, group, state["step"])
        if θ is not p.data:
            p.data.copy_(θ)
        self._store(p, state, states, paged)

    # -- save / load -----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict exactly: quantized codes stay uint8 and fp32 state stays fp32.

        torch's default casts every state tensor to the parameter's dtype, which would turn uint8 codes
        into floats (torchao issue #3314); we let it restore the groups, then put each tensor back as saved.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for idx, p in zip(ids, params, strict=True):
            if idx not in saved:
                continue
            paged = self._pager.is_paged(p)
            self.state[p] = {k: (self._pager.store(v, p, paged) if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                             for k, v in saved[idx].items()}

    def state_nbytes(self) -> int:
        """Bytes of all state tensors of this optimizer."""
        return state_nbytes(self)
