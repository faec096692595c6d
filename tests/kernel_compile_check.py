"""Compile every Triton kernel of revglow.kernels, in the configurations its launchers use, for an NVIDIA
target, without a GPU: `python tests/kernel_compile_check.py [arch]` (default 90, Hopper).

The Triton interpreter runs kernels on the CPU but checks little of what the GPU compiler enforces (layouts,
tl.dot shapes, register allocation). This goes through the real pipeline down to ptxas, so a kernel that
would not compile on a GPU fails here, and prints each kernel's registers and spill stack (cuobjdump).
Must run in a process where TRITON_INTERPRET is unset (an interpreted @triton.jit cannot be compiled).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("kernel_compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from revglow.kernels import actnorm_conv1x1 as an  # noqa: E402
from revglow.kernels import actnorm_conv1x1_backward as anb  # noqa: E402
from revglow.kernels import coupling_affine as cp  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _compile(kernel, pointer_types, constexprs, num_warps, arch):
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("C", "HW") or name.startswith(("NUM", "STRIDE")):  # integer arguments
            signature[name] = "i32"
        else:  # tensors
            signature[name] = pointer_types.get(name, "*fp32")
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _resources(compiled) -> str:
    if not os.path.exists(CUOBJDUMP) or "cubin" not in compiled.asm:
        return "compiled"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"registers {m.group(1)}, spill stack {m.group(2)} B" if m else "compiled"


def configurations():
    """(label, kernel, pointer dtypes, constexprs, num_warps) for every configuration the launchers use."""
    precision = an.dot_precision()
    for c in (4, 8, 12, 24, 48, 96, 192, 384):
        t = an.mix_tiles(c)
        yield (f"channel mix C={c}", an._channel_affine_mix_kernel, {},
               dict(BLOCK_CO=t.block_co, BLOCK_K=t.block_k, BLOCK_P=t.block_p, USE_DOT=t.use_dot,
                    DOT_PRECISION=precision), t.num_warps)
    for c_block in (4, 8, 16, 32, 64):
        t = anb.fused_backward_tiles(c_block)
        for write_x in (True, False):
            yield (f"fused backward C_BLOCK={c_block} WRITE_X={write_x}", anb._actnorm_conv1x1_bwd_fused_kernel, {},
                   dict(C_BLOCK=c_block, BLOCK_P=t.block_p, USE_DOT=t.use_dot, DOT_PRECISION=precision,
                        WRITE_X=write_x), t.num_warps)
    wide = anb.WIDE_BACKWARD_TILES
    yield ("wide backward rebuild", anb._actnorm_conv1x1_bwd_rebuild_kernel, {},
           dict(BLOCK_C=wide.block_c, BLOCK_K=wide.block_k, BLOCK_P=wide.rebuild_block_p, DOT_PRECISION=precision),
           wide.num_warps)
    yield ("wide backward grad_weight", anb._actnorm_conv1x1_grad_weight_kernel, {},
           dict(BLOCK_C=wide.block_c, BLOCK_P=wide.grad_weight_block_p, DOT_PRECISION=precision), wide.num_warps)
    for h_type in ("*fp32", "*bf16"):
        for inverse in (False, True):
            yield (f"coupling {'inverse' if inverse else 'forward'} h {h_type[1:]}", cp._coupling_affine_fwd_kernel,
                   {"H": h_type}, dict(BLOCK=cp._BLOCK, INVERSE=inverse), 4)
        for write_xa in (True, False):
            yield (f"coupling backward h {h_type[1:]} WRITE_XA={write_xa}", cp._coupling_affine_bwd_kernel,
                   {"H": h_type}, dict(BLOCK=cp._BLOCK, WRITE_XA=write_xa), 4)


def main(arch: int = 90) -> int:
    for label, kernel, pointer_types, constexprs, num_warps in configurations():
        compiled = _compile(kernel, pointer_types, constexprs, num_warps, arch)
        print(f"sm_{arch} {label}: {_resources(compiled)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
