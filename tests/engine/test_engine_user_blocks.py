"""The reversible engine with the blocks users write: dropout, BatchNorm, a conditioning input, broken
contracts, outliers that only one sample of a batch hits; and the promises around it (no host-device syncs,
caches that follow the parameters, inference_mode). Every memory mode is held to plain autograd in float64."""
import collections
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from flow_checks import flat_grads, perturb_, rel_err
from revglow import Glow, GlowConfig, ReconstructionError, ReconstructionWarning, ReversibleSequence
from revglow.glow.layers.flowstep import FlowStep
from revglow.engine.contract import StepContractError

MODES = ["reversible", "checkpoint", "autograd"]


# ------------------------------------------------------------------------------------- user blocks
class AdditiveBlock(nn.Module):
    """y = (x1 + F(x2, c), x2): the kind of block a user writes, with forward and inverse only.
    F may hold dropout and BatchNorm; a context map, when given, is concatenated to F's input."""

    def __init__(self, channels=4, hidden=8, dropout=0.0, batchnorm=False, context_channels=0):
        super().__init__()
        half = channels // 2
        layers = [nn.Conv2d(half + context_channels, hidden, 3, padding=1)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(hidden))
        layers += [nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Conv2d(hidden, channels - half, 3, padding=1))
        self.net = nn.Sequential(*layers)
        self.half = half

    def _f(self, x2, context):
        return self.net(x2 if context is None else torch.cat([x2, context], 1))

    def forward(self, x, context=None):
        x2, x1 = x[:, :self.half], x[:, self.half:]
        # the halves swap places, so that in a stack every channel gets coupled
        y = torch.cat([x1 + self._f(x2, context), x2], 1)
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y, context=None):
        y1, x2 = y[:, :y.shape[1] - self.half], y[:, y.shape[1] - self.half:]
        return torch.cat([x2, y1 - self._f(x2, context)], 1), y.new_zeros(y.shape[0])


def _dropout_flow_step(channels=4, p=0.3, seed=0):
    """Glow's own FlowStep (whose coupling has a hand-written inverse_vjp), with dropout in its network."""
    step = FlowStep(channels, hidden=8, kernels="torch", seed=seed)
    net = step.coupling.net
    net.conv_hidden = nn.Sequential(net.conv_hidden, nn.Dropout(p))
    return step


def _blocks(kind, depth=3, seed=0, **kw):
    torch.manual_seed(seed)
    if kind == "user":
        steps = [AdditiveBlock(**kw) for _ in range(depth)]
    elif kind == "flowstep":
        steps = [_dropout_flow_step(seed=i, **kw) for i in range(depth)]
    else:
        raise ValueError(kind)
    return steps


def _sequences(kind, modes, dtype=torch.float64, **kw):
    """One sequence per mode, all with the same weights (and initialized ActNorms)."""
    seqs = {}
    for mode in modes:
        seq = ReversibleSequence(_blocks(kind, **kw), memory=mode).to(dtype)
        seqs[mode] = seq
    ref = seqs[modes[0]]
    with torch.no_grad():
        ref(torch.randn(16, 4, 5, 5, dtype=dtype) * 2)   # data-dependent init of FlowSteps, if any
    perturb_(ref, std=0.05, seed=3)
    for seq in seqs.values():
        seq.load_state_dict(ref.state_dict())
    return seqs


def _loss(seq, x, context=None):
    y, logdet = seq(x, context) if context is not None else seq(x)
    return (0.5 * y.square().sum(dim=(1, 2, 3)) - logdet).mean()


# ---------------------------------------------------------------------------------------- RNG replay
@pytest.mark.parametrize("kind", ["user", "flowstep"])
def test_dropout_blocks_get_autograd_gradients_and_leave_the_same_rng_stream(kind):
    kw = {"dropout": 0.3} if kind == "user" else {"p": 0.3}
    seqs = _sequences(kind, MODES, **kw)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    grads, x_grads, states = {}, {}, {}
    for mode, seq in seqs.items():
        seq.train()
        xi = x.clone().requires_grad_()
        torch.manual_seed(123)
        _loss(seq, xi).backward()
        states[mode] = torch.get_rng_state()
        grads[mode], x_grads[mode] = flat_grads(seq), xi.grad
    for mode in ("reversible", "checkpoint"):
        assert rel_err(grads[mode], grads["autograd"]) < 1e-6, mode
        assert rel_err(x_grads[mode], x_grads["autograd"]) < 1e-6, mode
        # the caller's RNG stream after the step is the one plain autograd leaves
        assert torch.equal(states[mode], states["autograd"]), mode


