"""AWQ, SmoothQuant, LLM.int8(), FP8 and ZeroQuant-FP on the default model, with the demo's protocol.

Writes ``results/act_aware_default_model.md`` and ``.json``: perplexity, KL and top-1 against the unquantized
model on the held-out docs-topics text (``lowbit.data.corpora``), calibration on the calibration split.

Run (the recorded table; tokens dumped here, model and run on a GPU machine, in two halves merged with --merge)::

    python benchmarks/act_aware_default_model.py --tokens tokens.pt --model model.gguf --max-eval-tokens 0 \\
        --ctx-len 2048 --calib-samples 128 --calib-seq-len 512 [--only awq4_g128,rtn4_g128] --out OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.methods.base import MethodConfig, get_method
from lowbit.quantize import quantize_

RUNS: dict[str, tuple[str, int, int | None, dict[str, Any]]] = {
    "rtn4_g128": ("rtn", 4, 128, {}),
    "awq4_g128": ("awq", 4, 128, {}),
    "rtn3_g128": ("rtn", 3, 128, {}),
    "awq3_g128": ("awq", 3, 128, {}),
    "w8a8_naive": ("smoothquant", 8, None, {"smooth": False}),
    "sq_O1": ("smoothquant", 8, None, {"level": "O1"}),
    "sq_O2": ("smoothquant", 8, None, {"level": "O2"}),
    "sq_O3": ("smoothquant", 8, None, {"level": "O3"}),
    "llm_int8": ("llm_int8", 8, None, {}),
    "llm_int8_t0": ("llm_int8", 8, None, {"threshold": 0.0}),
    "fp8_e4m3": ("fp8", 8, None, {"dtype": "e4m3"}),
    "fp8_e5m2": ("fp8", 8, None, {"dtype": "e5m2"}),
    "zqfp_w4a8_lorc8": ("zeroquant_fp", 4, 128, {"lorc_rank": 8}),
    "zqfp_w4a8": ("zeroquant_fp", 4, 128, {"lorc_rank": 0}),
}


def config_for(key: str) -> MethodConfig:
    name, bits, gs, opts = RUNS[key]
    return get_method(name).for_bits(bits, gs, **opts)


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The markdown table of ``rows`` (the first is the unquantized model)."""
    ref = rows[0]["ppl"]
    lines = ["# Activation-aware and 8-bit methods on the default model", "", f"{meta['note']}", "",
             f"Held-out docs-topics text, {meta['eval_tokens']} tokens in windows of {meta['ctx_len']}; calibration "
             f"{meta['calibration'][0]} x {meta['calibration'][1]} tokens of the calibration split; {meta['device']}, "
             f"torch {meta['torch']}. Produced by `python benchmarks/act_aware_default_model.py` "
             "(see its docstring for the exact command).", "",
             "| run | method | bits/weight (linears) | PPL | PPL / unquantized | KL (nats) | top-1 | quantize s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']} | {r['bits_per_weight']:.3f} | {r['ppl']:.4f} | "
                     f"{r['ppl'] / ref:.4f} | {r['kl']:.5f} | {r['top1']:.4f} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def merge(paths: list[str], out: str) -> None:
    """Merge result JSONs of partial runs (same meta) into one table at ``out`` (.json and .md)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    meta = parts[0]["meta"]
    by: dict[str, dict[str, Any]] = {}
    for part in parts:
        same = ("eval_tokens", "ctx_len", "calibration", "torch", "smoothquant_alpha")
        if any(part["meta"].get(k) != meta.get(k) for k in same):
            raise SystemExit(f"cannot merge runs with different settings: {part['meta']} vs {meta}")
        for r in part["rows"]:
            if r["run"] != "unquantized" and r["method"].startswith("awq"):
                r = {**r, "method": f"{r['method']} search_samples={part['meta'].get('awq_search_samples')}"}
            by.setdefault(r["run"], r)
    rows = [by["unquantized"]] + [r for k, r in by.items() if k != "unquantized"]
    Path(out).with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    Path(out).with_suffix(".md").write_text(render(rows, meta))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-eval-tokens", type=int, default=4096)
    p.add_argument("--ctx-len", type=int, default=1024)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--sq-alpha", type=float, default=0.5)
    p.add_argument("--awq-search-samples", type=int, default=None,
                   help="calibration samples in AWQ's alpha-search loss (default: all)")
    p.add_argument("--only", default="", help="comma-separated run keys")
    p.add_argument("--no-base-row", action="store_true", help="skip evaluating the unquantized model (for partial "
                   "runs merged with one that has it)")
    p.add_argument("--merge", nargs="+", default=None, help="merge these result JSONs into --out and exit")
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--tokens", default=None, help="pre-tokenized .pt with 'calibration' and 'evaluation' tokens "
                   "(so another machine evaluates the exact same tokens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/act_aware_default_model")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    logging.basicConfig(level=logging.WARNING)
    from lowbit.data.corpora import calibration_tokens, evaluation_tokens
    from lowbit.data.models import DEFAULT_MODEL_NOTE, load_model
    from lowbit.eval.report import Evaluator

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(args.device)
    base, tok = load_model(args.model, dtype=torch.float32)
    base = base.to(dev).eval()
    if args.tokens:
        saved = torch.load(args.tokens)
        tokens = saved["evaluation"][:, : args.max_eval_tokens] if args.max_eval_tokens else saved["evaluation"]
        calib = saved["calibration"][: args.calib_samples, : args.calib_seq_len]
    else:
        tokens = evaluation_tokens(tok, max_tokens=args.max_eval_tokens or None)
        calib = calibration_tokens(tok, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
    tokens, calib = tokens.to(dev), calib.to(dev)
    ev = Evaluator(base, tokens, ctx_len=args.ctx_len)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"note": DEFAULT_MODEL_NOTE, "eval_tokens": int(tokens.numel()), "ctx_len": args.ctx_len,
            "calibration": list(calib.shape), "torch": torch.__version__, "smoothquant_alpha": args.sq_alpha,
            "awq_search_samples": args.awq_search_samples,
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    rows = [] if args.no_base_row else [{"run": "unquantized", "method": "-", **ev.evaluate(base), "seconds": 0.0}]
    print(rows[:1], flush=True)
    keys = [k for k in args.only.split(",") if k] or list(RUNS)
    for key in keys:
        cfg = config_for(key)
        if cfg.kind == "smoothquant":
            cfg = cfg.replace(alpha=args.sq_alpha)
        if cfg.kind == "awq":
            cfg = cfg.replace(search_samples=args.awq_search_samples)
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        quantize_(model, cfg, calibration=calib if cfg.stats else None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        row = {"run": key, "method": cfg.describe(), **ev.evaluate(model), "seconds": round(dt, 1)}
        rows.append(row)
        print(row, flush=True)
        del model
        # written after every run, so a run cut short keeps what it measured
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        if rows[0]["run"] == "unquantized":
            out.with_suffix(".md").write_text(render(rows, meta))


if __name__ == "__main__":
    main()
