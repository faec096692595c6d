"""The reference implementation's coupling network and zero layers (GlowConfig nn_actnorm, edge_padding,
zero_logscale_factor, actnorm_logscale_factor): what each option does, that Glow.initialize initializes the
network's ActNorms, that a config saved before the options existed loads as the model it was, and the flags.
(Round trips, brute-force log-determinants and gradients against autograd of these layers are in test_layers
and test_model, which run GlowConfig's defaults.)"""
import json

import pytest
import torch
import torch.nn.functional as F

from flow_checks import perturb_, rel_err
from revglow import Glow, GlowConfig
from revglow.cli import main
from revglow.glow.layers.actnorm import ActNorm
from revglow.glow.layers.coupling import Coupling
from revglow.glow.layers.prior import SplitPrior, TopPrior
from revglow.glow.layers.conv import Conv2dSame, ZeroConv2d, add_edge_padding, conv2d_same

FIDELITY_FIELDS = ("nn_actnorm", "edge_padding", "zero_logscale_factor", "actnorm_logscale_factor")
PLAIN = dict(nn_actnorm=False, edge_padding=False, zero_logscale_factor=None, actnorm_logscale_factor=1.0)


def _config(**options):
    return GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, kernels="torch", **options)


def test_defaults_are_the_reference_and_each_option_is_validated():
    cfg = GlowConfig()
    assert (cfg.nn_actnorm, cfg.edge_padding, cfg.zero_logscale_factor, cfg.actnorm_logscale_factor) == \
        (True, True, 3.0, 3.0)
    with pytest.raises(TypeError, match="nn_actnorm must be a bool"):
        GlowConfig(nn_actnorm=1)
    with pytest.raises(TypeError, match="edge_padding must be a bool"):
        GlowConfig(edge_padding="yes")
    with pytest.raises(TypeError, match="zero_logscale_factor must be a number or None"):
        GlowConfig(zero_logscale_factor="3")
    with pytest.raises(ValueError, match="zero_logscale_factor must be a positive finite number"):
        GlowConfig(zero_logscale_factor=0.0)
    with pytest.raises(TypeError, match="actnorm_logscale_factor must be a number"):
        GlowConfig(actnorm_logscale_factor=None)
    with pytest.raises(ValueError, match="actnorm_logscale_factor must be a positive finite number"):
        GlowConfig(actnorm_logscale_factor=float("inf"))
    with pytest.raises(ValueError, match="logscale_factor must be a positive finite number"):
        ActNorm(3, logscale_factor=-1.0)


def test_a_config_saved_before_the_options_loads_as_the_model_it_was():
    torch.manual_seed(0)
    old = Glow(_config(**PLAIN)).double()
    old.initialize(torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8))
    perturb_(old, std=0.05)
    saved = {k: v for k, v in old.config.to_dict().items() if k not in FIDELITY_FIELDS}   # a checkpoint's config
    # the plain network has exactly the parameters of the model before the options (no new keys, same shapes)
    assert not [k for k in old.state_dict() if "norm_" in k or "logs" in k]
    assert old.state_dict()["flows.0.steps.0.coupling.net.conv_in.weight"].shape == (8, 2, 3, 3)
    restored = GlowConfig.from_dict(saved)
    assert restored == old.config and {k: getattr(restored, k) for k in FIDELITY_FIELDS} == PLAIN
    model = Glow(restored).double()
    model.load_state_dict(old.state_dict())
    xc = torch.rand(3, 1, 8, 8, dtype=torch.float64) - 0.5
    assert torch.equal(model.log_prob(xc), old.log_prob(xc))
    with pytest.raises(RuntimeError):     # what the mapping prevents: today's defaults are another model
        Glow(GlowConfig.from_dict({**saved, **{k: getattr(GlowConfig(), k) for k in FIDELITY_FIELDS}})) \
            .load_state_dict(old.state_dict())
    # a config saved now keeps the options
    assert GlowConfig.from_dict(_config().to_dict()) == _config()


