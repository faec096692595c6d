"""Triton kernels for the fused ActNorm + invertible 1x1 convolution, y = W (s * x + b) at every pixel: the forward
and the inverse, and what the reversible backward (kernels/actnorm_conv1x1_backward.py) shares with them.

Plain launchers only (no autograd here); the reference and its derivation live in
revglow/ops/actnorm_conv1x1.py, the autograd.Function in revglow/ops/_triton_functions.py.

Layout. x and y are [N, C, H, W] contiguous float32, so inside one sample the pixel index p in [0, H*W) is
contiguous and the channel stride is H*W. Every kernel works on tiles [channels, BLOCK_P] of one sample
whose pixel axis is the contiguous one, so each row of a tile is one coalesced load, and each element of
x / y / grad_y / grad_x crosses DRAM exactly once. The channel count is padded to a power of two and masked.

Forward and inverse are both a per-pixel affine channel mix, out = A inp + c, with A and c folded on the host
(C x C work, negligible):
    forward:  A = W diag(s),        c = W b            (y = W (s x + b))
    inverse:  A = diag(1/s) W^-1,   c = -b / s         (x = (W^-1 y - b) / s)

Precision. tl.dot on float32 inputs uses TF32 tensor cores by default on NVIDIA GPUs (10-bit mantissa,
relative error ~1e-3). The flow must stay invertible to float32 accuracy (the reversible engine rebuilds
every activation from the output, and errors compound over depth), so every tl.dot here and in the backward passes
input_precision="ieee" (or, opted into through DOT_INPUT_PRECISION below, "tf32x3"). For C < 16
(tl.dot needs block dims >= 16) the product is a broadcast multiply and sum, exact float32 arithmetic too.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = [
    "actnorm_conv1x1_forward_launch",
    "actnorm_conv1x1_inverse_launch",
    # shared with the reversible backward (kernels/actnorm_conv1x1_backward.py)
    "DOT_INPUT_PRECISION",
    "dot_precision",
    "tile_matmul",
    "k_looped_channel_product",
    "check_activation",
    "check_param",
    "MixTiles",
    "mix_tiles",
]

# input_precision of every tl.dot, read at launch time. "ieee": exact float32 FMAs (the default, and the
# only choice on AMD). "tf32x3" (NVIDIA only): three TF32 tensor-core products per dot, error ~1e-6
# relative instead of ~1e-7, far more FLOPs per second. With IEEE dots the 48-channel backward does about
# 3 * 64^2 FMAs per 768 bytes moved, more than an H100/H200's FMA-to-bandwidth ratio, so it is likely
# compute-bound there; the benchmark has --dot-precision to measure the trade. Never plain "tf32".
DOT_INPUT_PRECISION = "ieee"
_DOT_PRECISIONS = ("ieee", "tf32x3")


@triton.jit
def tile_matmul(a, b, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] in float32. tl.dot (IEEE float32 by default, never TF32) when all dims are >= 16."""
    if USE_DOT:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


