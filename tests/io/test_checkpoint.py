"""Checkpoints: bit-identical round trip, atomic writes, clear errors on corrupt or mismatched files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.formats.affine import IntAffine
from lowbit.io import checkpoint
from lowbit.io.checkpoint import CheckpointError
from lowbit.methods.rtn.api import RTNConfig
from lowbit.nn.linear import QuantLinear


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def quantized() -> tuple[LlamaForCausalLM, RTNConfig]:
    model = tiny_llama()
    cfg = RTNConfig(format=IntAffine(bits=3, group_size=48))  # 48 does not divide 64/160: short last groups
    lowbit.quantize_(model, cfg)
    return model, cfg


def test_round_trip_is_bit_identical(tmp_path: Path, quantized) -> None:
    model, cfg = quantized
    checkpoint.save(model, tmp_path / "ck", method=cfg)
    loaded = checkpoint.load(tmp_path / "ck")
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert set(sd0) == set(sd1)
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype, k
        assert torch.equal(sd0[k], sd1[k]), k
    n_quant = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_quant == 2 * 7
    x = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    manifest = checkpoint.read_manifest(tmp_path / "ck")
    assert manifest["method"]["kind"] == "rtn"


def test_no_pickle_in_checkpoint(tmp_path: Path, quantized) -> None:
    model, cfg = quantized
    checkpoint.save(model, tmp_path / "ck", method=cfg)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names), names
    assert "model.safetensors" in names and "lowbit.json" in names


def test_existing_output_is_not_overwritten(tmp_path: Path, quantized) -> None:
    model, cfg = quantized
    out = tmp_path / "ck"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="overwrite"):
        checkpoint.save(model, out, method=cfg)
    assert (out / "precious.txt").read_text() == "user data"
    checkpoint.save(model, out, method=cfg, overwrite=True)
    assert checkpoint.is_checkpoint(out) and not (out / "precious.txt").exists()


def test_crash_mid_write_leaves_no_partial_output(tmp_path: Path, quantized, monkeypatch) -> None:
    model, cfg = quantized
    out = tmp_path / "ck"

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        checkpoint.save(model, out, method=cfg)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind either


def test_truncated_weights_are_rejected(tmp_path: Path, quantized) -> None:
    model, cfg = quantized
    checkpoint.save(model, tmp_path / "ck", method=cfg)
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        checkpoint.load(tmp_path / "ck")


def test_flipped_byte_is_rejected(tmp_path: Path, quantized) -> None:
    model, cfg = quantized
    checkpoint.save(model, tmp_path / "ck", method=cfg)
    f = tmp_path / "ck" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(tmp_path / "ck")


def test_unverified_truncation_still_gives_clear_error(tmp_path: Path, quantized) -> None:
    model, cfg = quantized
    checkpoint.save(model, tmp_path / "ck", method=cfg)
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cannot read"):
        checkpoint.load(tmp_path / "ck", verify=False)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(lowbit_checkpoint=99), "version 99"),
    (lambda m: m.update(surprise=1), "unknown field"),
    (lambda m: next(iter(m["layers"].values()))["format"].update(bits=99), "bits"),
    (lambda m: next(iter(m["layers"].values()))["format"].update(kind="nope"), "unknown format kind"),
    (lambda m: next(iter(m["layers"].values())).update(shape=[64, 65]), "shape|fit|disagree"),
])
def test_bad_manifest_is_rejected(tmp_path: Path, quantized, edit, match) -> None:
    model, cfg = quantized
    checkpoint.save(model, tmp_path / "ck", method=cfg)
    mf = tmp_path / "ck" / "lowbit.json"
    m = json.loads(mf.read_text())
    edit(m)
    mf.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(tmp_path / "ck", verify=False)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a lowbit checkpoint"):
        checkpoint.load(tmp_path)
    (tmp_path / "lowbit.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        checkpoint.load(tmp_path)


def test_lowbit_load_returns_transformers_model_and_tokenizer(tmp_path: Path, quantized, word_tokenizer) -> None:
    """A sharded checkpoint with its tokenizer is a save_pretrained-style directory Hugging Face tooling reads,
    and lowbit.load gives back a transformers model (generate works) with QuantLinear layers."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

    from lowbit.loading import load_with_tokenizer

    model, cfg = quantized
    ck = checkpoint.save(model, tmp_path / "ck", method=cfg, tokenizer=word_tokenizer, max_shard_size=30_000)
    names = {p.name for p in ck.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors.index.json"} <= names
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"].values()) <= names
    assert AutoConfig.from_pretrained(str(ck), local_files_only=True).model_type == "llama"
    hf_tok = AutoTokenizer.from_pretrained(str(ck), local_files_only=True)
    loaded, tok = load_with_tokenizer(ck)
    assert isinstance(loaded, PreTrainedModel) and type(loaded).__name__ == "LlamaForCausalLM"
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 2 * 7
    text = "w1 w5 w17 w92 nope"
    assert tok(text)["input_ids"] == hf_tok(text)["input_ids"] == word_tokenizer(text)["input_ids"]
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        b = loaded.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b) and a.shape[1] == ids.shape[1] + 4
    assert isinstance(lowbit.load(ck), PreTrainedModel)
