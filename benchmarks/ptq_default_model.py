"""Perplexity of the default model after GPTQ / SpQR / SqueezeLLM and their baselines (issue 3, item 5).

Every configuration starts from a fresh copy of the fp32 model, is quantized with lowbit (calibrated methods
through the sequential runner on the same calibration tokens), and is evaluated on the held-out evaluation text
with the GPTQ protocol (non-overlapping windows of ``--ctx`` tokens). Evaluation multiplies by the dequantized
weights (the reference op's arithmetic), so the numbers do not depend on any kernel.

Usage::

    python benchmarks/ptq_default_model.py --out results/ptq.json              # everything, default model
    python benchmarks/ptq_default_model.py --configs gptq3,rtn3 --n-samples 8  # a subset
    python benchmarks/ptq_default_model.py --dump-tokens tokens.pt             # save calibration+eval tokens

``--tokens file.pt`` reads pre-tokenized ``{"calibration", "evaluation"}`` (so runs on another machine use the
exact same tokens; the default corpus comes from the running Python's ``pydoc_data``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from lowbit.formats.affine import IntAffine
from lowbit.methods.base import MethodConfig
from lowbit.methods.gptq import GPTQConfig
from lowbit.methods.hqq.api import HQQConfig
from lowbit.methods.rtn.api import RTNConfig
from lowbit.methods.spqr import SpQRConfig
from lowbit.methods.squeezellm import SqueezeLLMConfig
from lowbit.nn.linear import QuantLinear
from lowbit.quantize import quantize_

CONFIGS: dict[str, Callable[[], MethodConfig]] = {
    "rtn3": lambda: RTNConfig(format=IntAffine(bits=3, group_size=128)),
    "hqq3": lambda: HQQConfig.for_bits(3, 128),
    "gptq3": lambda: GPTQConfig(format=IntAffine(bits=3, group_size=128), act_order=True, static_groups=True),
    "rtn4": lambda: RTNConfig(format=IntAffine(bits=4, group_size=128)),
    "gptq4": lambda: GPTQConfig(format=IntAffine(bits=4, group_size=128), act_order=True, static_groups=True),
    "spqr3": lambda: SpQRConfig.for_bits(3),
    "spqr3t1": lambda: SpQRConfig.for_bits(3, outlier_threshold=1.0),
    "spqr3t3": lambda: SpQRConfig.for_bits(3, outlier_threshold=3.0),
    "rtn3pc": lambda: RTNConfig(format=IntAffine(bits=3, group_size=None)),
    "sqllm3": lambda: SqueezeLLMConfig.for_bits(3),
    "sqllm3s": lambda: SqueezeLLMConfig.for_bits(3, sparse=True),
}


def dequantized_copy(model: nn.Module) -> nn.Module:
    """Replace each QuantLinear by an nn.Linear holding its dequantized weight (fp32)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantize().float()
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin.to(mod.qweight["qdata"].device))
    return model


def avg_bits(model: nn.Module) -> float:
    bits = n = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            q = mod.qweight
            bits += q.nbytes * 8
            n += q.numel
    return bits / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    ap.add_argument("--model", default=None, help="GGUF file or transformers dir (default: the default model)")
    ap.add_argument("--tokens", default=None, help="pre-tokenized .pt with calibration and evaluation tokens")
    ap.add_argument("--dump-tokens", default=None, help="write the tokens to this .pt and exit")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write results as JSON here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    bad = [c for c in args.configs.split(",") if c not in CONFIGS]
    if bad:
        ap.error(f"unknown config(s) {bad}; valid: {list(CONFIGS)}")

    from lowbit.data.models import load_model

    model, tok = load_model(args.model)
    if args.tokens:
        toks = torch.load(args.tokens)
        calib, evalt = toks["calibration"], toks["evaluation"]
    else:
        from lowbit.data.corpora import calibration_tokens, evaluation_tokens

        calib = calibration_tokens(tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=0)
        evalt = evaluation_tokens(tok)
    if args.dump_tokens:
        torch.save({"calibration": calib, "evaluation": evalt}, args.dump_tokens)
        print(f"wrote {tuple(calib.shape)} calibration and {tuple(evalt.shape)} evaluation tokens")
        return
    calib = calib[: args.n_samples, : args.seq_len]
    from lowbit.eval.perplexity import perplexity

    dev = torch.device(args.device)
    model = model.to(dev).eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    with torch.no_grad():
        t = time.time()
        ppl = perplexity(model, evalt.to(dev), ctx_len=args.ctx, max_windows=args.max_windows)
    rows.append({"config": "fp32", "method": "-", "ppl": ppl, "bits": 32.0, "seconds": 0.0})
    print(f"fp32 ppl {ppl:.4f} (eval {time.time() - t:.1f}s, {evalt.shape[1]} tokens, ctx {args.ctx})", flush=True)
    for name in args.configs.split(","):
        cfg = CONFIGS[name]()
        m = copy.deepcopy(model)
        t = time.time()
        quantize_(m, cfg, calibration=calib.to(dev) if cfg.stats else None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.time() - t
        bits = avg_bits(m)
        with torch.no_grad():
            ppl = perplexity(dequantized_copy(m), evalt.to(dev), ctx_len=args.ctx, max_windows=args.max_windows)
        rows.append({"config": name, "method": repr(cfg), "ppl": ppl, "bits": bits, "seconds": secs})
        print(f"{name:8s} ppl {ppl:9.4f}  bits {bits:.4f}  quantize {secs:7.1f}s  {cfg!r}", flush=True)
        del m
    meta = {"n_samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]), "ctx": args.ctx,
            "eval_tokens": int(evalt.shape[1]), "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))
    assert all(math.isfinite(r["ppl"]) for r in rows)


if __name__ == "__main__":
    main()
