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
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[3].startswith("yes") and cells[4] == "yes" and cells[5] == "yes", row  # bit-identity
        assert float(cells[10]) < 1e-4, row  # QLoRA loss vs N=1
    assert "Not measured" in out.read_text()


def test_multigpu_benchmark_refuses_too_few_batches(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--world-sizes", "1,2",
                        "--samples", "2", "--out", str(tmp_path / "t.md")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "must give at least 2 batches" in p.stderr
