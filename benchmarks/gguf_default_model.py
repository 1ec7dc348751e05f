"""GGUF exports of the default model: llama-quantize mixes, importance matrices and AWQ/GPTQ-through-GGML,
compared at (about) the same file size.

AWQ/GPTQ in a mix (``awq_q4_k_m``, ``gptq_q4_k_m``): the file has exactly plain Q4_K_M's tensor types.
AWQ searches its scales and clipping with every layer simulated in the type the mix gives most layers of its row
width (here Q5_0 for 576-wide rows, Q4_K for 1536-wide), folds them into the float weights, and the export then
quantizes those weights with the mix. GPTQ runs once per block type of the mix that has per-32 parameters
(Q5_0, Q8_0 here) on exactly the layers the mix gives that type and stores its own blocks; the K-quant layers
(down_proj: Q4_K/Q6_K) are quantized by the mix's reference quantizer (GGML's K-quants have no GPTQ path in lowbit).

Each run exports SmolLM2-135M (dequantized from its Q4_1 GGUF) with ``lowbit.io.gguf_export.export_gguf``,
loads the file back with ``lowbit.io.gguf_model.load_gguf_model`` (so what is scored is exactly what the file
holds) and scores perplexity, KL and top-1 against the unquantized model on the held-out docs-topics text.
Writes ``results/gguf_default_model.md`` / ``.json``.

Run: ``python benchmarks/gguf_default_model.py [--only q4_k_m,awq_q4_0] [--max-eval-tokens 4096]``
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

RUNS = {
    "q8_0": ("Q8_0", False, None),
    "q6_k": ("Q6_K", False, None),
    "q5_k_m": ("Q5_K_M", False, None),
    "q4_k_m": ("Q4_K_M", False, None),
    "q4_k_m_imatrix": ("Q4_K_M", True, None),
    "q4_0": ("Q4_0", False, None),
    "q4_0_imatrix": ("Q4_0", True, None),
    "awq_q4_0": ("Q4_0", False, "Q4_0"),
    "gptq_q4_0": ("Q4_0", False, "gptq:Q4_0"),
    "iq4_nl_imatrix": ("IQ4_NL", True, None),
    "awq_iq4_nl": ("IQ4_NL", False, "IQ4_NL"),
    "awq_q4_k_m": ("Q4_K_M", False, "awq-mix"),
    "gptq_q4_k_m": ("Q4_K_M", False, "gptq-mix"),
    "q3_k_m": ("Q3_K_M", False, None),
    "q2_k": ("Q2_K", False, None),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-eval-tokens", type=int, default=4096)
    p.add_argument("--ctx-len", type=int, default=1024)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--only", default="")
    p.add_argument("--out", default="results/gguf_default_model")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from lowbit.data.corpora import calibration_tokens, evaluation_tokens
    from lowbit.data.models import load_model
    from lowbit.eval.report import Evaluator
    from lowbit.formats.ggml.format import ggml_format
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gguf_model import load_gguf_model
    from lowbit.io.imatrix import collect_imatrix
    from lowbit.methods.awq.api import AWQConfig
    from lowbit.quantize import quantize_

    torch.manual_seed(0)
    base, tok = load_model(None, dtype=torch.float32)
    tokens = evaluation_tokens(tok, max_tokens=args.max_eval_tokens)
    calib = calibration_tokens(tok, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
    ev = Evaluator(base, tokens, ctx_len=args.ctx_len)
    t0 = time.perf_counter()
    imatrix = collect_imatrix(base, [c[None] for c in calib], dataset="docs-topics calibration split",
                              chunk_size=args.calib_seq_len)
    t_im = time.perf_counter() - t0
    n_params = sum(p.numel() for p in base.parameters())  # tied lm_head counted once
    rows = []
    keys = [k for k in args.only.split(",") if k] or list(RUNS)
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-gguf-bench-"))
    for key in keys:
        mix, use_im, awq = RUNS[key]
        model = base
        t0 = time.perf_counter()
        method = f"llama-quantize mix {mix}" + (" + imatrix" if use_im else "")
        if awq in ("awq-mix", "gptq-mix"):
            model = copy.deepcopy(base)
            method = (awq_into_mix if awq == "awq-mix" else gptq_into_mix)(model, mix, calib)
        elif awq is not None:
            model = copy.deepcopy(base)
            if awq.startswith("gptq:"):
                from lowbit.methods.gptq.api import GPTQConfig

                fmt = ggml_format(awq.split(":")[1])
                quantize_(model, GPTQConfig(format=fmt), calibration=calib, ignore=["lm_head"])
                method = f"GPTQ → {fmt.type_name} blocks, rest of mix {mix}"
            else:
                quantize_(model, AWQConfig(format=ggml_format(awq)), calibration=calib, ignore=["lm_head"])
                method = f"AWQ → {awq} blocks, rest of mix {mix}"
        path = tmp / f"{key}.gguf"
        res = export_gguf(model, tok, path, type=mix, imatrix=imatrix if use_im else None)
        dt = time.perf_counter() - t0 + (t_im if use_im else 0.0)
        loaded, _ = load_gguf_model(path)
        r = ev.evaluate(loaded)
        row = {"run": key, "method": method, "file_bytes": res.nbytes, "file_bpw": 8 * res.nbytes / n_params,
               "ppl": r["ppl"], "kl": r["kl"], "top1": r["top1"], "reference_ppl": r["reference_ppl"],
               "seconds": round(dt, 1), "types": _summary(res.tensor_types)}
        rows.append(row)
        print(row, flush=True)
        path.unlink()
        del loaded
        write(args, rows, tokens, n_params)


class _WidthTypes:
    """Stand-in format for AWQ's searches in a mix: fake-quantizes a weight in the GGML type the mix gives most
    layers of its row width (hashable by identity, as AWQ's quantizer cache needs)."""

    group_size = 32  # Q5_0 blocks / Q4_K sub-blocks: AWQ's clipping groups

    def __init__(self, by_width: dict[int, str]) -> None:
        from lowbit.formats.ggml.format import ggml_format

        self.formats = {w: ggml_format(t) for w, t in by_width.items()}

    def fake_quantize(self, W: torch.Tensor) -> torch.Tensor:
        return self.formats[W.shape[1]].fake_quantize(W)


def _linear_types(model, mix: str) -> dict[str, str]:
    from lowbit.io.gguf_export import mix_module_types

    return {n: t for n, t in mix_module_types(model, mix).items()
            if isinstance(model.get_submodule(n), torch.nn.Linear) and n != "lm_head"}


def awq_into_mix(model, mix: str, calib) -> str:
    """AWQ scales and clipping searched through the mix's types, folded into float weights (export quantizes)."""
    from collections import Counter
    from dataclasses import dataclass

    from lowbit.formats.ggml.format import ggml_format
    from lowbit.methods.awq.api import AWQConfig, awq_block
    from lowbit.model.walk import set_submodule
    from lowbit.nn.linear import QuantLinear
    from lowbit.quantize import quantize_

    types = _linear_types(model, mix)
    widths: dict[int, Counter] = {}
    for n, t in types.items():
        widths.setdefault(model.get_submodule(n).in_features, Counter())[t] += 1
    by_width = {w: c.most_common(1)[0][0] for w, c in widths.items()}
    search = _WidthTypes(by_width)

    @dataclass(frozen=True)
    class AWQThroughMix(AWQConfig):
        def prepare_block(self, block, calls, stats_by_layer) -> None:
            x_mean = {n: st["act_mean_abs"] for n, st in stats_by_layer.items() if "act_mean_abs" in st}
            awq_block(block, calls, x_mean, search, n_grid=self.n_grid, duo_scaling=self.duo_scaling, clip=self.clip,
                      max_clip_tokens=self.max_clip_tokens, search_samples=self.search_samples,
                      only=set(stats_by_layer))

        def quantize_weight(self, W, stats=None):
            return self.format.quantize(W)  # F32: the scaled, clipped float weight, exactly

    quantize_(model, AWQThroughMix(format=ggml_format("F32")), calibration=calib, ignore=["lm_head"])
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.qweight.dequantize())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            set_submodule(model, name, lin)
    search_types = ", ".join(f"{t} for {w}-wide rows" for w, t in sorted(by_width.items()))
    return f"AWQ (searched as {search_types}) → mix {mix}"


