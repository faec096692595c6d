"""revglow.training.optimizers: the reference's Adamax against an independent NumPy transcription of openai/glow's
`optim.adamax`, its state round trip, and make_optimizer."""
import io
import math

import numpy as np
import pytest
import torch

from revglow.training.config import TrainConfig
from revglow.errors import ConfigError
from revglow.training.optimizers import ReferenceAdamax, make_optimizer, reference_beta2


def _numpy_reference_adamax(w0, grads, lr, beta1, beta2, eps):
    """openai/glow optim.adamax, one line of theirs per line here: t from 1, mom1, m2 = max(beta2 m2, |g|),
    alpha_t = alpha sqrt(1 - beta2^t) / (1 - beta1^t), w = w - alpha_t mom1 / (m2 + eps)."""
    w = np.array(w0, dtype=np.float64)
    mom1 = np.zeros_like(w)
    mom2 = np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        alpha_t = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
        mom1 = beta1 * mom1 + (1.0 - beta1) * g
        mom2 = np.maximum(beta2 * mom2, np.abs(g))
        w = w - alpha_t * mom1 / (mom2 + eps)
    return w


def _gradients(steps, shape, seed=0):
    rng = np.random.default_rng(seed)
    grads = [rng.normal(size=shape) * rng.uniform(0.1, 3.0) for _ in range(steps)]
    grads[2][0] = 0.0          # a zero gradient: the running maximum must decay, not reset
    return grads


@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_reference_adamax_matches_an_independent_transcription(beta1):
    shape = (5, 3)
    w0 = np.random.default_rng(1).normal(size=shape)
    grads = _gradients(6, shape)
    beta2 = reference_beta2(steps_per_epoch=7)
    w = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    opt = ReferenceAdamax([w], lr=3e-2, betas=(beta1, beta2), eps=1e-8)
    for g in grads:
        w.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    expected = _numpy_reference_adamax(w0, grads, 3e-2, beta1, beta2, 1e-8)
    np.testing.assert_allclose(w.detach().numpy(), expected, rtol=1e-12, atol=1e-14)


def test_reference_adamax_is_not_torch_adamax():
    """The reference's sqrt(1 - beta2^t) makes its first step much shorter than torch.optim.Adamax's."""
    a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    ours = ReferenceAdamax([a], lr=1e-2, betas=(0.9, 0.99))
    theirs = torch.optim.Adamax([b], lr=1e-2, betas=(0.9, 0.99))
    a.grad = b.grad = torch.ones(4, dtype=torch.float64)
    ours.step()
    theirs.step()
    assert torch.allclose(a, 0.1 * b)      # sqrt(1 - 0.99) = 0.1


def test_reference_beta2_from_steps_per_epoch():
    assert reference_beta2(782) == 1 - 1 / 782                 # CIFAR-10, 50000 images, batch 64
    assert reference_beta2(1) == 0.0 and reference_beta2(10, polyak_epochs=2) == 1 - 1 / 20
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="steps_per_epoch"):
            reference_beta2(bad)


def _run(opt_params, grads, start=0, stop=None):
    opt, w = opt_params
    for g in grads[start:stop]:
        w.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()


def test_state_dict_round_trip_resumes_bit_for_bit():
    grads = _gradients(6, (4, 4), seed=3)
    w0 = torch.randn(4, 4)
    straight_w = torch.nn.Parameter(w0.clone())
    straight = ReferenceAdamax([straight_w], lr=1e-2, betas=(0.9, 0.95))
    _run((straight, straight_w), grads)

    first_w = torch.nn.Parameter(w0.clone())
    first = ReferenceAdamax([first_w], lr=1e-2, betas=(0.9, 0.95))
    _run((first, first_w), grads, stop=3)
    buffer = io.BytesIO()
    torch.save({"w": first_w.detach().clone(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)          # as a checkpoint is read
    resumed_w = torch.nn.Parameter(saved["w"])
    resumed = ReferenceAdamax([resumed_w], lr=1e-2, betas=(0.5, 0.5))   # the saved betas win, as in torch
    resumed.load_state_dict(saved["opt"])
    assert resumed.param_groups[0]["betas"] == (0.9, 0.95)
    _run((resumed, resumed_w), grads, start=3)
    assert torch.equal(resumed_w, straight_w)
    assert resumed.state[resumed_w]["step"] == 6
    assert torch.equal(resumed.state[resumed_w]["exp_inf"], straight.state[straight_w]["exp_inf"])


def test_parameters_without_gradient_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = ReferenceAdamax([a, b])
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b, torch.ones(2)) and b not in opt.state and not torch.equal(a, torch.ones(2))


@pytest.mark.parametrize("kwargs, match", [({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "beta1"),
                                           ({"betas": (0.9, -0.1)}, "beta2"), ({"eps": 0.0}, "eps"),
                                           ({"betas": 0.9}, "pair")])
def test_bad_hyperparameters_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ReferenceAdamax([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_make_optimizer():
    params = [torch.nn.Parameter(torch.ones(2))]
    adam = make_optimizer(TrainConfig(lr=2e-3, progress=False), params, steps_per_epoch=50)
    assert type(adam) is torch.optim.Adam and adam.param_groups[0]["lr"] == 2e-3
    adamax = make_optimizer(TrainConfig(optimizer="adamax", progress=False), params, steps_per_epoch=50)
    assert isinstance(adamax, ReferenceAdamax) and adamax.param_groups[0]["betas"] == (0.9, 1 - 1 / 50)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(TypeError, match="TrainConfig"):
        make_optimizer({"optimizer": "adam"}, params, 50)
