"""The multi-GPU benchmark script end to end on CPU (gloo, torchrun): its table and its identity checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "multigpu.py"


@pytest.mark.slow  # two torchrun launches, each importing transformers per rank: ~30 s idle, 90 s on a loaded CPU
def test_multigpu_benchmark_tiny_cpu(tmp_path: Path) -> None:
    out = tmp_path / "multigpu.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--world-sizes", "1,2",
                        "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    text = out.read_text()
    calib, qlora = text.split("## QLoRA")
    cells = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    crows = [cells(x) for x in calib.splitlines() if x.startswith(("| 1 |", "| 2 |"))]
    qrows = [cells(x) for x in qlora.splitlines() if x.startswith(("| 1 |", "| 2 |"))]
    assert len(crows) == 2 and len(qrows) == 2
    for c in crows:  # both calibration variants: weights = N=1, ranks agree, statistics = N=1
        assert c[3].startswith("yes") and c[4] == "yes" and c[5] == "yes", c
        assert c[9].startswith("yes") and c[10] == "yes" and c[11] == "yes", c
    for q in qrows:
        assert float(q[4]) < 1e-4, q  # QLoRA loss vs N=1
    assert "Not measured" in out.read_text()


def test_multigpu_benchmark_refuses_too_few_batches(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--world-sizes", "1,2",
                        "--samples", "2", "--out", str(tmp_path / "t.md")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "must give at least 2 batches" in p.stderr
