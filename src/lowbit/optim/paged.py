"""Paged (offloaded) optimizer state: kept in CPU memory between steps, on the GPU only while it is used.

QLoRA (arXiv 2305.14314, Sec. 3 "Paged Optimizers") pages optimizer state with CUDA unified memory so that
memory spikes do not run out of GPU memory. We do the explicit form of the same idea: the state of a CUDA
parameter with at least ``PAGE_MIN_NUMEL`` elements lives in pinned (page-locked) CPU memory; each step
copies it to the GPU without blocking the host, updates it there, and copies it back on the same stream,
so the next copy in is ordered after the copy out. The host waits for the stream once, at the end of
``step()``, before it may read the state (``state_dict()``, tests). Only one parameter's state is on the
GPU at a time. On CPU there is nothing to page: the optimizer logs a warning once and keeps state in place.

Plain (non-managed) allocations only: pinned host memory plus ordinary device tensors.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["PAGE_MIN_NUMEL", "StatePager"]

logger = logging.getLogger(__name__)

# bitsandbytes pages only tensors of at least 1e5 elements: smaller ones cost more in copy latency than
# they save in GPU memory.
PAGE_MIN_NUMEL = 100_000


class StatePager:
    """Decides where a parameter's state is stored and moves it for the update.

    Args:
        enabled: whether paging was asked for.
        min_numel: parameters smaller than this keep their state on the GPU.
    """

    def __init__(self, enabled: bool, min_numel: int = PAGE_MIN_NUMEL) -> None:
        self.enabled = enabled
        self.min_numel = min_numel
        self._warned_cpu = False
        self._streams: set[torch.device] = set()

    def is_paged(self, param: torch.Tensor) -> bool:
        """True when ``param``'s state is kept in CPU memory between steps."""
        if not self.enabled:
            return False
        if param.device.type != "cuda":
            if not self._warned_cpu:
                logger.warning("paged optimizer state needs a CUDA device; parameter on %s keeps its state "
                               "in place (plain, non-paged behaviour)", param.device)
                self._warned_cpu = True
            return False
        return param.numel() >= self.min_numel

    def storage_device(self, param: torch.Tensor, paged: bool) -> torch.device:
        return torch.device("cpu") if paged else param.device

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, param: torch.Tensor,
              paged: bool) -> torch.Tensor:
        """A zeroed state tensor in its storage place (pinned CPU memory when paged)."""
        if paged:
            return torch.zeros(shape, dtype=dtype, device="cpu", pin_memory=True)
        return torch.zeros(shape, dtype=dtype, device=param.device)

    def store(self, value: torch.Tensor, param: torch.Tensor, paged: bool) -> torch.Tensor:
        """A copy of ``value`` (same dtype, bit for bit) in its storage place, e.g. after ``load_state_dict``."""
        if paged:
            out = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=True)
            out.copy_(value)
            return out
        return value.to(device=param.device, copy=True)

    def fetch(self, stored: torch.Tensor, param: torch.Tensor, paged: bool) -> torch.Tensor:
        """The tensor to compute with: ``stored`` itself, or its copy on the parameter's GPU."""
        if not paged:
            return stored
        self._streams.add(param.device)
        return stored.to(param.device, non_blocking=True)

    def write_back(self, stored: torch.Tensor, computed: torch.Tensor, paged: bool) -> None:
        """Copy an updated state back to its storage (no-op when it was updated in place)."""
        if computed is not stored:
            stored.copy_(computed, non_blocking=paged)

    def finish(self) -> None:
        """Wait for outstanding device-to-host copies so that host code may read paged state."""
        for device in self._streams:
            torch.cuda.current_stream(device).synchronize()
        self._streams.clear()
