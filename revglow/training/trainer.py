"""The training loop behind `revglow train`: Adam or the reference's Adamax with linear warm-up (in steps or
epochs), optional random shifts of the training images, optional bf16 autocast, Polyak averaging (EMA,
evaluated beside the raw weights), skipping of failed steps, a state verified before every checkpoint (never a
non-finite or broken one) with a stop or a rollback on divergence, periodic evaluation, sample grids and atomic
checkpoints, exact resume (same parameters and losses, bit for bit, on the CPU), one run per output folder (a lock
held while it runs, a run id in run.json and in every checkpoint), a checkpoint on SIGINT/SIGTERM (honoured during
evaluation and sample grids too), and data-parallel training under torchrun (DistributedDataParallel; rank 0 alone
locks and writes files).

`Trainer` builds a run and runs it in named phases (initialize, the loop of steps with its periodic work,
finish). The pieces live in small modules of their own in revglow.training: one training step in step; what a
run does when its state goes bad in divergence (finiteness in finite_state); the run's state in a checkpoint, and
resuming it, in resume; the steps and the warm-up in schedule; the seeds in seeds; the init batch in
initialization; the run's evaluations and sample grids in run_evaluation (on evaluation and samples);
metrics.jsonl, the progress bar and the open run folder in run_log; the output folder's checks, lock and run id in
run_folder and run_lock; signal handling in signals; TrainConfig in config, the optimizers in optimizers, the
shifts in augment, the EMA in ema; the model a data set gets by default in model_defaults.

Example:
    >>> from revglow import GlowConfig
    >>> from revglow.training.config import TrainConfig
    >>> glow = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16)
    >>> train = TrainConfig(max_steps=3, out="/tmp/revglow-doc", progress=False)
    >>> result = Trainer(glow, train).run()          # doctest: +SKIP
    >>> result.step                                   # doctest: +SKIP
    3
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from revglow.glow.config import GlowConfig
from revglow.glow.model import Glow
from revglow.training.augment import augment_batch
from revglow.training.checkpoints import RUN_ID_KEY
from revglow.training.config import TrainConfig
from revglow.training.data import load_dataset
from revglow.training.datasets import ImageData
from revglow.training.devices import process_device
from revglow.training.distributed import DistributedContext
from revglow.training.divergence import DivergenceGuard
from revglow.training.ema import ExponentialMovingAverage
from revglow.training.evaluation import standard_error
from revglow.training.initialization import init_batch, initialize_on_batch
from revglow.training.loaders import DataPosition, make_train_loader
from revglow.training.metrics import peak_memory_mb
from revglow.training.model_defaults import check_model_fits_data
from revglow.training.optimizers import make_optimizer
from revglow.training.resume import checkpoint_state, restore_state, write_checkpoint
from revglow.training.run_evaluation import RunEvaluation
from revglow.training.run_folder import CHECKPOINT_NAME, check_out_folder, check_resume_folder
from revglow.training.run_log import RunLog
from revglow.training.schedule import apply_learning_rate, total_steps, warmup_scheduler, warmup_steps
from revglow.training.seeds import process_generators, seed_global_rngs
from revglow.training.signals import StopSignals, TrainingInterrupted
from revglow.training.step import TrainingStep

__all__ = ["Trainer", "TrainResult"]


@dataclass
class TrainResult:
    """What a finished run reports."""

    step: int
    out: Path
    checkpoint: Path
    test_bpd: float
    test_bpd_stderr: float
    baseline_bpd: float
    samples: List[Path] = field(default_factory=list)
    used_ema: bool = False
    test_images: int = 0
    test_bpd_raw: float = math.nan          # the raw weights' (equal to test_bpd when used_ema is False)
    test_bpd_raw_stderr: float = math.nan

    @classmethod
    def of(cls, step: int, out: Path, checkpoint: Path, test: torch.Tensor, raw: torch.Tensor, baseline: float,
           samples: List[Path], used_ema: bool) -> "TrainResult":
        """The result of a run from the per-image test bits/dim of its final weights (`test`) and raw weights."""
        return cls(step=step, out=out, checkpoint=checkpoint, test_bpd=float(test.mean()),
                   test_bpd_stderr=standard_error(test), baseline_bpd=baseline, samples=samples, used_ema=used_ema,
                   test_images=int(test.numel()), test_bpd_raw=float(raw.mean()),
                   test_bpd_raw_stderr=standard_error(raw))


def _run_data(glow_config: GlowConfig, config: TrainConfig, data: Optional[ImageData], dist: DistributedContext,
              resume_state: Optional[Dict]) -> ImageData:
    """The data of a run, checked against its model: `data`, or read as `config` says; only after rank 0 found the
    output folder free for a new run, or holding the resumed checkpoint's run (or none), so that a refusal comes
    before the possibly slow read and touches nothing."""
    if resume_state is None:
        dist.run_on_main(check_out_folder, Path(config.out), config.overwrite)
    else:
        dist.run_on_main(check_resume_folder, Path(config.out), config.resume, resume_state.get(RUN_ID_KEY))
    if data is None:
        data = load_dataset(config.data, config.data_root, config.image_size, config.skip_bad_images)
    check_model_fits_data(glow_config, data)
    return data


def _epoch_batches(trainer: "Trainer") -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """The trainer's training batches (x shifted as --augment says, labels for a class-conditional model, both on
    its device) from its data position on, epoch after epoch, while its step is below total_steps; an epoch
    finished moves the position to the next one."""
    conditional = trainer.glow_config.num_classes > 0
    while trainer.step < trainer.total_steps:
        trainer.sampler.set_position(trainer.position)
        for x, y in trainer.loader:
            if trainer.step >= trainer.total_steps:
                return
            x = augment_batch(x, trainer.config.augment, trainer.augment_generator)
            yield x.to(trainer.device, non_blocking=True), (y.to(trainer.device) if conditional else None)
        trainer.position = DataPosition(trainer.position.epoch + 1, 0)


def _timed(record: Dict, started: float, images: int, device: torch.device) -> Dict:
    """A step's record, begun at `started` (time.perf_counter) on `images` images, with images/s and peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = max(time.perf_counter() - started, 1e-9)
    record.update(images_per_s=images / elapsed, peak_memory_mb=peak_memory_mb(device))
    return record


