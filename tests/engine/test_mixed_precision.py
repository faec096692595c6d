"""Mixed precision: under torch.autocast only the networks of a coupling run in low precision; the flow (the add,
the scale, the log-determinant) stays in the input's dtype, so a float32 flow rebuilds its input to float32
accuracy and the reversible engine's gradients are those of plain autograd under the same autocast. bfloat16 on
the CPU; float16 with a GradScaler on CUDA (skipped without a GPU). Glow's coupling network keeps its memory-lean
op under autocast, running it in the autocast dtype."""
import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flow_checks import flat_grads, perturb_, rel_err
from revglow import (AdditiveCoupling, AffineCoupling, Glow, GlowConfig, ReconstructionWarning, ReversibleSequence,
                     TwoNetworkCoupling)
from revglow.engine.coupling import float32_flow
from revglow.ops.coupling_network import coupling_network, coupling_network_reference

BF16 = torch.bfloat16
KINDS = ["additive", "affine", "two_network"]
LAYOUTS = {"tokens": ((4, 6, 8), -1), "images": ((4, 4, 5, 5), 1)}   # (shape, split dim)


def _net(layout, c_in, c_out):
    if layout == "tokens":
        return nn.Sequential(nn.Linear(c_in, 16), nn.GELU(), nn.Linear(16, c_out))
    return nn.Sequential(nn.Conv2d(c_in, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, c_out, 3, padding=1))


def _block(kind, layout, wrap=lambda net: net):
    shape, dim = LAYOUTS[layout]
    b = shape[dim] // 2
    a = shape[dim] - b
    if kind == "additive":
        return AdditiveCoupling(wrap(_net(layout, b, a)), dim=dim)
    if kind == "affine":
        return AffineCoupling(wrap(_net(layout, b, 2 * a)), dim=dim, kernels="torch")
    return TwoNetworkCoupling(wrap(_net(layout, a, b)), wrap(_net(layout, b, a)), dim=dim)


class _OutputIn(nn.Module):
    """A network whose output comes in `dtype`, whatever it computed in."""

    def __init__(self, net, dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x):
        return self.net(x).to(self.dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_only_the_networks_run_in_bf16_and_the_flow_stays_float32(kind, layout):
    torch.manual_seed(0)
    block = perturb_(_block(kind, layout), std=0.1)
    network_dtypes = []
    for net in block.children():
        net.register_forward_hook(lambda m, args, out: network_dtypes.append(out.dtype))
    x = torch.randn(*LAYOUTS[layout][0])
    with torch.autocast("cpu", dtype=BF16):
        y, logdet = block(x)
        x_back, logdet_back = block.inverse(y)
    assert network_dtypes and set(network_dtypes) == {BF16}
    assert y.dtype == logdet.dtype == x_back.dtype == logdet_back.dtype == torch.float32
    # float32 accuracy (a bfloat16 flow would rebuild x to about 1e-2)
    assert rel_err(x_back, x) < 1e-5 and rel_err(logdet_back, logdet) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("network_dtype", [torch.float64, BF16])
def test_the_output_has_the_inputs_dtype_whatever_the_networks_return(kind, network_dtype):
    torch.manual_seed(1)
    block = perturb_(_block(kind, "images", wrap=lambda net: _OutputIn(net, network_dtype)), std=0.1)
    x = torch.randn(*LAYOUTS["images"][0])
    y, logdet = block(x)
    x_back, _ = block.inverse(y)
    assert y.dtype == logdet.dtype == x_back.dtype == torch.float32
    assert rel_err(x_back, x) < 1e-5


class _MixingCoupling(nn.Module):
    """A user's block: an additive coupling, then an invertible linear mixing of the features. The mixing is a
    matmul, which autocast runs in bfloat16 unless the block does its flow arithmetic inside float32_flow."""

    reuse_inverse_computations = True

    def __init__(self, features, use_float32_flow):
        super().__init__()
        half = features // 2
        self.net = nn.Sequential(nn.Linear(half, 16), nn.GELU(), nn.Linear(16, features - half))
        self.weight = nn.Parameter(torch.eye(features) + 0.2 * torch.randn(features, features))
        self.flow = float32_flow if use_float32_flow else (lambda x: contextlib.nullcontext())

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        h = self.net(x1)
        with self.flow(x):
            y = F.linear(torch.cat([x1, x2 + h.to(x.dtype)], dim=-1), self.weight)
            logdet = torch.linalg.slogdet(self.weight)[1] * x.shape[1]
            return y, logdet.expand(x.shape[0])

    def inverse(self, y):
        with self.flow(y):
            z = torch.linalg.solve(self.weight, y.transpose(1, 2)).transpose(1, 2)
            logdet = torch.linalg.slogdet(self.weight)[1] * y.shape[1]
        z1, z2 = z.chunk(2, dim=-1)
        h = self.net(z1)
        with self.flow(y):
            return torch.cat([z1, z2 - h.to(y.dtype)], dim=-1), logdet.expand(y.shape[0])


def test_a_users_block_keeps_its_flow_float32_with_float32_flow():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 8)
    errors = {}
    for use in (False, True):
        torch.manual_seed(3)
        block = _MixingCoupling(8, use)
        with torch.autocast("cpu", dtype=BF16):
            y, _ = block(x)
            errors[use] = (y.dtype, rel_err(block.inverse(y)[0], x))
    assert errors[False][0] == BF16 and errors[False][1] > 1e-3   # what float32_flow prevents
    assert errors[True][0] == torch.float32 and errors[True][1] < 1e-5
    # and such blocks train through the reversible engine under autocast, rebuilding their inputs exactly
    torch.manual_seed(4)
    seq = ReversibleSequence([_MixingCoupling(8, True) for _ in range(3)], check="raise")
    with torch.autocast("cpu", dtype=BF16):
        y, logdet = seq(x.clone().requires_grad_(True))
        (y.square().sum() - logdet.sum()).backward()
    assert y.dtype == torch.float32 and seq.last_reconstruction_error.max() < 1e-5


