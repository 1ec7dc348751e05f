"""SqueezeLLM: weighted k-means (monotone objective, float64 textbook), dense-and-sparse, exact bits, end to end."""

from __future__ import annotations

import pytest
import torch
import transformers

from lowbit.config import ConfigError
from lowbit.formats.codebook import RowCodebook
from lowbit.formats.outliers import Outliers
from lowbit.methods.base import get_method
from lowbit.methods.squeezellm import SqueezeLLMConfig
from lowbit.methods.squeezellm.core import _init, _init_pp, _lloyd, kmeans_objective, sparse_mask, weighted_kmeans
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_


def layer(out: int = 32, inp: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=gen) * 0.02
    W[torch.rand(out, inp, generator=gen) < 0.005] *= 20
    F = torch.rand(out, inp, generator=gen) ** 6  # heavy-tailed sensitivities
    return W, F


def test_weighted_kmeans_objective_never_increases() -> None:
    for seed in range(3):
        W, F = layer(seed=seed)
        hist: list[torch.Tensor] = []
        weighted_kmeans(W, F, 8, max_iter=50, history=hist)
        J = torch.stack(hist)  # (iters, rows)
        assert len(hist) >= 2
        assert bool((J[1:] <= J[:-1] * (1 + 1e-6) + 1e-12).all()), (J[1:] - J[:-1]).max()


