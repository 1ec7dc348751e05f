"""GPTQConfig through real lowbit formats: RTN equivalence, error vs RTN on calibrated layers, storage."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from lowbit.config import ConfigError
from lowbit.formats.affine import IntAffine
from lowbit.methods.base import get_method
from lowbit.methods.gptq import GPTQConfig
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_


def tiny_llama(seed: int = 0) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def correlated(out: int, inp: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=gen)
    X = torch.randn(4 * inp, inp, generator=gen) @ (torch.eye(inp) + torch.randn(inp, inp, generator=gen) / inp ** .5)
    return W, 2 * X.T @ X / X.shape[0]


def herr(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - Q).double()
    return float(torch.trace(D @ H.double() @ D.T))


FORMATS = [IntAffine(bits=4, group_size=32), IntAffine(bits=3, group_size=None),
           IntAffine(bits=4, group_size=24, symmetric=True), IntAffine(bits=2, group_size=128)]


@pytest.mark.parametrize("fmt", FORMATS, ids=repr)
def test_identity_hessian_equals_rtn_exactly(fmt: IntAffine) -> None:
    W, _ = correlated(16, 80)
    q = GPTQConfig(format=fmt).quantize_weight(W, {"hessian": torch.eye(80)})
    rtn = fmt.quantize(W)
    assert torch.equal(q.dequantize(), rtn.dequantize())
    for k in rtn.data:
        assert torch.equal(q[k], rtn[k]), k


@pytest.mark.parametrize("fmt", FORMATS + [IntAffine(bits=4, group_size=16, float_zero_point=True)], ids=repr)
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_fast_column_rounding_equals_format_fake_quantize(fmt: IntAffine, act_order: bool, static: bool) -> None:
    """The sweep's IntAffine rounding (plain tensor ops per column) gives bit-identical results to
    ``fmt.fake_quantize`` per column, the format's own definition."""
    from lowbit.methods.gptq.core import gptq

    if static and not fmt.group_size:
        pytest.skip("static groups need a group size")
    W, H = correlated(24, 80, seed=7)
    cfg = GPTQConfig(format=fmt, act_order=act_order, static_groups=static, block_size=32)
    fast = cfg.quantize_weight(W, {"hessian": H})
    Q, groups, g_idx, _ = gptq(W, H, lambda Wg, _u: fmt.params(Wg), lambda w, p, _j, _d: fmt.fake_quantize(w, **p),
                               group_size=fmt.group_size, block_size=32, act_order=act_order, static_groups=static)
    assert torch.equal(fast.dequantize(), Q)
    ref = {k: torch.cat([p[k] for p in groups], 1) for k in groups[0]}
    for k, v in ref.items():
        assert torch.equal(fast[k], v), k
    assert (g_idx is None) == (fast.get("g_idx") is None)


@pytest.mark.parametrize("act_order,static", [(False, False), (True, True)])
def test_hessian_weighted_error_at_most_rtn_on_calibrated_layers(act_order: bool, static: bool) -> None:
    """On every Linear of a tiny Llama, with the Hessian of its real inputs: tr((W-Q)H(W-Q)ᵀ) ≤ RTN's."""
    model = tiny_llama()
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(0))
    from lowbit.calibration.hooks import collect_input_stats

    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    with torch.no_grad(), collect_input_stats(lins, ["hessian"]) as acc:
        model(ids)
    fmt = IntAffine(bits=3, group_size=32)
    cfg = GPTQConfig(format=fmt, act_order=act_order, static_groups=static)
    ratios = []
    for n, lin in lins.items():
        W, H = lin.weight.detach(), acc[n].result()["hessian"]
        e_g = herr(W, cfg.quantize_weight(W, {"hessian": H}).dequantize(), H)
        e_r = herr(W, fmt.fake_quantize(W), H)
        assert e_g <= e_r, (n, e_g, e_r)
        ratios.append(e_g / e_r)
    assert sum(ratios) / len(ratios) < 0.9


