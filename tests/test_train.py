"""The training loop: exact resume, non-finite steps, EMA, bf16 autocast, what a checkpoint holds."""
import json
import warnings

import pytest
import torch

from revglow import Glow, GlowConfig
from revglow.checkpoint import load_checkpoint
from revglow.data import load_dataset
from revglow.train import (ExponentialMovingAverage, NonFiniteStepWarning, TrainConfig, Trainer, TrainingDiverged,
                           load_resume_state)

TINY = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _config(out, **options):
    base = dict(batch_size=16, warmup=2, lr=1e-3, ema=0.9, eval_every=0, sample_every=0, checkpoint_every=0,
                n_samples=4, progress=False, out=str(out))
    base.update(options)
    return TrainConfig(**base)


def _losses(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["bpd"], r["lr"], r["grad_norm"]) for r in rows if "images_per_s" in r]


def test_resume_is_bitwise_exact(tmp_path, digits):
    # eval_every=2 puts an evaluation (with its own noise) in both runs: it must not shift the training RNG.
    straight = Trainer(TINY, _config(tmp_path / "a", max_steps=6, eval_every=2), data=digits)
    straight.run()
    first = Trainer(TINY, _config(tmp_path / "b", max_steps=3, eval_every=2), data=digits)
    first.run()
    state = load_resume_state(tmp_path / "b" / "checkpoint.pt")
    second = Trainer(TINY, _config(tmp_path / "b", max_steps=6, eval_every=2), data=digits, resume_state=state)
    assert second.step == 3
    second.run()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    for name, a in straight.ema.shadow.items():
        assert torch.equal(a, second.ema.shadow[name]), name
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert len(_losses(tmp_path / "a")) == 6


def test_checkpoint_contents_and_rotation(tmp_path, digits):
    trainer = Trainer(TINY, _config(tmp_path, max_steps=4, checkpoint_every=1, keep=2), data=digits)
    result = trainer.run()
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert raw["step"] == 4 and raw["data_position"] == {"epoch": 0, "index": 64}
    assert set(raw) >= {"model", "ema", "optimizer", "scheduler", "rng", "glow_config", "train_config"}
    assert GlowConfig.from_dict(raw["glow_config"]) == TINY and raw["train_config"]["warmup"] == 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-00000003.pt",
                                                                         "checkpoint-00000004.pt"]
    assert len(result.samples) == 3 and all(p.exists() for p in result.samples)
    assert result.test_images == len(digits.test) and result.baseline_bpd > 0


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, digits, monkeypatch):
    trainer = Trainer(TINY, _config(tmp_path, max_steps=20, checkpoint_every=2, max_bad_steps=3), data=digits)
    real_forward = Glow.forward
    calls = {"n": 0}

    def forward(self, x, y=None):
        calls["n"] += 1
        bpd = real_forward(self, x, y)
        return bpd * float("nan") if calls["n"] > 2 else bpd

    monkeypatch.setattr(Glow, "forward", forward)
    with pytest.warns(NonFiniteStepWarning, match="non-finite loss"):
        with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row .* after step 2"):
            trainer.run()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 2
    for name, value in trainer.model.state_dict().items():   # skipped steps left the parameters alone
        assert torch.equal(value, state["model"][name]), name
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 2


def test_nonfinite_gradient_is_skipped(tmp_path, digits):
    trainer = Trainer(TINY, _config(tmp_path, max_steps=3), data=digits)
    parameter = next(trainer.model.parameters())
    poisoned = {"left": 1}

    def hook(grad):
        if poisoned["left"]:
            poisoned["left"] -= 1
            return grad * float("inf")
        return grad

    parameter.register_hook(hook)
    with pytest.warns(NonFiniteStepWarning, match="non-finite gradient"):
        result = trainer.run()
    assert result.step == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows if "bpd" in r] == ["gradient", None, None, None]


def test_ema_swaps_weights_in_and_out():
    model = Glow(TINY)
    ema = ExponentialMovingAverage(model, 0.5)
    ema.update()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()   # decay min(0.5, 2/11) = 2/11: shadow = 2/11 * old + 9/11 * (old + 1)
    with ema.applied():
        for n, p in model.named_parameters():
            assert torch.allclose(p, original[n] + 9 / 11)
    for n, p in model.named_parameters():
        assert torch.equal(p, original[n] + 1.0)


def test_bf16_autocast_trains(tmp_path, digits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Trainer(TINY, _config(tmp_path, max_steps=2, amp="bf16"), data=digits).run()
    assert result.step == 2 and result.test_bpd == result.test_bpd


def test_train_config_validation():
    with pytest.raises(ValueError, match="TrainConfig.amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="max_steps or epochs, not both"):
        TrainConfig(max_steps=3, epochs=1)
    with pytest.raises(TypeError, match="TrainConfig.batch_size must be an int"):
        TrainConfig(batch_size=1.5)
    with pytest.raises(ValueError, match="TrainConfig.ema"):
        TrainConfig(ema=1.5)
    assert TrainConfig(data="cifar10").out == "runs/cifar10"
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_worker_processes_give_the_same_run(tmp_path, digits):
    losses = []
    for workers in (0, 1):
        Trainer(TINY, _config(tmp_path / str(workers), max_steps=3, workers=workers), data=digits).run()
        losses.append(_losses(tmp_path / str(workers)))
    assert losses[0] == losses[1]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, digits, monkeypatch):
    import revglow.checkpoint as checkpoint_module

    trainer = Trainer(TINY, _config(tmp_path, max_steps=4, checkpoint_every=2), data=digits)
    real_replace = checkpoint_module.os.replace
    calls = {"n": 0}

    def replace(source, target):
        calls["n"] += 1
        if str(target).endswith("checkpoint.pt") and calls["n"] > 2:   # the save at step 4 dies mid-way
            raise OSError("disk full (injected)")
        return real_replace(source, target)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        trainer.run()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    assert not list(tmp_path.glob(".*.tmp"))
