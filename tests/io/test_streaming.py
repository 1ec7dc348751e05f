"""Streaming quantization: block by block from safetensors shards, equal to the in-memory result, low peak RSS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.formats.affine import IntAffine
from lowbit.io import checkpoint
from lowbit.io.streaming import quantize_streaming
from lowbit.methods.gptq.api import GPTQConfig
from lowbit.methods.rtn.api import RTNConfig
from lowbit.nn.linear import QuantLinear


def tiny_llama(seed: int = 0, tie: bool = False, layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def save_source(model: LlamaForCausalLM, path: Path, shard: str = "60KB") -> Path:
    model.save_pretrained(str(path), max_shard_size=shard)
    return path


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_streaming_rtn_equals_in_memory(tmp_path: Path, tie: bool) -> None:
    model = tiny_llama(tie=tie)
    src = save_source(model, tmp_path / "src")
    assert (src / "model.safetensors.index.json").is_file()  # the source really is sharded
    cfg = RTNConfig(format=IntAffine(bits=4, group_size=48))  # short last groups (64, 160 wide rows)
    out = quantize_streaming(src, tmp_path / "q", cfg)
    files = sorted(p.name for p in out.iterdir())
    assert [f for f in files if f.startswith("model-")] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert not (tmp_path / ".q.partial").exists()
    loaded = lowbit.load(out)
    ref = tiny_llama(tie=tie)
    lowbit.quantize_(ref, cfg)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 3 * 7
    assert_same_state(ref, loaded)
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.equal(ref(x).logits, loaded(x).logits)


def test_streaming_gptq_equals_in_memory(tmp_path: Path) -> None:
    model = tiny_llama()
    src = save_source(model, tmp_path / "src")
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    cfg = GPTQConfig(format=IntAffine(bits=3, group_size=32), act_order=True)
    out = quantize_streaming(src, tmp_path / "q", cfg, calibration=calib, batch_size=2)
    ref = tiny_llama()
    lowbit.quantize_(ref, cfg, calibration=calib)  # the in-memory sequential runner (batch_size 8)
    loaded = lowbit.load(out)
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, ref(x).logits, rtol=1e-4, atol=1e-4)
    # same batch size as the runner: the same floating-point operations, hence the same bits
    out8 = quantize_streaming(src, tmp_path / "q8", cfg, calibration=calib, batch_size=8)
    assert_same_state(ref, lowbit.load(out8))


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    src = save_source(tiny_llama(), tmp_path / "src")
    cfg = RTNConfig(format=IntAffine(bits=4, group_size=32))
    quantize_streaming(src, tmp_path / "q", cfg)
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}
    with pytest.raises(FileExistsError, match="overwrite"):
        quantize_streaming(src, tmp_path / "q", RTNConfig(format=IntAffine(bits=8, group_size=32)))
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()} == before
    quantize_streaming(src, tmp_path / "q", RTNConfig(format=IntAffine(bits=8, group_size=32)), overwrite=True)
    assert checkpoint.read_manifest(tmp_path / "q")["method"]["format"]["bits"] == 8


def test_fisher_methods_are_refused(tmp_path: Path) -> None:
    from lowbit.methods.squeezellm.api import SqueezeLLMConfig

    src = save_source(tiny_llama(), tmp_path / "src")
    with pytest.raises(ValueError, match="streaming supports methods"):
        quantize_streaming(src, tmp_path / "q", SqueezeLLMConfig(), calibration=torch.zeros(2, 8, dtype=torch.long))
    assert not (tmp_path / "q").exists() and not (tmp_path / ".q.partial").exists()


def test_sharded_checkpoint_save_round_trip(tmp_path: Path) -> None:
    model = tiny_llama(tie=True)
    cfg = RTNConfig(format=IntAffine(bits=4, group_size=32))
    lowbit.quantize_(model, cfg)
    checkpoint.save(model, tmp_path / "ck", method=cfg, max_shard_size=20_000)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in names
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    loaded = lowbit.load(tmp_path / "ck")
    assert_same_state(model, loaded)
    with pytest.raises(ValueError, match="max_shard_size"):
        checkpoint.save(model, tmp_path / "ck2", max_shard_size=0)


def _bench_streaming():  # noqa: ANN202
    """benchmarks/bench_streaming.py, whose child process (one quantization, peak RSS from the OS) the test runs."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_streaming.py"
    spec = importlib.util.spec_from_file_location("bench_streaming", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from lowbit.io.streaming import write_synthetic_llama

    src = tmp_path_factory.mktemp("big") / "src"
    # 84 blocks of 51.4 MB fp32 (hidden 1024, intermediate 2816): 4.32e9 bytes > 4 GiB
    total = write_synthetic_llama(src, hidden_size=1024, intermediate_size=2816, num_hidden_layers=84)
    return src, total


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_larger_than_memory_peak_rss(big_source: tuple[Path, int], tmp_path: Path, method: str) -> None:
    """A >= 4 GiB fp32 Llama quantized by streaming stays under 1.5 GB peak RSS (measured by the OS)."""
    from safetensors import safe_open

    src, total = big_source
    assert total >= 4 * 2**30
    out = tmp_path / "q"
    res = _bench_streaming().run_child(src, out, method, timeout=3600)  # a fresh process; ru_maxrss at its end
    peak_bytes = res["peak_rss_mb"] * 2**20  # ru_maxrss is in KiB; the bench reports MiB
    print(f"{method}: fp32 model {total / 1e9:.2f} GB, peak RSS {peak_bytes / 1e9:.2f} GB")
    assert peak_bytes < 1.5e9, peak_bytes
    manifest = checkpoint.read_manifest(out)  # hashes of all 85 shards verified
    assert len(manifest["layers"]) == 84 * 7
    if method == "rtn":  # block 0 equals RTN of the source weights, bit for bit
        with safe_open(str(src / "model-00001-of-00085.safetensors"), "pt") as h:
            W = h.get_tensor("model.layers.0.mlp.down_proj.weight")
        q = RTNConfig(format=IntAffine(bits=4, group_size=128)).quantize_weight(W)
        with safe_open(str(out / "model-00001-of-00085.safetensors"), "pt") as h:
            for name, t in q.data.items():
                assert torch.equal(h.get_tensor(f"model.layers.0.mlp.down_proj.{name}"), t), name
