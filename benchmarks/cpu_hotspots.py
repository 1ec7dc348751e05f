"""Same-process ratios behind this session's CPU speed-ups (one layer of the default model's shape, random data).

- GPTQ's column sweep (576x1536 IntAffine 4-bit g128) with torch at 1 thread vs 2 threads;
- LoRC's top singular pairs: eigh of the smaller Gram matrix (what ``lorc`` does) vs a full SVD (wide and tall);
- SqueezeLLM's nearest centroid: binary search among midpoints (``_assign``) vs the all-pairs argmin.

Run: ``python benchmarks/cpu_hotspots.py`` (prints a markdown table). Start it on an idle machine and again
with another CPU-bound process running to see the 2-thread sweep's sensitivity to a busy second core.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch

from lowbit.formats.affine import IntAffine
from lowbit.methods.gptq.api import _column_rounder
from lowbit.methods.gptq.core import _sweep, inverse_hessian_factor
from lowbit.methods.squeezellm.core import _assign, _init


def best(f: Callable[[], object], n: int = 3) -> float:
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    W = torch.randn(576, 1536, generator=g)
    X = torch.randn(4096, 1536, generator=g)
    U = inverse_hessian_factor(X.T @ X / 4096, 0.01)
    fmt = IntAffine(4, group_size=128)
    perm = torch.arange(1536)

    def sweep() -> object:
        return _sweep(W.clone(), U, lambda Wg, _u: fmt.params(Wg), _column_rounder(fmt), [], perm, 128, False, 128)

    n0 = torch.get_num_threads()
    t = {}
    for nt in (2, 1):
        torch.set_num_threads(nt)
        t[nt] = best(sweep)
    torch.set_num_threads(n0)
    rows.append(("GPTQ sweep 576x1536, torch threads", "2 threads", t[2], "1 thread", t[1]))
    for shape in ((576, 1536), (1536, 576)):
        E = torch.randn(*shape, dtype=torch.float64, generator=g)
        ts = best(lambda: torch.linalg.svd(E, full_matrices=False))
        te = best(lambda: torch.linalg.eigh(E @ E.T if shape[0] <= shape[1] else E.T @ E))
        rows.append((f"LoRC singular pairs {shape[0]}x{shape[1]} float64", "full SVD", ts, "eigh of Gram", te))
    Wk = torch.randn(1536, 576, generator=g) * 0.02
    C = _init(Wk, torch.rand(1536, 576, generator=g), 16)
    ta = best(lambda: (Wk[:, :, None] - C[:, None, :]).abs().argmin(-1))
    tb = best(lambda: _assign(Wk, C))
    rows.append(("nearest of 16 centroids, 1536x576", "all-pairs argmin", ta, "midpoint search", tb))
    print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, default threads {n0}, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| what | baseline | s | new | s | baseline / new |\n|---|---|---|---|---|---|")
    for what, a, sa, b, sb in rows:
        print(f"| {what} | {a} | {sa:.4f} | {b} | {sb:.4f} | {sa / sb:.1f}× |")


if __name__ == "__main__":
    main()
