"""Paged optimizer state on CUDA: pinned CPU storage between steps, results identical to non-paged."""

from __future__ import annotations

import io

import pytest
import torch

from lowbit import optim as lo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _pair(shape=(1024, 512), n=2):
    torch.manual_seed(0)
    p0 = torch.randn(shape, device="cuda") * 0.1
    return [torch.nn.Parameter(p0.clone()) for _ in range(n)]


@pytest.mark.parametrize("paged_cls,plain_cls", [(lo.PagedAdamW8bit, lo.AdamW8bit), (lo.PagedAdamW, lo.AdamW),
                                                 (lo.PagedLion8bit, lo.Lion8bit), (lo.PagedAdamW4bit, lo.AdamW4bit)])
def test_paged_state_lives_in_pinned_cpu_memory_and_matches_plain(paged_cls, plain_cls):
    a, b = _pair()
    small = torch.nn.Parameter(torch.randn(64, 128, device="cuda"))  # < PAGE_MIN_NUMEL: stays on the GPU
    paged, plain = paged_cls([a, small]), plain_cls([b])
    for step in range(5):
        g = torch.randn_like(a) * 0.01
        a.grad, b.grad, small.grad = g.clone(), g.clone(), torch.randn_like(small)
        paged.step()
        plain.step()
        for k, v in paged.state[a].items():
            if isinstance(v, torch.Tensor):
                assert v.device.type == "cpu" and v.is_pinned(), k
                assert torch.equal(v, plain.state[b][k].cpu()), k
        assert torch.equal(a, b)
    assert all(v.device.type == "cuda" for v in paged.state[small].values() if isinstance(v, torch.Tensor))


def test_paged_state_dict_round_trip_on_cuda():
    a, b = _pair()
    ref, run = lo.PagedAdamW8bit([a]), lo.PagedAdamW8bit([b])
    for step in range(3):
        g = torch.randn_like(a) * 0.01
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        run.step()
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)
    buf.seek(0)
    run = lo.PagedAdamW8bit([b])
    run.load_state_dict(torch.load(buf))
    assert run.state[b]["exp_avg.qdata"].is_pinned()
    for step in range(3):
        g = torch.randn_like(a) * 0.01
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        run.step()
    assert torch.equal(a, b)


def test_cuda_8bit_matches_cpu_8bit_closely():
    torch.manual_seed(0)
    p0 = torch.randn(512, 512) * 0.1
    gpu = torch.nn.Parameter(p0.cuda())
    cpu = torch.nn.Parameter(p0.clone())
    og, oc = lo.AdamW8bit([gpu]), lo.AdamW8bit([cpu])
    for _ in range(10):
        g = torch.randn(512, 512) * 0.01
        gpu.grad, cpu.grad = g.cuda(), g.clone()
        og.step()
        oc.step()
    assert (gpu.cpu() - cpu).abs().mean() < 1e-6


def test_nonfinite_gradient_skip_on_cuda():
    (a,) = _pair(n=1)
    opt = lo.PagedAdamW8bit([a])
    before = a.detach().clone()
    a.grad = torch.randn_like(a)
    a.grad[0, 0] = float("nan")
    opt.step()
    assert torch.equal(a, before) and opt.skipped == 1
