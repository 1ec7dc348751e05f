"""AWQ, SmoothQuant, LLM.int8(), FP8 and ZeroQuant-FP on the default model (issue 4 item 6).

Writes ``results/act_aware_default_model.md``, ``.json`` and ``.png`` (perplexity vs bits per weight):
perplexity, KL and top-1 against the unquantized model on the held-out docs-topics text
(``lowbit.data.corpora``), calibration on the calibration split. Every row is written as soon as it is measured.

Defaults (:data:`PROTOCOL`) are the ``lowbit demo`` protocol, which a shared CPU can run: the first 4096 held-out
tokens in windows of 1024, 16 x 256 calibration tokens, AWQ's alpha search on 4 of the 16 samples
(``search_samples``; its statistics and clipping use all). ``tests/methods/test_act_aware_default_model.py``
re-measures the same configs. The recorded table, one process per group of rows, merged::

    python benchmarks/act_aware_default_model.py --only sq_O1,w8a8_naive,... --out /tmp/part1
    python benchmarks/act_aware_default_model.py --only awq4_g128,awq3_g128 --no-base-row --out /tmp/part2
    python benchmarks/act_aware_default_model.py --merge /tmp/part1.json /tmp/part2.json

The foundation's full protocol (all 21k held-out tokens, windows of 2048, 128 x 512 calibration, AWQ on all
samples) on a GPU machine: ``--max-eval-tokens 0 --ctx-len 2048 --calib-samples 128 --calib-seq-len 512
--awq-search-samples 0 --tokens tokens.pt`` (tokens dumped on this machine so both use the same ones).
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

from lowbit.io.atomic import atomic_file
from lowbit.methods.base import MethodConfig, get_method
from lowbit.quantize import quantize_

PROTOCOL: dict[str, Any] = {"max_eval_tokens": 4096, "ctx_len": 1024, "calib_samples": 16, "calib_seq_len": 256,
                            "sq_alpha": 0.5, "awq_search_samples": 4}
"""The CPU protocol (the ``lowbit demo``'s evaluation and calibration sizes), shared with the slow test."""

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
    # diagnostics: where the W8A8 error comes from (weights alone; other thresholds / scale search)
    "llm_int8_w8a16": ("llm_int8", 8, None, {"threshold": 1e-30}),  # every nonzero input in float: int8 weights only
    "llm_int8_t4": ("llm_int8", 8, None, {"threshold": 4.0}),
    "llm_int8_t2": ("llm_int8", 8, None, {"threshold": 2.0}),
    "fp8_e4m3_w8a16": ("fp8", 8, None, {"dtype": "e4m3", "act_dtype": None}),
    "fp8_e4m3_search": ("fp8", 8, None, {"dtype": "e4m3", "scale_search": True}),
    "fp8_e4m3_gptq": ("fp8", 8, None, {"dtype": "e4m3", "gptq": True}),
    "fp8_e4m3_gptq_search": ("fp8", 8, None, {"dtype": "e4m3", "gptq": True, "scale_search": True}),
    "fp8_e4m3_gptq_w8a16": ("fp8", 8, None, {"dtype": "e4m3", "act_dtype": None, "gptq": True}),
}