def test_without_rng_replay_dropout_gradients_are_wrong():
    """The test above can fail: with preserve_rng_state=False the masks of backward differ from forward's."""
    seqs = _sequences("user", ["autograd", "reversible"], dropout=0.3)
    seqs["reversible"].preserve_rng_state = False
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    for seq in seqs.values():
        torch.manual_seed(123)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReconstructionWarning)   # the rebuilt input is wrong too
            _loss(seq, x).backward()
    assert rel_err(flat_grads(seqs["reversible"]), flat_grads(seqs["autograd"])) > 1e-2


# ------------------------------------------------------------------------------- buffers updated once
@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_batchnorm_running_statistics_match_autograd_after_three_steps(mode):
    seqs = _sequences("user", ["autograd", mode], batchnorm=True)
    opts = {m: torch.optim.SGD(s.parameters(), lr=0.05) for m, s in seqs.items()}
    tracked_before = int(seqs[mode].steps[0].net[1].num_batches_tracked)
    for step in range(3):
        x = torch.randn(4, 4, 5, 5, dtype=torch.float64) + step
        for m, seq in seqs.items():
            opts[m].zero_grad()
            _loss(seq, x).backward()
            opts[m].step()
    ref, seq = seqs["autograd"], seqs[mode]
    for (name, a), (_, b) in zip(ref.named_buffers(), seq.named_buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=1e-10, atol=1e-12), name
    assert int(seq.steps[0].net[1].num_batches_tracked) == tracked_before + 3
    assert rel_err(flat_grads(seq), flat_grads(ref)) < 1e-9


# ----------------------------------------------------------------------------------------- context
@pytest.mark.parametrize("kind", ["user", "flowstep"])
@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_context_gradients_match_autograd(kind, mode):
    torch.manual_seed(0)
    if kind == "user":
        make = lambda: [AdditiveBlock(context_channels=2) for _ in range(3)]  # noqa: E731
    else:
        make = lambda: [FlowStep(4, 8, kernels="torch", seed=i, context_channels=2) for i in range(3)]  # noqa: E731
    ref = ReversibleSequence(make(), memory="autograd").double()
    seq = ReversibleSequence(make(), memory=mode).double()
    context = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        ref(torch.randn(16, 4, 5, 5, dtype=torch.float64), torch.randn(16, 2, 5, 5, dtype=torch.float64))
    perturb_(ref, std=0.1, seed=2)
    seq.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    out = {}
    for name, s in (("ref", ref), ("seq", seq)):
        xi, ci = x.clone().requires_grad_(), context.clone().requires_grad_()
        _loss(s, xi, ci).backward()
        out[name] = (flat_grads(s), xi.grad, ci.grad)
    for a, b in zip(out["seq"], out["ref"]):
        assert rel_err(a, b) < 1e-9
    assert out["ref"][2].abs().sum() > 0   # the context really is used
    # inverse with the same context rebuilds the input; with another one it does not
    with torch.no_grad():
        y, ld = seq(x, context)
        x_back, ld_back = seq.inverse(y, context)
        assert rel_err(x_back, x) < 1e-12 and rel_err(ld_back, ld) < 1e-12
        assert rel_err(seq.inverse(y, context + 1)[0], x) > 1e-3


def test_context_without_grad_and_frozen_context_network():
    """A context that needs no gradient gets none; parameters still do."""
    torch.manual_seed(0)
    seq = ReversibleSequence([AdditiveBlock(context_channels=2) for _ in range(2)]).double()
    context = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    _loss(seq, torch.randn(2, 4, 5, 5, dtype=torch.float64), context).backward()
    assert context.grad is None and all(p.grad is not None for p in seq.parameters())


@pytest.mark.parametrize("mode", ["reversible", "checkpoint"])
def test_conditional_glow_matches_autograd_and_inverts(mode):
    cfg = dict(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, context_channels=1, kernels="torch")
    torch.manual_seed(0)
    ref = Glow(GlowConfig(memory="autograd", **cfg)).double()
    model = Glow(GlowConfig(memory=mode, **cfg)).double()
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    low_res = torch.nn.functional.avg_pool2d(x.double() / 255, 2)   # [4, 1, 4, 4]: resized to each level
    ref.initialize(x, context=low_res)
    perturb_(ref, std=0.05, seed=1)
    model.load_state_dict(ref.state_dict())
    grads = []
    for m in (ref, model):
        c = low_res.clone().requires_grad_()
        torch.manual_seed(5)
        m(x, context=c).mean().backward()
        grads.append((flat_grads(m), c.grad))
    assert rel_err(grads[1][0], grads[0][0]) < 1e-9 and rel_err(grads[1][1], grads[0][1]) < 1e-9
    xc = model.preprocess(x)
    with torch.no_grad():
        back = model.decode(model.encode(xc, context=low_res), context=low_res)
    assert rel_err(back, xc) < 1e-10
    with pytest.raises(ValueError, match="context"):
        model(x)
    with pytest.raises(ValueError, match=r"shape \[4, 1, H, W\]"):
        model(x, context=torch.randn(4, 2, 4, 4, dtype=torch.float64))


