"""Resumable streaming quantization: SIGKILL after block k, resume, byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.formats.affine import IntAffine
from lowbit.io.streaming import quantize_streaming
from lowbit.methods.gptq.api import GPTQConfig
from lowbit.methods.rtn.api import RTNConfig

CALIB = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(3))


def make_source(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(str(path), max_shard_size="60KB")
    return path


def config(method: str):  # noqa: ANN201
    if method == "rtn":
        return RTNConfig(format=IntAffine(bits=4, group_size=32))
    return GPTQConfig(format=IntAffine(bits=4, group_size=32), act_order=True)


KILLER = textwrap.dedent("""
    import os, signal, sys, torch
    from lowbit.io.streaming import quantize_streaming
    sys.path.insert(0, {testdir!r})
    from test_resume import CALIB, config
    method, src, out, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    def after(i):
        if i == k:
            os.kill(os.getpid(), signal.SIGKILL)
    calib = CALIB if method == "gptq" else None
    quantize_streaming(src, out, config(method), calibration=calib, batch_size=2, after_block=after)
""")


# killed from inside an atomic write: the temporary file is on disk, the move into place never happens
KILL_MID_WRITE = textwrap.dedent("""
    import os, signal, sys
    from lowbit.io.streaming import quantize_streaming
    sys.path.insert(0, {testdir!r})
    from test_resume import CALIB, config
    method, src, out, target, k = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    real_replace, seen = os.replace, []
    def replace(a, b):
        if os.path.basename(b) == target:
            seen.append(b)
            if len(seen) == k:
                assert os.path.getsize(a) > 0
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(a, b)
    os.replace = replace
    calib = CALIB if method == "gptq" else None
    quantize_streaming(src, out, config(method), calibration=calib, batch_size=2)
""")

# an ordinary run, killed from outside by the test at whatever point it has reached
SLOW_RUN = textwrap.dedent("""
    import sys, time
    from lowbit.io.streaming import quantize_streaming
    sys.path.insert(0, {testdir!r})
    from test_resume import CALIB, config
    method, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
    calib = CALIB if method == "gptq" else None
    quantize_streaming(src, out, config(method), calibration=calib, batch_size=2, after_block=lambda i: time.sleep(0.3))
""")


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.mark.parametrize("method", ["rtn", pytest.param("gptq", marks=pytest.mark.slow)])
def test_killed_run_resumes_byte_identical(tmp_path: Path, method: str) -> None:
    src = make_source(tmp_path / "src")
    calib = CALIB if method == "gptq" else None
    ref = quantize_streaming(src, tmp_path / "ref", config(method), calibration=calib, batch_size=2)
    out = tmp_path / "out"
    script = KILLER.format(testdir=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, method, str(src), str(out), "1"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = tmp_path / ".out.partial"
    assert not out.exists() and partial.is_dir()
    progress = json.loads((partial / "progress.json").read_text())
    assert progress["blocks_done"] == 2  # blocks 0 and 1 finished before the kill
    done_shards = {p.name: p.stat().st_mtime_ns for p in partial.glob("model-*")}
    with pytest.raises(FileExistsError, match="resume"):
        quantize_streaming(src, out, config(method), calibration=calib, batch_size=2)
    seen: list[int] = []
    quantize_streaming(src, out, config(method), calibration=calib, batch_size=2, resume=True,
                       after_block=seen.append)
    assert seen == [2, 3]  # only the unfinished blocks ran
    assert not partial.exists()
    assert files(out) == files(ref)
    for name, mtime in done_shards.items():  # finished shards were kept, not rewritten
        assert (out / name).stat().st_mtime_ns == mtime


def test_resume_refuses_other_inputs(tmp_path: Path) -> None:
    src = make_source(tmp_path / "src")
    script = KILLER.format(testdir=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", script, "rtn", str(src), str(tmp_path / "out"), "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with pytest.raises(ValueError, match="other inputs"):
        quantize_streaming(src, tmp_path / "out", RTNConfig(format=IntAffine(bits=3, group_size=32)), resume=True)
    assert (tmp_path / ".out.partial" / "progress.json").is_file()  # the partial run is kept
    # a shard of the partial run that was damaged after it was recorded is caught
    shard = next((tmp_path / ".out.partial").glob("model-*"))
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(ValueError, match="missing or corrupt"):
        quantize_streaming(src, tmp_path / "out", config("rtn"), resume=True)
    quantize_streaming(src, tmp_path / "out", config("rtn"), overwrite=True)
    ref = quantize_streaming(src, tmp_path / "ref", config("rtn"))
    assert files(tmp_path / "out") == files(ref)


def test_cli_quantize_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lowbit quantize --resume` finishes a killed run; an existing --out is never replaced without --overwrite."""
    from lowbit.cli.main import main

    src = make_source(tmp_path / "src")
    script = KILLER.format(testdir=str(Path(__file__).parent))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", script, "rtn", str(src), str(out), "1"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    args = ["quantize", str(src), "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", str(out)]
    assert main([*args, "--resume"]) == 0
    ref = quantize_streaming(src, tmp_path / "ref", config("rtn"))
    assert files(out) == files(ref)
    assert main([*args, "--stream"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert files(out) == files(ref)


@pytest.mark.parametrize("target", ["progress.json", pytest.param("model-00003-of-00005.safetensors",
                                                                     marks=pytest.mark.slow)])
def test_kill_inside_an_atomic_write_resumes_byte_identical(tmp_path: Path, target: str) -> None:
    """SIGKILL between writing a temporary file and moving it into place: the leftover is discarded on resume."""
    src = make_source(tmp_path / "src")
    ref = quantize_streaming(src, tmp_path / "ref", config("rtn"))
    out = tmp_path / "out"
    script = KILL_MID_WRITE.format(testdir=str(Path(__file__).parent))
    k = 2 if target == "progress.json" else 1  # progress of block 1 / the shard of block 2
    proc = subprocess.run([sys.executable, "-c", script, "rtn", str(src), str(out), target, str(k)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = tmp_path / ".out.partial"
    assert list(partial.glob(".*.tmp")), "the kill did not land inside the write"
    quantize_streaming(src, out, config("rtn"), resume=True)
    assert files(out) == files(ref)


def test_kill_from_outside_at_any_point_resumes_byte_identical(tmp_path: Path) -> None:
    """The test kills a running quantization (SIGKILL from the parent, not at a chosen point) and resumes it."""
    import time

    src = make_source(tmp_path / "src")
    ref = quantize_streaming(src, tmp_path / "ref", config("rtn"))
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    script = SLOW_RUN.format(testdir=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", script, "rtn", str(src), str(out)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not (partial / "progress.json").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert not out.exists() and partial.is_dir()
    done = json.loads((partial / "progress.json").read_text())["blocks_done"]
    assert 1 <= done < 4
    quantize_streaming(src, out, config("rtn"), resume=True)
    assert files(out) == files(ref)
