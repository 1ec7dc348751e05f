"""CPU matmul benchmark: lowbit's quantized paths against torch and every peer found, in one process.

Run:  python benchmarks/cpu.py [--threads 2] [--K 4096] [--N 4096] [--M 1] [--reps 30]
      python benchmarks/cpu.py --build-peers      # once: fetch and build the peers into ./.peers (git-ignored)

Prints two tables: median time (ms) of every path with its ratio to torch fp32 and its relative error against
the float64 product with the dequantized weight (bf16 rows: with the bf16-rounded input; every output is in its
input's dtype, so bf16 rows carry bf16 output rounding, ~2e-3), then each lowbit fast path against each peer of
its weight width (peer ms / lowbit ms: above 1 = lowbit faster). Peers that are missing are listed with the
reason, never estimated. Weights are random N(0, 0.02), inputs N(0, 1). The last lowbit rows go through
``QuantLinear`` with :func:`lowbit.ops.cpu.enable_qlinear_fast_path` (what a user runs: op dispatch included).

Peers (``--build-peers`` puts them in ``<repo>/.peers``, never into the environment):

- torch's dynamic int8 (fbgemm W8A8) and bitsandbytes NF4: from the environment.
- optimum-quanto: ``pip install --no-deps --target .peers optimum-quanto`` (pure Python; on the CPU its int4
  weights with bf16 scales use ATen's int4 packed kernel, its int8 weights a dequantize + matmul).
- gptqmodel: its Python package needs torch >= 2.14.1 and transformers >= 5.20 (this environment pins
  older ones), so only its CPU kernel is built: the AVX512-BF16 int4 GEMM in ``gptqmodel_ext/
  int4_qzero_group_scaled_cpu`` of the gptqmodel 7.7.0 sdist (from Hugging Face kernels-community's
  quantization-gptq kernel, the one bitsandbytes fetches from the hub), compiled with the flags of gptqmodel's
  own JIT loader (torch.utils.cpp_extension + ninja), and called as gptqmodel's ``TorchCpuAvx512Linear`` does.
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch

from lowbit.formats.act_quant import ActQuant
from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook
from lowbit.formats.int8_rowwise import Int8Rowwise
from lowbit.ops import cpu, cpu_lut4, cpu_vnni
from lowbit.ops import reference as ref
from lowbit.ops.repack import repack_quantized, unpack_planes

REPO = Path(__file__).resolve().parents[1]
GPTQMODEL = "gptqmodel==7.7.0"
GPTQ_EXT = "int4_qzero_group_scaled_cpu"
GPTQ_SOURCES = ("binding.cpp", "int4_qzero_group_scaled_torch.cpp", "int4_qzero_group_scaled.cpp",
                "int4_qzero_group_scaled_avx512.cpp", "int4_qzero_group_scaled_pack.cpp", "qqq_cpu.cpp")
GPTQ_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-mfma", "-mf16c", "-mavx512f", "-mavx512bf16", "-mavx512vl",
              "-mavx512dq", "-mavx512bw", "-mavx512vbmi"]  # gptqmodel/utils/cpp.py, _int4_qzero_..._extension


def build_peers(peers: Path) -> None:
    """Install optimum-quanto and ninja into ``peers`` and build gptqmodel's CPU int4 kernel there."""
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "install", "--no-deps", "--target", str(peers), "optimum-quanto", "ninja"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*pip, "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, GPTQMODEL], check=True)
        (sdist,) = glob.glob(os.path.join(tmp, "gptqmodel-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if f"gptqmodel_ext/{GPTQ_EXT}/" in m.name or
                       m.name.endswith("/LICENSE")]
            tf.extractall(tmp, members=members, filter="data")
        src_root = peers / "src" / GPTQ_EXT
        src_root.mkdir(parents=True, exist_ok=True)
        for m in members:
            dst = src_root / (os.path.basename(m.name) if "gptqmodel_ext" in m.name else "LICENSE.gptqmodel")
            if m.isfile():
                dst.write_bytes(Path(tmp, m.name).read_bytes())
    os.environ["PATH"] = f"{peers / 'bin'}{os.pathsep}{os.environ['PATH']}"
    from torch.utils.cpp_extension import load

    build = peers / "build" / "gptqmodel_int4"
    build.mkdir(parents=True, exist_ok=True)
    load(name=f"gptqmodel_{GPTQ_EXT}", sources=[str(src_root / f) for f in GPTQ_SOURCES], extra_cflags=GPTQ_FLAGS,
         extra_include_paths=[str(src_root)], extra_ldflags=["-fopenmp"], build_directory=str(build),
         is_python_module=False, verbose=True)
    print(f"peers built in {peers}")


def timeit(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


_READ_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
int lowbit_cpu_ok(void) { return __builtin_cpu_supports("avx512f"); }
/* Stream n bytes (a multiple of 256) once, split over threads as the kernels split their rows. */
long long lowbit_read(const uint8_t *b, long long n, int threads) {
    long long out = 0;
    #pragma omp parallel num_threads(threads) reduction(^:out)
    {
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        #pragma omp for schedule(static)
        for (long long i = 0; i < n; i += 256) {
            a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(b + i));
            a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(b + i + 64));
            a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(b + i + 128));
            a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(b + i + 192));
        }
        out ^= _mm512_reduce_or_epi64(_mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)));
    }
    return out;
}
"""


def read_floor_ms(nbytes: int, threads: int, reps: int) -> tuple[float, str]:
    """Median ms to read ``nbytes`` once with ``threads`` threads (AVX-512 loads, buffer warm as the weights are
    in the table's loops): no kernel that reads a weight of that size can be faster here. Falls back to
    ``torch.sum`` over int64 (slower than a plain read, so a floor that is too high) where the C probe cannot run."""
    import ctypes

    from lowbit.ops import cpu_native

    n = -(-nbytes // 256) * 256
    buf = torch.randint(0, 255, (n,), dtype=torch.uint8)
    lib = cpu_native.load("bench_read", _READ_SOURCE, ("-mavx512f",))
    if lib is not None:
        lib.lowbit_read.restype = ctypes.c_longlong
        lib.lowbit_read.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int]
        return timeit(lambda: lib.lowbit_read(buf.data_ptr(), n, threads), reps), "AVX-512 read probe"
    v = buf.view(torch.int64)
    return timeit(lambda: v.sum(), reps), "torch.sum over int64 (no C probe here: an upper bound)"


def rel_err(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    return float((y.double() - y_ref).norm() / y_ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--K", type=int, default=4096)
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--M", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--peers", type=Path, default=REPO / ".peers", help="where --build-peers put the peers")
    ap.add_argument("--build-peers", action="store_true")
    a = ap.parse_args()
    if a.build_peers:
        build_peers(a.peers)
        return
    if a.peers.is_dir():
        sys.path.insert(0, str(a.peers))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    W = torch.randn(a.N, a.K) * 0.02
    x = torch.randn(a.M, a.K)
    xb = x.bfloat16()
    rows: list[tuple[str, str, float | None, float | None, str]] = []  # (group, name, ms, rel err, note)

    def add(group, name, fn, W_ref=None, x_ref=None, note=""):
        try:
            y = fn()
            err = None if W_ref is None else rel_err(y, (x if x_ref is None else x_ref).double() @ W_ref.double().t())
            rows.append((group, name, timeit(fn, a.reps), err, note))
        except Exception as e:  # record, never hide
            rows.append((group, name, None, None, f"error: {e!r}"[:160]))

    def missing(group, name, why):
        rows.append((group, name, None, None, why))

    add("base", "torch fp32", lambda: torch.nn.functional.linear(x, W), W)
    Wb = W.bfloat16()
    add("base", "torch bf16", lambda: torch.nn.functional.linear(xb, Wb), Wb.float(), xb.float())

    # -- peers ---------------------------------------------------------------------------------------------
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = torch.nn.Linear(a.K, a.N, bias=False)
        lin.weight.data = W.clone()
        dq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    add("8", "peer: torch dynamic int8 (fbgemm W8A8, fp32 in)", lambda: dq(x), W)
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        qW, st = F.quantize_4bit(Wb, quant_type="nf4", compress_statistics=True)
        add("4", f"peer: bitsandbytes {bnb.__version__} NF4 (bf16 in)",
            lambda: bnb.matmul_4bit(xb, qW.t(), quant_state=st), F.dequantize_4bit(qW, st).float(), xb.float(),
            "its fast CPU kernel comes from the `kernels` hub package (not installable offline): its fallback")
    except Exception as e:
        missing("4", "peer: bitsandbytes NF4", f"missing: {e!r}"[:100])
    try:
        from optimum.quanto import freeze, qint4, qint8, quantize
        from optimum.quanto import __version__ as qv

        for qt, bits in ((qint4, "4"), (qint8, "8")):
            m = torch.nn.Sequential(torch.nn.Linear(a.K, a.N, bias=False)).to(torch.bfloat16)
            m[0].weight.data = Wb.clone()
            quantize(m, weights=qt)
            freeze(m)
            Wq = m[0].weight.dequantize().float()
            add(bits, f"peer: optimum-quanto {qv} {qt.name} ({type(m[0].weight).__name__}, bf16 in)",
                torch.no_grad()(lambda m=m: m(xb)), Wq, xb.float())
    except Exception as e:
        missing("4", "peer: optimum-quanto", f"not importable from {a.peers} ({e!r}); run --build-peers"[:160])
    so = glob.glob(str(a.peers / "build" / "gptqmodel_int4" / f"gptqmodel_{GPTQ_EXT}*.so"))
    if so:
        torch.ops.load_library(so[0])
        op = getattr(torch.ops, f"gptqmodel_{GPTQ_EXT}").gemm_int4_qzero_group_scaled_cpu_forward
        q = IntAffine(bits=4, group_size=128).quantize(W)
        pw = repack_quantized(q)
        codes = unpack_planes(pw.q4, pw.q2, pw.q1, 4, a.K).to(torch.uint8)
        g = codes.reshape(a.N // 32, 32, a.K // 2, 2)  # gptqmodel's pack_hf_int4 layout (rows in pairs of 16)
        packed = (g[:, :16] | (g[:, 16:] << 4)).permute(0, 2, 1, 3).reshape(a.N, a.K // 2).contiguous()
        zeros = pw.zero_point.round().to(torch.uint8).contiguous()
        scales = pw.scale.float().contiguous()
        add("4", f"peer: {GPTQMODEL} CPU AVX512-BF16 int4 g128 (bf16 in)",
            lambda: op(xb, packed, zeros, scales, 128, None), q.dequantize().float(), xb.float())
    else:
        missing("4", f"peer: {GPTQMODEL} CPU kernel", f"not built in {a.peers}; run --build-peers "
                "(its Python package needs torch >= 2.14.1, transformers >= 5.20)")

    # -- lowbit --------------------------------------------------------------------------------------------
    q4 = IntAffine(bits=4, group_size=128).quantize(W)
    W4 = q4.dequantize().float()
    data4 = [q4[n] for n in q4.format.tensor_names()]
    add("ref", "lowbit int4 g128 reference (dequantize + matmul)",
        lambda: ref.qlinear(x, data4, q4.format.spec(), list(q4.shape), None), W4)
    w4b = cpu.pack_int4(repack_quantized(q4), torch.bfloat16)
    add("4", "lowbit int4 g128 ATen int4pack (bf16 in)", lambda: cpu.linear(xb, w4b), W4, xb.float())
    add("4", "lowbit int4 g128 ATen int4pack (fp32 in, cast to bf16 inside)", lambda: cpu.linear(x, w4b), W4)
    if cpu_vnni.available():
        w4v = cpu_vnni.pack_int4(q4)
        add("4", "lowbit int4 g128 VNNI kernel (fp32 in: 3 int8 limbs)", lambda: cpu.linear(x, w4v), W4)
        add("4", "lowbit int4 g128 VNNI kernel (bf16 in: 2 int8 limbs)", lambda: cpu.linear(xb, w4v), W4, xb.float())
    else:
        missing("4", "lowbit VNNI kernels", "not available here (needs AVX-512 VNNI and a C compiler)")
    if cpu_lut4.available():
        w4l = cpu_lut4.pack_affine4(q4)
        add("4", "lowbit int4 g128 lut4 kernel (fp32 in)", lambda: cpu.linear(x, w4l), W4)
    else:
        missing("4", "lowbit lut4 kernel", "not available here (needs AVX-512 and a C compiler)")
    w4f = cpu.pack_int4(repack_quantized(q4), torch.float32)
    add("4", "lowbit int4 g128 ATen int4pack (fp32 compute: ATen's scalar loop)", lambda: cpu.linear(x, w4f), W4)

    qn = Codebook("nf4", 64, True).quantize(W)
    Wn = qn.dequantize().float()
    datan = [qn[n] for n in qn.format.tensor_names()]
    add("ref", "lowbit NF4 reference (dequantize + matmul)",
        lambda: ref.qlinear(x, datan, qn.format.spec(), list(qn.shape), None), Wn)
    Wnb = Wn.bfloat16().float()  # the reference's weights for bf16 inputs: bf16(code * absmax)
    if cpu_lut4.available():
        wn = cpu_lut4.pack_codebook(qn)
        add("4", "lowbit NF4 (double quant) lut4 span-32 kernel (fp32 in)", lambda: cpu.linear(x, wn), Wn)
        add("4", "lowbit NF4 (double quant) lut4 span-32 kernel (bf16 in)", lambda: cpu.linear(xb, wn), Wn, xb.float(),
            "float32 weights")
    if cpu_lut4.span64_available():
        wn64 = cpu.pack(qn, torch.float32)
        add("4", "lowbit NF4 (double quant) lut4 span-64 kernel (fp32 in)", lambda: cpu.linear(x, wn64), Wn,
            note=f"span {wn64.span}")
        add("4", "lowbit NF4 (double quant) lut4 span-64 kernel (bf16 in)", lambda: cpu.linear(xb, wn64), Wnb,
            xb.float(), f"span {wn64.span}; the reference's bf16 weights (error vs those)")
    else:
        missing("4", "lowbit NF4 lut4 span-64 kernel", "not available here (needs AVX-512 and a C compiler)")

    q8 = Int8Rowwise().quantize(W)
    W8 = q8.dequantize().float()
    w8b = cpu.pack_int8(q8["qdata"], q8["scale"], torch.bfloat16)
    add("8", "lowbit int8 W8A16 ATen int8pack (bf16 in)", lambda: cpu.linear(xb, w8b), W8, xb.float())
    add("8", "lowbit int8 W8A16 ATen int8pack (fp32 in, cast to bf16 inside)", lambda: cpu.linear(x, w8b), W8)
    if cpu_vnni.available():
        w8v = cpu_vnni.pack_w8(q8["qdata"], q8["scale"])
        add("8", "lowbit int8 W8A16 VNNI kernel (fp32 in: 3 int8 limbs)", lambda: cpu.linear(x, w8v), W8)
        add("8", "lowbit int8 W8A16 VNNI kernel (bf16 in: 2 int8 limbs)", lambda: cpu.linear(xb, w8v), W8, xb.float())
    w8f = cpu.pack_int8(q8["qdata"], q8["scale"], torch.float32)
    add("8", "lowbit int8 W8A16 ATen int8pack (fp32 compute)", lambda: cpu.linear(x, w8f), W8)
    for label, fmt in (("SmoothQuant O1 (token)", Int8Rowwise(act=ActQuant("int8", "token"))),
                       ("LLM.int8() threshold 6", Int8Rowwise(act=ActQuant("int8", "token"), threshold=6.0))):
        qa = fmt.quantize(W)
        data_a = [qa[n] for n in qa.format.tensor_names()]
        y_ref = ref.qlinear(x, data_a, qa.format.spec(), list(qa.shape), None)
        wa = cpu.pack(qa)
        exact = "bit-identical to the reference" if wa is not None and torch.equal(cpu.linear(x, wa), y_ref) else \
            "NOT bit-identical to the reference"
        add("ref", f"lowbit W8A8 {label} reference (fp32 in)",
            lambda d=data_a, s=qa.format.spec(): ref.qlinear(x, d, s, [a.N, a.K], None), qa.dequantize().float())
        add("8", f"lowbit W8A8 {label} torch._int_mm (fp32 in)", lambda w=wa: cpu.linear(x, w),
            qa.dequantize().float(), note=exact)

    # -- the user's path: QuantLinear -> lowbit::qlinear with the fast path enabled (op dispatch + cache lookup)
    from lowbit.nn.linear import QuantLinear

    cpu.enable_qlinear_fast_path()
    for bits, label, qq, Wq in (("4", "int4 g128", q4, W4), ("4", "NF4", qn, Wn), ("8", "int8 W8A16", q8, W8)):
        m = QuantLinear(qq)
        add(bits, f"lowbit {label} QuantLinear, fast path enabled (fp32 in)",
            torch.no_grad()(lambda m=m: m(x)), Wq)
    m = QuantLinear(qn)
    add("4", "lowbit NF4 QuantLinear, fast path enabled (bf16 in)", torch.no_grad()(lambda m=m: m(xb)), Wnb, xb.float(),
        "the span-64 kernel, bf16 weights" if cpu_lut4.span64_available() else "")

    # -- report --------------------------------------------------------------------------------------------
    base = rows[0][2]
    # floors: the weight's bytes read once at this machine's measured read speed (scales included, inputs ignored)
    nbytes = {"fp32": a.N * a.K * 4, "bf16": a.N * a.K * 2,
              "4-bit g128 (int4 + fp32 scale, zero)": a.N * a.K // 2 + 2 * 4 * a.N * (-(-a.K // 128)),
              "NF4 (4-bit + fp32 absmax per 64)": a.N * a.K // 2 + 4 * a.N * (-(-a.K // 64)),
              "NF4 + bf16 round-up masks (span 64, bf16 in)": a.N * a.K // 2 + 6 * a.N * (-(-a.K // 64)),
              "int8 (int8 + fp32 row scale)": a.N * a.K + 4 * a.N}
    floors = {}
    for what, nb in nbytes.items():
        floors[what] = (nb,) + read_floor_ms(nb, a.threads, a.reps)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# CPU: {a.M}×{a.K} input, {a.N}×{a.K} weight, {a.threads} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, load average {load:.1f} at the end")
    print()
    print("| path | median ms | × torch fp32 | rel. error vs float64 | note |")
    print("|---|---|---|---|---|")
    for _, name, t, err, note in rows:
        e = "–" if err is None else f"{err:.1e}"
        print(f"| {name} | – | – | – | {note} |" if t is None else
              f"| {name} | {t:.3f} | {base / t:.2f} | {e} | {note} |")
    print()
    print("lowbit fast paths against each peer of the same weight width (peer ms / lowbit ms; > 1: lowbit faster)")
    print()
    for bits in ("4", "8"):
        peers = [(n, t) for g, n, t, _, _ in rows if g == bits and n.startswith("peer:") and t is not None]
        mine = [(n, t) for g, n, t, _, _ in rows if g == bits and n.startswith("lowbit") and t is not None]
        if not peers or not mine:
            continue
        print("| lowbit path | " + " | ".join(n.removeprefix("peer: ") for n, _ in peers) + " |")
        print("|---" * (len(peers) + 1) + "|")
        for n, t in mine:
            print(f"| {n.removeprefix('lowbit ')} ({t:.3f} ms) | " + " | ".join(f"{pt / t:.2f}" for _, pt in peers) + " |")
        print()
    print("Floors: the weight's bytes read once by this machine with the same threads (a warm buffer of that size,")
    print("as the weights above are warm); no path that reads the weight can beat its floor here")
    print()
    print("| weight | MB | floor ms | GB/s | probe |")
    print("|---|---|---|---|---|")
    for what, (nb, ms, how) in floors.items():
        print(f"| {what} | {nb / 1e6:.2f} | {ms:.3f} | {nb / ms / 1e6:.1f} | {how} |")
    print()


if __name__ == "__main__":
    main()
