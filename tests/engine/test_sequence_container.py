"""ReversibleSequence as a container (len, indexing, slicing, iteration, like nn.Sequential), without logdets
(`logdet=False`, for classifiers and transformers), and the reconstruction tolerance that follows the precision
(`tol=None`); every mode held to plain autograd in float64."""
import warnings

import pytest
import torch
from torch import nn

from flow_checks import flat_grads, perturb_, rel_err
from revglow import ReconstructionWarning, ReversibleSequence, TwoNetworkCoupling
from revglow.engine.coupling import AffineCoupling
from revglow.engine.reconstruction import reconstruction_tolerance

MODES = ["reversible", "checkpoint", "autograd"]


def _steps(depth=4, seed=0):
    torch.manual_seed(seed)
    steps = [AffineCoupling(nn.Conv2d(2, 4, 3, padding=1)) for _ in range(depth)]
    for step in steps:
        perturb_(step, std=0.2, seed=seed + 1)
    return steps


def _sequence(mode, logdet=True, depth=4):
    return ReversibleSequence(_steps(depth), memory=mode, logdet=logdet).double()


# -------------------------------------------------------------------------------------------- logdet=False
@pytest.mark.parametrize("mode", MODES)
def test_without_logdet_forward_and_inverse_return_the_tensor_and_train_like_autograd(mode):
    with_ld, without = _sequence("autograd"), _sequence(mode, logdet=False)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, _ = with_ld(xa)
    y = without(xb)
    assert isinstance(y, torch.Tensor) and torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    y_ref.square().sum().backward()   # the same loss, of y alone
    y.square().sum().backward()
    assert rel_err(xb.grad, xa.grad) < 1e-10
    assert rel_err(flat_grads(without), flat_grads(with_ld)) < 1e-10
    with torch.no_grad():
        back = without.inverse(without(x))
    assert isinstance(back, torch.Tensor) and rel_err(back, x) < 1e-12


def test_a_reversible_classifier_without_logdet():
    torch.manual_seed(0)
    net = lambda: nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 4))  # noqa: E731
    body = {mode: ReversibleSequence([TwoNetworkCoupling(net(), net()) for _ in range(3)], memory=mode,
                                     logdet=False).double() for mode in MODES}
    for seq in body.values():
        seq.load_state_dict(body["autograd"].state_dict())
    head = nn.Linear(8, 3).double()
    x, labels = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 0])
    grads = {}
    for mode, seq in body.items():
        head.zero_grad()
        nn.functional.cross_entropy(head(seq(x)), labels).backward()
        grads[mode] = flat_grads(seq)
    for mode in MODES[:2]:
        assert rel_err(grads[mode], grads["autograd"]) < 1e-10


# -------------------------------------------------------------------------------------------- container
@pytest.mark.parametrize("mode", MODES)
def test_len_index_iteration_and_slices_share_the_steps(mode):
    seq = _sequence(mode)
    assert len(seq) == 4
    assert seq[0] is seq.steps[0] and seq[-1] is seq.steps[3]
    assert list(seq) == list(seq.steps)
    head, tail = seq[:2], seq[2:]
    for part, steps in ((head, seq.steps[:2]), (tail, seq.steps[2:])):
        assert isinstance(part, ReversibleSequence) and len(part) == 2
        assert all(a is b for a, b in zip(part, steps))   # the modules are shared, not copied
        assert (part.memory, part.check, part.tol, part.preserve_rng_state, part.logdet) == \
            (seq.memory, seq.check, seq.tol, seq.preserve_rng_state, seq.logdet)
    assert [type(s) for s in seq[::2]] == [type(seq[0]), type(seq[2])] and seq[::2][1] is seq[2]
    # the halves compose to the whole, in values and in gradients
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    y_whole, ld_whole = seq(x)
    g_whole = torch.autograd.grad((y_whole.square().sum() + ld_whole.sum()), list(seq.parameters()))
    mid, ld_head = head(x)
    y_parts, ld_tail = tail(mid)
    g_parts = torch.autograd.grad((y_parts.square().sum() + (ld_head + ld_tail).sum()), list(seq.parameters()))
    assert rel_err(y_parts, y_whole) < 1e-12 and rel_err(ld_head + ld_tail, ld_whole) < 1e-12
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(g_parts, g_whole))


def test_bad_indices_and_options_are_refused():
    seq = _sequence("reversible")
    with pytest.raises(IndexError):
        seq[4]
    with pytest.raises(ValueError, match="selects no step"):
        seq[3:1]
    with pytest.raises(TypeError, match="logdet must be a bool"):
        ReversibleSequence(_steps(1), logdet="no")
    with pytest.raises(ValueError, match="tol must be a positive number, or None"):
        ReversibleSequence(_steps(1), tol=0)


# --------------------------------------------------------------------------------------- the tolerance
def test_the_default_tolerance_follows_the_autocast_dtype():
    assert reconstruction_tolerance(None) == 1e-3
    bf16, fp16 = reconstruction_tolerance(torch.bfloat16), reconstruction_tolerance(torch.float16)
    assert bf16 > fp16 > 1e-3   # bfloat16 has 8 bits of mantissa, float16 11
    assert bf16 == pytest.approx(16 * 2.0 ** -7) and fp16 == pytest.approx(16 * 2.0 ** -10)
    assert ReversibleSequence(_steps(1)).tol is None and ReversibleSequence(_steps(1), tol=2e-3).tol == 2e-3


class _Rounding(nn.Module):
    """A step whose inverse is off by a relative 5e-3 (under bfloat16 autocast a healthy rounding level, in float32
    a broken inverse)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.w, x.new_zeros(x.shape[0])

    def inverse(self, y):
        return y / self.w * (1 + 5e-3), y.new_zeros(y.shape[0])


@pytest.mark.parametrize("autocast, tol, warns", [(False, None, True), (True, None, False), (True, 1e-3, True)])
def test_the_check_uses_the_tolerance_of_the_forward_precision_and_an_explicit_one_wins(autocast, tol, warns):
    seq = ReversibleSequence([_Rounding()], tol=tol)
    x = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, _ = seq(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y.sum().backward()   # outside autocast: the tolerance is the forward's
    assert any(issubclass(w.category, ReconstructionWarning) for w in caught) == warns
    assert 4e-3 < float(seq.last_reconstruction_error.max()) < 6e-3
