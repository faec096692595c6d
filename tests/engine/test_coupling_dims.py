"""Coupling blocks on tensors of any rank, split along any non-batch dimension: [N, D], token-major [N, T, D],
images [N, C, H, W], volumes [N, C, D, H, W]. Bijections with the brute-force log-determinant, exact gradients
in the reversible and checkpoint modes, the context concatenated along the split dimension, clear errors, and the
fused ops still serving the image case."""
import math

import pytest
import torch
from torch import nn

from flow_checks import brute_force_logdet, flat_grads, perturb_, rel_err
from revglow import AdditiveCoupling, AffineCoupling, ReversibleSequence, TwoNetworkCoupling
from revglow.ops import coupling_affine

KINDS = ["additive", "affine", "two_network"]
# (shape of x, split dim): every rank, positive and negative dims, the image case (4-D, dim 1) among them
LAYOUTS = [((2, 6), 1), ((2, 5), -1), ((2, 3, 5), -1), ((2, 5, 2), 1), ((2, 5, 2, 2), 1), ((2, 2, 3, 5), -1),
           ((2, 2, 5, 2), 2), ((2, 4, 2, 2, 2), 1), ((2, 2, 3, 2, 2), -4)]
LAYOUT_IDS = [f"{len(s)}d-dim{d}" for s, d in LAYOUTS]


class _DenseNet(nn.Module):
    """A network from [N, *in_shape] to [N, *out_shape] that mixes every entry with every other (so the checks
    see a generic coupling, not one that acts position by position)."""

    def __init__(self, in_shape, out_shape, hidden=8):
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.layers = nn.Sequential(nn.Linear(math.prod(in_shape), hidden), nn.Tanh(),
                                    nn.Linear(hidden, math.prod(out_shape)))

    def forward(self, x):
        return self.layers(x.flatten(1)).view(x.shape[0], *self.out_shape)


def _resized(shape, d, size):
    """The non-batch shape of `shape` with `size` at dimension d."""
    return tuple(size if i == d else s for i, s in enumerate(shape))[1:]


def _block(kind, shape, dim, split=None, context=0):
    d = dim % len(shape)
    b = shape[d] // 2 if split is None else split
    a = shape[d] - b
    if kind == "additive":
        return AdditiveCoupling(_DenseNet(_resized(shape, d, b + context), _resized(shape, d, a)), split, dim=dim)
    if kind == "affine":
        return AffineCoupling(_DenseNet(_resized(shape, d, b + context), _resized(shape, d, 2 * a)), split, dim=dim,
                              kernels="torch")
    return TwoNetworkCoupling(_DenseNet(_resized(shape, d, a + context), _resized(shape, d, b)),
                              _DenseNet(_resized(shape, d, b + context), _resized(shape, d, a)), split, dim=dim)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=LAYOUT_IDS)
def test_blocks_are_bijections_with_the_brute_force_logdet(kind, shape, dim):
    torch.manual_seed(0)
    for split in (None, 1):
        block = perturb_(_block(kind, shape, dim, split).double(), std=0.3)
        x = torch.randn(*shape, dtype=torch.float64)
        y, logdet = block(x)
        assert y.shape == x.shape and logdet.shape == (shape[0],)
        x_back, logdet_back = block.inverse(y)
        assert rel_err(x_back, x) < 1e-12 and rel_err(logdet_back, logdet) < 1e-12
        d = dim % len(shape)
        b = shape[d] // 2 if split is None else split
        if kind != "two_network":   # the conditioning part passes through unchanged
            assert torch.equal(y.narrow(d, 0, b), x.narrow(d, 0, b))
        # logdet over every non-batch dimension: log|det| of the full Jacobian of one sample
        assert torch.allclose(logdet, brute_force_logdet(lambda v: block(v)[0], x), atol=1e-10)
        if kind != "affine":
            assert torch.equal(logdet, torch.zeros(shape[0], dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,dim", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_stacks_train_like_autograd(kind, shape, dim, mode):
    def stack(memory):
        torch.manual_seed(2)
        blocks = [perturb_(_block(kind, shape, dim, split=1 if i % 2 else None), std=0.2, seed=i) for i in range(3)]
        return ReversibleSequence(blocks, memory=memory).double()

    ref, seq = stack("autograd"), stack(mode)
    seq.load_state_dict(ref.state_dict())
    x = torch.randn(*shape, dtype=torch.float64)
    grads = []
    for s in (ref, seq):
        xi = x.clone().requires_grad_(True)
        y, logdet = s(xi)
        (y.square().sum() - logdet.sum()).backward()
        grads.append((xi.grad, flat_grads(s)))
    assert rel_err(grads[1][0], grads[0][0]) < 1e-10
    assert rel_err(grads[1][1], grads[0][1]) < 1e-10
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in seq.parameters())
    if mode == "reversible":
        assert seq.last_reconstruction_error.max() < 1e-12


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape,dim", [((2, 3, 5), -1), ((2, 5, 2, 2), 1), ((2, 2, 5, 2), 2)],
                         ids=["3d-dim-1", "4d-dim1", "4d-dim2"])
