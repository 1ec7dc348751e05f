"""Hostile and broken input: a clear error naming the problem, nothing written, no pickle, no crash under fuzzing."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.formats.affine import IntAffine
from lowbit.io import checkpoint
from lowbit.io.checkpoint import CheckpointError
from lowbit.io.streaming import SUPPORTED_ARCHITECTURES, quantize_streaming
from lowbit.methods.rtn.api import RTNConfig

RTN = RTNConfig(format=IntAffine(bits=4, group_size=32))
SRC_ROOT = Path(lowbit.__file__).parent


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    tiny_llama().save_pretrained(str(tmp_path / "src"))
    return tmp_path / "src"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama()
    lowbit.quantize_(model, RTN)
    return checkpoint.save(model, tmp_path_factory.mktemp("ck") / "ck", method=RTN)


def nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / ".out.partial").exists()


def copy_ck(ck: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(ck, dst)
    return dst


# --- source models (streaming) -----------------------------------------------------------------------------

def test_truncated_source_safetensors(tmp_path: Path, source: Path) -> None:
    f = source / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        quantize_streaming(source, tmp_path / "out", RTN)
    nothing_written(tmp_path)


def test_corrupt_source_header(tmp_path: Path, source: Path) -> None:
    f = source / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[8:20] = b"\xff" * 12  # the JSON header
    f.write_bytes(bytes(b))
    with pytest.raises(CheckpointError, match="cannot read"):
        quantize_streaming(source, tmp_path / "out", RTN)
    nothing_written(tmp_path)


def test_source_shape_disagrees_with_config(tmp_path: Path, source: Path) -> None:
    t = load_file(str(source / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 31)
    save_file(t, str(source / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(64, 31\).*\(64, 32\)"):
        quantize_streaming(source, tmp_path / "out", RTN)
    nothing_written(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_source_weights(tmp_path: Path, source: Path, bad: float) -> None:
    t = load_file(str(source / "model.safetensors"))
    t["model.layers.1.self_attn.o_proj.weight"][3, 5] = bad
    save_file(t, str(source / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight.*NaN/Inf"):
        quantize_streaming(source, tmp_path / "out", RTN)
    nothing_written(tmp_path)  # block 0 was already written to the partial dir; it is removed


def test_non_finite_weights_in_memory() -> None:
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"down_proj"):
        lowbit.quantize_(model, RTN)


def test_unknown_architecture_names_supported(tmp_path: Path, source: Path) -> None:
    cfg = json.loads((source / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    cfg["architectures"] = ["NoSuchArchForCausalLM"]
    (source / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=re.escape(str(list(SUPPORTED_ARCHITECTURES)))):
        quantize_streaming(source, tmp_path / "out", RTN)
    nothing_written(tmp_path)


def test_source_without_safetensors_is_refused(tmp_path: Path, source: Path) -> None:
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"\x80\x04not read")  # a pickle is never opened
    with pytest.raises(CheckpointError, match="no pickle"):
        quantize_streaming(source, tmp_path / "out", RTN)
    nothing_written(tmp_path)


# --- lowbit checkpoints ------------------------------------------------------------------------------------

@pytest.mark.parametrize("verify", [True, False])
def test_truncated_checkpoint_weights(tmp_path: Path, ckpt: Path, verify: bool) -> None:
    ck = copy_ck(ckpt, tmp_path)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated" if verify else "cannot read"):
        checkpoint.load(ck, verify=verify)


def test_manifest_unknown_field_and_future_version(tmp_path: Path, ckpt: Path) -> None:
    ck = copy_ck(ckpt, tmp_path)
    m = json.loads((ck / "lowbit.json").read_text())
    (ck / "lowbit.json").write_text(json.dumps({**m, "surprise": 1}))
    with pytest.raises(CheckpointError, match=r"unknown field\(s\) \['surprise'\]; valid fields"):
        checkpoint.load(ck)
    (ck / "lowbit.json").write_text(json.dumps({**m, "lowbit_checkpoint": checkpoint.CHECKPOINT_VERSION + 1}))
    with pytest.raises(CheckpointError, match="upgrade lowbit"):
        checkpoint.load(ck)


def test_layer_format_with_unknown_field(tmp_path: Path, ckpt: Path) -> None:
    ck = copy_ck(ckpt, tmp_path)
    m = json.loads((ck / "lowbit.json").read_text())
    name = sorted(m["layers"])[0]
    m["layers"][name]["format"]["wobble"] = 3
    (ck / "lowbit.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=rf"layer {re.escape(name)}.*wobble"):
        checkpoint.load(ck, verify=False)


def test_checkpoint_shape_disagrees_with_manifest(tmp_path: Path, ckpt: Path) -> None:
    ck = copy_ck(ckpt, tmp_path)
    m = json.loads((ck / "lowbit.json").read_text())
    m["layers"]["model.layers.0.mlp.up_proj"]["shape"] = [64, 64]
    (ck / "lowbit.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj"):
        checkpoint.load(ck, verify=False)


def test_no_pickle_on_load_paths() -> None:
    """No module of lowbit may unpickle: no torch.load, pickle, allow_pickle or weights_only=False."""
    pattern = re.compile(r"torch\.load\b|\bimport pickle\b|\bpickle\.|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
                         r"|\bcloudpickle\b|\bjoblib\.load|\bdill\b")
    files = sorted(SRC_ROOT.rglob("*.py"))
    assert len(files) > 30  # the scan really covers the package
    hits = [f"{p.relative_to(SRC_ROOT)}:{i}: {line.strip()}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# --- fuzzing -----------------------------------------------------------------------------------------------

def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(3)
    if op == 0 or len(b) < 2:
        return bytes(b[: rng.randrange(len(b))])  # truncation
    for _ in range(rng.randint(1, 8)):  # byte flips, biased to the start (headers, JSON structure)
        i = rng.randrange(min(len(b), 512)) if op == 1 else rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


@pytest.mark.parametrize("target", ["lowbit.json", "model.safetensors"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "noverify"])
def test_fuzz_checkpoint_loader(tmp_path: Path, ckpt: Path, target: str, verify: bool) -> None:
    """Random truncations and bit flips: only CheckpointError/ValueError, never another exception or a hang."""
    import signal

    ck = copy_ck(ckpt, tmp_path)
    original = (ckpt / target).read_bytes()
    rng = random.Random(f"{target}-{verify}")
    outcomes = {"loaded": 0, "rejected": 0}

    def alarm(*_):  # noqa: ANN002
        raise TimeoutError("the checkpoint loader hung on a mutated file")

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        for _ in range(40):
            (ck / target).write_bytes(_mutate(original, rng))
            signal.alarm(20)
            try:
                model = checkpoint.load(ck, verify=verify)
                assert any(isinstance(m, torch.nn.Module) for m in model.modules())
                outcomes["loaded"] += 1
            except (CheckpointError, ValueError):
                outcomes["rejected"] += 1
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["rejected"] > 0
    if verify and target == "model.safetensors":
        assert outcomes["loaded"] == 0  # every change to the weights is caught by the hash


def _json_nodes(obj, path=()):  # noqa: ANN001, ANN202
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_nodes(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_nodes(v, (*path, i))


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "noverify"])
def test_fuzz_manifest_structure(tmp_path: Path, ckpt: Path, verify: bool) -> None:
    """Valid JSON with a node replaced by a value of another type or range: a CheckpointError/ValueError, no crash."""
    ck = copy_ck(ckpt, tmp_path)
    original = json.loads((ckpt / "lowbit.json").read_text())
    paths = [p for p in _json_nodes(original) if p and p[0] != "files"] if not verify else list(_json_nodes(original))[1:]
    rng = random.Random(f"structure-{verify}")
    values = [None, -1, 0, 2**40, 1.5, "x", "float64", [], {}, [1, 2], {"a": 1}, True, [2**31, 2**31]]
    rejected = 0
    for _ in range(60):
        doc = json.loads(json.dumps(original))
        path = rng.choice(paths)
        node = doc
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = rng.choice(values)
        (ck / "lowbit.json").write_text(json.dumps(doc))
        try:
            checkpoint.load(ck, verify=verify)
        except (CheckpointError, ValueError):
            rejected += 1
    assert rejected > 0


_PICKLE_EVENTS: list[str] = []
_ARMED = [False]
_HOOKED: list[bool] = []


def _audit(event: str, args: tuple) -> None:  # noqa: ANN001
    if _ARMED[0] and event == "pickle.find_class":  # raised by every unpickler (C or Python) resolving a global
        _PICKLE_EVENTS.append(f"{args[0]}.{args[1]}")


def test_no_pickle_at_run_time(tmp_path: Path, source: Path, word_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the load paths with an audit hook on unpickling and torch.load disabled: nothing unpickles."""
    import collections
    import pickle
    import sys

    from lowbit.loading import load_with_tokenizer

    if not _HOOKED:
        sys.addaudithook(_audit)  # audit hooks cannot be removed; it records only while armed
        _HOOKED.append(True)

    def no_torch_load(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("torch.load called on a load path")

    monkeypatch.setattr(torch, "load", no_torch_load)
    _PICKLE_EVENTS.clear()
    _ARMED[0] = True
    try:
        pickle.loads(pickle.dumps(collections.OrderedDict(a=1)))  # the detector works
        assert _PICKLE_EVENTS == ["collections.OrderedDict"]
        _PICKLE_EVENTS.clear()
        out = quantize_streaming(source, tmp_path / "out", RTN)  # safetensors source -> sharded checkpoint
        model = tiny_llama()
        lowbit.quantize_(model, RTN)
        ck = checkpoint.save(model, tmp_path / "ck", method=RTN, tokenizer=word_tokenizer)
        for path in (out, ck):
            checkpoint.read_manifest(path)
            loaded, _ = load_with_tokenizer(path)
            assert isinstance(loaded, torch.nn.Module)
    finally:
        _ARMED[0] = False
    assert _PICKLE_EVENTS == []


@pytest.fixture(scope="module")
def sharded_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama()
    lowbit.quantize_(model, RTN)
    return checkpoint.save(model, tmp_path_factory.mktemp("sck") / "ck", method=RTN, max_shard_size=20_000)


@pytest.mark.parametrize("target", ["model.safetensors.index.json", "model-00002-of-{n}.safetensors", "config.json"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "noverify"])
def test_fuzz_sharded_checkpoint_loader(tmp_path: Path, sharded_ckpt: Path, target: str, verify: bool) -> None:
    """Sharded checkpoints: mutated index, shard or config gives CheckpointError/ValueError, nothing else."""
    n = len(list(sharded_ckpt.glob("model-*.safetensors")))
    target = target.format(n=f"{n:05d}")
    ck = copy_ck(sharded_ckpt, tmp_path)
    original = (sharded_ckpt / target).read_bytes()
    rng = random.Random(f"sharded-{target}-{verify}")
    rejected = 0
    for _ in range(30):
        (ck / target).write_bytes(_mutate(original, rng))
        try:
            checkpoint.load(ck, verify=verify)
        except (CheckpointError, ValueError):
            rejected += 1
    assert rejected > 0
    if verify:  # every recorded file is hashed: no mutation gets through
        assert rejected == 30


@pytest.mark.parametrize("tensor", ["model.layers.0.mlp.up_proj.scale", "model.norm.weight"])
def test_non_finite_checkpoint_tensor_with_valid_hashes(tmp_path: Path, ckpt: Path, tensor: str) -> None:
    """A crafted checkpoint (hashes recomputed, so verification passes) with a NaN scale or weight is refused."""
    ck = copy_ck(ckpt, tmp_path)
    t = load_file(str(ck / "model.safetensors"))
    assert tensor in t
    t[tensor].view(-1)[0] = float("nan")
    save_file(t, str(ck / "model.safetensors"), metadata={"format": "pt"})
    m = json.loads((ck / "lowbit.json").read_text())
    m["files"]["model.safetensors"] = {"sha256": checkpoint._sha256(ck / "model.safetensors"),
                                       "bytes": (ck / "model.safetensors").stat().st_size}
    (ck / "lowbit.json").write_text(json.dumps(m))
    checkpoint.read_manifest(ck)  # the hashes are consistent
    with pytest.raises(CheckpointError, match=rf"{re.escape(tensor)}.*NaN/Inf"):
        checkpoint.load(ck)


def test_cli_on_broken_inputs_errors_clearly_and_writes_nothing(tmp_path: Path, ckpt: Path, source: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`lowbit export` from a truncated checkpoint and `lowbit quantize --stream` from a truncated source: exit
    code 2, a message naming the file, no output."""
    from lowbit.cli.main import main

    ck = copy_ck(ckpt, tmp_path)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-50])
    assert main(["export", str(ck), "--format", "compressed-tensors", "--out", str(tmp_path / "out")]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    nothing_written(tmp_path)
    g = source / "model.safetensors"
    g.write_bytes(g.read_bytes()[:-50])
    assert main(["quantize", str(source), "--method", "rtn", "--bits", "4", "--group-size", "32", "--stream",
                 "--out", str(tmp_path / "out")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    nothing_written(tmp_path)
