"""AWQ: exact scale folding (float64), the α search picks the loss minimiser, clipping helps, AWQ beats RTN
on a tiny Llama at 3 and 4 bits, and composes with GPTQ as the final rounder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.affine import IntAffine
from lowbit.methods.awq import AWQConfig
from lowbit.methods.awq.core import scale_for_alpha, search_clip, search_scale, weight_group_mean
from lowbit.methods.base import MethodConfig, get_method
from lowbit.methods.gptq import GPTQConfig
from lowbit.model.mappings import fold_scale, resolve
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_
from tests.methods.act_aware_helpers import logit_mse, tiny_llama, token_ids


def test_scaling_transform_leaves_block_outputs_unchanged_float64() -> None:
    model = tiny_llama(dtype=torch.float64)
    ids = token_ids(2, 16, 0)
    with torch.no_grad():
        ref = model(ids).logits
    g = torch.Generator().manual_seed(1)
    for blk in model.model.layers:
        maps = resolve(blk)
        # GQA: v_proj (32 out) cannot feed o_proj (64 in), so that pair is skipped as llm-awq does
        assert [m.smooth_name for m in maps] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
        assert [m.inspect_name for m in maps] == ["self_attn", "mlp", "mlp.down_proj"]
        for m in maps:
            fold_scale(m.smooth, m.balance, torch.rand(m.balance[0].in_features, generator=g, dtype=torch.float64) * 4 + .1)
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_v_to_o_pair_used_when_shapes_allow() -> None:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4)
    blk = transformers.LlamaForCausalLM(cfg).model.layers[0]
    assert "self_attn.v_proj" in [m.smooth_name for m in resolve(blk)]


def test_search_picks_the_alpha_minimising_the_loss() -> None:
    g = torch.Generator().manual_seed(0)
    x_mean = torch.rand(32, generator=g) * 5 + 0.1
    target = scale_for_alpha(x_mean, 0.35)
    calls = []

    def loss(s: torch.Tensor) -> float:
        calls.append(s)
        return float((s - target).pow(2).sum())

    s, alpha, losses = search_scale(loss, x_mean, n_grid=20)
    assert len(losses) == 20 and alpha == pytest.approx(0.35)
    assert losses.index(min(losses)) == 7 and torch.equal(s, target)
    for i, s_i in enumerate(calls):  # each loss is L at α = i/20, s normalised by sqrt(max·min)
        torch.testing.assert_close(s_i, scale_for_alpha(x_mean, i / 20))
        assert float(s_i.max() * s_i.min()) == pytest.approx(1.0, rel=1e-5)


def test_search_on_a_layer_picks_argmin_of_its_real_output_loss() -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(256, 64, generator=g) * (torch.rand(64, generator=g) * 8).exp()
    W = torch.randn(32, 64, generator=g)
    fmt = IntAffine(bits=3, group_size=32)

    def loss(s: torch.Tensor) -> float:
        return float((X @ (fmt.fake_quantize(W * s) / s).T - X @ W.T).pow(2).mean())

    s, alpha, losses = search_scale(loss, X.abs().mean(0), n_grid=20)
    assert losses[round(alpha * 20)] == min(losses)
    assert min(losses) <= losses[0]  # α = 0 is plain RTN
    assert loss(s) == pytest.approx(min(losses))


def test_clip_search_reduces_group_output_error() -> None:
    g = torch.Generator().manual_seed(2)
    W = torch.randn(16, 128, generator=g)
    W[0, 5] = 12.0  # one large weight inflates its group's step
    X = torch.randn(512, 128, generator=g)
    fmt = IntAffine(bits=3, group_size=64)
    mv = search_clip(W, X, fmt.fake_quantize, 64)
    lim = mv.repeat_interleave(64, dim=1)
    Wc = torch.maximum(torch.minimum(W, lim), -lim)
    err = lambda V: float((X @ (fmt.fake_quantize(V) - W).T).pow(2).mean())  # noqa: E731
    assert err(Wc) < err(W)
    assert bool((mv <= W.abs().view(16, 2, 64).amax(2) + 1e-6).all())
    assert bool((mv >= 0.5 * W.abs().view(16, 2, 64).amax(2) - 1e-6).all())


def test_weight_group_mean_is_relative_magnitude() -> None:
    W = torch.tensor([[1.0, -2.0, 4.0, 1.0], [2.0, 2.0, 1.0, -1.0]])
    torch.testing.assert_close(weight_group_mean([W], 2), torch.tensor([0.75, 1.0, 1.0, 0.625]))


@pytest.mark.parametrize("bits", [3, 4])
def test_awq_beats_rtn_on_tiny_llama(bits: int) -> None:
    ids, test = token_ids(4, 32, 1), token_ids(4, 32, 2)
    with torch.no_grad():
        ref = tiny_llama(outliers=20.0)(test).logits
    fmt = IntAffine(bits=bits, group_size=32)
    rtn = tiny_llama(outliers=20.0)
    with torch.no_grad():
        for n, lin in rtn.named_modules():
            if isinstance(lin, nn.Linear) and n != "lm_head":
                lin.weight.copy_(fmt.fake_quantize(lin.weight))
    awq = tiny_llama(outliers=20.0)
    quantize_(awq, AWQConfig(format=fmt), calibration=ids)
    assert sum(isinstance(x, QuantLinear) for x in awq.modules()) == 14
    e_rtn, e_awq = logit_mse(rtn, ref, test), logit_mse(awq, ref, test)
    assert e_awq < e_rtn, (e_awq, e_rtn)


def test_awq_then_gptq_composes() -> None:
    fmt = IntAffine(bits=3, group_size=32)
    cfg = AWQConfig(format=fmt, then=GPTQConfig(format=fmt), duo_scaling=True)
    assert cfg.stats == ("act_mean_abs", "hessian") and AWQConfig.stats == ("act_mean_abs",)
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg
    m = tiny_llama()
    quantize_(m, cfg, calibration=token_ids(2, 32, 1))
    qls = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert len(qls) == 14 and all(q.format == fmt for q in qls)
    assert AWQConfig.for_bits(4, None, then="gptq").then == GPTQConfig.for_bits(4, 128)


def test_registry_and_bad_options() -> None:
    assert get_method("awq") is AWQConfig
    cfg = AWQConfig.for_bits(3)
    assert cfg.format == IntAffine(bits=3, group_size=128)
    with pytest.raises(ConfigError, match="same format"):
        AWQConfig(format=IntAffine(bits=4), then=GPTQConfig(format=IntAffine(bits=3)))
    with pytest.raises(ConfigError, match="valid"):
        AWQConfig.for_bits(4, duo=True)
    with pytest.raises(ConfigError, match="valid choices"):
        AWQConfig.for_bits(1)
    with pytest.raises(TypeError):
        AWQConfig(format="int4")  # type: ignore[arg-type]


def test_search_samples_cuts_the_batch_dimension_only() -> None:
    from lowbit.methods.awq.api import _subsample

    h, mask, pos = torch.randn(4, 8, 16), torch.zeros(4, 1, 8, 8), (torch.randn(4, 8, 2), torch.randn(1, 8, 2))
    calls = [((h,), {"attention_mask": mask, "position_embeddings": pos, "x": 3})] * 2
    out = _subsample(calls, 3)
    assert len(out) == 1
    (h2,), kw = out[0]
    assert h2.shape == (3, 8, 16) and kw["attention_mask"].shape == (3, 1, 8, 8)
    assert kw["position_embeddings"][0].shape == (3, 8, 2) and kw["position_embeddings"][1].shape == (1, 8, 2)
    assert kw["x"] == 3 and _subsample(calls, None) is calls
    assert len(_subsample(calls, 6)) == 2 and _subsample(calls, 6)[1][0][0].shape[0] == 2
    with pytest.raises(ConfigError, match="search_samples"):
        AWQConfig(format=IntAffine(bits=4), search_samples=0)


def test_clip_search_is_the_group_argmin_of_the_float64_textbook_error() -> None:
    # the Gram-matrix evaluation picks, per (row, group), the shrink whose mean_t (X_g D_g^T)^2 is smallest
    g = torch.Generator().manual_seed(4)
    W = torch.randn(24, 80, generator=g)  # 80 = 2 groups of 32 + a short group of 16
    W[3, 7], W[10, 70] = 9.0, -7.0
    X = torch.randn(300, 80, generator=g) * (torch.rand(80, generator=g) * 3).exp()
    fmt = IntAffine(bits=3, group_size=32)
    mv = search_clip(W, X, fmt.fake_quantize, 32, n_grid=20, max_shrink=0.5)
    amax = torch.stack([W[:, i:i + 32].abs().amax(1) for i in range(0, 80, 32)], 1)
    errs = []
    for i in range(10):
        lim = (amax * (1 - i / 20)).repeat_interleave(32, dim=1)[:, :80]
        D = (fmt.fake_quantize(torch.maximum(torch.minimum(W, lim), -lim)) - W).double()
        errs.append(torch.stack([(X[:, j:j + 32].double() @ D[:, j:j + 32].T).pow(2).mean(0)
                                 for j in range(0, 80, 32)], 1))
    best = torch.stack(errs).argmin(0)
    torch.testing.assert_close(mv, amax * (1 - best / 20))


def test_gram_loss_equals_the_module_output_loss_float64() -> None:
    from lowbit.methods.awq.api import _gram_loss, _inspect_loss, _scale_loss
    from lowbit.model.mappings import ResolvedMapping

    g = torch.Generator().manual_seed(5)
    up, down = nn.Linear(40, 96, dtype=torch.float64), nn.Linear(96, 40, dtype=torch.float64)
    m = ResolvedMapping("up", up, ["down"], [down], "down", down)
    X = torch.randn(2, 300, 96, generator=g, dtype=torch.float64)
    calls = [((X,), {})]
    fq = IntAffine(bits=3, group_size=32).fake_quantize
    ref = [down(X).detach()]
    saved = [down.weight.detach().clone()]
    H = X.reshape(-1, 96).T @ X.reshape(-1, 96) / 600
    for alpha in (0.0, 0.4, 0.9):
        s = scale_for_alpha(X.abs().mean((0, 1)), alpha).double()
        W = saved[0]
        textbook = float((X @ (fq(W * s) / s).T - X @ W.T).pow(2).mean())
        assert _gram_loss(W, H, fq, s) == pytest.approx(textbook, rel=1e-10)
        assert _inspect_loss(m, calls, ref, fq, s, saved) == pytest.approx(textbook, rel=1e-6)  # float32 error sum
        assert _scale_loss(m, calls, fq, 20)(s) == pytest.approx(textbook, rel=1e-10)  # 600 tokens: Gram form
    torch.testing.assert_close(down.weight, saved[0])  # the module loss restores the weights


def test_awq_then_hqq_composes_and_rounds_with_hqq() -> None:
    from lowbit.methods.hqq import HQQConfig

    cfg = AWQConfig.for_bits(3, 32, then="hqq")
    assert isinstance(cfg.then, HQQConfig) and cfg.format == cfg.then.format
    assert cfg.format == IntAffine(bits=3, group_size=32, float_zero_point=True)
    m = tiny_llama(outliers=20.0)
    quantize_(m, cfg, calibration=token_ids(2, 32, 1))
    qls = {n: x for n, x in m.named_modules() if isinstance(x, QuantLinear)}
    assert len(qls) == 14 and all(q.format == cfg.format for q in qls.values())
    # the final rounding is HQQ's (optimized float zero points), not round-to-nearest through the format
    W = torch.randn(48, 64, generator=torch.Generator().manual_seed(3))
    q_awq, q_hqq, q_rtn = cfg.quantize_weight(W), cfg.then.quantize_weight(W), cfg.format.quantize(W)
    for k in q_hqq.data:
        assert torch.equal(q_awq[k], q_hqq[k])
    assert not torch.equal(q_hqq["zero_point"], q_rtn["zero_point"])


@pytest.mark.parametrize("fmt", [IntAffine(bits=4, group_size=128), IntAffine(bits=3, group_size=32),
                                 IntAffine(bits=4, group_size=None), IntAffine(bits=4, group_size=64, symmetric=True),
                                 IntAffine(bits=3, group_size=16, float_zero_point=True),
                                 IntAffine(bits=8, group_size=256, scale_dtype=torch.float32)], ids=repr)
def test_search_fake_quantizer_is_bit_identical_to_the_format(fmt: IntAffine) -> None:
    from lowbit.methods.awq.api import fake_quantizer

    g = torch.Generator().manual_seed(6)
    for shape in [(24, 80), (7, 576), (5, 100)]:  # groups not dividing the row; a row narrower than a group
        W = torch.randn(*shape, generator=g) * (torch.rand(shape[1], generator=g) * 4).exp()
        assert torch.equal(fake_quantizer(fmt)(W), fmt.fake_quantize(W)), shape
    per_tensor = IntAffine(bits=4, per_tensor=True)
    assert fake_quantizer(per_tensor) == per_tensor.fake_quantize  # other layouts: the format's own