@pytest.mark.parametrize("static", [False, True])
def test_act_order_round_trips_through_save_and_load(static: bool, tmp_path) -> None:
    from lowbit.io.checkpoint import load, save

    model = tiny_llama()
    ids = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(1))
    cfg = GPTQConfig(format=IntAffine(bits=4, group_size=16), act_order=True, static_groups=static)
    quantize_(model, cfg, calibration=ids)
    lin = model.model.layers[0].self_attn.q_proj
    assert isinstance(lin, QuantLinear)
    assert (lin.qweight.get("g_idx") is not None) is (not static)
    if not static:  # act-order groups are not contiguous: g_idx is a permutation of the natural one
        g = lin.qweight["g_idx"].long()
        assert not torch.equal(g, torch.arange(64) // 16) and torch.bincount(g).tolist() == [16] * 4
    with torch.no_grad():
        ref = model(ids).logits
    save(model, tmp_path / "ckpt", method=cfg)
    back = load(tmp_path / "ckpt")
    lin2 = back.model.layers[0].self_attn.q_proj
    assert isinstance(lin2, QuantLinear)
    assert torch.equal(lin2.dequantize(), lin.dequantize())
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, rtol=0, atol=0)


def test_quantize_end_to_end_beats_rtn_on_output_error() -> None:
    ids = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(2))
    test = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(3))
    fp = tiny_llama()
    with torch.no_grad():
        ref = fp(test).logits
    errs = {}
    for name in ("rtn", "gptq"):
        m = tiny_llama()
        fmt = IntAffine(bits=3, group_size=32)
        if name == "gptq":
            quantize_(m, GPTQConfig(format=fmt), calibration=ids)
        else:
            for n, lin in m.named_modules():
                if isinstance(lin, nn.Linear) and n != "lm_head":
                    lin.weight.data = fmt.fake_quantize(lin.weight.detach())
        n_q = sum(isinstance(x, QuantLinear) for x in m.modules())
        assert n_q == (14 if name == "gptq" else 0)
        with torch.no_grad():
            errs[name] = float((m(test).logits - ref).square().mean())
    assert errs["gptq"] < errs["rtn"], errs


def test_registered_and_for_bits() -> None:
    assert get_method("gptq") is GPTQConfig
    c = GPTQConfig.for_bits(3, 128, act_order=True)
    assert c.format == IntAffine(bits=3, group_size=128) and c.act_order
    assert GPTQConfig.from_dict(c.to_dict()) == c
    assert GPTQConfig.for_bits(4, None).format.group_size == 128  # None means the default, as the CLI passes it
    import argparse

    from lowbit.cli.options import build_method_config

    cli = build_method_config("gptq", 3, 64, argparse.Namespace(opt_act_order="true", opt_static_groups="true"))
    assert cli == GPTQConfig(format=IntAffine(bits=3, group_size=64), act_order=True, static_groups=True)
    with pytest.raises(ConfigError, match="valid choices"):
        GPTQConfig.for_bits(1)


def test_bad_options_and_inputs_are_rejected() -> None:
    fmt = IntAffine(bits=4, group_size=None)
    with pytest.raises(ConfigError, match="damp"):
        GPTQConfig(format=fmt, damp=0)
    with pytest.raises(ConfigError, match="block_size"):
        GPTQConfig(format=fmt, block_size=0)
    with pytest.raises(ConfigError, match="static_groups"):
        GPTQConfig(format=fmt, static_groups=True)
    with pytest.raises(TypeError, match="Format"):
        GPTQConfig(format="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hessian"):
        GPTQConfig(format=fmt).quantize_weight(torch.randn(4, 8), {})
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        GPTQConfig(format=fmt).quantize_weight(torch.randn(4, 8), {"hessian": torch.eye(7)})
    with pytest.raises(ValueError, match="calibration"):
        quantize_(tiny_llama(), GPTQConfig(format=fmt))
