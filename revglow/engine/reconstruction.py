"""The reconstruction check: is the input the reversible backward rebuilt the input the forward saw?

Affine flows can become numerically non-invertible in training (Behrmann et al., 2021, "Understanding and
mitigating exploding inverses in invertible neural networks"). With `check` "warn" or "raise" a sequence keeps a
small fingerprint of every sample of its input (its norm and about sqrt(D) random projections, so memory is
O(batch) and constant in depth) and compares it with the same fingerprint of the input rebuilt in backward. The
per-sample relative errors stay on the device (`last_reconstruction_error`); "raise" reads them at once (one
host-device sync per sequence and backward) and raises; "warn" reads them only once they have reached the host
without stalling the device (at once on the CPU; on CUDA by the next forward of the sequence at the latest), so a
training step makes no synchronization.

The tolerance follows the precision the networks ran in (`reconstruction_tolerance`): a rebuilt input differs from
the real one by the rounding of the networks' outputs, amplified by the flow over its steps, so a healthy run under
bfloat16 autocast sits near 2e-3 where a float32 one sits near 1e-6.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["ReconstructionError", "ReconstructionWarning", "Fingerprint", "HostCopy", "reconstruction_message",
           "reconstruction_tolerance", "FLOAT32_TOLERANCE", "AUTOCAST_TOLERANCE_EPS"]

Tensor = torch.Tensor

# Without autocast: a healthy float32 flow rebuilds its input to ~1e-6; 1e-3 leaves room and still catches a flow
# that has become non-invertible (its errors grow to O(1) within a few steps).
FLOAT32_TOLERANCE = 1e-3
# Under autocast: this many machine epsilons of the autocast dtype (bfloat16: 2^-7 -> 0.125, float16: 2^-10 ->
# 0.0156). Healthy runs measured on the CPU (float32 flow, networks under autocast; worst sample of every
# backward): Glow on the digits (levels 2, depth 8 and 32, hidden 64, Adam 3e-3 with warmup, 100-150 steps) at
# most 0.47 eps (bfloat16 2.1e-3, float16 4.6e-4); a stack of 8 or 32 TwoNetworkCouplings (conv nets, Adam 1e-3)
# at most 1.4 eps; the stress case, Glow of depth 32 on uniform noise at 2e-3, 5.4 eps (float16) within 10 steps
# before its error kept growing (0.27 after 30 steps: a flow going bad, which the check is there to report).
AUTOCAST_TOLERANCE_EPS = 16


def reconstruction_tolerance(autocast_dtype: Optional[torch.dtype]) -> float:
    """The default tolerance of the check (`tol=None`) for a forward that ran with autocast in `autocast_dtype`
    (None: without autocast).

    Example:
        >>> reconstruction_tolerance(None), reconstruction_tolerance(torch.bfloat16)
        (0.001, 0.125)
    """
    if autocast_dtype is None or not autocast_dtype.is_floating_point:
        return FLOAT32_TOLERANCE
    return max(FLOAT32_TOLERANCE, AUTOCAST_TOLERANCE_EPS * torch.finfo(autocast_dtype).eps)


class ReconstructionError(RuntimeError):
    """The input rebuilt by the reversible backward differs from the real input by more than the tolerance."""


class ReconstructionWarning(RuntimeWarning):
    """Same as ReconstructionError, under check="warn"."""


class Fingerprint:
    """Per-sample fingerprint of a tensor [N, ...]: its L2 norm and 2 x M random projections of the sample
    viewed as [M, L] (L the largest divisor of D <= sqrt(D)), each projection over L entries with random signs.

    For an error e of a sample, sum over the 2M projections of (r . e)^2 / 2 is an unbiased estimate of |e|^2
    with about 2M degrees of freedom, exact when the error sits on one entry; the fingerprint costs one
    multiply-add per entry and 2M + 1 numbers per sample.
    """

    _signs_cache: Dict[tuple, Tensor] = {}

    @staticmethod
    def _signs(shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        d = math.prod(shape)
        key = (d, dtype, str(device))
        signs = Fingerprint._signs_cache.get(key)
        if signs is None:
            length = max(k for k in range(1, max(1, math.isqrt(d)) + 1) if d % k == 0)
            # a private generator: the check must not move the caller's RNG stream
            g = torch.Generator().manual_seed(0x5EED)
            bits = torch.randint(0, 2, (2, d // length, length), generator=g)
            with torch.inference_mode(False):
                signs = (bits * 2 - 1).to(dtype=dtype, device=device)
            Fingerprint._signs_cache[key] = signs
        return signs

    def __init__(self, x: Tensor):
        x = x.detach()
        if not x.is_floating_point():
            x = x.double()
        signs = self._signs(tuple(x.shape[1:]), x.dtype, x.device)
        flat = x.reshape(1, x.shape[0], signs.shape[1], signs.shape[2])
        self.projections = (flat * signs.unsqueeze(1)).sum(-1)   # [2, N, M]
        self.norm = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)   # [N]

    def relative_error(self, rebuilt: Tensor) -> Tensor:
        """Estimated |rebuilt - x| / |x| per sample, [N], on the device; NaN in the rebuilt input gives inf."""
        other = Fingerprint(rebuilt.to(self.norm.dtype))
        squared = (other.projections - self.projections).square().sum(dim=(0, 2)) / 2
        norm_gap = (other.norm - self.norm).abs()   # a lower bound of |e|, exact for a pure rescaling
        err = torch.maximum(squared.sqrt(), norm_gap) / self.norm.clamp_min(torch.finfo(self.norm.dtype).tiny)
        return torch.nan_to_num(err, nan=math.inf)


class HostCopy:
    """A small device tensor on its way to the host without stalling the device: a non-blocking copy into
    pinned memory and an event; `ready()` asks the event without waiting. On the CPU it is there at once."""

    def __init__(self, tensor: Tensor):
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = tensor.detach(), None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def values(self) -> list:
        return self.host.tolist()   # a host tensor: no device synchronization


def reconstruction_message(errors: List[float], tol: float) -> str:
    bad = [i for i, e in enumerate(errors) if not e <= tol]
    worst = max(errors[i] for i in bad)
    which = ", ".join(str(i) for i in bad[:8]) + (", ..." if len(bad) > 8 else "")
    return (f"revglow reversible engine: the input rebuilt in backward differs from the real input by relative "
            f"error up to {worst:.3g} (tolerance {tol:g}) in sample(s) {which} of {len(errors)}; the flow has become "
            f"numerically non-invertible there and the gradients are wrong. Lower the learning rate, use additive "
            f"coupling, or train this model with memory='checkpoint'")
