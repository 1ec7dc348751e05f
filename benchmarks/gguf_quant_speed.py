"""Speed of GGML quantization on the default model's weights: lowbit vs gguf-py (numpy) vs libggml (C).

Quantizes every 2-D weight of SmolLM2-135M (dequantized from its GGUF) into each type, timing lowbit's
``quantize_raw``, gguf-py's ``gguf.quants.quantize`` where it implements the type, and — if
``LOWBIT_LIBGGML`` points to a libggml-base built from source (see tests/formats/ggml/ggml_c.py) —
llama.cpp's own ``ggml_quantize_chunk`` (single-threaded, as llama-quantize per thread). Rows that do not split
into a type's blocks are skipped for that type (the same rows for every implementation). Prints a table with
ratios against lowbit, and checks the bytes agree.

Usage: python benchmarks/gguf_quant_speed.py [--types Q8_0,Q4_0,...] [--limit N_TENSORS]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lowbit.formats.ggml import GGML_TYPES, quantize_raw


def weights(limit: int | None) -> list[np.ndarray]:
    from lowbit.data.models import default_model_path
    from lowbit.io.gguf_reader import read_gguf

    g = read_gguf(default_model_path())
    out = []
    for name, info in g.tensors.items():
        if len(info.shape) == 2:
            out.append(g.tensor(name).numpy())
        if limit and len(out) >= limit:
            break
    g.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,TQ2_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    import gguf
    import gguf.quants as gq

    lib = None
    if os.environ.get("LOWBIT_LIBGGML"):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "formats" / "ggml"))
        from ggml_c import GGMLLib

        lib = GGMLLib(Path(os.environ["LOWBIT_LIBGGML"]))
    ws = weights(args.limit)
    print(f"{len(ws)} tensors, {sum(w.size for w in ws) / 1e6:.1f} M weights; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}")
    print(f"| type | M weights | lowbit s | gguf-py s | gguf-py / lowbit | libggml s | lowbit / libggml | bytes equal |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.types.split(","):
        t = GGML_TYPES[name]
        sel = [w for w in ws if w.shape[1] % t.block_size == 0]
        n = sum(w.size for w in sel)
        t0 = time.perf_counter()
        ours = [quantize_raw(torch.from_numpy(w), name) for w in sel]
        t_ours = time.perf_counter() - t0
        t_py = t_c = None
        equal = True
        qt = getattr(gguf.GGMLQuantizationType, name)
        try:
            t0 = time.perf_counter()
            theirs = [np.asarray(gq.quantize(w, qt)) for w in sel]
            t_py = time.perf_counter() - t0
            equal &= all(np.array_equal(a, b.reshape(a.shape)) for a, b in zip(ours, theirs))
        except NotImplementedError:
            pass
        if lib is not None:
            t0 = time.perf_counter()
            cs = [lib.quantize(w, t.type_id) for w in sel]
            t_c = time.perf_counter() - t0
            equal &= all(np.array_equal(a, b) for a, b in zip(ours, cs))
        f = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
        r_py = "—" if t_py is None else f"{t_py / t_ours:.1f}×"
        r_c = "—" if t_c is None else f"{t_ours / t_c:.1f}×"
        print(f"| {name} | {n / 1e6:.1f} | {t_ours:.2f} | {f(t_py)} | {r_py} | {f(t_c)} | {r_c} | {equal} |", flush=True)


if __name__ == "__main__":
    main()