def test_glow_initialize_sets_the_network_actnorms_to_unit_statistics():
    torch.manual_seed(0)
    model = Glow(_config())
    nets = [m for m in model.modules() if isinstance(m, Coupling)]
    norms = [n for net in nets for n in (net.net.norm_in, net.net.norm_hidden)]
    assert len(norms) == 2 * 4 and all(n in model._actnorms for n in norms)
    assert all(net.net.conv_in.bias is None and net.net.conv_hidden.bias is None for net in nets)
    seen = []
    hook = norms[0].register_forward_hook(lambda m, i, out: seen.append(out[0].detach().clone()))
    model.initialize(torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8))
    hook.remove()
    assert model.is_initialized and all(n.is_initialized for n in norms)
    h = seen[0].double()
    assert h.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (h.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-3
    norms[3].reset_initialization()
    assert not model.is_initialized       # every network ActNorm counts


def test_edge_padding_adds_a_border_channel_the_convolution_sees():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    padded = add_edge_padding(x, 1)
    assert padded.shape == (2, 4, 6, 7)
    ring = padded[:, :3].clone()
    ring[:, :, 1:-1, 1:-1] = 0
    assert torch.equal(padded[:, :3, 1:-1, 1:-1], x) and ring.abs().max() == 0
    border = torch.ones(6, 7, dtype=torch.float64)
    border[1:-1, 1:-1] = 0
    assert torch.equal(padded[:, 3], border.expand(2, 6, 7))
    # equals zero padding plus the border channel's own weights applied to the indicator
    w, b = torch.randn(5, 4, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    expected = F.conv2d(x, w[:, :3], b, padding=1) + F.conv2d(border.view(1, 1, 6, 7), w[:, 3:])
    assert rel_err(conv2d_same(x, w, b, edge_padding=True), expected) < 1e-12
    # a zero image: only pixels next to the border see something
    conv = Conv2dSame(3, 1, 3, bias=False, edge_padding=True).double()
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 3] = 1.0
    out = conv(torch.zeros(1, 3, 4, 5, dtype=torch.float64))[0, 0]
    assert out[1:-1, 1:-1].abs().max() == 0 and out[0, 0] == 5 and out[0, 2] == 3
    assert Conv2dSame(3, 2, 1, edge_padding=True).weight.shape[1] == 3   # 1x1: nothing to pad


def test_zero_layers_start_at_zero_and_scale_by_exp_factor_logs():
    conv = ZeroConv2d(3, 4, 3, edge_padding=True, logscale_factor=3.0).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert conv(x).abs().max() == 0
    perturb_(conv, std=0.3)
    plain = conv2d_same(x, conv.weight, conv.bias, True)
    assert rel_err(conv(x), plain * torch.exp(3 * conv.logs).view(1, -1, 1, 1)) < 1e-12
    assert not hasattr(ZeroConv2d(3, 4, logscale_factor=None), "logs")
    # the priors' zero layers carry the factor too (top prior: per channel, on the learned top and class shift)
    split = SplitPrior(4, edge_padding=True, logscale_factor=3.0)
    assert split.conv.logscale_factor == 3.0 and split.conv.weight.shape[1] == 2 + 1
    top = TopPrior((4, 2, 2), learn_top=True, num_classes=3, logscale_factor=3.0).double()
    with torch.no_grad():
        top.top.fill_(0.5)
        top.top_logs.fill_(0.1)
    mean, _ = top._params(1, torch.tensor([1]), x)
    assert torch.allclose(mean, torch.full_like(mean, 0.5 * torch.exp(torch.tensor(0.3)).item()))


def test_actnorm_logscale_factor_keeps_the_map_and_scales_the_gradient():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1
    plain, scaled = ActNorm(3).double(), ActNorm(3, logscale_factor=3.0).double()
    plain.initialize_from(x)
    scaled.initialize_from(x)
    assert rel_err(scaled.scale(), plain.scale()) < 1e-12 and rel_err(scaled.bias, plain.bias) < 1e-12
    assert rel_err(scaled.log_scale * 3, plain.log_scale) < 1e-12   # stored divided by the factor
    for layer in (plain, scaled):
        y, logdet = layer(x)
        (y.square().sum() + logdet.sum()).backward()
    assert rel_err(scaled.log_scale.grad, 3 * plain.log_scale.grad) < 1e-12   # what the optimizer sees
    clone = ActNorm(3, logscale_factor=3.0).double()
    clone.load_state_dict(scaled.state_dict())
    assert rel_err(clone(x)[0], plain(x)[0]) < 1e-12


def test_command_line_flags_and_print_config(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--print-config", "--out", str(tmp_path / "run"), "--no-nn-actnorm",
                 "--no-edge-padding", "--zero-logscale-factor", "none", "--actnorm-logscale-factor", "1"]) == 0
    glow = json.loads(capsys.readouterr().out)["glow_config"]
    assert {k: glow[k] for k in FIDELITY_FIELDS} == PLAIN
    assert main(["train", "--data", "digits", "--print-config", "--out", str(tmp_path / "run")]) == 0
    glow = json.loads(capsys.readouterr().out)["glow_config"]
    assert {k: glow[k] for k in FIDELITY_FIELDS} == dict(nn_actnorm=True, edge_padding=True,
                                                         zero_logscale_factor=3.0, actnorm_logscale_factor=3.0)
