"""The reversible engine on its own: what users of torch.utils.checkpoint rely on, the generic path for
modules that only have forward and inverse, and the reconstruction check."""
import warnings

import pytest
import torch

from flow_checks import flat_grads, perturb_, rel_err
from revglow import ReconstructionError, ReconstructionWarning, ReversibleSequence
from revglow.glow.layers.flowstep import FlowStep
from revglow.glow.layers.coupling import CouplingNetwork


def _sequence(memory, depth=3, channels=4, dtype=torch.float64, seed=0, check="warn"):
    torch.manual_seed(seed)
    steps = [FlowStep(channels, hidden=8, kernels="torch", seed=i) for i in range(depth)]
    seq = ReversibleSequence(steps, memory=memory, check=check).to(dtype)
    with torch.no_grad():
        seq(torch.randn(16, channels, 3, 3, dtype=dtype) * 2)  # data-dependent init
    return perturb_(seq, std=0.1, seed=seed + 1)


def _pair(memory, **kw):
    ref, seq = _sequence("autograd", **kw), _sequence(memory, **kw)
    seq.load_state_dict(ref.state_dict())
    return ref, seq


def _loss(seq, x):
    y, logdet = seq(x)
    return (y.square().sum(dim=(1, 2, 3)) * 0.5 - logdet).mean()


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
def test_values_and_gradients_match_autograd(memory):
    ref, seq = _pair(memory)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    _loss(ref, xa).backward()
    _loss(seq, xb).backward()
    assert rel_err(xb.grad, xa.grad) < 1e-9
    assert rel_err(flat_grads(seq), flat_grads(ref)) < 1e-9


def test_no_grad_forward_gives_the_same_values():
    ref, seq = _pair("reversible")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        y0, ld0 = seq(x)
    y1, ld1 = seq(x)
    assert torch.equal(y0, y1.detach()) and torch.equal(ld0, ld1.detach())
    assert not y0.requires_grad


def test_input_without_grad_still_gives_parameter_gradients():
    ref, seq = _pair("reversible")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    _loss(ref, x).backward()
    _loss(seq, x).backward()
    assert rel_err(flat_grads(seq), flat_grads(ref)) < 1e-9


def test_parameter_gradients_accumulate_like_autograd():
    ref, seq = _pair("reversible")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for _ in range(2):
        _loss(ref, x).backward()
        _loss(seq, x).backward()
    assert rel_err(flat_grads(seq), flat_grads(ref)) < 1e-9


def test_torch_autograd_grad_works_for_first_order_gradients():
    ref, seq = _pair("reversible")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g_ref = torch.autograd.grad(_loss(ref, x), [x] + list(ref.parameters()), allow_unused=True)
    g = torch.autograd.grad(_loss(seq, x), [x] + list(seq.parameters()), allow_unused=True)
    for a, b in zip(g, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-9
    assert all(p.grad is None for p in seq.parameters())


def test_second_backward_raises_a_clear_error():
    _, seq = _pair("reversible")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    loss = _loss(seq, x)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward is not supported"):
        loss.backward()


def test_double_backward_raises_a_clear_error():
    _, seq = _pair("reversible")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(_loss(seq, x), x, create_graph=True)


def test_output_modified_in_place_raises():
    _, seq = _pair("reversible")
    y, logdet = seq(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    loss = y.sum() + logdet.sum()
    with torch.no_grad():
        y.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_rng_state_is_not_disturbed():
    _, seq = _pair("reversible")
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    state = torch.get_rng_state()
    _loss(seq, x).backward()
    assert torch.equal(torch.get_rng_state(), state)


def test_autocast_state_at_forward_is_replayed_in_backward():
    ref, seq = _pair("reversible", dtype=torch.float32)
    seen = []
    for m in seq.modules():
        if isinstance(m, CouplingNetwork):
            m.register_forward_hook(lambda mod, inp, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    x = torch.randn(2, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(seq, x)
        loss_ref = _loss(ref, x)
    seen_forward = list(seen)
    loss.backward()   # outside autocast: the engine must re-enter it for the recomputed networks
    loss_ref.backward()
    recomputed = seen[len(seen_forward):]
    assert len(recomputed) == 3 and all(dtype == torch.bfloat16 for _, dtype in recomputed)
    # the flow itself stays float32, and gradients agree with autograd under the same autocast
    assert seq(x)[0].dtype == torch.float32
    assert rel_err(flat_grads(seq), flat_grads(ref)) < 1e-5


class _AffineToy(torch.nn.Module):
    """An invertible module with only forward and inverse (no inverse_vjp): the engine's generic path."""

    def __init__(self, c):
        super().__init__()
        self.log_a = torch.nn.Parameter(torch.randn(c) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(c))
        self.wrong_inverse = False

    def forward(self, x):
        y = torch.tanh(x) * 0.1 + x * torch.exp(self.log_a).view(1, -1, 1, 1) + self.b.view(1, -1, 1, 1)
        return y, torch.zeros(x.shape[0], dtype=x.dtype)

    def inverse(self, y):
        # a few Newton steps on the monotone elementwise map
        x = (y - self.b.view(1, -1, 1, 1)) / torch.exp(self.log_a).view(1, -1, 1, 1)
        for _ in range(30):
            f = torch.tanh(x) * 0.1 + x * torch.exp(self.log_a).view(1, -1, 1, 1) + self.b.view(1, -1, 1, 1) - y
            x = x - f / (0.1 * (1 - torch.tanh(x) ** 2) + torch.exp(self.log_a).view(1, -1, 1, 1))
        if self.wrong_inverse:
            x = x + 0.5
        return x, torch.zeros(y.shape[0], dtype=y.dtype)


def _toy_sequence(memory, check="warn"):
    torch.manual_seed(0)
    return ReversibleSequence([_AffineToy(3) for _ in range(4)], memory=memory, check=check).double()


def test_generic_modules_without_inverse_vjp_run_reversibly():
    ref, seq = _toy_sequence("autograd"), _toy_sequence("reversible")
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    _loss(ref, x).backward()
    _loss(seq, x2).backward()
    assert rel_err(x2.grad, x.grad) < 1e-9
    assert rel_err(flat_grads(seq), flat_grads(ref)) < 1e-9


@pytest.mark.parametrize("check", ["warn", "raise"])
def test_reconstruction_check_reports_a_broken_inverse(check):
    seq = _toy_sequence("reversible", check=check)
    seq.steps[2].wrong_inverse = True
    loss = _loss(seq, torch.randn(2, 3, 2, 2, dtype=torch.float64))
    if check == "raise":
        with pytest.raises(ReconstructionError, match="relative error"):
            loss.backward()
    else:
        with pytest.warns(ReconstructionWarning, match="relative error"):
            loss.backward()


def test_reconstruction_check_is_silent_for_a_good_inverse_and_can_be_off():
    for check in ("warn", "off"):
        seq = _toy_sequence("reversible", check=check)
        if check == "off":
            seq.steps[1].wrong_inverse = True
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _loss(seq, torch.randn(2, 3, 2, 2, dtype=torch.float64)).backward()


def test_bad_sequences_are_rejected():
    with pytest.raises(ValueError, match="at least one step"):
        ReversibleSequence([])
    with pytest.raises(TypeError, match="no inverse"):
        ReversibleSequence([torch.nn.Identity()])
    with pytest.raises(ValueError, match="memory"):
        ReversibleSequence([FlowStep(4, 4)], memory="fast")
