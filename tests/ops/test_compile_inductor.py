"""torch.compile's default backend (inductor) lowers the edge-padded convolution with dynamic shapes.

The rest of the compile tests trace with the "eager" backend, which does not lower; inductor once failed on the padded
concatenation as soon as a second shape made the sizes dynamic ("ValueRangeError: Invalid ranges [0:-1]").
One small function is compiled here (a few seconds of C++ compilation) rather than a whole model.
"""
import pytest
import torch

from revglow.ops.conv_same import conv2d_same

pytestmark = pytest.mark.long(3, share="dynamo")


@pytest.mark.slow
def test_edge_padded_convolution_compiles_with_dynamic_shapes():
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w, b: conv2d_same(x, w, b, True), backend="inductor", dynamic=True,
                             fullgraph=True)
    weight, bias = torch.randn(8, 3 + 1, 3, 3), torch.randn(8)     # 3 channels in, 8 out: the concatenating form
    for n, size in ((2, 4), (3, 6)):
        x = torch.randn(n, 3, size, size)
        torch.testing.assert_close(compiled(x, weight, bias), conv2d_same(x, weight, bias, True))