def _gradients(stack, x, amp, memory):
    stack.zero_grad()
    for m in stack.modules():
        if isinstance(m, ReversibleSequence):
            m.memory = memory
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=BF16, enabled=amp):
        y, logdet = stack(xi)
    assert y.dtype == x.dtype and logdet.dtype == x.dtype
    ((y - 0.5).square().sum() - logdet.sum()).backward()
    return torch.cat([xi.grad.flatten(), flat_grads(stack)]).double()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_reversible_gradients_are_as_close_to_the_truth_as_bf16_autograds(kind, layout):
    """The reversible engine adds nothing to bfloat16's own error: measured against float64 truth, its gradients
    are as far as plain autograd's under the same autocast."""
    torch.manual_seed(5)
    stack = ReversibleSequence([perturb_(_block(kind, layout), std=0.1, seed=i) for i in range(4)], check="raise")
    x = torch.randn(*LAYOUTS[layout][0])
    truth = _gradients(copy.deepcopy(stack).double(), x.double(), False, "autograd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconstructionWarning)
        autograd = _gradients(stack, x, True, "autograd")
        reversible = _gradients(stack, x, True, "reversible")
    assert stack.last_reconstruction_error.max() < 1e-4
    autograd_error, reversible_error = rel_err(autograd, truth), rel_err(reversible, truth)
    assert 1e-4 < autograd_error < 5e-2        # the networks did run in bfloat16
    assert reversible_error < 1.05 * autograd_error
    assert rel_err(reversible, autograd) < 0.2 * autograd_error


@pytest.mark.long(3)
def test_glow_trains_under_bf16_with_float32_flow_and_no_reconstruction_warning():
    """Needs ReversibleSequence(tol=None): a tolerance that follows the networks' precision (GlowConfig's default)."""
    torch.manual_seed(6)
    config = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=4, hidden=32)
    assert config.reconstruction_tol is None
    model = Glow(config)
    x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    model.initialize(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconstructionWarning)
        for _ in range(10):
            with torch.autocast("cpu", dtype=BF16):
                loss = model(x).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.autocast("cpu", dtype=BF16):
            latents = model.encode(model.preprocess(x))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(z.dtype == torch.float32 for z in latents)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_glows_reconstruction_tolerance_defaults_to_following_the_precision():
    """GlowConfig.reconstruction_tol: None (the engine derives it from the autocast dtype) or a positive number; the
    command line spells None 'none'."""
    import typing

    from revglow.cli.flags import flag_type as _flag_type
    from revglow.errors import ConfigError, ConfigTypeError

    assert GlowConfig().reconstruction_tol is None
    assert GlowConfig(reconstruction_tol=1e-2).reconstruction_tol == 1e-2
    assert GlowConfig.from_dict(GlowConfig(reconstruction_tol=None).to_dict()).reconstruction_tol is None
    for bad in (0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="reconstruction_tol must be a positive finite number or None"):
            GlowConfig(reconstruction_tol=bad)
    for bad in (True, "1e-3"):
        with pytest.raises(ConfigTypeError, match="reconstruction_tol must be a number or None"):
            GlowConfig(reconstruction_tol=bad)
    hint = typing.get_type_hints(GlowConfig)["reconstruction_tol"]
    assert hint == typing.Optional[float]
    _, convert = _flag_type("reconstruction_tol", hint)
    assert convert("none") is None and convert("0.01") == 0.01


