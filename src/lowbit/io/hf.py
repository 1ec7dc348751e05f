"""Small compatibility layer over transformers 4.4x and 5.x (the GPU machine runs 5.17, CI the latest)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

__all__ = ["transformers_major", "dtype_kwarg"]


@lru_cache(maxsize=1)
def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``{"dtype": ...}`` on transformers 5, ``{"torch_dtype": ...}`` on 4."""
    return {"dtype": dtype} if transformers_major() >= 5 else {"torch_dtype": dtype}
