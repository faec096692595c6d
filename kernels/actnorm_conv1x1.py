"""Triton kernels for the fused ActNorm + invertible 1x1 convolution, y = W (s * x + b) at every pixel.

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

Reversible backward (see the reference for the derivation), per pixel, from y and gy = dL/dy:
    u  = W^-1 y,   x  = (u - b) / s,   gu = W^T gy,   gx = s * gu
and reduced over batch and pixels:
    gW = sum gy u^T,   gs = sum gu * x,   gb = sum gu.
For C <= 64 one kernel does all of it in a single pass over y and gy: a fixed number of programs each walk
a strided set of pixel tiles, keep gW / gs / gb partial sums in registers and write them once; a torch.sum
over the programs is the small second reduction (as the dW / db reduction of Triton's layer-norm tutorial,
but without locks or atomics, so the result is deterministic for a given device). For C > 64 the C x C
matrices no longer fit in registers; those widths only occur at the coarse levels of a multi-scale Glow
(low resolution, little data), and the backward takes two passes there: one kernel rebuilds x, gx and the
gs / gb partials with K-looped tile products, a second reduces gW = sum gy u^T from gy and the rebuilt x.

Precision. tl.dot on float32 inputs uses TF32 tensor cores by default on NVIDIA GPUs (10-bit mantissa,
relative error ~1e-3). The flow must stay invertible to float32 accuracy (the reversible engine rebuilds
every activation from the output, and errors compound over depth), so every tl.dot here passes
input_precision="ieee" (or, opted into through DOT_INPUT_PRECISION below, "tf32x3"). For C < 16
(tl.dot needs block dims >= 16) the product is a broadcast multiply and sum, exact float32 arithmetic too.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = [
    "actnorm_conv1x1_forward_launch",
    "actnorm_conv1x1_inverse_launch",
    "actnorm_conv1x1_reversible_backward_launch",
]

# input_precision of every tl.dot, read at launch time. "ieee": exact float32 FMAs (the default, and the
# only choice on AMD). "tf32x3" (NVIDIA only): three TF32 tensor-core products per dot, error ~1e-6
# relative instead of ~1e-7, far more FLOPs per second. With IEEE dots the 48-channel backward does about
# 3 * 64^2 FMAs per 768 bytes moved, more than an H100/H200's FMA-to-bandwidth ratio, so it is likely
# compute-bound there; the benchmark has --dot-precision to measure the trade. Never plain "tf32".
DOT_INPUT_PRECISION = "ieee"
_DOT_PRECISIONS = ("ieee", "tf32x3")


@triton.jit
def _tile_matmul(a, b, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] in float32. tl.dot (IEEE float32 by default, never TF32) when all dims are >= 16."""
    if USE_DOT:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    else:
        out = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return out


