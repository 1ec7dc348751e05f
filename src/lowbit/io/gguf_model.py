"""Load a Llama-family GGUF file into a transformers ``LlamaForCausalLM`` and a fast tokenizer.

The file is parsed by our own :mod:`lowbit.io.gguf_reader`; every tensor, whatever its ggml type (Q4_1,
Q8_0, K-quants, ...), is dequantized to float. llama.cpp runs LLaMA with rotary pairs ``(2i, 2i+1)`` while
transformers pairs ``(i, i + head_dim/2)``, so the converter (``convert_hf_to_gguf.py``) permuted the rows of
``attn_q``/``attn_k`` within each head; :func:`unpermute_qk` undoes it (reference/gguf.md section 1.8).

The tokenizer is rebuilt from ``tokenizer.ggml.*`` metadata as a ``PreTrainedTokenizerFast``:

* ``gpt2`` (byte-level BPE): tokens, merges, the pre-tokenizer split named by ``tokenizer.ggml.pre``
  (``default``/``gpt2``, ``smollm``, ``llama-bpe``/``llama3``/``llama-v3``, ``qwen2``), control tokens as
  special tokens, user-defined tokens as added tokens.
* ``llama`` (SentencePiece BPE with byte fallback): tokens and scores; merges are derived from the scores.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch

from lowbit.io.gguf_reader import GGUFFile, read_gguf

__all__ = ["SUPPORTED_ARCHITECTURES", "load_gguf_model", "gguf_to_llama_config", "gguf_tokenizer",
           "unpermute_qk"]

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name -> transformers LlamaForCausalLM name (reference/gguf.md section 1.7)
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")

# byte-level BPE pre-tokenizer splits, by ``tokenizer.ggml.pre`` (regexes as in llama.cpp's llama-vocab.cpp)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_PRE = {"default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "smollm": "digits+gpt2", "llama-bpe": _LLAMA3_SPLIT,
            "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo ``convert_hf_to_gguf.py``'s per-head row interleave of Q/K projections.

    Args:
        w: ``(n_head * head_dim, in_features)`` weight or ``(n_head * head_dim,)`` bias in GGUF row order,
            where GGUF row ``2i + k`` of a head holds transformers row ``k * head_dim/2 + i``.
        n_head: heads in ``w`` (``head_count`` for Q, ``head_count_kv`` for K).

    Returns:
        The same tensor in transformers (``rotate_half``) row order.
    """
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"cannot unpermute {tuple(w.shape)} with n_head={n_head}: rows must be a multiple of "
                         f"2 * n_head = {2 * n_head}")
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _meta(g: GGUFFile, key: str, default: Any = None, required: bool = False) -> Any:
    if key in g.metadata:
        return g.metadata[key]
    if required:
        raise ValueError(f"{g.path}: required metadata key {key!r} is missing")
    return default


