"""Random weight arguments for revglow.ops.coupling_network (the order of coupling_network_reference's), shared by
the op's tests."""
import torch


def coupling_network_weights(c_in, c_out, hidden, actnorm, edge_padding, out_scale=True, dtype=torch.float64,
                             seed=3):
    """[w_in, b_in, s_in, t_in, w_hidden, b_hidden, s_hidden, t_hidden, w_out, b_out, s_out], leaves that require
    grad: convolution biases without ActNorm, ActNorm scales (in [0.5, 1.5)) and shifts with it, the last layer's
    output scale with `out_scale`; None for the others. Weights and shifts are N(0, 0.4^2)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, low=None):
        t = torch.randn(*shape, generator=g, dtype=dtype) * 0.4 if low is None else \
            torch.rand(*shape, generator=g, dtype=dtype) + low
        return t.requires_grad_(True)

    e = int(edge_padding)
    return [rand(hidden, c_in + e, 3, 3), None if actnorm else rand(hidden), rand(hidden, low=0.5) if actnorm else None,
            rand(hidden) if actnorm else None, rand(hidden, hidden, 1, 1), None if actnorm else rand(hidden),
            rand(hidden, low=0.5) if actnorm else None, rand(hidden) if actnorm else None,
            rand(c_out, hidden + e, 3, 3), rand(c_out), rand(c_out, low=0.5) if out_scale else None]