# ------------------------------------------------------------------------------- reconstruction check
class CubicStep(nn.Module):
    """y = x (1 + a x^2), inverted by a fixed number of fixed-point iterations: exact for moderate inputs,
    numerically non-invertible for large ones (the iteration no longer converges), as a flow can become."""

    def __init__(self, a=0.1, iterations=60):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.iterations = iterations

    def forward(self, x):
        return x * (1 + self.a * x.square()), x.new_zeros(x.shape[0])

    def inverse(self, y):
        x = y
        for _ in range(self.iterations):
            x = y / (1 + self.a * x.square())
        return x, y.new_zeros(y.shape[0])


@pytest.mark.parametrize("order", ["benign_first", "outlier_first"])
def test_the_check_sees_every_sample(order):
    torch.manual_seed(0)
    benign = torch.randn(1, 2, 4, 4, dtype=torch.float64) * 0.3
    outlier = torch.randn(1, 2, 4, 4, dtype=torch.float64) * 0.3
    outlier[0, 1, 2, 3] = 8.0          # one large entry: the inverse does not converge there
    x = torch.cat([benign, outlier] if order == "benign_first" else [outlier, benign])
    bad = 1 if order == "benign_first" else 0
    seq = ReversibleSequence([CubicStep() for _ in range(2)], check="raise")
    with pytest.raises(ReconstructionError, match=rf"sample\(s\) {bad} of 2"):
        _loss(seq, x).backward()
    errors = seq.last_reconstruction_error
    assert errors.shape == (2,) and errors[bad] > 1e-3 and errors[1 - bad] < 1e-10
    # warn mode says the same, once, and trains on
    seq = ReversibleSequence([CubicStep() for _ in range(2)], check="warn")
    with pytest.warns(ReconstructionWarning, match=rf"sample\(s\) {bad} of 2"):
        _loss(seq, x).backward()


def test_the_check_runs_when_the_first_step_has_no_backward():
    torch.manual_seed(0)
    steps = [CubicStep() for _ in range(3)]
    steps[0].a.requires_grad_(False)   # frozen first step, input without grad: step 0 gets no backward
    seq = ReversibleSequence(steps, check="raise")
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64) * 0.3
    x[1, 0, 0, 0] = 8.0
    with pytest.raises(ReconstructionError):
        _loss(seq, x).backward()


def test_the_check_estimates_the_relative_error_of_each_sample():
    """The fingerprint's estimate against the true per-sample relative error, computed directly."""
    from revglow.engine.reconstruction import Fingerprint
    torch.manual_seed(1)
    x = torch.randn(6, 12, 16, 16, dtype=torch.float64)
    scales = torch.tensor([0.0, 1e-8, 1e-4, 1e-2, 0.3, 1.0], dtype=torch.float64)
    err = torch.randn_like(x) * scales.view(-1, 1, 1, 1)
    err[4] = 0
    err[4, 3, 7, 7] = 5.0              # all of one sample's error on one entry
    rebuilt = x + err
    true = torch.linalg.vector_norm((rebuilt - x).flatten(1), dim=1) / torch.linalg.vector_norm(x.flatten(1), dim=1)
    estimate = Fingerprint(x).relative_error(rebuilt)
    assert estimate[0] == 0
    ratio = estimate[1:] / true[1:]
    assert ((ratio > 0.7) & (ratio < 1.3)).all(), ratio
    nan_input = rebuilt.clone()
    nan_input[2, 0, 0, 0] = float("nan")
    assert torch.isinf(Fingerprint(x).relative_error(nan_input)[2])


