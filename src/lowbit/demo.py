"""The main job: quantize the default model with every registered method, evaluate each, table + plot.

Methods added later appear here with no change: the demo walks the method registry and asks each method for
its recommended config at 4 bits and at 3 bits (``MethodConfig.for_bits``), or at its smallest supported width
when it supports neither (8-bit methods such as SmoothQuant or LLM.int8()).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from lowbit.quantize import Progress, quantize_

__all__ = ["run_demo", "demo_configs"]

PUBLISHER_GROUP = 32  # the default model's weights are Q4_1 in groups of 32

log = logging.getLogger(__name__)


def demo_configs(methods: Sequence[str] | None = None, full: bool = False) -> list[tuple[str, int, Any]]:
    """``(method, bits, config)`` for every registered method (or the named subset) at 4 and 3 bits.

    Each method's ``quick_options`` (cheaper searches, see ``MethodConfig``) apply unless ``full``. A method
    whose default group size is the publisher's (32) gets 64: on the default model's Q4_1 weights a 4-bit
    group-32 grid would only reproduce the publisher's own rounding.
    """
    from lowbit.methods.base import get_method, method_registry

    names = sorted(method_registry()) if not methods else list(methods)
    out = []
    for name in names:
        cls = get_method(name)
        widths = [b for b in (4, 3) if b in cls.bits_choices] or [min(cls.bits_choices)]
        for bits in widths:
            options = {} if full else dict(cls.quick_options)
            cfg = cls.for_bits(bits, None, **options)
            if getattr(cfg.format, "group_size", None) == PUBLISHER_GROUP:
                cfg = cls.for_bits(bits, 2 * PUBLISHER_GROUP, **options)
            out.append((name, bits, cfg))
    return out


def run_demo(out_dir: Path, methods: Sequence[str] | None = None, *, max_eval_tokens: int = 4096,
             ctx_len: int = 1024, calib_samples: int = 16, calib_seq_len: int = 256, seed: int = 0,
             full: bool = False, progress: Progress | None = None,
             echo: Callable[[str], Any] = log.info) -> list[dict[str, Any]]:
    """Run the demo; write ``results.md``, ``results.json`` and ``ppl_vs_bits.png`` into ``out_dir``.

    Returns the table rows. A method that fails is reported in its row (``error``) and the demo goes on.
    ``full`` runs every method with its default options instead of its ``quick_options``.
    """
    from lowbit.data.corpora import calibration_tokens, evaluation_tokens
    from lowbit.data.models import DEFAULT_MODEL_NOTE, load_model
    from lowbit.eval.report import Evaluator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    configs = demo_configs(methods, full=full)
    quick = {} if full else _quick_options(name for name, _, _ in configs)
    echo(f"lowbit demo: {len(configs)} runs on the default model. Note: {DEFAULT_MODEL_NOTE}")
    base, tok = load_model(None, dtype=torch.float32)
    base.eval()
    tokens = evaluation_tokens(tok, max_tokens=max_eval_tokens)
    calib = calibration_tokens(tok, n_samples=calib_samples, seq_len=calib_seq_len, seed=seed)
    t0 = time.perf_counter()
    ev = Evaluator(base, tokens, ctx_len=ctx_len, progress=progress)
    rows: list[dict[str, Any]] = [{"method": "unquantized", "bits": 32, "act": "float", **ev.evaluate(base),
                                   "seconds": round(time.perf_counter() - t0, 1), "config": None}]
    if quick:
        echo("quick settings (lowbit demo --full for the defaults): " + _quick_note(quick))
    echo(_header())
    echo(_fmt(rows[0]))
    for name, bits, cfg in configs:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        try:
            quantize_(model, cfg, calibration=calib if cfg.stats else None, progress=progress)
            dt = time.perf_counter() - t0
            row = {"method": name, "bits": bits, "act": activation_label(cfg), **ev.evaluate(model),
                   "seconds": round(dt, 1),
                   "config": cfg.to_dict()}
        except Exception as e:  # one broken method must not hide the others' results
            log.exception("demo: %s at %d bits failed", name, bits)
            row = {"method": name, "bits": bits, "error": f"{type(e).__name__}: {e}", "config": cfg.to_dict(),
                   "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        echo(_fmt(row))
        del model
    (out_dir / "results.json").write_text(json.dumps({"note": DEFAULT_MODEL_NOTE, "ctx_len": ctx_len,
                                                      "eval_tokens": int(tokens.numel()), "quick_options": quick,
                                                      "calibration": [calib_samples, calib_seq_len],
                                                      "rows": rows}, indent=1))
    (out_dir / "results.md").write_text(_markdown(rows, DEFAULT_MODEL_NOTE, ctx_len, int(tokens.numel()), quick))
    _plot(rows, out_dir / "ppl_vs_bits.png")
    echo(f"table: {out_dir / 'results.md'}  plot: {out_dir / 'ppl_vs_bits.png'}")
    return rows


def activation_label(cfg: Any) -> str:
    """How a config's layers see their inputs: ``"int8/token"``, ``"e4m3/token"``, ... or ``"float"``."""
    act = getattr(cfg.format, "act", None) or getattr(getattr(cfg.format, "base", None), "act", None)
    if act is None:
        return "float"
    return f"{act.dtype}/{act.granularity}" + ("/static" if act.static else "")


