"""The ``lowbit`` command line.

Subcommands: quantize, eval, methods, inspect, demo, export-gguf, export, finetune. Every command that takes a model
accepts a transformers directory, a GGUF file or a lowbit checkpoint; omitted, the embedded default model
(SmolLM2-135M-Instruct, whose weights its publisher already quantized to Q4_1 / Q8_0).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

log = logging.getLogger("lowbit")


def _progress():  # type: ignore[no-untyped-def]
    from tqdm.auto import tqdm

    def wrap(it, total=None, desc=None, **kw):  # type: ignore[no-untyped-def]
        return tqdm(it, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True, **kw)

    return wrap


def _dtype(name: str):  # type: ignore[no-untyped-def]
    import torch

    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise SystemExit(f"error: --dtype {name!r} is not one of {sorted(choices)}")
    return choices[name]


# -- commands ------------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    from lowbit.cli.options import method_options
    from lowbit.methods.base import method_registry

    rows = []
    for kind, cls in sorted(method_registry().items()):
        rows.append({"method": kind, "bits": list(cls.bits_choices), "calibration": list(cls.stats),
                     "calibration_with_options": {k: list(v) for k, v in cls.option_stats.items()},
                     "summary": cls.summary, "paper": cls.paper, "options": method_options(cls)})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        calib = ",".join(r["calibration"]) or "none"
        if r["calibration_with_options"]:
            calib += "(" + "; ".join(f"{','.join(v)} with {k}" for k, v in r["calibration_with_options"].items()) + ")"
        print(f"{r['method']:<14} bits={r['bits']} calibration={calib}  {r['summary']}")
        for name, o in r["options"].items():
            print(f"    --{name.replace('_', '-'):<18} {o['type']:<6} default={o['default']}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.calibration.distributed import init_from_env
    from lowbit.cli.options import build_method_config
    from lowbit.data.corpora import calibration_tokens
    from lowbit.io import checkpoint
    from lowbit.io.atomic import check_writable
    from lowbit.loading import load_with_tokenizer
    from lowbit.quantize import quantize_

    cfg = build_method_config(args.method, args.bits, args.group_size, args)
    ranked = init_from_env()  # under torchrun: calibration batches split over the ranks, rank 0 writes
    if ranked and (args.stream or args.resume):
        raise ValueError("--stream/--resume run in one process; launch them without torchrun")
    if args.stream or args.resume:  # block by block from safetensors shards; resumable (lowbit.io.streaming)
        return _quantize_streaming(args, cfg)
    check_writable(args.out, args.overwrite)
    model, tok = load_with_tokenizer(args.model, dtype=_dtype(args.dtype))
    rank = _to_rank_device(model) if ranked else 0
    calib = None
    if cfg.stats:
        text = _read_text(args.calib_data)
        calib = calibration_tokens(tok, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed,
                                   text=text)
    t0 = time.perf_counter()
    quantize_(model, cfg, calibration=calib, progress=_progress() if rank == 0 else None, ignore=args.ignore or ())
    dt = time.perf_counter() - t0
    if rank != 0:
        return 0
    model.to("cpu")
    checkpoint.save(model, args.out, tokenizer=tok, method=cfg, overwrite=args.overwrite,
                    extra={"source": args.model or "default", "seconds": round(dt, 2)})
    print(f"quantized with {cfg.describe()} in {dt:.1f}s -> {args.out}")
    return 0


def _to_rank_device(model: Any) -> int:
    """Under torch.distributed: this rank's GPU (if any) for the model; returns the rank."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        model.to(torch.device("cuda", torch.cuda.current_device()))
    return dist.get_rank()


def _quantize_streaming(args: argparse.Namespace, cfg) -> int:  # type: ignore[no-untyped-def]
    from lowbit.io.streaming import quantize_streaming

    if args.model is None or not Path(args.model).is_dir():
        raise SystemExit("--stream/--resume need a transformers model directory (config.json + safetensors)")
    calib = None
    if cfg.stats:
        from transformers import AutoTokenizer

        from lowbit.data.corpora import calibration_tokens

        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        calib = calibration_tokens(tok, n_samples=args.calib_samples, seq_len=args.calib_seq_len, seed=args.seed,
                                   text=_read_text(args.calib_data))
    t0 = time.perf_counter()
    quantize_streaming(args.model, args.out, cfg, calibration=calib, ignore=args.ignore or (), dtype=_dtype(args.dtype),
                       resume=args.resume, overwrite=args.overwrite, progress=_progress())
    print(f"quantized (streaming) with {cfg.describe()} in {time.perf_counter() - t0:.1f}s -> {args.out}")
    return 0


