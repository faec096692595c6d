"""autograd.Functions over the Triton launchers of revglow.kernels.

Each forward launches the forward kernel and saves its OUTPUT (y, or ya and h), not its input; the backward
runs the reversible-backward kernel, which works from the output alone (the input it would rebuild is not
written: return_input=False). So the Triton path under plain autograd keeps one activation per op (the one
the next op keeps anyway, when it is the next op's input), and the backward reads it once.

Example (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)::

    x = torch.randn(2, 12, 5, 7, requires_grad=True)
    weight = torch.linalg.qr(torch.randn(12, 12))[0].requires_grad_()
    y = actnorm_conv1x1_triton(x, torch.ones(12), torch.zeros(12), weight, weight.detach().inverse())
    y.sum().backward()
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from revglow.kernels.actnorm_conv1x1 import actnorm_conv1x1_forward_launch
from revglow.kernels.actnorm_conv1x1_backward import actnorm_conv1x1_reversible_backward_launch
from revglow.kernels.coupling_affine import (
    coupling_affine_forward_launch,
    coupling_affine_reversible_backward_launch,
)

__all__ = ["ActNormConv1x1Triton", "CouplingAffineTriton", "actnorm_conv1x1_triton", "coupling_affine_triton"]


class ActNormConv1x1Triton(torch.autograd.Function):
    """y = W (s x + b). Gradients to x, scale, bias and weight; weight_inv is a constant derived from
    weight (used only to rebuild x in backward), so it gets none."""

    @staticmethod
    def forward(ctx, x, scale, bias, weight, weight_inv):
        y = actnorm_conv1x1_forward_launch(x, scale, bias, weight)
        ctx.save_for_backward(y, scale, bias, weight, weight_inv)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        y, scale, bias, weight, weight_inv = ctx.saved_tensors
        _, grad_x, grad_scale, grad_bias, grad_weight = actnorm_conv1x1_reversible_backward_launch(
            y, grad_y, scale, bias, weight, weight_inv, return_input=False)
        return (grad_x, grad_scale.to(scale.dtype), grad_bias.to(bias.dtype), grad_weight.to(weight.dtype), None)


class CouplingAffineTriton(torch.autograd.Function):
    """(ya, logdet) = affine coupling of xa by h. Gradients to xa and h (in h's dtype)."""

    @staticmethod
    def forward(ctx, xa, h):
        ya, logdet = coupling_affine_forward_launch(xa, h)
        ctx.save_for_backward(ya, h)
        return ya, logdet

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ya, grad_logdet):
        # Unused outputs arrive as zeros (autograd materializes them), so both are tensors here.
        ya, h = ctx.saved_tensors
        _, grad_xa, grad_h = coupling_affine_reversible_backward_launch(ya, h, grad_ya, grad_logdet,
                                                                        return_input=False)
        return grad_xa, grad_h.to(h.dtype)


def actnorm_conv1x1_triton(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor,
                           weight_inv: torch.Tensor) -> torch.Tensor:
    """Differentiable y = W (s * x + b) on the Triton kernels; x [N, C, H, W] float32."""
    return ActNormConv1x1Triton.apply(x, scale, bias, weight, weight_inv)


def coupling_affine_triton(xa: torch.Tensor, h: torch.Tensor):
    """Differentiable (ya, logdet [N]) of the affine coupling on the Triton kernels."""
    return CouplingAffineTriton.apply(xa, h)
