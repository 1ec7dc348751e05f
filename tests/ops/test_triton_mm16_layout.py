"""CPU: the index arithmetic of the small-M tensor-core kernel's layout (lowbit.ops.triton.wq_mm16_layout)."""

import pytest
import torch

from lowbit.ops.triton import wq_mm16_layout as L


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("BK", [64, 128])
def test_k_orders_are_permutations_of_the_tile(bits, BK):
    for f in (L.mma_k_to_weight_row, L.mma_k_to_x_position):
        idx = f(BK, bits)
        assert torch.equal(idx.sort().values, torch.arange(BK))
    assert torch.equal(L.x_source_index(BK, bits).sort().values, torch.arange(BK))
    assert torch.equal(L.mma_row_to_column(32).sort().values, torch.arange(32))


@pytest.mark.parametrize("bits", [4, 2])
def test_decode_pairs_hold_codes_p_and_p_plus_ppw_of_one_word(bits):
    """MMA K indices 2t + e (+8h, +16kb) of one chunk come from word t: its codes p = 2kb + h and p + PPW."""
    P = L.pairs_per_word(bits)
    rows = L.mma_k_to_weight_row(8 * P, bits)
    k = torch.arange(8 * P)
    t, e = (k % 16) // 2 % 4, k % 2
    assert torch.equal(rows // (2 * P), t)  # the word (2·PPW codes a word) is the thread's own
    code = rows % (2 * P)
    assert torch.equal(code // P, e) and torch.equal(code % P, 2 * (k // 16) + (k // 8) % 2)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("BK,BR", [(64, 32), (128, 64)])
def test_gathered_x_times_permuted_tile_is_the_matmul(bits, BK, BR):
    """The MMA sum over the kernel's K order, with x gathered by ``x_source_index`` and A's rows/columns taken as
    the decode places them, equals ``x @ Wᵀ`` in float64 (fresh random operands, K and N over several tiles)."""
    torch.manual_seed(bits * BK + BR)
    M, K, N = 7, 3 * BK, 2 * BR
    W = torch.randn(N, K, dtype=torch.float64)
    x = torch.randn(M, K, dtype=torch.float64)
    xp = x[:, L.x_source_index(K, bits)]  # gathered once per call
    wrow, xpos, col = L.mma_k_to_weight_row(BK, bits), L.mma_k_to_x_position(BK, bits), L.mma_row_to_column(BR)
    out = torch.zeros(M, N, dtype=torch.float64)
    for n0 in range(0, N, BR):
        for k0 in range(0, K, BK):
            A = W[n0 + col][:, k0 + wrow]  # (BR, BK): MMA row ρ, MMA K index k
            Bm = xp[:, k0 + xpos].t()  # (BK, M)
            out[:, n0 + col] += (A @ Bm).t()
    torch.testing.assert_close(out, x @ W.t(), rtol=1e-12, atol=1e-12)


def test_bad_bits_are_refused_with_the_valid_choices():
    with pytest.raises(ValueError, match="bits 2 or 4"):
        L.pairs_per_word(3)
    with pytest.raises(ValueError, match="multiple of 32"):
        L.x_source_index(48, 4)
