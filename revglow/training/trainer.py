"""The training loop behind `revglow train`: Adam or the reference's Adamax with linear warm-up (in steps or
epochs), optional random shifts of the training images, optional bf16 autocast, Polyak averaging (EMA,
evaluated beside the raw weights), skipping of non-finite steps, periodic evaluation, sample grids and atomic
checkpoints, exact resume (same parameters and losses, bit for bit, on the CPU), a checkpoint on
SIGINT/SIGTERM, and data-parallel training under torchrun (DistributedDataParallel; rank 0 alone writes files).

The pieces it uses live in small modules of their own: TrainConfig in revglow.glow.config, the optimizers in
revglow.training.optimizers, the shifts in revglow.training.augment, the EMA in revglow.training.ema,
evaluation and model loading in revglow.training.evaluation, metrics.jsonl in revglow.training.metrics, the output folder in
revglow.training.run_folder, signal handling in revglow.training.signals. Their public names are importable from here too.

Example:
    >>> from revglow import GlowConfig
    >>> glow = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=16)
    >>> train = TrainConfig(max_steps=3, out="/tmp/revglow-doc", progress=False)
    >>> result = Trainer(glow, train).run()          # doctest: +SKIP
    >>> result.step                                   # doctest: +SKIP
    3
"""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from revglow.training.augment import random_shift
from revglow.training.baseline import PixelCategoricalBaseline
from revglow.training.checkpoints import (capture_rng_state, link_or_copy_atomic, load_checkpoint, prune_step_checkpoints,
                         restore_rng_state, save_checkpoint, step_checkpoint_path)
from revglow.glow.config import GlowConfig
from revglow.training.config import AMP_MODES, DEFAULT_MAX_STEPS, TrainConfig, override_train_options
from revglow.training.data import ImageData, load_dataset, stack_images
from revglow.training.distributed import DistributedContext
from revglow.errors import ConfigError, RevglowError
from revglow.training.ema import ExponentialMovingAverage
from revglow.training.evaluation import evaluate_bits_per_dim, evaluate_class_head, load_model, sample_labels, standard_error
from revglow.training.images import make_grid, save_grid
from revglow.glow.layers.actnorm import DegenerateInitError
from revglow.training.metrics import MetricsLog, NoMetrics, peak_memory_mb
from revglow.glow.model import Glow
from revglow.training.optimizers import make_optimizer
from revglow.engine.sequence import ReconstructionError
from revglow.training.run_folder import CHECKPOINT_NAME, RunExistsError, check_out_folder, prepare_out_folder
from revglow.training.loaders import DataPosition, epoch_permutation, make_train_loader
from revglow.training.signals import StopSignals, TrainingInterrupted

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInterrupted",
    "RunExistsError",
    "NonFiniteStepWarning",
    "RESUME_GLOW_FIELDS",
    "ExponentialMovingAverage",
    "MODEL_DEFAULTS",
    "AMP_MODES",
    "SAMPLE_TEMPERATURES",
    "check_out_folder",
    "default_glow_config",
    "evaluate_bits_per_dim",
    "load_model",
    "load_resume_state",
    "resolve_device",
    "standard_error",
    "train_config_for_resume",
]

SAMPLE_TEMPERATURES = (0.5, 0.7, 1.0)

# GlowConfig fields that say how the model runs, not what it computes: they may change on --resume.
RESUME_GLOW_FIELDS = ("memory", "kernels", "compile", "check_reconstruction", "reconstruction_tol")
# Numerical failures inside a step that are handled like a non-finite loss: a singular 1x1 convolution
# (torch.linalg), an input the reversible engine could not rebuild, floating-point traps.
_NUMERICAL_ERRORS = (torch.linalg.LinAlgError, ReconstructionError, FloatingPointError)
_ADVICE = {
    "loss": "Try a lower --lr, --grad-clip or --warmup.",
    "gradient": "Try a lower --lr, --grad-clip or --warmup.",
    "singular": ("A 1x1 convolution's weight became singular: try a lower --lr or --grad-clip, or "
                 "--permutation invconv_lu (its LU-parametrised weights stay invertible)."),
    "reconstruction": ("The flow became numerically non-invertible, so the reversible backward cannot rebuild "
                       "its inputs: try a lower --lr or --grad-clip, or resume with --memory checkpoint (it stores "
                       "the inputs instead of rebuilding them)."),
    "numerical": "Try a lower --lr, --grad-clip or --warmup.",
}

