"""The VNNI kernels' software-prefetch distance, on warm weights and on weights streamed from DRAM, one process.

Run:  python benchmarks/cpu_prefetch.py [--threads 2] [--distances 1024 2048 4096 8192] [--mbytes 600]

`benchmarks/cpu.py` times one warm weight (it stays in this machine's 260 MB L3 between calls). A model's decode
reads every layer's weight once per token, and a model past the L3 streams them from DRAM, where the prefetch
distance matters more. This compiles :mod:`lowbit.ops.cpu_vnni`'s AVX-512 kernels once per ``PF_AHEAD`` (bytes of
weight the loop prefetches ahead) and times the int8 (W8A16, float32 input: 3 limbs) and 4-bit affine (g128)
matmuls at one input row, on one warm weight and on enough rotating copies (``--mbytes`` of int8 weights) that each
call reads its weight from DRAM; torch's dynamic int8 (fbgemm) on the same rotation for scale. Median ms.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
import warnings

import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.ops import cpu_native, cpu_vnni


def kernels(distance: int) -> ctypes.CDLL:
    source, flags = cpu_vnni._VARIANTS["avx512"]
    lib = cpu_native.load(f"vnni_pf{distance}", source, (*flags, f"-DPF_AHEAD={distance}"))
    if lib is None:
        raise SystemExit("the AVX-512 VNNI kernels do not run here")
    lib.lowbit_w8_linear.restype = lib.lowbit_int4_linear.restype = ctypes.c_int
    lib.lowbit_w8_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6
    lib.lowbit_int4_linear.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 7
    return lib


def rotate(fn, items, calls: int = 300) -> float:  # type: ignore[no-untyped-def]
    rounds = max(6, calls // len(items))
    ts = []
    for r in range(rounds):
        for it in items:
            t = time.perf_counter()
            fn(it)
            if r:  # the first round warms up
                ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--distances", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--mbytes", type=int, default=600, help="int8 weight bytes in the rotation (past the L3)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    libs = {d: kernels(d) for d in a.distances}
    torch.manual_seed(0)
    rows = []
    for K, N, rotating in ((4096, 4096, False), (4096, 4096, True), (2048, 5632, True)):
        copies = max(8, a.mbytes * 10**6 // (K * N)) if rotating else 1
        x = torch.randn(1, K)
        y = torch.empty(1, N)
        w8s, w4s, dqs = [], [], []
        for _ in range(copies):
            W = torch.randn(N, K) * 0.02
            q8 = Int8Rowwise().quantize(W)
            w8s.append(cpu_vnni.pack_w8(q8["qdata"], q8["scale"]))
            w4s.append(cpu_vnni.pack_int4(IntAffine(bits=4, group_size=128).quantize(W)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lin = torch.nn.Linear(K, N, bias=False)
                lin.weight.data = W
                dqs.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                                  dtype=torch.qint8)[0])

        def int8(lib, w):  # type: ignore[no-untyped-def]
            lib.lowbit_w8_linear(x.data_ptr(), w.qdata.data_ptr(), w.offset.data_ptr(), w.scale.data_ptr(),
                                 y.data_ptr(), 1, 3, K, N, w.qdata.shape[1], a.threads)

        def int4(lib, w):  # type: ignore[no-untyped-def]
            lib.lowbit_int4_linear(x.data_ptr(), w.codes.data_ptr(), w.scale.data_ptr(), w.shift.data_ptr(),
                                   y.data_ptr(), 1, 3, K, N, w.padded_in, w.group_size, a.threads)

        where = f"{copies} rotating copies ({copies * K * N / 1e6:.0f} MB int8)" if rotating else "one warm weight"
        with torch.no_grad():
            for rnd in range(2):
                t8 = {d: rotate(lambda w, L=L: int8(L, w), w8s) for d, L in libs.items()}
                t4 = {d: rotate(lambda w, L=L: int4(L, w), w4s) for d, L in libs.items()}
                tdq = rotate(lambda m: m(x), dqs)
                rows.append((f"{K}×{N}, {where}, round {rnd + 1}", t8, t4, tdq))
                print(rows[-1], flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n# VNNI prefetch distance: 1 input row, {a.threads} threads, torch {torch.__version__}, "
          f"load average {load:.1f} at the end; median ms\n")
    print("| weights | " + " | ".join(f"int8 PF {d}" for d in a.distances) + " | "
          + " | ".join(f"int4 PF {d}" for d in a.distances) + " | torch dynamic int8 |")
    print("|---" * (2 * len(a.distances) + 2) + "|")
    for name, t8, t4, tdq in rows:
        print(f"| {name} | " + " | ".join(f"{t8[d]:.3f}" for d in a.distances) + " | "
              + " | ".join(f"{t4[d]:.3f}" for d in a.distances) + f" | {tdq:.3f} |")


if __name__ == "__main__":
    main()