def _read_text(path: str | None) -> str | None:
    if path is None:
        return None
    from lowbit.data.corpora import load_text

    return load_text(path)


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.eval.report import evaluate_against
    from lowbit.io import checkpoint
    from lowbit.loading import load_with_tokenizer

    model, tok = load_with_tokenizer(args.model, dtype=_dtype(args.dtype))
    ref_path = args.reference
    if ref_path is None and args.model is not None and checkpoint.is_checkpoint(args.model):
        src = checkpoint.read_manifest(args.model, verify=False).get("extra", {}).get("source", "default")
        ref_path = None if src == "default" else src
    reference = None
    if ref_path is not None or (args.model is not None and checkpoint.is_checkpoint(args.model)):
        reference = load_with_tokenizer(ref_path, dtype=_dtype(args.dtype))[0]
    result = evaluate_against(model, tok, reference=reference, text=_read_text(args.data), ctx_len=args.ctx_len,
                              max_tokens=args.max_tokens, progress=_progress())
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.inspect import inspect_path

    info = inspect_path(args.path)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['kind']}: {info['path']}")
    for k, v in info.get("summary", {}).items():
        print(f"  {k}: {v}")
    for t in info["tensors"][: args.limit]:
        print(f"  {t['name']:<48} {str(t['shape']):<16} {t['format']:<12} {t['bits_per_weight']:.3f} bpw")
    if len(info["tensors"]) > args.limit:
        print(f"  ... {len(info['tensors']) - args.limit} more (--limit N or --json)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.demo import run_demo

    run_demo(out_dir=Path(args.out), methods=args.methods, max_eval_tokens=args.max_eval_tokens,
             ctx_len=args.ctx_len, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len,
             full=args.full, jobs=args.jobs, progress=_progress(), echo=print)
    return 0


def cmd_export_gguf(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from lowbit.io.atomic import check_writable
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.imatrix import read_imatrix
    from lowbit.loading import load_with_tokenizer

    check_writable(args.out, args.overwrite)
    model, tok = load_with_tokenizer(args.model)
    imatrix = read_imatrix(args.imatrix) if args.imatrix else None
    bar = tqdm(desc=f"export {args.type}", file=sys.stderr, dynamic_ncols=True, leave=False)

    def on_tensor(done: int, total: int, name: str) -> None:
        bar.total = total
        bar.update(done - bar.n)
        bar.set_postfix_str(name)

    result = export_gguf(model, tok, args.out, type=args.type, imatrix=imatrix, overwrite=args.overwrite,
                         progress=on_tensor)
    bar.close()
    print(f"wrote {args.out} ({args.type}): {result.nbytes / 2**20:.1f} MiB, {result.bits_per_weight:.3f} bits/weight")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lowbit.loading import load_with_tokenizer

    if args.format != "compressed-tensors":
        raise ValueError(f"--format {args.format!r} is not supported; valid choices: ['compressed-tensors'] "
                         "(GGUF: lowbit export-gguf)")
    from lowbit.io.compressed_tensors import export_compressed_tensors

    model, tok = load_with_tokenizer(args.model)
    export_compressed_tensors(model, args.out, tokenizer=tok, overwrite=args.overwrite)
    print(f"wrote {args.out} (compressed-tensors; loads in vLLM and transformers)")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from lowbit.io.atomic import check_writable
    from lowbit.loading import load_with_tokenizer
    from lowbit.train import METHODS, finetune

    if args.method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {args.method!r}; valid choices: {sorted(METHODS)}")
    check_writable(args.out, args.overwrite)
    model, tok = load_with_tokenizer(args.model)
    bar = tqdm(total=args.steps, desc=args.method, file=sys.stderr, dynamic_ncols=True)

    def on_step(info) -> None:  # type: ignore[no-untyped-def]
        bar.update(1)
        bar.set_postfix(loss=f"{info.loss:.4f}")

    result = finetune(model, tok, args.data, method=args.method, steps=args.steps, r=args.rank, alpha=args.alpha,
                      lr=args.lr, seq_len=args.seq_len, batch_size=args.batch_size, output_dir=args.out,
                      progress=on_step)
    bar.close()
    print(f"{args.method}: {args.steps} steps; outputs (adapter/ in peft format, loss.png, metrics.json) in {args.out}")
    summary = {k: v for k, v in vars(result).items() if isinstance(v, (int, float, str))} if hasattr(result, "__dict__") else {}
    if summary:
        print(json.dumps(summary))
    return 0


# -- parser --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from lowbit.cli.options import add_method_flags

    p = argparse.ArgumentParser(prog="lowbit", description="Quantize LLMs with every major method, one API.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("methods", help="list every registered method with its options")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_methods)

    s = sub.add_parser("quantize", help="quantize a model and save a lowbit checkpoint")
    s.add_argument("model", nargs="?", default=None, help="transformers dir, GGUF file or checkpoint (default: SmolLM2)")
    s.add_argument("--method", required=True)
    s.add_argument("--bits", type=int, default=None)
    s.add_argument("--group-size", type=int, default=None, help="input columns per group; -1: per output channel")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    s.add_argument("--stream", action="store_true",
                   help="quantize block by block from the safetensors shards (models larger than memory)")
    s.add_argument("--resume", action="store_true", help="continue a killed --stream run (implies --stream)")
    s.add_argument("--ignore", action="append", help="regex of layer names to leave unquantized (repeatable)")
    s.add_argument("--calib-data", default=None, help="text file or folder (default: the docs-topics calibration split)")
    s.add_argument("--calib-samples", type=int, default=64)
    s.add_argument("--calib-seq-len", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="float32")
    add_method_flags(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity, KL and top-1 against the unquantized model, size")
    s.add_argument("model", nargs="?", default=None)
    s.add_argument("--reference", default=None, help="unquantized model to compare with (default: the checkpoint's source)")
    s.add_argument("--data", default=None, help="text file or folder (default: the docs-topics evaluation split)")
    s.add_argument("--ctx-len", type=int, default=2048)
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--dtype", default="float32")
    s.add_argument("--json", action="store_true", help="one JSON object on stdout")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("inspect", help="tensors, formats and bits per weight of a checkpoint or GGUF file")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.add_argument("--limit", type=int, default=40)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("demo", help="quantize the default model with every method, evaluate, table + plot")
    s.add_argument("--out", default="lowbit-demo", help="folder for the table (markdown, JSON) and the plot")
    s.add_argument("--methods", nargs="*", default=None, help="subset of methods (default: all registered)")
    s.add_argument("--max-eval-tokens", type=int, default=2048,
                   help="evaluation budget (default sized so the whole demo fits ~10 minutes on 2 cores)")
    s.add_argument("--ctx-len", type=int, default=512)
    s.add_argument("--calib-samples", type=int, default=8)
    s.add_argument("--calib-seq-len", type=int, default=256)
    s.add_argument("--full", action="store_true",
                   help="each method's default search settings instead of its quick_options (slower)")
    s.add_argument("--jobs", type=int, default=None,
                   help="runs at a time in worker processes (default: 2 with at least 2 cores; 1 = this process)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("export-gguf", help="write a GGUF file llama.cpp runs")
    s.add_argument("model", nargs="?", default=None)
    s.add_argument("--type", required=True, help="block type or llama-quantize mix, e.g. Q4_K_M")
    s.add_argument("--out", required=True)
    s.add_argument("--imatrix", default=None)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export_gguf)

    s = sub.add_parser("export", help="write a quantized checkpoint in a serving format (compressed-tensors)")
    s.add_argument("model", help="a lowbit checkpoint (lowbit quantize --out ...)")
    s.add_argument("--format", required=True, help="compressed-tensors")
    s.add_argument("--out", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("finetune", help="QLoRA (and friends) fine-tuning with a loss plot")
    s.add_argument("model", nargs="?", default=None)
    s.add_argument("--method", default="qlora")
    s.add_argument("--data", required=True, help="text file or folder")
    s.add_argument("--out", required=True)
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--rank", type=int, default=16)
    s.add_argument("--alpha", type=float, default=16.0)
    s.add_argument("--lr", type=float, default=None, help="default: the method's (2e-4 LoRA-type, 1e-4 PEQA/QFT)")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_finetune)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
