"""Fused flow operations: pure-PyTorch references, autograd wiring, and dispatch to Triton kernels."""
from revglow.ops.actnorm_conv1x1 import *  # noqa: F401,F403
from revglow.ops.coupling_affine import *  # noqa: F401,F403
from revglow.ops.dispatch import resolve_backend, triton_available  # noqa: F401
