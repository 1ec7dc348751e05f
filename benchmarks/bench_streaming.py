"""Peak RSS of streaming quantization against model size (lowbit.io.streaming).

For each size, a random-weight Llama is written shard by shard (never whole in memory), then quantized in a
fresh subprocess; the peak resident set size is read from the OS (``ru_maxrss`` of that process). The baseline
in the same run is the in-memory path (``transformers`` load + ``lowbit.quantize_``) for the sizes where it fits.

Run::

    python benchmarks/bench_streaming.py --sizes 0.25,1,4.3 --method rtn [--workdir /tmp/bs]

One child run (used by the slow test too)::

    python benchmarks/bench_streaming.py --child SRC OUT rtn|gptq [--in-memory]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(src: str, out: str, method: str, in_memory: bool) -> None:
    import torch

    from lowbit.formats.affine import IntAffine
    from lowbit.methods.gptq.api import GPTQConfig
    from lowbit.methods.rtn.api import RTNConfig

    fmt = IntAffine(bits=4, group_size=128)
    cfg = RTNConfig(format=fmt) if method == "rtn" else GPTQConfig(format=fmt)
    calib = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0)) if method == "gptq" else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if in_memory:
        from transformers import AutoModelForCausalLM

        import lowbit
        from lowbit.io import checkpoint

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        lowbit.quantize_(model, cfg, calibration=calib)
        checkpoint.save(model, out, method=cfg)
    else:
        from lowbit.io.streaming import quantize_streaming

        quantize_streaming(src, out, cfg, calibration=calib, batch_size=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak / 1024, "after_imports_rss_mb": base / 1024,
                      "seconds": time.perf_counter() - t0}))


def run_child(src: Path, out: Path, method: str, in_memory: bool = False) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(src), str(out), method] + (["--in-memory"] if in_memory else [])
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def shape_for(gb: float) -> dict[str, int]:
    """hidden 1024 / intermediate 2816 blocks (51 MB fp32 each); layer count sets the size."""
    per_block = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024)
    return {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": max(1, round(gb * 1e9 / per_block))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "METHOD"))
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--sizes", default="0.25,1,4.3", help="fp32 model sizes in GB")
    ap.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    ap.add_argument("--baseline-max-gb", type=float, default=1.0, help="largest size the in-memory baseline runs")
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    if a.child:
        child(*a.child, in_memory=a.in_memory)
        return
    from lowbit.io.streaming import write_synthetic_llama

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_streaming."))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for gb in [float(s) for s in a.sizes.split(",")]:
        src = work / f"src_{gb}"
        shutil.rmtree(src, ignore_errors=True)
        total = write_synthetic_llama(src, **shape_for(gb))
        st = run_child(src, work / f"q_{gb}", a.method)
        mem = run_child(src, work / f"m_{gb}", a.method, in_memory=True) if gb <= a.baseline_max_gb else None
        rows.append((total / 1e9, st, mem))
        shutil.rmtree(src, ignore_errors=True)
        shutil.rmtree(work / f"q_{gb}", ignore_errors=True)
        shutil.rmtree(work / f"m_{gb}", ignore_errors=True)
    print(f"\n{a.method}, IntAffine 4-bit g128; peak RSS from ru_maxrss of a fresh process per run")
    print("| fp32 model GB | streaming peak RSS MB | streaming s | in-memory peak RSS MB | in-memory/streaming |")
    print("|---:|---:|---:|---:|---:|")
    for gb, st, mem in rows:
        m = f"{mem['peak_rss_mb']:.0f} | {mem['peak_rss_mb'] / st['peak_rss_mb']:.2f}x" if mem else "not run | -"
        print(f"| {gb:.2f} | {st['peak_rss_mb']:.0f} | {st['seconds']:.1f} | {m} |")


if __name__ == "__main__":
    main()
