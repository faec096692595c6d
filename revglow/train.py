"""The training loop behind `revglow train`: Adam with linear warm-up, optional bf16 autocast, Polyak
averaging (EMA), skipping of non-finite steps, periodic evaluation, sample grids and atomic checkpoints,
exact resume (same parameters and losses, bit for bit, on the CPU), a checkpoint on SIGINT/SIGTERM, and
data-parallel training under torchrun (DistributedDataParallel; rank 0 alone writes files).

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
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from .baseline import PixelCategoricalBaseline
from .checkpoint import (CheckpointError, capture_rng_state, link_or_copy_atomic, load_checkpoint,
                         prune_step_checkpoints, remove_stale_temp_files, restore_rng_state, save_checkpoint,
                         step_checkpoint_path)
from .config import GlowConfig, check_int, check_known_fields
from .data import (DATASETS, DataPosition, ImageData, epoch_permutation, load_dataset, make_eval_loader,
                   make_train_loader, stack_images)
from .distributed import DistributedContext
from .images import make_grid, save_grid
from .layers import actnorm as _actnorm_module
from .model import Glow
from .reversible import ReconstructionError

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

AMP_MODES = ("off", "bf16")
SAMPLE_TEMPERATURES = (0.5, 0.7, 1.0)
DEFAULT_MAX_STEPS = 1500
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
MAX_SEED = 2 ** 32 - 1          # numpy's global RNG takes seeds below 2**32
# GlowConfig fields that say how the model runs, not what it computes: they may change on --resume.
RESUME_GLOW_FIELDS = ("memory", "kernels", "compile", "check_reconstruction", "reconstruction_tol")
# What `revglow train` writes into --out (what --overwrite removes; anything else there is left alone).
_RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME)
_RUN_FOLDERS = ("samples", "tensorboard")
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
}


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the run stopped without touching the last good checkpoint."""


