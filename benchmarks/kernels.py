"""GPU benchmark of the fused Triton kernels against the eager PyTorch references they replace.

Question: does each fused kernel move its data at close to the memory bandwidth of the GPU (target: >= 75%
of a device-to-device copy measured in the same run) and beat eager PyTorch (target: >= 2x)?

Per op (actnorm_conv1x1, coupling_affine) and direction (forward, inverse, reversible backward): median time
of triton.testing.do_bench for the Triton launcher and for the eager reference, and the achieved bandwidth
from an explicit count of the bytes that must move (each input read once, each output written once; the
per-program partial sums of the reductions are scratch and not counted). A copy of the activation,
torch.empty_like(x).copy_(x), counted as one read plus one write, gives the attainable bandwidth.
A last section times one Adam training step of a reversible Glow at 256 x 256 with kernels="torch" and
kernels="triton".

Prints a table of ratios and appends one JSON line per measurement (GPU, date, git revision, versions, op,
direction, provider, shape, ms, GB/s) to benchmarks/results/kernels.jsonl.

Usage (needs a CUDA GPU):
    python benchmarks/kernels.py                 # everything
    python benchmarks/kernels.py --no-train-step # kernels only
    python benchmarks/kernels.py --quick         # fewer shapes, shorter timing
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results", "kernels.jsonl")
FLOAT32 = 4

# (channels C of the flow step, batch, height, width). The coupling acts on Ca = C / 2 channels, with h of
# C channels. 12 and 48 channels are Glow's first two levels on RGB; 192 occurs at a lower resolution.
SHAPES = [(12, 16, 128, 128), (48, 16, 128, 128), (192, 16, 32, 32)]
QUICK_SHAPES = [(12, 16, 128, 128), (48, 16, 64, 64)]
DIRECTIONS = ("forward", "inverse", "backward")


# ----------------------------------------------------------------------------------------------------------
# Bytes that must move (pure functions; tested on the CPU)


def _dtype_size(dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def actnorm_conv1x1_bytes(n: int, c: int, h: int, w: int, direction: str) -> int:
    """Minimum DRAM traffic of one call: activations read / written once, parameters read once.

    forward:  read x, write y;           parameters s, b, W
    inverse:  read y, write x;           parameters s, b, W^-1
    backward: read y, dL/dy; write x, dL/dx; read s, b, W, W^-1; write dL/ds, dL/db, dL/dW
    """
    act = n * c * h * w * FLOAT32
    if direction in ("forward", "inverse"):
        return 2 * act + (c * c + 2 * c) * FLOAT32
    if direction == "backward":
        return 4 * act + (2 * c * c + 2 * c) * FLOAT32 + (c * c + 2 * c) * FLOAT32
    raise ValueError(f"unknown direction {direction!r}")


def coupling_affine_bytes(n: int, ca: int, h: int, w: int, direction: str, h_dtype=torch.float32) -> int:
    """Minimum DRAM traffic of one call; xa / ya and their gradients float32, h in h_dtype, dL/dh float32.

    forward / inverse: read xa (ya) and h, write ya (xa) and logdet [N]
    backward:          read ya, h, dL/dya, dL/dlogdet; write xa, dL/dxa, dL/dh
    """
    half = n * ca * h * w
    h_bytes = 2 * half * _dtype_size(h_dtype)
    if direction in ("forward", "inverse"):
        return 2 * half * FLOAT32 + h_bytes + n * FLOAT32
    if direction == "backward":
        return 2 * half * FLOAT32 + h_bytes + n * FLOAT32 + 2 * half * FLOAT32 + 2 * half * FLOAT32
    raise ValueError(f"unknown direction {direction!r}")


def copy_bytes(numel: int, dtype=torch.float32) -> int:
    """A device-to-device copy reads and writes every element once."""
    return 2 * numel * _dtype_size(dtype)


def gbps(num_bytes: int, ms: float) -> float:
    return num_bytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Row:
    op: str
    direction: str
    shape: str
    triton_ms: float
    torch_ms: float
    triton_gbps: float
    torch_gbps: float
    copy_gbps: float
    max_rel_err: float


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernels.py needs a CUDA GPU: torch.cuda.is_available() is False on this "
                         "machine (the Triton interpreter is far too slow to time). Run the correctness tests "
                         "instead: TRITON_INTERPRET=1 python -m pytest tests/kernels/")
    return torch.device("cuda")


def _bench(fn: Callable[[], object], quick: bool) -> float:
    from triton.testing import do_bench

    if quick:
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _rel_err(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(_rel_err(x, y) for x, y in zip(a, b))
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _actnorm_conv1x1_cases(shape, device):
    from revglow.kernels import actnorm_conv1x1 as k
    from revglow.kernels import actnorm_conv1x1_backward as kb
    from revglow.ops import actnorm_conv1x1 as ref

    c, n, h, w = shape
    x = torch.randn(n, c, h, w, device=device)
    scale = torch.exp(0.5 * torch.randn(c, device=device))
    bias = torch.randn(c, device=device)
    q, _ = torch.linalg.qr(torch.randn(c, c, device=device, dtype=torch.float64))
    weight = (q + 0.1 * torch.randn_like(q) / c ** 0.5)
    weight_inv = torch.linalg.inv(weight).float()
    weight = weight.float()
    y = ref.actnorm_conv1x1_reference(x, scale, bias, weight)
    grad_y = torch.randn_like(y)
    return {
        "forward": (lambda: k.actnorm_conv1x1_forward_launch(x, scale, bias, weight),
                    lambda: ref.actnorm_conv1x1_reference(x, scale, bias, weight)),
        "inverse": (lambda: k.actnorm_conv1x1_inverse_launch(y, scale, bias, weight_inv),
                    lambda: ref.actnorm_conv1x1_inverse_reference(y, scale, bias, weight_inv)),
        "backward": (lambda: kb.actnorm_conv1x1_reversible_backward_launch(y, grad_y, scale, bias, weight, weight_inv),
                     lambda: ref.actnorm_conv1x1_reversible_backward_reference(y, grad_y, scale, bias, weight,
                                                                               weight_inv)),
    }, {d: actnorm_conv1x1_bytes(n, c, h, w, d) for d in DIRECTIONS}, x


def _coupling_affine_cases(shape, device, h_dtype):
    from revglow.kernels import coupling_affine as k
    from revglow.ops import coupling_affine as ref

    c, n, hh, ww = shape
    ca = c // 2
    xa = torch.randn(n, ca, hh, ww, device=device)
    h = (2.0 * torch.randn(n, 2 * ca, hh, ww, device=device)).to(h_dtype)
    ya, _ = ref.coupling_affine_reference(xa, h)
    grad_ya = torch.randn_like(ya)
    grad_logdet = torch.randn(n, device=device)
    return {
        "forward": (lambda: k.coupling_affine_forward_launch(xa, h),
                    lambda: ref.coupling_affine_reference(xa, h)),
        "inverse": (lambda: k.coupling_affine_inverse_launch(ya, h),
                    lambda: ref.coupling_affine_inverse_reference(ya, h)),
        "backward": (lambda: k.coupling_affine_reversible_backward_launch(ya, h, grad_ya, grad_logdet),
                     lambda: ref.coupling_affine_reversible_backward_reference(ya, h, grad_ya, grad_logdet)),
    }, {d: coupling_affine_bytes(n, ca, hh, ww, d, h_dtype) for d in DIRECTIONS}, xa


def _record(fh, env, **fields) -> None:
    fh.write(json.dumps({**env, **fields}) + "\n")
    fh.flush()


def bench_kernels(shapes: Sequence, quick: bool, fh, env) -> List[Row]:
    device = require_cuda()
    rows: List[Row] = []
    for shape in shapes:
        c, n, h, w = shape
        suites = [("actnorm_conv1x1", "float32", *_actnorm_conv1x1_cases(shape, device))]
        for h_dtype in (torch.float32, torch.bfloat16):
            suites.append(("coupling_affine", str(h_dtype).replace("torch.", ""),
                           *_coupling_affine_cases(shape, device, h_dtype)))
        for op, h_dtype_name, cases, nbytes, act in suites:
            # Attainable bandwidth: a copy of this op's activation, in the same run.
            copy_ms = _bench(lambda: torch.empty_like(act).copy_(act), quick)
            copy_bw = gbps(copy_bytes(act.numel(), act.dtype), copy_ms)
            shape_str = f"{op_shape(op, shape)}"
            _record(fh, env, op="copy", direction="-", provider="torch", shape=list(act.shape), dtype="float32",
                    ms=copy_ms, gbps=copy_bw, bytes=copy_bytes(act.numel(), act.dtype))
            for direction in DIRECTIONS:
                triton_fn, torch_fn = cases[direction]
                err = _rel_err(triton_fn(), torch_fn())
                t_ms = _bench(triton_fn, quick)
                r_ms = _bench(torch_fn, quick)
                for provider, ms in (("triton", t_ms), ("torch", r_ms)):
                    _record(fh, env, op=op, direction=direction, provider=provider, shape=list(shape),
                            h_dtype=h_dtype_name, ms=ms, gbps=gbps(nbytes[direction], ms), bytes=nbytes[direction],
                            copy_gbps=copy_bw, max_rel_err=err)
                name = op if op == "actnorm_conv1x1" else f"{op}[h {h_dtype_name}]"
                rows.append(Row(name, direction, shape_str, t_ms, r_ms, gbps(nbytes[direction], t_ms),
                                gbps(nbytes[direction], r_ms), copy_bw, err))
    return rows


def op_shape(op: str, shape) -> str:
    c, n, h, w = shape
    return f"N={n} C={c} {h}x{w}" if op == "actnorm_conv1x1" else f"N={n} Ca={c // 2} {h}x{w}"


def print_table(rows: List[Row]) -> None:
    header = (f"{'op':<28} {'dir':<9} {'shape':<22} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} "
              f"{'triton GB/s':>12} {'torch GB/s':>11} {'copy GB/s':>10} {'of copy':>8} {'rel err':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.op:<28} {r.direction:<9} {r.shape:<22} {r.triton_ms:>10.4f} {r.torch_ms:>10.4f} "
              f"{r.torch_ms / r.triton_ms:>7.2f}x {r.triton_gbps:>12.1f} {r.torch_gbps:>11.1f} {r.copy_gbps:>10.1f} "
              f"{r.triton_gbps / r.copy_gbps:>7.0%} {r.max_rel_err:>9.1e}")
    misses = [r for r in rows if r.triton_gbps < 0.75 * r.copy_gbps or r.torch_ms < 2.0 * r.triton_ms]
    print(f"\ntargets (>= 75% of copy bandwidth and >= 2x eager): {len(rows) - len(misses)}/{len(rows)} met")
    for r in misses:
        print(f"  missed: {r.op} {r.direction} {r.shape}: {r.triton_gbps / r.copy_gbps:.0%} of copy, "
              f"{r.torch_ms / r.triton_ms:.2f}x eager")


# ----------------------------------------------------------------------------------------------------------
# One training step of a reversible Glow


def bench_train_step(batch: int, steps: int, fh, env, image_size: int = 256) -> None:
    from revglow import Glow, GlowConfig

    device = require_cuda()
    print(f"\nGlow training step: image 3x{image_size}x{image_size}, levels=6, depth=4, hidden=512, "
          f"memory='reversible', batch {batch}, Adam")
    print(f"{'kernels':<8} {'median ms':>10} {'min ms':>9} {'peak MiB':>9} {'loss':>9}")
    results = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = GlowConfig(image_shape=(3, image_size, image_size), levels=6, depth=4, hidden=512,
                         memory="reversible", kernels=kernels)
        model = Glow(cfg).to(device)
        x = torch.rand(batch, 3, image_size, image_size, device=device, generator=None)
        model.initialize(x)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(x).mean()
            loss.backward()
            opt.step()
            return loss

        for _ in range(3):  # warm-up: Triton compilation, cuBLAS / allocator caches
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        times.sort()
        median = times[len(times) // 2]
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        results[kernels] = median
        print(f"{kernels:<8} {median:>10.1f} {times[0]:>9.1f} {peak:>9.0f} {loss.item():>9.4f}")
        _record(fh, env, op="glow_train_step", direction="forward+backward+adam", provider=kernels,
                shape=[batch, 3, image_size, image_size], config="levels=6 depth=4 hidden=512 memory=reversible",
                ms=median, min_ms=times[0], peak_mib=peak, loss=loss.item())
        del model, opt, x
        torch.cuda.empty_cache()
    print(f"triton / torch step-time speedup: {results['torch'] / results['triton']:.2f}x")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timing")
    parser.add_argument("--no-train-step", action="store_true", help="skip the Glow training-step section")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--results", default=RESULTS, help="JSON-lines file to append to")
    parser.add_argument("--dot-precision", default="ieee", choices=("ieee", "tf32x3"),
                        help="tl.dot input_precision of the actnorm_conv1x1 kernels (tf32x3: NVIDIA only)")
    args = parser.parse_args(argv)

    require_cuda()
    # The eager references must run in float32 too: no TF32 in cuBLAS (the kernels use IEEE float32 dots).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from revglow.kernels import actnorm_conv1x1 as actnorm_conv1x1_kernels

    actnorm_conv1x1_kernels.DOT_INPUT_PRECISION = args.dot_precision
    env = environment("cuda")
    env["dot_precision"] = args.dot_precision
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, git {env['git']}, {env['date']}, "
          f"tl.dot input_precision {args.dot_precision}")
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a", encoding="utf-8") as fh:
        rows = bench_kernels(QUICK_SHAPES if args.quick else SHAPES, args.quick, fh, env)
        print_table(rows)
        if not args.no_train_step:
            bench_train_step(args.train_batch, 3 if args.quick else args.train_steps, fh, env)
    print(f"\nappended to {args.results}")


if __name__ == "__main__":
    main()
