"""Every invertible layer in float64, weights perturbed away from their init: inverse round trip,
log-determinant against slogdet of the autograd Jacobian, and the reversible backward (inverse_vjp) against
plain autograd."""
import pytest
import torch

from flow_checks import autograd_vjp, brute_force_logdet, perturb_, rel_err
from revglow.glow.layers.actnorm import ActNorm
from revglow.glow.layers.coupling import Coupling
from revglow.glow.layers.flowstep import FlowStep
from revglow.glow.layers.permutation import FixedPermutation, InvConv1x1, InvConv1x1LU
from revglow.glow.layers.prior import SplitPrior, TopPrior
from revglow.glow.layers.squeeze import squeeze2d, unsqueeze2d
from revglow.engine.invertible import InvertibleModule



def _initialized_actnorm(c, logscale_factor=1.0):
    layer = ActNorm(c, logscale_factor=logscale_factor)
    layer.initialize_from(torch.randn(5, c, 3, 3) * 3 + 1)
    return layer


# The reference implementation's coupling network (GlowConfig's defaults): ActNorm in the network, edge padding,
# log-scale factors of the zero layer and of every ActNorm.
REFERENCE_NETWORK = dict(nn_actnorm=True, edge_padding=True, zero_logscale_factor=3.0, actnorm_logscale_factor=3.0)


def _initialized(layer, c):
    layer(torch.randn(5, c, 3, 3) * 2 + 1)   # data-dependent init of the network's ActNorms
    return layer


LAYERS = {
    "actnorm": lambda c: _initialized_actnorm(c),
    "invconv": lambda c: InvConv1x1(c),
    "invconv_lu": lambda c: InvConv1x1LU(c),
    "reverse": lambda c: FixedPermutation(c, "reverse"),
    "shuffle": lambda c: FixedPermutation(c, "shuffle"),
    "affine_coupling": lambda c: Coupling(c, hidden=8, kind="affine", kernels="torch"),
    "additive_coupling": lambda c: Coupling(c, hidden=8, kind="additive", kernels="torch"),
    "actnorm_factor3": lambda c: _initialized_actnorm(c, logscale_factor=3.0),
    "affine_coupling_reference": lambda c: _initialized(
        Coupling(c, hidden=8, kind="affine", kernels="torch", **REFERENCE_NETWORK), c),
    "additive_coupling_reference": lambda c: _initialized(
        Coupling(c, hidden=8, kind="additive", kernels="torch", **REFERENCE_NETWORK), c),
}


def _build(name, c=4):
    layer = LAYERS[name](c).double()
    return perturb_(layer, std=0.2)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("name", list(LAYERS))
def test_inverse_round_trip(name):
    layer = _build(name)
    x = torch.randn(3, 4, 5, 3)
    y, logdet = layer(x)
    x_back, logdet_inv = layer.inverse(y)
    assert rel_err(x_back, x) < 1e-12
    assert rel_err(logdet_inv, logdet) < 1e-12 or float(logdet.abs().max()) == 0.0
    assert logdet.shape == (3,)


