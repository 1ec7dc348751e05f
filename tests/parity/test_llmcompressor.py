"""Parity with llm-compressor (GPTQModifier's math, and the side by side of benchmarks/llmcompressor_side_by_side.py).

llm-compressor lives in a separate venv (it pins transformers <= 5.17; see benchmarks/requirements-llmcompressor.txt),
so in the project's venv this whole file is skipped. Run it there::

    OMP_NUM_THREADS=1 .venv-llmc/bin/python -m pytest tests/parity/test_llmcompressor.py -q [-m slow]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor", reason="llm-compressor is installed only in its own venv (.venv-llmc)")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight  # noqa: E402

from lowbit.formats.affine import IntAffine  # noqa: E402
from lowbit.methods.gptq import GPTQConfig  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def layer(o: int = 96, i: int = 192, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(o, i, generator=gen)
    X = torch.randn(1024, i, generator=gen) @ (torch.eye(i) + torch.randn(i, i, generator=gen) / i ** .5)
    X[:, :5] *= 8  # outlier channels, so act-order matters
    return W, 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", [None, "static"])
def test_gptq_layer_is_bit_identical_to_llmcompressor(symmetric: bool, actorder: str | None) -> None:
    """Same W, H, scheme (int4 group 64, min-max, damp 0.01, block 128) and fp32 scales: the same dequantized
    weight, scale and zero point (compressed-tensors stores signed codes, lowbit unsigned: zero_point + 8).

    llm-compressor 0.14 takes every group's scale from its observer on the weight before the sweep, with or
    without act-order: that is lowbit's ``static_groups=True``."""
    W, H = layer()
    g = 64
    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=g,
                            actorder=actorder)
    G = W.reshape(W.shape[0], -1, g)
    scale, zp = calculate_qparams(G.amin(-1), G.amax(-1), args)  # the memoryless min-max observer's qparams
    theirs, _, fallback = quantize_weight(W[None].clone(), H[None].clone(), scale[None], zp[None], None, args,
                                          blocksize=128, percdamp=0.01)
    assert not bool(fallback.any())
    fmt = IntAffine(bits=4, group_size=g, symmetric=symmetric, scale_dtype=torch.float32)
    ours = GPTQConfig(format=fmt, act_order=actorder is not None, static_groups=True,
                      damp=0.01, block_size=128).quantize_weight(W, {"hessian": H})
    assert torch.equal(ours.dequantize(), theirs[0])
    assert torch.equal(ours["scale"], scale.float())
    if not symmetric:
        assert torch.equal(ours["zero_point"].to(torch.int16), zp.to(torch.int16) + 8)


@pytest.mark.slow
def test_tiny_side_by_side_perplexity_within_one_percent(tmp_path: Path) -> None:
    """The benchmark on a tiny budget (4 x 128 calibration tokens, one 512-token window): lowbit's perplexity
    at most 1.01x llm-compressor's for GPTQ and SmoothQuant (AWQ takes minutes even here: the benchmark runs it)."""
    sys.path.insert(0, str(BENCH))
    try:
        import llmcompressor_side_by_side as bench
    finally:
        sys.path.remove(str(BENCH))
    out = tmp_path / "table.md"
    rows = bench.main(["--runs", "gptq,smoothquant", "--calib-samples", "4", "--calib-seq-len", "128",
                       "--eval-windows", "1", "--ctx-len", "512", "--out", str(out)])
    assert [r.run for r in rows] == ["gptq", "smoothquant"]
    for r in rows:
        assert torch.isfinite(torch.tensor([r.lowbit_ppl, r.theirs_ppl])).all(), r
        assert r.lowbit_ppl <= 1.01 * r.theirs_ppl, r
    assert "| gptq |" in out.read_text()
