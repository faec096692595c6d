"""A run whose state goes bad: an update that leaves the optimizer state or the weights non-finite is caught by the
next step, a bad state is never saved, the stop names a checkpoint that holds a good one, and a rollback restores
the good state kept in memory at half the learning rate."""
import json
import warnings

import pytest
import torch

from revglow.training.checkpoints import load_checkpoint
from revglow.training.data import load_dataset
from revglow.training.divergence import GoodState
from revglow.training.ema import ExponentialMovingAverage
from revglow.training.finite_state import nonfinite_parts, state_flags
from revglow.training.resume import load_resume_state
from revglow.training.run_lock import acquire_run_lock
from revglow.training.step import TrainingDiverged
from revglow.training.trainer import Trainer

from train_helpers import TINY, metric_rows, quick_config


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _finite_checkpoint(path):
    """Whether every tensor of the checkpoint at `path` (weights, EMA, optimizer state) is finite."""
    state = load_checkpoint(path)
    tensors = list(state["model"].values()) + list((state["ema"] or {}).get("shadow", {}).values())
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def _poison_second_moment_after(trainer, steps):
    """After the optimizer step that makes the trainer's step `steps`, an inf in Adam's second moment: the weights
    stay finite (Adam divides by its square root), as after the square of a huge finite gradient overflows."""
    def hook(optimizer, args, kwargs):
        if trainer.step + 1 == steps:
            state = optimizer.state[next(iter(optimizer.state))]
            state["exp_avg_sq"].view(-1)[0] = float("inf")

    return trainer.optimizer.register_step_post_hook(hook)


def test_state_flags_name_each_part_that_is_not_finite():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    ema = ExponentialMovingAverage(model, 0.5)
    ema.update()
    device = torch.device("cpu")
    assert nonfinite_parts(state_flags(model, ema, optimizer, device).tolist()) == []
    optimizer.state[model.bias]["exp_avg_sq"][1] = float("inf")
    ema.shadow["weight"][0, 0] = float("nan")
    assert nonfinite_parts(state_flags(model, ema, optimizer, device).tolist()) == ["the EMA weights",
                                                                                  "the optimizer state"]


def test_an_update_that_breaks_the_optimizer_state_stops_before_it_is_saved(tmp_path, digits):
    """The update of step 3 leaves the weights and the loss finite; the next step reads the state's flags with its
    loss and stops, and the checkpoint it names (step 2) holds a good state that resumes. (Had a checkpoint fallen
    due at step 3, its verification would have stopped the run there: see test_a_bad_state_is_never_saved.)"""
    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=6, checkpoint_every=2, keep=10), data=digits)
    _poison_second_moment_after(trainer, 3)
    with pytest.raises(TrainingDiverged, match=r"the update of step 3 left the optimizer state non-finite; stopping "
                                               r"\(the last good checkpoint is .*checkpoint.pt\)"):
        trainer.run()
    rows = [r for r in metric_rows(tmp_path) if "skipped" in r]
    assert [(r["step"], r["skipped"]) for r in rows] == [(4, "update")]
    names = sorted(p.name for p in tmp_path.glob("checkpoint*.pt"))
    assert names == ["checkpoint-00000002.pt", "checkpoint.pt"]
    assert all(_finite_checkpoint(tmp_path / name) for name in names)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    resumed = Trainer(TINY, quick_config(tmp_path, max_steps=4), data=digits,
                      resume_state=load_resume_state(tmp_path / "checkpoint.pt"))
    assert resumed.run().step == 4 and _finite_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.filterwarnings("ignore::revglow.ReconstructionWarning")     # the NaN weight's rebuild
def test_a_bad_state_is_never_saved(tmp_path, digits):
    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=2), data=digits)
    trainer.run()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    trainer.step += 1                                 # a later step, whose weights went bad
    parameter = next(trainer.model.parameters())
    good = parameter.detach().clone()
    with torch.no_grad():
        parameter.view(-1)[0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"the training state after step 3 is not finite \(the weights\); "
                                               r"stopping \(the last good checkpoint is "):
        trainer.save()
    with torch.no_grad():                             # finite again, but its backward fails: it cannot take a step
        parameter.copy_(good)

    def hook(grad):
        raise torch.linalg.LinAlgError("linalg.inv: The diagonal element 1 is zero")

    parameter.register_hook(hook)
    with pytest.raises(TrainingDiverged, match=r"after step 3 the step on its batch raised .*LinAlgError: linalg.inv"):
        trainer.save()
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert not (tmp_path / "checkpoint-00000003.pt").exists()


