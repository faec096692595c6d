"""Triton kernels and their launchers (no autograd here). Installed as revglow.kernels.

One module per fused op; each exports plain launcher functions that check shapes, pick block sizes, allocate
outputs and launch. The pure-PyTorch references and the autograd wiring live in revglow/ops/.
"""
from revglow.kernels.actnorm_conv1x1 import (  # noqa: F401
    actnorm_conv1x1_forward_launch,
    actnorm_conv1x1_inverse_launch,
)
from revglow.kernels.actnorm_conv1x1_backward import actnorm_conv1x1_reversible_backward_launch  # noqa: F401
from revglow.kernels.coupling_affine import (  # noqa: F401
    coupling_affine_forward_launch,
    coupling_affine_inverse_launch,
    coupling_affine_reversible_backward_launch,
)

__all__ = [
    "actnorm_conv1x1_forward_launch",
    "actnorm_conv1x1_inverse_launch",
    "actnorm_conv1x1_reversible_backward_launch",
    "coupling_affine_forward_launch",
    "coupling_affine_inverse_launch",
    "coupling_affine_reversible_backward_launch",
]
