"""Where a model keeps its decoder blocks: a data table, not a file per architecture.

:data:`BLOCK_PATHS` lists attribute paths of the ``nn.ModuleList`` that holds the repeated decoder blocks in
the model families lowbit knows (Llama, Mistral, Qwen2 and other transformers ``*ForCausalLM`` models keep them
at ``model.layers``). :func:`find_blocks` tries the paths in order and falls back to the largest
``ModuleList`` of identical module types, so an unlisted architecture usually still works.

Inside a block, :func:`linear_stages` splits the Linear layers into "true sequential" stages (GPTQ,
arXiv 2210.17323, ``--true-sequential``): layers that read the same input tensor form one stage (q/k/v, then o,
then gate/up, then down), found by watching one forward pass, with no per-architecture names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

__all__ = ["BLOCK_PATHS", "find_blocks", "linear_stages"]

BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",            # Llama, Mistral, Qwen2/3, Gemma, Phi-3 (transformers *ForCausalLM)
    "model.language_model.layers",  # multimodal wrappers in transformers 5.x
    "layers",                  # bare *Model (LlamaModel)
    "model.decoder.layers",    # OPT
    "transformer.h",           # GPT-2, GPT-J, Falcon, BLOOM
    "gpt_neox.layers",         # GPT-NeoX, Pythia
    "transformer.blocks",      # MPT
)
"""Attribute paths of the decoder-block ``ModuleList``, tried in order."""


def _get_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module, paths: Sequence[str] = BLOCK_PATHS) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_name, blocks)`` of the model's decoder blocks.

    Args:
        model: a decoder language model.
        paths: attribute paths to try first (default :data:`BLOCK_PATHS`).

    Raises:
        ValueError: if no ``ModuleList`` of blocks is found; the message lists the paths tried.
    """
    for path in paths:
        obj = _get_path(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path, obj
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            if any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                if best is None or len(mod) > len(best[1]):
                    best = (name, mod)
    if best is None:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}; tried attribute paths "
                         f"{list(paths)} and found no ModuleList of identical blocks holding Linear layers")
    return best


def linear_stages(block: nn.Module, names: Sequence[str], run: Callable[[], Any]) -> list[list[str]]:
    """Group the Linear layers ``names`` (relative to ``block``) into true-sequential stages.

    Watches one call of ``run()`` (which must run ``block`` forward at least once): layers called with the same
    input tensor share a stage; stages are ordered by first call. Layers never called form a last stage.

    Returns:
        A list of stages, each a list of names in ``names`` order.
    """
    order: list[str] = []
    input_of: dict[str, Any] = {}  # kept alive during run() so identities cannot be recycled
    seen: set[str] = set()
    wanted = set(names)
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            if name in seen:
                return
            seen.add(name)
            order.append(name)
            input_of[name] = args[0] if args else object()
        return hook

    for name, mod in block.named_modules():
        if name in wanted:
            handles.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    for name in order:
        if stages and input_of[stages[-1][0]] is input_of[name]:
            stages[-1].append(name)
        else:
            stages.append([name])
    missing = [n for n in names if n not in seen]
    if missing:
        stages.append(missing)
    rank = {n: i for i, n in enumerate(names)}
    return [sorted(s, key=rank.__getitem__) for s in stages]
