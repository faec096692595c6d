"""Triton kernels for the affine coupling transform of the half xa, given the coupling network output h.

Plain launchers only (no autograd here); the reference and its derivation live in
revglow/ops/coupling_affine.py, the autograd.Function in revglow/ops/_triton_functions.py.

h: [N, 2*Ca, H, W] with shift = h[:, :Ca], raw = h[:, Ca:], s = sigmoid(raw + 2):
    forward   ya = (xa + shift) * s                 logdet[n] = sum of log s over C, H, W
    inverse   xa = ya / s - shift                   (same logdet, of the forward map)
    backward  xa = ya / s - shift,   gxa = s * gya,   gshift = gxa,   graw = (gya * ya + glogdet[n]) * (1 - s)

Elementwise, so the only design question is bandwidth: within one sample, the Ca*H*W elements of xa, the
shift half and the raw half of h are each contiguous, so a program takes BLOCK consecutive elements of one
sample and reads each input / writes each output exactly once. h may be bfloat16 (the coupling network under
autocast): it is read as is and upcast in registers, and all arithmetic is float32.

log s and 1 - s come from one exponential, e = exp(-|z|) with z = raw + 2, without cancellation:
    z >= 0:  s = 1 / (1 + e),   1 - s = e / (1 + e),   log s = -log(1 + e)
    z <  0:  s = e / (1 + e),   1 - s = 1 / (1 + e),   log s = z - log(1 + e)
The per-sample logdet is reduced deterministically: each program writes its partial sum, torch.sum adds them.

Only the per-sample blocks need to be contiguous: a tensor sliced along channels (x[:, :Ca] of a contiguous
x) is used in place through its batch stride; `out=` lets the forward and inverse write their result straight
into a channel slice of a preallocated full tensor, and `out_xa=` / `out_grad_xa=` do the same for the
reversible backward (each saves the copy of a torch.cat).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "coupling_affine_forward_launch",
    "coupling_affine_inverse_launch",
    "coupling_affine_reversible_backward_launch",
]


@triton.jit
def _sigmoid_parts(raw):
    """(s, 1 - s, log s) of s = sigmoid(raw + 2), from one exp and one log, stable for any raw."""
    z = raw + 2.0
    e = tl.exp(-tl.abs(z))
    inv = 1.0 / (1.0 + e)
    positive = z >= 0
    s = tl.where(positive, inv, e * inv)
    one_minus_s = tl.where(positive, e * inv, inv)
    log_s = tl.minimum(z, 0.0) - tl.log(1.0 + e)
    return s, one_minus_s, log_s


@triton.jit
def _coupling_affine_fwd_kernel(
    INP,  # [N, Ca, H, W] float32, per-sample contiguous (batch stride STRIDE_INP): xa, or ya if INVERSE
    H,  # [N, 2*Ca, H, W] float32 or bfloat16, per-sample contiguous (batch stride STRIDE_H)
    OUT,  # [N, Ca, H, W] float32 out (batch stride STRIDE_OUT): ya, or xa if INVERSE
    PART_LOGDET,  # [N, NUM_BLOCKS] float32 out: per-program partial sums of log s
    NUMEL,  # Ca * H * W, elements of xa per sample
    STRIDE_INP,
    STRIDE_H,
    STRIDE_OUT,
    NUM_BLOCKS,  # cdiv(NUMEL, BLOCK)
    BLOCK: tl.constexpr,
    INVERSE: tl.constexpr,
):
    block = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    inp = tl.load(INP + n * STRIDE_INP + offs, mask=mask, other=0.0)
    shift = tl.load(H + n * STRIDE_H + offs, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(H + n * STRIDE_H + NUMEL + offs, mask=mask, other=0.0).to(tl.float32)
    s, one_minus_s, log_s = _sigmoid_parts(raw)
    if INVERSE:
        out = inp / s - shift
    else:
        out = (inp + shift) * s
    tl.store(OUT + n * STRIDE_OUT + offs, out, mask=mask)
    tl.store(PART_LOGDET + n * NUM_BLOCKS + block, tl.sum(tl.where(mask, log_s, 0.0), axis=0))


@triton.jit
def _coupling_affine_bwd_kernel(
    YA,  # [N, Ca, H, W] float32 forward output (batch stride STRIDE_YA)
    H,  # [N, 2*Ca, H, W] float32 or bfloat16 (batch stride STRIDE_H)
    GYA,  # [N, Ca, H, W] float32 dL/dya (batch stride STRIDE_GYA)
    GLOGDET,  # [N] float32 dL/dlogdet
    XA,  # [N, Ca, H, W] float32 out (batch stride STRIDE_XA): rebuilt xa
    GXA,  # [N, Ca, H, W] float32 out (batch stride STRIDE_GXA): dL/dxa
    GH,  # [N, 2*Ca, H, W] float32 out, contiguous: dL/dh
    NUMEL,  # Ca * H * W
    STRIDE_YA,
    STRIDE_H,
    STRIDE_GYA,
    STRIDE_XA,
    STRIDE_GXA,
    BLOCK: tl.constexpr,
    WRITE_XA: tl.constexpr,  # False under autograd, where only the gradients are wanted
):
    block = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    ya = tl.load(YA + n * STRIDE_YA + offs, mask=mask, other=0.0)
    gya = tl.load(GYA + n * STRIDE_GYA + offs, mask=mask, other=0.0)
    shift = tl.load(H + n * STRIDE_H + offs, mask=mask, other=0.0).to(tl.float32)
    raw = tl.load(H + n * STRIDE_H + NUMEL + offs, mask=mask, other=0.0).to(tl.float32)
    glogdet = tl.load(GLOGDET + n)
    s, one_minus_s, log_s = _sigmoid_parts(raw)
    gxa = gya * s
    graw = (gya * ya + glogdet) * one_minus_s
    if WRITE_XA:
        tl.store(XA + n * STRIDE_XA + offs, ya / s - shift, mask=mask)
    tl.store(GXA + n * STRIDE_GXA + offs, gxa, mask=mask)
    tl.store(GH + n * 2 * NUMEL + offs, gxa, mask=mask)
    tl.store(GH + n * 2 * NUMEL + NUMEL + offs, graw, mask=mask)


# ----------------------------------------------------------------------------------------------------------
# Launchers

_BLOCK = 1024


def _per_sample_contiguous(t: torch.Tensor) -> bool:
    """Whether t [N, C, H, W] has each sample's C*H*W elements contiguous (batch stride arbitrary)."""
    _, c, height, width = t.shape
    return ((width == 1 or t.stride(3) == 1) and (height == 1 or t.stride(2) == width)
            and (c == 1 or t.stride(1) == height * width))


