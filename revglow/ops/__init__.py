"""Fused flow operations, one submodule per op: the pure-PyTorch reference, the autograd wiring, and the
dispatch to Triton kernels (`revglow.ops.actnorm_conv1x1`, `revglow.ops.coupling_affine`,
`revglow.ops.coupling_network`; the backend choice in `revglow.ops.dispatch`)."""
