"""The training loop: exact resume, non-finite steps, EMA, bf16 autocast, what a checkpoint holds."""
import json
import warnings

import pytest
import torch

from revglow import Glow, GlowConfig
from revglow.training.checkpoints import load_checkpoint
from revglow.training.data import load_dataset
from revglow.training.config import TrainConfig
from revglow.training.ema import ExponentialMovingAverage
from revglow.training.resume import load_resume_state
from revglow.training.step import NonFiniteStepWarning, TrainingDiverged
from revglow.training.trainer import Trainer

from train_helpers import TINY, quick_config, step_losses


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_resume_is_bitwise_exact(tmp_path, digits):
    # eval_every=2 puts an evaluation (with its own noise) in both runs: it must not shift the training RNG.
    straight = Trainer(TINY, quick_config(tmp_path / "a", max_steps=6, eval_every=2), data=digits)
    straight.run()
    first = Trainer(TINY, quick_config(tmp_path / "b", max_steps=3, eval_every=2), data=digits)
    first.run()
    state = load_resume_state(tmp_path / "b" / "checkpoint.pt")
    second = Trainer(TINY, quick_config(tmp_path / "b", max_steps=6, eval_every=2), data=digits, resume_state=state)
    assert second.step == 3
    second.run()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    for name, a in straight.ema.shadow.items():
        assert torch.equal(a, second.ema.shadow[name]), name
    assert step_losses(tmp_path / "a") == step_losses(tmp_path / "b")
    assert len(step_losses(tmp_path / "a")) == 6


def test_checkpoint_contents_and_rotation(tmp_path, digits):
    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=4, checkpoint_every=1, keep=2), data=digits)
    result = trainer.run()
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert raw["step"] == 4 and raw["data_position"] == {"epoch": 0, "index": 64}
    assert set(raw) >= {"model", "ema", "optimizer", "scheduler", "rng", "glow_config", "train_config"}
    assert GlowConfig.from_dict(raw["glow_config"]) == TINY and raw["train_config"]["warmup"] == 2
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-00000003.pt",
                                                                         "checkpoint-00000004.pt"]
    assert len(result.samples) == 3 and all(p.exists() for p in result.samples)
    assert result.test_images == len(digits.test) and result.baseline_bpd > 0


def test_the_evaluation_batch_changes_no_number(tmp_path, digits):
    """Evaluation runs at --eval-batch-size (default: the training batch), and on the CPU each image's bits/dim
    do not depend on it: the dequantization noise is one generator stream drawn in image order, and no layer mixes
    the images of a batch. 7 does not divide the 359 test images, so the last batch is a short one."""
    trainer = Trainer(TINY, quick_config(tmp_path / "a", max_steps=1, batch_size=7, eval_batch_size=None,
                                         device="cpu"), data=digits)
    assert trainer.eval_batch_size == 7
    trainer.run()
    by_seven = trainer.evaluate()
    trainer.config.eval_batch_size = 512
    assert trainer.eval_batch_size == 512
    at_once = trainer.evaluate()
    assert by_seven.shape == at_once.shape == (len(digits.test),)
    torch.testing.assert_close(by_seven, at_once, rtol=1e-5, atol=0)
    assert not torch.equal(at_once[:7], at_once[7:14])      # the images got noise and bits of their own


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, digits, monkeypatch):
    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=20, checkpoint_every=2, max_bad_steps=3), data=digits)
    real_forward = Glow.forward
    calls = {"n": 0}

    def forward(self, x, y=None, **options):     # the trainer asks for all losses (a GlowLosses)
        calls["n"] += 1
        out = real_forward(self, x, y, **options)
        return out._replace(bits_x=out.bits_x * float("nan")) if calls["n"] > 2 else out

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
    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=3), data=digits)
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
        result = Trainer(TINY, quick_config(tmp_path, max_steps=2, amp="bf16"), data=digits).run()
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
        Trainer(TINY, quick_config(tmp_path / str(workers), max_steps=3, workers=workers), data=digits).run()
        losses.append(step_losses(tmp_path / str(workers)))
    assert losses[0] == losses[1]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, digits, monkeypatch):
    import revglow.training.checkpoints as checkpoint_module

    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=4, checkpoint_every=2), data=digits)
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


