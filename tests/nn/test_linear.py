"""QuantLinear reads the tensors it holds at call time, however they were replaced since it was built."""

import torch
from torch import nn

from lowbit.formats.affine import IntAffine
from lowbit.formats.codebook import Codebook
from lowbit.nn.linear import QuantLinear


def _ref(m, x):
    return x @ m.dequantize().float().t()


def test_forward_and_qweight_follow_reassigned_buffers_and_parameters():
    torch.manual_seed(0)
    q = IntAffine(bits=4, group_size=64).quantize(torch.randn(48, 128))
    m = QuantLinear(q)
    x = torch.randn(3, 128)
    with torch.no_grad():
        y0 = m(x)
        assert torch.allclose(y0, _ref(m, x), rtol=1e-5, atol=1e-5)
        m.scale = m.scale * 2  # a new tensor assigned to a buffer's name: the buffer itself is replaced
        assert "scale" in m._buffers
        y1 = m(x)
        assert torch.allclose(y1, 2 * y0, rtol=1e-5, atol=1e-5)
        assert torch.equal(m.qweight["scale"], m.scale)
        m.scale = nn.Parameter(m.scale / 4, requires_grad=False)  # no longer a buffer: read as a parameter
        assert "scale" not in m._buffers
        y2 = m(x)
        assert torch.allclose(y2, 0.5 * y0, rtol=1e-5, atol=1e-5)
        assert torch.equal(m.qweight["scale"], m.scale)


def test_forward_follows_to_dtype_and_in_place_changes():
    torch.manual_seed(1)
    m = QuantLinear(Codebook("nf4", 64, True).quantize(torch.randn(32, 128)))
    x = torch.randn(2, 128)
    with torch.no_grad():
        y0 = m(x)
        m.absmax_scale.mul_(3)  # double-quantized absmax: its scale changed in place
        assert torch.allclose(m(x), _ref(m, x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(m(x), y0)
        m2 = m.to(torch.float64)  # floating buffers cast by Module._apply, which replaces them in _buffers
        assert m2.absmax_scale.dtype == torch.float64 and m2._buffers["absmax_scale"] is m2.absmax_scale
