"""The convolutions of Glow's coupling networks and priors, as the reference implementation writes them
(its `tfops.conv2d`, `conv2d_zeros` and `add_edge_padding`).

Edge padding: a 'same' convolution with a k x k kernel (k > 1) zero-pads its input by k // 2 on every side and
sees one extra input channel that is 1 on that padded border and 0 inside, so the network can tell a zero
pixel of the image from a pixel outside it.
    conv2d_same(x, w, b, edge_padding=True) = conv2d(cat(pad(x), border), w, b)       (w has C_in + 1 inputs)

Zero convolution (the last layer of every coupling network and prior): weights and bias start at zero, so the
layer starts as the identity map's shift; with a `logscale_factor` f its output is multiplied by exp(f * logs),
per output channel, `logs` starting at 0 (it changes how fast the optimizer can scale the output, not the map
at initialization).

The functions (`add_edge_padding`, `conv2d_same`, and the backward the fused coupling network uses) live in
revglow.ops.conv_same, which computes an edge-padded convolution without copying its input when the input is
the wider side. Both layers are nn.Conv2d subclasses holding `weight` and `bias` under the usual names, so the
state_dict keys of a model built without these options are those of plain nn.Conv2d layers.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from revglow.glow.config import check_logscale_factor
from revglow.ops.conv_same import add_edge_padding, conv2d_same

__all__ = ["add_edge_padding", "conv2d_same", "Conv2dSame", "ZeroConv2d"]


class Conv2dSame(nn.Conv2d):
    """A size-keeping convolution (odd kernel, stride 1) with optional edge padding (see the module docstring).

    Example:
        >>> conv = Conv2dSame(2, 4, 3, edge_padding=True)
        >>> conv.weight.shape, conv(torch.randn(1, 2, 5, 5)).shape
        (torch.Size([4, 3, 3, 3]), torch.Size([1, 4, 5, 5]))
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 edge_padding: bool = False):
        if kernel_size % 2 != 1:
            raise ValueError(f"Conv2dSame needs an odd kernel size; got {kernel_size}")
        self.edge_padding = bool(edge_padding) and kernel_size > 1
        super().__init__(in_channels + int(self.edge_padding), out_channels, kernel_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, self.weight, self.bias, self.edge_padding)


class ZeroConv2d(Conv2dSame):
    """A zero-initialized size-keeping convolution; with `logscale_factor` f its output is multiplied by
    exp(f * logs), one `logs` per output channel starting at 0 (the reference's conv2d_zeros, f = 3)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, edge_padding: bool = False,
                 logscale_factor: Optional[float] = None):
        super().__init__(in_channels, out_channels, kernel_size, bias=True, edge_padding=edge_padding)
        self.logscale_factor = check_logscale_factor("ZeroConv2d: logscale_factor", logscale_factor, allow_none=True)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        if self.logscale_factor is not None:
            self.logs = nn.Parameter(torch.zeros(out_channels))

    def output_scale(self) -> Optional[torch.Tensor]:
        """exp(f * logs) per output channel, or None without a log-scale factor."""
        if self.logscale_factor is None:
            return None
        return torch.exp(self.logs * self.logscale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        scale = self.output_scale()
        return out if scale is None else out * scale.view(1, -1, 1, 1)
