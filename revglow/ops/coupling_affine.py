"""Coupling transforms of the transformed half xa, given the network output h of the untouched half.

Pure-PyTorch reference beside the dispatching entry points; Triton kernels live in kernels/coupling_affine.py.

Affine: h: [N, 2*Ca, H, W] with shift = h[:, :Ca], raw = h[:, Ca:], s = sigmoid(raw + 2) (bounded in (0, 1),
as the reference implementation does, so a step can only contract):
    ya = (xa + shift) * s          logdet = sum of log s over C, H, W  (per sample, shape [N])
    xa = ya / s - shift
Reversible backward, derived (using ya directly, so nothing but ya and h is read):
    gxa = s * gya      gshift = gxa      graw = (gya * ya + glogdet) * (1 - s)
    (d log s / d raw = 1 - s;  d ya / d raw = (xa + shift) * s * (1 - s) = ya * (1 - s))
Additive: h: [N, Ca, H, W], ya = xa + h, logdet = 0; gxa = gh = gya.

h may be bfloat16 (coupling network under autocast); everything is computed in float32 or wider.

The references take the split dimension `dim` (1 above: channels; any non-batch dimension of a tensor of any rank,
e.g. the last of token-major [N, T, D]); the Triton kernels serve the image case, [N, C, H, W] split on dim 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from revglow.ops.compiled import maybe_compiled

__all__ = [
    "coupling_affine_reference", "coupling_affine_inverse_reference",
    "coupling_affine_reversible_backward_reference",
    "coupling_affine", "coupling_affine_inverse", "coupling_affine_reversible_backward",
    "coupling_additive", "coupling_additive_inverse", "coupling_additive_reversible_backward",
    "couple", "couple_reversible_backward",
]


def _split_h(xa: torch.Tensor, h: torch.Tensor, dim: int):
    h = h.to(xa.dtype)
    ca = xa.shape[dim]
    return h.narrow(dim, 0, ca), h.narrow(dim, ca, h.shape[dim] - ca)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, 1, ..., 1], broadcasting over `like`, in like's dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def coupling_affine_reference(xa, h, dim: int = 1):
    shift, raw = _split_h(xa, h, dim)
    ya = (xa + shift) * torch.sigmoid(raw + 2.0)
    logdet = F.logsigmoid(raw + 2.0).flatten(1).sum(1)   # over every non-batch dimension
    return ya, logdet


def coupling_affine_inverse_reference(ya, h, dim: int = 1):
    """Returns (xa, logdet of the forward map)."""
    shift, raw = _split_h(ya, h, dim)
    xa = ya / torch.sigmoid(raw + 2.0) - shift
    logdet = F.logsigmoid(raw + 2.0).flatten(1).sum(1)
    return xa, logdet


def coupling_affine_reversible_backward_reference(ya, h, grad_ya, grad_logdet, dim: int = 1):
    """From ya, h, dL/dya and dL/dlogdet [N]: (xa, dL/dxa, dL/dh) with dL/dh in h's layout and dtype ya's."""
    shift, raw = _split_h(ya, h, dim)
    s = torch.sigmoid(raw + 2.0)
    one_minus_s = torch.sigmoid(-(raw + 2.0))  # = 1 - s without the cancellation when s is close to 1
    xa = ya / s - shift
    grad_xa = grad_ya * s
    grad_raw = (grad_ya * ya + _per_sample(grad_logdet, ya)) * one_minus_s
    return xa, grad_xa, torch.cat([grad_xa, grad_raw], dim=dim)


def _check_kernel_layout(xa: torch.Tensor, dim: int) -> None:
    if xa.dim() != 4 or dim != 1:
        raise ValueError(f"the Triton coupling kernels serve [N, C, H, W] split on dim 1; got a {xa.dim()}-dim "
                         f"input split on dim {dim} (use backend='torch')")


def coupling_affine(xa, h, backend: str = "torch", out=None, dim: int = 1):
    """Differentiable forward: (ya, logdet). With `out` (Triton, outside autograd only), ya is written into it,
    e.g. into the coupled half of the step's output, in place of a torch.cat."""
    if backend == "triton" or out is not None:
        _check_kernel_layout(xa, dim)
    if out is not None:
        from revglow.kernels.coupling_affine import coupling_affine_forward_launch
        return coupling_affine_forward_launch(xa, h, out=out)
    if backend == "triton":
        from revglow.ops._triton_functions import coupling_affine_triton
        return coupling_affine_triton(xa, h)
    return coupling_affine_reference(xa, h, dim)


def coupling_affine_inverse(ya, h, backend: str = "torch", out=None, dim: int = 1):
    if backend == "triton" or out is not None:
        _check_kernel_layout(ya, dim)
        from revglow.kernels.coupling_affine import coupling_affine_inverse_launch
        return coupling_affine_inverse_launch(ya, h, out=out)
    return coupling_affine_inverse_reference(ya, h, dim)


