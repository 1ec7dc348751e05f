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
CONFIGS_CT = {"rtn_ct": RTNConfig(format=IntAffine(bits=4, group_size=32, symmetric=False))}


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


@pytest.mark.parametrize("method", ["gptq-w4a16-g32-actorder", "awq-w4a16-g32", "smoothquant-w8a8-int8"])
def test_compressed_tensors_export_byte_identical_across_runs(tmp_path: Path, method: str) -> None:
    """Quantize + export twice from the same seed: the same bytes in every file; another seed changes them."""
    pytest.importorskip("compressed_tensors")
    import sys

    from lowbit.io.compressed_tensors import export_compressed_tensors

    sys.path.insert(0, str(Path(__file__).parent))
    from test_compressed_tensors import _method_configs

    cfg = _method_configs()[method]

    def export(seed: int, out: Path) -> dict[str, bytes]:
        model = tiny_llama(seed)
        calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(seed))
        lowbit.quantize_(model, cfg, calibration=calib)  # type: ignore[arg-type]
        export_compressed_tensors(model, out)
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    a, b = export(0, tmp_path / "a"), export(0, tmp_path / "b")
    assert set(a) == {"config.json", "model.safetensors"}
    assert a == b
    assert export(1, tmp_path / "c")["model.safetensors"] != a["model.safetensors"]


_CHILD = """
import sys, torch
sys.path.insert(0, {testdir!r})
import lowbit
from lowbit.io import checkpoint
from lowbit.io.compressed_tensors import export_compressed_tensors
from test_determinism import CONFIGS, CONFIGS_CT, tiny_llama
model = tiny_llama(0)
calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
lowbit.quantize_(model, CONFIGS["gptq"], calibration=calib)
out = sys.argv[1]
checkpoint.save(model, out + "/ck", method=CONFIGS["gptq"])
model = tiny_llama(0)
lowbit.quantize_(model, CONFIGS_CT["rtn_ct"])
export_compressed_tensors(model, out + "/ct")
"""


@pytest.mark.slow  # two fresh interpreters (torch + transformers imports): ~75 s on the shared machine
def test_byte_identical_across_processes(tmp_path: Path) -> None:
    """Two interpreters with different hash seeds (set/dict-order hazards) write the same bytes."""
    import os
    import subprocess
    import sys

    pytest.importorskip("compressed_tensors")
    script = _CHILD.format(testdir=str(Path(__file__).parent))
    trees = []
    for seed in ("1", "2"):
        d = tmp_path / f"run{seed}"
        d.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        p = subprocess.run([sys.executable, "-c", script, str(d)], capture_output=True, text=True, env=env,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        trees.append({str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()})
    assert {"ck/model.safetensors", "ck/lowbit.json", "ct/model.safetensors", "ct/config.json"} <= set(trees[0])
    assert trees[0] == trees[1]