def test_the_context_is_concatenated_along_the_split_dim(kind, shape, dim):
    d = dim % len(shape)
    context_shape = tuple(2 if i == d else s for i, s in enumerate(shape))

    def stack(memory):
        torch.manual_seed(3)
        blocks = [perturb_(_block(kind, shape, dim, context=2), std=0.2, seed=i) for i in range(2)]
        return ReversibleSequence(blocks, memory=memory).double()

    ref, seq = stack("autograd"), stack("reversible")
    seq.load_state_dict(ref.state_dict())
    seen = []
    for net in seq.modules():
        if isinstance(net, _DenseNet):
            net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    x = torch.randn(*shape, dtype=torch.float64)
    c = torch.randn(*context_shape, dtype=torch.float64)
    grads = []
    for s in (ref, seq):
        xi, ci = x.clone().requires_grad_(True), c.clone().requires_grad_(True)
        y, logdet = s(xi, ci)
        (y.square().sum() - logdet.sum()).backward()
        grads.append((xi.grad, ci.grad, flat_grads(s)))
        x_back, _ = s.inverse(y.detach(), c)
        assert rel_err(x_back, x) < 1e-12
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-10
    # every network call saw its part with the 2 context entries appended along the split dimension
    assert seen and all(len(s) == len(shape) and s[d] in (shape[d] // 2 + 2, shape[d] - shape[d] // 2 + 2)
                        and s[:d] == shape[:d] and s[d + 1:] == shape[d + 1:] for s in seen)


@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_the_fused_ops_serve_images_split_on_channels_and_only_them(kind, monkeypatch):
    """kernels="triton" takes the fused path for [N, C, H, W] split on dim 1 (the image case keeps its speed) and
    the reference for every other layout, where the kernels do not apply, with the same results."""
    calls = []
    couple = coupling_affine.couple

    def spy(*args, **kwargs):
        calls.append((kwargs.get("dim"), args[4]))   # (split dim, backend)
        return couple(*args, **kwargs)

    monkeypatch.setattr(coupling_affine, "couple", spy)
    for shape, dim, backend in (((2, 4, 3, 3), 1, "triton"), ((2, 4, 3, 3), -1, "torch"), ((2, 3, 4), -1, "torch"),
                                ((2, 4, 3, 3), -3, "triton")):
        results = []
        for kernels in ("torch", "triton"):
            torch.manual_seed(4)
            block = _block(kind, shape, dim)
            block.kernels = kernels
            perturb_(block, std=0.2)
            x = torch.randn(*shape)
            with torch.no_grad():
                results.append(block(x))
        assert calls[-2:] == [(dim % len(shape), "torch"), (dim % len(shape), backend)]
        assert rel_err(results[1][0], results[0][0]) < 1e-6 and rel_err(results[1][1], results[0][1]) < 1e-6


def test_bad_dims_splits_and_contexts_are_named():
    with pytest.raises(ValueError, match="dim=0 is the batch dimension"):
        AffineCoupling(nn.Linear(2, 4), dim=0)
    with pytest.raises(ValueError, match="dim=0 is the batch dimension"):
        TwoNetworkCoupling(nn.Identity(), nn.Identity(), dim=0)
    with pytest.raises(TypeError, match="dim must be an int; got float"):
        AdditiveCoupling(nn.Identity(), dim=1.0)
    with pytest.raises(ValueError, match="split=0 leaves the first half empty"):
        AdditiveCoupling(nn.Identity(), split=0)
    with pytest.raises(ValueError, match="kernels='cuda' is not a known option"):
        AffineCoupling(nn.Identity(), kernels="cuda")
    # a negative dim that lands on the batch, a dim past the rank, an input without a batch dimension
    with pytest.raises(ValueError, match="dim=-2 is the batch dimension of a 2-dimensional input"):
        AdditiveCoupling(nn.Identity(), dim=-2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="dim=3 is out of range for a 3-dimensional input"):
        TwoNetworkCoupling(nn.Identity(), nn.Identity(), dim=3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"at least 2 dimensions; got shape \(4,\)"):
        AdditiveCoupling(nn.Identity())(torch.randn(4))
    with pytest.raises(ValueError, match=r"split=4 leaves an empty half of dimension 2 of size 4"):
        AdditiveCoupling(nn.Identity(), split=4, dim=-1)(torch.randn(2, 3, 4))
    # the network's output is described in the input's layout
    with pytest.raises(ValueError, match=r"must map \[N, T, 2\] to \[N, T, 4\].*got \(2, 3, 3\)"):
        AffineCoupling(nn.Linear(2, 3), dim=-1)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"g must map \[N, T, 2\] to \[N, T, 2\]; got \(2, 3, 5\)"):
        TwoNetworkCoupling(nn.Linear(2, 2), nn.Linear(2, 5), dim=-1)(torch.randn(2, 3, 4))
    # a context that does not fit along the other dimensions
    with pytest.raises(ValueError, match=r"context must match the input's shape except along the split dimension 2"):
        AdditiveCoupling(nn.Linear(3, 2), dim=-1)(torch.randn(2, 3, 4), torch.randn(2, 5, 1))
