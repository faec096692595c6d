"""Exact replay of the random numbers of every stochastic module inside a step, whatever order the step's inverse
calls them in: dropout in both networks of a TwoNetworkCoupling (whose inverse runs g before f), in the children of
a user's own block (generic backward, and the replay-reuse path), on 4-D and [N, D] inputs. Every memory mode is
held to plain autograd in float64, from the same seed; the caller's RNG stream afterwards is autograd's."""
import pytest
import torch
from torch import nn

from flow_checks import flat_grads, perturb_, rel_err
from revglow import ReconstructionWarning, ReversibleSequence, TwoNetworkCoupling

MODES = ["reversible", "checkpoint", "autograd"]


def _conv_net(channels=2, hidden=8, p=0.3):
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Dropout(p),
                         nn.Conv2d(hidden, channels, 3, padding=1))


def _dense_net(features=3, hidden=16, p=0.3):
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Dropout(p), nn.Linear(hidden, features))


class TwoChildBlock(nn.Module):
    """A user's own two-network block, forward and inverse only: y1 = x1 + f(x2), y2 = x2 + g(y1); its inverse
    calls g, then f. With `reuse`, the engine reuses the inverse's network calls in the replayed forward."""

    def __init__(self, make_net, reuse=False):
        super().__init__()
        self.f, self.g = make_net(), make_net()
        self.reuse_inverse_computations = reuse

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], 1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], 1), y.new_zeros(y.shape[0])


def _make(kind, layout):
    net = _conv_net if layout == "4d" else _dense_net
    if kind == "two_network":
        return TwoNetworkCoupling(net(), net())
    return TwoChildBlock(net, reuse=kind == "user_reuse")


def _input(layout, batch=3):
    return torch.randn(batch, 4, 5, 5) if layout == "4d" else torch.randn(batch, 6)


def _sequences(kind, layout, depth=3):
    torch.manual_seed(0)
    ref = ReversibleSequence([_make(kind, layout) for _ in range(depth)], memory="autograd").double()
    perturb_(ref, std=0.1, seed=1)
    seqs = {"autograd": ref}
    for mode in MODES[:2]:
        seq = ReversibleSequence([_make(kind, layout) for _ in range(depth)], memory=mode).double()
        seq.load_state_dict(ref.state_dict())
        seqs[mode] = seq
    return seqs


def _train_step(seq, x, seed):
    xi = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y, logdet = seq(xi)
    loss = (y.square().flatten(1).sum(1) * 0.5 - logdet).mean()
    loss.backward()
    return flat_grads(seq), xi.grad, torch.get_rng_state()


@pytest.mark.parametrize("layout", ["4d", "nd"])
@pytest.mark.parametrize("kind", ["two_network", "user", "user_reuse"])
def test_every_stochastic_child_replays_its_own_random_numbers(kind, layout):
    seqs = _sequences(kind, layout)
    x = _input(layout).double()
    out = {mode: _train_step(seq, x, seed=123) for mode, seq in seqs.items()}
    grads, x_grad, rng = out["autograd"]
    assert grads.abs().sum() > 0
    for mode in MODES[:2]:
        assert rel_err(out[mode][0], grads) < 1e-10, mode
        assert rel_err(out[mode][1], x_grad) < 1e-10, mode
        assert torch.equal(out[mode][2], rng), mode   # the caller's RNG stream after backward is autograd's
    # two training steps in a row: the second draws new masks, and still matches
    out = {mode: _train_step(seq, x, seed=7) for mode, seq in seqs.items()}
    for mode in MODES[:2]:
        assert rel_err(out[mode][0], out["autograd"][0]) < 1e-10, mode


def test_one_rng_state_per_step_is_not_enough_for_a_two_network_block():
    """What the per-call replay fixes: restoring only the step's RNG state before its backward makes g draw f's
    mask in TwoNetworkCoupling's inverse_vjp (g runs first there), and the gradients are wrong."""
    from revglow.engine import replay

    seqs = _sequences("two_network", "4d")
    x = _input("4d").double()
    ref = _train_step(seqs["autograd"], x, seed=123)[0]

    class StepLevelOnly(replay.ModuleCallRng):
        def __init__(self, device, per_call):
            super().__init__(device, per_call=False)

        def recorded_again(self):
            self.start.restore()   # run again as before, without recording per call
            return self.recording()

    original = replay.ModuleCallRng
    replay.ModuleCallRng = StepLevelOnly
    try:
        with pytest.warns(ReconstructionWarning):   # the rebuilt input is wrong too
            wrong = _train_step(seqs["reversible"], x, seed=123)[0]
    finally:
        replay.ModuleCallRng = original
    assert rel_err(wrong, ref) > 1e-2


def test_a_step_that_starts_drawing_random_numbers_is_replayed_exactly():
    """A step seen deterministic records no states per call; when its dropout switches on later, its forward runs
    again recording them (same outputs, buffers updated once), and the gradients are still autograd's."""
    seqs = _sequences("two_network", "4d")
    for seq in seqs.values():
        for m in seq.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    x = _input("4d").double()
    for seed in (1, 2):   # dropout off: the steps are learned to draw nothing
        _train_step(seqs["reversible"], x, seed)
        _train_step(seqs["autograd"], x, seed)
    assert all(notes.draws_random is False for notes in seqs["reversible"]._notes.values())
    for seq in seqs.values():
        for p in seq.parameters():
            p.grad = None
        for m in seq.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.4
    out = {mode: _train_step(seq, x, seed=5) for mode, seq in seqs.items()}
    assert rel_err(out["reversible"][0], out["autograd"][0]) < 1e-10
    assert torch.equal(out["reversible"][2], out["autograd"][2])
    assert all(notes.draws_random for notes in seqs["reversible"]._notes.values())


def test_batchnorm_and_dropout_children_together_update_the_buffers_once():
    def net():
        return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3),
                             nn.Conv2d(8, 2, 3, padding=1))

    torch.manual_seed(0)
    seqs = {mode: ReversibleSequence([TwoNetworkCoupling(net(), net()) for _ in range(2)], memory=mode).double()
            for mode in MODES}
    for seq in seqs.values():
        seq.load_state_dict(seqs["autograd"].state_dict())
    x = _input("4d").double()
    out = {mode: _train_step(seq, x, seed=9) for mode, seq in seqs.items()}
    for mode in MODES[:2]:
        assert rel_err(out[mode][0], out["autograd"][0]) < 1e-10, mode
        for (name, a), (_, b) in zip(seqs["autograd"].named_buffers(), seqs[mode].named_buffers()):
            assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-14), (mode, name)