# ------------------------------------------------------------------------------ runs that lose nothing

def _tensor_data(n=40, shape=(1, 4, 4), seed=0):
    from revglow.training.datasets import ImageData, TensorImageDataset

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n,) + shape, generator=g, dtype=torch.uint8)
    return ImageData("npz", TensorImageDataset(images[: n - 8]), TensorImageDataset(images[n - 8:]), shape)


def test_fresh_run_refuses_a_folder_that_holds_files(tmp_path, digits):
    from revglow.training.run_folder import RunExistsError

    Trainer(TINY, quick_config(tmp_path, max_steps=2, keep=2), data=digits).run()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(RunExistsError, match=r"not empty .*--resume.*--overwrite"):
        Trainer(TINY, quick_config(tmp_path, max_steps=2), data=digits)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    (tmp_path / "notes.txt").write_text("mine")
    Trainer(TINY, quick_config(tmp_path, max_steps=1, keep=2, overwrite=True), data=digits).run()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-00000001.pt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"          # --overwrite removes only what a run writes
    assert load_checkpoint(tmp_path / "checkpoint.pt")["train_config"]["overwrite"] is False


def test_stop_signals_first_asks_second_stops_at_once():
    import signal as signals
    from revglow.training.signals import TrainingInterrupted
    from revglow.training.signals import StopSignals as _StopSignals

    class Owner:
        step = 7

    handler = _StopSignals(Owner())
    with handler:
        handler._handle(signals.SIGTERM, None)
        assert handler.received == signals.SIGTERM
        with pytest.raises(TrainingInterrupted, match="second SIGTERM at step 7") as caught:
            handler._handle(signals.SIGTERM, None)
    assert caught.value.exit_code == 143 and caught.value.checkpoint is None


def test_signal_mid_run_saves_the_step_and_raises(tmp_path, digits, monkeypatch):
    import signal as signals
    from revglow.training.signals import TrainingInterrupted

    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=50, checkpoint_every=0), data=digits)
    real_step = Trainer._train_step

    def step(self, x, y):
        record = real_step(self, x, y)
        if self.step == 3:
            self._signals._handle(signals.SIGINT, None)     # as if Ctrl-C arrived during step 3
        return record

    monkeypatch.setattr(Trainer, "_train_step", step)
    with pytest.raises(TrainingInterrupted, match="SIGINT after step 3") as caught:
        trainer.run()
    assert caught.value.exit_code == 130
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 3
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def test_stale_temp_files_are_removed_on_resume(tmp_path, digits):
    Trainer(TINY, quick_config(tmp_path, max_steps=2, keep=2), data=digits).run()
    stale = [tmp_path / ".checkpoint.pt.k2j3h4.tmp", tmp_path / ".checkpoint-00000002.pt.4242.tmp"]
    for path in stale:
        path.write_bytes(b"half a checkpoint")
    (tmp_path / ".keep.tmp").write_bytes(b"not ours")
    state = load_resume_state(tmp_path / "checkpoint.pt")
    Trainer(TINY, quick_config(tmp_path, max_steps=3), data=digits, resume_state=state).run()
    assert not any(p.exists() for p in stale) and (tmp_path / ".keep.tmp").exists()


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, digits):
    Trainer(TINY, quick_config(tmp_path, max_steps=4, checkpoint_every=1, keep=4), data=digits).run()
    older = tmp_path / "checkpoint-00000002.pt"
    with pytest.warns(RuntimeWarning, match="moved 3 newer checkpoint"):
        trainer = Trainer(TINY, quick_config(tmp_path, max_steps=3, checkpoint_every=1, keep=4, resume=str(older)),
                          data=digits, resume_state=load_resume_state(older))
        trainer.run()
    names = sorted(p.name for p in tmp_path.glob("checkpoint*.pt"))
    assert names == ["checkpoint-00000001.pt", "checkpoint-00000002.pt", "checkpoint-00000003.pt", "checkpoint.pt"]
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
    aside = tmp_path / "abandoned-after-step-00000002"
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-00000003.pt", "checkpoint-00000004.pt",
                                                      "checkpoint.pt"]
    assert load_checkpoint(aside / "checkpoint.pt")["step"] == 4