def test_rollback_restores_the_good_state_at_half_the_learning_rate_and_goes_on(tmp_path, digits):
    config = quick_config(tmp_path, max_steps=6, checkpoint_every=2, warmup=0, on_divergence="rollback",
                          rollback_every=1)
    trainer = Trainer(TINY, config, data=digits)
    _poison_second_moment_after(trainer, 3)
    result = trainer.run()
    assert result.step == 6
    rollbacks = [r for r in metric_rows(tmp_path) if "rollback" in r]
    assert rollbacks == [{"step": 3, "rollback": {"to_step": 2, "reason": "the update of step 3 left the optimizer "
                                                  "state non-finite", "lr": 5e-4, "count": 1}}]
    steps = [(r["step"], r["lr"], r.get("skipped")) for r in metric_rows(tmp_path) if "images_per_s" in r]
    assert steps == [(1, 1e-3, None), (2, 1e-3, None), (3, 1e-3, None), (4, 1e-3, "update"),   # the batch skipped
                     (4, 5e-4, None), (5, 5e-4, None), (6, 5e-4, None)]
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert _finite_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["train_config"]["lr"] == 5e-4 and saved["rollbacks"] == 1
    config = quick_config(tmp_path, max_steps=7, on_divergence="rollback", lr=saved["train_config"]["lr"])
    resumed = Trainer(TINY, config, data=digits, resume_state=load_resume_state(tmp_path / "checkpoint.pt"))
    assert resumed.divergence.rollbacks == 1 and resumed.optimizer.param_groups[0]["lr"] == 5e-4


def test_the_good_state_survives_the_training_that_follows_its_restore():
    """Loading a state dict may alias the tensors given: the copy must stay as it was for a second rollback."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    ema = ExponentialMovingAverage(model, 0.5)

    def train():
        optimizer.zero_grad()
        model(torch.ones(4, 3)).square().sum().backward()
        optimizer.step()
        ema.update()

    train()
    good = GoodState(model, ema, optimizer, step=1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(2):
        train()
        good.restore(model, ema, optimizer)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        assert torch.equal(ema.shadow["weight"], good.ema["shadow"]["weight"])
        assert torch.equal(optimizer.state[model.weight]["exp_avg"], good.optimizer["state"][0]["exp_avg"])


def test_a_batch_larger_than_the_data_set_is_said(tmp_path, digits):
    with pytest.warns(RuntimeWarning, match=r"--batch-size 4096 is larger than the 1438 training images allow .*"
                                            r"uses 1438 image"):
        trainer = Trainer(TINY, quick_config(tmp_path, batch_size=4096, max_steps=1), data=digits)
    assert trainer.sampler.batch_size == 1438


def test_the_lock_goes_with_the_run_not_with_its_data_loader_workers(tmp_path, digits):
    """Persistent DataLoader workers are forked while the run holds its folder's lock: they must not keep it."""
    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=1, workers=1), data=digits)
    trainer.run()
    acquire_run_lock(tmp_path).release()             # while the trainer and its workers live on
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == trainer.run_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")                # nothing to warn about in a resume of the same run
        Trainer(TINY, quick_config(tmp_path, max_steps=2), data=digits,
                resume_state=load_resume_state(tmp_path / "checkpoint.pt")).run()


def test_the_divergence_options_are_checked():
    from revglow.training.config import TrainConfig

    with pytest.raises(ValueError, match=r"TrainConfig.on_divergence='retry' is not a known option"):
        TrainConfig(on_divergence="retry")
    with pytest.raises(ValueError, match="TrainConfig.rollback_every must be >= 1"):
        TrainConfig(rollback_every=0)
    with pytest.raises(ValueError, match="TrainConfig.max_rollbacks must be >= 0"):
        TrainConfig(max_rollbacks=-1)
    assert TrainConfig.from_dict({k: v for k, v in TrainConfig().to_dict().items()
                                  if k not in ("on_divergence", "rollback_every", "max_rollbacks")}) == TrainConfig()
