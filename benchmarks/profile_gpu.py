"""Kernels to profile with Nsight Compute on a CUDA machine (one launch each, after a warm-up).

    ncu --clock-control none --kernel-name regex:'_gemv3|_mmt4|_i8_mm' --launch-skip 2 --launch-count 3 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        python3 benchmarks/profile_gpu.py

Runs, at 8192×28672: the M = 1 GEMV (int4 g128 asym, default tiles), the M = 2048 fused transposed W4A16 kernel
(``path="mmt"``) and the M = 2048 int8 GEMM, each three times (the first two launches are skipped as warm-up by the
command above). Prints nothing worth reading itself; the profile is the output.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from gpu import VARIANTS  # noqa: E402

from lowbit.ops.triton import w8a8, wq  # noqa: E402


def main() -> None:
    K, N = 8192, 28672
    torch.manual_seed(0)
    pw = VARIANTS["int4 g128 asym"](N, K)
    x1 = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    x2 = torch.randn(2048, K, device="cuda", dtype=torch.bfloat16)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    sw = (W.float().abs().amax(1) / 127).clamp(min=1e-12)
    qd = torch.round(W.float() / sw[:, None]).clamp(-127, 127).to(torch.int8)
    del W
    for _ in range(5):
        wq.packed_linear(x1, pw, None, path="gemv")
    for _ in range(5):
        wq.mmt(x2, pw)
    for _ in range(5):
        w8a8.int8_linear(x2, qd, sw)
    torch.cuda.synchronize()
    print("done")


if __name__ == "__main__":
    main()
