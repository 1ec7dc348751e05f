"""Bit packing: a bijection for every width 1..8, MSB-first layout, exact byte counts."""

import itertools

import pytest
import torch

from lowbit.formats.bitpack import pack, packed_len, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 64, 77, 576])
def test_pack_unpack_roundtrip_every_width(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, (n * bits + 7) // 8) == (5, packed_len(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_is_injective_on_all_short_sequences(bits):
    # Every sequence of 2 codes (all (2^b)^2 of them) packs to a distinct byte string: pack is a bijection
    # onto its image, and unpack inverts it.
    k = 1 << bits
    codes = torch.tensor(list(itertools.product(range(k), repeat=2)), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert len({tuple(r.tolist()) for r in packed}) == k * k
    assert torch.equal(unpack(packed, bits, 2), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_then_pack_is_identity_on_packed_bytes(bits):
    # The other direction of the bijection: any byte string whose padding bits are zero is reproduced.
    n = 8  # 8 codes fill whole bytes for every width: no padding bits
    g = torch.Generator().manual_seed(bits)
    packed = torch.randint(0, 256, (4, bits), generator=g, dtype=torch.uint8)
    assert torch.equal(pack(unpack(packed, bits, n), bits), packed)


def test_layout_is_msb_first_stream():
    # 3-bit codes 5, 3, 1 -> 101 011 001 -> 10101100 1(0000000)
    assert pack(torch.tensor([[5, 3, 1]]), 3).tolist() == [[0b10101100, 0b10000000]]
    # 4-bit: first element in the high nibble (bitsandbytes' order)
    assert pack(torch.tensor([[1, 2, 3]]), 4).tolist() == [[0x12, 0x30]]
    assert pack(torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 1]]), 1).tolist() == [[0b10110001, 0b10000000]]


def test_bad_input():
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(1, 4, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="bits"):
        pack(torch.zeros(1, 4, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack(torch.tensor([[8]]), 3)
    with pytest.raises(TypeError, match="integer"):
        pack(torch.zeros(1, 4), 4)
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(1, 4, dtype=torch.int32), 4, 8)
