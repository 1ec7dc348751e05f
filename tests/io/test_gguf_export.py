"""GGUF export: tensors, metadata typing, Q/K permutation, mixes, imatrix, atomic writes; round trips through
lowbit's GGUF importer and transformers' GGUF loader give the logits of the dequantized weights."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from lowbit.formats.ggml import dequantize_raw, quantize_raw
from lowbit.gguf_mix import tensor_types
from lowbit.io.gguf_export import export_gguf, hf_to_gguf_name, permute_qk
from lowbit.io.gguf_reader import read_gguf

transformers = pytest.importorskip("transformers")


def tiny_tokenizer(spm: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = ["The quick brown fox jumps over the lazy dog. " * 3, "Hello world, this is a test 12345.",
            "def f(x): return x * 2"] * 20
    if spm:
        tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        alphabet = [f"<0x{i:02X}>" for i in range(256)]
        tr = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + alphabet)
        tk.train_from_iterator(text, tr)
        return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tk.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, tr)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_llama(vocab: int, hidden: int = 256, layers: int = 2, tied: bool = True, seed: int = 0, ff: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=ff or 2 * hidden, vocab_size=vocab, max_position_embeddings=256,
                      tie_word_embeddings=tied, rms_norm_eps=1e-5)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a swapped norm would show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok))


@pytest.fixture(scope="module")
def small(tok):
    return tiny_llama(len(tok), layers=1, ff=256, seed=3)


def _ids(tok):
    return torch.tensor([tok.encode("Hello world, this is a test 12345. The quick brown fox.")])


def _expected_model(model, types):
    """The model whose weights are the dequantized bytes the exporter should have written."""
    import copy

    exp = copy.deepcopy(model)
    cfg = model.config
    with torch.no_grad():
        for mname, mod in exp.named_modules():
            g = hf_to_gguf_name(mname)
            if g is None or not hasattr(mod, "weight") or f"{g}.weight" not in types:
                continue
            t = types[f"{g}.weight"]
            W = mod.weight.detach().float()
            if W.dim() == 2:
                mod.weight.copy_(dequantize_raw(quantize_raw(W, t), t, tuple(W.shape)))
    return exp


def test_f32_export_round_trips_exactly_through_lowbit_importer(tmp_path, model, tok):
    from lowbit.io.gguf_model import load_gguf_model

    path = tmp_path / "m.gguf"
    res = export_gguf(model, tok, path, type="F32")
    assert set(res.tensor_types.values()) == {"F32"}
    m2, tok2 = load_gguf_model(path)
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert tok2.encode("Hello world 123 fox") == tok.encode("Hello world 123 fox")


SLOW = pytest.mark.slow


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M", "Q3_K_M", "IQ4_XS", pytest.param("Q4_0", marks=SLOW),
                                 pytest.param("Q2_K", marks=SLOW), pytest.param("Q4_K_S", marks=SLOW),
                                 pytest.param("Q5_K_M", marks=SLOW), pytest.param("Q6_K", marks=SLOW)])
def test_quantized_export_equals_dequantized_weights(tmp_path, small, tok, mix):
    model = small
    from lowbit.io.gguf_model import load_gguf_model

    path = tmp_path / f"{mix}.gguf"
    res = export_gguf(model, tok, path, type=mix)
    m2, _ = load_gguf_model(path)
    exp = _expected_model(model, res.tensor_types)
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, exp(ids).logits, rtol=0, atol=1e-4)
    g = read_gguf(path)
    try:
        for name, t in res.tensor_types.items():
            assert g.tensors[name].ggml_type.name == t, name
    finally:
        g.close()


def test_transformers_gguf_loader_agrees(tmp_path, small, tok):
    model = small
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    path = tmp_path / "q8.gguf"
    res = export_gguf(model, tok, path, type="Q8_0")
    try:
        m2 = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q8.gguf", dtype=torch.float32)
    except Exception as e:  # pragma: no cover - depends on the installed transformers' GGUF support
        pytest.skip(f"transformers cannot load GGUF here: {e}")
    exp = _expected_model(model, res.tensor_types)
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, exp(ids).logits, rtol=0, atol=1e-4)


def test_metadata_is_typed_as_llama_cpp_reads_it(tmp_path, model, tok):
    path = tmp_path / "m.gguf"
    export_gguf(model, tok, path, type="Q4_K_M")
    g = read_gguf(path)
    try:
        t = g.metadata_types
        U32, F32, STR, BOOL, ARR, I32 = 4, 6, 8, 7, 9, 5
        for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                  "attention.head_count", "attention.head_count_kv", "rope.dimension_count", "vocab_size"):
            assert t[f"llama.{k}"] == U32, k
        assert t["llama.rope.freq_base"] == F32 and t["llama.attention.layer_norm_rms_epsilon"] == F32
        assert t["general.file_type"] == U32 and g.metadata["general.file_type"] == 15
        assert t["general.quantization_version"] == U32
        assert t["tokenizer.ggml.model"] == STR and g.metadata["tokenizer.ggml.model"] == "gpt2"
        assert g.metadata["tokenizer.ggml.pre"] == "smollm"
        assert t["tokenizer.ggml.tokens"] == (ARR, STR) and t["tokenizer.ggml.token_type"] == (ARR, I32)
        assert t["tokenizer.ggml.merges"] == (ARR, STR)
        assert t["tokenizer.ggml.bos_token_id"] == U32 and t["tokenizer.ggml.add_bos_token"] == BOOL
        assert len(g.metadata["tokenizer.ggml.tokens"]) == g.tensors["token_embd.weight"].shape[0]
        assert "output.weight" not in g.tensors  # tied
        assert g.tensors["blk.0.attn_norm.weight"].ggml_type.name == "F32"
        # data layout as gguf.cpp demands: offsets contiguous in info order, padded to 32
        expected = g.data_offset
        for info in g.tensors.values():
            assert info.offset == expected, info.name
            expected += -(-info.nbytes // 32) * 32
        assert os.path.getsize(path) == expected
    finally:
        g.close()


def test_qk_permutation_matches_llama_cpp_pair_rotation():
    """After the permutation, rotating adjacent pairs (llama.cpp) equals rotating halves (transformers)."""
    torch.manual_seed(0)
    n_head, hd = 2, 8
    W = torch.randn(n_head * hd, 5)
    x = torch.randn(5)
    q_hf = (W @ x).reshape(n_head, hd)
    q_gg = (permute_qk(W, n_head) @ x).reshape(n_head, hd)
    theta = torch.rand(hd // 2) * 3
    c, s = torch.cos(theta), torch.sin(theta)
    h1, h2 = q_hf[:, : hd // 2], q_hf[:, hd // 2:]
    rot_hf = torch.cat([h1 * c - h2 * s, h1 * s + h2 * c], dim=1)
    e, o = q_gg[:, 0::2], q_gg[:, 1::2]
    rot_gg = torch.stack([e * c - o * s, e * s + o * c], dim=2).reshape(n_head, hd)
    torch.testing.assert_close(permute_qk(rot_hf.reshape(-1, 1), n_head).reshape(n_head, hd), rot_gg)
    raw = np.arange(16 * 3).reshape(16, 3)
    assert np.array_equal(permute_qk(raw, 2), permute_qk(torch.from_numpy(raw), 2).numpy())


def _smollm_tensors(n_layer: int = 30):
    ts = [("token_embd.weight", (49152, 576)), ("output_norm.weight", (576,))]
    for i in range(n_layer):
        for n, s in [("attn_q", (576, 576)), ("attn_k", (192, 576)), ("attn_v", (192, 576)),
                     ("attn_output", (576, 576)), ("ffn_gate", (1536, 576)), ("ffn_up", (1536, 576)),
                     ("ffn_down", (576, 1536)), ("attn_norm", (576,)), ("ffn_norm", (576,))]:
            ts.append((f"blk.{i}.{n}.weight", s))
    return ts


def test_q4_k_m_choices_on_the_default_model_shapes():
    """Hand-derived from llama-quant.cpp for SmolLM2-135M (30 layers, rows 576/1536, tied embeddings):
    576-wide rows do not fit 256-blocks: Q4_K → Q5_0, Q6_K → Q8_0; the tied token_embd is treated as output."""
    t = tensor_types(_smollm_tensors(), "Q4_K_M", n_layer=30, n_head=9, n_head_kv=3)
    more = {i for i in range(30) if i < 3 or i >= 26 or (i - 3) % 3 == 2}
    assert t["token_embd.weight"] == "Q8_0" and t["output_norm.weight"] == "F32"
    for i in range(30):
        assert t[f"blk.{i}.attn_v.weight"] == ("Q8_0" if i in more else "Q5_0")
        assert t[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")
        for n in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert t[f"blk.{i}.{n}.weight"] == "Q5_0"
        assert t[f"blk.{i}.attn_norm.weight"] == "F32"


def test_mix_rules_for_256_multiple_rows():
    """A 16-layer model with 4096-wide rows (no fallbacks), GQA 4: the table of the reference notes."""
    ts = [("token_embd.weight", (32000, 4096)), ("output.weight", (32000, 4096))]
    for i in range(16):
        ts += [(f"blk.{i}.attn_v.weight", (1024, 4096)), (f"blk.{i}.ffn_down.weight", (4096, 11008 // 256 * 256)),
               (f"blk.{i}.attn_output.weight", (4096, 4096)), (f"blk.{i}.attn_q.weight", (4096, 4096))]
    more = {0, 1, 4, 7, 10, 13, 14, 15}
    t = tensor_types(ts, "Q4_K_M", 16, 32, 8)
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert [t[f"blk.{i}.attn_v.weight"] == "Q6_K" for i in range(16)] == [i in more for i in range(16)]
    t = tensor_types(ts, "Q2_K", 16, 32, 8)
    assert t["blk.0.attn_v.weight"] == "Q4_K" and t["blk.0.ffn_down.weight"] == "Q3_K"
    assert t["blk.0.attn_output.weight"] == "Q3_K" and t["blk.0.attn_q.weight"] == "Q2_K"
    t = tensor_types(ts, "Q3_K_M", 16, 32, 8)
    assert [t[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert t["blk.0.ffn_down.weight"] == "Q5_K" and t["blk.1.ffn_down.weight"] == "Q4_K"
    t = tensor_types(ts, "Q4_K_S", 16, 32, 8)
    assert [t[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [t[f"blk.{i}.ffn_down.weight"] for i in (1, 2)] == ["Q5_K", "Q4_K"]
    t = tensor_types(ts, "Q4_0", 16, 32, 8, has_imatrix=True)
    assert t["blk.1.ffn_down.weight"] == "Q4_1" and t["blk.2.ffn_down.weight"] == "Q4_0"
    assert t["output.weight"] == "Q6_K"
    t = tensor_types(ts, "Q4_K", 16, 32, 8)  # a single block type is used pure
    assert set(t.values()) == {"Q4_K"}
    with pytest.raises(ValueError, match="valid mixes"):
        tensor_types(ts, "Q4_K_X", 16, 32, 8)


def test_imatrix_guides_the_export(tmp_path, small, tok):
    model = small
    from lowbit.io.imatrix import collect_imatrix

    ids = _ids(tok)
    im = collect_imatrix(model, [ids, ids.flip(1)])
    path = tmp_path / "im.gguf"
    res = export_gguf(model, tok, path, type="Q4_K_M", imatrix=im)
    g = read_gguf(path)
    try:
        W = model.model.layers[0].mlp.up_proj.weight.detach()
        t = res.tensor_types["blk.0.ffn_up.weight"]
        expect = quantize_raw(W, t, imatrix=im.importance("blk.0.ffn_up.weight"))
        assert np.array_equal(g.raw("blk.0.ffn_up.weight").reshape(expect.shape), expect)
        assert not np.array_equal(expect, quantize_raw(W, t))
    finally:
        g.close()


def test_ggml_quantlinear_bytes_are_written_unchanged(tmp_path, tok):
    from lowbit.formats.ggml.format import Q4_K
    from lowbit.methods.rtn.api import RTNConfig
    from lowbit.quantize import quantize_

    m = tiny_llama(len(tok), seed=1, ff=256)
    W = m.model.layers[1].self_attn.q_proj.weight.detach().clone()
    quantize_(m, RTNConfig(format=Q4_K()), ignore=["lm_head"])
    path = tmp_path / "ql.gguf"
    res = export_gguf(m, tok, path, type="Q8_0")
    assert "blk.1.attn_q.weight" in res.preserved and res.tensor_types["blk.1.attn_q.weight"] == "Q4_K"
    g = read_gguf(path)
    try:
        expect = permute_qk(quantize_raw(W, "Q4_K"), 4)
        assert np.array_equal(g.raw("blk.1.attn_q.weight").reshape(expect.shape), expect)
    finally:
        g.close()


def test_spm_style_tokenizer_metadata(tmp_path):
    tok = tiny_tokenizer(spm=True)
    m = tiny_llama(len(tok), layers=1)
    path = tmp_path / "spm.gguf"
    export_gguf(m, tok, path, type="F16")
    g = read_gguf(path)
    try:
        md, t = g.metadata, g.metadata_types
        assert md["tokenizer.ggml.model"] == "llama" and t["tokenizer.ggml.scores"] == (9, 6)
        types = md["tokenizer.ggml.token_type"]
        toks = md["tokenizer.ggml.tokens"]
        assert types[toks.index("<0x0A>")] == 6 and types[toks.index("<unk>")] == 2
        assert types[toks.index("<s>")] == 3 and md["tokenizer.ggml.bos_token_id"] == toks.index("<s>")
        assert md["tokenizer.ggml.add_space_prefix"] is True
    finally:
        g.close()


def test_write_is_atomic(tmp_path, model, tok):
    path = tmp_path / "a.gguf"
    path.write_bytes(b"old")

    def boom(done, total, name):
        if done == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        export_gguf(model, tok, path, type="F16", progress=boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.gguf"]


def test_rejects_unsupported_input(tmp_path, model, tok):
    with pytest.raises(ValueError, match="valid mixes"):
        export_gguf(model, tok, tmp_path / "x.gguf", type="Q4_K_Z")

    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(ValueError, match="supported"):
        export_gguf(Fake(), tok, tmp_path / "y.gguf")


def test_qwen2_with_biases_round_trips_through_transformers(tmp_path, tok):
    """Qwen2 (arch ``qwen2``: NEOX rope, no Q/K permutation, q/k/v biases, untied output)."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=len(tok), max_position_embeddings=128, tie_word_embeddings=False)
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    res = export_gguf(m, tok, tmp_path / "q.gguf", type="F32")
    assert {"blk.0.attn_q.bias", "output.weight"} <= set(res.tensor_types)
    m2 = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32)
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, m(ids).logits, rtol=0, atol=1e-5)


def test_mix_module_types_are_the_types_export_writes(tmp_path, small, tok):
    """``mix_module_types`` (what AWQ/GPTQ runs target to store their own blocks in a mix) names, per module, the
    type ``export_gguf`` then writes for that module's weight."""
    from lowbit.io.gguf_export import mix_module_types

    for mix in ("Q4_K_M", "Q3_K_M", "Q8_0"):
        by_module = mix_module_types(small, mix)
        written = export_gguf(small, tok, tmp_path / f"{mix}.gguf", type=mix).tensor_types
        assert by_module == {m: written[f"{hf_to_gguf_name(m)}.weight"] for m in by_module}
        assert {f"{hf_to_gguf_name(m)}.weight" for m in by_module} == {n for n in written if n.endswith(".weight")}