def coupling_affine_reversible_backward(ya, h, grad_ya, grad_logdet, backend: str = "torch", out_xa=None,
                                        out_grad_xa=None, dim: int = 1):
    """(xa, dL/dxa, dL/dh). With `out_xa` / `out_grad_xa` (Triton only) xa and dL/dxa are written into them."""
    if backend == "triton" or out_xa is not None or out_grad_xa is not None:
        _check_kernel_layout(ya, dim)
        from revglow.kernels.coupling_affine import coupling_affine_reversible_backward_launch
        return coupling_affine_reversible_backward_launch(ya, h, grad_ya, grad_logdet, out_xa=out_xa,
                                                          out_grad_xa=out_grad_xa)
    return coupling_affine_reversible_backward_reference(ya, h, grad_ya, grad_logdet, dim)


# Additive coupling is the s = 1 special case; it is a single add, which eager PyTorch already does in
# one pass, so it has no kernel of its own (and no layout of its own: elementwise, any dim).
def coupling_additive(xa, h, backend: str = "torch", dim: int = 1):
    return xa + h.to(xa.dtype), xa.new_zeros(xa.shape[0])


def coupling_additive_inverse(ya, h, backend: str = "torch", dim: int = 1):
    return ya - h.to(ya.dtype), ya.new_zeros(ya.shape[0])


def coupling_additive_reversible_backward(ya, h, grad_ya, grad_logdet, backend: str = "torch", dim: int = 1):
    return ya - h.to(ya.dtype), grad_ya, grad_ya


# ---------------------------------------------------------------------- whole coupling (both halves)
_TRANSFORMS = {
    "affine": (coupling_affine, coupling_affine_inverse, coupling_affine_reversible_backward),
    "additive": (coupling_additive, coupling_additive_inverse, coupling_additive_reversible_backward),
}


def _in_place(kind: str, backend: str) -> bool:
    # Only the affine Triton kernels take `out=`; the additive transform is one eager add.
    return backend == "triton" and kind == "affine"


def couple(x, h, channels_b: int, kind: str = "affine", backend: str = "torch", inverse: bool = False,
           compile: bool = False, dim: int = 1):
    """(cat(x_b, T(x_a; h)), logdet of T) with x_b the first `channels_b` entries of x along `dim` (a non-batch
    dimension, 1 by default) and x_a the rest, or T^-1 with `inverse=True`.

    Outside autograd the Triton kernel writes the transformed half straight into the output, in place of a
    torch.cat (one read and one write of it fewer). `compile` runs the torch path under torch.compile."""
    builds_graph = torch.is_grad_enabled() and (x.requires_grad or h.requires_grad)
    if _in_place(kind, backend) and not builds_graph:
        _check_kernel_layout(x, dim)
        forward, backward_map, _ = _TRANSFORMS[kind]
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        out[:, :channels_b].copy_(x[:, :channels_b])
        _, logdet = (backward_map if inverse else forward)(x[:, channels_b:], h, backend, out=out[:, channels_b:])
        return out, logdet
    return maybe_compiled(_couple_by_cat, compile and backend == "torch")(x, h, channels_b, kind, inverse, backend,
                                                                          dim)


def _couple_by_cat(x, h, channels_b: int, kind: str, inverse: bool, backend: str, dim: int):
    forward, backward_map, _ = _TRANSFORMS[kind]
    width = x.shape[dim] - channels_b
    za, logdet = (backward_map if inverse else forward)(x.narrow(dim, channels_b, width), h, backend, dim=dim)
    return torch.cat([x.narrow(dim, 0, channels_b), za], dim=dim), logdet


def couple_reversible_backward(y, h, grad_y, grad_logdet, channels_b: int, kind: str = "affine",
                               backend: str = "torch", compile: bool = False, dim: int = 1):
    """From y = couple(x, h, ..., dim=dim), dL/dy and dL/dlogdet: (x, g, dL/dh), where g is dL/dx except for the
    path through h: g's first channels_b entries along `dim` are dL/dy_b (the caller adds dL/dx_b through the
    network in place), the rest dL/dx_a.

    On Triton the kernel writes x_a and dL/dx_a straight into x and g, in place of two torch.cat."""
    if _in_place(kind, backend):
        _check_kernel_layout(y, dim)
        _, _, reversible_backward = _TRANSFORMS[kind]
        x = torch.empty_like(y, memory_format=torch.contiguous_format)
        grad_x = torch.empty_like(x)
        x[:, :channels_b].copy_(y[:, :channels_b])
        grad_x[:, :channels_b].copy_(grad_y[:, :channels_b])
        _, _, grad_h = reversible_backward(y[:, channels_b:], h, grad_y[:, channels_b:], grad_logdet, backend,
                                           out_xa=x[:, channels_b:], out_grad_xa=grad_x[:, channels_b:])
        return x, grad_x, grad_h
    return maybe_compiled(_couple_reversible_backward_by_cat, compile and backend == "torch")(
        y, h, grad_y, grad_logdet, channels_b, kind, backend, dim)


def _couple_reversible_backward_by_cat(y, h, grad_y, grad_logdet, channels_b: int, kind: str, backend: str,
                                       dim: int):
    _, _, reversible_backward = _TRANSFORMS[kind]
    width = y.shape[dim] - channels_b
    xa, grad_xa, grad_h = reversible_backward(y.narrow(dim, channels_b, width), h,
                                              grad_y.narrow(dim, channels_b, width), grad_logdet, backend, dim=dim)
    return (torch.cat([y.narrow(dim, 0, channels_b), xa], dim=dim),
            torch.cat([grad_y.narrow(dim, 0, channels_b), grad_xa], dim=dim), grad_h)
