"""The compiled scalar primitives and block helpers behind the GGML quantizers, against float64 textbook
definitions and the C semantics they reproduce (bit patterns, ties, ±0, first-on-ties)."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest
import torch

from lowbit.formats.ggml import quantize_raw
from lowbit.formats.ggml.jit import (all_finite, block_absmax, block_absmax_tree, block_minmax, kernel, nearest_int,
                                     nearest_int_in_range, roundf,
                                     signed_absmax)

F32 = np.float32


def _c_nearest_int(f: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int`` spelled out on bit patterns: ``(bits(f + 1.5·2^23) & 0x7FFFFF) − 0x400000``."""
    with np.errstate(invalid="ignore", over="ignore"):
        v = (f.astype(F32) + F32(12582912.0)).astype(F32)
    return (v.view(np.uint32).astype(np.int64) & 0x7FFFFF) - 0x400000


def test_nearest_int_is_round_half_even_in_range():
    rng = np.random.default_rng(0)
    vals = np.concatenate([rng.uniform(-4194303, 4194303, 500), rng.uniform(-40, 40, 500),
                           np.arange(-20, 20) + 0.5, [0.0, -0.0, 0.49999997, -0.49999997, 4194303.0, -4194303.0]])
    f = vals.astype(F32)
    ours = np.array([nearest_int(v) for v in f])
    np.testing.assert_array_equal(ours, np.rint(f.astype(np.float64)).astype(np.int64))
    np.testing.assert_array_equal(np.array([nearest_int_in_range(v) for v in f]), ours)


def test_nearest_int_matches_the_c_bit_trick_outside_its_range():
    f = np.array([4194304.0, -4194305.0, 1e7, -3e9, 3.4e38, -3.4e38, np.inf, -np.inf, np.nan], dtype=F32)
    ours = np.array([nearest_int(v) for v in f])
    np.testing.assert_array_equal(ours, _c_nearest_int(f))


def test_roundf_rounds_half_away_from_zero():
    rng = np.random.default_rng(1)
    f = np.concatenate([rng.uniform(-200, 200, 1000), np.arange(-10, 10) + 0.5,
                        [0.0, -0.0, 0.49999997, -0.49999997, 127.5, -127.5, 1.5, 2.5]]).astype(F32)
    x = f.astype(np.float64)
    textbook = (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)
    np.testing.assert_array_equal(np.array([roundf(v) for v in f]), textbook)


def test_block_helpers_keep_c_semantics():
    x = np.array([[0.5, -2.0, 2.0, 1.0], [-0.0, 0.0, -0.0, 0.0], [3.0, -3.0, 1.0, -1.0], [-1.0, 0.0, -0.0, 2.0]],
                 dtype=F32)
    assert [float(block_absmax(x, b)) for b in range(4)] == [2.0, 0.0, 3.0, 2.0]
    # the first of equal magnitudes wins (C's strict '>'), +0 for an all-zero block
    assert [float(signed_absmax(x, b)[1]) for b in range(4)] == [-2.0, 0.0, 3.0, 2.0]
    assert np.signbit(signed_absmax(x, 1)[1]) == np.False_
    mn, mx = block_minmax(x, 1)
    assert np.signbit(mn) and np.signbit(mx)  # first of the equal zeros: -0.0 for both
    mn, mx = block_minmax(x, 3)
    assert (float(mn), float(mx)) == (-1.0, 2.0)
    y = np.random.default_rng(6).standard_normal((50, 256)).astype(F32)
    y[7] = 0.0
    scratch = np.empty(256, dtype=F32)
    tree = [float(block_absmax_tree(y, b, scratch)) for b in range(50)]
    assert tree == [float(block_absmax(y, b)) for b in range(50)] == list(np.abs(y).max(axis=1).astype(float))


def test_all_finite_agrees_with_numpy():
    x = np.random.default_rng(2).standard_normal((8, 64)).astype(F32)
    assert all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[5, 17] = bad
        assert not all_finite(y)
    y = x.copy()
    y[0, 0] = np.finfo(F32).max
    assert all_finite(y)


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", "Q8_0", "Q4_K", "IQ4_NL", "TQ1_0"])
def test_thread_count_does_not_change_the_bytes(name):
    x = torch.randn(300, 512, generator=torch.Generator().manual_seed(3))
    one = quantize_raw(x, name, threads=1)
    np.testing.assert_array_equal(quantize_raw(x, name, threads=2), one)
    np.testing.assert_array_equal(quantize_raw(x, name, threads=3), one)


def test_thread_count_is_validated():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        quantize_raw(torch.randn(2, 32), "Q8_0", threads=0)


def test_kernel_compiles_without_a_cache_location():
    # a function defined by exec has no source file, so numba has nowhere to cache it: kernel() must fall back
    ns: dict = {"np": np}
    exec("def twice(a):\n    return a * np.float32(2.0)\n", ns)
    f = kernel(ns["twice"])
    assert f(F32(1.5)) == F32(3.0)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "Q4_K", "IQ4_NL"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_rejected_by_every_path(name, bad):
    # the legacy and ternary kernels count NaN/Inf while they read each block; the other types are checked first
    x = torch.randn(300, 512, generator=torch.Generator().manual_seed(4))
    x[217, 300] = bad
    for qw in (None, np.ones(512, dtype=np.float32)):
        for threads in (1, 2):
            with pytest.raises(ValueError, match="1 NaN/Inf value"):
                quantize_raw(x, name, imatrix=qw, threads=threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_quantize_raw_threads_work_in_a_forked_child():
    # the row-thread pool lives for the process; a forked child must not wait on the parent's (absent) threads
    x = torch.randn(400, 512, generator=torch.Generator().manual_seed(5))
    expected = quantize_raw(x, "Q4_0", threads=2)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(_quantize_q4_0_two_threads, (x.numpy(),)).get(timeout=120)
    np.testing.assert_array_equal(got, expected)


def _quantize_q4_0_two_threads(x: np.ndarray) -> np.ndarray:
    return quantize_raw(x, "Q4_0", threads=2)
