"""Run test code in a fresh interpreter: for process-wide switches (the CPU fast path's opt-in, ``LOWBIT_CPU_ISA``)
that must not leak into other tests."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_fresh(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def expect_ok(code: str, env: dict[str, str] | None = None) -> str:
    """Run ``code``; it must exit 0 and print ``ok...`` (a line starting ``skip`` skips the test)."""
    out = run_fresh(code, env)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.startswith("skip"):
        pytest.skip(out.stdout.strip())
    assert out.stdout.startswith("ok"), out.stdout[-2000:]
    return out.stdout