@triton.jit
def _k_looped_channel_product(
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
        acc += _tile_matmul(mat, inp, USE_DOT, DOT_PRECISION)
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

    acc = _k_looped_channel_product(A, C, 1, INP, sample, offs_co, mask_co, offs_p, mask_p, C, HW,
                                    BLOCK_CO, BLOCK_K, BLOCK_P, USE_DOT, DOT_PRECISION)
    bias = tl.load(BIAS + offs_co, mask=mask_co, other=0.0)
    acc += bias[:, None]
    tl.store(OUT + sample + offs_co[:, None] * HW + offs_p[None, :], acc, mask=mask_co[:, None] & mask_p[None, :])


@triton.jit
def _actnorm_conv1x1_bwd_fused_kernel(
    Y,  # [N, C, HW] float32 forward output
    GY,  # [N, C, HW] float32 dL/dy
    X,  # [N, C, HW] float32 out: rebuilt input
    GX,  # [N, C, HW] float32 out: dL/dx
    SCALE,  # [C]
    BIAS,  # [C]
    W,  # [C, C] weight
    WINV,  # [C, C] its inverse
    PART_GW,  # [G, C, C] out: per-program partial dL/dW
    PART_GS,  # [G, C] out: per-program partial dL/ds
    PART_GB,  # [G, C] out: per-program partial dL/db
    C,
    HW,
    NUM_P_BLOCKS,  # cdiv(HW, BLOCK_P)
    NUM_TILES,  # N * NUM_P_BLOCKS
    C_BLOCK: tl.constexpr,  # next power of two >= C, <= FUSED_BACKWARD_MAX_C_BLOCK
    BLOCK_P: tl.constexpr,
    USE_DOT: tl.constexpr,
    WRITE_X: tl.constexpr,  # False under autograd, where only the gradients are wanted
    DOT_PRECISION: tl.constexpr,  # "ieee" (default) or "tf32x3"
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    offs_c = tl.arange(0, C_BLOCK)
    mask_c = offs_c < C
    mask_cc = mask_c[:, None] & mask_c[None, :]
    # Parameters are loaded once per program; padded rows / columns are zero (scale pads with 1).
    w_inv = tl.load(WINV + offs_c[:, None] * C + offs_c[None, :], mask=mask_cc, other=0.0)
    w_t = tl.load(W + offs_c[None, :] * C + offs_c[:, None], mask=mask_cc, other=0.0)  # w_t[i, j] = W[j, i]
    scale = tl.load(SCALE + offs_c, mask=mask_c, other=1.0)
    bias = tl.load(BIAS + offs_c, mask=mask_c, other=0.0)

    acc_gw = tl.zeros((C_BLOCK, C_BLOCK), dtype=tl.float32)
    acc_gs = tl.zeros((C_BLOCK,), dtype=tl.float32)
    acc_gb = tl.zeros((C_BLOCK,), dtype=tl.float32)
    for tile in range(pid, NUM_TILES, num_programs):
        n = (tile // NUM_P_BLOCKS).to(tl.int64)
        p_block = tile % NUM_P_BLOCKS
        offs_p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = mask_c[:, None] & (offs_p < HW)[None, :]
        offs = n * C * HW + offs_c[:, None] * HW + offs_p[None, :]
        y = tl.load(Y + offs, mask=mask, other=0.0)
        gy = tl.load(GY + offs, mask=mask, other=0.0)

        u = _tile_matmul(w_inv, y, USE_DOT, DOT_PRECISION)  # ActNorm output, [C_BLOCK, BLOCK_P]
        gu = _tile_matmul(w_t, gy, USE_DOT, DOT_PRECISION)
        x = (u - bias[:, None]) / scale[:, None]
        if WRITE_X:
            tl.store(X + offs, x, mask=mask)
        tl.store(GX + offs, gu * scale[:, None], mask=mask)

        # Masked pixels and padded channels have gy = 0, hence gu = 0: they add nothing below.
        acc_gw += _tile_matmul(gy, tl.trans(u), USE_DOT, DOT_PRECISION)
        acc_gs += tl.sum(gu * x, axis=1)
        acc_gb += tl.sum(gu, axis=1)

    part = pid.to(tl.int64)
    tl.store(PART_GW + part * C * C + offs_c[:, None] * C + offs_c[None, :], acc_gw, mask=mask_cc)
    tl.store(PART_GS + part * C + offs_c, acc_gs, mask=mask_c)
    tl.store(PART_GB + part * C + offs_c, acc_gb, mask=mask_c)


@triton.jit
def _actnorm_conv1x1_bwd_rebuild_kernel(
    Y,  # [N, C, HW] float32 forward output
    GY,  # [N, C, HW] float32 dL/dy
    X,  # [N, C, HW] out: rebuilt input
    GX,  # [N, C, HW] out: dL/dx
    SCALE,  # [C]
    BIAS,  # [C]
    W,  # [C, C]
    WINV,  # [C, C]
    PART_GS,  # [N * NUM_P_BLOCKS, C] out: per-tile partial dL/ds
    PART_GB,  # [N * NUM_P_BLOCKS, C] out: per-tile partial dL/db
    C,
    HW,
    NUM_C_BLOCKS,
    NUM_P_BLOCKS,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Wide-channel path (C > 64; BLOCK_C, BLOCK_K >= 16, so tl.dot): channels [c0, c0 + BLOCK_C) of
    # u = W^-1 y and gu = W^T gy for one pixel tile, accumulated over K blocks of y and gy.
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    c_block = pid % NUM_C_BLOCKS
    p_block = pid // NUM_C_BLOCKS
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = p_block * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask_p = offs_p < HW
    sample = n * C * HW

    # u = W^-1 y reads W^-1[c, k]; gu = W^T gy reads W[k, c] (row stride 1, column stride C).
    u = _k_looped_channel_product(WINV, C, 1, Y, sample, offs_c, mask_c, offs_p, mask_p, C, HW,
                                  BLOCK_C, BLOCK_K, BLOCK_P, True, DOT_PRECISION)
    gu = _k_looped_channel_product(W, 1, C, GY, sample, offs_c, mask_c, offs_p, mask_p, C, HW,
                                   BLOCK_C, BLOCK_K, BLOCK_P, True, DOT_PRECISION)

    scale = tl.load(SCALE + offs_c, mask=mask_c, other=1.0)
    bias = tl.load(BIAS + offs_c, mask=mask_c, other=0.0)
    x = (u - bias[:, None]) / scale[:, None]
    mask = mask_c[:, None] & mask_p[None, :]
    offs = sample + offs_c[:, None] * HW + offs_p[None, :]
    tl.store(X + offs, x, mask=mask)
    tl.store(GX + offs, gu * scale[:, None], mask=mask)
    part = n * NUM_P_BLOCKS + p_block
    tl.store(PART_GS + part * C + offs_c, tl.sum(gu * x, axis=1), mask=mask_c)
    tl.store(PART_GB + part * C + offs_c, tl.sum(gu, axis=1), mask=mask_c)


@triton.jit
def _actnorm_conv1x1_grad_weight_kernel(
    GY,  # [N, C, HW] float32 dL/dy
    X,  # [N, C, HW] float32 rebuilt input
    SCALE,  # [C]
    BIAS,  # [C]
    PART_GW,  # [G, C, C] out: per-program partial dL/dW
    C,
    HW,
    NUM_C_BLOCKS,
    NUM_P_BLOCKS,
    NUM_TILES,  # N * NUM_P_BLOCKS
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Wide-channel path: block (o, c) of gW = sum_{n,p} gy[n, o, p] u[n, c, p], with u = s x + b
    # recomputed from the rebuilt x. Program (i, g) walks every G-th pixel tile.
    pid_oc = tl.program_id(0)
    pid = tl.program_id(1)
    num_programs = tl.num_programs(1)
    offs_o = (pid_oc // NUM_C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_c = (pid_oc % NUM_C_BLOCKS) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_o = offs_o < C
    mask_c = offs_c < C
    scale = tl.load(SCALE + offs_c, mask=mask_c, other=0.0)
    bias = tl.load(BIAS + offs_c, mask=mask_c, other=0.0)

    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=tl.float32)
    for tile in range(pid, NUM_TILES, num_programs):
        n = (tile // NUM_P_BLOCKS).to(tl.int64)
        offs_p = (tile % NUM_P_BLOCKS) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < HW
        gy = tl.load(GY + n * C * HW + offs_o[:, None] * HW + offs_p[None, :],
                     mask=mask_o[:, None] & mask_p[None, :], other=0.0)
        x = tl.load(X + n * C * HW + offs_c[:, None] * HW + offs_p[None, :],
                    mask=mask_c[:, None] & mask_p[None, :], other=0.0)
        u = scale[:, None] * x + bias[:, None]  # masked pixels meet gy = 0 in the product
        acc += tl.dot(gy, tl.trans(u), input_precision=DOT_PRECISION)
    tl.store(PART_GW + pid.to(tl.int64) * C * C + offs_o[:, None] * C + offs_c[None, :], acc,
             mask=mask_o[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------------------------------------
# Block sizes: every tile, warp and program-count choice of the launchers, in one place.
#
# Checked by compiling for sm_90 (ptxas; tests/kernels/test_kernels_compile.py compiles exactly these), not yet timed
# on a GPU. Under the interpreter they only decide how many masked tiles a test walks through.

# Largest padded channel count that the single-pass backward holds in registers (W^-1, W^T, gW: C x C each).
FUSED_BACKWARD_MAX_C_BLOCK = 64


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


class FusedBackwardTiles(NamedTuple):
    """Tiles of the single-pass backward for a padded channel count C_BLOCK <= FUSED_BACKWARD_MAX_C_BLOCK."""
    block_p: int
    num_warps: int
    use_dot: bool


def fused_backward_tiles(c_block: int) -> FusedBackwardTiles:
    """W^-1, W^T and the gW accumulator stay in registers across the loop, so pixel tiles are narrow and 8 warps
    share them; these choices compile without spills (C_BLOCK 16 / 32 / 64: 94 / 178 / 192 registers)."""
    if c_block >= 16:
        return FusedBackwardTiles(32 if c_block <= 32 else 16, 8, True)
    return FusedBackwardTiles(max(16, min(128, 1024 // (c_block * c_block))), 4, False)


class WideBackwardTiles(NamedTuple):
    """Tiles of the two-pass backward for C > FUSED_BACKWARD_MAX_C_BLOCK (always tl.dot: every dim >= 16)."""
    block_c: int              # channel tile of both kernels
    block_k: int              # K step of the rebuild kernel
    rebuild_block_p: int      # pixel tile of the rebuild kernel
    grad_weight_block_p: int  # pixel tile of the gW reduction: 16 keeps its 64 x 64 accumulator free of spills
    num_warps: int


WIDE_BACKWARD_TILES = WideBackwardTiles(block_c=64, block_k=64, rebuild_block_p=32, grad_weight_block_p=16,
                                        num_warps=8)


def _num_programs_persistent(device: torch.device, num_tiles: int) -> int:
    """Programs of a persistent reduction kernel: a few per SM on a GPU, few under the interpreter."""
    if device.type == "cuda":
        per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        per_device = 4
    return max(1, min(num_tiles, per_device))


# ----------------------------------------------------------------------------------------------------------
# Launchers


def _check_activation(name: str, t: torch.Tensor, shape=None) -> torch.Tensor:
    if t.dim() != 4:
        raise ValueError(f"{name} must be [N, C, H, W]; got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32; got {t.dtype}")
    return t.contiguous()


def _check_param(name: str, t: torch.Tensor, shape, device) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; the activations are on {device}")
    # Launchers run outside autograd: detach so that host-side folding builds no graph.
    return t.detach().to(torch.float32).contiguous()


def _dot_precision() -> str:
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
        DOT_PRECISION=_dot_precision(), num_warps=tiles.num_warps,
    )
    return out


def actnorm_conv1x1_forward_launch(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                                   weight: torch.Tensor) -> torch.Tensor:
    """y = W (s * x + b) per pixel, with s and b folded into the weights: one read of x, one write of y.

    Args: x [N, C, H, W] float32; scale, bias [C]; weight [C, C] (out, in). Returns y like x.
    """
    x = _check_activation("x", x)
    c = x.shape[1]
    scale = _check_param("scale", scale, (c,), x.device)
    bias = _check_param("bias", bias, (c,), x.device)
    weight = _check_param("weight", weight, (c, c), x.device)
    folded_weight = weight * scale[None, :]  # W diag(s)
    folded_bias = (weight * bias[None, :]).sum(dim=1)  # W b, as a sum so that TF32 matmul never applies
    return _channel_affine_mix(x, folded_weight, folded_bias)


def actnorm_conv1x1_inverse_launch(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                                   weight_inv: torch.Tensor) -> torch.Tensor:
    """x = (W^-1 y - b) / s per pixel, as diag(1/s) W^-1 y - b/s: one read of y, one write of x."""
    y = _check_activation("y", y)
    c = y.shape[1]
    scale = _check_param("scale", scale, (c,), y.device)
    bias = _check_param("bias", bias, (c,), y.device)
    weight_inv = _check_param("weight_inv", weight_inv, (c, c), y.device)
    return _channel_affine_mix(y, weight_inv / scale[:, None], -bias / scale)


# (x or None, dL/dx, dL/dscale, dL/dbias, dL/dweight)
BackwardResult = Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def actnorm_conv1x1_reversible_backward_launch(y: torch.Tensor, grad_y: torch.Tensor, scale: torch.Tensor,
                                               bias: torch.Tensor, weight: torch.Tensor,
                                               weight_inv: torch.Tensor, *, return_input: bool = True
                                               ) -> BackwardResult:
    """From y and dL/dy: (x, dL/dx, dL/dscale, dL/dbias, dL/dweight), semantics of the reference.

    For C <= 64, one pass over y and grad_y (each read once; x and grad_x written once) plus a sum over
    a few hundred per-program partials of the C x C and C reductions. For C > 64, two passes (see the
    module docstring). With return_input=False (the autograd Function, which needs only the gradients),
    x is not written where the kernels allow it (C <= 64), and None is returned in its place.
    """
    y = _check_activation("y", y)
    grad_y = _check_activation("grad_y", grad_y, y.shape)
    c = y.shape[1]
    scale = _check_param("scale", scale, (c,), y.device)
    bias = _check_param("bias", bias, (c,), y.device)
    weight = _check_param("weight", weight, (c, c), y.device)
    weight_inv = _check_param("weight_inv", weight_inv, (c, c), y.device)
    if triton.next_power_of_2(c) <= FUSED_BACKWARD_MAX_C_BLOCK:
        x, grad_x, part_gs, part_gb, part_gw = _backward_single_pass(y, grad_y, scale, bias, weight, weight_inv,
                                                                     return_input)
    else:
        x, grad_x, part_gs, part_gb, part_gw = _backward_two_pass(y, grad_y, scale, bias, weight, weight_inv)
    return x if return_input else None, grad_x, part_gs.sum(dim=0), part_gb.sum(dim=0), part_gw.sum(dim=0)


def _backward_single_pass(y, grad_y, scale, bias, weight, weight_inv, write_x: bool):
    """C <= 64: one kernel; returns (x or a placeholder, grad_x, and the per-program partials of gs, gb, gW)."""
    n, c, h, w = y.shape
    hw = h * w
    c_block = triton.next_power_of_2(c)
    tiles = fused_backward_tiles(c_block)
    num_p_blocks = triton.cdiv(hw, tiles.block_p)
    num_tiles = n * num_p_blocks
    g = _num_programs_persistent(y.device, num_tiles)
    grad_x = torch.empty_like(y)
    x = torch.empty_like(y) if write_x else grad_x  # placeholder pointer, never written
    part_gw = torch.empty((g, c, c), device=y.device, dtype=torch.float32)
    part_gs = torch.empty((g, c), device=y.device, dtype=torch.float32)
    part_gb = torch.empty((g, c), device=y.device, dtype=torch.float32)
    _actnorm_conv1x1_bwd_fused_kernel[(g,)](
        y, grad_y, x, grad_x, scale, bias, weight, weight_inv, part_gw, part_gs, part_gb,
        c, hw, num_p_blocks, num_tiles,
        C_BLOCK=c_block, BLOCK_P=tiles.block_p, USE_DOT=tiles.use_dot, DOT_PRECISION=_dot_precision(),
        WRITE_X=write_x, num_warps=tiles.num_warps,
    )
    return x, grad_x, part_gs, part_gb, part_gw


def _backward_two_pass(y, grad_y, scale, bias, weight, weight_inv):
    """C > 64: rebuild x, gx and the gs / gb partials, then reduce gW from gy and the rebuilt x."""
    n, c, h, w = y.shape
    hw = h * w
    tiles = WIDE_BACKWARD_TILES
    num_c_blocks = triton.cdiv(c, tiles.block_c)
    x = torch.empty_like(y)
    grad_x = torch.empty_like(y)

    num_p_blocks = triton.cdiv(hw, tiles.rebuild_block_p)
    part_gs = torch.empty((n * num_p_blocks, c), device=y.device, dtype=torch.float32)
    part_gb = torch.empty((n * num_p_blocks, c), device=y.device, dtype=torch.float32)
    _actnorm_conv1x1_bwd_rebuild_kernel[(num_c_blocks * num_p_blocks, n)](
        y, grad_y, x, grad_x, scale, bias, weight, weight_inv, part_gs, part_gb,
        c, hw, num_c_blocks, num_p_blocks,
        BLOCK_C=tiles.block_c, BLOCK_K=tiles.block_k, BLOCK_P=tiles.rebuild_block_p,
        DOT_PRECISION=_dot_precision(), num_warps=tiles.num_warps,
    )

    num_p_blocks = triton.cdiv(hw, tiles.grad_weight_block_p)
    num_tiles = n * num_p_blocks
    g = max(1, min(num_tiles, _num_programs_persistent(y.device, num_tiles) // (num_c_blocks * num_c_blocks) + 1))
    part_gw = torch.empty((g, c, c), device=y.device, dtype=torch.float32)
    _actnorm_conv1x1_grad_weight_kernel[(num_c_blocks * num_c_blocks, g)](
        grad_y, x, scale, bias, part_gw, c, hw, num_c_blocks, num_p_blocks, num_tiles,
        BLOCK_C=tiles.block_c, BLOCK_P=tiles.grad_weight_block_p, DOT_PRECISION=_dot_precision(),
        num_warps=tiles.num_warps,
    )
    return x, grad_x, part_gs, part_gb, part_gw