def gptq_into_mix(model, mix: str, calib) -> str:
    """GPTQ through each per-32-block type of the mix, on the layers the mix gives that type."""
    import re

    from lowbit.formats.ggml.format import ggml_format
    from lowbit.methods.gptq.api import GPTQConfig
    from lowbit.quantize import quantize_

    types = _linear_types(model, mix)
    done = []
    for t in sorted(set(types.values())):
        fmt = ggml_format(t)
        if fmt.group_size is None:  # K-quants/IQ4_XS: no per-group parameters for GPTQ; the mix rounds them
            continue
        names = [n for n, tt in types.items() if tt == t]
        quantize_(model, GPTQConfig(format=fmt), targets=[f"^{re.escape(n)}$" for n in names], calibration=calib)
        done.append(f"{t}×{len(names)}")
    rest = sorted({t for t in types.values() if ggml_format(t).group_size is None})
    return f"GPTQ → {', '.join(done)} blocks; {', '.join(rest)} layers by mix {mix}"


def write(args, rows, tokens, n_params) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"eval_tokens": int(tokens.numel()), "ctx_len": args.ctx_len, "n_params": n_params,
            "calibration": [args.calib_samples, args.calib_seq_len], "torch": torch.__version__}
    prev = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() and args.only else None
    if prev is not None:
        by = {r["run"]: r for r in prev["rows"]}
        by.update({r["run"]: r for r in rows})
        rows = list(by.values())
    rows = sorted(rows, key=lambda r: -r["file_bpw"])
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    ref = rows[0]["reference_ppl"]
    lines = ["# GGUF exports of the default model", "",
             "SmolLM2-135M-Instruct as shipped (its publisher's Q4_1 weights, dequantized to float32) is the reference; "
             "every run is exported with `export_gguf`, read back with `load_gguf_model` (what is scored is what the "
             f"file holds) and scored against the reference on {meta['eval_tokens']} held-out docs-topics tokens "
             f"(windows of {args.ctx_len}). Calibration for the imatrix, AWQ and GPTQ: {args.calib_samples} x "
             f"{args.calib_seq_len} tokens of the calibration split. The model's 576-wide rows do not fit 256-blocks, "
             "so the K mixes fall back as llama-quantize does (Q4_K → Q5_0, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0): on this "
             "model Q4_K_M is mostly Q5_0. `awq_q4_k_m` / `gptq_q4_k_m` have exactly plain Q4_K_M's tensor types "
             "(same file size): AWQ's scales and clipping are searched with each layer simulated in the type the mix "
             "gives its row width (Q5_0 for 576-wide rows, Q4_K for 1536-wide), folded into the float weights, and "
             "the export quantizes them with the mix; GPTQ stores its own Q5_0/Q8_0 blocks in the layers the mix "
             "gives those types, and the K-quant layers (down_proj: Q4_K/Q6_K) are rounded by the mix's reference "
             "quantizer (lowbit has no GPTQ path for K-quant super-blocks). Older rows (`awq_q4_0`...) store their "
             "linear layers in one GGML type. CPU, torch " + torch.__version__ + ", shared 2-core machine under "
             "heavy load (seconds are wall time and inflated). Produced by `python benchmarks/gguf_default_model.py "
             f"--max-eval-tokens {meta['eval_tokens']} --calib-samples {args.calib_samples} --calib-seq-len "
             f"{args.calib_seq_len} --only RUNS` (rows from several invocations with these settings merged; "
             "bits/weight = file bytes × 8 / parameters, tied embedding counted once). Not measured: speed of the "
             "exported files, other models.", "",
             f"Reference perplexity: {ref:.4f}.", "",
             "| run | method | file bits/weight | file MB | PPL | PPL / ref | KL (nats) | top-1 | s | tensor types |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r['file_bpw']:.3f} | {r['file_bytes'] / 1e6:.1f} | "
                     f"{r['ppl']:.4f} | {r['ppl'] / ref:.4f} | {r['kl']:.5f} | {r['top1']:.4f} | {r['seconds']} | "
                     f"{r['types']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _summary(types: dict[str, str]) -> str:
    c: dict[str, int] = {}
    for t in types.values():
        c[t] = c.get(t, 0) + 1
    return ", ".join(f"{k}×{v}" for k, v in sorted(c.items()))


if __name__ == "__main__":
    main()
