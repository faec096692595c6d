"""Size-keeping convolutions with the reference implementation's edge padding, forward and backward.

Edge padding (openai/glow `add_edge_padding`): a k x k convolution (k = 2p + 1 > 1) zero-pads its input by p on
every side and sees one more input channel, the border indicator B, 1 on the padded ring and 0 inside:
    conv2d_same(x, w, b) = conv2d(cat(pad(x), B), w, b)                           (w: [O, C + 1, k, k])
                         = conv2d(x, w[:, :C], b, padding=p) + conv2d(B, w[:, C:])  (B: [1, 1, H + 2p, W + 2p])
The second form never copies x: the border's contribution is a [1, O, H, W] map broadcast over the batch. It
is the cheaper one when the input is the wider side (the last layer of a coupling network reads 512 channels
and writes a handful); the first is cheaper when the output is (the first layer reads a few channels and writes
512). Both are exact; `conv2d_same` picks by channel count, and autograd through the second form saves x
itself rather than a padded copy of it.

Backward (stride 1), with g = dL/dout and the same two forms:
    dL/dw[:, :C] = corr(g, x) (zero padding p)     dL/dw[:, C:] = corr(sum_n g_n, B)     dL/db = sum_{n,h,w} g
    dL/dx = conv_transpose(g, w[:, :C]) (padding p)
`conv2d_same_backward` computes the parts asked for; given only x's shape it computes dL/dx alone (what a
caller that has already freed x needs).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["add_edge_padding", "border_indicator", "conv2d_same", "conv2d_same_backward"]


def border_indicator(height: int, width: int, pad: int, like: torch.Tensor) -> torch.Tensor:
    """[1, 1, height + 2 pad, width + 2 pad]: 1 on the padded ring, 0 inside (like's dtype and device)."""
    return F.pad(like.new_zeros(1, 1, height, width), (pad, pad, pad, pad), value=1.0)


def add_edge_padding(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x [N, C, H, W] zero-padded by `pad` on each side, with one more channel that is 1 on the padded border and 0
    inside: [N, C + 1, H + 2 pad, W + 2 pad]."""
    n, _, h, w = x.shape
    border = border_indicator(h, w, pad, x)
    return torch.cat([F.pad(x, (pad, pad, pad, pad)), border.expand(n, -1, -1, -1)], dim=1)


def _border_added_to_output(in_channels: int, out_channels: int) -> bool:
    # Copy (pad and concatenate) whichever side is narrower: the input, or the border's [1, O, H, W] map.
    return in_channels >= out_channels


def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                edge_padding: bool) -> torch.Tensor:
    """Convolution with an odd square kernel and stride 1 keeping H x W; zero padding, or edge padding (the weight
    then has one more input channel, for the border)."""
    pad = weight.shape[-1] // 2
    if pad == 0:
        return F.conv2d(x, weight, bias)
    if not edge_padding:
        return F.conv2d(x, weight, bias, padding=pad)
    c = x.shape[1]
    # Under torch.compile always the sum form: inductor (torch 2.13) fails to lower the padded concatenation once
    # the shapes turn dynamic ("ValueRangeError: Invalid ranges [0:-1]"); the sum form lowers, at the cost of one
    # [1, O, H, W] border map per layer where the output is the wider side.
    if torch.compiler.is_compiling() or _border_added_to_output(c, weight.shape[0]):
        border = border_indicator(x.shape[2], x.shape[3], pad, x)
        return F.conv2d(x, weight[:, :c], bias, padding=pad) + F.conv2d(border, weight[:, c:])
    return F.conv2d(add_edge_padding(x, pad), weight, bias)


def _conv_backward(grad, x, weight, padding: int, input_grad: bool, weight_grad: bool):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, (1, 1), (padding, padding), (1, 1), False,
                                               (0, 0), 1, (input_grad, weight_grad, False))[:2]


def conv2d_same_backward(grad: torch.Tensor, x: Union[torch.Tensor, torch.Size], weight: torch.Tensor,
                         edge_padding: bool, input_grad: bool = True, weight_grad: bool = True
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dL/dx, dL/dweight) of out = conv2d_same(x, weight, bias, edge_padding) given dL/dout, each None unless
    asked for (dL/dbias is grad.sum((0, 2, 3))). `x` may be its shape alone when only dL/dx is asked for."""
    if not isinstance(x, torch.Tensor):
        if weight_grad:
            raise ValueError("conv2d_same_backward: the weight gradient needs the input itself, not its shape")
        x = grad.new_empty(1).expand(tuple(x))   # convolution_backward reads only the shape (as F.grad does)
    pad = weight.shape[-1] // 2
    if not input_grad and not weight_grad:
        return None, None
    if pad == 0 or not edge_padding:
        return _conv_backward(grad, x, weight, pad, input_grad, weight_grad)
    n, c, h, w = x.shape
    if _border_added_to_output(c, weight.shape[0]):
        grad_x, grad_w = _conv_backward(grad, x, weight[:, :c], pad, input_grad, weight_grad)
        if weight_grad:
            border = border_indicator(h, w, pad, grad)
            _, grad_w_border = _conv_backward(grad.sum(0, keepdim=True), border, weight[:, c:], 0, False, True)
            grad_w = torch.cat([grad_w, grad_w_border], dim=1)
        return grad_x, grad_w
    padded = add_edge_padding(x, pad) if weight_grad else grad.new_empty(1).expand(n, c + 1, h + 2 * pad,
                                                                                    w + 2 * pad)
    grad_padded, grad_w = _conv_backward(grad, padded, weight, 0, input_grad, weight_grad)
    grad_x = grad_padded[:, :c, pad:pad + h, pad:pad + w] if input_grad else None
    return grad_x, grad_w
