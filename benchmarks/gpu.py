"""Check and time every lowbit Triton kernel against bf16 torch and bitsandbytes, in one process.

Run on a CUDA machine:  python benchmarks/gpu.py [--quick] [--out DIR]

For each (K × N, M) row of issue 7 it checks each kernel against the reference (float64 / fp32 dequantize
then matmul, relative Frobenius error) on fresh random inputs, then times it with
``triton.testing.do_bench`` (median), rotating over enough weight copies that the weights do not sit in L2.
The physical floor of a row is (bytes of the weight + activations + output) / measured copy bandwidth.
Prints a markdown table and writes it (plus JSON) to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
import traceback

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from lowbit.ops import repack as R  # noqa: E402
from lowbit.ops.triton import adam8, w8a8, wq  # noqa: E402

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
L2_BYTES = 50 * 2**20
ISSUE = {  # issue 7's table (same card kind, bnb 0.50.2, torch 2.11): bf16, bnb NF4, bnb LLM.int8, µs
    (4096, 4096, 1): (33.2, 64.6, 236.1), (4096, 11008, 1): (53.3, 68.0, 230.8),
    (8192, 28672, 1): (192.1, 155.1, 263.5), (8192, 28672, 16): (191.7, 418.2, 325.6),
    (8192, 28672, 2048): (1244.8, 1722.4, 1523.4)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm())


def bench(fn, rep: int = 100) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1000.0  # µs


def bench_graph(fn, n: int = 20) -> float:
    """µs per call with ``n`` calls captured in one CUDA graph and replayed (no host launch cost in the time)."""
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n):
            fn()
    return bench(g.replay) / n


def bench_loop(fn, n: int = 50, rounds: int = 7) -> float:
    """µs per call: CUDA events around ``n`` back-to-back calls (no graph, no L2 flush between them), median over
    ``rounds``. ``bench`` (``do_bench``) zeroes a 256 MB L2-flush buffer before every timed call, and the dirty lines
    it leaves are written back while the timed kernel runs; the callers here rotate weight copies beyond L2, so the
    flush is not needed for coldness. Host launch cost still counts here wherever the host is slower than the GPU."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1000.0 / n)
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth() -> float:
    a = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a)) / 1e6
    return 2 * a.numel() * 2 / t  # bytes/s, read + write


def cycler(items):
    it = itertools.cycle(items)
    return lambda: next(it)


