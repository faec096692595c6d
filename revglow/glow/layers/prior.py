"""Learned priors of the multi-scale architecture (paper, section 3 and the reference implementation).

Both priors are written as the last bijection to standard-normal latents: given a Gaussian with mean m and
log-scale l, eps = (z - m) * exp(-l) with logdet = -sum(l). So `Glow.encode` maps data all the way to
N(0, I) noise and log p(x) = sum log N(eps; 0, I) + total logdet, exactly.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from revglow.glow.config import check_logscale_factor
from revglow.glow.layers.conv import ZeroConv2d

__all__ = ["SplitPrior", "TopPrior"]


def _standardize(z, mean, log_scale):
    eps = (z - mean) * torch.exp(-log_scale)
    return eps, -log_scale.flatten(1).sum(1)


class SplitPrior(nn.Module):
    """Split x [N,C,H,W] into kept x[:, :C/2] and factored-out z = x[:, C/2:], with z ~ N(m, exp(l)^2) where
    (m, l) = conv(kept), a zero-initialized 3x3 convolution (so the prior starts as N(0, I)); with the reference
    implementation's options, edge-padded and with its output scaled by exp(f * logs) (revglow.glow.layers.conv)."""

    def __init__(self, channels: int, edge_padding: bool = False, logscale_factor: Optional[float] = None):
        super().__init__()
        self.kept = channels // 2
        self.conv = ZeroConv2d(self.kept, 2 * (channels - self.kept), 3, edge_padding=edge_padding,
                               logscale_factor=logscale_factor)

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
    class-dependent per-channel offset when `num_classes > 0` (zero-initialized linear map of the one-hot label).

    With `logscale_factor` f, each of the two is multiplied by exp(f * logs) per channel, `logs` starting at 0, as
    the reference implementation's zero-initialized layers are (`top_logs`, `class_logs`). The reference computes
    its learned top as a zero convolution of an all-zero input with the edge-padding channel, a function of the
    position's distance class to the border; the free per-position `top` here holds every such function, so it
    needs no edge padding.
    """

    def __init__(self, shape, learn_top: bool = True, num_classes: int = 0, logscale_factor: Optional[float] = None):
        super().__init__()
        c, h, w = shape
        self.shape = (c, h, w)
        self.num_classes = num_classes
        self.learn_top = learn_top
        self.logscale_factor = check_logscale_factor("TopPrior: logscale_factor", logscale_factor, allow_none=True)
        scaled = self.logscale_factor is not None
        if learn_top:
            self.top = nn.Parameter(torch.zeros(1, 2 * c, h, w))
            if scaled:
                self.top_logs = nn.Parameter(torch.zeros(1, 2 * c, 1, 1))
        if num_classes > 0:
            self.class_embedding = nn.Linear(num_classes, 2 * c)
            nn.init.zeros_(self.class_embedding.weight)
            nn.init.zeros_(self.class_embedding.bias)
            if scaled:
                self.class_logs = nn.Parameter(torch.zeros(2 * c))

    def _scaled(self, value, logs):
        return value if self.logscale_factor is None else value * torch.exp(logs * self.logscale_factor)

    def _params(self, n, y, like):
        c, h, w = self.shape
        out = torch.zeros(n, 2 * c, h, w, dtype=like.dtype, device=like.device)
        if self.learn_top:
            out = out + self._scaled(self.top, getattr(self, "top_logs", None)).to(like.dtype)
        if self.num_classes > 0:
            onehot = F.one_hot(y, self.num_classes).to(like.dtype)
            shift = self._scaled(self.class_embedding(onehot), getattr(self, "class_logs", None))
            out = out + shift.to(like.dtype).view(n, 2 * c, 1, 1)
        return out[:, 0::2], out[:, 1::2]

    def forward(self, z, y=None):
        """z -> (eps, logdet)."""
        mean, log_scale = self._params(z.shape[0], y, z)
        return _standardize(z, mean, log_scale)

    def inverse(self, eps, y=None):
        mean, log_scale = self._params(eps.shape[0], y, eps)
        return mean + torch.exp(log_scale) * eps, -log_scale.flatten(1).sum(1)
