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
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lowbit.quantize import Progress, quantize_

__all__ = ["run_demo", "demo_configs", "default_jobs"]

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


def default_jobs() -> int:
    """Runs at a time: 2 where there are at least 2 cores, else 1.

    Most of a run's time is spent in loops of small tensor ops (GPTQ's column sweep, k-means, grid searches)
    that one thread runs as fast as two, so two runs side by side with one thread each keep both cores of a
    laptop busy (``results/demo_default_model.md``: 8 min 9 s on the 2-core development box).
    """
    return 2 if (os.cpu_count() or 1) >= 2 else 1


@dataclass(frozen=True)
class _Setup:
    max_eval_tokens: int
    ctx_len: int
    calib_samples: int
    calib_seq_len: int
    seed: int
    threads: int | None


class _Runner:
    """The default model, the evaluation windows with their reference logits, and the calibration samples:
    everything one run needs (built once per process)."""

    def __init__(self, setup: _Setup, progress: Progress | None = None) -> None:
        from lowbit.data.corpora import calibration_tokens, evaluation_tokens
        from lowbit.data.models import load_model
        from lowbit.eval.report import Evaluator

        if setup.threads:
            torch.set_num_threads(setup.threads)
        self.setup, self.progress = setup, progress
        self.base, tok = load_model(None, dtype=torch.float32)
        self.base.eval()
        self.tokens = evaluation_tokens(tok, max_tokens=setup.max_eval_tokens)
        self.calib = calibration_tokens(tok, n_samples=setup.calib_samples, seq_len=setup.calib_seq_len,
                                        seed=setup.seed)
        self.evaluator = Evaluator(self.base, self.tokens, ctx_len=setup.ctx_len, progress=progress)

    def unquantized(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        row = self.evaluator.evaluate(self.base)
        return {"method": "unquantized", "bits": 32, "act": "float", **row,
                "seconds": round(time.perf_counter() - t0, 1), "config": None, "eval_tokens": int(self.tokens.numel())}

    def run(self, name: str, bits: int, cfg: Any) -> dict[str, Any]:
        """Quantize a copy of the model with ``cfg`` and evaluate it; a failure becomes the row's ``error``."""
        torch.manual_seed(self.setup.seed)  # every run starts from the same RNG state, whatever ran before it
        model = copy.deepcopy(self.base)
        t0 = time.perf_counter()
        try:
            quantize_(model, cfg, calibration=self.calib if cfg.stats else None, progress=self.progress)
            dt = time.perf_counter() - t0
            return {"method": name, "bits": bits, "act": activation_label(cfg), **self.evaluator.evaluate(model),
                    "seconds": round(dt, 1), "config": cfg.to_dict()}
        except Exception as e:  # one broken method must not hide the others' results
            log.exception("demo: %s at %d bits failed", name, bits)
            return {"method": name, "bits": bits, "error": f"{type(e).__name__}: {e}", "config": cfg.to_dict(),
                    "seconds": round(time.perf_counter() - t0, 1)}


_WORKER: _Runner | None = None


def _init_worker(setup: _Setup) -> None:
    global _WORKER
    _WORKER = _Runner(setup)


def _job(i: int, name: str | None, bits: int, cfg: Any) -> tuple[int, dict[str, Any]]:
    assert _WORKER is not None, "demo worker used before its initializer ran"
    return i, _WORKER.unquantized() if name is None else _WORKER.run(name, bits, cfg)


def run_demo(out_dir: Path, methods: Sequence[str] | None = None, *, max_eval_tokens: int = 4096,
             ctx_len: int = 1024, calib_samples: int = 16, calib_seq_len: int = 256, seed: int = 0,
             full: bool = False, jobs: int | None = None, progress: Progress | None = None,
             echo: Callable[[str], Any] = log.info) -> list[dict[str, Any]]:
    """Run the demo; write ``results.md``, ``results.json`` and ``ppl_vs_bits.png`` into ``out_dir``.

    Returns the table rows (in method order, whatever order the runs finished in). A method that fails is
    reported in its row (``error``) and the demo goes on. ``full`` runs every method with its default options
    instead of its ``quick_options``. ``jobs`` runs that many at a time in worker processes, each with
    ``cores // jobs`` threads (default :func:`default_jobs`); ``jobs=1`` runs everything in this process.
    """
    from lowbit.data.models import DEFAULT_MODEL_NOTE

    if jobs is None:
        jobs = default_jobs()
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = demo_configs(methods, full=full)
    quick = {} if full else _quick_options(name for name, _, _ in configs)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    setup = _Setup(max_eval_tokens, ctx_len, calib_samples, calib_seq_len, seed, threads)
    echo(f"lowbit demo: {len(configs)} runs on the default model"
         + (f", {jobs} at a time ({threads} thread{'s' if threads != 1 else ''} each)" if jobs > 1 else "")
         + f". Note: {DEFAULT_MODEL_NOTE}")
    if quick:
        echo("quick settings (lowbit demo --full for the defaults): " + _quick_note(quick))
    t_start = time.perf_counter()
    if jobs == 1:
        rows = _run_here(setup, configs, progress, echo)
    else:
        rows = _run_pool(setup, configs, jobs, progress, echo)
    wall = round(time.perf_counter() - t_start, 1)
    echo(f"demo wall time {wall:.0f} s ({len(configs) + 1} rows)")
    from lowbit.io.atomic import atomic_file

    info = {"note": DEFAULT_MODEL_NOTE, "ctx_len": ctx_len, "eval_tokens": rows[0].get("eval_tokens", 0),
            "quick_options": quick, "calibration": [calib_samples, calib_seq_len], "jobs": jobs,
            "threads_per_job": threads or torch.get_num_threads(), "wall_seconds": wall, "rows": rows}
    with atomic_file(out_dir / "results.json", overwrite=True, mode="w") as f:
        f.write(json.dumps(info, indent=1))  # type: ignore[attr-defined]
    with atomic_file(out_dir / "results.md", overwrite=True, mode="w") as f:
        f.write(_markdown(rows, DEFAULT_MODEL_NOTE, ctx_len, info["eval_tokens"], quick,  # type: ignore[attr-defined]
                          jobs, info["threads_per_job"], wall))
    _plot(rows, out_dir / "ppl_vs_bits.png")
    echo(f"table: {out_dir / 'results.md'}  plot: {out_dir / 'ppl_vs_bits.png'}")
    return rows


def _run_here(setup: _Setup, configs: list[tuple[str, int, Any]], progress: Progress | None,
              echo: Callable[[str], Any]) -> list[dict[str, Any]]:
    runner = _Runner(setup, progress)
    rows = [runner.unquantized()]
    echo(_header())
    echo(_fmt(rows[0]))
    for name, bits, cfg in configs:
        rows.append(runner.run(name, bits, cfg))
        echo(_fmt(rows[-1]))
    return rows


def _run_pool(setup: _Setup, configs: list[tuple[str, int, Any]], jobs: int, progress: Progress | None,
              echo: Callable[[str], Any]) -> list[dict[str, Any]]:
    """The runs in ``jobs`` spawned worker processes; calibrating methods (the long runs) are queued first so
    the short ones fill the gaps at the end. Rows come back in method order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    todo = [(0, None, 32, None)] + [(i + 1, n, b, c) for i, (n, b, c) in enumerate(configs)]
    order = sorted(todo, key=lambda t: (t[3] is None or not t[3].stats, t[0]))  # calibrating runs first
    rows: list[dict[str, Any] | None] = [None] * len(todo)
    echo(_header())
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(setup,)) as pool:
        futures = {pool.submit(_job, *t): t for t in order}
        done = as_completed(futures)
        if progress is not None:
            done = iter(progress(done, total=len(futures), desc="demo runs"))
        for fut in done:
            i, name, bits, cfg = futures[fut]
            try:
                _, row = fut.result()
            except BrokenProcessPool as e:  # a worker died (e.g. killed for memory): say so in its rows
                row = {"method": name or "unquantized", "bits": bits, "error": f"worker process died: {e}",
                       "config": None if cfg is None else cfg.to_dict(), "seconds": None}
            rows[i] = row
            echo(_fmt(row))
    return [r for r in rows if r is not None]


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
              quick: dict[str, dict[str, Any]], jobs: int = 1, threads: int = 1, wall: float | None = None) -> str:
    lines = [f"Default model, {n_tokens} evaluation tokens, windows of {ctx_len}. {note}", ""]
    timing = (f"{jobs} runs at a time in worker processes, {threads} thread{'s' if threads != 1 else ''} each"
              if jobs > 1 else f"one run at a time, {threads} thread{'s' if threads != 1 else ''}")
    lines += [f"seconds = quantization time of the run ({timing}); evaluation not included."
              + (f" Whole demo: {wall:.0f} s wall." if wall is not None else ""), ""]
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
