"""Parity with bitsandbytes' own 8-bit optimizers (bitsandbytes 0.50.2, CPU backend).

bitsandbytes >= 0.50 runs 8-bit block-wise optimizers on CPU (``backends/cpu/ops.py::
_optimizer_update_8bit_blockwise_cpu``, PR #1901): dequantize -> fp32 update -> quantize with block 256, the
same codes (``create_dynamic_map``) and the same state layout (uint8 codes + one fp32 absmax per block) as ours,
so a state can be copied from one to the other. Two differences, both small: its C quantizer picks the
farther of the two neighbouring codes for about 0.15% of values (we round to the nearest), and it has no NaN skip.

Thresholds are those of bitsandbytes' ``tests/test_optim.py::test_optimizer8bit`` (fp32 gradients), read at
bitsandbytes-foundation/bitsandbytes commit 027f4ad8:

- per step: mean |p - p_ref| < 6e-5 and mean |p - p_ref| / (|p_ref| + 1e-9) < 6e-4;
- per state: fewer than 20 elements outside ``isclose(atol=3e-3, rtol=1e-3)`` of the dequantized states;
- every 10 steps: no element of p outside ``isclose(atol=1e-5, rtol=1e-3)``;

under its protocol: 50 steps of ``g = 0.01 * randn`` on a (1024, dim2) parameter from ``p = 0.1 * randn``, after
every step the compared optimizer is re-synchronised to the reference (parameters and state), so each step is
checked from a common start. A free-running 50-step trajectory (no re-sync) is checked separately.
"""

from __future__ import annotations

import io

import pytest
import torch

from lowbit import optim as lo
from lowbit.optim.blockwise import dequantize_blockwise, state_codebook

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

SLOT_MAP = {"exp_avg": ("state1", "qmap1", "absmax1"), "exp_avg_sq": ("state2", "qmap2", "absmax2"),
            "momentum_buffer": ("state1", "qmap1", "absmax1")}

PAIRS = {
    "adam8bit": (lambda ps: lo.Adam8bit(ps), lambda ps: bnb.optim.Adam8bit(ps)),
    "adamw8bit-wd": (lambda ps: lo.AdamW8bit(ps, weight_decay=1e-2), lambda ps: bnb.optim.AdamW8bit(ps, weight_decay=1e-2)),
    "lion8bit": (lambda ps: lo.Lion8bit(ps), lambda ps: bnb.optim.Lion8bit(ps)),
    "momentum8bit": (lambda ps: lo.SGD8bit(ps, 0.01, 0.9), lambda ps: bnb.optim.SGD8bit(ps, 0.01, 0.9)),
}


def _ours(opt, p, name):
    st = opt.state[p]
    signed = dict(opt.slots)[name]
    return dequantize_blockwise(st[f"{name}.qdata"], st[f"{name}.absmax"], state_codebook(8, signed), p.shape, 256, 8)


def _theirs(opt, p, name):
    state, qmap, absmax = SLOT_MAP[name]
    st = opt.state[p]
    return F.dequantize_blockwise(st[state], absmax=st[absmax], code=st[qmap], blocksize=256)


def _most_close(a, b, atol, rtol, max_errors):
    bad = (~torch.isclose(a, b, atol=atol, rtol=rtol)).sum().item()
    assert bad <= max_errors, f"{bad} elements outside atol={atol}, rtol={rtol}"


