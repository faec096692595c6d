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
caller that has already freed x needs). Each input channel's gradient reads only its own slice of w, so
`conv2d_same_input_grad` computes dL/dx for a slice of the input channels, or of the batch, at a time (what a
caller that writes the gradient into storage it frees piece by piece needs).

Every function takes NCHW tensors stored either way, plain (contiguous) or channels_last ([N, H, W, C] in memory,
torch.channels_last), and answers in the layout it was given. In channels_last a 1x1 convolution is one matrix
product over the pixels, [N * H * W, C] @ [C, O], and so are its gradients (`_pixels` views the tensor so).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["add_edge_padding", "border_indicator", "conv1x1", "conv2d_same", "conv2d_same_backward",
           "conv2d_same_input_grad", "stored_channels_last"]

CHANNELS_LAST = torch.channels_last


def stored_channels_last(t: torch.Tensor) -> bool:
    """Whether the 4-d t is channels_last and not also plain contiguous (a tensor with one channel or one pixel per
    sample is both; such a tensor takes the plain paths, which read the same memory)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=CHANNELS_LAST)


def border_indicator(height: int, width: int, pad: int, like: torch.Tensor) -> torch.Tensor:
    """[1, 1, height + 2 pad, width + 2 pad]: 1 on the padded ring, 0 inside (like's dtype and device)."""
    return F.pad(like.new_zeros(1, 1, height, width), (pad, pad, pad, pad), value=1.0)


def add_edge_padding(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x [N, C, H, W] zero-padded by `pad` on each side, with one more channel that is 1 on the padded border and 0
    inside: [N, C + 1, H + 2 pad, W + 2 pad]."""
    n, c, h, w = x.shape
    border = border_indicator(h, w, pad, x)
    if stored_channels_last(x):   # cat would answer in NCHW; a pad of the channels too keeps channels_last
        padded = F.pad(x, (pad, pad, pad, pad, 0, 1))
        padded[:, c:] = border
        return padded
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


def _batched(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] (contiguous) as [N, C, H * W], a view."""
    return t.view(t.shape[0], t.shape[1], -1)


def _pixels(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] stored channels_last as [N * H * W, C], a view."""
    return t.permute(0, 2, 3, 1).view(-1, t.shape[1])


def _from_pixels(m: torch.Tensor, shape) -> torch.Tensor:
    """`_pixels`' inverse: [N * H * W, C] (contiguous) as the channels_last [N, C, H, W] of `shape`, a view."""
    n, c, h, w = shape
    return m.view(n, h, w, c).permute(0, 3, 1, 2)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.conv2d(x, weight, bias) for a 1x1 kernel: per sample a matrix product, computed as one (baddbmm, the
    weight broadcast over the batch). On the CPU that runs 1.4-2x faster than the convolution with 2 threads,
    from 4x4 at batch 16 to 128x128 at width 512 (benchmarks/test_ops.py, coupling_network-*), and so do the
    gradients `conv2d_same_backward` computes for a 1x1 kernel. A channels_last x is one matrix product over its
    pixels (addmm), the output channels_last too. A strided x takes F.conv2d.

    Example:
        >>> x, w, b = torch.randn(2, 3, 4, 5), torch.randn(6, 3, 1, 1), torch.randn(6)
        >>> torch.allclose(conv1x1(x, w, b), F.conv2d(x, w, b), atol=1e-6)
        True
    """
    if weight.shape[-2:] != (1, 1):
        raise ValueError(f"conv1x1: a 1x1 kernel expected; got {tuple(weight.shape[-2:])}")
    if stored_channels_last(x):
        matrix = weight.flatten(1).t()
        out = _pixels(x) @ matrix if bias is None else torch.addmm(bias, _pixels(x), matrix)
        return _from_pixels(out, (x.shape[0], weight.shape[0], *x.shape[2:]))
    if not x.is_contiguous() or x.dim() != 4:
        return F.conv2d(x, weight, bias)
    n, _, h, w = x.shape
    matrix = weight.flatten(1).expand(n, -1, -1)
    out = torch.bmm(matrix, _batched(x)) if bias is None else torch.baddbmm(bias.view(1, -1, 1), matrix, _batched(x))
    return out.view(n, weight.shape[0], h, w)


def _conv_backward(grad, x, weight, padding: int, input_grad: bool, weight_grad: bool):
    return torch.ops.aten.convolution_backward(grad, x, weight, None, (1, 1), (padding, padding), (1, 1), False,
                                               (0, 0), 1, (input_grad, weight_grad, False))[:2]


def conv2d_same_input_grad(grad: torch.Tensor, x: Union[torch.Tensor, torch.Size, Tuple[int, ...]],
                           weight: torch.Tensor, channels: Optional[slice] = None) -> torch.Tensor:
    """dL/dx[:, channels] of out = conv2d_same(x, weight, bias, edge_padding) given dL/dout (channels None: all of
    x's): conv_transpose(grad, weight[:, channels]) with zero padding k // 2, in both edge-padding forms (the
    border channel, weight[:, C:], has no input gradient). A slice of the batch: pass grad[n0:n1].

    `x` stands for the input with the shape of the slice asked for; its values are never read. A tensor stored
    as grad is (contiguous, or channels_last) is used as it is (the input itself, or any storage of that size);
    given a shape or another view, an uninitialized tensor in grad's layout stands in (the convolution's layout
    follows its input's, and grad's would otherwise be copied to it). (torch.nn.grad.conv2d_input's stand-in, an
    expanded scalar, is copied to full size on the CPU: a wide transient and a third of the call's time.
    conv_transpose2d needs none but picks its CPU backend by other rules than the convolution's, and its fallback
    is several times slower at small batches.) A 1x1 kernel's input gradient is a matrix product (see conv1x1),
    which needs no stand-in.

    Example:
        >>> x, w = torch.randn(2, 4, 5, 5, requires_grad=True), torch.randn(3, 5, 3, 3)
        >>> g = torch.randn(2, 3, 5, 5)
        >>> full, = torch.autograd.grad(conv2d_same(x, w, None, True), x, g)
        >>> torch.allclose(conv2d_same_input_grad(g, (2, 2, 5, 5), w, slice(2, 4)), full[:, 2:4], atol=1e-5)
        True
    """
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)
    weight = weight[:, slice(0, shape[1]) if channels is None else channels]
    if weight.shape[1] != shape[1]:
        raise ValueError(f"conv2d_same_input_grad: an input of {shape[1]} channels, but the weight's slice "
                         f"{channels} has {weight.shape[1]}")
    if weight.shape[-1] == 1 and grad.is_contiguous():
        # a 1x1 convolution's is a matrix product per sample: one bmm, the weight broadcast over the batch (not
        # torch.matmul, which may fold the batch into a transposed copy of grad)
        return torch.bmm(weight.flatten(1).t().expand(shape[0], -1, -1), _batched(grad)).view(shape)
    layout = CHANNELS_LAST if stored_channels_last(grad) else torch.contiguous_format
    if weight.shape[-1] == 1 and layout is CHANNELS_LAST:   # [N * H * W, O] @ [O, C]
        return _from_pixels(_pixels(grad) @ weight.flatten(1), shape)
    if not isinstance(x, torch.Tensor) or not x.is_contiguous(memory_format=layout):
        x = torch.empty(shape, dtype=grad.dtype, device=grad.device, memory_format=layout)
    return _conv_backward(grad, x, weight, weight.shape[-1] // 2, True, False)[0]


def conv2d_same_backward(grad: torch.Tensor, x: Union[torch.Tensor, torch.Size], weight: torch.Tensor,
                         edge_padding: bool, input_grad: bool = True, weight_grad: bool = True
                         ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dL/dx, dL/dweight) of out = conv2d_same(x, weight, bias, edge_padding) given dL/dout, each None unless
    asked for (dL/dbias is grad.sum((0, 2, 3))). `x` may be its shape alone when only dL/dx is asked for."""
    if not weight_grad:
        return (conv2d_same_input_grad(grad, x, weight) if input_grad else None), None
    if not isinstance(x, torch.Tensor):
        raise ValueError("conv2d_same_backward: the weight gradient needs the input itself, not its shape")
    pad = weight.shape[-1] // 2
    if pad == 0 and grad.is_contiguous() and x.is_contiguous():   # 1x1: matrix products, as in conv1x1
        grad_w = torch.bmm(_batched(grad), _batched(x).transpose(1, 2)).sum(0).view(weight.shape)
        return (conv2d_same_input_grad(grad, x, weight) if input_grad else None), grad_w
    if pad == 0 and stored_channels_last(grad) and stored_channels_last(x):   # [O, N * H * W] @ [N * H * W, C]
        grad_w = (_pixels(grad).t() @ _pixels(x)).view(weight.shape)
        return (conv2d_same_input_grad(grad, x, weight) if input_grad else None), grad_w
    if pad == 0 or not edge_padding:
        return _conv_backward(grad, x, weight, pad, input_grad, True)
    n, c, h, w = x.shape
    if _border_added_to_output(c, weight.shape[0]):
        grad_x, grad_w = _conv_backward(grad, x, weight[:, :c], pad, input_grad, True)
        border = border_indicator(h, w, pad, grad)
        _, grad_w_border = _conv_backward(grad.sum(0, keepdim=True), border, weight[:, c:], 0, False, True)
        return grad_x, torch.cat([grad_w, grad_w_border], dim=1)
    grad_padded, grad_w = _conv_backward(grad, add_edge_padding(x, pad), weight, 0, input_grad, True)
    grad_x = grad_padded[:, :c, pad:pad + h, pad:pad + w] if input_grad else None
    return grad_x, grad_w
