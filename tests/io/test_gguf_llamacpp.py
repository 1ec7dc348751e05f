"""lowbit.io.gguf_llamacpp: llama.cpp's x86 activation rounding, checked against independent numpy float32
versions of ggml's routines and against ggml's block dot-product formulas in float64 (the slow test
tests/io/test_llamacpp_slow.py checks it against llama.cpp's own first-layer outputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.io.gguf_llamacpp import VEC_DOT_TYPE, quantize_activations


def _inputs(n: int = 64, width: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g) * torch.rand(n, width, generator=g) ** 3
    x[0, 5] = 300.0  # an outlier block
    x[1, :32] = 0.0  # an all-zero block
    x[2, :32] = torch.arange(32) - 15.5  # amax 15.5: many products near .5
    return x


def _np_q8_0_x86(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0 (ggml-cpu/arch/x86/quants.c, AVX2): id = 127/amax in float32, round half to even,
    scale stored as fp16(amax/127)."""
    v = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(v).max(1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(v * inv)
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
    return (q * d).reshape(x.shape)


def _np_q8_k_ref(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_K_ref (ggml-quants.c): iscale = -127/max (max = first value of largest |x|),
    nearest_int via +12582912 in float32, clamp to 127, d = 1/iscale."""
    out = np.empty_like(x, dtype=np.float32)
    for r, v in enumerate(x.reshape(-1, 256).astype(np.float32)):
        i = int(np.argmax(np.abs(v)))
        if v[i] == 0:
            out.reshape(-1, 256)[r] = 0
            continue
        iscale = np.float32(-127) / v[i]
        q = ((iscale * v).astype(np.float32) + np.float32(12582912)).astype(np.float32) - np.float32(12582912)
        q = np.minimum(q, 127)
        out.reshape(-1, 256)[r] = q * (np.float32(1) / iscale)
    return out.reshape(x.shape)


def test_q8_0_is_the_x86_routine_bit_for_bit():
    x = _inputs()
    ours = quantize_activations(x, "Q8_0").numpy()
    np.testing.assert_array_equal(ours, _np_q8_0_x86(x.numpy()))
    # ties round to even as _mm256_round_ps does (the portable reference's roundf would give 1, 2, 3)
    row = torch.zeros(1, 32)
    row[0, :4] = torch.tensor([127.0, 0.5, 1.5, 2.5])
    assert quantize_activations(row, "Q8_0")[0, 1:4].tolist() == [0.0, 2.0, 2.0]


def test_q8_k_is_the_reference_routine_bit_for_bit():
    x = _inputs()
    np.testing.assert_array_equal(quantize_activations(x, "Q8_K").numpy(), _np_q8_k_ref(x.numpy()))


def test_float_vec_dot_types_round_to_that_type_and_unknown_types_are_refused():
    x = _inputs()
    assert torch.equal(quantize_activations(x, "F16"), x.half().float())
    assert torch.equal(quantize_activations(x, "BF16"), x.bfloat16().float())
    assert quantize_activations(x, "F32") is x
    with pytest.raises(ValueError, match="unknown vec_dot_type 'Q4_0'.*valid"):
        quantize_activations(x, "Q4_0")
    assert VEC_DOT_TYPE["Q4_K"] == "Q8_K" and VEC_DOT_TYPE["Q5_0"] == "Q8_0" and VEC_DOT_TYPE["Q4_1"] == "Q8_1"


def _blocks_q4_1(raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """d, m (rows, cols/32) and codes q (rows, cols) of Q4_1 blocks: fp16 d, fp16 m, 16 bytes of nibbles."""
    b = raw.reshape(rows, cols // 32, 20)
    d = b[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    m = b[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    qs = b[:, :, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(rows, cols).astype(np.float64)
    return d, m, q


@pytest.mark.parametrize("module", ["self_attn.q_proj", "mlp.down_proj"])
def test_q4_1_layers_follow_ggmls_q8_1_dot_product(tmp_path, module):
    """A Q4_1 layer under the emulation computes sum over blocks of d_w*d_a*sum(q_w*q_a) + m_w*s_a with
    s_a = fp16(d_a_float * sum(q_a)) — ggml's vec_dot_q4_1_q8_1 — including the Q/K row permutation."""
    from lowbit.io.gguf_export import export_gguf, hf_to_gguf_name
    from lowbit.io.gguf_model import load_gguf_model, unpermute_qk
    from lowbit.io.gguf_reader import read_gguf
    from tests.io.test_gguf_export import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    path = tmp_path / "q41.gguf"
    export_gguf(tiny_llama(len(tok)), tok, path, type="Q4_1")
    model, _ = load_gguf_model(path, llamacpp_cpu_numerics=True)
    mod = model.model.layers[0].get_submodule(module)
    x = _inputs(16, mod.in_features, seed=1)
    with torch.no_grad():
        ours = mod(x).double().numpy()
    g = read_gguf(path)
    d_w, m_w, q_w = _blocks_q4_1(g.raw(f"{hf_to_gguf_name('model.layers.0.' + module)}.weight"),
                                 mod.out_features, mod.in_features)
    g.close()
    v = x.numpy().reshape(16, -1, 32).astype(np.float32)
    amax = np.abs(v).max(2)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q_a = np.rint(v * inv[..., None]).astype(np.float64)
    d_a32 = (amax / np.float32(127)).astype(np.float32)
    d_a = d_a32.astype(np.float16).astype(np.float64)
    s_a = (d_a32 * q_a.sum(2).astype(np.float32)).astype(np.float16).astype(np.float64)
    isum = np.einsum("tbj,obj->tob", q_a, q_w.reshape(mod.out_features, -1, 32))
    main = (d_w[None] * d_a[:, None] * isum).sum(2)
    want = main + (m_w[None] * s_a[:, None]).sum(2)
    exact_sum = main + (m_w[None] * (d_a * q_a.sum(2))[:, None]).sum(2)  # without Q8_1's rounded block sum
    if module == "self_attn.q_proj":
        want, exact_sum = (unpermute_qk(torch.from_numpy(w.T.copy()), model.config.num_attention_heads).numpy().T
                           for w in (want, exact_sum))
    err = np.abs(ours - want).max()
    assert err <= 1e-5 * np.abs(want).max()
    with torch.no_grad():
        plain = torch.nn.functional.linear(x, mod.weight).double().numpy()
    assert np.abs(plain - want).max() > 10 * err and np.abs(exact_sum - want).max() > 10 * err
