"""CPU matmul benchmark: lowbit's quantized paths against torch and the peers installed, in one process.

Run:  python benchmarks/cpu.py [--threads 2] [--K 4096] [--N 4096] [--M 1]

Prints a median-time table (ms) and ratios against torch fp32. Peers that are not installed are listed as
missing, never estimated. Weights are random (N(0, 0.02)); inputs N(0, 1), fresh per timing call set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.ops import cpu
from lowbit.ops import reference as ref


def timeit(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    W = torch.randn(a.N, a.K) * 0.02
    x = torch.randn(a.M, a.K)
    xb = x.bfloat16()
    rows: list[tuple[str, float | None, str]] = []

    def add(name, fn, note=""):
        try:
            rows.append((name, timeit(fn, a.reps), note))
        except Exception as e:  # record, never hide
            rows.append((name, None, f"error: {e!r}"[:120]))

    add("torch fp32", lambda: torch.nn.functional.linear(x, W))
    Wb = W.bfloat16()
    add("torch bf16", lambda: torch.nn.functional.linear(xb, Wb))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.nn.Linear(a.K, a.N, bias=False)
        lin.weight.data = W.clone()
        dq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    add("torch dynamic int8 (W8A8)", lambda: dq(x))
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        qW, st = F.quantize_4bit(W.bfloat16(), quant_type="nf4", compress_statistics=True)
        add(f"bitsandbytes {bnb.__version__} NF4 (bf16 in)", lambda: bnb.matmul_4bit(xb, qW.t(), quant_state=st))
    except Exception as e:
        rows.append(("bitsandbytes NF4", None, f"missing: {e!r}"[:100]))
    for peer in ("optimum.quanto", "gptqmodel"):
        try:
            __import__(peer)
            rows.append((peer, None, "installed but not wired into this script"))
        except Exception:
            rows.append((peer, None, "not installed here"))

    q4 = IntAffine(bits=4, group_size=128).quantize(W)
    data4 = [q4[n] for n in q4.format.tensor_names()]
    add("lowbit int4 g128 reference (dequant+matmul)",
        lambda: ref.qlinear(x, data4, q4.format.spec(), list(q4.shape), None))
    w4b = cpu.pack(q4, torch.bfloat16)
    w4f = cpu.pack(q4, torch.float32)
    add("lowbit int4 g128 ATen int4pack (bf16)", lambda: cpu.linear(xb, w4b))
    add("lowbit int4 g128 ATen int4pack (fp32)", lambda: cpu.linear(x, w4f))
    q8 = Int8Rowwise().quantize(W)
    w8b = cpu.pack(q8, torch.bfloat16)
    w8f = cpu.pack(q8, torch.float32)
    add("lowbit int8 rowwise ATen int8pack (bf16)", lambda: cpu.linear(xb, w8b))
    add("lowbit int8 rowwise ATen int8pack (fp32)", lambda: cpu.linear(x, w8f))
    rows.append(("lowbit NF4", None, "no CPU fast path (no ATen LUT matmul); reference only"))

    base = rows[0][1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# CPU: {a.M}×{a.K} input, {a.N}×{a.K} weight, {a.threads} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, load average {load:.1f} at the end")
    print()
    print("| path | median ms | × fp32 | note |")
    print("|---|---|---|---|")
    for name, t, note in rows:
        if t is None:
            print(f"| {name} | – | – | {note} |")
        else:
            print(f"| {name} | {t:.3f} | {base / t:.2f} | {note} |")


if __name__ == "__main__":
    main()
