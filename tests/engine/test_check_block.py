"""check_block: right blocks pass, and each kind of wrong block fails with the check that names its defect; the
caller's block and RNG stream are left as they were. Float64 on the CPU unless a test says otherwise."""
import pytest
import torch
from torch import nn

from revglow import AffineCoupling, TwoNetworkCoupling
from revglow.engine.check_block import JACOBIAN_AUTO_MAX_DIMS, BlockCheckError, BlockCheckReport, check_block
from revglow.engine.invertible import InvertibleModule

DOUBLE = torch.float64


# ------------------------------------------------------------------------------------------- user blocks
class UserAffine(nn.Module):
    """A user's own block, forward and inverse only: y2 = (x2 + shift) * exp(log_s), (shift, log_s) = net(x1 [, c]).
    The class attributes let the subclasses below break it in one place each."""

    inverse_shift_factor = 1.0   # the inverse subtracts this times the shift
    logdet_sign = 1.0            # forward and inverse return this times log|det dy/dx|

    def __init__(self, context_channels=0, dropout=0.0, batchnorm=False):
        super().__init__()
        layers = [nn.Conv2d(2 + context_channels, 6, 3, padding=1)]
        layers += [nn.BatchNorm2d(6)] if batchnorm else []
        layers += [nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Conv2d(6, 4, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def _shift_log_scale(self, x1, context):
        shift, raw = self.net(x1 if context is None else torch.cat([x1, context], 1)).chunk(2, 1)
        return shift, torch.tanh(raw)

    def forward(self, x, context=None):
        x1, x2 = x.chunk(2, 1)
        shift, log_s = self._shift_log_scale(x1, context)
        return torch.cat([x1, (x2 + shift) * log_s.exp()], 1), self.logdet_sign * log_s.flatten(1).sum(1)

    def inverse(self, y, context=None):
        y1, y2 = y.chunk(2, 1)
        shift, log_s = self._shift_log_scale(y1, context)
        x2 = y2 * (-log_s).exp() - self.inverse_shift_factor * shift
        return torch.cat([y1, x2], 1), self.logdet_sign * log_s.flatten(1).sum(1)


class OffInverse(UserAffine):
    inverse_shift_factor = 1.01


class WrongSignLogdet(UserAffine):
    logdet_sign = -1.0


class BareTensorForward(UserAffine):
    def forward(self, x, context=None):
        return super().forward(x, context)[0]


class UnregisteredGain(UserAffine):
    """Scales its shift by a tensor that requires grad but is a plain attribute, not a parameter."""

    def __init__(self):
        super().__init__()
        self.gain = torch.tensor(1.5, dtype=DOUBLE, requires_grad=True)

    def _shift_log_scale(self, x1, context):
        shift, log_s = super()._shift_log_scale(x1, context)
        return shift * self.gain, log_s


class ContextIgnoringInverse(UserAffine):
    def inverse(self, y, context=None):
        return super().inverse(y, torch.zeros_like(context))


class InverseCountsCalls(UserAffine):
    """Its inverse updates a buffer, so the reversible backward (which runs the inverse) leaves other buffers."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inverse_calls", torch.zeros((), dtype=DOUBLE))

    def inverse(self, y, context=None):
        self.inverse_calls += 1
        return super().inverse(y, context)


class AdditiveWithOwnVJP(InvertibleModule):
    """y2 = x2 + net(x1) with its own inverse_vjp; `forget_x1_path` drops dL/dx1's term through the network."""

    def __init__(self, forget_x1_path=False):
        super().__init__()
        self.net = nn.Conv2d(2, 2, 3, padding=1)
        self.forget_x1_path = forget_x1_path

    def forward(self, x):
        x1, x2 = x.chunk(2, 1)
        return torch.cat([x1, x2 + self.net(x1)], 1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        y1, y2 = y.chunk(2, 1)
        return torch.cat([y1, y2 - self.net(y1)], 1), y.new_zeros(y.shape[0])

    def inverse_vjp(self, y, grad_y, grad_logdet):
        y1 = y[:, :2].detach().requires_grad_(True)
        with torch.enable_grad():
            h = self.net(y1)
        grad_y1, grad_y2 = grad_y.chunk(2, 1)
        grads = torch.autograd.grad(h, [y1] + list(self.net.parameters()), grad_y2)
        grad_x1 = grad_y1 if self.forget_x1_path else grad_y1 + grads[0]
        x = torch.cat([y1.detach(), y[:, 2:] - h.detach()], 1)
        return x, torch.cat([grad_x1, grad_y2], 1), dict(zip(self.net.parameters(), grads[1:]))

    inverse_vjp.replays_forward = False


def _conv_net(channels_in, channels_out, dropout=0.0):
    return nn.Sequential(nn.Conv2d(channels_in, 6, 3, padding=1), nn.Tanh(), nn.Dropout(dropout),
                         nn.Conv2d(6, channels_out, 3, padding=1))


def _x(n=3, channels=4, size=3, dtype=DOUBLE):
    return torch.randn(n, channels, size, size, dtype=dtype)


def _check(block, x, context=None, **kw):
    return check_block(block.to(x.dtype), x, context, raise_on_failure=False, **kw)


def _row(report: BlockCheckReport, name: str):
    return next(check for check in report.checks if check.name == name)


# ------------------------------------------------------------------------------------------- right blocks
RIGHT_CHECKS = ["contract", "inverse logdet", "round trip", "logdet", "inverse_vjp", "unregistered tensors",
                "gradients (reversible)", "gradients (checkpoint)"]


def test_affine_coupling_over_a_conv_passes_every_check():
    report = _check(AffineCoupling(nn.Conv2d(2, 4, 3, padding=1)), _x())
    assert report.ok, str(report)
    assert [check.name for check in report.checks] == RIGHT_CHECKS
    assert "brute-force Jacobian" in _row(report, "logdet").detail


def test_affine_coupling_with_a_context_passes_every_check():
    report = _check(AffineCoupling(nn.Conv2d(2 + 3, 4, 3, padding=1)), _x(), torch.randn(3, 3, 3, 3, dtype=DOUBLE))
    assert report.ok, str(report)
    assert "dL/dcontext" not in str(report)   # (named only when off)


def test_two_network_coupling_with_dropout_in_both_networks_passes():
    # f runs before g in forward, g before f in the rebuild: each needs the RNG state of its own forward call
    block = TwoNetworkCoupling(_conv_net(2, 2, dropout=0.3), _conv_net(2, 2, dropout=0.3))
    report = _check(block, _x(n=4, size=4))
    assert report.ok, str(report)


def test_a_token_block_split_on_features_passes():
    # [N, T, D] tokens, the coupling over the last dimension (a reversible transformer's block)
    block = TwoNetworkCoupling(nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 3), nn.Dropout(0.2)),
                               nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 3)), dim=-1)
    report = _check(block, torch.randn(3, 5, 6, dtype=DOUBLE))
    assert report.ok, str(report)
    assert "logdet" in [c.name for c in report.checks]   # 30 values per sample: the Jacobian ran


