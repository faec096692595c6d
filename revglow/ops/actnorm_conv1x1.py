"""Fused ActNorm + invertible 1x1 convolution: y = W (s * x + b) at every pixel.

Pure-PyTorch reference beside the dispatching entry points; Triton kernels live in kernels/actnorm_conv1x1.py
(forward, inverse) and kernels/actnorm_conv1x1_backward.py (reversible backward).
The reference is built from the two maps it fuses, `actnorm_reference` and `channel_mix`, which the unfused
layers (revglow.glow.layers.actnorm.ActNorm and the channel mixings) run too.

Shapes: x, y: [N, C, H, W]; scale s, bias b: [C]; weight W, weight_inv W^-1: [C, C].
The log-determinant, H*W*(sum log|s| + log|det W|), depends on parameters only and is computed by the
layer (it is small C x C work).

Reversible backward, derived (u = s*x + b is the ActNorm output, y = W u):
    u  = W^-1 y                  x  = (u - b) / s
    gu = W^T gy                  gx = s * gu
    gW = sum_{n,h,w} gy u^T      gs = sum_{n,h,w} gu * x      gb = sum_{n,h,w} gu
"""
from __future__ import annotations

import torch

from revglow.ops.compiled import maybe_compiled

__all__ = [
    "channel_mix", "invert_weight", "actnorm_reference", "actnorm_inverse_reference", "actnorm_conv1x1_reference", "actnorm_conv1x1_inverse_reference",
    "actnorm_conv1x1_reversible_backward_reference",
    "actnorm_conv1x1", "actnorm_conv1x1_inverse", "actnorm_conv1x1_reversible_backward",
]


def channel_mix(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a C x C matrix over the channel axis of [N, C, H, W]: out[n, :, h, w] = weight @ x[n, :, h, w].

    A batched matmul over [N, C, H*W] views, no permute (about twice as fast as einsum on the CPU)."""
    n, c, h, w = x.shape
    return torch.matmul(weight, x.reshape(n, c, h * w)).view(n, weight.shape[0], h, w)


def invert_weight(weight: torch.Tensor) -> torch.Tensor:
    """W^-1 computed in float64, in W's dtype. `inv_ex` does not check for singularity, so it never waits on the
    device; a singular W gives non-finite entries, which show as a non-finite gradient of the training step."""
    return torch.linalg.inv_ex(weight.detach().to(torch.float64))[0].to(weight.dtype)


def _channel_outer_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over n, h, w of a[n, :, h, w] b[n, :, h, w]^T, a C x C matrix."""
    n, c, h, w = a.shape
    return torch.matmul(a.reshape(n, c, h * w), b.reshape(n, c, h * w).transpose(1, 2)).sum(0)


def actnorm_reference(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """u = s * x + b per channel: ActNorm alone (revglow.glow.layers.actnorm.ActNorm runs this)."""
    return x * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def actnorm_inverse_reference(u: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x = (u - b) / s per channel."""
    return (u - bias.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1)


def actnorm_conv1x1_reference(x, scale, bias, weight):
    return channel_mix(weight, actnorm_reference(x, scale, bias))


def actnorm_conv1x1_inverse_reference(y, scale, bias, weight_inv):
    return actnorm_inverse_reference(channel_mix(weight_inv, y), scale, bias)


def actnorm_conv1x1_reversible_backward_reference(y, grad_y, scale, bias, weight, weight_inv):
    """From the output y and dL/dy: (x, dL/dx, dL/dscale, dL/dbias, dL/dweight), without autograd."""
    u = channel_mix(weight_inv, y)
    x = actnorm_inverse_reference(u, scale, bias)
    grad_u = channel_mix(weight.t(), grad_y)
    grad_x = grad_u * scale.view(1, -1, 1, 1)
    grad_weight = _channel_outer_sum(grad_y, u)
    grad_scale = (grad_u * x).sum(dim=(0, 2, 3))
    grad_bias = grad_u.sum(dim=(0, 2, 3))
    return x, grad_x, grad_scale, grad_bias, grad_weight


def actnorm_conv1x1(x, scale, bias, weight, weight_inv=None, backend: str = "torch", compile: bool = False):
    """Differentiable forward (plain autograd on the torch path). The Triton path's backward rebuilds its input
    with W^-1 (`weight_inv`; inverted from `weight` when not given, only when a graph is built)."""
    if backend == "triton":
        from revglow.ops._triton_functions import actnorm_conv1x1_triton
        if weight_inv is None and torch.is_grad_enabled():
            weight_inv = invert_weight(weight)
        return actnorm_conv1x1_triton(x, scale, bias, weight, weight_inv)
    return maybe_compiled(actnorm_conv1x1_reference, compile)(x, scale, bias, weight)


def actnorm_conv1x1_inverse(y, scale, bias, weight_inv, backend: str = "torch", compile: bool = False):
    if backend == "triton":
        from revglow.kernels.actnorm_conv1x1 import actnorm_conv1x1_inverse_launch
        return actnorm_conv1x1_inverse_launch(y, scale, bias, weight_inv)
    return maybe_compiled(actnorm_conv1x1_inverse_reference, compile)(y, scale, bias, weight_inv)


def actnorm_conv1x1_reversible_backward(y, grad_y, scale, bias, weight, weight_inv, backend: str = "torch",
                                        compile: bool = False):
    if backend == "triton":
        from revglow.kernels.actnorm_conv1x1_backward import actnorm_conv1x1_reversible_backward_launch
        return actnorm_conv1x1_reversible_backward_launch(y, grad_y, scale, bias, weight, weight_inv)
    return maybe_compiled(actnorm_conv1x1_reversible_backward_reference, compile)(y, grad_y, scale, bias, weight,
                                                                                  weight_inv)
