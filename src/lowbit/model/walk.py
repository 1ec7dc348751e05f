"""Which layers to quantize: target and ignore patterns over module names.

Patterns are regular expressions matched with ``re.search`` against the module's dotted name, or the
literal ``"Linear"`` for every ``nn.Linear``. The language-model head and embeddings are left alone unless a
target names them explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["DEFAULT_IGNORE", "compile_patterns", "iter_targets", "set_submodule"]

DEFAULT_IGNORE: tuple[str, ...] = (r"(^|\.)lm_head$", r"(^|\.)embed_tokens$", r"(^|\.)wte$", r"(^|\.)embed_out$")


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns:
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what} pattern {p!r} is not a valid regular expression: {e}") from None
    return out


def iter_targets(model: nn.Module, targets: Sequence[str] = ("Linear",),
                 ignore: Sequence[str] = ()) -> Iterator[tuple[str, nn.Linear]]:
    """Yield ``(name, module)`` for each ``nn.Linear`` selected by ``targets`` and not by ``ignore``.

    A module excluded only by :data:`DEFAULT_IGNORE` is still selected when a target other than
    ``"Linear"`` names it (``targets=["lm_head"]``).
    """
    tpats = compile_patterns([t for t in targets if t != "Linear"], "target")
    all_linear = "Linear" in targets
    ipats = compile_patterns(list(ignore), "ignore")
    dpats = compile_patterns(DEFAULT_IGNORE, "default ignore")
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        explicit = any(p.search(name) for p in tpats)
        if not (explicit or all_linear):
            continue
        if any(p.search(name) for p in ipats):
            continue
        if not explicit and any(p.search(name) for p in dpats):
            continue
        yield name, mod


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
