"""Sentence classification with a BERT-style encoder: an offline task and a small train/evaluate loop.

The task (:func:`docstring_task`) needs no download: sentences of the docstrings of a few Python
standard-library packages (``asyncio``, ``email``, ...), labelled by the package they come from. Sentences are
read with ``ast`` from the installed Python's sources (tests excluded), deduplicated (a sentence found in two
packages is dropped), shuffled with a seed, balanced to ``per_class`` per package and split into train and
test by a seeded permutation. Many sentences are generic ("Return the value."), so an encoder does well but
not perfectly: room to see what quantization costs. The sentences follow the running Python's version.

:class:`MeanPoolClassifier` puts a linear head over the mask-averaged last hidden state (the pooling
all-MiniLM-L6-v2 was trained with); :func:`train_classifier` and :func:`accuracy` train and score it.
The Q8BERT experiment (``python -m lowbit.train.experiments q8bert``) uses all three.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["TextTask", "docstring_task", "MeanPoolClassifier", "train_classifier", "accuracy",
           "DOCSTRING_PACKAGES"]

log = logging.getLogger(__name__)

DOCSTRING_PACKAGES = ("asyncio", "email", "logging", "tkinter", "unittest", "xml")


@dataclass(frozen=True)
class TextTask:
    """A labelled sentence task: ``classes[label]`` names each label."""

    classes: tuple[str, ...]
    train_texts: list[str]
    train_labels: torch.Tensor
    test_texts: list[str]
    test_labels: torch.Tensor


def _docstring_sentences(package: str, min_chars: int, max_chars: int) -> list[str]:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None or not spec.submodule_search_locations:
        raise ValueError(f"standard-library package {package!r} not found (need a package, e.g. "
                         f"{list(DOCSTRING_PACKAGES)})")
    out: list[str] = []
    root = Path(spec.origin).parent
    for f in sorted(root.rglob("*.py")):
        if any(part.startswith("test") for part in f.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            for para in re.split(r"\n\s*\n", doc or ""):
                for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                    if min_chars <= len(s) <= max_chars and re.search("[a-z]", s):
                        out.append(s)
    return list(dict.fromkeys(out))


def docstring_task(packages: Sequence[str] = DOCSTRING_PACKAGES, per_class: int = 400, test_fraction: float = 0.4,
                   seed: int = 0, min_chars: int = 30, max_chars: int = 200) -> TextTask:
    """Which standard-library package does a docstring sentence come from? (see module docstring)

    Args:
        packages: package names, one class each.
        per_class: sentences per class (every class gets exactly this many).
        test_fraction: share of each class held out for testing.
        seed: seeds the choice and the split.
        min_chars, max_chars: sentence length limits.

    Raises:
        ValueError: fewer than two packages, a package with fewer than ``per_class`` sentences, or a bad fraction.
    """
    if len(set(packages)) < 2:
        raise ValueError(f"need at least two distinct packages, got {list(packages)!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    found = {p: _docstring_sentences(p, min_chars, max_chars) for p in packages}
    seen: dict[str, int] = {}
    for sents in found.values():
        for s in sents:
            seen[s] = seen.get(s, 0) + 1
    g = torch.Generator().manual_seed(seed)
    n_test = int(round(per_class * test_fraction))
    tr_t: list[str] = []
    tr_l: list[int] = []
    te_t: list[str] = []
    te_l: list[int] = []
    for label, p in enumerate(packages):
        sents = [s for s in found[p] if seen[s] == 1]
        if len(sents) < per_class:
            raise ValueError(f"package {p!r} has {len(sents)} usable docstring sentences, fewer than "
                             f"per_class={per_class}")
        pick = [sents[i] for i in torch.randperm(len(sents), generator=g)[:per_class].tolist()]
        te_t += pick[:n_test]
        te_l += [label] * n_test
        tr_t += pick[n_test:]
        tr_l += [label] * (per_class - n_test)
    return TextTask(tuple(packages), tr_t, torch.tensor(tr_l), te_t, torch.tensor(te_l))


class MeanPoolClassifier(nn.Module):
    """``logits = head(dropout(mean_t h_t))`` over an encoder's last hidden state (padding masked out)."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        hidden = int(encoder.config.hidden_size)
        g = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_classes, hidden, generator=g) * 0.02)
            self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head(self.dropout((h * m).sum(1) / m.sum(1).clamp_min(1.0)))


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


def train_classifier(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: torch.Tensor, *,
                     epochs: int = 3, lr: float = 5e-5, batch_size: int = 32, max_length: int = 48,
                     weight_decay: float = 0.01, seed: int = 0,
                     progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Cross-entropy fine-tuning of all trainable parameters with AdamW (constant ``lr``), shuffled batches.

    Returns:
        The loss of every step. ``progress(step, steps, loss)`` is called after each step.
    """
    if len(texts) != labels.shape[0]:
        raise ValueError(f"{len(texts)} texts but {labels.shape[0]} labels")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    steps = epochs * ((len(texts) + batch_size - 1) // batch_size)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(texts), generator=g).tolist()
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            logits = model(**_encode(tokenizer, [texts[j] for j in idx], max_length))
            loss = nn.functional.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(len(losses), steps, losses[-1])
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer: Any, texts: Sequence[str], labels: torch.Tensor,
             batch_size: int = 64, max_length: int = 48) -> float:
    """Share of ``texts`` whose arg-max class equals ``labels`` (model in eval mode)."""
    was = model.training
    model.eval()
    pred = torch.cat([model(**_encode(tokenizer, texts[i:i + batch_size], max_length)).argmax(-1)
                      for i in range(0, len(texts), batch_size)])
    model.train(was)
    return float((pred == labels).float().mean())