def test_glows_flow_step_passes_with_its_actnorm_initialized_on_the_copy():
    from revglow.glow.layers.flowstep import FlowStep

    step = FlowStep(4, hidden=8, kernels="torch").double()
    before = {k: v.clone() for k, v in step.state_dict().items()}
    report = _check(step, _x())
    assert report.ok, str(report)
    assert all(torch.equal(before[k], v) for k, v in step.state_dict().items())   # still uninitialized


@pytest.mark.parametrize("kw", [{}, {"dropout": 0.3}, {"context_channels": 2}])
def test_a_users_own_block_passes(kw):
    context = torch.randn(3, 2, 3, 3, dtype=DOUBLE) if kw.get("context_channels") else None
    report = _check(UserAffine(**kw), _x(), context)
    assert report.ok, str(report)
    # the user's block has no inverse_vjp: that row is left out, not reported as passed
    assert [c.name for c in report.checks] == [n for n in RIGHT_CHECKS if n != "inverse_vjp"]


def test_a_block_whose_forward_updates_batchnorm_statistics_passes_and_its_buffers_are_compared():
    report = _check(UserAffine(batchnorm=True), _x(n=4))
    assert report.ok, str(report)
    assert {"buffers (reversible)", "buffers (checkpoint)"} <= {c.name for c in report.checks}


def test_a_block_with_its_own_right_inverse_vjp_passes():
    report = _check(AdditiveWithOwnVJP(), _x())
    assert report.ok, str(report)
    assert _row(report, "inverse_vjp").passed


def test_float32_blocks_are_held_to_float32_tolerances():
    report = _check(AffineCoupling(nn.Conv2d(2, 4, 3, padding=1)), _x(dtype=torch.float32))
    assert report.ok, str(report)
    assert "for torch.float32" in _row(report, "round trip").detail


# ------------------------------------------------------------------------------------------- wrong blocks
@pytest.mark.parametrize("block, context, failing", [
    (OffInverse(), None, "round trip"),
    (WrongSignLogdet(), None, "logdet"),
    (UnregisteredGain(), None, "unregistered tensors"),
    (ContextIgnoringInverse(context_channels=2), torch.randn(3, 2, 3, 3, dtype=DOUBLE), "round trip"),
    (InverseCountsCalls(), None, "buffers (reversible)"),
    (AdditiveWithOwnVJP(forget_x1_path=True), None, "inverse_vjp"),
], ids=["off-inverse", "wrong-sign-logdet", "unregistered-tensor", "inverse-ignores-context", "inverse-changes-buffer",
        "wrong-inverse-vjp"])
def test_a_wrong_block_fails_with_the_check_that_names_its_defect(block, context, failing):
    report = _check(block, _x(), context)
    assert not report.ok
    assert failing in report.failed, str(report)
    with pytest.raises(BlockCheckError, match=f"FAILED .*{failing}".replace("(", r"\(").replace(")", r"\)")):
        check_block(block, _x(), context)