def test_numerical_errors_in_a_step_are_skipped_steps(tmp_path, digits, monkeypatch):
    """Errors in the training steps' backward after step 2 (not in the one that verifies the state of step 2 before
    its checkpoint: an error there would stop the run at once, as a state that cannot take a step)."""
    from revglow.training.step import TrainingStep

    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=20, checkpoint_every=2, max_bad_steps=3), data=digits)
    parameter = next(trainer.model.parameters())
    real_call, in_step = TrainingStep.__call__, []

    def call(self, *args, **kwargs):
        in_step.append(True)
        try:
            return real_call(self, *args, **kwargs)
        finally:
            in_step.pop()

    monkeypatch.setattr(TrainingStep, "__call__", call)

    def hook(grad):   # raised inside the backward, where the reversible engine inverts the 1x1 convolutions
        if trainer.step >= 2 and in_step:
            raise torch.linalg.LinAlgError("linalg.inv: The diagonal element 1 is zero, the inversion could not "
                                           "be completed because the input matrix is singular.")
        return grad

    parameter.register_hook(hook)
    with pytest.warns(NonFiniteStepWarning, match="numerical failure .*LinAlgError"):
        with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row .*singular.*invconv_lu"):
            trainer.run()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 2
    for name, value in trainer.model.state_dict().items():   # the failed steps left the parameters alone
        assert torch.equal(value, state["model"][name]), name
    assert trainer.optimizer.state_dict()["state"][0]["step"] == 2


def test_reconstruction_error_is_a_skipped_step_with_its_own_advice(tmp_path, digits, monkeypatch):
    from revglow import ReconstructionError

    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=20, max_bad_steps=2), data=digits)
    real_forward = Glow.forward

    def forward(self, x, y=None, **options):
        raise ReconstructionError("rebuilt input differs by 0.3 (tolerance 0.001)")

    monkeypatch.setattr(Glow, "forward", forward)
    with pytest.warns(NonFiniteStepWarning, match="ReconstructionError"):
        with pytest.raises(TrainingDiverged, match=r"non-invertible.*--memory checkpoint"):
            trainer.run()
    monkeypatch.setattr(Glow, "forward", real_forward)


def test_programming_errors_in_a_step_are_not_swallowed(tmp_path, digits, monkeypatch):
    def forward(self, x, y=None, **options):
        raise TypeError("a bug")

    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=3), data=digits)
    monkeypatch.setattr(Glow, "forward", forward)
    with pytest.raises(TypeError, match="a bug"):
        trainer.run()


def test_degenerate_actnorm_init_is_refused_with_advice(tmp_path):
    data = _tensor_data()
    glow = GlowConfig(image_shape=(1, 4, 4), levels=2, depth=1, hidden=8)    # top level 1x1
    trainer = Trainer(glow, quick_config(tmp_path, batch_size=1, max_steps=2), data=data)
    with pytest.raises(ValueError, match=r"one value per channel.*--init-batch-size"):
        trainer.run()
    assert not trainer.model.is_initialized


def test_init_batch_can_be_larger_than_the_training_batch(tmp_path, monkeypatch):
    data = _tensor_data()
    glow = GlowConfig(image_shape=(1, 4, 4), levels=2, depth=1, hidden=8)
    seen = []
    real_initialize = Glow.initialize

    def initialize(self, x, y=None):
        seen.append(x.clone())
        return real_initialize(self, x, y)

    monkeypatch.setattr(Glow, "initialize", initialize)
    trainer = Trainer(glow, quick_config(tmp_path, batch_size=1, init_batch_size=24, max_steps=2), data=data)
    trainer.run()
    assert [x.shape[0] for x in seen] == [24]
    log_scales = torch.cat([m.log_scale.detach().flatten() for m in trainer.model.modules()
                            if hasattr(m, "log_scale")])
    assert log_scales.abs().max() < 5, "ActNorm scales of a sane init"


def test_resume_applies_new_training_options(tmp_path, digits):
    Trainer(TINY, quick_config(tmp_path, max_steps=2, lr=1e-3, ema=0.9, warmup=0), data=digits).run()
    state = load_resume_state(tmp_path / "checkpoint.pt")
    trainer = Trainer(TINY, quick_config(tmp_path, max_steps=4, lr=5e-4, ema=0.5, warmup=0), data=digits,
                      resume_state=state)
    assert trainer.optimizer.param_groups[0]["lr"] == 5e-4 and trainer.ema.decay == 0.5
    trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "images_per_s" in r] == [1e-3, 1e-3, 5e-4, 5e-4]
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["train_config"]["lr"] == 5e-4 and saved["ema"]["decay"] == 0.5
    assert saved["optimizer"]["param_groups"][0]["initial_lr"] == 5e-4