def test_weighted_kmeans_matches_float64_textbook_lloyd() -> None:
    W, F = layer(out=3, inp=64, seed=4)
    init = _init(W, F, 4)
    C = _lloyd(W, F, init, 50, None)
    for r in range(3):
        w, f, c = W[r].double().tolist(), F[r].double().tolist(), init[r].tolist()
        for _ in range(50):
            a = [min(range(4), key=lambda k: (abs(x - c[k]), k)) for x in w]
            new = []
            for k in range(4):
                den = sum(fi for fi, ai in zip(f, a) if ai == k)
                new.append(sum(fi * xi for fi, xi, ai in zip(f, w, a) if ai == k) / den if den > 0 else c[k])
            if new == c:
                break
            c = new
        torch.testing.assert_close(C[r].double(), torch.tensor(c, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_best_of_two_starts_is_kept_per_row() -> None:
    W, F = layer(seed=9)
    J = kmeans_objective(W, F, weighted_kmeans(W, F, 8))
    for init in (_init(W, F, 8), _init_pp(W, F, 8, 0)):
        assert bool((J <= kmeans_objective(W, F, _lloyd(W, F, init, 50, None)) + 1e-12).all())


def test_fisher_weighting_lowers_the_weighted_error() -> None:
    W, F = layer(seed=5)
    C_w = weighted_kmeans(W, F, 8)
    C_u = weighted_kmeans(W, torch.ones_like(F), 8)
    assert float(kmeans_objective(W, F, C_w).sum()) < 0.9 * float(kmeans_objective(W, F, C_u).sum())


def test_sparse_mask_takes_the_configured_shares() -> None:
    W, F = layer(out=64, inp=512, seed=6)
    m = sparse_mask(W, F, 0.0005, 0.004)
    n = W.numel()
    assert int(m.sum()) == round(0.0005 * n) + round(0.004 * n)
    top_f = F.reshape(-1).topk(round(0.0005 * n)).indices
    assert bool(m.reshape(-1)[top_f].all())
    assert float(W[m].abs().median()) > 3 * float(W[~m].abs().max() / 2)  # range outliers are the extremes


@pytest.mark.parametrize("sparse", [False, True])
def test_lut_storage_has_exact_bits_and_keeps_sparse_values(sparse: bool) -> None:
    W, F = layer(out=32, inp=576, seed=7)
    cfg = SqueezeLLMConfig.for_bits(3, sparse=sparse)
    q = cfg.quantize_weight(W, {"fisher": F})
    stored = sum(t.numel() * t.element_size() for t in q.data.values()) * 8 / W.numel()
    assert q.bits_per_weight == stored
    if sparse:
        k = q["outlier_val"].numel()
        assert k == round(0.0005 * W.numel()) + round(0.004 * W.numel())
        assert q.bits_per_weight == pytest.approx(3 + 8 * 16 / 576 + (32 * k + 16 * 32) / W.numel(), abs=1e-12)
        m = sparse_mask(W, F, 0.0005, 0.004)
        assert torch.equal(q.dequantize()[m], W[m].half().float())
    else:
        assert q.bits_per_weight == pytest.approx(3 + 8 * 16 / 576, abs=1e-12)  # one fp16 LUT of 8 per row


def test_dense_and_sparse_beats_dense_on_weighted_error() -> None:
    W, F = layer(out=32, inp=576, seed=8)
    errs = {}
    for sparse in (False, True):
        Wd = SqueezeLLMConfig.for_bits(3, sparse=sparse).quantize_weight(W, {"fisher": F}).dequantize()
        errs[sparse] = float((F * (Wd - W) ** 2).sum())
    assert errs[True] < errs[False], errs


def test_end_to_end_with_fisher_from_the_lm_loss() -> None:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(0))
    quantize_(model, SqueezeLLMConfig.for_bits(3, sparse=True, max_iter=8), calibration=ids)
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and all(isinstance(m.format, Outliers) for m in qls)
    assert all(p.requires_grad for p in model.parameters())  # fisher pass restored the flags
    with torch.no_grad():
        assert bool(torch.isfinite(model(ids).logits).all())


def test_config_registry_and_validation() -> None:
    assert get_method("squeezellm") is SqueezeLLMConfig
    c = SqueezeLLMConfig.for_bits(4, sparse=True)
    assert c.format == Outliers(base=RowCodebook(4)) and c.sensitive_fraction == 0.0005
    assert SqueezeLLMConfig.from_dict(c.to_dict()) == c
    assert SqueezeLLMConfig.for_bits(3).replace(outlier_fraction=0.01).format == Outliers(base=RowCodebook(3))
    import argparse

    from lowbit.cli.options import build_method_config

    cli = build_method_config("squeezellm", 3, None, argparse.Namespace(opt_outlier_fraction=0.004,
                                                                        opt_sensitive_fraction=0.0005))
    assert cli == SqueezeLLMConfig(format=Outliers(base=RowCodebook(3)), sensitive_fraction=0.0005,
                                   outlier_fraction=0.004)
    with pytest.raises(ConfigError, match="fraction"):
        SqueezeLLMConfig(format=Outliers(base=RowCodebook(3)), outlier_fraction=0.7)
    with pytest.raises(ConfigError, match="group"):
        SqueezeLLMConfig.for_bits(3, 128)
    with pytest.raises(ValueError, match="fisher"):
        c.quantize_weight(torch.randn(4, 8), {"hessian": torch.eye(8)})


def test_assign_equals_the_all_pairs_argmin_including_midpoint_ties() -> None:
    from lowbit.methods.squeezellm.core import _assign

    g = torch.Generator().manual_seed(11)
    W = torch.randn(7, 300, generator=g)
    C = torch.randn(7, 16, generator=g)  # unsorted centroids
    brute = (W[:, :, None] - C[:, None, :]).abs().argmin(-1)
    assert torch.equal(_assign(W, C), brute)
    # weights exactly on the midpoints of sorted integer centroids: ties go to the lower centroid
    C = torch.tensor([[-2.0, 0.0, 2.0, 4.0]])
    W = torch.tensor([[1.0, 3.0, -1.0, 5.0, -3.0, 2.0]])
    brute = (W[:, :, None] - C[:, None, :]).abs().argmin(-1)
    assert torch.equal(_assign(W, C), brute)


def test_kmeanspp_sampling_never_draws_zero_weight_entries() -> None:
    from lowbit.methods.squeezellm.core import _sample

    g = torch.Generator().manual_seed(0)
    p = torch.rand(50, 40, generator=g)
    p[p < 0.7] = 0  # most entries impossible
    p[:, -1] = 0  # including the last one (where a draw at the very top of the cdf would land)
    p[:, 0] += 1e-3
    for _ in range(20):
        idx = _sample(p, g)
        assert bool((p.gather(1, idx[:, None]) > 0).all())
    one = torch.zeros(3, 10)
    one[torch.arange(3), torch.tensor([0, 4, 9])] = 1.0
    assert _sample(one, g).tolist() == [0, 4, 9]
