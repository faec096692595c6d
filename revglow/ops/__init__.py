"""Fused flow operations, one submodule per op: the pure-PyTorch reference, the autograd wiring, and the
dispatch to Triton kernels (`revglow.ops.actnorm_conv1x1`, `revglow.ops.coupling_affine`)."""
from revglow.ops import actnorm_conv1x1, coupling_affine  # noqa: F401
from revglow.ops.dispatch import resolve_backend, triton_available  # noqa: F401

__all__ = ["actnorm_conv1x1", "coupling_affine", "resolve_backend", "triton_available"]