def test_tensorboard_is_opt_in_and_gets_sample_grids(tmp_path, digits, monkeypatch):
    import revglow.training.metrics as metrics_module

    writers = []

    class FakeWriter:
        def __init__(self, folder, purge_step=None):
            self.folder, self.scalars, self.images = folder, [], []
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def add_image(self, tag, image, step, dataformats="CHW"):
            self.images.append((tag, tuple(image.shape), step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(metrics_module, "_summary_writer_class", lambda: FakeWriter)
    Trainer(TINY, quick_config(tmp_path / "off", max_steps=1), data=digits).run()
    assert writers == []
    Trainer(TINY, quick_config(tmp_path / "on", max_steps=1, tensorboard=True), data=digits).run()
    (writer,) = writers
    assert ("bpd", 1) in writer.scalars
    assert sorted(tag for tag, _, _ in writer.images) == ["samples/t0.5", "samples/t0.7", "samples/t1.0"]
    assert all(step == 1 and shape[0] == 1 for _, shape, step in writer.images)


def test_seed_beyond_the_rng_range_is_one_clear_error():
    with pytest.raises(ValueError, match=r"TrainConfig.seed must be between 0 and 2\*\*32 - 1"):
        TrainConfig(seed=2 ** 70)


def test_metrics_log_the_reconstruction_error_of_each_level(tmp_path, digits):
    Trainer(TINY, quick_config(tmp_path, max_steps=2), data=digits).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "images_per_s" in r]
    assert len(steps) == 2
    for row in steps:
        errors = row["reconstruction_error"]
        assert len(errors) == TINY.levels and all(0 <= e < 1e-4 for e in errors)   # float32: exact to rounding
    off = GlowConfig(**{**TINY.to_dict(), "image_shape": TINY.image_shape, "check_reconstruction": "off"})
    Trainer(off, quick_config(tmp_path / "off", max_steps=1), data=digits).run()
    rows = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert all("reconstruction_error" not in r for r in rows)


def test_real_reconstruction_check_of_glow_raises_or_warns_in_the_trainer(tmp_path, digits):
    """No stand-in: a real Glow whose float32 rebuild differs from its input by rounding, against a tolerance below
    rounding. "raise" makes every step a skipped one with the reconstruction advice, then a stop; so does "warn" when
    the rebuild is far (over RECONSTRUCTION_FAILURE_FACTOR times) above the tolerance: its gradients are wrong, and a
    warning alone let such a step (38x the tolerance) be taken. Within that factor, "warn" trains on and warns."""
    from revglow import ReconstructionWarning
    from train_helpers import metric_rows

    strict = dict(TINY.to_dict(), image_shape=TINY.image_shape, reconstruction_tol=1e-30)
    for check in ("raise", "warn"):
        trainer = Trainer(GlowConfig(**dict(strict, check_reconstruction=check)),
                          quick_config(tmp_path / check, max_steps=5, max_bad_steps=2), data=digits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReconstructionWarning)
            with pytest.warns(NonFiniteStepWarning, match="Reconstruction"):
                with pytest.raises(TrainingDiverged, match=r"non-invertible.*--memory checkpoint"):
                    trainer.run()
        assert trainer.step == 0
    # The rounding errors of this run (bit for bit the same in a rerun on the CPU), at twice the tolerance at most.
    Trainer(TINY, quick_config(tmp_path / "measure", max_steps=2), data=digits).run()
    worst = max(max(r["reconstruction_error"]) for r in metric_rows(tmp_path / "measure") if "images_per_s" in r)
    above = dict(TINY.to_dict(), image_shape=TINY.image_shape, reconstruction_tol=worst / 2)
    with pytest.warns(ReconstructionWarning):
        result = Trainer(GlowConfig(**dict(above, check_reconstruction="warn")),
                         quick_config(tmp_path / "warn-near", max_steps=2), data=digits).run()
    assert result.step == 2
