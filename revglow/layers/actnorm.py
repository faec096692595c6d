"""ActNorm (paper, section 3.1): a per-channel affine map y = s * x + b with data-dependent initialization."""
from __future__ import annotations

import torch
from torch import nn

from revglow.layers.base import InvertibleModule

__all__ = ["ActNorm"]


class ActNorm(InvertibleModule):
    """y = exp(log_scale) * x + bias, per channel; logdet = H * W * sum(log_scale).

    On its first forward (or on `initialize_from(x)`) the scale and bias are set so that the output has zero
    mean and unit variance per channel on that batch. Whether that has happened is the buffer `initialized`,
    which lives in the state_dict, so a loaded model never re-initializes.

    Example:
        >>> layer = ActNorm(3)
        >>> y, logdet = layer(torch.randn(4, 3, 5, 5) * 2 + 1)
        >>> bool(layer.initialized)
        True
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Data-dependent init: zero mean, unit variance per channel of the output on this batch."""
        x = x.detach().to(torch.float64)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), unbiased=False)
        log_scale = -torch.log(std + self.eps)
        self.log_scale.copy_(log_scale.to(self.log_scale.dtype))
        self.bias.copy_((-mean * torch.exp(log_scale)).to(self.bias.dtype))
        self.initialized.fill_(True)

    def scale(self) -> torch.Tensor:
        return torch.exp(self.log_scale)

    def logdet_per_pixel(self) -> torch.Tensor:
        return self.log_scale.sum()

    def _logdet(self, x: torch.Tensor) -> torch.Tensor:
        return (self.logdet_per_pixel() * (x.shape[2] * x.shape[3])).expand(x.shape[0])

    def forward(self, x):
        if not self.is_initialized:
            self.initialize_from(x)
        y = x * self.scale().view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y, self._logdet(x)

    def inverse(self, y):
        if not self.is_initialized:
            raise RuntimeError("ActNorm is not initialized: run a forward pass on data (or Glow.initialize) first")
        x = (y - self.bias.view(1, -1, 1, 1)) / self.scale().view(1, -1, 1, 1)
        return x, self._logdet(y)
