"""Channel mixings (paper, section 3.2 and Table 1): invertible 1x1 convolution, plain and LU, and fixed
permutations (`reverse`, `shuffle`). Each exposes its C x C matrix so a fused ActNorm + 1x1 kernel can use it.

Every class offers:
    weight_matrix()     W, differentiable w.r.t. the parameters
    weight_inverse()    W^-1 as a constant, inverted in float64 from the current parameters on every call. It is
                        needed only by the inverse and the reversible backward (once per step and training step:
                        under 1% of a step, see benchmarks/step_time.py), and a cache could go stale through
                        `.data` edits or carry an inference-mode tensor into training
    logdet_per_pixel()  log|det W|, differentiable
    parameter_grads()   the parameters' gradients from dL/dW and dL/d log|det W|, in closed form (no graph)
which is all Glow's FlowStep uses: it runs ActNorm and the mixing as one fused op. `forward` and `inverse` here
are the unfused reference (`channel_mix`, the function the fused op's reference is built on), for tests and for
a mixing used on its own.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from revglow.engine.invertible import InvertibleModule, grads_for
from revglow.glow.layers.pixelwise import logdet_per_sample
from revglow.ops.actnorm_conv1x1 import channel_mix, invert_weight

__all__ = ["ChannelMixing", "InvConv1x1", "InvConv1x1LU", "FixedPermutation", "make_channel_mixing"]


def _random_rotation(channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    return q


class ChannelMixing(InvertibleModule):
    """y[n, :, h, w] = W x[n, :, h, w]; logdet = H * W * log|det W|."""

    def weight_matrix(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logdet_per_pixel(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_inverse(self) -> torch.Tensor:
        with torch.no_grad():
            return invert_weight(self.weight_matrix())

    def parameter_grads(self, grad_weight: torch.Tensor,
                        grad_logdet_per_pixel: torch.Tensor) -> Dict[nn.Parameter, torch.Tensor]:
        """{parameter: gradient} given dL/dW and dL/d logdet_per_pixel(). This generic version differentiates
        weight_matrix() and logdet_per_pixel() with autograd; subclasses give the closed form (the reversible
        backward of a flow step calls this once per step, and a nested autograd call costs more than the rest
        of the step's flow arithmetic)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return {}
        with torch.enable_grad():
            outputs = [self.weight_matrix(), self.logdet_per_pixel()]
        return grads_for(outputs, [grad_weight.to(outputs[0].dtype), grad_logdet_per_pixel.to(outputs[1].dtype)],
                         params)

    def forward(self, x):
        y = channel_mix(self.weight_matrix().to(x.dtype), x)
        return y, logdet_per_sample(self.logdet_per_pixel(), x)

    def inverse(self, y):
        x = channel_mix(self.weight_inverse().to(y.dtype), y)
        return x, logdet_per_sample(self.logdet_per_pixel(), y)


class InvConv1x1(ChannelMixing):
    """Plain invertible 1x1 convolution, initialized to a random rotation (log|det W| = 0 at init).

    log|det W| is computed with slogdet in float64, which stays accurate when W drifts far from orthogonal.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(_random_rotation(channels).to(torch.get_default_dtype()))

    def weight_matrix(self):
        return self.weight

    def logdet_per_pixel(self):
        return torch.linalg.slogdet(self.weight.to(torch.float64))[1].to(self.weight.dtype)

    def parameter_grads(self, grad_weight, grad_logdet_per_pixel):
        # d log|det W| / dW = W^-T
        if not self.weight.requires_grad:
            return {}
        with torch.no_grad():
            grad = grad_weight.to(self.weight.dtype) \
                + grad_logdet_per_pixel.to(self.weight.dtype) * self.weight_inverse().t()
        return {self.weight: grad}


class InvConv1x1LU(ChannelMixing):
    """LU-parametrized 1x1 convolution: W = P L (U + diag(sign * exp(log_s))), P fixed; log|det W| = sum(log_s).

    L is unit lower-triangular and U strictly upper-triangular (masks applied on every use), so log|det W|
    costs O(C) instead of O(C^3) (paper, section 3.2).
    """

    def __init__(self, channels: int):
        super().__init__()
        w = _random_rotation(channels)
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("sign_s", torch.sign(s).to(dtype))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels, dtype=dtype), -1))
        self.register_buffer("eye", torch.eye(channels, dtype=dtype))
        self.lower = nn.Parameter(lower.to(dtype))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dtype))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).to(dtype))

    def _factors(self):
        """(L, U's diagonal sign * exp(log_s), U): the masked triangular factors, W = P L U."""
        lower = self.lower * self.lower_mask + self.eye
        diagonal = self.sign_s * torch.exp(self.log_s)
        return lower, diagonal, self.upper * self.lower_mask.t() + torch.diag(diagonal)

    def weight_matrix(self):
        lower, _, upper = self._factors()
        return self.perm @ lower @ upper

    def logdet_per_pixel(self):
        return self.log_s.sum()

    def parameter_grads(self, grad_weight, grad_logdet_per_pixel):
        # W = P A B with A = L * mask + I, B = U * mask^T + diag(sign * exp(log_s)):
        # dL/dA = P^T G B^T, dL/dB = A^T P^T G (G = dL/dW); the masks and the diagonal pick the parameters' parts.
        with torch.no_grad():
            lower, diagonal, upper = self._factors()
            permuted = self.perm.t() @ grad_weight.to(self.lower.dtype)
            grad_lower = permuted @ upper.t()
            grad_upper = lower.t() @ permuted
            candidates = ((self.lower, grad_lower * self.lower_mask), (self.upper, grad_upper * self.lower_mask.t()),
                          (self.log_s, torch.diagonal(grad_upper) * diagonal
                           + grad_logdet_per_pixel.to(self.log_s.dtype)))
        return {p: g for p, g in candidates if p.requires_grad}


class FixedPermutation(ChannelMixing):
    """A fixed channel permutation, `reverse` or `shuffle` (seeded); log|det| = 0, no parameters."""

    def __init__(self, channels: int, kind: str, seed: int = 0):
        super().__init__()
        if kind == "reverse":
            order = torch.arange(channels - 1, -1, -1)
        elif kind == "shuffle":
            order = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        else:
            raise ValueError(f"unknown fixed permutation {kind!r}; choose 'reverse' or 'shuffle'")
        self.register_buffer("order", order)
        self.register_buffer("inverse_order", torch.argsort(order))

    def weight_matrix(self):
        return torch.eye(len(self.order), dtype=torch.get_default_dtype(), device=self.order.device)[self.order]

    def logdet_per_pixel(self):
        return torch.zeros((), device=self.order.device)

    def forward(self, x):
        return x[:, self.order], x.new_zeros(x.shape[0])

    def inverse(self, y):
        return y[:, self.inverse_order], y.new_zeros(y.shape[0])


def make_channel_mixing(kind: str, channels: int, seed: int = 0) -> ChannelMixing:
    if kind == "invconv_lu":
        return InvConv1x1LU(channels)
    if kind == "invconv":
        return InvConv1x1(channels)
    if kind in ("reverse", "shuffle"):
        return FixedPermutation(channels, kind, seed)
    raise ValueError(f"unknown permutation {kind!r}; choose 'invconv_lu', 'invconv', 'shuffle' or 'reverse'")