# ------------------------------------------------------------------------- the lean coupling-network op
def _weights(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)

    def rand(*shape, scale=0.3, low=None):
        t = torch.randn(*shape, generator=g) * scale if low is None else torch.rand(*shape, generator=g) + low
        return t.to(dtype).requires_grad_(True)

    hidden = 16   # actnorm, edge padding, an output scale: every option on
    return [rand(hidden, 4, 3, 3), None, rand(hidden, low=0.5), rand(hidden, scale=1.0), rand(hidden, hidden, 1, 1),
            None, rand(hidden, low=0.5), rand(hidden, scale=1.0), rand(6, hidden + 1, 3, 3), rand(6, scale=1.0),
            rand(6, low=0.5)]


def _saved_bytes(fn):
    """The bytes of the tensors autograd keeps for backward while fn() builds its graph, and those tensors."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    unique = {t.untyped_storage().data_ptr(): t for t in saved if t.is_floating_point() or t.dtype == torch.bool}
    return out, sum(t.untyped_storage().nbytes() for t in unique.values()), saved


def test_the_lean_network_op_runs_under_autocast_in_its_dtype_keeping_half_the_memory():
    weights = _weights()
    slots = [i for i, w in enumerate(weights) if w is not None]
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    inputs = [x] + [weights[i] for i in slots]
    grad_out = torch.randn(2, 6, 16, 16)
    # the float32 op, then the op under autocast: its output in bfloat16, as an autocast convolution's
    _, fp32_bytes, _ = _saved_bytes(lambda: coupling_network(x, *weights, True))
    with torch.autocast("cpu", dtype=BF16):
        out, bf16_bytes, saved = _saved_bytes(lambda: coupling_network(x, *weights, True))
        reference = coupling_network_reference(x, *weights, True)
    assert out.dtype == BF16
    wide = [t for t in saved if t.numel() >= x.numel()]   # x and the two hidden tensors, not the small weights
    assert len(wide) == 3 and all(t.dtype == BF16 for t in wide)
    assert bf16_bytes <= 0.55 * fp32_bytes, (bf16_bytes, fp32_bytes)   # what is kept for backward is bfloat16
    got = torch.autograd.grad(out, inputs, grad_out)
    assert all(g.dtype == torch.float32 for g in got)   # the casts' backward brings gradients back to float32
    # as accurate as autocast's own run of the reference, both measured against float64 truth
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    weights64 = list(weights)
    for i, t in zip(slots, inputs64[1:]):
        weights64[i] = t
    truth = coupling_network_reference(inputs64[0], *weights64, True)
    assert rel_err(out, truth) < 1.5 * rel_err(reference, truth)
    want = torch.autograd.grad(reference, inputs, grad_out)
    exact = torch.autograd.grad(truth, inputs64, grad_out.double())
    errors = torch.tensor([[rel_err(ours, right), rel_err(autocasts, right)]
                           for ours, autocasts, right in zip(got, want, exact)])
    assert (errors[:, 0] < 3 * errors[:, 1] + 1e-2).all(), errors   # bfloat16's own error: a few 1e-2 here
    assert errors[:, 0].mean() < 2 * errors[:, 1].mean(), errors
    # autocast leaves float64 alone, and so does the op: bit for bit the op without autocast
    with torch.autocast("cpu", dtype=BF16):
        out64 = coupling_network(inputs64[0], *weights64, True)
    assert out64.dtype == torch.float64 and torch.equal(out64, coupling_network(inputs64[0], *weights64, True))


# ---------------------------------------------------------------------------- float16 + GradScaler (CUDA)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast with a GradScaler needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_fp16_with_grad_scaler_on_cuda_matches_fp16_autograd(kind):
    torch.manual_seed(8)
    stack = ReversibleSequence([perturb_(_block(kind, "images"), std=0.1, seed=i) for i in range(4)],
                               check="raise").cuda()
    x = torch.randn(*LAYOUTS["images"][0], device="cuda")
    results = {}
    for memory in ("autograd", "reversible"):
        stack.memory = memory
        stack.zero_grad()
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)   # large, yet no float16 gradient overflows
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.float16):
            y, logdet = stack(xi)
        assert y.dtype == logdet.dtype == torch.float32
        scaler.scale((y - 0.5).square().mean() - logdet.mean() / y[0].numel()).backward()
        optimizer = torch.optim.SGD(stack.parameters(), lr=0.0)   # only to unscale through the scaler
        scaler.unscale_(optimizer)
        results[memory] = torch.cat([xi.grad.flatten() / scaler.get_scale(), flat_grads(stack)])
        assert torch.isfinite(results[memory]).all()
    assert stack.last_reconstruction_error.max() < 1e-3
    assert rel_err(results["reversible"], results["autograd"]) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast with a GradScaler needs CUDA")
def test_fp16_glow_with_grad_scaler_on_cuda():
    """Glow's lean coupling-network op in float16; needs ReversibleSequence(tol=None) like the bf16 test."""
    torch.manual_seed(9)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=4, hidden=32)).cuda()
    x = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8, device="cuda")
    model.initialize(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconstructionWarning)
        for _ in range(4):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).mean()
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