# Architecture defaults per data set (GlowConfig fields); anything else comes from GlowConfig itself.
MODEL_DEFAULTS: Dict[str, Dict] = {
    "digits": {"levels": 2, "depth": 8, "hidden": 64, "n_bits": 4},   # 17 grey levels: 4 bits keep nearly all
    "cifar10": {"levels": 3, "depth": 32, "hidden": 512},
    "folder": {"levels": 3, "depth": 32, "hidden": 512},
    "npz": {"levels": 2, "depth": 16, "hidden": 256},
    # a CPU-sized model for 64x64 crops of two photographs: 5 bits, as the paper's CelebA-HQ 256x256 model
    "photos": {"levels": 3, "depth": 8, "hidden": 64, "n_bits": 5},
}


class TrainingDiverged(RevglowError, RuntimeError):
    """Too many non-finite steps in a row; the run stopped without touching the last good checkpoint."""



class NonFiniteStepWarning(RuntimeWarning):
    """A step with a non-finite loss or gradient was skipped."""



def default_glow_config(data: ImageData, **overrides) -> GlowConfig:
    """GlowConfig for `data`: its image shape, MODEL_DEFAULTS[data.name], then `overrides` (None: not given, except
    for a field that may be None, such as zero_logscale_factor, where it is the value)."""
    options = dict(MODEL_DEFAULTS.get(data.name, {}))
    hints = typing.get_type_hints(GlowConfig)
    options.update({k: v for k, v in overrides.items()
                    if v is not None or type(None) in typing.get_args(hints.get(k))})
    options["image_shape"] = tuple(data.image_shape)
    return GlowConfig(**options)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else must be a device torch knows and has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {name!r} is not a device name (try cpu, cuda or cuda:0)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device



def train_config_for_resume(state: Dict, overrides: Dict) -> TrainConfig:
    """The checkpoint's TrainConfig with the given `overrides` (options set explicitly) applied.

    Giving max_steps replaces a saved epochs and the other way round, so a run can switch between them; the
    same for warmup and warmup_epochs.
    """
    return TrainConfig.from_dict(override_train_options(state["train_config"], overrides))



# ------------------------------------------------------------------------------------------ trainer

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


