"""The training loop behind `revglow train`: Adam or the reference's Adamax with linear warm-up (in steps or
epochs), optional random shifts of the training images, optional bf16 autocast, Polyak averaging (EMA,
evaluated beside the raw weights), skipping of non-finite steps, periodic evaluation, sample grids and atomic
checkpoints, exact resume (same parameters and losses, bit for bit, on the CPU), a checkpoint on
SIGINT/SIGTERM, and data-parallel training under torchrun (DistributedDataParallel; rank 0 alone writes files).

`Trainer` builds a run and runs it in named phases (initialize, the loop of steps with its periodic work,
finish). The pieces live in small modules of their own in revglow.training: one training step in step; the run's
state in a checkpoint, and resuming it, in resume; the steps and the warm-up in schedule; the seeds in seeds; the
init batch in initialization; the run's evaluations and sample grids in run_evaluation (on evaluation and samples);
metrics.jsonl and the progress bar in run_log; the output folder in run_folder; signal handling in signals;
TrainConfig in config, the optimizers in optimizers, the shifts in augment, the EMA in ema; the model a data set
gets by default in model_defaults.

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
from typing import Dict, List, Optional, Tuple

import torch

from revglow.glow.config import GlowConfig
from revglow.glow.model import Glow
from revglow.training.augment import augment_batch
from revglow.training.config import TrainConfig
from revglow.training.data import load_dataset
from revglow.training.datasets import ImageData
from revglow.training.devices import process_device
from revglow.training.distributed import DistributedContext
from revglow.training.ema import ExponentialMovingAverage
from revglow.training.evaluation import standard_error
from revglow.training.initialization import init_batch, initialize_on_batch
from revglow.training.loaders import DataPosition, make_train_loader
from revglow.training.metrics import peak_memory_mb
from revglow.training.model_defaults import check_model_fits_data
from revglow.training.optimizers import make_optimizer
from revglow.training.resume import checkpoint_state, restore_state, write_checkpoint
from revglow.training.run_evaluation import RunEvaluation
from revglow.training.run_folder import CHECKPOINT_NAME, check_out_folder, prepare_out_folder
from revglow.training.run_log import RunLog
from revglow.training.schedule import apply_learning_rate, total_steps, warmup_scheduler, warmup_steps
from revglow.training.seeds import process_generators, seed_global_rngs
from revglow.training.signals import StopSignals, TrainingInterrupted
from revglow.training.step import TrainingStep, check_skipped_step

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
              new_run: bool) -> ImageData:
    """The data of a run, checked against its model: `data`, or read as `config` says (for a new run only after
    rank 0 found the output folder free: a refusal comes before the possibly slow read)."""
    if new_run:
        dist.run_on_main(check_out_folder, Path(config.out), config.overwrite)
    if data is None:
        data = load_dataset(config.data, config.data_root, config.image_size, config.skip_bad_images)
    check_model_fits_data(glow_config, data)
    return data


class Trainer:
    """Owns the model, optimizer, scheduler, EMA, data order and output folder of one training run.

    Give `resume_state` (a loaded checkpoint) to continue a run exactly where the checkpoint left it; the
    options in `config` (learning rate, warm-up, EMA decay, batch size, steps, cadences, ...) and the
    RESUME_GLOW_FIELDS of `glow_config` take effect from there on. Inside an initialized torch.distributed process
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
        self.data = _run_data(glow_config, config, data, self.dist, new_run=resume_state is None)
        seed_global_rngs(config.seed)
        self.model = Glow(glow_config).to(self.device)   # the same weights on every rank (same seed)
        self.augment_generator, self.noise_generator = process_generators(config.seed, self.dist, self.device)
        self.loader, self.sampler = make_train_loader(self.data.train, config.batch_size, config.seed, config.workers,
                                                      self.dist.rank, self.dist.world_size)
        self.optimizer = make_optimizer(config, self.model.parameters(), self.sampler.batches_per_epoch)
        self.step, self.position, self.bad_steps = 0, DataPosition(), 0
        self._warmup_steps = [0 if config.warmup is None else config.warmup]   # (a list: see warmup_scheduler)
        self.scheduler = warmup_scheduler(self.optimizer, self._warmup_steps)
        self.ema = ExponentialMovingAverage(self.model, config.ema) if config.ema is not None else None
        self.training_step = TrainingStep(self.model, self.optimizer, self.scheduler, self.ema, config, self.dist,
                                          self.device, self.noise_generator)
        self.evaluation = RunEvaluation(self.model, self.ema, self.data, config, self.dist, self.device)
        self.last_eval: Optional[torch.Tensor] = None
        self.sample_paths: List[Path] = []
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        self._signals: Optional[StopSignals] = None          # the run's (while it runs), and its log
        self._log: Optional[RunLog] = None
        self._last_saved = -1
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
        """Write the checkpoint (every rank must call it): revglow.training.resume.write_checkpoint."""
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

    def initialize_model(self) -> None:
        """ActNorm's data-dependent init on the init batch (revglow.training.initialization)."""
        x, y, total = init_batch(self.data.train, self.config, self.sampler.global_batch_size, self.dist,
                                 self.augment_generator, self.device, self.glow_config.num_classes > 0)
        initialize_on_batch(self.model, x, y, total)

    def _train_step(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Dict:
        """One optimizer step (TrainingStep), counted when taken; its metrics, "skipped" set when not taken."""
        record = self.training_step(x, y, self.step + 1, self.position.epoch, self._signals)
        if "skipped" not in record:
            self.step += 1
        return record

    def run(self) -> TrainResult:
        """Train to the configured number of steps, then evaluate, sample and checkpoint. SIGINT or SIGTERM (in the
        main thread) stop it after the step in progress with a checkpoint (TrainingInterrupted; a second: at once)."""
        self.dist.run_on_main(prepare_out_folder, self.out, self.config.overwrite, self._resumed_step,
                              self.config.resume)
        self._log = RunLog(self.out, self._resumed_step, self.config, self.dist, self.total_steps, self.step)
        self._last_saved = self._resumed_step if self._resumed_step is not None else -1
        self._signals = StopSignals(self)
        try:
            with self._signals:
                if not self.model.is_initialized:
                    self.initialize_model()
                self.model.train()
                self._train_loop()
                self._log.progress.close()
                return self._finish()
        finally:
            self._log.close()
            self._signals = None
            self._log = None

    def _train_loop(self) -> None:
        """Epochs of steps until total_steps, with the periodic work after a step taken (checkpoints, evaluations,
        samples) and a stop after too many skipped steps in a row."""
        conditional = self.glow_config.num_classes > 0
        while self.step < self.total_steps:
            self.sampler.set_position(self.position)
            finished_epoch = True
            for x, y in self.loader:
                if self.step >= self.total_steps:
                    finished_epoch = False
                    break
                x = augment_batch(x, self.config.augment, self.augment_generator).to(self.device, non_blocking=True)
                record = self._timed_step(x, y.to(self.device) if conditional else None)
                self._log.step(record)
                if "skipped" in record:
                    self.bad_steps += 1
                    check_skipped_step(record, self.bad_steps, self.config.max_bad_steps, self.step,
                                       self.checkpoint_path)     # warns; TrainingDiverged after too many
                    self._stop_for(self._stop_requested())
                else:
                    self.bad_steps = 0
                    self._periodic_work()
            if finished_epoch:
                self.position = DataPosition(self.position.epoch + 1, 0)

    def _timed_step(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Dict:
        """One training step and its data position, with images/s and peak memory added to its record."""
        started = time.perf_counter()
        record = self._train_step(x, y)
        self.position.index += self.sampler.global_batch_size
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - started, 1e-9)
        record.update(images_per_s=self.sampler.global_batch_size / elapsed, peak_memory_mb=peak_memory_mb(self.device))
        return record

    def _periodic_work(self) -> None:
        """After a step taken: what falls due before the last step (checkpoint, a signal, evaluation, samples)."""
        if self._due(self.config.checkpoint_every):
            self._checkpoint()
        self._stop_for(self._stop_requested())
        if self._due(self.config.eval_every):
            test, raw = self._log_evaluation()
            also = f" (raw weights {float(raw.mean()):.4f})" if self.ema is not None else ""
            self._log.write(f"step {self.step}: test bits/dim {float(test.mean()):.4f}{also}")
        if self._due(self.config.sample_every):
            self.write_samples()

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
        """The final checkpoint, evaluation, samples and baseline (or the stop a pending signal asks for)."""
        self._checkpoint()
        pending = self._signals.received if self._signals is not None and self._signals.received else 0
        self._stop_for(self.dist.max_over_ranks(pending, self.device))   # a signal pending on any rank
        test, raw = self._log_evaluation()
        samples = self.write_samples()
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

    def _stop_for(self, signum: Optional[int]) -> None:
        """Stop for signal `signum` (nothing when None or 0): a checkpoint of the current step, then raise."""
        if signum:
            self._checkpoint()
            raise TrainingInterrupted(signum, self.step, self.checkpoint_path)
