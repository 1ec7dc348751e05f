"""Importance matrices: collection equals the float64 definition; GGUF and legacy .dat files round-trip and
are laid out as llama.cpp writes them; bad files fail with a clear error."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from lowbit.io.imatrix import (Imatrix, collect_act_sq_mean, collect_imatrix, read_imatrix, write_imatrix_dat,
                               write_imatrix_gguf)


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=50, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_collected_statistic_is_the_mean_of_squared_inputs():
    m = _tiny()
    ids = [torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (1, 5))]
    captured = []
    h = m.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, a: captured.append(a[0].detach()))
    sums, counts = collect_act_sq_mean(m, ids)
    h.remove()
    X = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    name = "model.layers.1.mlp.down_proj"
    assert counts[name] == 19
    torch.testing.assert_close(sums[name] / counts[name], (X * X).mean(0), rtol=1e-12, atol=0)
    im = collect_imatrix(m, ids, dataset="unit")
    assert "blk.1.ffn_down.weight" in im.sums and not any(k.startswith("output") for k in im.sums)
    np.testing.assert_allclose(im.importance("blk.1.ffn_down.weight"), (X * X).mean(0).numpy(), rtol=1e-6)
    assert len(im) == 2 * 7 and im.chunk_count == 2


def _example() -> Imatrix:
    rng = np.random.default_rng(0)
    return Imatrix(sums={"blk.0.attn_q.weight": rng.random(64).astype(np.float32) * 30,
                         "blk.0.ffn_down.weight": rng.random(96).astype(np.float32) * 30},
                   counts={"blk.0.attn_q.weight": 30.0, "blk.0.ffn_down.weight": 30.0},
                   chunk_count=3, chunk_size=10, datasets=("calib.txt",))


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_files_round_trip(tmp_path, fmt):
    im = _example()
    path = tmp_path / f"im.{fmt}"
    (write_imatrix_gguf if fmt == "gguf" else write_imatrix_dat)(path, im)
    back = read_imatrix(path)
    assert sorted(back.names()) == sorted(im.names())
    for n in im.names():
        np.testing.assert_allclose(back.importance(n), im.importance(n), rtol=1e-6)
    assert back.datasets == ("calib.txt",) and back.chunk_count == 3


def test_gguf_imatrix_layout_matches_llama_cpp(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "im.gguf"
    write_imatrix_gguf(path, _example())
    r = gguf.GGUFReader(str(path))
    assert bytes(r.fields["general.type"].parts[-1]).decode() == "imatrix"
    assert r.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    t = {x.name: x for x in r.tensors}
    assert list(t["blk.0.attn_q.weight.in_sum2"].shape) == [64, 1]   # ne order {ne0, n_mat}
    assert list(t["blk.0.attn_q.weight.counts"].shape) == [1, 1]
    assert float(np.asarray(t["blk.0.attn_q.weight.counts"].data).reshape(-1)[0]) == 30.0


def test_legacy_dat_bytes(tmp_path):
    im = Imatrix(sums={"a": np.array([2.0, 4.0], np.float32)}, counts={"a": 2.0}, chunk_count=5, datasets=("d",))
    path = tmp_path / "x.dat"
    write_imatrix_dat(path, im)
    b = path.read_bytes()
    # n=1 | len=1 'a' | ncall=5 nval=2 | values = mean*ncall = [5, 10] | last_call=5 | len=1 'd'
    assert b == (struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 5, 2) + struct.pack("<ff", 5.0, 10.0)
                 + struct.pack("<ii", 5, 1) + b"d")


def test_bad_files_raise_clear_errors(tmp_path):
    p = tmp_path / "t.dat"
    write_imatrix_dat(p, _example())
    data = p.read_bytes()
    for cut in (3, 10, 40, len(data) // 2):
        (tmp_path / "cut.dat").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|implausible|name length"):
            read_imatrix(tmp_path / "cut.dat")
    (tmp_path / "huge.dat").write_bytes(struct.pack("<i", 2**30))
    with pytest.raises(ValueError, match="implausible"):
        read_imatrix(tmp_path / "huge.dat")
