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


# Asymmetric group zero points are proven by the decompressor above; transformers 5.24 with compressed-tensors
# 0.20 initializes them unpacked (out, n_groups) and re-initializes the packed tensors on load, so the
# transformers round trip is checked on symmetric schemes (the GPTQ/vLLM default).
@pytest.mark.parametrize("fmt", [IntAffine(bits=4, group_size=32, symmetric=True),
                                 IntAffine(bits=8, group_size=None, symmetric=True)], ids=["w4a16-g32", "w8a16"])
def test_transformers_loads_export_with_same_logits(tmp_path: Path, fmt: IntAffine) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    lowbit.quantize_(model, RTNConfig(format=fmt))
    out = export_compressed_tensors(model, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32).eval()
    x = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
        got = loaded(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


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