def _uniform(value: Any, key: str) -> int:
    """``llama.*`` counts may be a scalar or a per-layer array; transformers' Llama needs one value."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ValueError(f"{key} varies per layer ({value[:8]}...); LlamaForCausalLM needs one value")
        return int(value[0])
    return int(value)


def gguf_to_llama_config(g: GGUFFile) -> Any:
    """A ``transformers.LlamaConfig`` from ``llama.*`` metadata (reference/gguf.md section 1.6).

    Raises:
        ValueError: the architecture is not one of :data:`SUPPORTED_ARCHITECTURES`, or a required key is missing.
    """
    from transformers import LlamaConfig

    arch = _meta(g, "general.architecture", required=True)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {SUPPORTED_ARCHITECTURES}")
    p = f"{arch}."
    hidden = int(_meta(g, p + "embedding_length", required=True))
    n_head = _uniform(_meta(g, p + "attention.head_count", required=True), p + "attention.head_count")
    n_kv = _uniform(_meta(g, p + "attention.head_count_kv", n_head), p + "attention.head_count_kv")
    head_dim = int(_meta(g, p + "attention.key_length", hidden // n_head))
    n_rot = int(_meta(g, p + "rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise ValueError(f"rope.dimension_count={n_rot} differs from head_dim={head_dim}; partial rotary "
                         f"embeddings are not supported for {arch!r}")
    if "token_embd.weight" not in g.tensors:
        raise ValueError(f"{g.path}: tensor 'token_embd.weight' is missing")
    tokens = _meta(g, "tokenizer.ggml.tokens")
    vocab = g.tensors["token_embd.weight"].shape[0]
    if tokens is not None and len(tokens) != vocab:
        raise ValueError(f"{len(tokens)} tokenizer tokens but token_embd.weight has {vocab} rows")
    kwargs: dict[str, Any] = {}
    scaling = _meta(g, p + "rope.scaling.type", "none")
    if scaling == "linear" and float(_meta(g, p + "rope.scaling.factor", 1.0)) != 1.0:
        kwargs["rope_scaling"] = {"rope_type": "linear", "factor": float(_meta(g, p + "rope.scaling.factor"))}
    elif scaling not in ("none", "linear"):
        raise ValueError(f"rope scaling type {scaling!r} is not supported; supported: 'none', 'linear' "
                         f"(and llama3-style rope_freqs.weight)")
    has_bias = any(n.endswith(".bias") and ".attn_" in n for n in g.tensors)
    mlp_bias = any(n.endswith(".bias") and ".ffn_" in n for n in g.tensors)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_uniform(_meta(g, p + "feed_forward_length", required=True), p + "feed_forward_length"),
        num_hidden_layers=int(_meta(g, p + "block_count", required=True)),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=int(_meta(g, p + "context_length", 2048)),
        rms_norm_eps=float(_meta(g, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_meta(g, p + "rope.freq_base", 10000.0)),
        attention_bias=has_bias,
        mlp_bias=mlp_bias,
        tie_word_embeddings="output.weight" not in g.tensors,
        bos_token_id=_meta(g, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_meta(g, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_meta(g, "tokenizer.ggml.padding_token_id"),
        **kwargs,
    )
    return config


def _state_dict(g: GGUFFile, n_head: int, n_kv: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor],
                                                                                    torch.Tensor | None]:
    sd: dict[str, torch.Tensor] = {}
    rope_freqs = None
    for name in g.tensors:
        if name == "rope_freqs.weight":
            rope_freqs = g.tensor(name)
            continue
        if name in _GLOBAL_NAMES:
            target = _GLOBAL_NAMES[name]
        else:
            m = _BLOCK_RE.match(name)
            if m is None or m.group(2) not in _BLOCK_NAMES:
                raise ValueError(f"GGUF tensor {name!r} has no place in LlamaForCausalLM; known: "
                                 f"{sorted(_GLOBAL_NAMES)} and blk.N.{{{','.join(_BLOCK_NAMES)}}}.weight/bias")
            target = f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
            if m.group(2) in ("attn_q", "attn_k"):
                sd[target] = unpermute_qk(g.tensor(name), n_head if m.group(2) == "attn_q" else n_kv).to(dtype)
                continue
        sd[target] = g.tensor(name).to(dtype)
    return sd, rope_freqs


def load_gguf_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, *,
                    llamacpp_cpu_numerics: bool = False) -> tuple[Any, Any]:
    """Load a Llama-family GGUF file as ``(LlamaForCausalLM, PreTrainedTokenizerFast)``.

    Every tensor is dequantized to ``dtype``: the returned model is a plain float model whose weights equal the
    file's dequantized values (for the default model these already carry its publisher's Q4_1 rounding).

    Args:
        path: a ``.gguf`` file with ``general.architecture`` in :data:`SUPPORTED_ARCHITECTURES`.
        dtype: parameter dtype of the returned model.
        llamacpp_cpu_numerics: also round every matmul input as llama.cpp's x86 CPU backend does for that weight's
            type (Q8_0/Q8_1/Q8_K activations; :func:`lowbit.io.gguf_llamacpp.emulate_llamacpp_cpu`), so the
            model evaluates like ``llama.cpp`` on a CPU rather than like the dequantized weights (llama.cpp's
            BLAS/GPU paths).

    Returns:
        ``(model, tokenizer)``; the model is in eval mode on the CPU.

    Raises:
        ValueError: unsupported architecture or tokenizer, malformed file, or tensors that do not fit the model.
    """
    from transformers import LlamaForCausalLM

    g = read_gguf(path)
    try:
        config = gguf_to_llama_config(g)
        sd, rope_freqs = _state_dict(g, config.num_attention_heads, config.num_key_value_heads, dtype)
        tokenizer = gguf_tokenizer(g)
    finally:
        g.close()
    model = LlamaForCausalLM(config)
    # assign=True puts the dequantized tensors (already in ``dtype``) in place without a copy; buffers such as
    # the rotary inv_freq keep their float32
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"GGUF tensors do not fit LlamaForCausalLM: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if rope_freqs is not None:
        # llama.cpp divides each rotary frequency by its factor (Llama-3.1 "llama3" rope scaling)
        rot = model.model.rotary_emb
        if rope_freqs.shape != rot.inv_freq.shape:
            raise ValueError(f"rope_freqs.weight has shape {tuple(rope_freqs.shape)}, expected "
                             f"{tuple(rot.inv_freq.shape)}")
        rot.inv_freq = rot.inv_freq / rope_freqs.to(rot.inv_freq.dtype)
        rot.original_inv_freq = rot.inv_freq.clone()
    bad = sorted({str(p.dtype) for p in model.parameters() if p.dtype != dtype})
    if bad:
        raise ValueError(f"parameters left in {bad} after loading, expected {dtype}")
    model.eval()
    if llamacpp_cpu_numerics:
        from lowbit.io.gguf_llamacpp import emulate_llamacpp_cpu

        emulate_llamacpp_cpu(model, path)
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    logger.info("loaded %s: %d layers, hidden %d, vocab %d, %s", os.fspath(path), config.num_hidden_layers,
                config.hidden_size, config.vocab_size, dtype)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------- tokenizer

def gguf_tokenizer(g: GGUFFile) -> Any:
    """A ``PreTrainedTokenizerFast`` from ``tokenizer.ggml.*`` metadata.

    Raises:
        ValueError: the tokenizer model or (for ``gpt2``) pre-tokenizer is not supported; the message names
            the supported ones.
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    kind = _meta(g, "tokenizer.ggml.model", required=True)
    tokens: list[str] = _meta(g, "tokenizer.ggml.tokens", required=True)
    types: list[int] = _meta(g, "tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = _byte_level_bpe(g, tokens)
    elif kind == "llama":
        backend = _sentencepiece_bpe(g, tokens)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r}; supported: 'gpt2', 'llama'")

    def token(key: str) -> str | None:
        idx = _meta(g, f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos = token("bos_token_id")
    add_bos = bool(_meta(g, "tokenizer.ggml.add_bos_token", kind == "llama"))
    add_eos = bool(_meta(g, "tokenizer.ggml.add_eos_token", False))
    _post_processor(backend, tokens, bos if add_bos else None, token("eos_token_id") if add_eos else None)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=token("eos_token_id"),
                                  unk_token=token("unknown_token_id"), pad_token=token("padding_token_id"),
                                  chat_template=_meta(g, "tokenizer.chat_template"))
    tok.model_max_length = int(_meta(g, f"{_meta(g, 'general.architecture', '')}.context_length", 2048))
    return tok