def make_affine(N: int, K: int, bits: int, group: int, act_order: bool = False, float_zero: bool = False):
    G = -(-K // group)
    codes = torch.randint(0, 1 << bits, (N, K), device="cuda", dtype=torch.uint8)
    scale = (torch.rand(N, G, device="cuda") * 0.01 + 0.001).half()
    if float_zero:
        zero = (torch.rand(N, G, device="cuda") * (2**bits - 1)).half()
    else:
        zero = torch.randint(0, 1 << bits, (N, G), device="cuda").half()
    g_idx = (torch.randperm(K, device="cuda") // group).to(torch.int32) if act_order else None
    return R.repack_affine(codes, scale, zero, bits, group, g_idx)


def make_nf4_dq(N: int, K: int):
    """NF4 with double quantization (QLoRA): absmax per 64 stored as 8-bit codes per 256 blocks + offset.

    The kernel reads the absmax after the (cheap, once) second-level dequantization, as fp16.
    """
    G = K // 64
    codes = torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8)
    absmax = torch.rand(N * G, device="cuda") * 0.05 + 0.01
    off = absmax.mean()
    a = (absmax - off).view(-1, 256)
    s2 = a.abs().amax(1, keepdim=True) / 127
    q2 = torch.round(a / s2).clamp(-127, 127)
    absmax_dq = (q2 * s2).view(-1) + off
    return R.repack_lut(codes, NF4.cuda(), 4, absmax_dq.view(N, G).half(), 64)


def make_lut_row(N: int, K: int, bits: int):
    codes = torch.randint(0, 1 << bits, (N, K), device="cuda", dtype=torch.uint8)
    lut = (torch.randn(N, 1 << bits, device="cuda") * 0.02).half()
    return R.repack_lut(codes, lut, bits)


VARIANTS = {
    "int4 g128 asym": lambda N, K: make_affine(N, K, 4, 128),
    "int4 g128 sym": lambda N, K: R.repack_affine(torch.randint(0, 16, (N, K), device="cuda", dtype=torch.uint8),
                                                  (torch.rand(N, -(-K // 128), device="cuda") * .01 + 1e-3).half(),
                                                  torch.full((N, -(-K // 128)), 8.0, device="cuda").half(), 4, 128),
    "int4 g128 act-order": lambda N, K: make_affine(N, K, 4, 128, act_order=True),
    "hqq int4 g64 float-zero": lambda N, K: make_affine(N, K, 4, 64, float_zero=True),
    "nf4 g64 dq": make_nf4_dq,
    "int3 g128": lambda N, K: make_affine(N, K, 3, 128),
    "int2 g128": lambda N, K: make_affine(N, K, 2, 128),
    "lut4 per-row (SqueezeLLM)": lambda N, K: make_lut_row(N, K, 4),
    "lut3 per-row (SqueezeLLM)": lambda N, K: make_lut_row(N, K, 3),
}


def lowbit_fn(pw_list, x, path, cfg=None):
    nxt = cycler(pw_list)
    if cfg is None:
        return lambda: wq.packed_linear(x, nxt(), None, path=path)
    if path == "gemv":
        return lambda: wq.gemv(x, nxt(), cfg).to(x.dtype)
    return lambda: wq.mm(x, nxt(), cfg)


def sweep(pws, x, path, M, N, K, quick_names):
    """Time a few tile configurations; returns {label: µs} (errors recorded, never hidden)."""
    pw = pws[0]
    res = {}
    Wd = R.dequantize_packed(pw, torch.float32)
    if path == "gemv":
        if pw.mode == "affine":
            cands = [dict(v=2)] + [dict(BN=bn, BK=128, waves=wv, pf=pf) for bn in (32, 64, 128) for wv in (4, 8)
                                   for pf in (True, False)]
        else:
            cands = [dict(BN=bn, BK=bk) for bn in (32, 64, 128) for bk in (128, 256)]
        for c in cands:
            cfg = wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, **c)
            lab = f"v{cfg['v']} BN{cfg['BN']} BK{cfg['BK']} w{cfg['num_warps']} split{cfg['split']} pf{int(cfg['pf'])}"
            if lab in res:
                continue
            try:
                y = wq.gemv(x, pw, cfg).to(x.dtype)
                e = rel(y, x.float() @ Wd.t())
                if not e < 2e-2:
                    res[lab] = f"wrong: err {e}"
                    continue
                res[lab] = bench(lowbit_fn(pws, x, path, cfg))
            except Exception as ex:
                res[lab] = repr(ex)[:120]
    else:
        xp = x if pw.perm is None else x.index_select(1, pw.perm.long())
        Wp = Wd if pw.perm is None else Wd[:, pw.perm.long()]
        magics = (True, False) if pw.mode == "affine" and pw.bits in (2, 4) else (False,)
        if M <= 64:
            cands = [(16, bn, bk, sp, w, st, mg) for bn in (64, 128) for bk in (64, 128) for sp in (2, 4)
                     for w, st in ((4, 4),) for mg in magics]
        else:
            cands = [(128, 128, 64, 1, 8, 3, mg) for mg in magics]
        for (bm, bn, bk, sp, w, st, mg) in cands:
            bk = wq._bk_for(pw.group_size, bk)
            k_tiles = -(-K // bk)
            k_per = -(-k_tiles // sp) * bk
            cfg = dict(BM=bm, BN=bn, BK=bk, split=-(-K // k_per), k_per=k_per, num_warps=w, num_stages=st, MAGIC=mg)
            lab = f"BM{bm} BN{bn} BK{bk} split{sp} w{w} s{st} {'magic' if mg else 'dequant-tile'}"
            try:
                y = wq.mm(xp, pw, cfg)
                e = rel(y, xp.float() @ Wp.t())
                if not e < 2e-2:
                    res[lab] = f"wrong: err {e}"
                    continue
                res[lab] = bench(lowbit_fn(pws, xp, path, cfg))
            except Exception as ex:
                res[lab] = repr(ex)[:120]
        if M >= wq.BIG_M:
            for ch in (0, 2048, 4096):
                lab = f"dequant+cuBLAS chunk {ch}"
                try:
                    y = wq.dequant_matmul(x, pw, ch)
                    e = rel(y, x.float() @ Wd.t())
                    res[lab] = bench(lambda: wq.dequant_matmul(x, pw, ch)) if e < 2e-2 else f"wrong: err {e}"
                except Exception as ex:
                    res[lab] = repr(ex)[:120]
    return res


def gemv_operands(K: int, N: int, name: str):
    """M = 1 operands: enough copies of the packed weight ``name`` to exceed L2 three times, its fp32 dequantized
    weight, x ``(1, K)`` bf16, bf16 weight copies for the baseline and their cycler."""
    torch.manual_seed(K + N)
    ncopy = max(1, math.ceil(3 * L2_BYTES / (N * K * 0.375)))
    pws = [VARIANTS[name](N, K) for _ in range(ncopy)]
    Wd = R.dequantize_packed(pws[0], torch.float32)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    Ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, ncopy // 4))]
    return pws, Wd, x, Ws, cycler(Ws)


def gemv_waves(out_dir: str, pf_only: bool = False) -> dict:
    """M = 1 GEMV (v4) split-K and tile width by how many waves the grid makes (ncu, session 4: the default grid at
    8192×28672 is 1.51 waves of 9 resident CTAs per SM); every config checked, then timed plain and as CUDA-graph
    replays against bf16 in the same process. ``pf_only``: v4 with and without the next K-tile's words prefetched."""
    res: dict = {}
    for (K, N), name in (((8192, 28672), "int4 g128 asym"), ((8192, 28672), "int2 g128"),
                         ((4096, 11008), "int4 g128 asym")):
        pws, Wd, x, Ws, nW = gemv_operands(K, N, name)
        out = {"bf16": bench(lambda: torch.nn.functional.linear(x, nW())),
               "bf16 graph": bench_graph(lambda: torch.nn.functional.linear(x, nW()))}
        grid = [(bn, sp, w, False) for bn in (32, 64, 128) for sp in (2, 4, 8, 16) for w in (4, 8)] if not pf_only \
            else [(bn, sp, 4, pf) for bn in (32, 64) for sp in (4, 8) for pf in (False, True)]
        for bn, sp, w, pf in grid:
            cfg = wq.gemv_config(N, K, pws[0].group_size, 132, pws[0].bits, "affine", BN=bn, split=sp,
                                 num_warps=w, pf=pf)
            lab = f"BN{bn} split{cfg['split']} w{w} programs {-(-N // bn) * cfg['split']}{' prefetch' if pf else ''}"
            if lab in out:
                continue
            xx = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            e = rel(wq.gemv(xx, pws[0], cfg), xx.float() @ Wd.t())
            if not e < 1e-3:
                out[lab] = f"wrong: err {e:.3e}"
                continue
            out[lab] = (bench(lowbit_fn(pws, x, "gemv", cfg)), bench_graph(lowbit_fn(pws, x, "gemv", cfg)))
        d = wq.gemv_config(N, K, pws[0].group_size, 132, pws[0].bits, "affine")
        key = f"{name} {K}x{N} (default BN{d['BN']} split{d['split']} w{d['num_warps']})"
        res[key] = out
        timed = sorted((v[1], k) for k, v in out.items() if isinstance(v, tuple))
        print(key, f"bf16 {out['bf16']:.1f} graph {out['bf16 graph']:.1f};",
              "best under graphs:", [(f"{v:.1f}", k) for v, k in timed[:6]], flush=True)
        del pws, Wd, Ws
    with open(os.path.join(out_dir, "gemv_waves.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def gemv_sweep(out_dir: str, bw: float) -> dict:
    """M = 1 GEMV versions and tiles (v3 mantissa decode vs v4 exact exponent decode), the per-row 4-bit LUT tiles
    that once gave wrong sums (with a K-segment / column localisation of any error), all checked before timing."""
    res: dict = {}
    grid4 = [dict(v=3), dict(v=4), dict(v=4, pmin=12)] + [dict(v=4, BN=bn, num_warps=w, split=sp, pmin=pm)
                                                          for bn in (32, 64, 128) for w in (4, 8) for sp in (1, 2, 4)
                                                          for pm in (24, 12)]
    plans = [((8192, 28672), "int4 g128 asym", grid4),
             ((4096, 11008), "int4 g128 asym", [dict(v=3), dict(v=4), dict(v=4, pmin=12)]),
             ((4096, 4096), "int4 g128 asym", [dict(v=3), dict(v=4), dict(v=4, pmin=12)]),
             ((8192, 28672), "int2 g128", [dict(v=4), dict(v=4, pmin=12)]),
             ((8192, 28672), "int3 g128", [dict(v=4), dict(v=4, pmin=12)])]
    for name in ():  # run 1 of this session swept sym / act-order / hqq / int3 / int2 (NOTES_gpu.md)
        plans.append(((8192, 28672), name, [dict(v=3), dict(v=4)] + [dict(v=4, BN=bn, num_warps=w)
                                                                      for bn in (128, 256) for w in (4, 8)]))
    for (K, N), name, cands in plans:
        torch.manual_seed(K + N)
        ncopy = max(1, math.ceil(3 * L2_BYTES / (N * K * 0.375)))
        pws = [VARIANTS[name](N, K) for _ in range(ncopy)]
        Wd = R.dequantize_packed(pws[0], torch.float32)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        Ws = [W] + [W.clone() for _ in range(max(1, ncopy // 4) - 1)]
        nW = cycler(Ws)
        out = {"bf16": bench(lambda: torch.nn.functional.linear(x, nW())),
               "bf16 graph": bench_graph(lambda: torch.nn.functional.linear(x, nW()))}
        for c in cands:
            cfg = wq.gemv_config(N, K, pws[0].group_size, 132, pws[0].bits, pws[0].mode, **c)
            lab = " ".join(f"{k}{v}" for k, v in cfg.items())
            if lab in out:
                continue
            try:
                xx = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
                e = rel(wq.gemv(xx, pws[0], cfg).to(xx.dtype), xx.float() @ Wd.t())
                if not e < 2e-2:
                    out[lab] = f"wrong: err {e:.3e}"
                    continue
                out[lab] = bench(lowbit_fn(pws, x, "gemv", cfg))
            except Exception as ex:
                out[lab] = repr(ex)[:160]
        timed = sorted((v, k) for k, v in out.items() if isinstance(v, float) and not k.startswith("bf16"))
        cfgs = {}
        for c in cands:
            cfg = wq.gemv_config(N, K, pws[0].group_size, 132, pws[0].bits, pws[0].mode, **c)
            cfgs[" ".join(f"{k}{v}" for k, v in cfg.items())] = cfg
        best = {}
        for v, k in timed[:3]:  # the best three again as CUDA-graph replays (no host launch cost)
            best[k + " graph"] = bench_graph(lowbit_fn(pws, x, "gemv", cfgs[k]))
        if not any(" v3 " in f" {k} " for _, k in timed[:3]):
            k3 = next((k for k in cfgs if " v3 " in f" {k} "), None)
            if k3 is not None and isinstance(out.get(k3), float):
                best[k3 + " graph"] = bench_graph(lowbit_fn(pws, x, "gemv", cfgs[k3]))
        out.update(best)
        key = f"{name} {K}x{N}"
        res[key] = out
        print(key, f"bf16 {out['bf16']:.1f} graph {out['bf16 graph']:.1f};",
              "best:", [(f"{v:.1f}", k) for v, k in timed[:5]], "graphs:", {k: round(v, 1) for k, v in best.items()},
              flush=True)
        del pws, Wd, Ws, W
    # mm (tl.dot) path: v3 (dequantized (BK, BN) tile) against v4 (one dot per code position)
    K, N = 8192, 28672
    for M in (16, 64, 256, 512):
        torch.manual_seed(M)
        ncopy = 2
        pws = [VARIANTS["int4 g128 asym"](N, K) for _ in range(ncopy)]
        Wd = R.dequantize_packed(pws[0], torch.float32)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        out = {"bf16": bench(lambda: torch.nn.functional.linear(x, W))}
        cands = [dict(v=3)] + ([dict(v=4, BN=bn, num_warps=w, split=sp, num_stages=st) for bn in (128, 256)
                                for w in (4, 8) for sp in (2, 4, 8) for st in (1, 3)] if M == 16 else
                               [dict(v=4, BM=bm, BN=bn, num_warps=w) for bm in (16, 64) for bn in (128, 256)
                                for w in (4, 8)])
        for c in cands:
            cfg = wq.mm_config(M, N, K, 128, 132, **c)
            lab = " ".join(f"{k}{v}" for k, v in cfg.items())
            if lab in out:
                continue
            try:
                xx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                e = rel(wq.mm(xx, pws[0], cfg), xx.float() @ Wd.t())
                if not e < 2e-2:
                    out[lab] = f"wrong: err {e:.3e}"
                    continue
                out[lab] = bench(lowbit_fn(pws, x, "mm", cfg))
                out[lab + " err"] = e
            except Exception as ex:
                out[lab] = repr(ex)[:160]
        timed = sorted((v, k) for k, v in out.items() if isinstance(v, float) and k != "bf16" and
                       not k.endswith(" err"))
        key = f"mm int4 g128 asym M{M}"
        res[key] = out
        print(key, f"bf16 {out['bf16']:.1f};", "best:", [(f"{v:.1f}", k) for v, k in timed[:5]],
              "v3:", [(f"{v:.1f}", k) for v, k in timed if " v3" in k][:1], flush=True)
        del pws, Wd, W
    # per-row 4-bit LUT tiles: which tiles are wrong, and where the error sits
    K, N = 8192, 28672
    for bits in (4,):
        pw = make_lut_row(N, K, bits)
        Wd = R.dequantize_packed(pw, torch.float32)
        for BN, BK, w in ((64, 256, 4), (128, 128, 4), (128, 128, 8)):
            for split in (2,):
                k_per = -(-(-(-K // BK)) // split) * BK
                cfg = dict(BN=BN, BK=BK, split=-(-K // k_per), k_per=k_per, num_warps=w, v=4, pf=False)
                cfg_auto = wq.gemv_config(N, K, pw.group_size, 132, bits, "lut_row", BN=BN, BK=BK, split=split)
                x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ Wd.t()
                y = wq.gemv(x, pw, cfg).float()
                e = rel(y, ref)
                lab = f"lut{bits} BN{BN} BK{BK} w{w} split{split}"
                info = {"err": e, "auto": cfg_auto, "auto err": rel(wq.gemv(x, pw, cfg_auto).float(), ref),
                        "auto us": bench(lambda: wq.gemv(x, pw, cfg_auto)), "defaults us": bench(
                            lambda: wq.gemv(x, pw, wq.gemv_config(N, K, pw.group_size, 132, bits, "lut_row")))}
                if not e < 2e-2:
                    col = ((y - ref).abs() > 1e-2 * ref.abs().max()).nonzero()[:, 1]
                    info["bad cols"] = int(col.numel())
                    info["bad col mod BN"] = sorted(set((col % BN).tolist()))[:16]
                    seg = []
                    for s0 in range(0, K, K // 16):
                        xs = torch.zeros_like(x)
                        xs[:, s0:s0 + K // 16] = x[:, s0:s0 + K // 16]
                        seg.append(round(rel(wq.gemv(xs, pw, cfg).float(), xs.float() @ Wd.t()), 4))
                    info["err by K/16 segment"] = seg
                    info["rerun err"] = rel(wq.gemv(x, pw, cfg).float(), ref)
                res[lab] = info
                print(lab, json.dumps(info), flush=True)
        del pw, Wd
    with open(os.path.join(out_dir, "gemv_sweep.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


I8_CANDIDATES = {  # BM/BN/BK, warps, stages, GROUP_M, maxnreg (128 lets two CTAs share an SM); session 4 run 1
    # swept 12 (NOTES_gpu.md); these are the session-3 tiles and the best four
    "t0 128/128/128 w8 s4 (session 3)": dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=4, GROUP_M=8),
    "t2 128/128/128 w8 s3 r128": dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3, GROUP_M=8, maxnreg=128),
    "t3 128/128/128 w8 s3 r128 g16": dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3, GROUP_M=16,
                                         maxnreg=128),
    "t7 128/256/128 w8 s3": dict(BM=128, BN=256, BK=128, num_warps=8, num_stages=3, GROUP_M=8),
    "t11 128/128/64 w8 s4 r128 g16": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4, GROUP_M=16, maxnreg=128),
}
MMT_CANDIDATES = {  # W4A16 M = 2048 fused, transposed (outᵀ = W·xᵀ, the weight tile from registers)
    "mmt4 128/128/128 w8 s3": dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=3, v=4),
    "mmt4 128/128/128 w8 s2 r128": dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=2, maxnreg=128, v=4),
    "mmt4 128/128/128 w8 s4": dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=4, v=4),
    "mmt4 64/128/128 w4 s3": dict(BM=64, BN=128, BK=128, num_warps=4, num_stages=3, v=4),
    "mmt4 256/128/128 w8 s2": dict(BM=256, BN=128, BK=128, num_warps=8, num_stages=2, v=4),
    "mmt v3 128/128/64 w8 s3": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3, v=3),
    "mmt v3 128/128/64 w8 s3 r128": dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3, maxnreg=128, v=3),
}
DQ_CANDIDATES = {  # W4A16 M = 2048 dequantize + cuBLAS: (chunk, trans, overlap)
    "chunk2048 (session 3)": (2048, False, False), "unchunked": (0, False, False), "chunk1024": (1024, False, False),
    "chunk4096": (4096, False, False), "chunk2048 trans": (2048, True, False), "chunk1024 trans": (1024, True, False),
    "chunk2048 overlap": (2048, False, True), "chunk2048 trans overlap": (2048, True, True),
}


def interleaved(fns: dict, rounds: int = 3, rep: int = 60) -> dict:
    """Time every fn ``rounds`` times, round-robin (bf16 first in each round): the baseline's drift lands in every
    variant alike. Returns {name: {"us": median, "runs": [...], "x bf16": median of per-round bf16/fn ratios}}."""
    runs: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            runs[k].append(bench(f, rep=rep))
    out = {}
    for k, v in runs.items():
        ratios = sorted(b / t for b, t in zip(runs["bf16"], v))
        out[k] = {"us": sorted(v)[len(v) // 2], "runs": [round(t, 1) for t in v],
                  "x bf16": ratios[len(ratios) // 2], "x bf16 min": ratios[0]}
    return out


def big_m_operands(K: int, N: int, M: int, seed: int):
    """``(W, next bf16 weight copy, x, x with 8 outlier columns, s_w, int8 codes)`` for the M = 2048 sweeps: three
    rotating bf16 copies of W (beyond L2), per-row int8 codes of W, and x with 8 columns scaled by 8 (|x| >= 6
    somewhere in each)."""
    torch.manual_seed(seed)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    nW = cycler([W] + [W.clone() for _ in range(2)])
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    sw = (W.float().abs().amax(1) / 127).clamp(min=1e-12)
    qd = torch.round(W.float() / sw[:, None]).clamp(-127, 127).to(torch.int8)
    xo = x.clone()
    xo[:, torch.randperm(K, device="cuda")[:8]] *= 8.0
    return W, nW, x, xo, sw, qd


def w8a8_parts(out_dir: str) -> dict:
    """Where LLM.int8()'s time goes at M = 2048, K×N = 8192×28672 (8 outlier columns): each stage of
    ``int8_linear`` timed alone, the GEMM kernel with and without its outlier epilogue on the same inputs."""
    K, N, M = 8192, 28672, 2048
    W, nW, x, xo, sw, qd = big_m_operands(K, N, M, 12)
    flags = w8a8.outlier_columns(xo, 6.0)
    cols, count = w8a8.outlier_list(flags)
    xq, sx, _ = w8a8.quantize_rows(xo, torch.int8, 6.0)
    t = w8a8.I8_TILES
    out = torch.empty((M, N), device="cuda", dtype=torch.bfloat16)
    xop, wop = w8a8.outlier_operands(xo, qd, sw, cols, count)

    def gemm(has_out: bool):
        grid = (triton.cdiv(M, t["BM"]) * triton.cdiv(N, t["BN"]),)
        w8a8._i8_mm_kernel[grid](xq, qd, sx, sw, out, xo, cols, count, xop, wop, sw, M, N, K, K, BM=t["BM"],
                                 BN=t["BN"], BK=t["BK"], GROUP_M=t["GROUP_M"], EVEN_K=True, HAS_OUT=has_out,
                                 C=w8a8.OUTLIER_CAP, IEEE=False, HAS_BIAS=False, num_warps=t["num_warps"],
                                 num_stages=t["num_stages"], maxnreg=t.get("maxnreg"))
    fns = {"bf16": lambda: torch.nn.functional.linear(x, nW()),
           "int8 fused (default tiles)": lambda: w8a8.int8_linear(x, qd, sw, None, 0.0),
           "llm.int8 fused (default tiles)": lambda: w8a8.int8_linear(xo, qd, sw, None, 6.0),
           "part: outlier_columns": lambda: w8a8.outlier_columns(xo, 6.0),
           "part: outlier_list": lambda: w8a8.outlier_list(flags),
           "part: outlier_operands (pack)": lambda: w8a8.outlier_operands(xo, qd, sw, cols, count),
           "part: quantize_rows thr 6 (incl. outlier_columns)": lambda: w8a8.quantize_rows(xo, torch.int8, 6.0),
           "part: quantize_rows thr 0": lambda: w8a8.quantize_rows(x, torch.int8, 0.0),
           "part: GEMM kernel, no outlier epilogue": lambda: gemm(False),
           "part: GEMM kernel, 8-column outlier epilogue": lambda: gemm(True)}
    res = interleaved(fns)
    print("w8a8 parts", json.dumps({k: (round(v["us"], 1), round(v["x bf16"], 3)) for k, v in res.items()}),
          flush=True)
    with open(os.path.join(out_dir, "w8a8_parts.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def big_m_sweep(out_dir: str) -> dict:
    """M = 2048, K×N = 8192×28672: int8 W8A8 and LLM.int8() tile candidates, the W4A16 dequantize+cuBLAS
    variants, bf16 / FP8 / cuBLAS int8 baselines, all checked on fresh inputs and timed interleaved."""
    from lowbit.ops import reference as ref_ops

    K, N, M = 8192, 28672, 2048
    res: dict = {}
    W, nW, x, xo, sw, qd = big_m_operands(K, N, M, 11)
    sw8 = (W.float().abs().amax(1) / 448).clamp(min=1e-12)
    qd8 = (W.float() / sw8[:, None]).to(torch.float8_e4m3fn)
    fns = {"bf16": lambda: torch.nn.functional.linear(x, nW()),
           "fp8 _scaled_mm": lambda: w8a8.fp8_linear(x, qd8, sw8),
           "int8 _int_mm": lambda: w8a8.int8_linear(x, qd, sw, None, 0.0, fused=False),
           "llm.int8 _int_mm": lambda: w8a8.int8_linear(xo, qd, sw, None, 6.0, fused=False)}
    checks: dict = {}
    for lab, t in I8_CANDIDATES.items():
        for thr, kind in ((0.0, "int8"), (6.0, "llm.int8")):
            try:
                xx = torch.randn(300, K, device="cuda", dtype=torch.bfloat16)  # fresh rows, M not a tile multiple
                if thr:
                    xx[:, torch.randperm(K, device="cuda")[:8]] *= 8.0
                y = w8a8.int8_linear(xx, qd, sw, None, thr, tiles=t)
                e = rel(y, ref_ops.w8a8_linear(xx, qd, sw, None, thr))
                checks[f"{kind} {lab}"] = e
                if not e < 1e-2:
                    continue
                xi = x if thr == 0 else xo
                fns[f"{kind} fused {lab}"] = (lambda xi=xi, thr=thr, t=t:
                                              w8a8.int8_linear(xi, qd, sw, None, thr, tiles=t))
            except Exception as ex:
                checks[f"{kind} {lab}"] = repr(ex)[:200]
    print("w8a8 checks", json.dumps(checks), flush=True)
    res["w8a8 checks"] = checks
    res["w8a8"] = interleaved(fns)
    print("w8a8", json.dumps({k: (round(v["us"], 1), round(v["x bf16"], 3)) for k, v in res["w8a8"].items()}),
          flush=True)
    del qd8
    # W4A16 dequantize + cuBLAS variants
    fns = {"bf16": lambda: torch.nn.functional.linear(x, nW())}
    checks = {}
    for name in VARIANTS:
        full = name == "int4 g128 asym"
        pws = [VARIANTS[name](N, K) for _ in range(2)]
        Wd = R.dequantize_packed(pws[0], torch.float32)
        xx = torch.randn(256, K, device="cuda", dtype=torch.bfloat16)
        refy = xx.float() @ Wd.t()
        del Wd
        for lab, cfg in MMT_CANDIDATES.items():
            if cfg.get("v") == 4 and not wq.mmt4_fits(pws[0], max(cfg["BK"], 256 if pws[0].bits == 2 else 0)):
                continue
            key = f"{name} {lab}"
            try:
                e = rel(wq.mmt(xx, pws[0], cfg), refy)
                checks[key] = e
                if e < 2e-2:
                    nxt = cycler(pws)
                    fns[key] = lambda nxt=nxt, cfg=cfg: wq.mmt(x, nxt(), cfg)
            except Exception as ex:
                checks[key] = repr(ex)[:200]
        for lab, (ch, tr, ov) in DQ_CANDIDATES.items():
            if not full and lab not in ("chunk2048 (session 3)", "chunk2048 trans"):
                continue
            key = f"{name} {lab}"
            try:
                e = rel(wq.dequant_matmul(xx, pws[0], ch, tr, ov), refy)
                checks[key] = e
                if e < 2e-2:
                    nxt = cycler(pws)
                    fns[key] = lambda nxt=nxt, ch=ch, tr=tr, ov=ov: wq.dequant_matmul(x, nxt(), ch, tr, ov)
            except Exception as ex:
                checks[key] = repr(ex)[:200]
        res.setdefault("w4a16 pws", []).append(pws)
    print("w4a16 checks", json.dumps(checks), flush=True)
    res["w4a16 checks"] = checks
    res["w4a16"] = interleaved(fns)
    res.pop("w4a16 pws")
    print("w4a16", json.dumps({k: (round(v["us"], 1), round(v["x bf16"], 3)) for k, v in res["w4a16"].items()}),
          flush=True)
    with open(os.path.join(out_dir, "big_m_sweep.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def _timed_cfgs(pws, x, path, cfgs, ref_w, graph=True):
    """{label: (µs plain, µs graph)} for each cfg of ``cfgs`` (label -> cfg), each checked first on a fresh x
    against fp32 dequantize+matmul (err < 1e-2 or it is recorded as wrong and not timed)."""
    out = {}
    M, K = x.shape
    for lab, cfg in cfgs.items():
        try:
            xx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            y = wq.gemv(xx, pws[0], cfg) if path == "gemv" else wq.mm(xx, pws[0], cfg)
            e = rel(y, xx.float() @ ref_w.t())
            if not e < 1e-2:
                out[lab] = f"wrong: err {e:.3e}"
                continue
            fn = lowbit_fn(pws, x, path, cfg)
            out[lab] = (round(bench(fn), 2), round(bench_graph(fn), 2) if graph else None, f"{e:.2e}")
        except Exception as ex:
            out[lab] = repr(ex)[:200]
            traceback.print_exc()
    return out


def one_launch_sweep(out_dir: str) -> dict:
    """Session 5 (NOTES_gpu.md): the M = 1 GEMV with split 1 (one launch, x's dtype written by the kernel) and its
    K loop pipelined through shared memory (``stages``: cp.async; ``tma``: tensor-descriptor bulk copies),
    against the split-K default, GEMV v6 (fp16x2 decode) tiles and its L2 prefetch distance; the M = 16 mm v4
    with split 1 / pipelining; M = 2048 3-bit plane-once dequantize against the former kernel (and, in runs 1-2,
    an NF4 byte-pair table, since removed). bf16 timed before and after each block."""
    res: dict = {}

    def lab(cfg):
        return " ".join(f"{k}{v}" for k, v in cfg.items() if k not in ("k_per", "pf", "v"))

    def dump():  # after every block: a run cut short still leaves what it measured
        with open(os.path.join(out_dir, "one_launch_sweep.json"), "w") as f:
            json.dump(res, f, indent=1)

    def record(key, row):  # keep, print the fastest under graphs, write
        res[key] = row
        timed = sorted((v[1], k) for k, v in row.items() if isinstance(v, tuple))
        print(key, json.dumps(row["before"]), json.dumps(row["after"]), "best under graphs:",
              [(v, k, row[k][0]) for v, k in timed[:8]], flush=True)
        dump()

    def base(x, nW):
        return {"bf16": round(bench(lambda: torch.nn.functional.linear(x, nW())), 2),
                "bf16 graph": round(bench_graph(lambda: torch.nn.functional.linear(x, nW())), 2)}

    def gemv_block():
        plans = [((8192, 28672), "int4 g128 asym", True), ((4096, 11008), "int4 g128 asym", True),
                 ((8192, 28672), "int2 g128", False), ((8192, 28672), "int4 g128 act-order", False),
                 ((8192, 28672), "hqq int4 g64 float-zero", False), ((8192, 28672), "int4 g128 sym", False)]
        best: list = []
        for (K, N), name, full in plans:
            pws, Wd, x, Ws, nW = gemv_operands(K, N, name)
            pw = pws[0]
            g = lambda **c: wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, **c)  # noqa: E731
            cfgs = {"default " + lab(g()): g()}
            if full:  # run 1: split 1 / cp.async / TMA (all slower); run 2: v6 tiles; run 3: v6 with L2 prefetch
                for bn in (32, 64):
                    for sp in (4, 8):
                        for pfd in (0, 2, 4, 8):
                            c = g(v=6, BN=bn, split=sp, pfd=pfd)
                            cfgs["v6 " + lab(c)] = c
            else:
                for c in best[:4]:
                    cc = g(**c)
                    cfgs[("v6 " if cc.get("v") == 6 else "") + lab(cc)] = cc
            row = {"before": base(x, nW)}
            row.update(_timed_cfgs(pws, x, "gemv", cfgs, Wd))
            row["after"] = base(x, nW)
            record(f"gemv {name} {K}x{N}", row)
            if full and not best:
                keep = sorted((v[1], k) for k, v in row.items() if isinstance(v, tuple) and not k.startswith("default"))
                for _, k in keep[:4]:
                    c = dict(cfgs[k])
                    best.append({kk: c[kk] for kk in ("BN", "split", "stages", "tma", "num_warps", "v", "pfd") if kk in c})
            del pws, Wd, Ws

    def mm_block():
        # M = 16: mm v4, split-K (atomics + zeroed fp32 + cast) against split 1 (one launch) and deeper pipelines
        K, N, M = 8192, 28672, 16
        for name in ("int4 g128 asym", "int3 g128"):
            torch.manual_seed(M)
            pws = [VARIANTS[name](N, K) for _ in range(2)]
            Wd = R.dequantize_packed(pws[0], torch.float32)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            Ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            nW = cycler(Ws)
            row = {"before": base(x, nW)}
            if name == "int4 g128 asym":
                d = wq.mm_config(M, N, K, 128, 132, v=4, BN=256, num_stages=3)
                cfgs = {"default " + lab(d): d}
                for bn, sp, st in ((256, 2, 3), (64, 1, 4), (128, 1, 3)):  # run 1's one-launch / split 2 bests, again
                    c = wq.mm_config(M, N, K, 128, 132, v=4, BN=bn, split=sp, num_stages=st)
                    cfgs[lab(c)] = c
            else:
                d = wq.mm_config(M, N, K, 128, 132)
                cfgs = {"default (planes once) " + lab(d): d, "former (words per K row) " + lab(d): dict(d, RS3=False)}
            row.update(_timed_cfgs(pws, x, "mm", cfgs, Wd))
            row["after"] = base(x, nW)
            record(f"mm {name} M{M} {K}x{N}", row)
            del pws, Wd, Ws

    def dequant_block():
        # M = 2048 dequantize + cuBLAS: 3-bit planes once against the former kernel; NF4 and int4 for reference
        K, N, M = 8192, 28672, 2048
        torch.manual_seed(5)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        nW = cycler([W] + [W.clone() for _ in range(2)])
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        fns = {"bf16": lambda: torch.nn.functional.linear(x, nW())}
        checks = {}
        keep = []
        for name, opts in (("nf4 g64 dq", {"default": {}}),  # the byte-pair table lost twice (runs 1-2): removed
                           ("int3 g128", {"planes once": dict(rs3=True), "former (words per K row)": dict(rs3=False)}),
                           ("int4 g128 asym", {"default": {}})):
            pws = [VARIANTS[name](N, K) for _ in range(2)]
            keep.append(pws)
            Wd = R.dequantize_packed(pws[0], torch.float32)
            xx = torch.randn(256, K, device="cuda", dtype=torch.bfloat16)
            refy = xx.float() @ Wd.t()
            del Wd
            for olab, o in opts.items():
                def call(xi, pwi, o=o):
                    rs3, wq.RS3 = wq.RS3, o.get("rs3", wq.RS3)
                    try:
                        return wq.dequant_matmul(xi, pwi, wq.DEQUANT_CHUNK)
                    finally:
                        wq.RS3 = rs3
                key = f"{name} {olab}"
                e = rel(call(xx, pws[0]), refy)
                checks[key] = e
                if e < 2e-2:
                    nxt = cycler(pws)
                    fns[key] = lambda nxt=nxt, call=call: call(x, nxt())
        res["dequant checks"] = checks
        res["dequant"] = interleaved(fns, rounds=5)
        print("dequant", json.dumps(checks), json.dumps({k: (round(v["us"], 1), round(v["x bf16"], 3))
                                                        for k, v in res["dequant"].items()}), flush=True)
        del keep
        dump()

    for block in (dequant_block, gemv_block) + ((mm_block,) if os.environ.get("LOWBIT_SWEEP_MM") else ()):
        block()
    return res


def m1_sweep(out_dir: str, bnb=None, quick: bool = False) -> dict:
    """Session 7: the M = 1 GEMVs at 8192×28672 (and int4 at 4096×11008) on the column-tiled layout
    (``gemv_config(tiled=True)``: each program's K range one contiguous run) and with serial split-K
    (``serial=True``: the last split of a column tile adds the others' sums and writes bf16; no zeroing or cast
    kernel) against the defaults, every config
    checked on a fresh x first, each timed three ways in one process: ``bench`` (do_bench, L2 flush before each
    call), ``bench_graph`` (20 calls a CUDA graph) and ``bench_loop`` (events around back-to-back calls, no flush);
    bf16 ``F.linear`` the same three ways before and after each block, bitsandbytes' NF4 GEMV beside NF4."""
    res: dict = {"device": torch.cuda.get_device_name()}

    def lab(cfg):
        return " ".join(f"{k}{v}" for k, v in cfg.items() if k not in ("k_per", "pf"))

    def base(x, nW, Ws, nf4=False):
        f = lambda: torch.nn.functional.linear(x, nW())  # noqa: E731
        b = {"bf16": round(bench(f), 2), "bf16 graph": round(bench_graph(f), 2), "bf16 loop": round(bench_loop(f), 2)}
        if nf4 and bnb is not None:
            try:
                b["bnb nf4"] = bnb_nf4_gemv(x, Ws, bnb)
                import bitsandbytes.functional as F
                qs = [F.quantize_4bit(w, quant_type="nf4", compress_statistics=True) for w in Ws]
                nq = cycler(qs)

                def fb():
                    q, st = nq()
                    return bnb.matmul_4bit(x, q.t(), quant_state=st)
                b["bnb nf4 loop"] = round(bench_loop(fb), 2)
            except Exception as e:
                b["bnb nf4"] = repr(e)[:200]
        return b

    def timed(pws, x, cfgs, ref_w):
        out = {}
        M, K = x.shape
        for k, cfg in cfgs.items():
            try:
                xx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                y = wq.gemv(xx, pws[0], cfg)
                e = rel(y, xx.float() @ ref_w.t())
                if not e < 1e-2:
                    out[k] = f"wrong: err {e:.3e}"
                    continue
                fn = lowbit_fn(pws, x, "gemv", cfg)
                out[k] = (round(bench(fn), 2), round(bench_graph(fn), 2), round(bench_loop(fn), 2), f"{e:.2e}")
            except Exception as ex:
                out[k] = repr(ex)[:200]
                traceback.print_exc()
        return out

    def block(K, N, name, extra, nf4=False):
        pws, Wd, x, Ws, nW = gemv_operands(K, N, name)
        pw = pws[0]
        g = lambda **c: wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode,  # noqa: E731
                                       act_order=pw.perm is not None, **c)
        cfgs = {"default " + lab(g()): g()}
        for c in extra:
            cc = g(**c)
            cfgs[lab(cc)] = cc
        row = {"before": base(x, nW, Ws, nf4)}
        row.update(timed(pws, x, cfgs, Wd))
        row["after"] = base(x, nW, Ws, nf4)
        res[f"{name} {K}x{N}"] = row
        t = sorted((v[1], k) for k, v in row.items() if isinstance(v, tuple))
        print(name, K, N, json.dumps(row["before"]), json.dumps(row["after"]), "fastest under graphs:",
              [(v, k, row[k][0], row[k][2]) for v, k in t[:6]], flush=True)
        with open(os.path.join(out_dir, "m1_sweep.json"), "w") as f:
            json.dump(res, f, indent=1)
        del pws, Wd, Ws
        return [cfgs[k] for _, k in t if cfgs[k].get("tiled")]

    v6 = lambda bn, sp, **c: dict(v=6, BN=bn, split=sp, tiled=True, **c)  # noqa: E731
    s6 = lambda bn, sp, **c: dict(v=6, BN=bn, split=sp, serial=True, **c)  # noqa: E731
    grid = [v6(64, 8, pfd=8), v6(64, 8), v6(64, 4), v6(64, 16), v6(128, 8), v6(128, 4), v6(128, 8, num_warps=8),
            v6(32, 16), v6(256, 4, num_warps=8), v6(128, 2, num_warps=8)]  # run 1: the column-tiled grid
    ser = [s6(64, 8, pfd=8), s6(64, 8, pfd=8, tiled=True), s6(64, 16, pfd=8), s6(32, 16, pfd=8), s6(64, 8),
           s6(128, 8, pfd=8), s6(64, 8, pfd=8, pf0=2), s6(64, 8, pfd=8, pf0=8), s6(64, 8, pfd=8, pf0=8, tiled=True),
           dict(v=6, BN=64, split=8, pfd=8, pf0=8)]  # run 2: serial split-K (no zeroing, no cast kernel), pf0
    if quick:
        grid, ser = grid[:2], ser[:2]
    block(8192, 28672, "int4 g128 asym", grid + ser)
    for name in ("int4 g128 sym", "int4 g128 act-order"):
        block(8192, 28672, name, [v6(64, 8, pfd=8)] + ser[:3])
    block(8192, 28672, "hqq int4 g64 float-zero", [s6(64, 8), s6(64, 16), s6(64, 8, tiled=True)])
    block(4096, 11008, "int4 g128 asym", [v6(32, 16), s6(64, 8), s6(32, 16), s6(64, 16)])
    v7 = lambda bn, w, sp=None, **c: dict(v=7, BN=bn, num_warps=w, split=sp, **c)  # noqa: E731
    for name in ("lut4 per-row (SqueezeLLM)", "lut3 per-row (SqueezeLLM)", "nf4 g64 dq"):
        cf = [v7(32, 1, tiled=True), v7(32, 1, 32, tiled=True), v7(64, 1, tiled=True), v7(64, 2, tiled=True),
              v7(128, 4, tiled=True), v7(32, 1, serial=True), v7(32, 1, serial=True, tiled=True),
              v7(32, 1, 32, serial=True, tiled=True), v7(64, 1, serial=True, tiled=True)]
        block(8192, 28672, name, cf[:2] + cf[5:7] if quick else cf, nf4=name.startswith("nf4"))
    return res


def bnb_nf4_gemv(x, Ws, bnb):
    """bitsandbytes NF4 (double quantization) on the bf16 weights ``Ws``: (µs, err against its own dequantize)."""
    import bitsandbytes.functional as F

    qs = [F.quantize_4bit(w, quant_type="nf4", compress_statistics=True) for w in Ws]
    ref = x.float() @ F.dequantize_4bit(qs[0][0], qs[0][1]).float().t()
    err = rel(bnb.matmul_4bit(x, qs[0][0].t(), quant_state=qs[0][1]), ref)
    nq = cycler(qs)

    def f():
        q, st = nq()
        return bnb.matmul_4bit(x, q.t(), quant_state=st)
    return round(bench(f), 2), f"{err:.2e}"


def lut_sweep(out_dir: str, bnb=None) -> dict:
    """Session 6: the M = 1 look-up-table GEMV v7 (byte-permute tables, :func:`wq._gemv7_kernel`) against the
    select-tree kernel (v4, the default until then) for NF4 (double quant), SqueezeLLM lut4 / lut3: a grid of
    tiles (BN × warps × BK × split, per-column tables as scaled fp16 or bf16) at 8192×28672, its four fastest
    under graphs again at 4096×11008; every config checked on a fresh x first; bf16 before and after each block,
    bitsandbytes' NF4 GEMV in the same process."""
    res: dict = {}

    def lab(cfg):
        return " ".join(f"{k}{v}" for k, v in cfg.items() if k not in ("k_per", "pf"))

    def base(x, nW, Ws):
        b = {"bf16": round(bench(lambda: torch.nn.functional.linear(x, nW())), 2),
             "bf16 graph": round(bench_graph(lambda: torch.nn.functional.linear(x, nW())), 2)}
        if bnb is not None:
            try:
                b["bnb nf4"] = bnb_nf4_gemv(x, Ws, bnb)
            except Exception as e:
                b["bnb nf4"] = repr(e)[:200]
        return b

    best: dict = {}
    for K, N in ((8192, 28672), (4096, 11008)):
        for name in ("nf4 g64 dq", "lut4 per-row (SqueezeLLM)", "lut3 per-row (SqueezeLLM)"):
            pws, Wd, x, Ws, nW = gemv_operands(K, N, name)
            pw = pws[0]
            g = lambda **c: wq.gemv_config(N, K, pw.group_size, 132, pw.bits, pw.mode, **c)  # noqa: E731
            cfgs = {"v4 select tree " + lab(g(v=4)): g(v=4), "default " + lab(g()): g()}
            if N >= 16384:  # sweep 1 (run 1): BN 64-512 × warps 1-4 × BK 64/128 × split 4/8/16 × f16t; run 2 here
                tiles = [(64, 1, 128), (64, 1, 256), (32, 1, 128), (64, 1, 64), (128, 2, 128)]
                if pw.mode == "lut":
                    tiles = [(64, 1, 64), (32, 1, 64), (128, 2, 64)]
                for bn, w, bk in tiles:
                    for sp in ((16, 32) if pw.mode == "lut_row" else (16, 32, 64)):
                        c = g(v=7, BN=bn, num_warps=w, BK=bk, split=sp)
                        cfgs["v7 " + lab(c)] = c
                if pw.mode == "lut_row":  # the bf16 tables (f16t off) at the default tiles
                    c = g(f16t=False)
                    cfgs["v7 " + lab(c)] = c
            else:
                for c in best.get(name, []):
                    cc = g(**c)
                    cfgs["v7 " + lab(cc)] = cc
            row = {"before": base(x, nW, Ws)}
            row.update(_timed_cfgs(pws, x, "gemv", cfgs, Wd))
            row["after"] = base(x, nW, Ws)
            res[f"{name} {K}x{N}"] = row
            timed = sorted((v[1], k) for k, v in row.items() if isinstance(v, tuple))
            print(name, K, N, json.dumps(row["before"]), json.dumps(row["after"]), "fastest under graphs:",
                  [(v, k, row[k][0]) for v, k in timed[:6]], flush=True)
            if N >= 16384:
                best[name] = [{kk: cfgs[k][kk] for kk in ("BN", "BK", "split", "num_warps", "v", "f16t")
                               if kk in cfgs[k]} for _, k in timed if k.startswith("v7")][:4]
            with open(os.path.join(out_dir, "lut_sweep.json"), "w") as f:
                json.dump(res, f, indent=1)
            del pws, Wd, Ws
    return res


def linear_check(out_dir: str) -> dict:
    """Session 6: per-Linear accuracy at the default model's shapes, M = 4 (the end-to-end decode's GEMV case): the
    reference path's ``F.linear`` on its own bf16 weight (cuBLAS, with and without reduced-precision reductions)
    and lowbit's GEMV against float64 sums over the same bf16 weight: relative error, the share of outputs that
    differ from the correctly rounded bf16 value, and the mean signed error (a bias would move a perplexity)."""
    from lowbit.formats.affine import IntAffine
    from lowbit.formats.codebook import Codebook

    res: dict = {}
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # (K, N): q/o, k/v, gate/up, down, head
    for fname, fmt in (("nf4", Codebook("nf4", 64, True)), ("int4g128", IntAffine(bits=4, group_size=128))):
        for K, N in shapes:
            torch.manual_seed(K + N)
            q = fmt.quantize(torch.randn(N, K) * 0.05)
            pw = R.repack_quantized(q).to("cuda")
            Wb = R.dequantize_packed(pw, torch.float32).to(torch.bfloat16)  # the reference op's weight
            row = {}
            for trial in range(3):
                x = torch.randn(4, K, device="cuda", dtype=torch.bfloat16)
                y64 = x.double() @ Wb.double().t()
                yr = y64.to(torch.bfloat16).double()  # correctly rounded
                outs = {"lowbit gemv": wq.packed_linear(x, pw)}
                for red in (True, False):
                    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = red
                    outs["F.linear bf16" + (" (reduced-precision allowed)" if red else " (fp32 reduction)")] = \
                        torch.nn.functional.linear(x, Wb)
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
                for lab, y in outs.items():
                    d = y.double() - y64
                    r = row.setdefault(lab, {"rel err": [], "outputs not correctly rounded": [], "mean signed err / rms": []})
                    r["rel err"].append(float(d.norm() / y64.norm()))
                    r["outputs not correctly rounded"].append(float((y.double() != yr).double().mean()))
                    r["mean signed err / rms"].append(float(d.mean() / y64.pow(2).mean().sqrt()))
            res[f"{fname} K{K} N{N}"] = row
            print(fname, K, N, json.dumps({k: {kk: [f"{x:.2e}" for x in vv] for kk, vv in v.items()} for k, v in row.items()}),
                  flush=True)
    with open(os.path.join(out_dir, "linear_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


SWEEP_NAMES = ("int4 g128 asym", "nf4 g64 dq", "lut3 per-row (SqueezeLLM)")
args_sweep = False
args_graph = False
args_graph_only = False


def run_matmuls(rows, out_rows, bw, bnb, quick):
    for (K, N, M) in rows:
        torch.manual_seed(K + N + M)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        ncopy = max(1, math.ceil(3 * L2_BYTES / (N * K * 0.375)))
        Ws = [W] + [W.clone() for _ in range(ncopy - 1)]
        row = {"K": K, "N": N, "M": M, "copies": ncopy}
        nW = cycler(Ws)
        row["bf16"] = bench(lambda: torch.nn.functional.linear(x, nW()))
        if args_graph and M <= 16:
            row["bf16 graph"] = bench_graph(lambda: torch.nn.functional.linear(x, nW()))
        if bnb is not None and not args_graph_only:
            try:
                import bitsandbytes.functional as F

                qs = [F.quantize_4bit(w, quant_type="nf4", compress_statistics=True) for w in Ws]
                ref = x.float() @ F.dequantize_4bit(qs[0][0], qs[0][1]).float().t()
                got = bnb.matmul_4bit(x, qs[0][0].t(), quant_state=qs[0][1])
                row["bnb nf4 err"] = rel(got, ref)
                nq = cycler(qs)

                def f_bnb4():
                    q, s = nq()
                    return bnb.matmul_4bit(x, q.t(), quant_state=s)
                row["bnb nf4"] = bench(f_bnb4)
                del qs
            except Exception as e:  # record, never hide
                row["bnb nf4 error"] = repr(e)[:200]
            try:
                mods = []
                for w in Ws[: max(1, ncopy // 2)]:
                    lin = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=6.0)
                    lin.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
                    mods.append(lin.cuda())
                nm = cycler(mods)
                row["bnb int8"] = bench(lambda: nm()(x))
                del mods
            except Exception as e:
                row["bnb int8 error"] = repr(e)[:200]
        # floor of the 4-bit rows: int4 + fp16 scale/zero per 128 + x + y
        row["floor int4"] = (N * K * 0.5 + 2 * 2 * N * K / 128 + 2 * M * (K + N)) / bw * 1e6
        row["floor bf16"] = (N * K * 2 + 2 * M * (K + N)) / bw * 1e6
        names = list(VARIANTS) if not quick or M == 1 else ["int4 g128 asym", "nf4 g64 dq"]
        if M >= 16 and quick:
            names = ["int4 g128 asym"]
        for name in names:
            try:
                pws = [VARIANTS[name](N, K) for _ in range(ncopy)]
            except Exception as e:
                row[name + " error"] = repr(e)[:300]
                continue
            Wd = R.dequantize_packed(pws[0], torch.float32)
            ref = x.float() @ Wd.t()
            paths = ["gemv"] if M <= wq.GEMV_MAX_M else (["mm"] if M < wq.BIG_M else ["mm", "dequant"])
            if M >= wq.BIG_M and name == "int4 g128 asym":
                paths.append("mmt")  # session 4's fused transposed kernel (slower; kept for comparison)
            mm16 = wq._mm16()
            if mm16 is not None and mm16.fits(pws[0], M, torch.bfloat16):
                paths.append("mm16")  # packed_linear's default there since session 7; mm v4 ("mm") beside it
            for path in paths:
                key = f"{name} [{path}]"
                try:
                    xx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)  # fresh input per check
                    y = wq.packed_linear(xx, pws[0], None, path=path)
                    row[key + " err"] = rel(y, xx.float() @ Wd.t())
                    row[key] = bench(lowbit_fn(pws, x, path))
                    if args_graph and M <= 16:
                        row[key + " graph"] = bench_graph(lowbit_fn(pws, x, path))
                    if path == "dequant" and name in ("int4 g128 asym", "int2 g128"):  # the other dequantize
                        old = wq.DEQUANT_V4  # (until session 5 this set True afterwards: later rows ran v4)
                        wq.DEQUANT_V4 = not old
                        try:
                            row[f"{name} [dequant {'v3' if old else 'v4'}]"] = bench(lowbit_fn(pws, x, path))
                        finally:
                            wq.DEQUANT_V4 = old
                    if path == "mm" and M <= wq.MM4_MAX_M and name == "int4 g128 asym":  # the earlier mm tiles
                        cfg3 = wq.mm_config(M, N, K, 128, wq._sms(x.device))
                        row[f"{name} [mm v3]"] = bench(lowbit_fn(pws, x, path, cfg3))
                    if path == "gemv" and pws[0].mode != "affine":  # the select-tree tables (default until
                        # session 6) in the same process
                        acfg = wq.gemv_config(N, K, pws[0].group_size, wq._sms(x.device), pws[0].bits, pws[0].mode,
                                              v=4)
                        xx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                        row[f"{name} [gemv v4] err"] = rel(wq.gemv(xx, pws[0], acfg).to(xx.dtype), xx.float() @ Wd.t())
                        row[f"{name} [gemv v4]"] = bench(lowbit_fn(pws, x, path, acfg))
                        if args_graph:
                            row[f"{name} [gemv v4] graph"] = bench_graph(lowbit_fn(pws, x, path, acfg))
                    if path == "gemv" and pws[0].mode == "affine" and pws[0].bits == 4:
                        # the other GEMV decode in the same process: v4 where v6 is the default, else v6 (BN64
                        # split 8); at N >= 16384 v6 with or without the L2 prefetch, whichever is not the default
                        dflt = wq.gemv_config(N, K, pws[0].group_size, wq._sms(x.device), 4, "affine",
                                              act_order=pws[0].perm is not None)
                        g6 = lambda **c: wq.gemv_config(N, K, pws[0].group_size, wq._sms(x.device), 4,  # noqa: E731
                                                        "affine", v=6, BN=64, split=8, **c)
                        alts = {"gemv v4": wq.gemv_config(N, K, pws[0].group_size, wq._sms(x.device), 4, "affine",
                                                          v=4)} if dflt["v"] == 6 else {"gemv v6": g6()}
                        if N >= 16384:  # v6 with / without the L2 prefetch, whichever is not the default
                            alts.update({"gemv v6 no prefetch": g6()} if dflt.get("pfd") else {"gemv v6 pfd8": g6(pfd=8)})
                        for alab, acfg in alts.items():
                            xx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                            row[f"{name} [{alab}] err"] = rel(wq.gemv(xx, pws[0], acfg).to(xx.dtype),
                                                              xx.float() @ Wd.t())
                            row[f"{name} [{alab}]"] = bench(lowbit_fn(pws, x, path, acfg))
                            if args_graph:
                                row[f"{name} [{alab}] graph"] = bench_graph(lowbit_fn(pws, x, path, acfg))
                except Exception as e:
                    row[key + " error"] = repr(e)[:300]
                    traceback.print_exc()
            if args_sweep and name in SWEEP_NAMES and ((M == 1 and N >= 11008) or M == 16):
                for path in paths[:1]:
                    row[f"sweep {name} [{path}]"] = sweep(pws, x, path, M, N, K, None)
                    print(name, path, json.dumps(row[f"sweep {name} [{path}]"]), flush=True)
            del pws, Wd, ref
        if M >= 16 and not args_graph_only:
            w8 = []
            for kind in ("int8", "fp8"):
                try:
                    sw = (W.float().abs().amax(1) / (127 if kind == "int8" else 448)).clamp(min=1e-12)
                    qd = torch.round(W.float() / sw[:, None]).clamp(-127, 127).to(torch.int8) if kind == "int8" \
                        else (W.float() / sw[:, None]).to(torch.float8_e4m3fn)
                    from lowbit.ops import reference as ref_ops
                    xx = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                    if kind == "int8":
                        xo = xx.clone()
                        xo[:, torch.randperm(K, device="cuda")[:8]] *= 8.0  # 8 outlier columns, |x| >= 6
                        for thr, lab, fz in ((0.0, "int8 w8a8 [_int_mm]", False), (6.0, "llm.int8 [_int_mm]", False),
                                             (6.0, "llm.int8 [triton fused]", True)):
                            xi = xx if thr == 0 else xo
                            xs = xi[:256]  # reference on a row slice (fp64 on the GPU), kernel on the same rows
                            y = w8a8.int8_linear(xs, qd, sw, None, thr, fused=fz)
                            row[lab + " err"] = rel(y, ref_ops.w8a8_linear(xs, qd, sw, None, thr))
                            xq, _, _ = w8a8.quantize_rows(xi, torch.int8, thr)
                            xq = xq.cpu()
                            xi = xi.cpu()  # reference codes on the CPU (CUDA divides by a scalar via its reciprocal)
                            xin = xi.float().masked_fill(xi.float().abs() >= thr, 0) if thr else xi.float()
                            sx = (xin.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
                            xq_ref = torch.round(xin / sx).clamp(-127, 127).to(torch.int8)
                            if thr:
                                xq_ref[:, (xi.float().abs() >= thr).any(0)] = 0
                            row[lab + " codes exact"] = bool(torch.equal(xq, xq_ref))
                            row[lab + " codes differing"] = int((xq != xq_ref).sum())
                            xi = xi.cuda()
                            row[lab] = bench(lambda: w8a8.int8_linear(xi, qd, sw, None, thr, fused=fz))
                        xs = xx[:256]
                        y = w8a8.int8_linear(xs, qd, sw, None, 0.0, fused=True)
                        row["int8 w8a8 [triton fused] err"] = rel(y, ref_ops.w8a8_linear(xs, qd, sw, None, 0.0))
                        row["int8 w8a8 [triton fused]"] = bench(lambda: w8a8.int8_linear(xx, qd, sw, None, 0.0,
                                                                                         fused=True))
                    else:
                        xs = xx[:256]
                        y = w8a8.fp8_linear(xs, qd, sw)
                        row["fp8 w8a8 [_scaled_mm] err"] = rel(y, ref_ops.w8a8_linear(xs, qd, sw, None, 0.0))
                        row["fp8 w8a8 [_scaled_mm]"] = bench(lambda: w8a8.fp8_linear(xx, qd, sw))
                    w8.append(qd)
                except Exception as e:
                    row[kind + " error"] = repr(e)[:300]
                    traceback.print_exc()
        out_rows.append(row)
        print(json.dumps(row), flush=True)
        del Ws, W


def run_adam(n: int, bnb) -> dict:
    from lowbit.ops import reference as ref_ops
    from lowbit.optim.blockwise import quantize_blockwise, state_codebook

    res: dict = {"numel": n}
    cm, cv = state_codebook(8, True, "cuda"), state_codebook(8, False, "cuda")
    hp = dict(step=7, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, block_size=256)
    # correctness on 4M fresh random elements: GPU torch reference op chain vs the fused kernel
    m = 4 * 2**20 + 77
    p = torch.randn(m, device="cuda")
    g = torch.randn(m, device="cuda") * 0.01
    mq, ma = quantize_blockwise(torch.randn(m, device="cuda") * 1e-3, cm, 256)
    vq, va = quantize_blockwise(torch.rand(m, device="cuda") * 1e-5, cv, 256)
    A = [p.clone(), mq.clone(), ma.clone(), vq.clone(), va.clone()]
    B = [p.clone(), mq.clone(), ma.clone(), vq.clone(), va.clone()]
    ref_ops.adamw8bit_step_(A[0], g, A[1], A[2], A[3], A[4], cm, cv, **hp)
    adam8.adamw8bit_step_(B[0], g, B[1], B[2], B[3], B[4], cm, cv, **hp)
    C = [p.clone(), mq.clone(), ma.clone(), vq.clone(), va.clone()]
    adam8.adamw8bit_step_(C[0], g, C[1], C[2], C[3], C[4], cm, cv, **hp, first_guess=False)
    res["first-guess codes equal binary-search codes"] = bool(torch.equal(B[1], C[1]) and torch.equal(B[3], C[3]))
    res["p max abs diff"] = float((A[0] - B[0]).abs().max())
    res["p rel diff"] = rel(B[0], A[0])
    res["m codes differing"] = int((A[1] != B[1]).sum())
    res["v codes differing"] = int((A[3] != B[3]).sum())
    res["m codes max |diff|"] = int((A[1].int() - B[1].int()).abs().max())
    res["v codes max |diff|"] = int((A[3].int() - B[3].int()).abs().max())
    res["absmax max rel diff"] = float(max(((A[2] - B[2]).abs() / A[2].clamp_min(1e-30)).max(),
                                           ((A[4] - B[4]).abs() / A[4].clamp_min(1e-30)).max()))
    del A, B, p, g, mq, vq
    # timing on n parameters
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda") * 0.01
    mq, ma = quantize_blockwise(torch.randn(n, device="cuda") * 1e-3, cm, 256)
    vq, va = quantize_blockwise(torch.rand(n, device="cuda") * 1e-5, cv, 256)
    res["lowbit fused 8-bit"] = bench(lambda: adam8.adamw8bit_step_(p, g, mq, ma, vq, va, cm, cv, **hp), rep=200)
    res["lowbit fused 8-bit binary search (v1)"] = bench(
        lambda: adam8.adamw8bit_step_(p, g, mq, ma, vq, va, cm, cv, **hp, first_guess=False), rep=200)
    if args_sweep:
        for rows_, w in ((1, 4), (2, 4), (4, 8), (8, 8), (16, 8)):
            res[f"lowbit fused rows{rows_} w{w}"] = bench(
                lambda: adam8.adamw8bit_step_(p, g, mq, ma, vq, va, cm, cv, **hp, rows=rows_, num_warps=w), rep=100)
    res["bytes"] = n * 16 + 2 * 8 * math.ceil(n / 256)
    del mq, vq
    prm = torch.nn.Parameter(p)
    prm.grad = g
    opt = torch.optim.AdamW([prm], lr=1e-3, fused=True)
    opt.step()
    res["torch fused fp32"] = bench(opt.step, rep=200)
    del opt
    if bnb is not None:
        try:
            opt8 = bnb.optim.AdamW8bit([prm], lr=1e-3)
            opt8.step()
            res["bnb AdamW8bit"] = bench(opt8.step, rep=200)
            del opt8
        except Exception as e:
            res["bnb error"] = repr(e)[:200]
    return res


def adam_sweep(out_dir: str, n: int = 268 * 2**20, rounds: int = 2) -> None:
    """The fused 8-bit AdamW step over rows per program × num_warps × cache hints, timed interleaved in
    ``rounds`` rounds against torch's fused fp32 AdamW (each round: every config once, median of do_bench);
    every config's result checked bit-equal (θ, codes, absmax) to the first (4 rows, 4 warps, the default before session 4) on 4M fresh elements."""
    from lowbit.optim.blockwise import quantize_blockwise, state_codebook

    cm, cv = state_codebook(8, True, "cuda"), state_codebook(8, False, "cuda")
    hp = dict(step=7, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, block_size=256)
    configs = [(r, w, h) for h in adam8.HINTS for r, w in ((4, 4), (2, 2), (1, 1), (2, 1), (1, 2), (4, 2))]
    m = 4 * 2**20 + 77
    p0, g0 = torch.randn(m, device="cuda"), torch.randn(m, device="cuda") * 0.01
    mq0, ma0 = quantize_blockwise(torch.randn(m, device="cuda") * 1e-3, cm, 256)
    vq0, va0 = quantize_blockwise(torch.rand(m, device="cuda") * 1e-5, cv, 256)
    base = None
    equal: dict = {}
    for r, w, h in configs:
        S = [p0.clone(), mq0.clone(), ma0.clone(), vq0.clone(), va0.clone()]
        try:
            adam8.adamw8bit_step_(S[0], g0, S[1], S[2], S[3], S[4], cm, cv, **hp, rows=r, num_warps=w, hints=h)
        except Exception as e:  # a config that does not compile is reported, not fatal
            equal[(r, w, h)] = repr(e)[:200]
            continue
        if base is None:
            base = S
        equal[(r, w, h)] = all(torch.equal(a, b) for a, b in zip(base, S))
    del p0, g0, mq0, vq0
    p = torch.randn(n, device="cuda")
    g = torch.randn(n, device="cuda") * 0.01
    mq, ma = quantize_blockwise(torch.randn(n, device="cuda") * 1e-3, cm, 256)
    vq, va = quantize_blockwise(torch.rand(n, device="cuda") * 1e-5, cv, 256)
    prm = torch.nn.Parameter(p.clone())
    prm.grad = g
    opt = torch.optim.AdamW([prm], lr=1e-3, fused=True)
    opt.step()
    nbytes = n * 16 + 2 * 8 * math.ceil(n / 256)
    bw = copy_bandwidth()
    times: dict = {c: [] for c in configs if equal.get(c) is True}
    torch_t = []
    for _ in range(rounds):
        torch_t.append(bench(opt.step, rep=100))
        for c in times:
            r, w, h = c
            times[c].append(bench(lambda: adam8.adamw8bit_step_(p, g, mq, ma, vq, va, cm, cv, **hp, rows=r,
                                                                   num_warps=w, hints=h), rep=100))
    lines = [f"8-bit AdamW sweep on {torch.cuda.get_device_name()}: {n} params, {nbytes} bytes, copy bandwidth "
             f"{bw / 1e12:.3f} TB/s; torch fused fp32 AdamW " + " / ".join(f"{t:.1f}" for t in torch_t) + " µs",
             "", "| rows | warps | hints | bit-equal to rows 4 warps 4 | µs per round "
             "| speed vs rows 4 warps 4 (best of rounds) | % of copy bw | "
             "x torch fused |", "|---|---|---|---|---|---|---|---|"]
    d = min(times[configs[0]]) if configs[0] in times else float("nan")
    for c in configs:
        r, w, h = c
        ts = times.get(c)
        if not ts:
            lines.append(f"| {r} | {w} | {h or '(none)'} | {equal.get(c)} | | | | |")
            continue
        b = min(ts)
        lines.append(f"| {r} | {w} | {h or '(none)'} | {equal[c]} | " + " / ".join(f"{t:.1f}" for t in ts)
                     + f" | {d / b:.3f} | {100 * nbytes / (b * 1e-6) / bw:.1f} | {min(torch_t) / b:.2f} |")
    text = "\n".join(lines)
    print(text, flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adam_sweep.md"), "w") as f:
        f.write(text + "\n")


def opchecks() -> dict:
    """``torch.library.opcheck`` of each op with CUDA inputs (exercises the registered Triton kernels)."""
    import lowbit.ops.schema as S
    from lowbit.optim.blockwise import quantize_blockwise, state_codebook

    out = {}
    torch.manual_seed(1)
    N, K = 64, 256
    cases = {
        "packed_linear affine": (S.packed_linear, make_affine(N, K, 4, 128, act_order=True)),
        "packed_linear lut": (S.packed_linear, make_nf4_dq(N, K)),
        "packed_linear lut_row": (S.packed_linear, make_lut_row(N, K, 3)),
    }
    for name, (op, pw) in cases.items():
        for M in (1, 33):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            args = (x, *pw.tensors()[:7], None, pw.bits, pw.group_size, pw.in_features, pw.mode)
            args = tuple(a for a in args)
            try:
                torch.library.opcheck(op, args)
                out[f"{name} M={M}"] = "ok"
            except Exception as e:
                out[f"{name} M={M}"] = repr(e)[:300]
    x = torch.randn(32, K, device="cuda", dtype=torch.bfloat16)
    q = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    s = torch.rand(N, device="cuda") * 1e-2 + 1e-3
    for name, args in {"w8a8 int8": (x, q, s, None, 0.0), "w8a8 llm.int8": (x * 4, q, s, None, 6.0),
                       "w8a8 fp8": (x, (torch.randn(N, K, device="cuda") * 100).to(torch.float8_e4m3fn), s, None,
                                    0.0)}.items():
        try:  # opcheck's schema test multiplies inputs, which torch lacks for fp8 tensors
            torch.library.opcheck(S.w8a8_linear, args, **({"test_utils": ("test_faketensor",
                                  "test_autograd_registration")} if "fp8" in name else {}))
            out[name] = "ok" if "fp8" not in name else "ok (faketensor, autograd_registration)"
        except Exception as e:
            out[name] = repr(e)[:300]
    cm, cv = state_codebook(8, True, "cuda"), state_codebook(8, False, "cuda")
    n = 3000
    mq, ma = quantize_blockwise(torch.randn(n, device="cuda") * 1e-3, cm, 256)
    vq, va = quantize_blockwise(torch.rand(n, device="cuda") * 1e-5, cv, 256)
    try:
        torch.library.opcheck(S.adamw8bit_step_, (torch.randn(n, device="cuda"), torch.randn(n, device="cuda"), mq,
                                                  ma, vq, va, cm, cv, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, 256),
                              test_utils=("test_schema", "test_faketensor"))
        out["adamw8bit_step_"] = "ok"
    except Exception as e:
        out["adamw8bit_step_"] = repr(e)[:300]
    return out


def fmt_table(rows, bw, adam, dev) -> str:
    lines = [f"# lowbit GPU kernels — {dev}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; measured copy bandwidth {bw / 1e12:.2f} TB/s; "
             "median µs (`triton.testing.do_bench`), weights rotated over enough copies to exceed L2; "
             "ratio = bf16 time / kernel time (>1 = faster than bf16); err = ‖y − ref‖/‖ref‖ vs fp32 dequantize+matmul.",
             ""]
    for r in rows:
        K, N, M = r["K"], r["N"], r["M"]
        iss = ISSUE.get((K, N, M))
        lines.append(f"## K×N = {K}×{N}, M = {M}  (floor int4 {r['floor int4']:.1f} µs, floor bf16 "
                     f"{r['floor bf16']:.1f} µs; issue's bf16/bnb-nf4/bnb-int8: {iss})")
        lines.append("")
        lines.append("| kernel | µs | × bf16 | × bnb nf4 | err |")
        lines.append("|---|---|---|---|---|")
        bn = r.get("bnb nf4")
        for k, v in r.items():
            bf = r["bf16 graph"] if k.endswith(" graph") else r["bf16"]
            if k in ("K", "N", "M", "copies") or k.startswith("floor") or k.endswith(" err") \
                    or k.endswith("exact") or k.endswith("differing") or not isinstance(v, (int, float)):
                continue
            err = r.get(k + " err", "")
            err = f"{err:.2e}" if isinstance(err, float) else err
            ex = r.get(k + " codes exact")
            if ex is not None:
                err = f"{err} (int8 codes bit-exact: {ex})"
            bnr = '' if not bn or k.endswith(" graph") else f'{bn / v:.2f}'
            lines.append(f"| {k} | {v:.1f} | {bf / v:.2f} | {bnr} | {err} |")
        errs = [f"{k}: {v}" for k, v in r.items() if k.endswith("error")]
        for e in errs:
            lines.append(f"| ERROR {e} | | | | |")
        lines.append("")
    if adam:
        lines += ["## 8-bit block-wise AdamW step", "", "```", json.dumps(adam, indent=1), "```", ""]
        if "lowbit fused 8-bit" in adam:
            lines.append(f"lowbit fused: {adam['lowbit fused 8-bit'] / 1000:.3f} ms for {adam['numel'] / 1e6:.0f}M "
                         f"params = {adam['bytes'] / (adam['lowbit fused 8-bit'] * 1e-6) / 1e12:.2f} TB/s "
                         f"({adam['bytes'] / (adam['lowbit fused 8-bit'] * 1e-6) / bw:.0%} of copy bandwidth)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small smoke run: fewer variants and rows")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-adam", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time a grid of tile configurations")
    ap.add_argument("--gemv-sweep", action="store_true",
                    help="only the M = 1 GEMV versions/tiles and the per-row LUT tile check (a short run)")
    ap.add_argument("--graph", action="store_true",
                    help="also time M <= 16 rows as CUDA-graph replays (bf16 too; the ' graph' rows compare with it)")
    ap.add_argument("--big-m-sweep", action="store_true",
                    help="only M = 2048: int8 / LLM.int8() tiles and W4A16 dequantize variants, timed interleaved")
    ap.add_argument("--w8a8-parts", action="store_true", help="only the LLM.int8() stage timings at M = 2048")
    ap.add_argument("--gemv-waves", action="store_true", help="only the M = 1 GEMV split-K / tile-width grid")
    ap.add_argument("--gemv-prefetch", action="store_true", help="only the M = 1 GEMV v4 with / without prefetch")
    ap.add_argument("--graph-only", action="store_true",
                    help="M <= 16 rows only, with --graph, no bitsandbytes/W8A8/AdamW/opcheck (a short run)")
    ap.add_argument("--one-launch-sweep", action="store_true",
                    help="session 5: M = 1 GEMV v6 / L2 prefetch against v4, M = 2048 3-bit planes against the former "
                         "kernel (M = 16 split 1 with LOWBIT_SWEEP_MM=1)")
    ap.add_argument("--lut-sweep", action="store_true",
                    help="session 6: M = 1 look-up-table GEMV v7 (byte permutes) tiles against v4 and bitsandbytes NF4")
    ap.add_argument("--linear-check", action="store_true",
                    help="session 6: per-Linear accuracy of F.linear bf16 and lowbit's GEMV at the default model's "
                         "shapes, M = 4, against float64 over the same bf16 weight")
    ap.add_argument("--m1-sweep", action="store_true",
                    help="session 7: M = 1 GEMVs on the column-tiled layout against the defaults, timed plain, as "
                         "CUDA-graph replays and as back-to-back calls without the L2 flush (bench_loop)")
    ap.add_argument("--adam-sweep", action="store_true",
                    help="only the 8-bit AdamW rows x warps x cache-hint grid against torch fused AdamW")
    args = ap.parse_args()
    global args_sweep, args_graph, args_graph_only
    args_sweep = args.sweep
    args_graph = args.graph or args.graph_only
    args_graph_only = args.graph_only
    dev = torch.cuda.get_device_name()
    print("device", dev, "sms", torch.cuda.get_device_properties(0).multi_processor_count, flush=True)
    try:
        import bitsandbytes as bnb
        print("bitsandbytes", bnb.__version__, flush=True)
    except Exception as e:
        print("no bitsandbytes:", e, flush=True)
        bnb = None
    t0 = time.time()
    if args.adam_sweep:
        adam_sweep(args.out)
        print(f"(adam sweep {time.time() - t0:.0f} s)")
        return
    if args.big_m_sweep or args.w8a8_parts:
        os.makedirs(args.out, exist_ok=True)
        w8a8_parts(args.out)
        if args.big_m_sweep:
            big_m_sweep(args.out)
        print(f"(big-M sweep {time.time() - t0:.0f} s)")
        return
    if args.gemv_waves or args.gemv_prefetch:
        os.makedirs(args.out, exist_ok=True)
        gemv_waves(args.out, pf_only=args.gemv_prefetch)
        return
    if args.one_launch_sweep:
        os.makedirs(args.out, exist_ok=True)
        one_launch_sweep(args.out)
        print(f"(one-launch sweep {time.time() - t0:.0f} s)")
        return
    if args.linear_check:
        os.makedirs(args.out, exist_ok=True)
        linear_check(args.out)
        return
    if args.m1_sweep:
        os.makedirs(args.out, exist_ok=True)
        m1_sweep(args.out, bnb, args.quick)
        print(f"(m1 sweep {time.time() - t0:.0f} s)")
        return
    if args.lut_sweep:
        os.makedirs(args.out, exist_ok=True)
        lut_sweep(args.out, bnb)
        print(f"(lut sweep {time.time() - t0:.0f} s)")
        return
    if args.gemv_sweep:
        os.makedirs(args.out, exist_ok=True)
        gemv_sweep(args.out, copy_bandwidth())
        print(f"(gemv sweep {time.time() - t0:.0f} s)")
        return
    oc = {} if args.graph_only else opchecks()
    print("opcheck", json.dumps(oc, indent=1), flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s", flush=True)
    rows = [(4096, 4096, 1), (4096, 11008, 1), (8192, 28672, 1), (8192, 28672, 16), (8192, 28672, 2048)]
    if args.quick:
        rows = [(4096, 11008, 1), (8192, 28672, 1), (8192, 28672, 16), (8192, 28672, 2048)]
    if args.graph_only:
        rows = [r for r in rows if r[2] <= 16]
    out_rows: list = []
    run_matmuls(rows, out_rows, bw, bnb, args.quick)
    adam = None if args.skip_adam or args.graph_only else run_adam(268 * 2**20 if not args.quick else 64 * 2**20, bnb)
    print("adam", json.dumps(adam), flush=True)
    table = fmt_table(out_rows, bw, adam, dev)
    table += "\n\n## opcheck (CUDA)\n\n" + "\n".join(f"- {k}: {v}" for k, v in oc.items()) + "\n"
    table += f"\n(total {time.time() - t0:.0f} s)\n"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump({"rows": out_rows, "adam": adam, "opcheck": oc, "bw": bw, "device": dev}, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