class Trainer:
    """Owns the model, optimizer, scheduler, EMA, data order and output folder of one training run.

    Give `resume_state` (a loaded checkpoint) to continue a run exactly where the checkpoint left it; the
    options in `config` (learning rate, warm-up, EMA decay, batch size, steps, cadences, ...) and the
    RESUME_GLOW_FIELDS of `glow_config` take effect from there on.

    Inside an initialized torch.distributed process group each process trains on its share of every global
    batch (per-process batch_size x world size) with DistributedDataParallel; rank 0 alone writes files.
    """

    def __init__(self, glow_config: GlowConfig, config: TrainConfig, data: Optional[ImageData] = None,
                 resume_state: Optional[Dict] = None) -> None:
        if not isinstance(glow_config, GlowConfig):
            raise TypeError(f"Trainer expects a GlowConfig; got {type(glow_config).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer expects a TrainConfig; got {type(config).__name__}")
        self.config = config
        self.dist = DistributedContext.current()
        self.device = self._resolve_device(config.device)
        self.out = Path(config.out)
        if resume_state is None:
            self.dist.run_on_main(check_out_folder, self.out, config.overwrite)
        self.data = data if data is not None else load_dataset(config.data, config.data_root, config.image_size,
                                                               config.skip_bad_images)
        if tuple(self.data.image_shape) != tuple(glow_config.image_shape):
            raise ConfigError(f"the data's images are {self.data.image_shape} but the model expects "
                             f"{tuple(glow_config.image_shape)}")
        if glow_config.num_classes and self.data.num_classes == 0:
            raise ConfigError(f"num_classes={glow_config.num_classes} asks for a class-conditional model but the "
                             f"{self.data.name} data set has no labels")
        if glow_config.num_classes and self.data.num_classes > glow_config.num_classes:
            raise ConfigError(f"the {self.data.name} data set has {self.data.num_classes} classes; "
                             f"num_classes={glow_config.num_classes} is too few")
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.glow_config = glow_config
        self.model = Glow(glow_config).to(self.device)   # the same weights on every rank (same seed)
        if self.dist.enabled:
            # The trainer's own draws (noise, shifts) come from its generators, seeded alike below; the global
            # RNGs are still seeded per rank for anything else that draws from them (a user's dropout). Seeds of
            # the form seed * 2**16 + rank + 1 stay clear of the single-process stream (seed itself) and of each other.
            rank_seed = config.seed * 65536 + self.dist.rank + 1
            torch.manual_seed(rank_seed)
            np.random.seed(rank_seed % 2 ** 32)
            random.seed(rank_seed)
        self.loader, self.sampler = make_train_loader(self.data.train, config.batch_size, config.seed, config.workers,
                                                      self.dist.rank, self.dist.world_size)
        self.optimizer = make_optimizer(config, self.model.parameters(), self.sampler.batches_per_epoch)
        # The shifts of --augment come from a generator of their own (saved with the other RNG states), so
        # turning augmentation on leaves the dequantization noise's stream as it was.
        self.augment_generator = torch.Generator().manual_seed(
            config.seed * 65536 + self.dist.rank + 1 if self.dist.enabled else config.seed)
        # The dequantization noise of training steps: a generator on the device, saved with the other RNG states
        # (per rank), so a resumed run draws what the uninterrupted one would have.
        self.noise_generator = torch.Generator(self.device).manual_seed(
            config.seed * 65536 + self.dist.rank + 1 if self.dist.enabled else config.seed)
        self.step = 0
        self.position = DataPosition()
        self.bad_steps = 0
        # The schedule reads the warm-up from a list, not from self: a bound method would tie the trainer into a
        # reference cycle (trainer -> scheduler -> trainer), and with it the DataLoader's worker processes.
        self._warmup_steps = [0 if config.warmup is None else config.warmup]
        warmup_steps = self._warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps[0])))
        self.ema = ExponentialMovingAverage(self.model, config.ema) if config.ema is not None else None
        self.last_eval: Optional[torch.Tensor] = None
        self.sample_paths: List[Path] = []
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        self._resumed_step: Optional[int] = None
        self._signals: Optional[StopSignals] = None
        self._metrics = None
        self._progress: Optional[_Progress] = None
        self._last_saved = -1
        self._agreed_stop = 0
        self.ddp = None
        if resume_state is not None:
            self._load_state(resume_state)
        self.total_steps = self._total_steps()
        if config.warmup_epochs is not None:
            self.warmup = round(config.warmup_epochs * self.sampler.batches_per_epoch)
        elif config.warmup is None:
            self.warmup = min(200, self.total_steps // 10)
        self._apply_learning_rate()

    # ------------------------------------------------------------------------------ set-up
    def _resolve_device(self, name: str) -> torch.device:
        device = resolve_device(name)
        if self.dist.enabled and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.dist.local_rank)   # one GPU per process
        return device

    @property
    def warmup(self) -> int:
        """Linear learning-rate warm-up, in steps (resolved from TrainConfig.warmup or warmup_epochs).

        The learning rate of step k (1, 2, ...) is lr * min(1, k / warmup). The reference's is lr * min(1,
        (k - 1) / warmup steps) (openai/glow train.py: `n_processed / (n_train * epochs_warmup)`, images seen
        before the step), so its first step runs at learning rate 0: the same ramp, one step earlier here.
        warmup_epochs counts epochs as this trainer does (full global batches, the remainder left out).
        """
        return self._warmup_steps[0]

    @warmup.setter
    def warmup(self, steps: int) -> None:
        self._warmup_steps[0] = int(steps)

    def _apply_learning_rate(self) -> None:
        """The configured --lr and warm-up, from the scheduler's step on (LambdaLR's own formula, so an
        unchanged --lr gives bit for bit the learning rate the checkpointed run would have used)."""
        self.scheduler.base_lrs = [self.config.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)

    def _total_steps(self) -> int:
        """--max-steps, or the steps that finish --epochs passes from the current data position."""
        if self.config.epochs is None:
            return self.config.max_steps if self.config.max_steps is not None else DEFAULT_MAX_STEPS
        if self.position.epoch >= self.config.epochs:
            return self.step
        full_epochs = self.config.epochs - self.position.epoch - 1
        return self.step + self.sampler.remaining(self.position) + full_epochs * self.sampler.batches_per_epoch

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        """The checkpoint of this rank (under torch.distributed, call `save`: it gathers every rank's RNG)."""
        train_config = self.config.to_dict()
        train_config["warmup"] = self.warmup      # resolved, so a resumed run warms up the same way
        train_config["warmup_epochs"] = None
        train_config["resume"] = None
        train_config["overwrite"] = False
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data_position": self.position.to_dict(),
            "bad_steps": self.bad_steps,
            "rng": self._capture_rng(),
            "world_size": self.dist.world_size,
            "glow_config": self.glow_config.to_dict(),
            "train_config": train_config,
            "data": {"name": self.data.name, "image_shape": list(self.data.image_shape),
                     "num_classes": self.data.num_classes, "class_names": list(self.data.class_names)},
        }

    def _capture_rng(self) -> Dict:
        """This rank's RNG states: the global ones and the generators of the dequantization noise and of
        --augment's shifts."""
        return capture_rng_state(self._generators())

    def _generators(self) -> Dict[str, torch.Generator]:
        return {"augment": self.augment_generator, "noise": self.noise_generator}

    def _load_state(self, state: Dict) -> None:
        saved_optimizer = state["train_config"].get("optimizer", "adam")    # runs from before the option: Adam
        if saved_optimizer != self.config.optimizer:
            raise ConfigError(f"the checkpoint was trained with --optimizer {saved_optimizer}; a resumed run keeps "
                              f"its optimizer (its state does not carry over), so --optimizer "
                              f"{self.config.optimizer} cannot continue it")
        saved = GlowConfig.from_dict(state["glow_config"]).to_dict()
        given = self.glow_config.to_dict()
        changed = sorted(k for k in given if k not in RESUME_GLOW_FIELDS and saved.get(k) != given[k])
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ConfigError(f"the checkpoint's model differs from the one given ({flags}); a resumed run keeps "
                             f"its model (only {', '.join('--' + k.replace('_', '-') for k in RESUME_GLOW_FIELDS)} "
                             f"may change)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
            self.ema.decay = float(self.config.ema)      # a decay given on resume takes effect
        self.step = int(state["step"])
        self.position = DataPosition.from_dict(state["data_position"])
        self.bad_steps = int(state.get("bad_steps", 0))
        self._restore_rng(state)
        self._resumed_step = self.step

    def _restore_rng(self, state: Dict) -> None:
        saved_world = int(state.get("world_size", 1))
        per_rank = state.get("rng_per_rank")
        if saved_world == self.dist.world_size:
            restore_rng_state(per_rank[self.dist.rank] if per_rank else state["rng"], self._generators())
            return
        warnings.warn(f"the checkpoint was written by {saved_world} process(es) and {self.dist.world_size} resume it: "
                      f"the random streams are reseeded, so the run goes on but not bit for bit as it would have",
                      RuntimeWarning, stacklevel=3)
        seed = (self.config.seed * 65536 + self.dist.rank + 1) * 1_000_003 + self.step
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        self.augment_generator.manual_seed(seed)
        self.noise_generator.manual_seed(seed)

    def save(self) -> Path:
        """Write checkpoint.pt atomically, keep a checkpoint-STEP.pt copy, prune old copies (rank 0 writes;
        under torch.distributed every rank must call this, to hand over its RNG state)."""
        rng_states = self.dist.all_gather_object(self._capture_rng()) if self.dist.enabled else None
        if self.dist.is_main:
            state = self.state_dict()
            if rng_states is not None:
                state["rng_per_rank"] = rng_states
            save_checkpoint(state, self.checkpoint_path)
            if self.config.keep > 0:
                link_or_copy_atomic(self.checkpoint_path, step_checkpoint_path(self.out, self.step))
            prune_step_checkpoints(self.out, self.config.keep)
        self.dist.barrier()
        return self.checkpoint_path

    # ------------------------------------------------------------------------------ eval / samples
    def _eval_context(self, use_ema: bool = True):
        return self.ema.applied() if self.ema is not None and use_ema else contextlib.nullcontext(self.model)

    def _test_share(self):
        """This rank's share of the test split: every world_size-th image from its rank (all of it alone)."""
        test = self.data.test
        if self.dist.enabled:
            test = torch.utils.data.Subset(test, list(range(self.dist.rank, len(test), self.dist.world_size)))
        return test

    @property
    def eval_batch_size(self) -> int:
        """Images per evaluation batch: TrainConfig.eval_batch_size, by default the training batch."""
        return self.config.eval_batch_size or self.config.batch_size

    def evaluate(self, draws: int = 1, use_ema: bool = True) -> torch.Tensor:
        """Per-image test bits/dim (EMA weights when on and `use_ema`, else the raw weights); under
        torch.distributed each rank does a share. Both weights see the same dequantization noise."""
        test = self._test_share()
        if len(test) == 0:          # more processes than test images
            local = torch.empty(0, dtype=torch.float64)
        else:
            with self._eval_context(use_ema) as model:
                local = evaluate_bits_per_dim(model, test, self.eval_batch_size, self.device, draws=draws,
                                              seed=self.config.seed + self.dist.rank, workers=self.config.workers)
        self.last_eval = torch.cat(self.dist.all_gather_object(local)) if self.dist.enabled else local
        return self.last_eval

    def evaluate_class_head(self) -> Optional[Dict[str, float]]:
        """The class head's test cross-entropy (bits) and accuracy with the weights used for samples (EMA when
        on); None for a model without a class head. Under torch.distributed each rank does a share."""
        if self.model.class_head is None:
            return None
        test = self._test_share()
        bits, correct = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
        if len(test):
            with self._eval_context() as model:
                bits, correct = evaluate_class_head(model, test, self.eval_batch_size, self.device,
                                                    self.config.workers)
        if self.dist.enabled:
            bits, correct = (torch.cat(parts) for parts in zip(*self.dist.all_gather_object((bits, correct))))
        return {"test_class_bits": float(bits.mean()), "test_class_accuracy": float(correct.mean())}

    def write_samples(self) -> List[Path]:
        """Sample grids at SAMPLE_TEMPERATURES (rank 0 only)."""
        if not self.dist.is_main:
            return []
        folder = self.out / "samples"
        paths, grids = [], {}
        with self._eval_context() as model, torch.no_grad():
            model.eval()
            for temperature in SAMPLE_TEMPERATURES:
                generator = torch.Generator(self.device).manual_seed(self.config.seed)
                labels = sample_labels(model, self.config.n_samples, self.device)
                images = model.sample(self.config.n_samples, temperature=temperature, y=labels, generator=generator)
                paths.append(save_grid(images, folder / f"step-{self.step:08d}-t{temperature:.1f}.png"))
                grids[f"samples/t{temperature:.1f}"] = make_grid(images)
            model.train()
        self.sample_paths = paths
        if self._metrics is not None:
            self._metrics.write_images(self.step, grids)
        return paths

    def baseline_bits_per_dim(self) -> float:
        train_images, _ = stack_images(self.data.train, workers=self.config.workers)
        test_images, _ = stack_images(self.data.test, workers=self.config.workers)
        baseline = PixelCategoricalBaseline.fit(train_images, n_bits=self.glow_config.n_bits)
        return float(baseline.bits_per_dim(test_images).mean())

    # ------------------------------------------------------------------------------ initialization
    def _init_batch(self):
        """This rank's share of the init batch: the first init_batch_size images (default: one global batch)
        of the first epoch's order, split evenly over the ranks (shifted by --augment, as the reference's init
        batch, drawn from its augmenting training iterator, was)."""
        total = self.config.init_batch_size or self.sampler.global_batch_size
        total = min(total, len(self.data.train))
        if total < self.dist.world_size:
            raise ConfigError(f"--init-batch-size {total} is smaller than the number of processes "
                             f"({self.dist.world_size}); each needs at least one image")
        order = epoch_permutation(len(self.data.train), self.config.seed, 0)[:total]   # the sampler's first epoch
        rank, world = self.dist.rank, self.dist.world_size
        mine = order[rank * total // world:(rank + 1) * total // world].tolist()
        items = [self.data.train[i] for i in mine]
        x = self._augment(torch.stack([image for image, _ in items])).to(self.device)
        y = torch.tensor([label for _, label in items], device=self.device)
        return x, (y if self.glow_config.num_classes > 0 else None), total

    def initialize_model(self) -> None:
        """ActNorm's data-dependent init on the init batch (under torch.distributed: on each rank's share,
        before DistributedDataParallel broadcasts rank 0's parameters)."""
        x, y, total = self._init_batch()
        _, h, w = self.model.latent_shapes[-1]
        if total * h * w < 2:
            raise ConfigError(f"ActNorm's data-dependent init would see one value per channel at the top level "
                             f"(an init batch of {total} image(s), {h}x{w} pixels there), which makes its scales "
                             f"meaningless; pass a larger --init-batch-size (the paper's code uses 256)")
        try:
            self.model.initialize(x, y)
        except DegenerateInitError as exc:
            raise ConfigError(f"ActNorm's data-dependent init got a degenerate batch ({exc}); pass a larger or "
                              f"more varied --init-batch-size (the paper's code uses 256)") from exc

    # ------------------------------------------------------------------------------ training
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of training images (uint8, before it goes to the device) as --augment asks."""
        return random_shift(x, self.augment_generator) if self.config.augment == "shift" else x

    def _wrap_model(self) -> nn.Module:
        if not self.dist.enabled:
            return self.model
        if self.ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        return self.ddp

    def _all_reduce_step(self, failure: Optional[str], loss: Optional[torch.Tensor]) -> Tuple[Optional[str], float]:
        """Average the gradients over the ranks and agree on the step's fate, in one pass of all-reduces.

        The gradients are reduced here rather than by DDP's backward hooks (the backward runs under
        `no_sync`): a rank whose step failed (non-finite loss, or a numerical error in the middle of its
        backward) still takes part, and every rank then skips the step together; with the hooks, the others
        would wait forever for buckets it never reduces. The flags ride along, computed on the device: one per
        failure kind and one per stop signal (each summed over the ranks: how many reported it), and the loss
        sum; reading them back is the step's one host sync before the gradient norm.
        """
        kinds, stops = list(_ADVICE), list(StopSignals.SIGNALS)
        params = [p for p in self.model.parameters() if p.requires_grad]
        dtype = params[0].dtype
        device = self.dist.collective_device(self.device)
        flags = torch.zeros(len(kinds) + len(stops) + 1, dtype=dtype, device=device)
        if failure is not None:
            flags[kinds.index(failure)] = 1.0
        elif loss is not None:
            loss = loss.detach().to(device, dtype)
            finite = torch.isfinite(loss)
            flags[kinds.index("loss")] = (~finite).to(dtype)
            flags[-1] = torch.where(finite, loss, torch.zeros_like(loss))
        if self._signals is not None and self._signals.received is not None:
            flags[len(kinds) + stops.index(self._signals.received)] = 1.0
        summed = self.dist.average_gradients(params, flags, device, drop_own=failure is not None)
        summed = summed.double().cpu().tolist()
        failed = [kind for kind, count in zip(kinds, summed) if count > 0]
        stopped = [int(signum) for signum, count in zip(stops, summed[len(kinds):]) if count > 0]
        self._agreed_stop = stopped[0] if stopped else 0
        if failure is None and failed:
            failure = failed[0]
        return failure, summed[-1] / self.dist.world_size

    def _train_step(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Dict:
        """One optimizer step; returns its metrics, with "skipped" set when it was not taken.

        A non-finite loss or gradient, and a numerical error raised in the forward or backward (a singular 1x1
        convolution, an input the reversible engine could not rebuild), skip the step: parameters, optimizer
        and EMA stay as they were. Programming errors propagate. Under torch.distributed every rank skips
        together, and the loss logged is the mean over the ranks.
        """
        lr = self.optimizer.param_groups[0]["lr"]
        record = {"step": self.step + 1, "epoch": self.position.epoch, "lr": lr}
        self.optimizer.zero_grad(set_to_none=True)
        network = self._wrap_model()
        failure, error, value, loss, bpd = None, None, math.nan, None, None
        sync = self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()
        try:
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16"):
                    out = network(x, y, generator=self.noise_generator, all_losses=True)
                bpd = out.bits_x.float().mean()
                class_bits = (out.bits_y.float().mean() if out.bits_y is not None and self.config.weight_y > 0
                              else None)
                loss = bpd if class_bits is None else bpd + self.config.weight_y * class_bits
                if self.dist.enabled:
                    loss.backward()              # a non-finite loss is caught with the flags, without a sync here
                else:
                    # the one read per step (logging needs it): the loss, its bits/dim and the class head's bits
                    read = torch.stack([t.detach() for t in (loss, bpd, class_bits) if t is not None]).tolist()
                    if not math.isfinite(read[0]):
                        failure = "loss"
                    else:
                        value = read[1]
                        if class_bits is not None:
                            record["class_bits"] = read[2]
                        loss.backward()
        except _NUMERICAL_ERRORS as exc:
            failure = ("singular" if isinstance(exc, torch.linalg.LinAlgError) else
                       "reconstruction" if isinstance(exc, ReconstructionError) else "numerical")
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if self.dist.enabled:
            local_failure = failure
            failure, value = self._all_reduce_step(failure, bpd)   # the loss logged: bits/dim (the class term,
            # if any, is in the gradients, whose norm catches a non-finite one)
            if failure is not None and local_failure is None and failure != "loss":
                error = "on another process"
        record["bpd"] = value if failure is None and math.isfinite(value) else None
        if failure is not None:
            self.optimizer.zero_grad(set_to_none=True)
            record["skipped"] = failure
            if error:
                record["error"] = error
            return record
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))  # one device sync
        record["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
        record.update(self._reconstruction_errors())
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            record["skipped"] = "gradient"
            return record
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return record

    def _reconstruction_errors(self) -> Dict:
        """Per level, the worst per-sample relative error of the input the reversible backward rebuilt in this
        step (the engine keeps them on the device; read together, after the gradient norm has synced anyway)."""
        errors = self.model.reconstruction_errors()
        present = [e for e in errors if e is not None]
        if not present:
            return {}
        worst = torch.stack([e.detach().max().float() for e in present]).tolist()
        values = iter(worst)
        return {"reconstruction_error": [next(values) if e is not None else None for e in errors]}

    def _prepare_out_folder(self) -> None:
        """Rank 0, before anything is written: see revglow.training.run_folder.prepare_out_folder."""
        prepare_out_folder(self.out, self.config.overwrite, self._resumed_step, self.config.resume)

    def _periodic(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _stop_for_bad_steps(self, record: Dict) -> None:
        reason = record["skipped"]
        good = (f"the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path.exists()
                else "no checkpoint was written yet")
        what = (f"non-finite {reason}" if reason in ("loss", "gradient") else
                f"numerical failure, {record.get('error', reason)}")
        raise TrainingDiverged(f"{self.bad_steps} non-finite steps in a row (last: {what}) after step "
                               f"{self.step}; stopping ({good}). {_ADVICE[reason]}")

    def _stop_requested(self) -> Optional[int]:
        """The signal that asked the run to stop (under torch.distributed: as all ranks agreed at the last step)."""
        if self.dist.enabled:
            return self._agreed_stop or None
        return self._signals.received if self._signals is not None else None

    def _pending_stop(self) -> Optional[int]:
        """Like _stop_requested, outside a training step (one small all-reduce under torch.distributed)."""
        local = self._signals.received if self._signals is not None and self._signals.received else 0
        if not self.dist.enabled:
            return local or None
        flag = torch.tensor([local], dtype=torch.int64, device=self.dist.collective_device(self.device))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None

    def _interrupt(self, signum: int, saved_step: int) -> None:
        """Stop for a signal: a checkpoint of the current step (unless one was just written), then raise."""
        if saved_step != self.step:
            self.save()
        raise TrainingInterrupted(signum, self.step, self.checkpoint_path)

    def run(self) -> TrainResult:
        """Train to the configured number of steps, then evaluate, sample and checkpoint.

        SIGINT or SIGTERM (in the main thread) stop it after the step in progress with a checkpoint written,
        raising TrainingInterrupted; a second signal raises it at once.
        """
        self.dist.run_on_main(self._prepare_out_folder)
        self._metrics = MetricsLog(self.out, self._resumed_step, self.config.tensorboard) if self.dist.is_main \
            else NoMetrics()
        self._progress = _Progress(self, self.dist.is_main, self.config.progress)
        self._last_saved = self._resumed_step if self._resumed_step is not None else -1
        self._signals = StopSignals(self)
        try:
            with self._signals:
                if not self.model.is_initialized:
                    self.initialize_model()
                self.model.train()
                self._train_loop()
                self._progress.close()
                return self._finish()
        finally:
            self._progress.close()
            self._metrics.close()
            self._signals = None
            self._metrics = None

    # ------------------------------------------------------------------------------ the phases of run
    def _train_loop(self) -> None:
        """Epochs of steps until total_steps, with the periodic checkpoints, evaluations and samples."""
        conditional = self.glow_config.num_classes > 0
        while self.step < self.total_steps:
            self.sampler.set_position(self.position)
            finished_epoch = True
            for x, y in self.loader:
                if self.step >= self.total_steps:
                    finished_epoch = False
                    break
                record = self._timed_step(self._augment(x).to(self.device, non_blocking=True),
                                          y.to(self.device) if conditional else None)
                self._metrics.write(record)
                if "skipped" in record:
                    self._after_skipped_step(record)
                else:
                    self.bad_steps = 0
                    self._progress.step(record)
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
        record.update(images_per_s=self.sampler.global_batch_size / elapsed,
                      peak_memory_mb=peak_memory_mb(self.device))
        return record

    def _after_skipped_step(self, record: Dict) -> None:
        """Warn about a skipped step; stop after max_bad_steps of them in a row, or for a pending signal."""
        self.bad_steps += 1
        what = (f"non-finite {record['skipped']} (bits/dim {record['bpd']})"
                if record["skipped"] in ("loss", "gradient")
                else f"numerical failure ({record.get('error', record['skipped'])})")
        warnings.warn(f"step {record['step']}: {what}; step skipped, parameters unchanged",
                      NonFiniteStepWarning, stacklevel=4)
        if self.bad_steps >= self.config.max_bad_steps:
            self._stop_for_bad_steps(record)
        if self._stop_requested():
            self._interrupt(self._stop_requested(), self._last_saved)

    def _periodic_work(self) -> None:
        """After a step taken: the checkpoint, a pending signal, the evaluation and the samples that fall due
        (those of the last step are left to _finish)."""
        at_end = self.step >= self.total_steps
        if self._periodic(self.config.checkpoint_every) and not at_end:
            self.save()
            self._last_saved = self.step
        if self._stop_requested():
            self._interrupt(self._stop_requested(), self._last_saved)
        if self._periodic(self.config.eval_every) and not at_end:
            test, raw = self._log_evaluation()
            also = f" (raw weights {float(raw.mean()):.4f})" if self.ema is not None else ""
            self._progress.write(f"step {self.step}: test bits/dim {float(test.mean()):.4f}{also}")
        if self._periodic(self.config.sample_every) and not at_end:
            self.write_samples()

    def _log_evaluation(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-image test bits/dim of the weights used for samples (EMA when on) and of the raw weights (the
        same evaluation when EMA is off), both logged: test_bpd and test_bpd_raw."""
        raw = self.evaluate(use_ema=False) if self.ema is not None else None
        test = self.evaluate()
        raw = test if raw is None else raw
        self._metrics.write({"step": self.step, "test_bpd": float(test.mean()),
                             "test_bpd_stderr": standard_error(test), "ema": self.ema is not None,
                             "test_bpd_raw": float(raw.mean()), "test_bpd_raw_stderr": standard_error(raw),
                             **(self.evaluate_class_head() or {})})
        return test, raw

    def _finish(self) -> TrainResult:
        """The final checkpoint, evaluation, samples and baseline (or the stop a pending signal asks for)."""
        if self._last_saved != self.step:
            self.save()
            self._last_saved = self.step
        stop = self._pending_stop()
        if stop:
            self._interrupt(stop, self._last_saved)
        test, raw = self._log_evaluation()
        samples = self.write_samples()
        baseline = self.dist.broadcast_object(self.baseline_bits_per_dim() if self.dist.is_main else None)
        self._metrics.write({"step": self.step, "baseline_bpd": baseline})
        return TrainResult(step=self.step, out=self.out, checkpoint=self.checkpoint_path,
                           test_bpd=float(test.mean()), test_bpd_stderr=standard_error(test), baseline_bpd=baseline,
                           samples=samples, used_ema=self.ema is not None, test_images=int(test.numel()),
                           test_bpd_raw=float(raw.mean()), test_bpd_raw_stderr=standard_error(raw))


class _Progress:
    """The tqdm progress bar of a run (rank 0, when asked for), with smoothed bits/dim, images/s and memory."""

    def __init__(self, trainer: Trainer, main: bool, show_bar: bool) -> None:
        from tqdm import tqdm

        # In a log file (not a terminal) a bar redrawn ten times a second floods it: redraw every 10 s there.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=trainer.total_steps, initial=trainer.step, disable=not (show_bar and main), unit="step",
                        dynamic_ncols=True, desc="train", mininterval=0.1 if interactive else 10.0)
        self.main = main
        self.bpd: Optional[float] = None
        self.rate: Optional[float] = None

    def step(self, record: Dict) -> None:
        self.bpd = record["bpd"] if self.bpd is None else 0.9 * self.bpd + 0.1 * record["bpd"]
        rate = record["images_per_s"]
        self.rate = rate if self.rate is None else 0.9 * self.rate + 0.1 * rate
        self.bar.update(1)
        self.bar.set_postfix(bpd=f"{self.bpd:.3f}", img_s=f"{self.rate:.0f}", mem=f"{record['peak_memory_mb']:.0f}MB",
                             refresh=False)

    def write(self, message: str) -> None:
        """A line above the bar (rank 0 only; printed with the bar off too)."""
        if self.main:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def load_resume_state(path: str) -> Dict:
    """A checkpoint for `Trainer(resume_state=...)`, with every key the trainer needs checked."""
    return load_checkpoint(path, required=("model", "optimizer", "scheduler", "step", "data_position", "rng",
                                           "glow_config", "train_config"))
