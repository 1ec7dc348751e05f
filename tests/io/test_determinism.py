"""Determinism: the same inputs and seed give byte-identical checkpoints across runs (RTN, HQQ, GPTQ)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.formats.affine import IntAffine
from lowbit.io import checkpoint
from lowbit.io.streaming import quantize_streaming
from lowbit.methods.gptq.api import GPTQConfig
from lowbit.methods.hqq.api import HQQConfig
from lowbit.methods.rtn.api import RTNConfig


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


CONFIGS = {
    "rtn": RTNConfig(format=IntAffine(bits=4, group_size=48)),
    "hqq": HQQConfig(format=IntAffine(bits=3, group_size=32, float_zero_point=True)),
    "gptq": GPTQConfig(format=IntAffine(bits=4, group_size=32), act_order=True),
}


def run(method: str, seed: int, out: Path) -> dict[str, bytes]:
    model = tiny_llama(seed)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(seed))
    lowbit.quantize_(model, CONFIGS[method], calibration=calib if CONFIGS[method].stats else None)
    checkpoint.save(model, out, method=CONFIGS[method])
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_same_seed_byte_identical_checkpoint(tmp_path: Path, method: str) -> None:
    a = run(method, 0, tmp_path / "a")
    b = run(method, 0, tmp_path / "b")
    assert set(a) == {"config.json", "lowbit.json", "model.safetensors"}
    assert a == b
    c = run(method, 1, tmp_path / "c")  # the comparison can fail: another seed gives other bytes
    assert c["model.safetensors"] != a["model.safetensors"]


@pytest.mark.slow
def test_streaming_byte_identical_across_runs(tmp_path: Path) -> None:
    tiny_llama(0).save_pretrained(str(tmp_path / "src"), max_shard_size="60KB")
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    outs = [quantize_streaming(tmp_path / "src", tmp_path / n, CONFIGS["gptq"], calibration=calib) for n in "ab"]
    files = [{p.name: p.read_bytes() for p in sorted(o.iterdir())} for o in outs]
    assert sum(n.startswith("model-") for n in files[0]) == 3 and "lowbit.json" in files[0]
    assert files[0] == files[1]
