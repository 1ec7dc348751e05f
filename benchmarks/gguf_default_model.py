"""GGUF exports of the default model: llama-quantize mixes, importance matrices and AWQ-through-GGML, compared
at (about) the same file size.

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
        if awq is not None:
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
             "SmolLM2-135M-Instruct as shipped (Q4_1 weights, dequantized to float32) is the reference; every run is "
             "exported with `export_gguf`, read back with `load_gguf_model` and scored on "
             f"{meta['eval_tokens']} held-out docs-topics tokens (windows of {args.ctx_len}). Calibration for the "
             f"imatrix and AWQ: {args.calib_samples} x {args.calib_seq_len} tokens of the calibration split. "
             "576-wide rows do not fit 256-blocks, so the K mixes fall back as llama-quantize does (Q4_K → Q5_0, "
             "Q6_K → Q8_0, Q2_K/Q3_K → Q4_0). CPU, torch " + torch.__version__ + ". "
             "Produced by `python benchmarks/gguf_default_model.py`.", "",
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
