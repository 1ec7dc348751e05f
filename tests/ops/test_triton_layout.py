"""The GEMV's column-tiled layout (:func:`lowbit.ops.repack.tile_columns`, session 7) on the CPU: where every element
lands, the zero columns past N, the exact inverse, and the per-tensor cache that the GPU kernels read through."""

import pytest
import torch

from lowbit.ops import repack as R


@pytest.mark.parametrize("N,BN", [(200, 64), (256, 64), (28, 32), (576, 128), (1, 16)])
def test_tile_columns_places_each_column_tile_contiguously(N, BN):
    torch.manual_seed(0)
    rows = 7
    t = torch.randint(-2**31, 2**31 - 1, (rows, N), dtype=torch.int32)
    tt = R.tile_columns(t, BN)
    NT = -(-N // BN)
    assert tt.shape == (NT, rows, BN) and tt.is_contiguous() and tt.dtype == t.dtype
    for n in (0, N // 3, N - 1):
        for r in range(rows):
            assert tt[n // BN, r, n % BN] == t[r, n]
    flat = tt.reshape(-1)  # tile j's rows follow each other: row r of tile j starts at (j·rows + r)·BN
    j, r = NT - 1, rows - 1
    assert torch.equal(flat[(j * rows + r) * BN:(j * rows + r) * BN + (N - j * BN)], t[r, j * BN:])
    if NT * BN > N:
        assert bool((tt[-1, :, N - (NT - 1) * BN:] == 0).all())
    assert torch.equal(R.untile_columns(tt, N), t)


def test_tile_columns_keeps_float_scales_exactly():
    torch.manual_seed(1)
    s = (torch.rand(5, 100) * 0.01).half()
    assert torch.equal(R.untile_columns(R.tile_columns(s, 32), 100), s)
    assert R.tile_columns(s, 32).dtype == torch.float16


def test_tile_columns_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        R.tile_columns(torch.zeros(4), 32)
    with pytest.raises(ValueError, match="positive"):
        R.tile_columns(torch.zeros(2, 4), 0)
    with pytest.raises(ValueError, match="does not fit"):
        R.untile_columns(torch.zeros(2, 3, 32), 100)


def test_tiled_columns_is_built_once_and_follows_in_place_changes():
    torch.manual_seed(2)
    q = torch.randint(0, 2**31 - 1, (16, 96), dtype=torch.int32)
    a = R.tiled_columns(q, 32)
    assert R.tiled_columns(q, 32) is a  # cached on q
    b = R.tiled_columns(q, 64)  # another tile width: its own entry
    assert b.shape == (2, 16, 64) and R.tiled_columns(q, 32) is a
    q[3, 50] += 1  # changed in place: rebuilt, never stale
    c = R.tiled_columns(q, 32)
    assert c is not a and torch.equal(R.untile_columns(c, 96), q)
    assert c[50 // 32, 3, 50 % 32] == q[3, 50]
