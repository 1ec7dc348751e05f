"""Export a Llama-family transformers model to a GGUF file that llama.cpp loads.

``export_gguf(model, tokenizer, path, type="Q4_K_M")`` names tensors as llama.cpp's ``LLM_ARCH_LLAMA`` (or
``qwen2``) expects, applies ``convert_hf_to_gguf.py``'s Q/K row permutation (llama arch: llama.cpp rotates
adjacent pairs, transformers rotates halves), types every metadata key exactly as llama.cpp reads it, writes
the tokenizer (byte-level BPE ``gpt2`` or SentencePiece-style ``llama``), and chooses each tensor's block type
as ``llama-quantize`` does for the mix (:mod:`lowbit.gguf_mix`), quantizing with the byte-exact reference
quantizers of :mod:`lowbit.formats.ggml`, optionally guided by an importance matrix.

Layers already quantized by lowbit into a GGML format (``QuantLinear`` with e.g. ``Q4_K()``, from RTN, AWQ
or any method that stores GGML blocks) are written as they are — their bytes are the method's choice — and
other ``QuantLinear`` layers are dequantized and re-quantized into the mix's type.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from lowbit.formats.ggml import GGML_TYPES, quantize_raw
from lowbit.gguf_mix import LLAMA_FTYPE, tensor_types
from lowbit.io.gguf_writer import GGUFValueType, GGUFWriter

__all__ = ["export_gguf", "ExportResult", "permute_qk", "hf_to_gguf_name", "tokenizer_metadata"]

logger = logging.getLogger(__name__)

#: transformers model_type → (llama.cpp architecture, permute Q/K rows)
ARCHITECTURES: dict[str, tuple[str, bool]] = {"llama": ("llama", True), "mistral": ("llama", True),
                                               "qwen2": ("qwen2", False)}

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# file type written for a pure single block type that is not itself a llama_ftype (informational only)
_PURE_FTYPE = {"Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}


def hf_to_gguf_name(module_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q`` (None for modules llama.cpp has no tensor for)."""
    if module_name in _GLOBAL:
        return _GLOBAL[module_name]
    m = _LAYER_RE.match(module_name)
    if m and m.group(2) in _BLOCK:
        return f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None


def permute_qk(w: torch.Tensor | np.ndarray, n_head: int) -> Any:
    """``convert_hf_to_gguf.py``'s Q/K permutation: within each head, GGUF row ``2i + k`` = HF row ``k·d/2 + i``.

    Args:
        w: ``(n_head · head_dim, ...)`` weight rows (float or raw GGML block rows) or a bias.
        n_head: heads of ``w`` (``num_attention_heads`` for Q, ``num_key_value_heads`` for K).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {tuple(w.shape)} with n_head={n_head}: rows not a multiple of {2 * n_head}")
    half = rows // n_head // 2
    r = w.reshape(n_head, 2, half, *w.shape[1:])
    r = r.swapaxes(1, 2) if isinstance(r, np.ndarray) else r.transpose(1, 2)
    return r.reshape(w.shape)


@dataclass
class ExportResult:
    """What :func:`export_gguf` wrote: per-tensor types, sizes and the mix's bits per weight."""

    path: str
    tensor_types: dict[str, str]
    nbytes: int
    n_params: int
    quantized_bits_per_weight: float
    preserved: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.n_params, 1)


# ---------------------------------------------------------------------------------------------- tokenizer
def _backend_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no tokenizers backend; export needs a fast "
                         "(tokenizer.json) tokenizer")
    return json.loads(backend.to_str())


def _detect_pre(tj: dict[str, Any]) -> str:
    from lowbit.io import gguf_model as gm

    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["ByteLevel"]:
        return "gpt-2"
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name, pattern in (("llama-bpe", getattr(gm, "_LLAMA3_SPLIT", None)), ("qwen2", getattr(gm, "_QWEN2_SPLIT", None))):
            if pattern is not None and regex == pattern:
                return name
    logger.warning("unrecognised BPE pre-tokenizer %s; writing tokenizer.ggml.pre='default' (pass tokenizer_pre= "
                   "to name llama.cpp's pre-tokenizer)", types)
    return "default"


