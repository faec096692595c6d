"""The training recipe in the trainer: the reference's Adamax, warm-up in epochs, random shifts, and the raw and
EMA weights both evaluated; all of it resumable bit for bit."""
import pytest
import torch

from revglow.training.checkpoints import load_checkpoint
from revglow.training.data import load_dataset
from revglow.errors import ConfigError
from revglow.training.optimizers import ReferenceAdamax
from revglow.training.config import TrainConfig
from revglow.training.resume import load_resume_state, train_config_for_resume
from revglow.training.step import NonFiniteStepWarning, TrainingDiverged
from revglow.training.trainer import Trainer

from train_helpers import TINY, metric_rows, quick_config, step_losses


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_adamax_with_shifts_and_epoch_warmup_resumes_bit_for_bit(tmp_path, digits):
    recipe = dict(optimizer="adamax", augment="shift", warmup=None, warmup_epochs=0.1, eval_every=2)
    straight = Trainer(TINY, quick_config(tmp_path / "a", max_steps=6, **recipe), data=digits)
    assert isinstance(straight.optimizer, ReferenceAdamax)
    straight.run()
    Trainer(TINY, quick_config(tmp_path / "b", max_steps=3, **recipe), data=digits).run()
    state = load_resume_state(tmp_path / "b" / "checkpoint.pt")
    assert "augment" in state["rng"]["generators"]
    second = Trainer(TINY, quick_config(tmp_path / "b", max_steps=6, **recipe), data=digits, resume_state=state)
    second.run()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")


def test_warmup_epochs_become_steps_of_this_run(tmp_path, digits):
    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=3, warmup=None, warmup_epochs=0.5), data=digits)
    assert trainer.sampler.batches_per_epoch == len(digits.train) // 16 == 89
    assert trainer.warmup == 44                    # round(0.5 * 89)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 44)
    saved = trainer.state_dict()["train_config"]
    assert saved["warmup"] == 44 and saved["warmup_epochs"] is None     # resolved, as --warmup's default is


def test_warmup_and_warmup_epochs_exclude_each_other():
    with pytest.raises(ConfigError, match="warmup .*warmup_epochs|not both"):
        TrainConfig(warmup=10, warmup_epochs=1.0)
    for bad, error in ((-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError), (True, TypeError)):
        with pytest.raises(error, match="warmup_epochs"):
            TrainConfig(warmup_epochs=bad)


def test_resume_switches_between_warmup_and_warmup_epochs():
    state = {"train_config": TrainConfig(warmup=40, progress=False).to_dict()}
    assert train_config_for_resume(state, {"warmup_epochs": 2.0}).warmup is None
    state = {"train_config": TrainConfig(warmup_epochs=2.0, progress=False).to_dict()}
    assert train_config_for_resume(state, {"warmup": 5}).warmup_epochs is None


def test_resume_refuses_another_optimizer(tmp_path, digits):
    Trainer(TINY, quick_config(tmp_path, max_steps=1), data=digits).run()
    state = load_resume_state(tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="--optimizer adam"):
        Trainer(TINY, quick_config(tmp_path, max_steps=2, optimizer="adamax"), data=digits, resume_state=state)
    old = dict(state, train_config={k: v for k, v in state["train_config"].items() if k != "optimizer"})
    Trainer(TINY, quick_config(tmp_path, max_steps=2), data=digits, resume_state=old)   # before the option: Adam


def test_shift_augmentation_reaches_the_model(tmp_path, digits, monkeypatch):
    seen = {}

    def capture(self, x, y):
        seen.setdefault(self.config.augment, []).append(x.clone())
        return {"step": self.step + 1, "bpd": 1.0, "skipped": "loss"}

    monkeypatch.setattr(Trainer, "_train_step", capture)
    for augment in ("none", "shift"):
        trainer = Trainer(TINY, quick_config(tmp_path / augment, max_steps=2, augment=augment, max_bad_steps=2),
                          data=digits)
        with pytest.warns(NonFiniteStepWarning), pytest.raises(TrainingDiverged):
            trainer.run()          # every captured step reports a failure, so two of them stop the run
    plain, shifted = seen["none"], seen["shift"]
    assert plain[0].shape == shifted[0].shape and plain[0].dtype == shifted[0].dtype == torch.uint8
    assert not torch.equal(plain[0], shifted[0])


def test_raw_and_ema_weights_both_evaluated_and_reported(tmp_path, digits):
    result = Trainer(TINY, quick_config(tmp_path / "ema", max_steps=3, eval_every=2), data=digits).run()
    rows = [r for r in metric_rows(tmp_path / "ema") if "test_bpd" in r]
    assert [r["step"] for r in rows] == [2, 3]
    assert all(r["ema"] and r["test_bpd_raw"] != r["test_bpd"] for r in rows)
    assert result.used_ema and result.test_bpd == rows[-1]["test_bpd"]
    assert result.test_bpd_raw == rows[-1]["test_bpd_raw"] and result.test_bpd_raw_stderr > 0


def test_without_ema_one_evaluation_serves_both(tmp_path, digits, monkeypatch):
    calls = []
    real = Trainer.evaluate

    def counting(self, *args, **kwargs):
        calls.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", counting)
    result = Trainer(TINY, quick_config(tmp_path, max_steps=2, ema=None), data=digits).run()
    assert len(calls) == 1
    row = [r for r in metric_rows(tmp_path) if "test_bpd" in r][-1]
    assert not row["ema"] and row["test_bpd_raw"] == row["test_bpd"] and result.test_bpd_raw == result.test_bpd
    assert load_checkpoint(tmp_path / "checkpoint.pt")["train_config"]["optimizer"] == "adam"


def test_named_generators_ride_with_the_rng_states_through_a_checkpoint(tmp_path):
    from revglow.training.checkpoints import capture_rng_state, restore_rng_state, save_checkpoint

    generator = torch.Generator().manual_seed(11)
    torch.rand(3, generator=generator)
    path = save_checkpoint({"rng": capture_rng_state({"augment": generator})}, tmp_path / "c.pt")
    expected = torch.rand(5, generator=generator)
    restore_rng_state(load_checkpoint(path)["rng"], {"augment": generator})
    assert torch.equal(torch.rand(5, generator=generator), expected)
    untouched = torch.Generator().manual_seed(3)
    restore_rng_state(capture_rng_state(), {"augment": untouched})        # a checkpoint from before: kept as is
    assert torch.equal(torch.rand(2, generator=untouched), torch.rand(2, generator=torch.Generator().manual_seed(3)))