@pytest.mark.parametrize("name", list(LAYERS))
def test_logdet_matches_brute_force_jacobian(name):
    layer = _build(name)
    x = torch.randn(2, 4, 3, 3)
    _, logdet = layer(x)
    expected = brute_force_logdet(lambda v: layer(v)[0], x)
    assert torch.allclose(logdet, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", list(LAYERS))
def test_inverse_vjp_matches_autograd(name):
    layer = _build(name)
    x = torch.randn(3, 4, 5, 3, requires_grad=True)
    y, logdet = layer(x)
    gy, gld = torch.randn_like(y), torch.randn(3)
    params = [p for p in layer.parameters()]
    expected = autograd_vjp([y, logdet], [x] + params, [gy, gld])
    x_rebuilt, grad_x, grads = layer.inverse_vjp(y.detach(), gy, gld)
    assert rel_err(x_rebuilt, x) < 1e-12
    assert rel_err(grad_x, expected[0]) < 1e-10
    for p, g in zip(params, expected[1:]):
        if g is None:
            assert p not in grads
        else:
            assert rel_err(grads[p], g) < 1e-10


@pytest.mark.parametrize("coupling,permutation,network", [
    (coupling, permutation, "plain") for coupling in ("affine", "additive")
    for permutation in ("invconv_lu", "invconv", "shuffle", "reverse")] + [
    ("affine", "invconv_lu", "reference"), ("additive", "invconv", "reference")])
def test_flow_step(coupling, permutation, network):
    options = REFERENCE_NETWORK if network == "reference" else {}
    step = FlowStep(6, hidden=8, coupling=coupling, permutation=permutation, kernels="torch", **options).double()
    step(torch.randn(8, 6, 3, 3) * 2 + 0.5)  # data-dependent init
    perturb_(step, std=0.2)
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    y, logdet = step(x)
    # the fused ActNorm + 1x1 path equals the composition of the separate layers
    z, ld1 = step.actnorm(x)
    z, ld2 = step.mixing(z)
    y_ref, ld3 = step.coupling(z)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(logdet, ld1 + ld2 + ld3) < 1e-12
    assert rel_err(step.inverse(y)[0], x) < 1e-12
    assert torch.allclose(logdet, brute_force_logdet(lambda v: step(v)[0], x.detach()), atol=1e-10, rtol=1e-10)
    gy, gld = torch.randn_like(y), torch.randn(2)
    params = list(step.parameters())
    expected = autograd_vjp([y, logdet], [x] + params, [gy, gld])
    x_rebuilt, grad_x, grads = step.inverse_vjp(y.detach(), gy, gld)
    assert rel_err(x_rebuilt, x) < 1e-12
    assert rel_err(grad_x, expected[0]) < 1e-10
    for p, g in zip(params, expected[1:]):
        if g is not None:
            assert rel_err(grads[p], g) < 1e-10


def test_actnorm_data_dependent_init_statistics():
    x = torch.randn(64, 3, 6, 6) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -3.0, 0.2]).view(1, 3, 1, 1)
    layer = ActNorm(3)
    assert not layer.is_initialized
    y, _ = layer(x)
    assert layer.is_initialized
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-10)
    assert torch.allclose(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    # a second batch does not re-initialize
    before = layer.log_scale.detach().clone()
    layer(torch.randn(8, 3, 6, 6))
    assert torch.equal(layer.log_scale.detach(), before)


def test_actnorm_initialized_flag_survives_state_dict():
    layer = ActNorm(3)
    layer(torch.randn(8, 3, 4, 4) * 5)
    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.is_initialized
    x = torch.randn(8, 3, 4, 4) * 100
    assert torch.equal(fresh(x)[0], layer(x)[0])


def test_uninitialized_actnorm_inverse_says_so():
    with pytest.raises(RuntimeError, match="not initialized"):
        ActNorm(3).inverse(torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("cls", [InvConv1x1, InvConv1x1LU])
def test_invconv_inverse_follows_every_kind_of_parameter_change(cls):
    """W^-1 is never stale: in-place edits through .data (which bypass version counters), optimizer-style
    updates under no_grad, and load_state_dict are all seen by the next weight_inverse()."""
    layer = cls(4).double()

    def inverse_is_exact():
        return torch.allclose(layer.weight_inverse() @ layer.weight_matrix().detach(), torch.eye(4, dtype=torch.float64),
                              atol=1e-12)

    assert inverse_is_exact()
    for p in layer.parameters():
        p.data.mul_(1.1)
    assert inverse_is_exact()
    with torch.no_grad():
        next(layer.parameters()).add_(0.05)
    assert inverse_is_exact()
    other = perturb_(cls(4).double(), std=0.2, seed=3)
    layer.load_state_dict(other.state_dict())
    assert inverse_is_exact()


def test_squeeze_round_trip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).view(2, 3, 4, 6)
    s = squeeze2d(x)
    assert s.shape == (2, 12, 2, 3)
    assert torch.equal(unsqueeze2d(s), x)
    # each output pixel holds one 2x2 input patch
    assert torch.equal(s[0, :4, 0, 0], torch.tensor([x[0, 0, 0, 0], x[0, 0, 0, 1], x[0, 0, 1, 0], x[0, 0, 1, 1]]))


def test_split_prior_is_a_bijection_with_its_logdet():
    split = perturb_(SplitPrior(4).double(), std=0.3)
    x = torch.randn(2, 4, 3, 3)
    kept, eps, logdet = split(x)
    x_back, logdet_inv = split.inverse(kept, eps)
    assert rel_err(x_back, x) < 1e-12 and rel_err(logdet_inv, logdet) < 1e-12

    def fn(v):
        k, e, _ = split(v)
        return torch.cat([k, e], dim=1)
    assert torch.allclose(logdet, brute_force_logdet(fn, x), atol=1e-10)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_top_prior_round_trip(num_classes):
    prior = perturb_(TopPrior((4, 2, 2), learn_top=True, num_classes=num_classes).double(), std=0.3)
    y = torch.tensor([0, 2]) if num_classes else None
    z = torch.randn(2, 4, 2, 2)
    eps, logdet = prior(z, y)
    z_back, _ = prior.inverse(eps, y)
    assert rel_err(z_back, z) < 1e-12
    for i in range(2):
        yi = y[i:i + 1] if num_classes else None
        expected = brute_force_logdet(lambda v: prior(v, yi)[0], z[i:i + 1])
        assert torch.allclose(logdet[i:i + 1], expected, atol=1e-10)


def test_coupling_starts_near_identity():
    layer = Coupling(4, hidden=8, kind="additive", kernels="torch")
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(layer(x)[0], x)


def test_generic_module_gets_inverse_vjp_from_base_class():
    class Scale(InvertibleModule):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, x):
            return x * torch.exp(self.a), (self.a * x[0].numel()).expand(x.shape[0])

        def inverse(self, y):
            return y * torch.exp(-self.a), (self.a * y[0].numel()).expand(y.shape[0])

    layer = Scale()
    x = torch.randn(2, 3, 2, 2, requires_grad=True)
    y, ld = layer(x)
    gy, gld = torch.randn_like(y), torch.randn(2)
    gx_ref, ga_ref = torch.autograd.grad([y, ld], [x, layer.a], [gy, gld])
    x_rebuilt, gx, grads = layer.inverse_vjp(y.detach(), gy, gld)
    assert rel_err(x_rebuilt, x) < 1e-14 and rel_err(gx, gx_ref) < 1e-12 and rel_err(grads[layer.a], ga_ref) < 1e-12
