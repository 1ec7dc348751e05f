"""Where a CPU NF4 call's time goes (issue 7, item 7: NF4 <= 0.35 ms for 1x4096 @ 4096x4096), in one process.

Prints three markdown tables (`results/cpu.md` run 10 quotes them):

1. The same NF4 (double quant, blocks of 64) weight through each layer of the call, medians of many calls:
   the span-64 C kernel alone (float32 tables; bf16 inputs with the round-up masks that give the reference's bf16
   weights), ``cpu_lut4.lut4_linear``, ``ops.cpu.linear``, ``ops.cpu.qlinear`` (the op's CPU kernel with its cache),
   ``QuantLinear``; ratios against the C kernel with float32 tables.
2. ``QuantLinear``'s tensors read through ``nn.Module.__getattr__`` against ``_buffers`` (µs a call).
3. Why the masks stay: the share of NF4 groups for which some nudged scale ``s·(1 + d)`` (a grid of ``d``) makes
   plain truncation of ``lut·s`` to bf16 equal the reference's rounding for all 16 entries.

Run on a quiet machine: ``OMP_NUM_THREADS=2 python benchmarks/cpu_nf4_parts.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from lowbit.formats.codebook import Codebook
from lowbit.nn.linear import QuantLinear
from lowbit.ops import cpu, cpu_lut4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu import timeit  # noqa: E402  (benchmarks/cpu.py: median ms of reps calls after 3 warm-up calls)


def median_us(fn, reps: int) -> float:
    return timeit(fn, reps) * 1e3


def call_layers(K: int, N: int, reps: int) -> str:
    torch.manual_seed(0)
    q = Codebook("nf4", 64, True).quantize(torch.randn(N, K) * 0.02)
    lib = cpu_lut4._lib_span64()
    if lib is None:
        return "span-64 kernel not available here (needs AVX-512 and a C compiler)\n"
    cpu.enable_qlinear_fast_path()
    m = QuantLinear(q)
    data = [getattr(m, n) for n in m._names]
    x32 = torch.randn(1, K)
    xb = x32.bfloat16()
    w = cpu.pack(q, torch.float32)
    y32, yb = torch.empty(1, N), torch.empty(1, N, dtype=torch.bfloat16)
    threads = torch.get_num_threads()

    def raw(x, up, y):
        return lambda: lib.lowbit_lut4_span64_gemm(x.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(),
                                                   w.lut.data_ptr(), up, 0, y.data_ptr(), 1, N, w.padded_in,
                                                   w.group_size, int(x.dtype == torch.bfloat16),
                                                   int(y.dtype == torch.bfloat16), threads)

    rows = []
    with torch.no_grad():
        for label, x, fns in (
                ("float32 in", x32, [("C kernel, float32 tables", raw(x32, 0, y32)),
                                     ("lut4_linear", lambda: cpu_lut4.lut4_linear(x32, w)),
                                     ("ops.cpu.linear", lambda: cpu.linear(x32, w)),
                                     ("ops.cpu.qlinear", lambda: cpu.qlinear(x32, data, m._spec, [N, K], None)),
                                     ("QuantLinear", lambda: m(x32))]),
                ("bf16 in", xb, [("C kernel, bf16 round-up masks, bf16 out", raw(xb, w.round_up.data_ptr(), yb)),
                                 ("lut4_linear", lambda: cpu_lut4.lut4_linear(xb, w)),
                                 ("ops.cpu.linear", lambda: cpu.linear(xb, w)),
                                 ("ops.cpu.qlinear", lambda: cpu.qlinear(xb, data, m._spec, [N, K], None)),
                                 ("QuantLinear", lambda: m(xb))])):
            for name, fn in fns:
                rows.append((label, name, median_us(fn, reps)))
    base = rows[0][2]
    out = [f"NF4 (double quant, blocks of 64), 1x{K} @ {K}x{N}, {threads} threads, median of {reps} calls", "",
           "| inputs | path | µs | × the C kernel with float32 tables |", "|---|---|---|---|"]
    out += [f"| {a} | {b} | {t:.1f} | {t / base:.3f} |" for a, b, t in rows]
    return "\n".join(out) + "\n"


def attribute_reads(reps: int) -> str:
    m = QuantLinear(Codebook("nf4", 64, True).quantize(torch.randn(576, 576)))
    names, b = m._names, m._buffers
    ga = median_us(lambda: [getattr(m, n) for n in names], reps)
    bf = median_us(lambda: [b[n] for n in names], reps)
    return ("| QuantLinear's 4 NF4 tensors read by | µs a call |\n|---|---|\n"
            f"| `getattr` (nn.Module.__getattr__) | {ga:.2f} |\n| `_buffers[name]` | {bf:.2f} |\n")


def nudged_scale_share(N: int, K: int) -> str:
    torch.manual_seed(0)
    w = cpu_lut4.pack_codebook(Codebook("nf4", 64, True).quantize(torch.randn(N, K) * 0.02), span=64)
    s, lut = w.scale.reshape(-1).float(), w.lut.float()

    def trunc16(v):
        return (v.view(torch.int32) & -65536).view(torch.float32)

    target = (lut[None, :] * s[:, None]).bfloat16().float()
    ok = torch.zeros(len(s), dtype=torch.bool)
    grid = [0.0] + [k * 2.0 ** -12 for k in range(1, 33)]
    for d in grid:
        ok |= (trunc16(lut[None, :] * (s * (1 + d))[:, None]) == target).all(1)
    return (f"{len(s)} NF4 groups: a nudged scale s·(1 + d), d in {{0, 2^-12 … 32·2^-12}}, makes truncation exact "
            f"for all 16 entries in {100 * ok.float().mean().item():.1f} % of them\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=400)
    a = ap.parse_args()
    print(call_layers(a.K, a.N, a.reps))
    print(attribute_reads(20 * a.reps))
    print(nudged_scale_share(1024, a.K))


if __name__ == "__main__":
    main()
