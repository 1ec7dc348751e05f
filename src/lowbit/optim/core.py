"""Update rules of the optimizers, in fp32, shared by the 32-bit, 8-bit, 4-bit and paged variants.

Every rule updates its arguments in place and knows nothing about how the state is stored: the driver in
:mod:`lowbit.optim.base` dequantizes the state, calls the rule, and quantizes the state again
("dequantize -> fp32 update -> requantize", arXiv 2110.02861 Sec. 2).

Symbols:

| symbol | meaning |
|--------|---------|
| θ      | parameter, updated in place (fp32) |
| g      | gradient (fp32) |
| m      | first moment / momentum buffer (Adam, Lion, SGD) |
| v      | second moment (Adam) |
| t      | step number, 1-based |
| η      | learning rate ``lr`` |
| β1, β2 | decay rates ``betas`` (SGD: β1 = ``momentum``) |
| ε      | ``eps`` |
| λ      | ``weight_decay`` |

References: Adam (Kingma & Ba, arXiv 1412.6980, Alg. 1, with the bias correction folded into η as in
torch.optim.Adam); AdamW (Loshchilov & Hutter, arXiv 1711.05101, Alg. 2: decoupled decay θ ← θ(1 − ηλ));
Lion (Chen et al., arXiv 2302.06675, Alg. 2); SGD with momentum as in torch.optim.SGD.
"""

from __future__ import annotations

import math

import torch

__all__ = ["adam_rule", "lion_rule", "sgd_rule"]


def adam_rule(θ: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, t: int, lr: float,
              β1: float, β2: float, ε: float, λ: float, decoupled: bool) -> None:
    """One Adam (``decoupled=False``, L2 decay added to g) or AdamW (``decoupled=True``) step.

    m ← β1 m + (1 − β1) g;  v ← β2 v + (1 − β2) g²;
    θ ← θ − η/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε).
    """
    if λ != 0.0 and not decoupled:
        g = g.add(θ, alpha=λ)
    m.mul_(β1).add_(g, alpha=1.0 - β1)
    v.mul_(β2).addcmul_(g, g, value=1.0 - β2)
    if λ != 0.0 and decoupled:
        θ.mul_(1.0 - lr * λ)
    denom = (v.sqrt() / math.sqrt(1.0 - β2**t)).add_(ε)
    θ.addcdiv_(m, denom, value=-lr / (1.0 - β1**t))


def lion_rule(θ: torch.Tensor, g: torch.Tensor, m: torch.Tensor, *, lr: float, β1: float, β2: float,
              λ: float) -> None:
    """One Lion step: θ ← θ(1 − ηλ) − η sign(β1 m + (1 − β1) g);  m ← β2 m + (1 − β2) g."""
    if λ != 0.0:
        θ.mul_(1.0 - lr * λ)
    θ.add_(m.mul(β1).add_(g, alpha=1.0 - β1).sign_(), alpha=-lr)
    m.mul_(β2).add_(g, alpha=1.0 - β2)


def sgd_rule(θ: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None, *, t: int, lr: float, β1: float,
             dampening: float, λ: float, nesterov: bool) -> None:
    """One SGD step with momentum β1 (``m`` is None when β1 = 0), as torch.optim.SGD.

    g ← g + λθ;  m ← g at t = 1, else β1 m + (1 − dampening) g;
    θ ← θ − η (g + β1 m) with Nesterov, else θ − η m.
    """
    if λ != 0.0:
        g = g.add(θ, alpha=λ)
    if m is None:
        θ.add_(g, alpha=-lr)
        return
    if t == 1:
        m.copy_(g)
    else:
        m.mul_(β1).add_(g, alpha=1.0 - dampening)
    θ.add_(g.add(m, alpha=β1) if nesterov else m, alpha=-lr)