def test_the_failures_of_a_wrong_block_are_the_ones_its_defect_explains():
    assert _check(OffInverse(), _x()).failed == ["round trip", "gradients (reversible)"]
    assert _check(WrongSignLogdet(), _x()).failed == ["logdet"]
    assert "wrong sign" in _row(_check(WrongSignLogdet(), _x()), "logdet").detail
    # a wrong inverse_vjp trains wrong only where it runs: the reversible backward
    assert _check(AdditiveWithOwnVJP(forget_x1_path=True), _x()).failed == ["inverse_vjp", "gradients (reversible)"]
    # the buffer the inverse moves is only moved by the engine that runs the inverse
    assert _check(InverseCountsCalls(), _x()).failed == ["buffers (reversible)"]


def test_an_unregistered_tensor_is_named_and_the_engine_does_not_hide_it():
    report = _check(UnregisteredGain(), _x())
    assert "gain []" in _row(report, "unregistered tensors").detail
    # the engine gives `gain` autograd's gradient (or refuses the block with a StepContractError), and that gradient
    # is compared too: dL/dx, 4 parameters, gain, and the outputs y and logdet make 8 tensors
    for mode in ("reversible", "checkpoint"):
        row = _row(report, f"gradients ({mode})")
        assert (row.passed and row.detail.startswith("8 tensors")) or "StepContractError" in row.detail, row


def test_a_forward_returning_a_bare_tensor_fails_the_contract_and_stops_there():
    report = _check(BareTensorForward(), _x())
    assert report.failed == ["contract"] and len(report.checks) == 1
    assert ".forward must return (tensor, logdet)" in _row(report, "contract").detail
    assert report.skipped == [("the other checks", "they need the step contract")]


def test_a_block_without_inverse_fails_the_contract():
    report = _check(nn.Conv2d(4, 4, 1), _x())
    assert report.failed == ["contract"] and "no inverse" in report.checks[0].detail


def test_a_logdet_of_the_wrong_shape_fails_the_contract():
    class ScalarLogdet(UserAffine):
        def forward(self, x, context=None):
            y, logdet = super().forward(x, context)
            return y, logdet.sum()

    detail = _check(ScalarLogdet(), _x()).checks[0].detail
    assert "logdet of shape [3]; its logdet has shape ()" in detail


def test_an_inverse_returning_minus_the_logdet_breaks_the_sign_convention():
    class NegatedInverseLogdet(UserAffine):
        def inverse(self, y, context=None):
            x, logdet = super().inverse(y, context)
            return x, -logdet

    report = _check(NegatedInverseLogdet(), _x())
    assert report.failed == ["inverse logdet"]
    assert "minus the forward's logdet" in _row(report, "inverse logdet").detail


# ------------------------------------------------------------------------------------------- the report
def test_the_report_reads_as_a_table_and_the_error_carries_it():
    block, x = OffInverse(), _x()
    report = _check(block, x)
    text = str(report)
    assert text.splitlines()[0] == "check_block(OffInverse): FAILED round trip, gradients (reversible)"
    assert any(line.split()[:3] == ["FAIL", "round", "trip"] for line in text.splitlines())
    with pytest.raises(BlockCheckError) as caught:
        check_block(block, x)
    assert isinstance(caught.value, ValueError) and caught.value.report.failed == report.failed
    assert str(caught.value) == text


def test_the_jacobian_runs_on_small_samples_or_when_asked():
    big = _x(n=2, size=5)     # 100 values per sample
    assert big[0].numel() > JACOBIAN_AUTO_MAX_DIMS
    report = _check(WrongSignLogdet(), big)
    assert report.ok and report.skipped[0][0] == "logdet"   # the wrong sign goes unseen without the Jacobian ...
    assert _check(WrongSignLogdet(), big, jacobian=True).failed == ["logdet"]   # ... and is caught with it
    assert "logdet" not in [c.name for c in _check(UserAffine(), _x(), jacobian=False).checks]


def test_the_callers_block_and_rng_stream_are_left_as_they_were():
    block = UserAffine(dropout=0.3, batchnorm=True).double()
    block.net[0].eval()   # a mixed train/eval state, to see it restored module by module
    before = {k: v.clone() for k, v in block.state_dict().items()}
    flags = [m.training for m in block.modules()]
    x = _x(n=4)
    rng = torch.get_rng_state()
    check_block(block, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
    assert [m.training for m in block.modules()] == flags
    assert all(p.grad is None for p in block.parameters())


@pytest.mark.parametrize("args, kw, error, match", [
    ((torch.nn.Identity, _x()), {}, TypeError, "block must be a Module"),
    ((UserAffine(), [1.0]), {}, TypeError, "example_input must be a Tensor"),
    ((UserAffine(), torch.zeros(3, 4, dtype=torch.long)), {}, TypeError, "floating-point"),
    ((UserAffine(), torch.zeros(4)), {}, ValueError, "batch"),
    ((UserAffine(), _x()), {"modes": "reversible"}, ValueError, "modes"),
    ((UserAffine(), _x()), {"jacobian": "yes"}, TypeError, "jacobian"),
    ((UserAffine(), _x(), "context"), {}, TypeError, "context"),
])
def test_bad_arguments_are_named(args, kw, error, match):
    with pytest.raises(error, match=match):
        check_block(*args, **kw)
