"""Speed of GGML quantization on the default model's weights: lowbit vs gguf-py (numpy) vs libggml (C).

Quantizes every 2-D weight of SmolLM2-135M (dequantized from its GGUF) into each type, timing lowbit's
``quantize_raw`` with ``--threads`` row threads and with one, gguf-py's ``gguf.quants.quantize`` where it
implements the type (single-threaded numpy), and — if ``LOWBIT_LIBGGML`` points to a libggml-base built from
source (see tests/formats/ggml/ggml_c.py) — llama.cpp's own ``ggml_quantize_chunk`` (single-threaded, as
llama-quantize per thread). Rows that do not split into a type's blocks are skipped for that type (the same rows
for every implementation). Every timing of a row is taken in the same process, one after the other; the first
call of each lowbit kernel (JIT compile, or loading numba's on-disk cache) happens in a warm-up before timing,
and ``--compile-times`` measures that one-off cost separately in a fresh process with an empty cache. A timing
under one second is the best of three runs (for every implementation alike).

``--imatrix`` passes a seeded synthetic importance vector per tensor (the values do not change the work done)
to lowbit and libggml; gguf-py has no importance-matrix quantizers, so its column is empty then.

Usage: python benchmarks/gguf_quant_speed.py [--types Q8_0,Q4_0,...] [--limit N_TENSORS] [--imatrix]
       [--threads 2] [--compile-times]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lowbit.formats.ggml import GGML_TYPES, quantize_raw

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TYPES = "Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,TQ1_0,TQ2_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS"


def weights(limit: int | None) -> list[np.ndarray]:
    from lowbit.data.models import default_model_path
    from lowbit.io.gguf_reader import read_gguf

    g = read_gguf(default_model_path())
    out = []
    for name, info in g.tensors.items():
        if len(info.shape) == 2:
            out.append(np.ascontiguousarray(g.tensor(name).numpy(), dtype=np.float32))
        if limit and len(out) >= limit:
            break
    g.close()
    return out


def synthetic_imatrix(cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(cols) ** 3 * 4 + 1e-3).astype(np.float32)


def compile_times(types: list[str]) -> None:
    """First-call time of each type's kernels in a child process whose numba cache dir is empty."""
    code = ("import time, numpy as np\n"
            "from lowbit.formats.ggml import GGML_TYPES, quantize_raw\n"
            "x = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)\n"
            "qw = np.ones(512, dtype=np.float32)\n"
            f"for name in {types!r}:\n"
            "    for imat in ([None, qw] if GGML_TYPES[name].uses_imatrix else [None]):\n"
            "        t0 = time.perf_counter(); quantize_raw(x, name, imatrix=imat, threads=1)\n"
            "        t1 = time.perf_counter(); quantize_raw(x, name, imatrix=imat, threads=1)\n"
            "        t2 = time.perf_counter()\n"
            "        print(f'| {name} | {\"imatrix\" if imat is not None else \"plain\"} | {t1 - t0:.2f} | "
            "{(t2 - t1) * 1e3:.1f} |', flush=True)\n")
    with tempfile.TemporaryDirectory(prefix="lowbit-numba-cold-") as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        print("\nOne-off JIT compile (fresh process, empty numba cache; kernels shared between types compile once, "
              "at their first user):")
        print("| type | variant | first call s (compile) | second call ms |")
        print("|---|---|---|---|", flush=True)
        subprocess.run([sys.executable, "-c", code], env=env, check=True)


def timed(fn) -> tuple[float, list]:
    """Seconds of ``fn()`` (the best of three runs when one takes under a second, for every implementation
    alike: short rows are otherwise dominated by scheduling noise on a shared machine) and its result."""
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
        if best >= 1.0:
            break
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--limit", type=int, default=None, help="only the first N 2-D tensors")
    ap.add_argument("--imatrix", action="store_true", help="synthetic importance vector (lowbit and libggml)")
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="lowbit's row threads")
    ap.add_argument("--compile-times", action="store_true", help="also measure the one-off JIT compile")
    args = ap.parse_args()
    import gguf
    import gguf.quants as gq

    types = args.types.split(",")
    unknown = [t for t in types if t not in GGML_TYPES]
    if unknown:
        raise SystemExit(f"unknown type(s) {unknown}; valid: {sorted(GGML_TYPES)}")
    lib = None
    if os.environ.get("LOWBIT_LIBGGML"):
        sys.path.insert(0, str(ROOT / "tests" / "formats" / "ggml"))
        from ggml_c import GGMLLib

        lib = GGMLLib(Path(os.environ["LOWBIT_LIBGGML"]))
    ws = weights(args.limit)
    T = args.threads
    print(f"{len(ws)} tensors, {sum(w.size for w in ws) / 1e6:.1f} M weights; lowbit threads {T} and 1; cpus "
          f"{os.cpu_count()}; imatrix {'synthetic' if args.imatrix else 'none'}; load average at start "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    print(f"| type | M weights | lowbit {T}T s | lowbit 1T s | gguf-py s | gguf-py / lowbit {T}T | gguf-py / lowbit 1T "
          f"| libggml s | lowbit {T}T / libggml | lowbit 1T / libggml | bytes equal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in types:
        t = GGML_TYPES[name]
        sel = [w for w in ws if w.shape[1] % t.block_size == 0]
        if not sel:
            print(f"| {name} | 0 | no tensor fits {t.block_size}-blocks |", flush=True)
            continue
        n = sum(w.size for w in sel)
        qws = [synthetic_imatrix(w.shape[1], i) if args.imatrix and t.uses_imatrix else None
               for i, w in enumerate(sel)]
        quantize_raw(sel[0][:8], name, imatrix=qws[0], threads=1)  # warm-up: compile / load the kernels
        t_ours, ours = timed(lambda: [quantize_raw(w, name, imatrix=q, threads=T) for w, q in zip(sel, qws)])
        t_one, ours1 = timed(lambda: [quantize_raw(w, name, imatrix=q, threads=1) for w, q in zip(sel, qws)])
        equal = all(np.array_equal(a, b) for a, b in zip(ours, ours1))
        t_py = t_c = None
        if not (args.imatrix and t.uses_imatrix):
            try:
                t_py, theirs = timed(lambda: [np.asarray(gq.quantize(w, getattr(gguf.GGMLQuantizationType, name)))
                                              for w in sel])
                equal &= all(np.array_equal(a, b.reshape(a.shape)) for a, b in zip(ours, theirs))
            except NotImplementedError:
                pass
        if lib is not None:
            t_c, cs = timed(lambda: [lib.quantize(w, t.type_id, q) for w, q in zip(sel, qws)])
            equal &= all(np.array_equal(a, b) for a, b in zip(ours, cs))
        f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        r = lambda a, b: "—" if a is None or b is None else f"{a / b:.1f}×"  # noqa: E731
        print(f"| {name}{' +imatrix' if args.imatrix and t.uses_imatrix else ''} | {n / 1e6:.1f} | {t_ours:.2f} | "
              f"{t_one:.2f} | {f(t_py)} | {r(t_py, t_ours)} | {r(t_py, t_one)} | {f(t_c)} | {r(t_ours, t_c)} | "
              f"{r(t_one, t_c)} | {equal} |", flush=True)
    print(f"load average at end {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    if args.compile_times:
        compile_times(types)


if __name__ == "__main__":
    main()