@pytest.mark.parametrize("dim2", [32, pytest.param(1024, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(PAIRS))
def test_step_parity_with_bitsandbytes_8bit(name, dim2):
    make_ours, make_theirs = PAIRS[name]
    torch.manual_seed(0)
    p_ref = torch.nn.Parameter(torch.randn(1024, dim2) * 0.1)
    p = torch.nn.Parameter(p_ref.detach().clone())
    ref, ours = make_theirs([p_ref]), make_ours([p])
    for i in range(50):
        g = torch.randn(1024, dim2) * 0.01
        p_ref.grad, p.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        err = (p - p_ref).abs()
        assert err.mean() < 6e-5
        assert (err / (p_ref.abs() + 1e-9)).mean() < 6e-4
        for slot, _ in ours.slots:
            bad = (~torch.isclose(_ours(ours, p, slot), _theirs(ref, p_ref, slot), atol=3e-3, rtol=1e-3)).sum()
            assert bad.item() < 20, (i, slot, bad.item())
        if i % 10 == 0 and i > 0:
            _most_close(p, p_ref, 1e-5, 1e-3, 0)
            buf = io.BytesIO()  # and a save/load in the middle, as bitsandbytes' test does
            torch.save(ours.state_dict(), buf)
            buf.seek(0)
            ours = make_ours([p])
            ours.load_state_dict(torch.load(buf))
        # re-synchronise ours to the reference: parameters and the quantized state, byte for byte
        with torch.no_grad():
            p.copy_(p_ref)
            for slot, _ in ours.slots:
                state, _, absmax = SLOT_MAP[slot]
                ours.state[p][f"{slot}.qdata"].copy_(ref.state[p_ref][state].view(-1))
                ours.state[p][f"{slot}.absmax"].copy_(ref.state[p_ref][absmax])


@pytest.mark.parametrize("dim2", [32, pytest.param(1024, marks=pytest.mark.slow)])
def test_bitsandbytes_protocol_against_fp32_torch_adam(dim2):
    """bitsandbytes' own test_optimizer8bit, run on our Adam8bit against torch.optim.Adam."""
    torch.manual_seed(0)
    p_ref = torch.randn(1024, dim2) * 0.1
    p = p_ref.clone()
    ref, ours = torch.optim.Adam([p_ref]), lo.Adam8bit([p])
    for i in range(50):
        g = torch.randn(1024, dim2) * 0.01
        p_ref.grad, p.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        deq = {}
        for slot, _ in ours.slots:
            deq[slot] = _ours(ours, p, slot)
            bad = (~torch.isclose(ref.state[p_ref][slot], deq[slot], atol=3e-3, rtol=1e-3)).sum()
            assert bad.item() < 20
        err = (p_ref - p).abs()
        assert err.mean() < 6e-5
        assert (err / (p_ref.abs() + 1e-9)).mean() < 6e-4
        if i % 10 == 0 and i > 0:
            _most_close(p_ref, p, 1e-5, 1e-3, 0)
        p.copy_(p_ref)
        for slot, _ in ours.slots:
            ref.state[p_ref][slot].copy_(deq[slot])


def test_free_running_50_step_trajectory_against_bitsandbytes():
    """No re-sync: 50 steps from the same start.

    Measured (seed 0, 1024x64): mean |p - p_bnb| 9.1e-6 at step 50 (its largest), within the 6e-5 threshold;
    the mean relative error, 6.5e-4, is just above bitsandbytes' 6e-4, which its test applies only to re-synced
    steps (bitsandbytes itself, free-running against fp32 Adam here, is at 1.3e-2). Both deviate from fp32 Adam
    equally: 1.2392e-4 (ours) vs 1.2409e-4 (bitsandbytes).
    """
    torch.manual_seed(0)
    p0 = torch.randn(1024, 64) * 0.1
    p_bnb, p, p32 = (torch.nn.Parameter(p0.clone()) for _ in range(3))
    o_bnb, ours, o32 = bnb.optim.Adam8bit([p_bnb]), lo.Adam8bit([p]), torch.optim.Adam([p32], foreach=False)
    for _ in range(50):
        g = torch.randn(1024, 64) * 0.01
        for q, o in ((p_bnb, o_bnb), (p, ours), (p32, o32)):
            q.grad = g.clone()
            o.step()
        assert (p - p_bnb).abs().mean() < 6e-5  # bitsandbytes' per-step mean abs threshold, never re-synced
    ours_dev = (p - p32).abs().mean().item()
    bnb_dev = (p_bnb - p32).abs().mean().item()
    assert ours_dev <= 1.05 * bnb_dev, (ours_dev, bnb_dev)
