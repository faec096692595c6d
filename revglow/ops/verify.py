"""A self-check of the Triton kernels on the device they are about to run on, against the torch references.

`kernels="auto"` runs it once per device and process before it first picks Triton there (see
`revglow.ops.dispatch`): a Triton or driver version, or a GPU architecture, that the kernels were never tested
on can fail to compile them or, worse, compile them into something that computes a wrong answer, and the
reversible engine would then rebuild every activation from wrong numbers without any error. The check runs
every launcher of revglow.kernels (forward, inverse and reversible backward of actnorm_conv1x1 and
coupling_affine; additive coupling has no kernel) on small random float32 tensors, over the shapes that
select different kernels or specializations (fewer than 16 channels: broadcast products; up to 64:
single-pass tl.dot; above 64: the two-pass backward; h in bfloat16; writes into channel slices), and compares
each output with the reference computed in float64 on the CPU.

Example (CPU tensors need TRITON_INTERPRET=1 set before triton is imported)::

    ok, reason = verify_triton_kernels("cuda")
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, List, Tuple

import torch

from revglow.ops.actnorm_conv1x1 import (
    actnorm_conv1x1_inverse_reference,
    actnorm_conv1x1_reference,
    actnorm_conv1x1_reversible_backward_reference,
)
from revglow.ops.coupling_affine import (
    coupling_affine_inverse_reference,
    coupling_affine_reference,
    coupling_affine_reversible_backward_reference,
)

__all__ = ["verify_triton_kernels", "LAUNCHERS", "NORMWISE_TOL", "ELEMENTWISE_TOL"]

# The launchers the check calls, looked up by name on the kernels module (revglow.kernels by default; a test
# passes a namespace holding a deliberately broken one).
LAUNCHERS = (
    "actnorm_conv1x1_forward_launch",
    "actnorm_conv1x1_inverse_launch",
    "actnorm_conv1x1_reversible_backward_launch",
    "coupling_affine_forward_launch",
    "coupling_affine_inverse_launch",
    "coupling_affine_reversible_backward_launch",
)

# Tolerances against the float64 reference. Correct float32 kernels on these shapes are within 3e-7 normwise
# and 5e-7 elementwise (the kernel tests hold them to 1e-5); 1e-4 leaves room for a device whose float32
# arithmetic differs (FMA contraction, the opt-in tf32x3 dots at ~1e-6), while a real defect (a dropped term,
# a wrong index or mask, a race) is off by 1e-2 or more. The elementwise bound is relative to the largest
# reference magnitude (entries of a reduction can be near zero): it catches an error confined to a few
# elements (a bad mask on the last tile), which the norm over a few hundred elements dilutes ~10x.
NORMWISE_TOL = 1e-4
ELEMENTWISE_TOL = 1e-4

# (channels, batch, height, width) of the actnorm_conv1x1 cases: 6 channels take the broadcast-product
# kernels (fewer than 16 after padding), 48 the single-pass tl.dot ones, 96 the two-pass backward (C > 64).
# 5 x 7 pixels: odd, so every pixel mask is exercised; batch 2 so per-sample offsets are.
_ACTNORM_SHAPES = ((6, 2, 5, 7), (48, 2, 5, 7), (96, 2, 5, 7))
# (Ca, batch, height, width) of the coupling cases.
_COUPLING_SHAPE = (6, 2, 5, 7)
# A value the kernels must not write over: the untouched half of a tensor whose other half they write into.
_SENTINEL = 7.0


class _Mismatch(Exception):
    """A kernel output that disagrees with the reference; the message says which and by how much."""


def _compare(what: str, actual, expected: torch.Tensor) -> None:
    if not isinstance(actual, torch.Tensor):
        raise _Mismatch(f"{what}: returned {type(actual).__name__}, expected a tensor")
    if tuple(actual.shape) != tuple(expected.shape):
        raise _Mismatch(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    b = expected.detach().to("cpu", torch.float64)
    if not torch.isfinite(a).all():
        raise _Mismatch(f"{what}: {int((~torch.isfinite(a)).sum())} non-finite values")
    diff = (a - b).abs()
    largest = b.abs().max().clamp_min(1e-30)
    normwise = float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))
    if normwise > NORMWISE_TOL:
        raise _Mismatch(f"{what}: normwise relative error {normwise:.2e} > {NORMWISE_TOL:.0e}")
    elementwise = float(diff.max() / largest)
    if elementwise > ELEMENTWISE_TOL:
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise _Mismatch(f"{what}: element {worst} off by {elementwise:.2e} of the largest magnitude "
                        f"> {ELEMENTWISE_TOL:.0e} (normwise {normwise:.2e})")


def _actnorm_params(c: int, gen: torch.Generator):
    """(scale, bias, weight, weight_inv) in float32: scales spread around 1, a well-conditioned weight (a random
    rotation plus a small perturbation) and its inverse, so float32 errors stay near rounding."""
    scale = torch.exp(torch.rand(c, generator=gen, dtype=torch.float64) * 1.8 - 0.9)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
    weight = q + 0.1 * torch.randn(c, c, generator=gen, dtype=torch.float64) / c ** 0.5
    return tuple(t.float() for t in (scale, bias, weight, torch.linalg.inv(weight)))


def _check_actnorm_conv1x1(k, device: torch.device, gen: torch.Generator, shape) -> List[Tuple[str, Callable]]:
    c, n, height, width = shape
    scale, bias, weight, weight_inv = _actnorm_params(c, gen)
    x = torch.randn(n, c, height, width, generator=gen)
    y = actnorm_conv1x1_reference(x.double(), scale.double(), bias.double(), weight.double()).float()
    grad_y = torch.randn(n, c, height, width, generator=gen)
    f64 = [t.double() for t in (scale, bias, weight, weight_inv)]
    dev = [t.to(device) for t in (scale, bias, weight, weight_inv)]
    name = f"actnorm_conv1x1 {{}} (C={c})"

    def forward():
        _compare(name.format("forward") + " y", k.actnorm_conv1x1_forward_launch(x.to(device), *dev[:3]),
                 actnorm_conv1x1_reference(x.double(), *f64[:3]))

    def inverse():
        _compare(name.format("inverse") + " x",
                 k.actnorm_conv1x1_inverse_launch(y.to(device), dev[0], dev[1], dev[3]),
                 actnorm_conv1x1_inverse_reference(y.double(), f64[0], f64[1], f64[3]))

    def backward():
        expected = actnorm_conv1x1_reversible_backward_reference(y.double(), grad_y.double(), *f64)
        got = k.actnorm_conv1x1_reversible_backward_launch(y.to(device), grad_y.to(device), *dev)
        for part, a, b in zip(("x", "grad_x", "grad_scale", "grad_bias", "grad_weight"), got, expected):
            _compare(name.format("reversible backward") + " " + part, a, b)
        # The autograd Function's variant, which writes only the gradients.
        got = k.actnorm_conv1x1_reversible_backward_launch(y.to(device), grad_y.to(device), *dev,
                                                           return_input=False)
        for part, a, b in zip(("grad_x", "grad_scale", "grad_bias", "grad_weight"), got[1:], expected[1:]):
            _compare(name.format("reversible backward, return_input=False") + " " + part, a, b)

    return [(name.format("forward"), forward), (name.format("inverse"), inverse),
            (name.format("reversible backward"), backward)]


def _check_coupling_affine(k, device: torch.device, gen: torch.Generator, h_dtype) -> List[Tuple[str, Callable]]:
    ca, n, hh, ww = _COUPLING_SHAPE
    xa = torch.randn(n, ca, hh, ww, generator=gen)
    h = torch.randn(n, 2 * ca, hh, ww, generator=gen).to(h_dtype)
    h64 = h.double()  # the reference reads exactly the values the kernel reads
    ya = coupling_affine_reference(xa.double(), h64)[0].float()
    grad_ya = torch.randn(n, ca, hh, ww, generator=gen)
    grad_logdet = torch.randn(n, generator=gen)
    name = f"coupling_affine {{}} (h {str(h_dtype).replace('torch.', '')})"

    def into_half(what, launch, *args):
        # The layers pass `out=` a channel slice of the step's full output, in place of a torch.cat: the kernel
        # must write that half and nothing else.
        full = torch.full((n, 2 * ca, hh, ww), _SENTINEL, device=device)
        result = launch(*args, out=full[:, ca:])
        if not (full[:, :ca] == _SENTINEL).all():
            raise _Mismatch(f"{what}: wrote outside the channel slice given as out=")
        return result, full[:, ca:]

    def forward():
        what = name.format("forward")
        expected = coupling_affine_reference(xa.double(), h64)
        got = k.coupling_affine_forward_launch(xa.to(device), h.to(device))
        _compare(what + " ya", got[0], expected[0])
        _compare(what + " logdet", got[1], expected[1])
        (_, logdet), written = into_half(what, k.coupling_affine_forward_launch, xa.to(device), h.to(device))
        _compare(what + " ya written into out=", written, expected[0])
        _compare(what + " logdet with out=", logdet, expected[1])

    def inverse():
        what = name.format("inverse")
        expected = coupling_affine_inverse_reference(ya.double(), h64)
        got = k.coupling_affine_inverse_launch(ya.to(device), h.to(device))
        _compare(what + " xa", got[0], expected[0])
        _compare(what + " logdet", got[1], expected[1])
        _, written = into_half(what, k.coupling_affine_inverse_launch, ya.to(device), h.to(device))
        _compare(what + " xa written into out=", written, expected[0])

    def backward():
        what = name.format("reversible backward")
        expected = coupling_affine_reversible_backward_reference(ya.double(), h64, grad_ya.double(),
                                                                 grad_logdet.double())
        args = (ya.to(device), h.to(device), grad_ya.to(device), grad_logdet.to(device))
        got = k.coupling_affine_reversible_backward_launch(*args)
        for part, a, b in zip(("xa", "grad_xa", "grad_h"), got, expected):
            _compare(f"{what} {part}", a, b)
        # As the layers call it: xa and dL/dxa into channel slices of the rebuilt input and its gradient.
        full_x = torch.full((n, 2 * ca, hh, ww), _SENTINEL, device=device)
        full_g = torch.full((n, 2 * ca, hh, ww), _SENTINEL, device=device)
        got = k.coupling_affine_reversible_backward_launch(*args, out_xa=full_x[:, ca:], out_grad_xa=full_g[:, ca:])
        if not ((full_x[:, :ca] == _SENTINEL).all() and (full_g[:, :ca] == _SENTINEL).all()):
            raise _Mismatch(f"{what}: wrote outside the channel slices given as out_xa= / out_grad_xa=")
        _compare(f"{what} xa written into out_xa=", full_x[:, ca:], expected[0])
        _compare(f"{what} grad_xa written into out_grad_xa=", full_g[:, ca:], expected[1])
        _compare(f"{what} grad_h with out_xa=", got[2], expected[2])
        got = k.coupling_affine_reversible_backward_launch(*args, return_input=False)
        _compare(f"{what}, return_input=False grad_xa", got[1], expected[1])
        _compare(f"{what}, return_input=False grad_h", got[2], expected[2])

    return [(name.format("forward"), forward), (name.format("inverse"), inverse),
            (name.format("reversible backward"), backward)]


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[:limit] + "..."


def verify_triton_kernels(device, kernels_module=None) -> Tuple[bool, str]:
    """Run every Triton launcher on `device` on small random float32 tensors and compare with the references.

    Returns (True, a summary) when every output matches, else (False, the first failure: which op and
    direction, and either the error it exceeded or the exception it raised). Never raises for a kernel's
    failure: compile errors, launch errors and wrong results all come back as (False, reason).
    `kernels_module` is any object with the launchers named in LAUNCHERS as attributes (default: the
    revglow.kernels package). Leaves the global RNG state, autocast and grad mode as they were: the inputs
    come from a private generator, and the references are computed on the CPU in float64 (so neither the
    device's matmul settings, e.g. TF32, nor an enclosing autocast region can make the reference the wrong one).
    A few tenths of a second on a GPU once the kernels are compiled (Triton caches them on disk).

    Example:
        >>> verify_triton_kernels("cpu", kernels_module=object())
        (False, "Triton kernels could not be loaded: AttributeError: the kernels module has no 'actnorm_conv1x1_forward_launch'")
    """
    device = torch.device(device)
    try:
        if kernels_module is None:
            kernels_module = importlib.import_module("revglow.kernels")
        for launcher in LAUNCHERS:
            if not callable(getattr(kernels_module, launcher, None)):
                raise AttributeError(f"the kernels module has no {launcher!r}")
    except Exception as exc:  # ImportError, or a Triton that fails at import on this machine
        return False, f"Triton kernels could not be loaded: {type(exc).__name__}: {_first_line(exc)}"

    gen = torch.Generator().manual_seed(20180709)  # fixed: a failure reproduces
    cases: List[Tuple[str, Callable]] = []
    for shape in _ACTNORM_SHAPES:
        cases += _check_actnorm_conv1x1(kernels_module, device, gen, shape)
    for h_dtype in (torch.float32, torch.bfloat16):
        cases += _check_coupling_affine(kernels_module, device, gen, h_dtype)

    # Triton launches on the current CUDA device, which need not be the one the tensors are on.
    current = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), torch.autocast(device.type, enabled=False), current:
        for what, run in cases:
            try:
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # an asynchronous launch error surfaces here, named
            except _Mismatch as exc:
                return False, str(exc)
            except Exception as exc:
                return False, f"{what} raised {type(exc).__name__}: {_first_line(exc)}"
    return True, f"{len(cases)} checks passed (actnorm_conv1x1 and coupling_affine, forward, inverse, " \
                 f"reversible backward) on {device}"