@triton.jit
def k_looped_channel_product(
    MAT,  # [C, C] float32 matrix, read as MAT[r, k] at r * ROW_STRIDE + k * COL_STRIDE
    ROW_STRIDE,
    COL_STRIDE,
    INP,  # [N, C, HW] float32 activation
    sample,  # offset of this sample in INP: n * C * HW
    offs_r,  # [BLOCK_R] output rows (channels) of this program
    mask_r,
    offs_p,  # [BLOCK_P] pixels of this program
    mask_p,
    C,
    HW,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[r, p] = sum_k MAT[r, k] * INP[n, k, p] over all C input channels, BLOCK_K at a time (the K loop of
    the channel mix and of the wide backward's rebuild). Padded rows, channels and pixels load as zero."""
    acc = tl.zeros((BLOCK_R, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        inp = tl.load(INP + sample + offs_k[:, None] * HW + offs_p[None, :],
                      mask=mask_k[:, None] & mask_p[None, :], other=0.0)
        mat = tl.load(MAT + offs_r[:, None] * ROW_STRIDE + offs_k[None, :] * COL_STRIDE,
                      mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += tile_matmul(mat, inp, USE_DOT, DOT_PRECISION)
    return acc


@triton.jit
def _channel_affine_mix_kernel(
    INP,  # [N, C, HW] float32 input
    OUT,  # [N, C, HW] float32 output
    A,  # [C, C] float32, row-major (out channel, in channel)
    BIAS,  # [C] float32
    C,  # channels
    HW,  # pixels per sample
    NUM_CO_BLOCKS,  # cdiv(C, BLOCK_CO)
    BLOCK_CO: tl.constexpr,  # output channels per program
    BLOCK_K: tl.constexpr,  # input channels per step of the K loop
    BLOCK_P: tl.constexpr,  # pixels per program
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" (default) or "tf32x3"
):
    # out[n, :, p] = A @ inp[n, :, p] + BIAS for the pixels p of one tile.
    # The output-channel block varies fastest over program ids, so when C > BLOCK_CO the programs that
    # re-read one input tile run together and find it in L2.
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    co_block = pid % NUM_CO_BLOCKS
    p_block = pid // NUM_CO_BLOCKS
    offs_co = co_block * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_co = offs_co < C
    mask_p = offs_p < HW
    sample = n * C * HW

    acc = k_looped_channel_product(A, C, 1, INP, sample, offs_co, mask_co, offs_p, mask_p, C, HW,
                                   BLOCK_CO, BLOCK_K, BLOCK_P, USE_DOT, DOT_PRECISION)
    bias = tl.load(BIAS + offs_co, mask=mask_co, other=0.0)
    acc += bias[:, None]
    tl.store(OUT + sample + offs_co[:, None] * HW + offs_p[None, :], acc, mask=mask_co[:, None] & mask_p[None, :])


# ----------------------------------------------------------------------------------------------------------
# Block sizes of the channel mix. Checked by compiling for sm_90 (ptxas; tests/kernels/test_kernels_compile.py
# compiles exactly these), not yet timed on a GPU. Under the interpreter they only decide how many masked tiles a
# test walks through.

class MixTiles(NamedTuple):
    """Tiles of the channel affine mix (forward and inverse) for one channel count."""
    block_co: int   # output channels per program
    block_k: int    # input channels per step of the K loop
    block_p: int    # pixels per program
    use_dot: bool   # tl.dot needs every block dim >= 16; below that, a broadcast multiply and sum
    num_warps: int


def mix_tiles(c: int) -> MixTiles:
    c_block = triton.next_power_of_2(c)
    block_co = min(c_block, 64)
    block_k = min(c_block, 64)
    block_p = max(16, min(256, 4096 // block_co))
    if block_co < 16:  # broadcast product: a [BLOCK_CO, BLOCK_K, BLOCK_P] temporary
        block_p = max(16, min(256, 2048 // (block_co * block_k)))
    num_warps = 4 if block_co * block_p <= 2048 else 8
    return MixTiles(block_co, block_k, block_p, block_co >= 16 and block_k >= 16, num_warps)


# ----------------------------------------------------------------------------------------------------------
# Launchers


def check_activation(name: str, t: torch.Tensor, shape=None) -> torch.Tensor:
    if t.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W]; got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32; got {t.dtype}")
    return t.contiguous()


def check_param(name: str, t: torch.Tensor, shape, device) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; the activations are on {device}")
    # Launchers run outside autograd: detach so that host-side folding builds no graph.
    return t.detach().to(torch.float32).contiguous()


def dot_precision() -> str:
    if DOT_INPUT_PRECISION not in _DOT_PRECISIONS:
        raise ValueError(f"DOT_INPUT_PRECISION={DOT_INPUT_PRECISION!r}; choose one of {_DOT_PRECISIONS} (TF32 alone "
                         "is too coarse for an invertible flow)")
    return DOT_INPUT_PRECISION


def _channel_affine_mix(inp: torch.Tensor, a: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    n, c, h, w = inp.shape
    hw = h * w
    out = torch.empty_like(inp)
    tiles = mix_tiles(c)
    num_co_blocks = triton.cdiv(c, tiles.block_co)
    grid = (num_co_blocks * triton.cdiv(hw, tiles.block_p), n)
    _channel_affine_mix_kernel[grid](
        inp, out, a.contiguous(), bias.contiguous(), c, hw, num_co_blocks,
        BLOCK_CO=tiles.block_co, BLOCK_K=tiles.block_k, BLOCK_P=tiles.block_p, USE_DOT=tiles.use_dot,
        DOT_PRECISION=dot_precision(), num_warps=tiles.num_warps,
    )
    return out


def actnorm_conv1x1_forward_launch(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                                   weight: torch.Tensor) -> torch.Tensor:
    """y = W (s * x + b) per pixel, with s and b folded into the weights: one read of x, one write of y.

    Args: x [N, C, H, W] float32; scale, bias [C]; weight [C, C] (out, in). Returns y like x.
    """
    x = check_activation("x", x)
    c = x.shape[1]
    scale = check_param("scale", scale, (c,), x.device)
    bias = check_param("bias", bias, (c,), x.device)
    weight = check_param("weight", weight, (c, c), x.device)
    folded_weight = weight * scale[None, :]  # W diag(s)
    folded_bias = (weight * bias[None, :]).sum(dim=1)  # W b, as a sum so that TF32 matmul never applies
    return _channel_affine_mix(x, folded_weight, folded_bias)


def actnorm_conv1x1_inverse_launch(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                                   weight_inv: torch.Tensor) -> torch.Tensor:
    """x = (W^-1 y - b) / s per pixel, as diag(1/s) W^-1 y - b/s: one read of y, one write of x."""
    y = check_activation("y", y)
    c = y.shape[1]
    scale = check_param("scale", scale, (c,), y.device)
    bias = check_param("bias", bias, (c,), y.device)
    weight_inv = check_param("weight_inv", weight_inv, (c, c), y.device)
    return _channel_affine_mix(y, weight_inv / scale[:, None], -bias / scale)