def _quick_options(names: Iterable[str]) -> dict[str, dict[str, Any]]:
    from lowbit.methods.base import get_method

    return {n: dict(get_method(n).quick_options) for n in dict.fromkeys(names) if get_method(n).quick_options}


def _quick_note(quick: dict[str, dict[str, Any]]) -> str:
    return "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for n, o in quick.items())


_COLS = ("method", "bits", "act", "bits_per_weight", "bytes", "ppl", "kl", "top1", "seconds")


def _cell(row: dict[str, Any], col: str) -> str:
    v = row.get(col)
    if v is None:
        return "-"
    if col == "bytes":
        return f"{v / 2**20:.1f} MiB"
    if col == "bits_per_weight":
        return f"{v:.3f}"
    if col in ("ppl",):
        return f"{v:.3f}"
    if col == "kl":
        return f"{v:.4f}"
    if col == "top1":
        return f"{100 * v:.1f}%"
    return str(v)


def _header() -> str:
    return " ".join(f"{c:>15}" for c in _COLS)


def _fmt(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['method']:>15} {row['bits']:>15} FAILED: {row['error']}"
    return " ".join(f"{_cell(row, c):>15}" for c in _COLS)


def _markdown(rows: list[dict[str, Any]], note: str, ctx_len: int, n_tokens: int,
              quick: dict[str, dict[str, Any]]) -> str:
    lines = [f"Default model, {n_tokens} evaluation tokens, windows of {ctx_len}. {note}", ""]
    if quick:
        lines += [f"Quick settings (`lowbit demo --full` for each method's defaults): {_quick_note(quick)}.", ""]
    lines += ["size = bytes of the quantized linear layers (float layers and embeddings excluded); "
              "bits/weight over those layers.", "",
              "| " + " | ".join(c if c != "bytes" else "size" for c in _COLS) + " |",
              "|" + "---|" * len(_COLS)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['bits']} | failed: {r['error']} |" + " |" * (len(_COLS) - 3))
        else:
            lines.append("| " + " | ".join(_cell(r, c) for c in _COLS) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ok = [r for r in rows if "error" not in r and r.get("ppl") is not None and math.isfinite(r["ppl"])]
    base = next((r for r in ok if r["method"] == "unquantized"), None)
    for r in ok:
        if r["method"] == "unquantized":
            continue
        ax.scatter(r["bits_per_weight"], r["ppl"], s=30)
        ax.annotate(f"{r['method']}-{r['bits']}", (r["bits_per_weight"], r["ppl"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    if base is not None:
        ax.axhline(base["ppl"], color="gray", ls="--", lw=1, label=f"unquantized (publisher Q4_1 dequantized) {base['ppl']:.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("bits per weight (quantized linear layers, all stored bytes)")
    ax.set_ylabel("perplexity (docs-topics eval split)")
    ax.set_yscale("log")
    ax.set_title("lowbit demo: SmolLM2-135M-Instruct")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