def _as_per_sample_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if _per_sample_contiguous(t) else t.contiguous()


def _check(xa_name: str, xa: torch.Tensor, h: torch.Tensor):
    if xa.dim() != 4 or h.dim() != 4:
        raise ValueError(f"{xa_name} and h must be [N, C, H, W]; got {tuple(xa.shape)} and {tuple(h.shape)}")
    n, ca, hh, ww = xa.shape
    if tuple(h.shape) != (n, 2 * ca, hh, ww):
        raise ValueError(f"h must have shape {(n, 2 * ca, hh, ww)} for {xa_name} of shape {tuple(xa.shape)}; "
                         f"got {tuple(h.shape)}")
    if xa.dtype != torch.float32:
        raise TypeError(f"{xa_name} must be float32; got {xa.dtype}")
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"h must be float32, bfloat16 or float16; got {h.dtype}")
    if h.device != xa.device:
        raise ValueError(f"h is on {h.device}, {xa_name} on {xa.device}")
    return _as_per_sample_contiguous(xa), _as_per_sample_contiguous(h.detach())


def _output(name: str, out: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A new contiguous output shaped like `like`, or `out` checked: float32, same shape and device, samples
    contiguous (e.g. a channel slice of a contiguous tensor, written in place of a torch.cat)."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    if (tuple(out.shape) != tuple(like.shape) or out.dtype != torch.float32 or out.device != like.device
            or not _per_sample_contiguous(out)):
        raise ValueError(f"{name} must be a float32 tensor of shape {tuple(like.shape)} on {like.device} whose samples "
                         f"are contiguous (e.g. a channel slice of a contiguous tensor); got {tuple(out.shape)}, "
                         f"{out.dtype}, strides {out.stride()}")
    return out