def tokenizer_metadata(tokenizer: Any, n_vocab: int, pre: str | None = None) -> list[tuple[str, Any, int, bool]]:
    """``tokenizer.ggml.*`` entries as ``(key, value, gguf_type, is_array)``; the token list is padded to
    ``n_vocab`` (the embedding rows) with ``[PAD{i}]`` tokens, as convert_hf_to_gguf does."""
    tj = _backend_json(tokenizer)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer model {model.get('type')!r} is not supported for GGUF export; supported: BPE "
                         "(byte-level 'gpt2', or SentencePiece-style with byte_fallback 'llama')")
    vocab = dict(model.get("vocab", {}))
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    size = max(n_vocab, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED for padding
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 1
    spm = bool(model.get("byte_fallback"))
    for i, t in added.items():
        types[i] = 3 if t.get("special") else 4
    if len(set(tokens)) != len(tokens):
        raise ValueError("tokenizer has duplicate token strings; llama.cpp aborts on those")
    out: list[tuple[str, Any, int, bool]] = []
    S, U32, B, I32, F32 = GGUFValueType.STRING, GGUFValueType.UINT32, GGUFValueType.BOOL, GGUFValueType.INT32, GGUFValueType.FLOAT32
    if spm:
        for i, tok in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", tok):
                types[i] = 6
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = 2
        out += [("tokenizer.ggml.model", "llama", S, False), ("tokenizer.ggml.pre", "default", S, False),
                ("tokenizer.ggml.tokens", tokens, S, True),
                ("tokenizer.ggml.scores", [-1000.0 if i in added else float(-i) for i in range(size)], F32, True),
                ("tokenizer.ggml.token_type", types, I32, True)]
    else:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        out += [("tokenizer.ggml.model", "gpt2", S, False), ("tokenizer.ggml.pre", pre or _detect_pre(tj), S, False),
                ("tokenizer.ggml.tokens", tokens, S, True), ("tokenizer.ggml.token_type", types, I32, True),
                ("tokenizer.ggml.merges", merges, S, True)]
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("unknown_token_id", "unk_token_id"), ("padding_token_id", "pad_token_id")):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int) and 0 <= v < size:
            out.append((f"tokenizer.ggml.{key}", v, U32, False))
    post = json.dumps(tj.get("post_processor") or {})
    bos = getattr(tokenizer, "bos_token", None)
    add_bos = bool(bos) and f'"{bos}"' in post
    out.append(("tokenizer.ggml.add_bos_token", add_bos, B, False))
    if spm:
        norm = json.dumps(tj.get("normalizer") or {}) + json.dumps(tj.get("pre_tokenizer") or {})
        out.append(("tokenizer.ggml.add_space_prefix", "Prepend" in norm or "prepend_scheme" in norm, B, False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        out.append(("tokenizer.chat_template", template, S, False))
    return out


# ---------------------------------------------------------------------------------------------- tensors
@dataclass
class _Source:
    name: str                       # GGUF name
    shape: tuple[int, ...]          # numpy order
    weight: Callable[[], torch.Tensor] | None
    raw: tuple[str, torch.Tensor] | None = None   # (type, qdata) of a GGML QuantLinear


def _module_tensors(model: torch.nn.Module, arch: str, permute: bool, n_head: int, n_kv: int,
                    tied: bool) -> list[_Source]:
    from lowbit.formats.ggml.format import GGMLFormat
    from lowbit.nn.linear import QuantLinear

    out: list[_Source] = []
    for mname, mod in model.named_modules():
        base = hf_to_gguf_name(mname)
        if base is None:
            continue
        if base == "output" and tied:
            continue
        perm = n_head if base.endswith("attn_q") else n_kv if base.endswith("attn_k") else 0
        perm = perm if permute else 0

        def fix(t: torch.Tensor, p: int = perm) -> torch.Tensor:
            return permute_qk(t, p) if p else t

        if isinstance(mod, QuantLinear):
            q = mod.qweight
            if isinstance(q.format, GGMLFormat):
                qd = q["qdata"].detach().cpu()
                out.append(_Source(f"{base}.weight", tuple(q.shape), None, (q.format.type_name, fix(qd))))
            else:
                out.append(_Source(f"{base}.weight", tuple(q.shape),
                                   lambda q=q, f=fix: f(q.dequantize().detach().float().cpu())))
            bias = mod.bias
        elif hasattr(mod, "weight") and isinstance(getattr(mod, "weight"), torch.Tensor):
            w = mod.weight
            out.append(_Source(f"{base}.weight", tuple(w.shape), lambda w=w, f=fix: f(w.detach().float().cpu())))
            bias = getattr(mod, "bias", None)
        else:
            continue
        if isinstance(bias, torch.Tensor):
            out.append(_Source(f"{base}.bias", tuple(bias.shape), lambda b=bias, f=fix: f(b.detach().float().cpu())))
    return out


def _rope_freqs(config: Any, head_dim: int) -> torch.Tensor | None:
    """Llama-3.1 "llama3" rope scaling → the ``rope_freqs.weight`` factors convert_hf_to_gguf writes."""
    rs = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    if not isinstance(rs, Mapping) or rs.get("rope_type", rs.get("type")) != "llama3":
        return None
    base = _rope_theta(config)
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs.tolist():
        wl = 2 * np.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _rope_theta(config: Any) -> float:
    v = getattr(config, "rope_theta", None)
    if v is None:
        rp = getattr(config, "rope_parameters", None) or {}
        v = rp.get("rope_theta", 10000.0) if isinstance(rp, Mapping) else 10000.0
    return float(v)


def _load_imatrix(imatrix: Any, module_names: Mapping[str, str]) -> dict[str, np.ndarray] | None:
    """Importance vectors keyed by GGUF tensor name from an :class:`~lowbit.io.imatrix.Imatrix`, a file path,
    or a mapping keyed by GGUF names or transformers module names."""
    if imatrix is None:
        return None
    from lowbit.io.imatrix import Imatrix, read_imatrix

    if isinstance(imatrix, (str, os.PathLike)):
        imatrix = read_imatrix(imatrix)
    if isinstance(imatrix, Imatrix):
        return {k: imatrix.importance(k) for k in imatrix.names()}
    if isinstance(imatrix, Mapping):
        out = {}
        for k, v in imatrix.items():
            name = module_names.get(k, k)
            if not name.endswith(".weight"):
                name += ".weight"
            out[name] = np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float32).reshape(-1)
        return out
    raise TypeError(f"imatrix must be an Imatrix, a path or a mapping, got {type(imatrix).__name__}")



def _geometry(model: torch.nn.Module) -> tuple[str, bool, int, int, int, bool]:
    """``(arch, permute, n_head, n_kv, n_layer, tied)`` of a supported transformers model."""
    config = model.config
    mtype = getattr(config, "model_type", None)
    if mtype not in ARCHITECTURES:
        raise ValueError(f"model_type {mtype!r} is not supported for GGUF export; supported: {sorted(ARCHITECTURES)}")
    arch, permute = ARCHITECTURES[mtype]
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    emb = model.get_input_embeddings().weight
    lm_head = model.get_output_embeddings()
    tied = bool(getattr(config, "tie_word_embeddings", False)) or (
        lm_head is not None and getattr(lm_head, "weight", None) is emb)
    return arch, permute, n_head, n_kv, int(config.num_hidden_layers), tied


def mix_module_types(model: torch.nn.Module, type: str = "Q4_K_M", *, has_imatrix: bool = False,
                     pure: bool = False) -> dict[str, str]:
    """The GGML type ``export_gguf(model, ..., type=type)`` gives each module's weight, by module name
    (``model.layers.0.mlp.down_proj`` → ``Q4_K``): what a method must target to store its own blocks in a mix."""
    arch, permute, n_head, n_kv, n_layer, tied = _geometry(model)
    sources = _module_tensors(model, arch, permute, n_head, n_kv, tied)
    types = tensor_types([(s.name, s.shape) for s in sources], type, n_layer, n_head, n_kv,
                         has_imatrix=has_imatrix, pure=pure)
    return {m: types[f"{g}.weight"] for m, _ in model.named_modules()
            if (g := hf_to_gguf_name(m)) and f"{g}.weight" in types}

def export_gguf(model: torch.nn.Module, tokenizer: Any, path: str | os.PathLike[str], type: str = "Q4_K_M",
                imatrix: Any = None, progress: Callable[[int, int, str], None] | None = None, *,
                pure: bool = False, tokenizer_pre: str | None = None, overwrite: bool = True,
                name: str | None = None) -> ExportResult:
    """Write ``model`` and ``tokenizer`` to a GGUF file (atomically: temp file + ``os.replace``).

    Args:
        model: a ``LlamaForCausalLM``-like transformers model (Llama, Mistral, SmolLM: arch ``llama``;
            Qwen2: arch ``qwen2``), possibly with lowbit ``QuantLinear`` layers.
        tokenizer: its fast tokenizer (BPE byte-level or SentencePiece-style BPE with byte fallback).
        path: output ``.gguf`` path.
        type: a llama-quantize mix (``Q4_0, Q8_0, Q2_K, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K`` ...) or a
            single GGML block type (``Q4_K``; used for every 2-D weight, with llama-quantize's shape fallbacks).
        imatrix: importance matrix (:class:`~lowbit.io.imatrix.Imatrix`, an imatrix file — GGUF or legacy
            ``.dat`` — or a mapping of per-input-column mean squared activations by GGUF or module name).
        progress: ``progress(done, total, tensor_name)`` after each tensor is written.
        pure: like ``llama-quantize --pure``.
        tokenizer_pre: override ``tokenizer.ggml.pre`` for BPE tokenizers (e.g. ``"llama-bpe"``).
        overwrite: replace an existing file.
        name: ``general.name`` (default: the model's ``name_or_path``).

    Returns:
        :class:`ExportResult` with every tensor's type and the file size.

    Raises:
        ValueError: unsupported architecture/tokenizer, unknown type.
    """
    config = model.config
    arch, permute, n_head, n_kv, n_layer, tied = _geometry(model)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    emb = model.get_input_embeddings().weight
    sources = _module_tensors(model, arch, permute, n_head, n_kv, tied)
    module_names = {m: f"{hf_to_gguf_name(m)}.weight" for m, _ in model.named_modules() if hf_to_gguf_name(m)}
    qws = _load_imatrix(imatrix, module_names)
    rope_freqs = _rope_freqs(config, head_dim) if arch == "llama" else None

    types = tensor_types([(s.name, s.shape) for s in sources], type, n_layer, n_head, n_kv,
                         has_imatrix=qws is not None, pure=pure)
    by_name = {s.name: s for s in sources}
    w = GGUFWriter()
    p = arch + "."
    w.add_str("general.architecture", arch)
    w.add_str("general.type", "model")
    w.add_str("general.name", name or str(getattr(config, "_name_or_path", "") or "model") or "model")
    key = type.upper()
    ftype = LLAMA_FTYPE.get(key, LLAMA_FTYPE.get(_PURE_FTYPE.get(key, ""), None))
    if ftype is not None:
        w.add_u32("general.file_type", ftype)
    w.add_u32("general.quantization_version", 2)
    w.add_u32(p + "context_length", int(getattr(config, "max_position_embeddings", 2048)))
    w.add_u32(p + "embedding_length", hidden)
    w.add_u32(p + "block_count", n_layer)
    w.add_u32(p + "feed_forward_length", int(config.intermediate_size))
    w.add_u32(p + "attention.head_count", n_head)
    w.add_u32(p + "attention.head_count_kv", n_kv)
    w.add_f32(p + "rope.freq_base", _rope_theta(config))
    w.add_f32(p + "attention.layer_norm_rms_epsilon", float(config.rms_norm_eps))
    w.add_u32(p + "rope.dimension_count", head_dim)
    if head_dim != hidden // n_head:
        w.add_u32(p + "attention.key_length", head_dim)
        w.add_u32(p + "attention.value_length", head_dim)
    n_vocab = int(emb.shape[0])
    w.add_u32(p + "vocab_size", n_vocab)
    rs = getattr(config, "rope_scaling", None)
    if isinstance(rs, Mapping) and rs.get("rope_type", rs.get("type")) == "linear":
        w.add_str(p + "rope.scaling.type", "linear")
        w.add_f32(p + "rope.scaling.factor", float(rs["factor"]))
    for k, v, t, is_arr in tokenizer_metadata(tokenizer, n_vocab, tokenizer_pre):
        (w.add_array if is_arr else w.add)(k, v, t)

    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", tuple(rope_freqs.shape), "F32",
                     quantize_raw(rope_freqs.reshape(1, -1), "F32").reshape(-1))
    preserved: list[str] = []
    n_params = 0
    qbits = qn = 0
    for tname, ttype in types.items():
        src = by_name[tname]
        n_params += int(np.prod(src.shape))
        if src.raw is not None:
            rtype, qdata = src.raw
            if rtype != ttype:
                logger.info("%s: keeping lowbit's %s blocks (mix would choose %s)", tname, rtype, ttype)
            ttype = types[tname] = rtype
            preserved.append(tname)
            w.add_tensor(tname, src.shape, rtype, qdata.numpy().reshape(-1))
        else:
            qw = None if qws is None else qws.get(tname)
            w.add_tensor(tname, src.shape, ttype, _lazy(src, ttype, qw))
        if GGML_TYPES[ttype].block_size > 1 or len(src.shape) >= 2:
            qbits += GGML_TYPES[ttype].bits_per_weight * int(np.prod(src.shape))
            qn += int(np.prod(src.shape))
    w.write(path, overwrite=overwrite, progress=progress)
    nbytes = os.path.getsize(path)
    logger.info("exported %s (%s): %d tensors, %.3f bits per weight", os.fspath(path), type, len(types), 8 * nbytes / max(n_params, 1))
    return ExportResult(os.fspath(path), dict(types), nbytes, n_params, qbits / max(qn, 1), preserved)


def _lazy(src: _Source, ttype: str, qw: np.ndarray | None) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        assert src.weight is not None
        x = src.weight().to(torch.float32)
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
        use = qw if (qw is not None and qw.shape[0] == x2.shape[1]) else None
        if qw is not None and use is None:
            logger.warning("%s: imatrix has %d values for %d columns; ignoring it", src.name, qw.shape[0], x2.shape[1])
        return quantize_raw(x2, ttype, imatrix=use).reshape(-1)
    return make
