"""compressed-tensors export, proven by the compressed-tensors library and by transformers loading it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.formats.affine import IntAffine
from lowbit.io.compressed_tensors import export_compressed_tensors, pack_int32
from lowbit.methods.rtn.api import RTNConfig
from lowbit.nn.linear import QuantLinear

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.base import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_int32_equals_compressed_tensors(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (5, 77), generator=g)
    ours = pack_int32(codes, bits)
    theirs = pack_to_int32((codes - 2 ** (bits - 1)).to(torch.int8), bits)
    assert torch.equal(ours, theirs)


FORMATS = [
    IntAffine(bits=4, group_size=32, symmetric=True),
    IntAffine(bits=4, group_size=32, symmetric=False),
    IntAffine(bits=8, group_size=None, symmetric=True),
    IntAffine(bits=4, group_size=None, symmetric=False),
]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"b{f.bits}-g{f.group_size}-{'sym' if f.symmetric else 'asym'}")
def test_decompressor_gives_lowbit_weights_exactly(tmp_path: Path, fmt: IntAffine) -> None:
    model = tiny_llama()
    lowbit.quantize_(model, RTNConfig(format=fmt))
    out = export_compressed_tensors(model, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(out / "model.safetensors"))
    checked = 0
    for gname, group in cfg["config_groups"].items():
        scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"} | {"format": group["format"]})
        compressor = BaseCompressor.load_from_registry(group["format"])
        for layer in group["targets"]:
            local = {k.removeprefix(layer + "."): v for k, v in tensors.items() if k.startswith(layer + ".")}
            dense = compressor.decompress(local, scheme)["weight"]
            ours = model.get_submodule(layer).dequantize()
            assert dense.dtype == torch.float32
            assert torch.equal(dense, ours), layer
            checked += 1
    assert checked == 2 * 7


# Peer bug (llm-compressor issue #1618, still present with transformers 5.24.0 + compressed-tensors 0.20.0 +
# torch 2.13.0): transformers' default compressed load (run_compressed=True) builds the module skeleton with
# compressed-tensors' *unpacked* zero-point shape (out, n_groups), while pack-quantized stores asymmetric zero
# points int32-packed along rows (out / (32 / bits), n_groups), the layout its own decompressor reads. Loading
# raises "RuntimeError: You set `ignore_mismatched_sizes` to `False`" (size mismatch for every
# *.weight_zero_point); ignore_mismatched_sizes=True re-initializes them and then fails to unpack ("Expected
# torch.int32 but got torch.int8"). transformers' decompress-on-load path, CompressedTensorsConfig(
# run_compressed=False), reads the same files through compressed-tensors' decompressor and gives lowbit's
# logits exactly; asymmetric schemes are checked through that path, symmetric ones through both.
def _load_with_transformers(out: Path, symmetric: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {} if symmetric else {"quantization_config": CompressedTensorsConfig(run_compressed=False)}
    return AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32, **kw).eval()


def _symmetric(model: torch.nn.Module) -> bool:
    return all(getattr(m.qweight.format, "symmetric", True) for m in model.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("fmt", [IntAffine(bits=4, group_size=32, symmetric=True),
                                 IntAffine(bits=8, group_size=None, symmetric=True),
                                 IntAffine(bits=4, group_size=32, symmetric=False)],
                         ids=["w4a16-g32", "w8a16", "w4a16-g32-asym"])
def test_transformers_loads_export_with_same_logits(tmp_path: Path, fmt: IntAffine) -> None:
    model = tiny_llama()
    lowbit.quantize_(model, RTNConfig(format=fmt))
    out = export_compressed_tensors(model, tmp_path / "ct")
    loaded = _load_with_transformers(out, fmt.symmetric)
    x = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
        got = loaded(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.xfail(raises=RuntimeError, strict=True,
                   reason="llm-compressor #1618: transformers 5.24 + compressed-tensors 0.20 expect unpacked "
                          "asymmetric zero points on the default (run_compressed) load; see the note above")
def test_transformers_default_load_of_asymmetric_pack_quantized(tmp_path: Path) -> None:
    """Fails today (peer bug); strict, so a fixed transformers/compressed-tensors turns this into a failure to
    notice: then the asymmetric checks can use the default load too."""
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    lowbit.quantize_(model, RTNConfig(format=IntAffine(bits=4, group_size=32, symmetric=False)))
    out = export_compressed_tensors(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    x = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_unexportable_formats_are_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    lowbit.quantize_(model, RTNConfig(format=IntAffine(bits=4, group_size=48)))  # 48 divides neither 64 nor 128
    with pytest.raises(ValueError, match="shorter last group.*group sizes that do"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
    model = tiny_llama()
    lowbit.quantize_(model, RTNConfig(format=IntAffine(bits=4, group_size=32, float_zero_point=True)))
    with pytest.raises(ValueError, match="integer zero points"):
        export_compressed_tensors(model, tmp_path / "ct")


def test_unquantized_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no quantized"):
        export_compressed_tensors(tiny_llama(), tmp_path / "ct")
    assert not any(isinstance(m, QuantLinear) for m in tiny_llama().modules())


# --- every method the issue names: GPTQ (act-order or not), AWQ, SmoothQuant W8A8, FP8 W8A8 / weight-only ----

def _method_configs() -> dict[str, object]:
    from lowbit.formats.minifloat import Minifloat
    from lowbit.methods.awq.api import AWQConfig
    from lowbit.methods.fp8.api import FP8Config
    from lowbit.methods.gptq.api import GPTQConfig
    from lowbit.methods.smoothquant.api import SmoothQuantConfig

    return {
        "gptq-w4a16-g32": GPTQConfig(format=IntAffine(bits=4, group_size=32, symmetric=True)),
        "gptq-w4a16-g32-actorder": GPTQConfig(format=IntAffine(bits=4, group_size=32, symmetric=True), act_order=True,
                                              static_groups=True),
        "gptq-w4a16-g32-asym-actorder": GPTQConfig(format=IntAffine(bits=4, group_size=32), act_order=True,
                                                   static_groups=True),
        "gptq-w4a16-actorder-channel": GPTQConfig(format=IntAffine(bits=4, group_size=None, symmetric=True),
                                                  act_order=True),
        "gptq-w8a16": GPTQConfig(format=IntAffine(bits=8, group_size=None, symmetric=True)),
        "awq-w4a16-g32": AWQConfig.for_bits(4, 32),
        "awq-w4a16-g32-sym": AWQConfig(format=IntAffine(bits=4, group_size=32, symmetric=True)),
        "smoothquant-w8a8-int8": SmoothQuantConfig(),
        "fp8-w8a8": FP8Config(),
        "fp8-weight-only": FP8Config(format=Minifloat.preset("e4m3")),
    }


CALIB = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(5))


def _quantized(name: str) -> LlamaForCausalLM:
    model = tiny_llama()
    cfg = _method_configs()[name]
    lowbit.quantize_(model, cfg, calibration=CALIB if cfg.stats else None)  # type: ignore[arg-type]
    return model


def _decompress_all(out: Path) -> dict[str, torch.Tensor]:
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(out / "model.safetensors"))
    dense = {}
    for group in cfg["config_groups"].values():
        scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
        compressor = BaseCompressor.load_from_registry(group["format"])
        for layer in group["targets"]:
            local = {k.removeprefix(layer + "."): v for k, v in tensors.items() if k.startswith(layer + ".")}
            dense[layer] = compressor.decompress(local, scheme)["weight"]
    return dense


@pytest.mark.parametrize("name", list(_method_configs()))
def test_methods_decompress_to_lowbit_weights_exactly(tmp_path: Path, name: str) -> None:
    model = _quantized(name)
    out = export_compressed_tensors(model, tmp_path / "ct")
    dense = _decompress_all(out)
    assert len(dense) == 2 * 7
    for layer, W in dense.items():
        ours = model.get_submodule(layer).dequantize()
        assert W.dtype == ours.dtype == torch.float32
        assert torch.equal(W, ours), layer
    assert not any(k.endswith("weight_g_idx") for k in load_file(str(out / "model.safetensors")))


def test_non_contiguous_act_order_groups_are_refused(tmp_path: Path) -> None:
    """compressed-tensors 0.20 removed actorder='group' (g_idx); GPTQ act-order without static groups is refused."""
    from lowbit.methods.gptq.api import GPTQConfig

    model = tiny_llama()
    lowbit.quantize_(model, GPTQConfig(format=IntAffine(bits=4, group_size=32, symmetric=True), act_order=True),
                     calibration=CALIB)
    with pytest.raises(ValueError, match="static_groups=True"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def _ct_activation_convention(x: torch.Tensor, act, act_scale=None):  # noqa: ANN001, ANN202
    """compressed-tensors' dynamic symmetric int8 activations (quantization/utils/helpers.py calculate_qparams):
    scale = absmax / (255 / 2) = absmax / 127.5, codes clamped to [-128, 127]; lowbit uses absmax / 127, ±127."""
    xf = x.to(torch.float32)
    amax = xf.abs().amax(dim=-1, keepdim=True) if act.granularity == "token" else xf.abs().amax().reshape(*([1] * x.dim()))
    s = (amax / 127.5).clamp(min=1e-12)
    return torch.round(xf / s).clamp(-128, 127).to(torch.int8), s


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_method_configs()))
def test_methods_transformers_logits(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every method's export, loaded by transformers (asymmetric ones decompressed on load: see the note above)."""
    model = _quantized(name)
    out = export_compressed_tensors(model, tmp_path / "ct")
    loaded = _load_with_transformers(out, _symmetric(model))
    x = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(x).logits, loaded(x).logits
    if name != "smoothquant-w8a8-int8":
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        return
    # W8A8 int8: the weights are exact (decompressor test above), but compressed-tensors' CPU forward quantizes
    # activations with scale absmax/127.5 where lowbit uses absmax/127: logits differ by 5.5e-3 (measured).
    # With lowbit's activations switched to that convention the logits agree to 1e-4 (measured 1.8e-7).
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)
    import lowbit.formats.int8_rowwise as int8_rowwise

    monkeypatch.setattr(int8_rowwise, "quantize_activation", _ct_activation_convention)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x).logits, rtol=1e-4, atol=1e-4)


def test_cli_export_compressed_tensors(tmp_path: Path, word_tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    """`lowbit export --format compressed-tensors`: a lowbit checkpoint in, a directory the decompressor and
    transformers read out (with the tokenizer); an existing --out is kept unless --overwrite."""
    from lowbit.cli.main import main
    from lowbit.io import checkpoint

    model = _quantized("gptq-w4a16-g32")
    ck = checkpoint.save(model, tmp_path / "ck", method=_method_configs()["gptq-w4a16-g32"], tokenizer=word_tokenizer)
    out = tmp_path / "ct"
    assert main(["export", str(ck), "--format", "compressed-tensors", "--out", str(out)]) == 0
    assert "compressed-tensors" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").is_file()
    dense = _decompress_all(out)
    assert len(dense) == 2 * 7
    for layer, W in dense.items():
        assert torch.equal(W, model.get_submodule(layer).dequantize()), layer
    loaded = _load_with_transformers(out, symmetric=True)
    x = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", str(ck), "--format", "compressed-tensors", "--out", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["export", str(ck), "--format", "compressed-tensors", "--out", str(out), "--overwrite"]) == 0
