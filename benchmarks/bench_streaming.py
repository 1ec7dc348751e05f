"""Peak RSS of streaming quantization against model size (lowbit.io.streaming).

For each size, a random-weight Llama is written shard by shard (never whole in memory), then quantized with
each method in a fresh subprocess; the peak resident set size is read from the OS (``ru_maxrss`` of that
process, the same number as ``VmHWM`` in ``/proc/<pid>/status``). The baseline in the same run is the
in-memory path (``transformers`` load + ``lowbit.quantize_`` + ``checkpoint.save``) for the sizes where it fits.

Run::

    python benchmarks/bench_streaming.py --sizes 0.25,1,4.3 --methods rtn,gptq [--workdir /tmp/bs] \
        [--out results/streaming.md]

One child run (used by the slow test too)::

    python benchmarks/bench_streaming.py --child SRC OUT rtn|gptq [--in-memory]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("rtn", "gptq")


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


def run_child(src: Path, out: Path, method: str, in_memory: bool = False, timeout: float | None = None
              ) -> dict[str, float]:
    """Quantize ``src`` into ``out`` in a fresh interpreter; its peak RSS (MiB), seconds, RSS after imports."""
    cmd = [sys.executable, __file__, "--child", str(src), str(out), method] + (["--in-memory"] if in_memory else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def shape_for(gb: float) -> dict[str, int]:
    """hidden 1024 / intermediate 2816 blocks (51 MB fp32 each); layer count sets the size."""
    per_block = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2816 + 2 * 1024)
    return {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": max(1, round(gb * 1e9 / per_block))}


def table(rows: list[tuple[float, int, str, dict[str, float], dict[str, float] | None]]) -> str:
    lines = ["| fp32 model GB | blocks | method | streaming peak RSS MiB | peak RSS / model size | streaming s "
             "| in-memory peak RSS MiB | in-memory s | in-memory / streaming RSS |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for gb, blocks, method, st, mem in rows:
        m = (f"{mem['peak_rss_mb']:.0f} | {mem['seconds']:.1f} | {mem['peak_rss_mb'] / st['peak_rss_mb']:.2f}x"
             if mem else "not run | - | -")
        lines.append(f"| {gb:.2f} | {blocks} | {method} | {st['peak_rss_mb']:.0f} | "
                     f"{st['peak_rss_mb'] * 2**20 / (gb * 1e9):.2f} | {st['seconds']:.1f} | {m} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "METHOD"))
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--sizes", default="0.25,1,4.3", help="fp32 model sizes in GB")
    ap.add_argument("--methods", default="rtn,gptq", help=f"comma-separated, from {list(METHODS)}")
    ap.add_argument("--baseline-max-gb", type=float, default=1.0, help="largest size the in-memory baseline runs")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="also write the table (markdown) here, atomically")
    a = ap.parse_args()
    if a.child:
        child(*a.child, in_memory=a.in_memory)
        return
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; valid choices: {list(METHODS)}")
    from tqdm.auto import tqdm

    from lowbit.io.streaming import write_synthetic_llama

    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_streaming."))
    work.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in a.sizes.split(",")]
    rows = []
    bar = tqdm(total=len(sizes) * len(methods), desc="runs", file=sys.stderr)
    for gb in sizes:
        src = work / f"src_{gb}"
        shutil.rmtree(src, ignore_errors=True)
        shape = shape_for(gb)
        total = write_synthetic_llama(src, **shape)
        for method in methods:
            bar.set_postfix_str(f"{gb} GB {method}")
            st = run_child(src, work / f"q_{gb}_{method}", method)
            mem = (run_child(src, work / f"m_{gb}_{method}", method, in_memory=True)
                   if gb <= a.baseline_max_gb else None)
            rows.append((total / 1e9, shape["num_hidden_layers"], method, st, mem))
            tqdm.write(table(rows[-1:]).splitlines()[-1], file=sys.stderr)
            shutil.rmtree(work / f"q_{gb}_{method}", ignore_errors=True)
            shutil.rmtree(work / f"m_{gb}_{method}", ignore_errors=True)
            bar.update()
        shutil.rmtree(src, ignore_errors=True)
    bar.close()
    cmd = "python benchmarks/bench_streaming.py " + " ".join(sys.argv[1:])
    text = (f"IntAffine 4-bit g128 (GPTQ: 2 x 32 random calibration tokens, batch 2); synthetic Llama blocks "
            f"hidden 1024 / intermediate 2816; peak RSS = ru_maxrss of a fresh process per run.\n"
            f"Command: `{cmd}`\nMachine: {platform.machine()} CPU, {platform.python_version()}, "
            f"{sys.platform}\n\n{table(rows)}\n")
    print(text)
    if a.out:
        from lowbit.io.atomic import atomic_file

        with atomic_file(a.out, overwrite=True, mode="w") as f:
            f.write(text)  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
