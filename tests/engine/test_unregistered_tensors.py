"""No silent gradient loss: a tensor that requires grad and is used by a step without being one of its parameters
(a closure over a leaf, a module shared without being registered, a tensor computed outside from parameters) gets
autograd's gradient in every memory mode, through the generic path and through a block with its own inverse_vjp;
and a step found clean is not watched again."""
import pytest
import torch
from torch import nn

from flow_checks import rel_err
from revglow import ReversibleSequence, TwoNetworkCoupling
from revglow.engine import sequence as engine_sequence

MODES = ["reversible", "checkpoint", "autograd"]


class ScaledShift(nn.Module):
    """y = x * exp(scale()) + shift(x_other half); `scale` is a callable the block does not own (a closure)."""

    def __init__(self, scale, channels=4):
        super().__init__()
        self.scale = scale
        self.net = nn.Conv2d(channels // 2, channels // 2, 3, padding=1)

    def forward(self, x):
        x1, x2 = x.chunk(2, 1)
        s = self.scale()
        y2 = x2 * torch.exp(s).view(1, -1, 1, 1) + self.net(x1)
        return torch.cat([x1, y2], 1), (s.sum() * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def inverse(self, y):
        y1, y2 = y.chunk(2, 1)
        s = self.scale()
        x2 = (y2 - self.net(y1)) * torch.exp(-s).view(1, -1, 1, 1)
        return torch.cat([y1, x2], 1), (s.sum() * y.shape[2] * y.shape[3]).expand(y.shape[0])


class Unregistered(nn.Module):
    """Calls a module it holds in a plain list: the module is shared with the step, not registered in it."""

    def __init__(self, module):
        super().__init__()
        self._shared = [module]

    def forward(self, x):
        return self._shared[0](x)


def _grads(tensors):
    return [t.grad.detach().clone() if t.grad is not None else None for t in tensors]


def _check_against_autograd(make, x, modes=MODES):
    """make(mode) -> (sequence, extra leaves); the gradients of the sequence's parameters, of x and of the extra
    leaves must equal autograd's, and no extra leaf may be left without one."""
    results = {}
    for mode in modes:
        seq, extra = make(mode)
        xi = x.clone().requires_grad_()
        y, logdet = seq(xi)
        (0.5 * y.square().flatten(1).sum(1) - logdet).mean().backward()
        results[mode] = [xi.grad] + _grads(list(seq.parameters())) + _grads(extra)
    for mode in modes[:-1]:
        for i, (a, b) in enumerate(zip(results[mode], results["autograd"])):
            assert b is not None and a is not None, (mode, i)
            assert rel_err(a, b) < 1e-10, (mode, i)


def test_a_closure_tensor_gets_its_gradient_in_every_mode():
    def make(mode):
        torch.manual_seed(0)
        log_scale = (torch.randn(2, dtype=torch.float64) * 0.1).requires_grad_()
        steps = [ScaledShift(lambda: log_scale) for _ in range(3)]   # one leaf shared by every step, owned by none
        return ReversibleSequence(steps, memory=mode).double(), [log_scale]

    _check_against_autograd(make, torch.randn(3, 4, 5, 5, dtype=torch.float64))


def test_a_tensor_computed_outside_from_parameters_passes_its_gradient_on():
    """A non-leaf: the step uses `owner.weight * 2`, made anew before each forward; autograd's gradient must reach
    `owner.weight` through it."""
    def make(mode):
        torch.manual_seed(0)
        owner = nn.Linear(2, 2).double()
        doubled = {}
        steps = [ScaledShift(lambda: doubled["value"]) for _ in range(2)]
        seq = ReversibleSequence(steps, memory=mode).double()

        def forward_hook(module, args):
            doubled["value"] = owner.bias * 0.2   # made outside the steps, with a graph
        seq.register_forward_pre_hook(forward_hook)
        return seq, [owner.bias]

    _check_against_autograd(make, torch.randn(3, 4, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("layout", ["4d", "nd"])
def test_an_unregistered_shared_module_gets_its_gradient_through_a_block_with_its_own_inverse_vjp(layout):
    def make(mode):
        torch.manual_seed(0)
        if layout == "4d":
            shared = nn.Conv2d(2, 2, 3, padding=1).double()
            own = [nn.Conv2d(2, 2, 3, padding=1) for _ in range(3)]
        else:
            shared = nn.Linear(3, 3).double()
            own = [nn.Linear(3, 3) for _ in range(3)]
        steps = [TwoNetworkCoupling(Unregistered(shared), g) for g in own]
        seq = ReversibleSequence(steps, memory=mode).double()
        assert not any(p is q for p in seq.parameters() for q in shared.parameters())
        return seq, list(shared.parameters())

    x = torch.randn(3, 4, 5, 5) if layout == "4d" else torch.randn(3, 6)
    _check_against_autograd(make, x.double())


def test_a_clean_step_is_looked_at_once_and_a_step_with_unregistered_tensors_every_time(monkeypatch):
    looked = []

    class Counting(engine_sequence.UnregisteredTensors):
        def __enter__(self):
            looked.append(1)
            return super().__enter__()

    monkeypatch.setattr(engine_sequence, "UnregisteredTensors", Counting)
    torch.manual_seed(0)
    log_scale = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    clean = TwoNetworkCoupling(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    seq = ReversibleSequence([clean, ScaledShift(lambda: log_scale)]).double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for _ in range(3):
        y, logdet = seq(x)
        (y.sum() + logdet.sum()).backward()
    assert len(looked) == 1 + 3   # the clean step once, the other at every forward
    assert seq._notes[0].uses_unregistered is False and seq._notes[1].uses_unregistered is True
    assert log_scale.grad is not None


def test_tensors_made_inside_a_step_with_grad_enabled_are_not_taken_for_unregistered_ones():
    class InnerGrad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            with torch.enable_grad():
                inner = torch.ones(2, requires_grad=True) * 1.0   # requires grad, made here
                scale = (inner.sum() * 0 + 1).detach()
            return x * self.w * scale, x.new_zeros(x.shape[0])

        def inverse(self, y):
            return y / self.w, y.new_zeros(y.shape[0])

    seq = ReversibleSequence([InnerGrad(), InnerGrad()]).double()
    y, _ = seq(torch.randn(2, 3, dtype=torch.float64))
    y.sum().backward()
    assert all(notes.uses_unregistered is False for notes in seq._notes.values())
    assert all(p.grad is not None for p in seq.parameters())