class Trainer:
    """Owns the model, optimizer, scheduler, EMA, data order and output folder of one training run.

    Give `resume_state` (a loaded checkpoint) to continue a run exactly where the checkpoint left it; the
    options in `config` (learning rate, warm-up, EMA decay, batch size, steps, cadences, ...) and the
    RUNTIME_OPTIONS of `glow_config` take effect from there on. Inside an initialized torch.distributed process
    group each process trains on its share of every global batch (per-process batch_size x world size).
    """

    def __init__(self, glow_config: GlowConfig, config: TrainConfig, data: Optional[ImageData] = None,
                 resume_state: Optional[Dict] = None) -> None:
        for given, expected in ((glow_config, GlowConfig), (config, TrainConfig)):
            if not isinstance(given, expected):
                raise TypeError(f"Trainer expects a {expected.__name__}; got {type(given).__name__}")
        self.config, self.glow_config = config, glow_config
        self.dist = DistributedContext.current()
        self.device = process_device(config.device, self.dist)
        self.out = Path(config.out)
        self.data = _run_data(glow_config, config, data, self.dist, resume_state)
        seed_global_rngs(config.seed)
        self.model = Glow(glow_config).to(self.device)   # the same weights on every rank (same seed)
        self.augment_generator, self.noise_generator = process_generators(config.seed, self.dist, self.device)
        self.loader, self.sampler = make_train_loader(self.data.train, config.batch_size, config.seed, config.workers,
                                                      self.dist.rank, self.dist.world_size)
        self.optimizer = make_optimizer(config, self.model.parameters(), self.sampler.batches_per_epoch)
        self.step, self.position = 0, DataPosition()
        self._warmup_steps = [0 if config.warmup is None else config.warmup]   # (a list: see warmup_scheduler)
        self.scheduler = warmup_scheduler(self.optimizer, self._warmup_steps)
        self.ema = ExponentialMovingAverage(self.model, config.ema) if config.ema is not None else None
        self.training_step = TrainingStep(self.model, self.optimizer, self.scheduler, self.ema, config, self.dist,
                                          self.device, self.noise_generator)
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        self.divergence = DivergenceGuard(self.model, self.ema, self.optimizer, self.scheduler, self.training_step,
                                          config, self.dist, self.device, self.checkpoint_path)
        self.evaluation = RunEvaluation(self.model, self.ema, self.data, config, self.dist, self.device)
        self.last_eval: Optional[torch.Tensor] = None
        self.sample_paths: List[Path] = []
        self.run_id: Optional[str] = None        # the run folder's, once run() has opened it
        self._signals: Optional[StopSignals] = None          # the run's (while it runs), and its log
        self._log: Optional[RunLog] = None
        self._last_saved = -1
        self._resume_header = (None if resume_state is None else
                               {"step": int(resume_state["step"]), RUN_ID_KEY: resume_state.get(RUN_ID_KEY)})
        self._resumed_step = restore_state(self, resume_state) if resume_state is not None else None
        self.total_steps = total_steps(config, self.step, self.position, self.sampler)
        self.warmup = warmup_steps(config, self.total_steps, self.sampler.batches_per_epoch)
        apply_learning_rate(self.scheduler, self.optimizer, config.lr)

    @property
    def warmup(self) -> int:
        """Learning-rate warm-up in steps (revglow.training.schedule: warmup_steps, warmup_scheduler)."""
        return self._warmup_steps[0]

    @warmup.setter
    def warmup(self, steps: int) -> None:
        self._warmup_steps[0] = int(steps)

    def state_dict(self) -> Dict:
        """The checkpoint of this rank (under torch.distributed, call `save`: it gathers every rank's RNG)."""
        return checkpoint_state(self)

    def save(self) -> Path:
        """Verify the state (DivergenceGuard.ensure_good: a bad one is never written), then write the checkpoint
        (every rank must call it): revglow.training.resume.write_checkpoint."""
        self.divergence.ensure_good(self.step, self._log)
        return write_checkpoint(self)

    @property
    def eval_batch_size(self) -> int:
        """Images per evaluation batch: TrainConfig.eval_batch_size, by default the training batch."""
        return self.evaluation.batch_size

    def evaluate(self, draws: int = 1, use_ema: bool = True) -> torch.Tensor:
        """Per-image test bits/dim (EMA weights when on and `use_ema`, else the raw weights): RunEvaluation's."""
        self.last_eval = self.evaluation.bits_per_dim(draws, use_ema)
        return self.last_eval

    def write_samples(self) -> List[Path]:
        """Sample grids at revglow.training.samples.SAMPLE_TEMPERATURES (rank 0 only)."""
        metrics = self._log.metrics if self._log is not None else None
        self.sample_paths = self.evaluation.write_samples(self.out / "samples", self.step, metrics)
        return self.sample_paths

    def _train_step(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Dict:
        """One optimizer step (TrainingStep), counted when taken; its metrics, "skipped" set when not taken."""
        record = self.training_step(x, y, self.step + 1, self.position.epoch, self._signals)
        if "skipped" not in record:
            self.step += 1
            self.divergence.last_batch = (x, y)     # a batch its state is verified on before a checkpoint
        return record

    def run(self) -> TrainResult:
        """Lock the output folder, train to the configured number of steps, then checkpoint, evaluate and sample.
        SIGINT or SIGTERM (in the main thread) stop it after the step, evaluation or sample grid in progress with a
        checkpoint (TrainingInterrupted; a second: at once). The folder's lock is released when it returns."""
        self._log = RunLog.open(self.out, self._resume_header, self.config, self.dist, self.total_steps, self.step)
        self.run_id = self._log.run_id
        self._last_saved = self._resumed_step if self._resumed_step is not None else -1
        self._signals = StopSignals(self)
        try:
            with self._signals:
                if not self.model.is_initialized:
                    x, y, total = init_batch(self.data.train, self.config, self.sampler.global_batch_size, self.dist,
                                             self.augment_generator, self.device, self.glow_config.num_classes > 0)
                    initialize_on_batch(self.model, x, y, total)
                self.model.train()
                self.divergence.keep_good(self.step)
                self._train_loop()
                self._log.progress.close()
                return self._finish()
        finally:
            self._log.close()
            self._signals = None
            self._log = None

    def _train_loop(self) -> None:
        """Steps until total_steps (_epoch_batches), with the periodic work after a step taken (checkpoints,
        evaluations, samples) and what a failed step calls for."""
        for x, y in _epoch_batches(self):
            started = time.perf_counter()
            record = self._train_step(x, y)
            self.position.index += self.sampler.global_batch_size
            self._log.step(_timed(record, started, self.sampler.global_batch_size, self.device))
            if "skipped" in record:
                self.divergence.failed_step(record, self.step, self._log)   # warns; stops or rolls back
                self._stop_for(self._stop_requested())
            else:
                self.divergence.taken_step()
                self._periodic_work()

    def _periodic_work(self) -> None:
        """After a step taken: what falls due before the last step (a checkpoint, a copy of the state for a
        rollback, a signal, evaluation, samples)."""
        checkpoint_due = self._due(self.config.checkpoint_every)
        if checkpoint_due:
            self._checkpoint()                     # verified first: may stop, or roll back
        if checkpoint_due or self.divergence.keep_due():
            self.divergence.keep_good(self.step)
        self._stop_for(self._stop_requested())
        if self._due(self.config.eval_every):
            test, raw = self._log_evaluation()
            also = f" (raw weights {float(raw.mean()):.4f})" if self.ema is not None else ""
            self._log.write(f"step {self.step}: test bits/dim {float(test.mean()):.4f}{also}")
            self._honour_signals()
        if self._due(self.config.sample_every):
            self.write_samples()
            self._honour_signals()

    def _due(self, every: int) -> bool:
        """Whether work done every `every` steps (0: never) falls due now, before the last step."""
        return every > 0 and self.step % every == 0 and self.step < self.total_steps

    def _log_evaluation(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Test bits/dim of the sampling weights (EMA when on) and of the raw weights (one evaluation without EMA)."""
        raw = self.evaluate(use_ema=False) if self.ema is not None else None
        test = self.evaluate()
        raw = test if raw is None else raw
        self._log.evaluation(self.step, test, raw, self.ema is not None, self.evaluation.class_head())
        return test, raw

    def _finish(self) -> TrainResult:
        """The final checkpoint, evaluation, samples and baseline, each followed by the stop a signal asks for."""
        self._checkpoint()
        self._honour_signals()
        test, raw = self._log_evaluation()
        self._honour_signals()
        samples = self.write_samples()
        self._honour_signals()
        baseline = self.dist.broadcast_object(self.evaluation.baseline_bits_per_dim() if self.dist.is_main else None)
        self._log.metrics.write({"step": self.step, "baseline_bpd": baseline})
        return TrainResult.of(self.step, self.out, self.checkpoint_path, test, raw, baseline, samples,
                              used_ema=self.ema is not None)

    def _checkpoint(self) -> None:
        """Save the current step, unless it was saved already."""
        if self._last_saved != self.step:
            self.save()
            self._last_saved = self.step

    def _stop_requested(self) -> Optional[int]:
        """The signal that asked the run to stop (under torch.distributed: as all ranks agreed at the last step)."""
        return self.training_step.stop_requested(self._signals)

    def _honour_signals(self) -> None:
        """Stop for a signal received on any rank (during an evaluation or sample grid: no step agreed on it)."""
        pending = self._signals.received if self._signals is not None and self._signals.received else 0
        self._stop_for(self.dist.max_over_ranks(pending, self.device))

    def _stop_for(self, signum: Optional[int]) -> None:
        """Stop for signal `signum` (nothing when None or 0): a checkpoint of the current step, then raise."""
        if signum:
            self._checkpoint()
            raise TrainingInterrupted(signum, self.step, self.checkpoint_path)
