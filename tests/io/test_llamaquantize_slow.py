"""Slow: llama.cpp's own ``llama-quantize``, run on lowbit's F32 export of the default model, produces the same
tensor types and the same bytes as lowbit's export of the same mix — with and without an importance matrix
(lowbit's imatrix file, GGUF and legacy .dat, read by llama-quantize).

Needs ``LOWBIT_LLAMA_QUANTIZE`` = a llama-quantize binary built from llama.cpp source (see
tests/io/test_llamacpp_slow.py for the source; ``llamacpp/build_llama_quantize.sh`` builds the tool against an
existing libllama). Runs it in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exe():
    p = os.environ.get("LOWBIT_LLAMA_QUANTIZE")
    if not p or not Path(p).exists():
        pytest.skip("set LOWBIT_LLAMA_QUANTIZE to a llama-quantize binary built from llama.cpp source")
    return p


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from lowbit.data.corpora import calibration_tokens
    from lowbit.data.models import load_model
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.imatrix import collect_imatrix, write_imatrix_dat, write_imatrix_gguf

    d = tmp_path_factory.mktemp("lq")
    model, tok = load_model(None)
    export_gguf(model, tok, d / "f32.gguf", type="F32")
    calib = calibration_tokens(tok, n_samples=4, seq_len=128, seed=0)
    im = collect_imatrix(model, [c[None] for c in calib], dataset="calib", chunk_size=128)
    write_imatrix_gguf(d / "im.gguf", im)
    write_imatrix_dat(d / "im.dat", im)
    return d, model, tok, im


@pytest.mark.parametrize("mix,imatrix", [("Q4_K_M", None), ("Q8_0", None), ("Q4_0", None), ("Q2_K", None),
                                         ("Q3_K_M", None), ("Q6_K", None), ("Q4_K_S", None), ("Q5_K_M", None),
                                         ("Q4_K_M", "im.gguf"),
                                         ("Q4_0", "im.dat"), ("IQ4_XS", "im.gguf")])
def test_llama_quantize_writes_the_same_file_contents(exe, base, mix, imatrix):
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.gguf_reader import read_gguf

    d, model, tok, im = base
    theirs_path = d / f"lq-{mix}-{imatrix}.gguf"
    cmd = [exe] + (["--imatrix", str(d / imatrix)] if imatrix else []) + [str(d / "f32.gguf"), str(theirs_path), mix, "2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    ours_path = d / f"ours-{mix}-{imatrix}.gguf"
    export_gguf(model, tok, ours_path, type=mix, imatrix=im if imatrix else None)
    a, b = read_gguf(ours_path), read_gguf(theirs_path)
    try:
        assert set(a.tensors) == set(b.tensors)
        bad_types = {n: (a.tensors[n].ggml_type.name, b.tensors[n].ggml_type.name) for n in a.tensors
                     if a.tensors[n].ggml_type.name != b.tensors[n].ggml_type.name}
        assert not bad_types, f"types differ (ours, llama-quantize): {bad_types}"
        bad_bytes = [n for n in a.tensors if not np.array_equal(a.raw(n), b.raw(n))]
        assert not bad_bytes, f"{len(bad_bytes)} tensors differ, e.g. {bad_bytes[:5]}"
        assert a.metadata["general.file_type"] == b.metadata["general.file_type"]
    finally:
        a.close()
        b.close()