def config_for(key: str, sq_alpha: float = PROTOCOL["sq_alpha"],
               awq_search_samples: int | None = PROTOCOL["awq_search_samples"]) -> MethodConfig:
    """The config of run ``key`` (:data:`RUNS`); ``awq_search_samples`` 0 or None: all samples."""
    name, bits, gs, opts = RUNS[key]
    cfg = get_method(name).for_bits(bits, gs, **opts)
    if cfg.kind == "smoothquant":
        cfg = cfg.replace(alpha=sq_alpha)
    if cfg.kind == "awq":
        cfg = cfg.replace(search_samples=awq_search_samples or None)
    return cfg


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
        method = r["method"].replace("|", "\\|")
        lines.append(f"| {r['run']} | {method} | {r['bits_per_weight']:.3f} | {r['ppl']:.4f} | "
                     f"{r['ppl'] / ref:.4f} | {r['kl']:.5f} | {r['top1']:.4f} | {r['seconds']} |")
    if meta.get("notes"):
        lines += ["", meta["notes"].rstrip()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Left: perplexity against bits per weight (linears), one point per run below 8 bits. Right: the 8-bit runs
    as PPL / unquantized bars, with the issue's 1 % and 2 % lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.2, 1]})
    ref = rows[0]["ppl"]
    low = [r for r in rows[1:] if r["bits_per_weight"] < 7.5]
    high = [r for r in rows[1:] if r["bits_per_weight"] >= 7.5]
    for r in low:
        w8a8 = r["run"].startswith("zqfp")
        ax.scatter(r["bits_per_weight"], r["ppl"], marker="s" if w8a8 else "o", color="C1" if w8a8 else "C0")
        ax.annotate(r["run"], (r["bits_per_weight"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(ref, color="gray", ls="--", lw=1, label=f"unquantized (publisher's Q4_1) {ref:.3f}")
    ax.scatter([], [], marker="o", color="C0", label="weights quantized")
    ax.scatter([], [], marker="s", color="C1", label="weights + activations (W4A8)")
    ax.set_xlabel("bits per weight (quantized linear layers, all stored bytes)")
    ax.set_ylabel("perplexity (held-out docs-topics text)")
    ax.set_yscale("log")
    ax.set_title("4 and 3 bits")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ratios = [r["ppl"] / ref for r in high]
    colors = ["C0" if "w8a16" in r["run"] else "C1" for r in high]
    bx.barh([r["run"] for r in high], [100 * (x - 1) for x in ratios], color=colors)
    for lim, lab in ((1, "1 %"), (2, "2 %")):
        bx.axvline(lim, color="gray", ls=":", lw=1)
        bx.annotate(lab, (lim, len(high) - 0.5), fontsize=7, xytext=(2, 0), textcoords="offset points")
    bx.invert_yaxis()
    bx.set_xlabel("perplexity increase over unquantized (%)")
    bx.set_title("8-bit weights (blue: weights only; orange: W8A8)")
    bx.grid(True, axis="x", alpha=0.3)
    fig.suptitle("AWQ / SmoothQuant / LLM.int8() / FP8 / ZeroQuant-FP on SmolLM2-135M-Instruct")
    fig.tight_layout()
    with atomic_file(path, overwrite=True) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def _threshold(run: str) -> float | None:
    """LLM.int8()'s outlier threshold of run ``run`` (its default 6.0 when unset), None for other methods."""
    if run not in RUNS or RUNS[run][0] != "llm_int8":
        return None
    return float(RUNS[run][3].get("threshold", get_method("llm_int8").for_bits(8).format.threshold))


def plot_thresholds(rows: list[dict[str, Any]], path: Path, protocol: str = "") -> bool:
    """PPL increase of LLM.int8() against its outlier threshold (0: every column int8; the 1e-30 diagnostic, every
    nonzero input in float, drawn as the int8-weights-only line). False (nothing drawn) with fewer than 3 points."""
    ref = rows[0]["ppl"]
    by_t = {t: 100 * (r["ppl"] / ref - 1) for r in rows if (t := _threshold(r["run"])) is not None}
    pts = sorted((t, d) for t, d in by_t.items() if t == 0.0 or t >= 1e-6)
    w_only = [d for t, d in by_t.items() if 0.0 < t < 1e-6]
    if len(pts) < 3:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([t for t, _ in pts], [d for _, d in pts], "o-", label="LLM.int8() (W8A8, outlier columns in float)")
    if w_only:
        ax.axhline(w_only[0], color="C2", ls="--", lw=1, label=f"int8 weights only (+{w_only[0]:.2f} %)")
    ax.axhline(1.0, color="gray", ls=":", lw=1, label="issue's 1 % line")
    ax.set_xlabel("outlier threshold |x| (input columns with any |x| at or above it run in float)")
    ax.set_ylabel("perplexity increase over unquantized (%)")
    ax.set_title(f"LLM.int8() threshold on SmolLM2-135M-Instruct\n{protocol}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_file(path, overwrite=True) as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return True


@torch.no_grad()
def float_fraction(model: torch.nn.Module, tokens: torch.Tensor, ctx_len: int,
                   thresholds: tuple[float, ...]) -> dict[float, float]:
    """For each LLM.int8() threshold, the share of the quantized layers' multiply-adds that run in float on
    ``tokens`` evaluated in windows of ``ctx_len`` (a column is an outlier for a whole window, as in
    bitsandbytes, where the batch decides): sum over layers and windows of (outlier columns x out_features x
    window tokens) / all multiply-adds."""
    from lowbit.eval.perplexity import windows
    from lowbit.model.walk import iter_targets

    flt = {t: 0.0 for t in thresholds}
    total = 0.0
    hooks = []

    def hook(mod: torch.nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        nonlocal total
        x = args[0].reshape(-1, args[0].shape[-1])
        col_max = x.abs().amax(dim=0)
        macs = x.shape[0] * mod.out_features
        total += macs * x.shape[1]
        for t in thresholds:
            flt[t] += macs * float((col_max >= t).sum())

    for _, mod in iter_targets(model):
        hooks.append(mod.register_forward_hook(hook))
    try:
        flat = tokens.reshape(1, -1)
        for a, b in windows(flat, ctx_len):  # the evaluation's windows
            model(flat[:, a:b])
    finally:
        for h in hooks:
            h.remove()
    return {t: v / total for t, v in flt.items()}


def write(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> None:
    """``out``.json always; .md and .png once the unquantized row (the reference) is among ``rows``."""
    with atomic_file(out.with_suffix(".json"), overwrite=True, mode="w") as f:
        f.write(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if rows and rows[0]["run"] == "unquantized":
        with atomic_file(out.with_suffix(".md"), overwrite=True, mode="w") as f:
            f.write(render(rows, meta))
        if len(rows) > 1:
            plot(rows, out.with_suffix(".png"))
            protocol = (f"{meta['eval_tokens']} held-out tokens in windows of {meta['ctx_len']}")
            plot_thresholds(rows, out.with_name(out.name + "_llm_int8_threshold.png"), protocol)


def merge(paths: list[str], out: str, notes: str | None = None) -> None:
    """Merge result JSONs of partial runs (same meta) into one table at ``out`` (.json, .md, .png); ``notes``: a
    markdown file appended under the table (what the runs show, what was not measured)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(parts[0]["meta"])
    if notes:
        meta["notes"] = Path(notes).read_text()
    by: dict[str, dict[str, Any]] = {}
    for part in parts:
        same = ("eval_tokens", "ctx_len", "calibration", "torch", "smoothquant_alpha")
        if any(part["meta"].get(k) != meta.get(k) for k in same):
            raise SystemExit(f"cannot merge runs with different settings: {part['meta']} vs {meta}")
        for r in part["rows"]:
            by.setdefault(r["run"], r)
        if any(r["run"].startswith("awq") for r in part["rows"]):
            meta["awq_search_samples"] = part["meta"].get("awq_search_samples")
    if "unquantized" not in by:
        raise SystemExit("none of the merged runs has the unquantized row (run one without --no-base-row)")
    order = ["unquantized", *RUNS]
    rows = sorted(by.values(), key=lambda r: order.index(r["run"]) if r["run"] in order else len(order))
    write(rows, meta, Path(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--max-eval-tokens", type=int, default=PROTOCOL["max_eval_tokens"], help="0: all")
    p.add_argument("--ctx-len", type=int, default=PROTOCOL["ctx_len"])
    p.add_argument("--calib-samples", type=int, default=PROTOCOL["calib_samples"])
    p.add_argument("--calib-seq-len", type=int, default=PROTOCOL["calib_seq_len"])
    p.add_argument("--sq-alpha", type=float, default=PROTOCOL["sq_alpha"])
    p.add_argument("--awq-search-samples", type=int, default=PROTOCOL["awq_search_samples"],
                   help="calibration samples in AWQ's alpha-search loss (0: all, as llm-awq)")
    p.add_argument("--only", default="", help="comma-separated run keys")
    p.add_argument("--no-base-row", action="store_true", help="skip evaluating the unquantized model (for partial "
                   "runs merged with one that has it)")
    p.add_argument("--merge", nargs="+", default=None, help="merge these result JSONs into --out and exit")
    p.add_argument("--notes", default=None, help="with --merge: markdown file appended under the table")
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--tokens", default=None, help="pre-tokenized .pt with 'calibration' and 'evaluation' tokens "
                   "(so another machine evaluates the exact same tokens)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="results/act_aware_default_model")
    p.add_argument("--float-fraction", action="store_true",
                   help="print the share of multiply-adds LLM.int8() runs in float at each threshold and exit")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, args.out, args.notes)
        return
    keys = [k for k in args.only.split(",") if k] or list(RUNS)
    bad = [k for k in keys if k not in RUNS]
    if bad:
        raise SystemExit(f"unknown run(s) {bad}; valid: {sorted(RUNS)}")
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
    if args.float_fraction:
        fr = float_fraction(base, tokens, args.ctx_len, (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0))
        print("| threshold | share of multiply-adds in float |\n|---|---|")
        print("\n".join(f"| {t:g} | {100 * v:.2f} % |" for t, v in fr.items()))
        return
    ev = Evaluator(base, tokens, ctx_len=args.ctx_len)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"note": DEFAULT_MODEL_NOTE, "eval_tokens": int(tokens.numel()), "ctx_len": args.ctx_len,
            "calibration": list(calib.shape), "torch": torch.__version__, "smoothquant_alpha": args.sq_alpha,
            "awq_search_samples": args.awq_search_samples or None,
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    rows = [] if args.no_base_row else [{"run": "unquantized", "method": "-", **ev.evaluate(base), "seconds": 0.0}]
    print(rows[:1], flush=True)
    write(rows, meta, out)
    for key in keys:
        cfg = config_for(key, args.sq_alpha, args.awq_search_samples)
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
        write(rows, meta, out)  # after every run, so a run cut short keeps what it measured


if __name__ == "__main__":
    main()
