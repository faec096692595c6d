"""Triton kernels for the reversible backward of the fused ActNorm + invertible 1x1 convolution, y = W (s * x + b):
from y and dL/dy, the input x rebuilt and every gradient, in as few passes over the activations as the channel
count allows. The forward and inverse kernels, the layout and the precision are in kernels/actnorm_conv1x1.py.

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
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from revglow.kernels.actnorm_conv1x1 import (check_activation, check_param, dot_precision, k_looped_channel_product,
                                             tile_matmul)

__all__ = [
    "actnorm_conv1x1_reversible_backward_launch",
    "BackwardResult",
    "FUSED_BACKWARD_MAX_C_BLOCK",
    "FusedBackwardTiles",
    "fused_backward_tiles",
    "WideBackwardTiles",
    "WIDE_BACKWARD_TILES",
]


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

        u = tile_matmul(w_inv, y, USE_DOT, DOT_PRECISION)  # ActNorm output, [C_BLOCK, BLOCK_P]
        gu = tile_matmul(w_t, gy, USE_DOT, DOT_PRECISION)
        x = (u - bias[:, None]) / scale[:, None]
        if WRITE_X:
            tl.store(X + offs, x, mask=mask)
        tl.store(GX + offs, gu * scale[:, None], mask=mask)

        # Masked pixels and padded channels have gy = 0, hence gu = 0: they add nothing below.
        acc_gw += tile_matmul(gy, tl.trans(u), USE_DOT, DOT_PRECISION)
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
    u = k_looped_channel_product(WINV, C, 1, Y, sample, offs_c, mask_c, offs_p, mask_p, C, HW,
                                 BLOCK_C, BLOCK_K, BLOCK_P, True, DOT_PRECISION)
    gu = k_looped_channel_product(W, 1, C, GY, sample, offs_c, mask_c, offs_p, mask_p, C, HW,
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
# Block sizes: every tile, warp and program-count choice of the backward's launcher, in one place.
#
# Checked by compiling for sm_90 (ptxas; tests/kernels/test_kernels_compile.py compiles exactly these), not yet timed
# on a GPU. Under the interpreter they only decide how many masked tiles a test walks through.

# Largest padded channel count that the single-pass backward holds in registers (W^-1, W^T, gW: C x C each).
FUSED_BACKWARD_MAX_C_BLOCK = 64


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
# Launcher


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
    y = check_activation("y", y)
    grad_y = check_activation("grad_y", grad_y, y.shape)
    c = y.shape[1]
    scale = check_param("scale", scale, (c,), y.device)
    bias = check_param("bias", bias, (c,), y.device)
    weight = check_param("weight", weight, (c, c), y.device)
    weight_inv = check_param("weight_inv", weight_inv, (c, c), y.device)
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
        C_BLOCK=c_block, BLOCK_P=tiles.block_p, USE_DOT=tiles.use_dot, DOT_PRECISION=dot_precision(),
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
        DOT_PRECISION=dot_precision(), num_warps=tiles.num_warps,
    )

    num_p_blocks = triton.cdiv(hw, tiles.grad_weight_block_p)
    num_tiles = n * num_p_blocks
    g = max(1, min(num_tiles, _num_programs_persistent(y.device, num_tiles) // (num_c_blocks * num_c_blocks) + 1))
    part_gw = torch.empty((g, c, c), device=y.device, dtype=torch.float32)
    _actnorm_conv1x1_grad_weight_kernel[(num_c_blocks * num_c_blocks, g)](
        grad_y, x, scale, bias, part_gw, c, hw, num_c_blocks, num_p_blocks, num_tiles,
        BLOCK_C=tiles.block_c, BLOCK_P=tiles.grad_weight_block_p, DOT_PRECISION=dot_precision(),
        num_warps=tiles.num_warps,
    )
    return x, grad_x, part_gs, part_gb, part_gw