# ---------------------------------------------------------------------------------- no host syncs
class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", MODES)
def test_a_training_step_makes_no_host_device_synchronization(mode):
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(3, 16, 16), levels=3, depth=8, hidden=8, memory=mode, kernels="torch"))
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    model.initialize(x)
    model(x).mean().backward()   # warm-up: anything lazy happens here
    with _CountOps() as ops:
        model(x).mean().backward()
    assert ops.counts["aten.is_nonzero.default"] == 0
    assert ops.counts["aten._local_scalar_dense.default"] == 0, mode
    assert sum(ops.counts.values()) > 1000   # the mode saw the whole step


def test_actnorm_flag_follows_state_dict_loading():
    cfg = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8)
    trained, fresh = Glow(cfg), Glow(cfg)
    trained.initialize(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8))
    assert trained.is_initialized and not fresh.is_initialized
    fresh.load_state_dict(trained.state_dict())
    assert fresh.is_initialized
    trained.load_state_dict(Glow(cfg).state_dict())   # an uninitialized state makes it uninitialized again
    assert not trained.is_initialized


# ------------------------------------------------------------------------------------------- caches
def _small_glow(mode="reversible"):
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=3, hidden=8, memory=mode,
                            permutation="invconv", kernels="torch")).double()
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    model.initialize(x)
    return model, x


def test_sampling_under_inference_mode_then_training():
    model, x = _small_glow()
    ref, _ = _small_glow("autograd")
    with torch.inference_mode():
        model.sample(2)
        model.bits_per_dim(model.preprocess(x))
    torch.manual_seed(1)
    model(x).mean().backward()
    torch.manual_seed(1)
    ref(x).mean().backward()
    assert rel_err(flat_grads(model), flat_grads(ref)) < 1e-9


def test_data_edits_and_state_dict_loads_are_seen_by_the_inverse():
    model, x = _small_glow()
    xc = model.preprocess(x)
    with torch.no_grad():
        model.decode(model.encode(xc))   # anything cached would be cached now
        for p in model.parameters():
            p.data.mul_(1.1)
        assert rel_err(model.decode(model.encode(xc)), xc) < 1e-10
        other, _ = _small_glow()
        perturb_(other, std=0.05, seed=4)
        model.load_state_dict(other.state_dict())
        assert rel_err(model.decode(model.encode(xc)), xc) < 1e-10


# ------------------------------------------------------------------------------------------ contracts
class _Broken(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        y = x * self.w
        if self.how == "y_only":
            return y
        if self.how == "int_logdet":
            return y, 0
        if self.how == "scalar_logdet":
            return y, x.new_zeros(())
        if self.how == "three_values":
            return y, x.new_zeros(x.shape[0]), None
        return y, x.new_zeros(x.shape[0])

    def inverse(self, y):
        if self.how == "inverse_y_only":
            return y / self.w
        return y / self.w, y.new_zeros(y.shape[0])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("how, message", [
    ("y_only", r"step 1 \(_Broken\)\.forward must return \(tensor, logdet\).*got a tensor of shape"),
    ("int_logdet", r"step 1 \(_Broken\)\.forward .* its logdet is int 0"),
    ("scalar_logdet", r"step 1 \(_Broken\)\.forward .*logdet of shape \[2\]; its logdet has shape \(\)"),
    ("three_values", r"step 1 \(_Broken\)\.forward .*got a tuple of 3 values"),
    ("inverse_y_only", r"step 1 \(_Broken\)\.inverse must return"),
])
def test_contract_violations_name_the_step_in_every_mode(mode, how, message):
    seq = ReversibleSequence([_Broken("fine"), _Broken(how), _Broken("fine")], memory=mode)
    x = torch.randn(2, 3, 2, 2)
    with pytest.raises(StepContractError, match=message):
        loss = _loss(seq, x)
        if how.startswith("inverse"):
            with torch.no_grad():
                seq.inverse(x)
    if how.startswith("inverse") and mode == "reversible":
        # the reversible backward inverts too: the same message there, not a raw unpacking error
        with pytest.raises(StepContractError, match=message):
            loss.backward()


def test_a_step_without_inverse_is_refused_by_name():
    with pytest.raises(TypeError, match=r"step 1 \(Conv2d\) has no inverse"):
        ReversibleSequence([_Broken("fine"), nn.Conv2d(3, 3, 1)])


def test_a_wrong_inverse_vjp_is_named():
    class BadVjp(_Broken):
        def inverse_vjp(self, y, grad_y, grad_logdet):
            return y, grad_y

    seq = ReversibleSequence([_Broken("fine"), BadVjp("fine")])
    with pytest.raises(StepContractError, match=r"step 1 \(BadVjp\)\.inverse_vjp must return \(x, grad_x, param_grads\)"):
        _loss(seq, torch.randn(2, 3, 2, 2)).backward()