def _post_processor(backend: Any, tokens: list[str], bos: str | None, eos: str | None) -> None:
    from tokenizers import processors

    if bos is None and eos is None:
        return
    ids = {t: i for i, t in enumerate(tokens)}
    pre = [f"{bos}:0"] if bos else []
    post = [f"{eos}:0"] if eos else []
    special = [(t, ids[t]) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(pre + ["$A:0"] + post), pair=" ".join(pre + ["$A:0"] + post + pre + ["$B:1"] + post),
        special_tokens=special)


def _byte_level_bpe(g: GGUFFile, tokens: list[str]) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges_raw = _meta(g, "tokenizer.ggml.merges", required=True)
    pre = _meta(g, "tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE:
        raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r}; supported: {sorted(_BPE_PRE)}")
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    split = _BPE_PRE[pre]
    if split == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits+gpt2":  # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" then the GPT-2 split
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece-BPE vocabulary: a piece ``l + r`` ranks by its score.

    Tokens scored ``-inf`` are excluded. Every token that splits into two in-vocabulary pieces yields those
    merges, ordered by the merged token's score (higher first), ties by the ids of the pieces.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for t, s in zip(tokens, scores):
        if s == float("-inf"):
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in ids and right in ids:
                found.append((-s, ids[left], ids[right], left, right))
    found.sort()
    return [(a, b) for _, _, _, a, b in found]


def _sentencepiece_bpe(g: GGUFFile, tokens: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _meta(g, "tokenizer.ggml.scores", required=True)
    types = _meta(g, "tokenizer.ggml.token_type") or [1] * len(tokens)
    unk = _meta(g, "tokenizer.ggml.unknown_token_id", 0)
    # only normal and byte pieces take part in merges; control/unused/user-defined pieces never do
    merge_scores = [s if ty in (1, 6) else float("-inf") for s, ty in zip(scores, types)]
    merges = spm_merges(tokens, merge_scores)
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   unk_token=tokens[unk], fuse_unk=True, byte_fallback=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if _meta(g, "tokenizer.ggml.add_space_prefix", True):
        norm.insert(0, normalizers.Prepend("\u2581"))
    backend.normalizer = normalizers.Sequence(norm)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if _meta(g, "tokenizer.ggml.add_space_prefix", True):
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend
