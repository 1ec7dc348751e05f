"""The offline docstring-classification task behind the Q8BERT experiment: deterministic, balanced, disjoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.train.classify import MeanPoolClassifier, accuracy, docstring_task


def test_task_is_seeded_balanced_and_train_test_disjoint():
    a = docstring_task(("email", "logging"), per_class=100, test_fraction=0.3, seed=1)
    b = docstring_task(("email", "logging"), per_class=100, test_fraction=0.3, seed=1)
    c = docstring_task(("email", "logging"), per_class=100, test_fraction=0.3, seed=2)
    assert a.train_texts == b.train_texts and a.test_texts == b.test_texts and a.train_texts != c.train_texts
    assert a.classes == ("email", "logging")
    assert torch.bincount(a.train_labels).tolist() == [70, 70] and torch.bincount(a.test_labels).tolist() == [30, 30]
    assert not set(a.train_texts) & set(a.test_texts)
    assert all(30 <= len(s) <= 200 for s in a.train_texts + a.test_texts)


def test_bad_task_arguments_are_named():
    with pytest.raises(ValueError, match="two distinct packages"):
        docstring_task(("email", "email"))
    with pytest.raises(ValueError, match="test_fraction"):
        docstring_task(test_fraction=1.0)
    with pytest.raises(ValueError, match="fewer than per_class"):
        docstring_task(("email", "logging"), per_class=100_000)
    with pytest.raises(ValueError, match="not found"):
        docstring_task(("email", "no_such_package_xyz"))


class _Enc(nn.Module):
    """A stand-in encoder: embedding lookup, returns ``last_hidden_state``."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"hidden_size": 4})()
        self.emb = nn.Embedding(10, 4)

    def forward(self, input_ids, attention_mask):
        return type("O", (), {"last_hidden_state": self.emb(input_ids)})()


def test_mean_pool_ignores_padding_and_accuracy_counts_argmax():
    m = MeanPoolClassifier(_Enc(), 3).eval()
    ids = torch.tensor([[1, 2, 0], [1, 2, 7]])
    h = m.encoder.emb(ids)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    with torch.no_grad():
        got = m(ids, mask)
        torch.testing.assert_close(got[0], m.head(h[0, :2].mean(0)))
        torch.testing.assert_close(got[1], m.head(h[1].mean(0)))

    def tok(texts, **kw):
        x = torch.tensor([[int(t)] for t in texts])
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}

    with torch.no_grad():
        pred = m(torch.arange(10)[:, None], torch.ones(10, 1, dtype=torch.long)).argmax(-1)
    labels = pred.clone()
    labels[:3] = (labels[:3] + 1) % 3
    assert accuracy(m, tok, [str(i) for i in range(10)], labels, batch_size=4) == pytest.approx(0.7)
