"""GlowConfig.memory_format: the layout of the coupling networks' convolutions is how a Glow runs, not what it
computes. Every value gives the same loss and parameter gradients in every memory mode (float64), a state dict
moves between them, a resumed run may change it, and a bad value is refused naming the option."""
import pytest
import torch

from flow_checks import perturb_, rel_err
from revglow import Glow, GlowConfig
from revglow.errors import ConfigError
from revglow.training.config import TrainConfig
from revglow.training.resume import check_resumable

FORMATS = ("contiguous", "channels_last", "auto")


def _model(memory_format, memory="autograd", hidden=8):
    torch.manual_seed(0)
    config = GlowConfig(image_shape=(3, 8, 8), levels=2, depth=2, hidden=hidden, memory=memory, kernels="torch",
                        memory_format=memory_format)
    return Glow(config).double()


def _initialized(reference: Glow, memory_format: str, memory: str, x) -> Glow:
    """A Glow of `memory_format` with `reference`'s (initialized, perturbed) weights."""
    model = _model(memory_format, memory)
    model.initialize(x)
    model.load_state_dict(reference.state_dict())
    return model


def _loss_and_grads(model, x):
    model.zero_grad()
    loss = -model.log_prob(x - 0.5).mean()   # log_prob takes centred images
    loss.backward()
    return [loss] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("memory", ["autograd", "checkpoint", "reversible"])
def test_every_memory_format_gives_the_same_loss_and_gradients(memory):
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    reference = _model("contiguous", memory)
    reference.initialize(x)
    perturb_(reference, std=0.05)
    want = _loss_and_grads(reference, x)
    for memory_format in FORMATS[1:]:
        model = _initialized(reference, memory_format, memory, x)
        with torch.profiler.profile() as prof:
            got = _loss_and_grads(model, x)
        assert len(got) == len(want) and all(g is not None for g in got)
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-11, memory_format
        if memory_format == "channels_last":   # the 1x1 layers ran as matrix products over the pixels
            assert "aten::addmm" in {e.name for e in prof.events()}


def test_the_option_reaches_every_coupling_network():
    model = _model("channels_last")
    nets = [m for m in model.modules() if type(m).__name__ == "CouplingNetwork"]
    assert len(nets) == 4 and all(net.memory_format == "channels_last" for net in nets)
    assert GlowConfig().memory_format == "auto"


def test_a_bad_value_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match="GlowConfig.memory_format='nhwc' is not a known option"):
        GlowConfig(memory_format="nhwc")


def test_a_state_dict_loads_across_formats_and_a_resume_may_change_it():
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    source = _model("channels_last")
    source.initialize(x)
    perturb_(source, std=0.05)
    target = _model("contiguous")
    target.load_state_dict(source.state_dict())   # the stored configuration differs in a runtime option only
    assert rel_err(target.log_prob(x - 0.5), source.log_prob(x - 0.5)) < 1e-12
    state = {"train_config": TrainConfig().to_dict(), "glow_config": source.config.to_dict()}
    check_resumable(state, target.config, TrainConfig())
    with pytest.raises(ConfigError, match="--hidden"):   # what the model computes may not change
        check_resumable(state, _model("contiguous", hidden=4).config, TrainConfig())
