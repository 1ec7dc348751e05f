"""Block-wise state quantization: codes, nearest rounding, packing, errors (tier 1 for optimizer state)."""

from __future__ import annotations

import pytest
import torch

from lowbit.optim.blockwise import (BLOCK_SIZES, dequantize_blockwise, quantize_blockwise, quantized_nbytes,
                                    state_codebook)

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_codebook_equals_bitsandbytes_dynamic_map(signed):
    ours = state_codebook(8, signed)
    theirs = bnb_functional.create_dynamic_map(signed=signed, max_exponent_bits=7, total_bits=8)
    assert torch.equal(ours, theirs)


def test_8bit_codebook_structure():
    signed = state_codebook(8, True)
    assert (signed < 0).sum() == 127 and (signed == 0).sum() == 1 and (signed > 0).sum() == 128
    assert signed.max() == 1.0 and abs(signed.min().item() + 0.99297) < 1e-5
    unsigned = state_codebook(8, False)
    assert (unsigned == 0).sum() == 1 and (unsigned > 0).sum() == 255 and unsigned.max() == 1.0
    for code in (signed, unsigned):
        assert torch.all(code[1:] > code[:-1]), "codes must be strictly ascending for nearest rounding"


def test_4bit_codebooks():
    signed = state_codebook(4, True)
    assert signed.numel() == 16 and torch.all(signed[1:] > signed[:-1])
    assert (signed == 0).sum() == 1 and signed.max() == 1.0 and signed.min() < -0.88
    unsigned = state_codebook(4, False)
    # Linear map without zero (arXiv 2309.01507): a second moment can never round to 0.
    assert torch.equal(unsigned, torch.arange(1, 17, dtype=torch.float32) / 16)


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize("numel", [1, 255, 256, 1000, 4097])
def test_nearest_rounding_matches_float64_argmin(bits, signed, numel):
    torch.manual_seed(numel)
    x = torch.randn(numel) * torch.rand(numel).pow(6) * 3  # heavy spread of magnitudes
    if not signed:
        x = x.abs()
    code = state_codebook(bits, signed)
    block = 256
    qdata, absmax = quantize_blockwise(x, code, block, bits)
    y = dequantize_blockwise(qdata, absmax, code, x.shape, block, bits)
    # float64 textbook: per block absmax, then argmin distance to every code value
    x64 = x.double()
    ref = torch.empty_like(x64)
    for start in range(0, numel, block):
        blk = x64[start:start + block]
        amax = blk.abs().max()
        scaled = blk / amax if amax > 0 else blk
        best = code.double()[(scaled[:, None] - code.double()[None, :]).abs().argmin(dim=1)]
        ref[start:start + block] = best * amax
        assert absmax[start // block].item() == pytest.approx(amax.item(), rel=0, abs=0)
    err = (y.double() - x64).abs()
    ref_err = (ref - x64).abs()
    # nearest: our error equals the best achievable, up to fp32 rounding of the scaled value
    assert torch.all(err <= ref_err + 1e-6 * x64.abs().max()), (err - ref_err).max()


def test_representable_values_survive_exactly():
    code = state_codebook(8, True)
    absmax = 0.375  # a power-of-two multiple keeps code * absmax exact in fp32
    x = torch.cat([code, code.flip(0)]) * absmax  # 512 values, two blocks, each reaches |x| = absmax
    qdata, amax = quantize_blockwise(x, code, 256, 8)
    assert torch.equal(amax, torch.full((2,), absmax))
    assert torch.equal(dequantize_blockwise(qdata, amax, code, x.shape, 256, 8), x)


@pytest.mark.parametrize("block,expected", [(256, 0.0085), (2048, 0.0097)])
def test_mean_error_on_gaussian_matches_reference(block, expected):
    # Reference table (training-methods.md Sec. 0, reproduced there in numpy); bnb's own test bound is < 0.011.
    torch.manual_seed(0)
    x = torch.randn(1024, 1024)
    code = state_codebook(8, True)
    q, a = quantize_blockwise(x, code, block, 8)
    err = (dequantize_blockwise(q, a, code, x.shape, block, 8) - x).abs().mean().item()
    assert abs(err - expected) < 3e-4, err
    assert err < 0.011


def test_4bit_packs_high_nibble_first_and_odd_length():
    code = state_codebook(4, True)
    x = torch.tensor([code[15].item(), code[0].item(), code[7].item()])  # indices 15, 0, 7 at absmax 1
    qdata, absmax = quantize_blockwise(x, code, 64, 4)
    assert qdata.dtype == torch.uint8 and qdata.tolist() == [0xF0, 0x70]
    assert torch.equal(dequantize_blockwise(qdata, absmax, code, x.shape, 64, 4), x)


def test_short_last_block_and_all_zero_block():
    code = state_codebook(8, False)
    x = torch.cat([torch.zeros(256), torch.rand(44)])
    q, a = quantize_blockwise(x, code, 256, 8)
    assert a.shape == (2,) and a[0] == 0 and a[1] == x[256:].max()
    y = dequantize_blockwise(q, a, code, x.shape, 256, 8)
    assert torch.equal(y[:256], torch.zeros(256))
    assert (y[256:] - x[256:]).abs().max() <= a[1] * 0.01


def test_dequantize_of_bitsandbytes_codes_is_identical():
    torch.manual_seed(1)
    x = torch.randn(64, 300)
    code = state_codebook(8, True)
    qb, qs = bnb_functional.quantize_blockwise(x, code=code, blocksize=256)
    theirs = bnb_functional.dequantize_blockwise(qb, qs)
    ours = dequantize_blockwise(qb.view(-1), qs.absmax, code, x.shape, 256, 8)
    assert torch.equal(ours, theirs)


def test_quantized_nbytes():
    assert quantized_nbytes(4096, 8, 256) == 4096 + 16 * 4
    assert quantized_nbytes(4097, 4, 2048) == 2049 + 3 * 4


@pytest.mark.parametrize("kwargs,match", [
    ({"bits": 3}, "bits=3"), ({"block_size": 100}, "block_size=100"),
])
def test_bad_arguments_name_the_value_and_choices(kwargs, match):
    code = state_codebook(8, True)
    args = {"bits": 8, "block_size": 256, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        quantize_blockwise(torch.randn(10), code, args["block_size"], args["bits"])
    assert "choose one of" in str(info.value)
    assert 2048 in BLOCK_SIZES


def test_dequantize_rejects_wrong_sizes():
    code = state_codebook(8, True)
    q, a = quantize_blockwise(torch.randn(300), code, 256, 8)
    with pytest.raises(ValueError, match="absmax has 2 blocks"):
        dequantize_blockwise(q, a, code, (300,), 64, 8)
    with pytest.raises(ValueError, match="needs 301"):
        dequantize_blockwise(q, a, code, (301,), 256, 8)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_blockwise(q.int(), a, code, (300,), 256, 8)


def test_keep_nonzero_never_rounds_a_nonzero_to_zero():
    code = state_codebook(8, False)
    x = torch.tensor([1.0, 1e-9, 1e-7, 0.0, 2e-7])
    plain, _ = quantize_blockwise(x, code, 64, 8)
    kept, _ = quantize_blockwise(x, code, 64, 8, keep_nonzero=True)
    assert plain.tolist()[:4] == [255, 0, 0, 0]  # nearest: tiny values collapse to 0
    assert kept.tolist() == [255, 1, 1, 0, plain[4].item()]  # exact zero stays 0; others unchanged
    signed = state_codebook(8, True)
    zero = int((signed == 0).nonzero())
    kept_s, _ = quantize_blockwise(torch.tensor([1.0, 1e-9, -1e-9, 0.0]), signed, 64, 8, keep_nonzero=True)
    assert kept_s.tolist()[1:] == [zero + 1, zero - 1, zero]