def _launch_elementwise(inp: torch.Tensor, h: torch.Tensor, out: Optional[torch.Tensor], inverse: bool):
    n, ca, hh, ww = inp.shape
    numel = ca * hh * ww
    out = _output("out", out, inp)
    block = min(_BLOCK, max(16, triton.next_power_of_2(numel)))
    num_blocks = triton.cdiv(numel, block)
    part_logdet = torch.empty((n, num_blocks), device=inp.device, dtype=torch.float32)
    _coupling_affine_fwd_kernel[(num_blocks, n)](
        inp, h, out, part_logdet, numel, inp.stride(0), h.stride(0), out.stride(0), num_blocks,
        BLOCK=block, INVERSE=inverse, num_warps=4,
    )
    return out, part_logdet.sum(dim=1)


def coupling_affine_forward_launch(xa: torch.Tensor, h: torch.Tensor, out: Optional[torch.Tensor] = None):
    """(ya, logdet [N]) with ya = (xa + shift) * sigmoid(raw + 2); one read of xa and h, one write of ya.

    xa: [N, Ca, H, W] float32; h: [N, 2*Ca, H, W] float32 or bfloat16. With `out` (a float32 tensor shaped
    like xa whose samples are contiguous, e.g. `y[:, Ca:]` of a contiguous y), ya is written there and
    `out` is returned.
    """
    xa, h = _check("xa", xa, h)
    return _launch_elementwise(xa, h, out, inverse=False)


def coupling_affine_inverse_launch(ya: torch.Tensor, h: torch.Tensor, out: Optional[torch.Tensor] = None):
    """(xa, logdet [N] of the forward map) with xa = ya / sigmoid(raw + 2) - shift."""
    ya, h = _check("ya", ya, h)
    return _launch_elementwise(ya, h, out, inverse=True)


def coupling_affine_reversible_backward_launch(ya: torch.Tensor, h: torch.Tensor, grad_ya: torch.Tensor,
                                               grad_logdet: torch.Tensor, *, return_input: bool = True,
                                               out_xa: Optional[torch.Tensor] = None,
                                               out_grad_xa: Optional[torch.Tensor] = None):
    """From ya, h, dL/dya and dL/dlogdet [N]: (xa, dL/dxa, dL/dh), dL/dh float32 in h's layout.

    One pass: reads ya, h, grad_ya (and N scalars) once; writes xa, grad_xa and grad_h once. With
    return_input=False (the autograd Function, which needs only the gradients) xa is neither written nor
    returned (None in its place). `out_xa` / `out_grad_xa` (checked like `out=` of the forward) receive xa and
    dL/dxa in place, e.g. the transformed half of the step's rebuilt input and of its gradient.
    """
    ya, h = _check("ya", ya, h)
    if tuple(grad_ya.shape) != tuple(ya.shape) or grad_ya.dtype != torch.float32:
        raise ValueError(f"grad_ya must be float32 of shape {tuple(ya.shape)}; got {tuple(grad_ya.shape)}, "
                         f"{grad_ya.dtype}")
    n, ca, hh, ww = ya.shape
    if grad_logdet.numel() != n:
        raise ValueError(f"grad_logdet must have {n} elements (one per sample); got {tuple(grad_logdet.shape)}")
    grad_ya = _as_per_sample_contiguous(grad_ya)
    grad_logdet = grad_logdet.reshape(n).to(device=ya.device, dtype=torch.float32).contiguous()
    numel = ca * hh * ww
    grad_xa = _output("out_grad_xa", out_grad_xa, ya)
    xa = _output("out_xa", out_xa, ya) if return_input else grad_xa  # placeholder pointer when not written
    grad_h = torch.empty((n, 2 * ca, hh, ww), device=ya.device, dtype=torch.float32)
    block = min(_BLOCK, max(16, triton.next_power_of_2(numel)))
    _coupling_affine_bwd_kernel[(triton.cdiv(numel, block), n)](
        ya, h, grad_ya, grad_logdet, xa, grad_xa, grad_h, numel, ya.stride(0), h.stride(0), grad_ya.stride(0),
        xa.stride(0), grad_xa.stride(0), BLOCK=block, WRITE_XA=return_input, num_warps=4,
    )
    return xa if return_input else None, grad_xa, grad_h
