"""The class head of a class-conditional Glow (the authors' "predictive loss"): its cross-entropy against an
independent numpy computation, its gradients in every memory mode against autograd, that it learns, and that
checkpoints from before it existed load as the model they were."""
import json
import math

import numpy as np
import pytest
import torch

from revglow import Glow, GlowConfig

CFG = dict(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8, num_classes=3, kernels="torch")


def _model(**over) -> Glow:
    torch.manual_seed(0)
    model = Glow(GlowConfig(**{**CFG, **over})).double()
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    model.initialize(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    return model


def _randomize_head(model: Glow) -> None:
    with torch.no_grad():
        for p in model.class_head.parameters():
            p.normal_(0, 0.5)


def test_at_initialization_every_class_is_equally_likely():
    model = _model()
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1])
    out = model.losses(x, y, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out.bits_y, torch.full((4,), math.log2(3), dtype=torch.float64))
    assert out.class_logits.shape == (4, 3)
    assert torch.equal(out.bits_x, model(x, y, generator=torch.Generator().manual_seed(5)))   # forward is bits_x


def test_cross_entropy_in_bits_against_numpy():
    """logits = mean_hw(z_top) W^T + b, times exp(3 logs); bits_y = -log2 softmax(logits)[y]; z_top read with a hook
    on the last level's flow (the top has no split), the rest computed in numpy."""
    model = _model()
    _randomize_head(model)
    captured = {}
    model.flows[-1].register_forward_hook(lambda m, inp, out: captured.update(z=out[0].detach().numpy()))
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([2, 0, 1, 1, 0])
    out = model.losses(x, y)
    head = model.class_head
    w, b = head.linear.weight.detach().numpy(), head.linear.bias.detach().numpy()
    scale = np.exp(3.0 * head.logs.detach().numpy())
    logits = (captured["z"].mean(axis=(2, 3)) @ w.T + b) * scale
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -log_softmax[np.arange(5), y.numpy()] / np.log(2.0)
    np.testing.assert_allclose(out.bits_y.detach().numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(out.class_logits.detach().numpy(), logits, rtol=1e-12)


@pytest.mark.parametrize("memory", ["reversible", "checkpoint"])
def test_gradients_of_the_joint_loss_match_autograd(memory):
    """bits_x + weight_y * bits_y: every parameter's gradient in `memory` mode equals plain autograd (float64)."""
    grads = {}
    for mode in ("autograd", memory):
        model = _model(memory=mode)
        _randomize_head(model)
        torch.manual_seed(1)
        x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
        out = model.losses(x, torch.tensor([0, 2, 1, 2]), generator=torch.Generator().manual_seed(3))
        (out.bits_x.mean() + 0.5 * out.bits_y.mean()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[memory].keys() == grads["autograd"].keys()
    assert any(n.startswith("class_head.") for n in grads[memory])
    for name, g in grads["autograd"].items():
        torch.testing.assert_close(grads[memory][name], g, rtol=1e-9, atol=1e-11, msg=name)


def test_the_head_learns_to_tell_the_classes_apart():
    """Two classes, dark and bright images: after a few Adam steps on the joint loss the head's accuracy is 1,
    and predict_class (no label needed) agrees with the logits of the loss."""
    torch.manual_seed(0)
    model = Glow(GlowConfig(**{**CFG, "num_classes": 2}))
    y = torch.tensor([0, 1] * 8)
    x = (torch.rand(16, 1, 8, 8) * 0.3 + 0.6 * y.view(-1, 1, 1, 1)).mul(255).round().to(torch.uint8)
    model.initialize(x, y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        out = model.losses(x, y)
        loss = out.bits_x.mean() + out.bits_y.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    logits = model.predict_class(x)
    assert torch.equal(logits.argmax(1), y)
    assert float(model.losses(x, y).bits_y.detach().mean()) < 0.2


def test_unconditional_models_and_models_without_the_head():
    plain = Glow(GlowConfig(**{**CFG, "num_classes": 0}))
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    out = plain.losses(x)
    assert plain.class_head is None and out.bits_y is None and out.class_logits is None
    with pytest.raises(ValueError, match="no class head"):
        plain.predict_class(x)
    headless = Glow(GlowConfig(**{**CFG, "class_head": False}))
    assert headless.class_head is None and headless.losses(x, torch.tensor([0, 1])).bits_y is None
    with pytest.raises(TypeError, match="class_head must be a bool"):
        GlowConfig(**{**CFG, "class_head": 1})


def test_a_config_saved_before_the_head_existed_loads_without_it():
    """A conditional model's saved config without `class_head` (written before it existed) is the model it was:
    its state dict loads strictly and gives the same bits/dim."""
    old = GlowConfig(**{**CFG, "class_head": False})
    saved = old.to_dict()
    del saved["class_head"]
    restored = GlowConfig.from_dict(saved)
    assert restored.class_head is False and GlowConfig.from_dict(GlowConfig(**CFG).to_dict()).class_head is True
    torch.manual_seed(0)
    model = Glow(old)
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2])
    model.initialize(x, y)
    again = Glow(restored)
    again.load_state_dict(model.state_dict())
    model.eval(), again.eval()
    xc = model.preprocess(x, noise=False)
    torch.testing.assert_close(again.bits_per_dim(xc, y), model.bits_per_dim(xc, y))


def _train(tmp_path, name, **options):
    from revglow.training.data import load_dataset
    from revglow.training.config import TrainConfig
    from revglow.training.trainer import Trainer

    config = TrainConfig(batch_size=32, eval_batch_size=512, warmup=2, lr=3e-3, ema=None, eval_every=0, sample_every=0,
                         checkpoint_every=0, n_samples=10, progress=False, out=str(tmp_path / name), **options)
    glow = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16, num_classes=10, kernels="torch")
    trainer = Trainer(glow, config, data=load_dataset("digits"))
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


@pytest.mark.long(2)
def test_the_trainer_adds_weight_y_times_the_class_bits_and_evaluates_the_head(tmp_path):
    """With weight_y > 0 every step logs the head's class bits and the test evaluation its accuracy, which beats
    chance on digits after 60 steps; with weight_y = 0 the head gets no gradient and stays at zero."""
    trainer, rows = _train(tmp_path, "joint", max_steps=60, weight_y=1.0)
    steps = [r for r in rows if "images_per_s" in r]
    assert len(steps) == 60 and all(0 < r["class_bits"] for r in steps)
    assert steps[-1]["class_bits"] < steps[0]["class_bits"] <= math.log2(10) + 1e-6
    final = [r for r in rows if "test_class_accuracy" in r][-1]
    assert final["test_class_accuracy"] > 0.3 and final["test_class_bits"] < math.log2(10)

    trainer, rows = _train(tmp_path, "off", max_steps=3, weight_y=0.0)
    assert all("class_bits" not in r for r in rows if "images_per_s" in r)
    assert all(float(p.detach().abs().max()) == 0 for p in trainer.model.class_head.parameters())
