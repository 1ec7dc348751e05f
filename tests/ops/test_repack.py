"""The kernel layout (lowbit.ops.repack) is an exact re-encoding of each format's weight."""

import pytest
import torch

from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook, RowCodebook
from lowbit.ops import repack as R


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("K", [32, 100, 576])
def test_pack_planes_is_a_bijection(bits, K):
    g = torch.Generator().manual_seed(bits * 1000 + K)
    codes = torch.randint(0, 1 << bits, (7, K), generator=g)
    planes = R.pack_planes(codes, bits)
    assert all(p.dtype == torch.int32 for p in planes)
    assert sum(p.numel() * 32 for p in planes) == 7 * (-(-K // 32) * 32) * bits  # exactly `bits` per code
    assert torch.equal(R.unpack_planes(*planes, bits, K), codes)


def test_pack_planes_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        R.pack_planes(torch.zeros(2, 32, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        R.pack_planes(torch.full((2, 32), 16), 4)
    with pytest.raises(ValueError, match="2-D"):
        R.pack_planes(torch.zeros(32, dtype=torch.long), 4)


AFFINE = [IntAffine(bits=4, group_size=128), IntAffine(bits=4, group_size=128, symmetric=True),
          IntAffine(bits=3, group_size=64), IntAffine(bits=2, group_size=32),
          IntAffine(bits=4, group_size=64, float_zero_point=True), IntAffine(bits=4, group_size=None)]


@pytest.mark.parametrize("fmt", AFFINE, ids=lambda f: f.spec())
@pytest.mark.parametrize("K", [576, 200])
def test_repack_affine_equals_format_dequantize(fmt, K):
    torch.manual_seed(K)
    W = torch.randn(48, K)
    q = fmt.quantize(W)
    pw = R.repack_quantized(q)
    assert torch.equal(R.dequantize_packed(pw, torch.float32), q.dequantize().float())


def test_repack_act_order_equals_format_dequantize():
    torch.manual_seed(0)
    K, gs = 576, 128
    W = torch.randn(40, K)
    fmt = IntAffine(bits=4, group_size=gs)
    g_idx = (torch.randperm(K) // gs).to(torch.int32)  # GPTQ act-order: a permutation of contiguous groups
    params = fmt.params(W)
    q = fmt.quantize(W, g_idx=g_idx, **params)
    pw = R.repack_quantized(q)
    assert pw.perm is not None
    assert torch.equal(R.dequantize_packed(pw, torch.float32), q.dequantize().float())


def test_repack_rejects_g_idx_that_is_not_act_order():
    codes = torch.randint(0, 16, (4, 64))
    g_idx = torch.tensor([0] * 40 + [1] * 24)  # groups of 40 and 24 columns, group_size 32
    with pytest.raises(ValueError, match="g_idx"):
        R.repack_affine(codes, torch.rand(4, 2), torch.zeros(4, 2), 4, 32, g_idx)


@pytest.mark.parametrize("fmt", [Codebook("nf4", 64, True), Codebook("fp4", 64, False), Codebook("nf4", 128, True)],
                         ids=lambda f: f.spec())
def test_repack_codebook_equals_format_dequantize(fmt):
    torch.manual_seed(1)
    W = torch.randn(64, 256)
    q = fmt.quantize(W)
    assert torch.equal(R.dequantize_packed(R.repack_quantized(q), torch.float32), q.dequantize().float())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_repack_row_codebook_equals_format_dequantize(bits):
    torch.manual_seed(bits)
    W = torch.randn(24, 100)
    q = RowCodebook(bits).quantize(W)
    assert torch.equal(R.dequantize_packed(R.repack_quantized(q), torch.float32), q.dequantize().float())


def test_repack_unsupported_format_names_it():
    q = IntAffine(bits=8, group_size=32).quantize(torch.randn(4, 64))
    with pytest.raises(ValueError, match="int_affine"):
        R.repack_quantized(q)
    q = Codebook("nf4", 64, False).quantize(torch.randn(4, 96))  # blocks straddle rows of 96
    with pytest.raises(ValueError, match="straddle"):
        R.repack_quantized(q)
