"""Learned priors of the multi-scale architecture (paper, section 3 and the reference implementation).

Both priors are written as the last bijection to standard-normal latents: given a Gaussian with mean m and
log-scale l, eps = (z - m) * exp(-l) with logdet = -sum(l). So `Glow.encode` maps data all the way to
N(0, I) noise and log p(x) = sum log N(eps; 0, I) + total logdet, exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SplitPrior", "TopPrior"]


def _standardize(z, mean, log_scale):
    eps = (z - mean) * torch.exp(-log_scale)
    return eps, -log_scale.flatten(1).sum(1)


class SplitPrior(nn.Module):
    """Split x [N,C,H,W] into kept x[:, :C/2] and factored-out z = x[:, C/2:], with z ~ N(m, exp(l)^2) where
    (m, l) = conv(kept), a zero-initialized 3x3 convolution (so the prior starts as N(0, I))."""

    def __init__(self, channels: int):
        super().__init__()
        self.kept = channels // 2
        self.conv = nn.Conv2d(self.kept, 2 * (channels - self.kept), 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def _params(self, kept):
        h = self.conv(kept).to(kept.dtype)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x):
        """x -> (kept, eps, logdet)."""
        kept, z = x[:, :self.kept], x[:, self.kept:]
        mean, log_scale = self._params(kept)
        eps, logdet = _standardize(z, mean, log_scale)
        return kept, eps, logdet

    def inverse(self, kept, eps):
        """(kept, eps) -> (x, logdet of the forward map)."""
        mean, log_scale = self._params(kept)
        z = mean + torch.exp(log_scale) * eps
        return torch.cat([kept, z], dim=1), -log_scale.flatten(1).sum(1)


class TopPrior(nn.Module):
    """Prior of the last level: learned per-position mean and log-scale (`learn_top`), zero at init, plus a
    class-dependent per-channel offset when `num_classes > 0` (zero-initialized linear map of the one-hot label)."""

    def __init__(self, shape, learn_top: bool = True, num_classes: int = 0):
        super().__init__()
        c, h, w = shape
        self.shape = (c, h, w)
        self.num_classes = num_classes
        self.learn_top = learn_top
        if learn_top:
            self.top = nn.Parameter(torch.zeros(1, 2 * c, h, w))
        if num_classes > 0:
            self.class_embedding = nn.Linear(num_classes, 2 * c)
            nn.init.zeros_(self.class_embedding.weight)
            nn.init.zeros_(self.class_embedding.bias)

    def _params(self, n, y, like):
        c, h, w = self.shape
        out = torch.zeros(n, 2 * c, h, w, dtype=like.dtype, device=like.device)
        if self.learn_top:
            out = out + self.top.to(like.dtype)
        if self.num_classes > 0:
            onehot = F.one_hot(y, self.num_classes).to(like.dtype)
            out = out + self.class_embedding(onehot).to(like.dtype).view(n, 2 * c, 1, 1)
        return out[:, 0::2], out[:, 1::2]

    def forward(self, z, y=None):
        """z -> (eps, logdet)."""
        mean, log_scale = self._params(z.shape[0], y, z)
        return _standardize(z, mean, log_scale)

    def inverse(self, eps, y=None):
        mean, log_scale = self._params(eps.shape[0], y, eps)
        return mean + torch.exp(log_scale) * eps, -log_scale.flatten(1).sum(1)