class RunExistsError(ValueError):
    """--out holds files and neither --resume nor --overwrite was given."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run: after the step in progress, with a checkpoint written
    (`checkpoint` is its path), or at once on a second signal (`checkpoint` is None).

    `exit_code` is the shell's convention, 128 + the signal number: 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        if checkpoint is not None:
            message = (f"interrupted by {name} after step {step}; checkpoint written to {checkpoint} "
                       f"(continue with --resume)")
        else:
            message = f"interrupted by a second {name} at step {step}; stopped at once without writing a checkpoint"
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])


class NonFiniteStepWarning(RuntimeWarning):
    """A step with a non-finite loss or gradient was skipped."""


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's architecture (that is GlowConfig)."""

    data: str = "digits"                # one of revglow.data.DATASETS
    data_root: Optional[str] = None     # folder (cifar10, folder) or file (npz)
    image_size: Optional[int] = None    # for --data folder: images resized and centre-cropped to this
    batch_size: int = 64
    lr: float = 1e-3                    # Adam (paper, section 5)
    warmup: Optional[int] = None        # linear LR warm-up in steps; None: min(200, total steps // 10)
    grad_clip: Optional[float] = None   # max global gradient norm; None: no clipping
    max_steps: Optional[int] = None     # total optimizer steps; None with epochs None: DEFAULT_MAX_STEPS
    epochs: Optional[int] = None        # alternative to max_steps: this many passes over the train split
    seed: int = 0
    device: str = "auto"                # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    amp: str = "off"                    # "off" | "bf16": autocast around the model call
    ema: Optional[float] = 0.999        # Polyak averaging decay for eval and samples; None: off
    out: Optional[str] = None           # output folder (checkpoints, metrics.jsonl, samples/); None: runs/DATA
    resume: Optional[str] = None        # a checkpoint to continue from
    overwrite: bool = False             # start afresh in an --out that holds files (removes the earlier run's)
    init_batch_size: Optional[int] = None  # images for ActNorm's data-dependent init; None: one global batch
    skip_bad_images: bool = False       # folder data: leave unreadable files out (counted) instead of stopping
    tensorboard: bool = False           # also write TensorBoard events (scalars and sample grids)
    workers: int = 0                    # DataLoader worker processes
    eval_every: int = 500               # steps between test evaluations (0: only at the end)
    sample_every: int = 500             # steps between sample grids (0: only at the end)
    checkpoint_every: int = 500         # steps between checkpoints (0: only at the end)
    keep: int = 3                       # how many checkpoint-STEP.pt copies to keep
    max_bad_steps: int = 5              # stop after this many non-finite steps in a row
    n_samples: int = 64                 # images per sample grid
    progress: bool = True               # tqdm progress bar

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ValueError(f"TrainConfig.data={self.data!r} is not a known data set; choose one of {DATASETS}")
        if self.out is None:
            self.out = f"runs/{self.data}"
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp={self.amp!r} is not a known option; choose one of {AMP_MODES}")
        positive = {"batch_size": self.batch_size, "max_bad_steps": self.max_bad_steps, "n_samples": self.n_samples}
        for name, value in positive.items():
            _check_int(name, value, 1)
        for name in ("workers", "eval_every", "sample_every", "checkpoint_every", "keep", "seed"):
            _check_int(name, getattr(self, name), 0)
        for name in ("max_steps", "epochs", "image_size", "init_batch_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.warmup is not None:
            _check_int("warmup", self.warmup, 0)
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be a positive number; got {self.lr!r}")
        if self.grad_clip is not None and (not isinstance(self.grad_clip, (int, float)) or not self.grad_clip > 0):
            raise ValueError(f"TrainConfig.grad_clip must be a positive number or None; got {self.grad_clip!r}")
        if self.ema is not None and (not isinstance(self.ema, (int, float)) or not 0.0 < self.ema < 1.0):
            raise ValueError(f"TrainConfig.ema must be a decay in (0, 1) or None; got {self.ema!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("TrainConfig: give max_steps or epochs, not both")
        if self.seed > MAX_SEED:
            raise ValueError(f"TrainConfig.seed must be between 0 and 2**32 - 1 = {MAX_SEED}; got {self.seed}")
        for name in ("overwrite", "skip_bad_images", "tensorboard", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"TrainConfig.{name} must be a bool; got {type(getattr(self, name)).__name__}")

    def to_dict(self) -> dict:
        """Plain-typed dict (for checkpoints loaded with weights_only=True)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        check_known_fields(cls, data)
        return cls(**data)


def _check_int(name: str, value, minimum: int) -> None:
    check_int("TrainConfig", name, value, minimum)


def default_glow_config(data: ImageData, **overrides) -> GlowConfig:
    """GlowConfig for `data`: its image shape, MODEL_DEFAULTS[data.name], then `overrides` (None: not given)."""
    options = dict(MODEL_DEFAULTS.get(data.name, {}))
    options.update({k: v for k, v in overrides.items() if v is not None})
    options["image_shape"] = tuple(data.image_shape)
    return GlowConfig(**options)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else must be a device torch knows and has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {name!r} is not a device name (try cpu, cuda or cuda:0)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10   # bytes on macOS, KiB on Linux


@contextlib.contextmanager
def _isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with the global RNGs seeded to `seed`, then put them back as they were.

    Evaluation and sampling inside training use this, so they are reproducible and never shift the
    training run's dequantization noise (which exact resume depends on).
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- EMA

class ExponentialMovingAverage:
    """Polyak averaging of a model's floating-point parameters.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so short runs are not dominated
    by the random initial weights. The shadow copy starts at the first update (after ActNorm's
    data-dependent initialization has run).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must lie in (0, 1); got {decay}")
        self.model = model
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: Dict[str, torch.Tensor] = {}

    def _parameters(self):
        return [(name, p) for name, p in self.model.named_parameters() if p.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        if not self.shadow:
            self.shadow = {name: p.detach().clone() for name, p in self._parameters()}
        else:
            decay = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
            for name, p in self._parameters():
                self.shadow[name].lerp_(p.detach(), 1.0 - decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Temporarily swap the averaged weights into the model (no-op before the first update)."""
        if not self.shadow:
            yield self.model
            return
        saved = {}
        with torch.no_grad():
            for name, p in self._parameters():
                saved[name] = p.detach().clone()
                p.copy_(self.shadow[name])
        try:
            yield self.model
        finally:
            with torch.no_grad():
                for name, p in self._parameters():
                    p.copy_(saved[name])

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        device = next(self.model.parameters()).device
        self.shadow = {name: t.to(device) for name, t in state["shadow"].items()}


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate_bits_per_dim(model: Glow, dataset, batch_size: int, device: torch.device, draws: int = 1,
                          seed: int = 0, workers: int = 0) -> torch.Tensor:
    """Per-image test bits/dim [N] (float64, on the CPU), averaged over `draws` dequantization draws.

    The dequantization noise is seeded with `seed` and the global RNGs are restored afterwards.
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1; got {draws}")
    conditional = model.config.num_classes > 0
    was_training = model.training
    model.eval()
    results = []
    try:
        with _isolated_rng(seed):
            for draw in range(draws):
                per_image = []
                for x, y in make_eval_loader(dataset, batch_size, workers):
                    x = x.to(device)
                    y = y.to(device) if conditional else None
                    per_image.append(model.bits_per_dim(model.preprocess(x), y).double().cpu())
                results.append(torch.cat(per_image))
    finally:
        model.train(was_training)
    return torch.stack(results).mean(dim=0)


def _sample_labels(model: Glow, n: int, device: torch.device) -> Optional[torch.Tensor]:
    k = model.config.num_classes
    return torch.arange(n, device=device) % k if k > 0 else None


def load_model(state: Union[Dict, str, os.PathLike], device: torch.device, use_ema: bool = True) -> Glow:
    """A Glow built from a checkpoint's config and weights (the EMA weights when present and use_ema).

    `state` is a checkpoint path (read with `load_checkpoint`, which verifies it) or a dict it returned.
    Weights that are not finite are refused: a finished revglow run never saves them.
    """
    if not isinstance(state, dict):
        state = load_checkpoint(state, required=("model", "glow_config"))
    model = Glow(GlowConfig.from_dict(state["glow_config"]))
    model.load_state_dict(state["model"])
    ema = state.get("ema")
    if use_ema and ema and ema.get("shadow"):
        missing = set(ema["shadow"]) - set(dict(model.named_parameters()))
        if missing:
            raise ValueError(f"the checkpoint's EMA weights name unknown parameters {sorted(missing)[:3]}")
        model.load_state_dict(ema["shadow"], strict=False)
    bad = [name for name, value in model.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise CheckpointError(f"the checkpoint's weights are not finite ({bad[0]}{' and others' if len(bad) > 1 else ''}); "
                              f"it is corrupt or was not written by revglow train")
    return model.to(device).eval()


def train_config_for_resume(state: Dict, overrides: Dict) -> TrainConfig:
    """The checkpoint's TrainConfig with the given `overrides` (options set explicitly) applied.

    Giving max_steps replaces a saved epochs and the other way round, so a run can switch between them.
    """
    options = dict(state["train_config"])
    options.update(overrides)
    if overrides.get("max_steps") is not None and "epochs" not in overrides:
        options["epochs"] = None
    if overrides.get("epochs") is not None and "max_steps" not in overrides:
        options["max_steps"] = None
    return TrainConfig.from_dict(options)


def check_out_folder(out: Union[str, os.PathLike], overwrite: bool) -> None:
    """Refuse to start a fresh run in a folder that holds files, unless `overwrite` says to replace them."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RunExistsError(f"--out {folder} is a file, not a folder")
    if overwrite or not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunExistsError(f"--out {folder} is not empty ({shown}); pass --resume to continue the run there, "
                             f"or --overwrite to start afresh (removing its checkpoints, metrics and samples)")


def _summary_writer_class():
    """torch's TensorBoard SummaryWriter (a function of its own so that tests can stand in for it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard)") from exc
    return SummaryWriter


# ------------------------------------------------------------------------------------------ metrics

class _MetricsLog:
    """metrics.jsonl (one JSON object per line), plus TensorBoard events when asked for."""

    def __init__(self, folder: Path, resume_step: Optional[int], tensorboard: bool = False) -> None:
        self.path = folder / METRICS_NAME
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps are done again.
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tensorboard = None
        if tensorboard:
            self.tensorboard = _summary_writer_class()(str(folder / "tensorboard"), purge_step=resume_step)
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: Dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def write_images(self, step: int, grids: Dict[str, torch.Tensor]) -> None:
        """Sample grids (uint8 [C, H, W]) as TensorBoard images."""
        if self.tensorboard is not None:
            for tag, grid in grids.items():
                self.tensorboard.add_image(tag, grid, step, dataformats="CHW")
            self.tensorboard.flush()

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class _NoMetrics:
    """What ranks other than 0 log: nothing."""

    def write(self, record: Dict) -> None:
        pass

    def write_images(self, step: int, grids: Dict[str, torch.Tensor]) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------ signals

class _StopSignals:
    """SIGINT/SIGTERM handlers for the duration of a run: the first signal asks the loop to stop after the
    step in progress (the trainer then writes a checkpoint); a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, trainer: "Trainer") -> None:
        self.trainer = trainer
        self.received: Optional[int] = None
        self.previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.restore()
            raise TrainingInterrupted(signum, self.trainer.step, None)
        self.received = int(signum)

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():   # signal handlers live in the main thread
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


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
            raise ValueError(f"the data's images are {self.data.image_shape} but the model expects "
                             f"{tuple(glow_config.image_shape)}")
        if glow_config.num_classes and self.data.num_classes == 0:
            raise ValueError(f"num_classes={glow_config.num_classes} asks for a class-conditional model but the "
                             f"{self.data.name} data set has no labels")
        if glow_config.num_classes and self.data.num_classes > glow_config.num_classes:
            raise ValueError(f"the {self.data.name} data set has {self.data.num_classes} classes; "
                             f"num_classes={glow_config.num_classes} is too few")
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.glow_config = glow_config
        self.model = Glow(glow_config).to(self.device)   # the same weights on every rank (same seed)
        if self.dist.enabled:
            # Each rank draws its own dequantization noise; seeds of the form seed * 2**16 + rank + 1 stay clear of
            # the single-process stream (seed itself) and of each other.
            rank_seed = config.seed * 65536 + self.dist.rank + 1
            torch.manual_seed(rank_seed)
            np.random.seed(rank_seed % 2 ** 32)
            random.seed(rank_seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.loader, self.sampler = make_train_loader(self.data.train, config.batch_size, config.seed, config.workers,
                                                      self.dist.rank, self.dist.world_size)
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
        self._signals: Optional[_StopSignals] = None
        self._metrics = None
        self._agreed_stop = 0
        self.ddp = None
        if resume_state is not None:
            self._load_state(resume_state)
        self.total_steps = self._total_steps()
        if config.warmup is None:
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
        """Linear learning-rate warm-up, in steps (resolved from TrainConfig.warmup)."""
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
            "rng": capture_rng_state(),
            "world_size": self.dist.world_size,
            "glow_config": self.glow_config.to_dict(),
            "train_config": train_config,
            "data": {"name": self.data.name, "image_shape": list(self.data.image_shape),
                     "num_classes": self.data.num_classes, "class_names": list(self.data.class_names)},
        }

    def _load_state(self, state: Dict) -> None:
        saved = GlowConfig.from_dict(state["glow_config"]).to_dict()
        given = self.glow_config.to_dict()
        changed = sorted(k for k in given if k not in RESUME_GLOW_FIELDS and saved.get(k) != given[k])
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise ValueError(f"the checkpoint's model differs from the one given ({flags}); a resumed run keeps "
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
            restore_rng_state(per_rank[self.dist.rank] if per_rank else state["rng"])
            return
        warnings.warn(f"the checkpoint was written by {saved_world} process(es) and {self.dist.world_size} resume it: "
                      f"the random streams are reseeded, so the run goes on but not bit for bit as it would have",
                      RuntimeWarning, stacklevel=3)
        seed = (self.config.seed * 65536 + self.dist.rank + 1) * 1_000_003 + self.step
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)

    def save(self) -> Path:
        """Write checkpoint.pt atomically, keep a checkpoint-STEP.pt copy, prune old copies (rank 0 writes;
        under torch.distributed every rank must call this, to hand over its RNG state)."""
        rng_states = self.dist.all_gather_object(capture_rng_state()) if self.dist.enabled else None
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
    def _eval_context(self):
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext(self.model)

    def evaluate(self, draws: int = 1) -> torch.Tensor:
        """Per-image test bits/dim (EMA weights when on); under torch.distributed each rank does a share."""
        test = self.data.test
        if self.dist.enabled:
            test = torch.utils.data.Subset(test, list(range(self.dist.rank, len(test), self.dist.world_size)))
        if len(test) == 0:          # more processes than test images
            local = torch.empty(0, dtype=torch.float64)
        else:
            with self._eval_context() as model:
                local = evaluate_bits_per_dim(model, test, self.config.batch_size, self.device, draws=draws,
                                              seed=self.config.seed + self.dist.rank, workers=self.config.workers)
        self.last_eval = torch.cat(self.dist.all_gather_object(local)) if self.dist.enabled else local
        return self.last_eval

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
                labels = _sample_labels(model, self.config.n_samples, self.device)
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
        of the first epoch's order, split evenly over the ranks."""
        total = self.config.init_batch_size or self.sampler.global_batch_size
        total = min(total, len(self.data.train))
        if total < self.dist.world_size:
            raise ValueError(f"--init-batch-size {total} is smaller than the number of processes "
                             f"({self.dist.world_size}); each needs at least one image")
        order = epoch_permutation(len(self.data.train), self.config.seed, 0)[:total]   # the sampler's first epoch
        rank, world = self.dist.rank, self.dist.world_size
        mine = order[rank * total // world:(rank + 1) * total // world].tolist()
        items = [self.data.train[i] for i in mine]
        x = torch.stack([image for image, _ in items]).to(self.device)
        y = torch.tensor([label for _, label in items], device=self.device)
        return x, (y if self.glow_config.num_classes > 0 else None), total

    def initialize_model(self) -> None:
        """ActNorm's data-dependent init on the init batch (under torch.distributed: on each rank's share,
        before DistributedDataParallel broadcasts rank 0's parameters)."""
        x, y, total = self._init_batch()
        _, h, w = self.model.latent_shapes[-1]
        if total * h * w < 2:
            raise ValueError(f"ActNorm's data-dependent init would see one value per channel at the top level "
                             f"(an init batch of {total} image(s), {h}x{w} pixels there), which makes its scales "
                             f"meaningless; pass a larger --init-batch-size (the paper's code uses 256)")
        degenerate = getattr(_actnorm_module, "DegenerateInitError", None)
        try:
            self.model.initialize(x, y)
        except Exception as exc:
            if degenerate is not None and isinstance(exc, degenerate):
                raise ValueError(f"ActNorm's data-dependent init got a degenerate batch ({exc}); pass a larger or "
                                 f"more varied --init-batch-size (the paper's code uses 256)") from exc
            raise

    # ------------------------------------------------------------------------------ training
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
        would wait forever for buckets it never reduces. The flags ride in the first bucket, computed on the
        device: [failure kinds..., stop signal, loss sum]; reading them back is the step's one host sync
        before the gradient norm.
        """
        kinds = list(_ADVICE)
        params = [p for p in self.model.parameters() if p.requires_grad]
        dtype = params[0].dtype
        device = self.dist.collective_device(self.device)
        flags = torch.zeros(len(kinds) + 2, dtype=dtype, device=device)
        if failure is not None:
            flags[kinds.index(failure)] = 1.0
        elif loss is not None:
            loss = loss.detach().to(device, dtype)
            finite = torch.isfinite(loss)
            flags[kinds.index("loss")] = (~finite).to(dtype)
            flags[-1] = torch.where(finite, loss, torch.zeros_like(loss))
        if self._signals is not None and self._signals.received is not None:
            flags[len(kinds)] = float(self._signals.received)
        buckets, bucket, size = [], [], 0
        for p in params:
            bucket.append(p)
            size += p.numel()
            if size >= 1 << 22:
                buckets.append(bucket)
                bucket, size = [], 0
        if bucket:
            buckets.append(bucket)
        world = self.dist.world_size
        reduced = None
        for index, bucket in enumerate(buckets):
            parts = [torch.zeros(p.numel(), dtype=dtype, device=device) if p.grad is None or failure
                     else p.grad.detach().reshape(-1).to(device, dtype) for p in bucket]
            if index == 0:
                parts.append(flags)
            flat = torch.cat(parts)
            torch.distributed.all_reduce(flat)
            if index == 0:
                reduced = flat[-flags.numel():]
                flat = flat[:-flags.numel()]
            offset = 0
            for p in bucket:
                p.grad = (flat[offset:offset + p.numel()] / world).view_as(p).to(p.device, p.dtype)
                offset += p.numel()
        reduced = reduced.double().cpu().tolist()
        failed = [kinds[i] for i in range(len(kinds)) if reduced[i] > 0]
        self._agreed_stop = int(reduced[len(kinds)])
        if failure is None and failed:
            failure = failed[0]
        return failure, reduced[-1] / world

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
        failure, error, value, loss = None, None, math.nan, None
        sync = self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()
        try:
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16"):
                    bpd = network(x, y)
                loss = bpd.float().mean()
                if self.dist.enabled:
                    loss.backward()              # a non-finite loss is caught with the flags, without a sync here
                else:
                    value = float(loss.detach())     # the one read of the loss per step (logging needs it)
                    if not math.isfinite(value):
                        failure = "loss"
                    else:
                        loss.backward()
        except _NUMERICAL_ERRORS as exc:
            failure = ("singular" if isinstance(exc, torch.linalg.LinAlgError) else
                       "reconstruction" if isinstance(exc, ReconstructionError) else "numerical")
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        if self.dist.enabled:
            local_failure = failure
            failure, value = self._all_reduce_step(failure, loss)
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
        """Rank 0, before anything is written: remove temp files of killed saves; on --overwrite remove the
        earlier run's files; on resume from an older checkpoint set the newer ones aside."""
        self.out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(self.out)
        if self._resumed_step is None:
            check_out_folder(self.out, self.config.overwrite)
            if self.config.overwrite:
                for path in list(self.out.glob("checkpoint-*.pt")) + [self.out / name for name in _RUN_FILES]:
                    if path.is_file():
                        path.unlink()
                for name in _RUN_FOLDERS:
                    if (self.out / name).is_dir():
                        shutil.rmtree(self.out / name)
        else:
            self._set_aside_newer_checkpoints()

    def _set_aside_newer_checkpoints(self) -> None:
        """Resuming from an older checkpoint abandons the steps after it: move the newer checkpoint-STEP.pt
        (and a newer checkpoint.pt) into OUT/abandoned-after-step-STEP/, so that rotation, --resume and eval
        only ever see this branch."""
        step = self._resumed_step
        newer = []
        for path in sorted(self.out.glob("checkpoint-*.pt")):
            try:
                if int(path.stem.split("-")[1]) > step:
                    newer.append(path)
            except (IndexError, ValueError):
                continue
        source = Path(self.config.resume) if self.config.resume else None
        latest = self.checkpoint_path
        if latest.is_file() and not (source is not None and source.exists() and os.path.samefile(source, latest)):
            try:
                latest_step = int(torch.load(latest, map_location="cpu", weights_only=True, mmap=True)["step"])
            except Exception:
                latest_step = None       # unreadable: not the branch we continue
            if latest_step is None or latest_step > step:
                newer.append(latest)
        if not newer:
            return
        folder = self.out / f"abandoned-after-step-{step:08d}"
        suffix = 1
        while folder.exists():
            suffix += 1
            folder = self.out / f"abandoned-after-step-{step:08d}-{suffix}"
        folder.mkdir()
        for path in newer:
            os.replace(path, folder / path.name)
        if not latest.exists() and source is not None and source.is_file():
            link_or_copy_atomic(source, latest)      # --resume without a path continues this branch
        warnings.warn(f"resumed from step {step}: moved {len(newer)} newer checkpoint(s) of the abandoned run to "
                      f"{folder}", RuntimeWarning, stacklevel=3)

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
        from tqdm import tqdm

        main = self.dist.is_main
        self.dist.run_on_main(self._prepare_out_folder)
        self._metrics = None
        metrics = _MetricsLog(self.out, self._resumed_step, self.config.tensorboard) if main else _NoMetrics()
        self._metrics = metrics
        conditional = self.glow_config.num_classes > 0
        # In a log file (not a terminal) a bar redrawn ten times a second floods it: redraw every 10 s there.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.config.progress and main),
                   unit="step", dynamic_ncols=True, desc="train", mininterval=0.1 if interactive else 10.0)
        smoothed_bpd, smoothed_rate = None, None
        last_saved = self._resumed_step if self._resumed_step is not None else -1
        test = None
        self._signals = _StopSignals(self)
        try:
            with self._signals:
                if not self.model.is_initialized:
                    self.initialize_model()
                self.model.train()
                while self.step < self.total_steps:
                    self.sampler.set_position(self.position)
                    finished_epoch = True
                    for x, y in self.loader:
                        if self.step >= self.total_steps:
                            finished_epoch = False
                            break
                        started = time.perf_counter()
                        x = x.to(self.device, non_blocking=True)
                        y = y.to(self.device) if conditional else None
                        record = self._train_step(x, y)
                        self.position.index += self.sampler.global_batch_size
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                        elapsed = max(time.perf_counter() - started, 1e-9)
                        record.update(images_per_s=self.sampler.global_batch_size / elapsed,
                                      peak_memory_mb=_peak_memory_mb(self.device))
                        metrics.write(record)
                        if "skipped" in record:
                            self.bad_steps += 1
                            what = (f"non-finite {record['skipped']} (bits/dim {record['bpd']})"
                                    if record["skipped"] in ("loss", "gradient")
                                    else f"numerical failure ({record.get('error', record['skipped'])})")
                            warnings.warn(f"step {record['step']}: {what}; step skipped, parameters unchanged",
                                          NonFiniteStepWarning, stacklevel=2)
                            if self.bad_steps >= self.config.max_bad_steps:
                                self._stop_for_bad_steps(record)
                            if self._stop_requested():
                                self._interrupt(self._stop_requested(), last_saved)
                            continue
                        self.bad_steps = 0
                        smoothed_bpd = record["bpd"] if smoothed_bpd is None else 0.9 * smoothed_bpd + 0.1 * record["bpd"]
                        rate = record["images_per_s"]
                        smoothed_rate = rate if smoothed_rate is None else 0.9 * smoothed_rate + 0.1 * rate
                        bar.update(1)
                        bar.set_postfix(bpd=f"{smoothed_bpd:.3f}", img_s=f"{smoothed_rate:.0f}",
                                        mem=f"{record['peak_memory_mb']:.0f}MB", refresh=False)
                        at_end = self.step >= self.total_steps
                        if self._periodic(self.config.checkpoint_every) and not at_end:
                            self.save()
                            last_saved = self.step
                        if self._stop_requested():
                            self._interrupt(self._stop_requested(), last_saved)
                        if self._periodic(self.config.eval_every) and not at_end:
                            test = self.evaluate()
                            metrics.write({"step": self.step, "test_bpd": float(test.mean()),
                                           "test_bpd_stderr": standard_error(test), "ema": self.ema is not None})
                            if main:
                                bar.write(f"step {self.step}: test bits/dim {float(test.mean()):.4f}")
                        if self._periodic(self.config.sample_every) and not at_end:
                            self.write_samples()
                    if finished_epoch:
                        self.position = DataPosition(self.position.epoch + 1, 0)
                bar.close()
                if last_saved != self.step:
                    self.save()
                    last_saved = self.step
                stop = self._pending_stop()
                if stop:
                    self._interrupt(stop, last_saved)
                test = self.evaluate()
                metrics.write({"step": self.step, "test_bpd": float(test.mean()),
                               "test_bpd_stderr": standard_error(test), "ema": self.ema is not None})
                samples = self.write_samples()
                baseline = self.dist.broadcast_object(self.baseline_bits_per_dim() if main else None)
                metrics.write({"step": self.step, "baseline_bpd": baseline})
        finally:
            bar.close()
            metrics.close()
            self._signals = None
            self._metrics = None
        return TrainResult(step=self.step, out=self.out, checkpoint=self.checkpoint_path,
                           test_bpd=float(test.mean()), test_bpd_stderr=standard_error(test), baseline_bpd=baseline,
                           samples=samples, used_ema=self.ema is not None, test_images=int(test.numel()))


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of `values` (nan for fewer than two)."""
    n = values.numel()
    return float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def load_resume_state(path: str) -> Dict:
    """A checkpoint for `Trainer(resume_state=...)`, with every key the trainer needs checked."""
    return load_checkpoint(path, required=("model", "optimizer", "scheduler", "step", "data_position", "rng",
                                           "glow_config", "train_config"))
