"""``lowbit::adamw8bit_step_`` is :class:`lowbit.optim.AdamW8bit`'s step (the op the fused CUDA kernel implements)."""

import pytest
import torch

import lowbit.ops.schema  # noqa: F401
from lowbit.optim import AdamW8bit
from lowbit.optim.blockwise import state_codebook


def _grads(n, seed):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=g) * 1e-2
    grad[: n // 8] *= 1e-5  # tiny gradients: their v rounds to the 0 code without keep_nonzero
    grad[n // 8: n // 4] = 0.0  # stopped gradients: v decays while m is still nonzero
    return grad


def _state_copy(st):
    return {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}


def _op_step(p, grad, st, lr, betas, eps, wd):
    st["step"] += 1
    torch.ops.lowbit.adamw8bit_step_(p, grad, st["exp_avg.qdata"], st["exp_avg.absmax"], st["exp_avg_sq.qdata"],
                                     st["exp_avg_sq.absmax"], state_codebook(8, True), state_codebook(8, False),
                                     st["step"], lr, betas[0], betas[1], eps, wd, st["block_size"])


@pytest.mark.parametrize("block_size", [256, 2048])
def test_reference_op_equals_optimizer_step_bit_for_bit(block_size):
    n = 3 * 4096 + 100  # a short last block
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n))
    opt = AdamW8bit([p], lr=1e-3, weight_decay=0.1, block_size=block_size)
    p.grad = _grads(n, 1)
    opt.step()  # state created and filled once by the optimizer
    q = p.detach().clone()
    st = _state_copy(opt.state[p])
    for k in range(2, 6):
        grad = _grads(n, k)
        p.grad = grad.clone()
        opt.step()
        _op_step(q, grad, st, 1e-3, (0.9, 0.999), 1e-8, 0.1)
        assert torch.equal(p.detach(), q)
        for name in ("exp_avg.qdata", "exp_avg.absmax", "exp_avg_sq.qdata", "exp_avg_sq.absmax"):
            assert torch.equal(opt.state[p][name], st[name]), name
    code_v = state_codebook(8, False)
    zero = code_v[st["exp_avg_sq.qdata"].long()] == 0
    assert not bool(zero[: n // 8].any())  # tiny nonzero v kept off the 0 code


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adamw8bit_on_cuda_runs_the_fused_kernel_and_equals_the_cpu_step():
    pytest.importorskip("triton")
    from lowbit.ops.triton import adam8

    n = 1 << 20
    torch.manual_seed(0)
    p0 = torch.randn(n)
    pc = torch.nn.Parameter(p0.clone())
    pg = torch.nn.Parameter(p0.clone().cuda())
    oc, og = AdamW8bit([pc], lr=1e-3, weight_decay=0.1), AdamW8bit([pg], lr=1e-3, weight_decay=0.1)
    calls = []
    real = adam8.adamw8bit_step_
    adam8.adamw8bit_step_ = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    code_v = state_codebook(8, False)
    try:
        for k in range(1, 5):  # each step from the same θ and state (the CUDA run's), so one step is compared
            if k > 1:
                pc.data.copy_(pg.detach().cpu())
                for key, val in og.state[pg].items():
                    oc.state[pc][key] = val.cpu().clone() if torch.is_tensor(val) else val
            grad = _grads(n, k)
            pc.grad, pg.grad = grad.clone(), grad.cuda()
            oc.step()
            og.step()
            assert (pg.detach().cpu() - pc.detach()).abs().max() < 1e-6
            for name in ("exp_avg.qdata", "exp_avg_sq.qdata"):
                d = (og.state[pg][name].cpu().int() - oc.state[pc][name].int()).abs()
                assert int(d.max()) <= 1 and int((d > 0).sum()) < n * 1e-3, name  # ties after FMA contraction
            for name in ("exp_avg.absmax", "exp_avg_sq.absmax"):
                torch.testing.assert_close(og.state[pg][name].cpu(), oc.state[pc][name], rtol=1e-4, atol=0)
            assert not bool((code_v[og.state[pg]["exp_avg_sq.qdata"].cpu().long()][: n // 8] == 0).any())
    finally:
        adam8.adamw8bit_step_ = real
    assert len(calls) == 4  # every CUDA step went through the fused kernel
