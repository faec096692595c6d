"""The training loop behind `revglow train`: Adam with linear warm-up, optional bf16 autocast, Polyak
averaging (EMA), skipping of non-finite steps, periodic evaluation, sample grids and atomic checkpoints,
and exact resume (same parameters and losses, bit for bit, on the CPU).

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
import random
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch import nn

from .baseline import PixelCategoricalBaseline
from .checkpoint import (capture_rng_state, link_or_copy_atomic, load_checkpoint, prune_step_checkpoints,
                         restore_rng_state, save_checkpoint, step_checkpoint_path)
from .config import GlowConfig, check_int, check_known_fields
from .data import DATASETS, DataPosition, ImageData, load_dataset, make_eval_loader, make_train_loader, stack_images
from .images import save_grid
from .model import Glow

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainResult",
    "TrainingDiverged",
    "NonFiniteStepWarning",
    "ExponentialMovingAverage",
    "MODEL_DEFAULTS",
    "AMP_MODES",
    "SAMPLE_TEMPERATURES",
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

# Architecture defaults per data set (GlowConfig fields); anything else comes from GlowConfig itself.
MODEL_DEFAULTS: Dict[str, Dict] = {
    "digits": {"levels": 2, "depth": 8, "hidden": 64, "n_bits": 4},   # 17 grey levels: 4 bits keep nearly all
    "cifar10": {"levels": 3, "depth": 32, "hidden": 512},
    "folder": {"levels": 3, "depth": 32, "hidden": 512},
    "npz": {"levels": 2, "depth": 16, "hidden": 256},
}


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the run stopped without touching the last good checkpoint."""


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
        for name in ("max_steps", "epochs", "image_size"):
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


def load_model(state: Dict, device: torch.device, use_ema: bool = True) -> Glow:
    """A Glow built from a checkpoint's config and weights (the EMA weights when present and use_ema)."""
    model = Glow(GlowConfig.from_dict(state["glow_config"]))
    model.load_state_dict(state["model"])
    ema = state.get("ema")
    if use_ema and ema and ema.get("shadow"):
        missing = set(ema["shadow"]) - set(dict(model.named_parameters()))
        if missing:
            raise ValueError(f"the checkpoint's EMA weights name unknown parameters {sorted(missing)[:3]}")
        model.load_state_dict(ema["shadow"], strict=False)
    return model.to(device).eval()


def train_config_for_resume(state: Dict, overrides: Dict) -> TrainConfig:
    """The checkpoint's TrainConfig with the given `overrides` (options set explicitly) applied."""
    options = dict(state["train_config"])
    options.update(overrides)
    return TrainConfig.from_dict(options)


# ------------------------------------------------------------------------------------------ metrics

class _MetricsLog:
    """metrics.jsonl (one JSON object per line) plus TensorBoard events when tensorboard imports."""

    def __init__(self, folder: Path, resume_step: Optional[int]) -> None:
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
        self.handle = open(self.path, "a", encoding="utf-8")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step)
        except Exception:  # tensorboard not installed (or broken): metrics.jsonl is enough
            self.tensorboard = None

    def write(self, record: Dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


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

    Give `resume_state` (a loaded checkpoint) to continue a run exactly where the checkpoint left it.
    """

    def __init__(self, glow_config: GlowConfig, config: TrainConfig, data: Optional[ImageData] = None,
                 resume_state: Optional[Dict] = None) -> None:
        if not isinstance(glow_config, GlowConfig):
            raise TypeError(f"Trainer expects a GlowConfig; got {type(glow_config).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer expects a TrainConfig; got {type(config).__name__}")
        self.config = config
        self.device = resolve_device(config.device)
        self.data = data if data is not None else load_dataset(config.data, config.data_root, config.image_size)
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
        self.model = Glow(glow_config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.loader, self.sampler = make_train_loader(self.data.train, config.batch_size, config.seed, config.workers)
        if config.epochs is not None:
            self.total_steps = config.epochs * self.sampler.batches_per_epoch
        else:
            self.total_steps = config.max_steps if config.max_steps is not None else DEFAULT_MAX_STEPS
        self.warmup = config.warmup if config.warmup is not None else min(200, self.total_steps // 10)
        warmup = max(1, self.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        self.ema = ExponentialMovingAverage(self.model, config.ema) if config.ema is not None else None
        self.out = Path(config.out)
        self.step = 0
        self.position = DataPosition()
        self.bad_steps = 0
        self.last_eval: Optional[torch.Tensor] = None
        self.sample_paths: List[Path] = []
        self.checkpoint_path = self.out / CHECKPOINT_NAME
        self._resumed_step: Optional[int] = None
        if resume_state is not None:
            self._load_state(resume_state)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict:
        train_config = self.config.to_dict()
        train_config["warmup"] = self.warmup      # resolved, so a resumed run warms up the same way
        train_config["resume"] = None
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data_position": self.position.to_dict(),
            "bad_steps": self.bad_steps,
            "rng": capture_rng_state(),
            "glow_config": self.glow_config.to_dict(),
            "train_config": train_config,
            "data": {"name": self.data.name, "image_shape": list(self.data.image_shape),
                     "num_classes": self.data.num_classes, "class_names": list(self.data.class_names)},
        }

    def _load_state(self, state: Dict) -> None:
        saved = GlowConfig.from_dict(state["glow_config"])
        if saved != self.glow_config:
            raise ValueError("the checkpoint's model configuration differs from the one given; resume with the "
                             "checkpoint's configuration")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        self.position = DataPosition.from_dict(state["data_position"])
        self.bad_steps = int(state.get("bad_steps", 0))
        restore_rng_state(state["rng"])
        self._resumed_step = self.step

    def save(self) -> Path:
        """Write checkpoint.pt atomically, keep a checkpoint-STEP.pt copy, prune old copies."""
        save_checkpoint(self.state_dict(), self.checkpoint_path)
        if self.config.keep > 0:
            link_or_copy_atomic(self.checkpoint_path, step_checkpoint_path(self.out, self.step))
        prune_step_checkpoints(self.out, self.config.keep)
        return self.checkpoint_path

    # ------------------------------------------------------------------------------ eval / samples
    def _eval_context(self):
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext(self.model)

    def evaluate(self, draws: int = 1) -> torch.Tensor:
        with self._eval_context() as model:
            self.last_eval = evaluate_bits_per_dim(model, self.data.test, self.config.batch_size, self.device,
                                                   draws=draws, seed=self.config.seed, workers=self.config.workers)
        return self.last_eval

    def write_samples(self) -> List[Path]:
        folder = self.out / "samples"
        paths = []
        with self._eval_context() as model, torch.no_grad():
            model.eval()
            for temperature in SAMPLE_TEMPERATURES:
                generator = torch.Generator(self.device).manual_seed(self.config.seed)
                labels = _sample_labels(model, self.config.n_samples, self.device)
                images = model.sample(self.config.n_samples, temperature=temperature, y=labels, generator=generator)
                paths.append(save_grid(images, folder / f"step-{self.step:08d}-t{temperature:.1f}.png"))
            model.train()
        self.sample_paths = paths
        return paths

    def baseline_bits_per_dim(self) -> float:
        train_images, _ = stack_images(self.data.train, workers=self.config.workers)
        test_images, _ = stack_images(self.data.test, workers=self.config.workers)
        baseline = PixelCategoricalBaseline.fit(train_images, n_bits=self.glow_config.n_bits)
        return float(baseline.bits_per_dim(test_images).mean())

    # ------------------------------------------------------------------------------ training
    def _train_step(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> Dict:
        """One optimizer step; returns its metrics, with "skipped" set when it was not taken."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16"):
            bpd = self.model(x, y)
        loss = bpd.float().mean()
        lr = self.optimizer.param_groups[0]["lr"]
        value = float(loss.detach())
        record = {"step": self.step + 1, "epoch": self.position.epoch,
                  "bpd": value if math.isfinite(value) else None, "lr": lr}
        self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(value):
            record["skipped"] = "loss"
            return record
        loss.backward()
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))  # one device sync
        record["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
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

    def _clear_previous_run(self) -> None:
        """A fresh run in a folder that held one: drop its step checkpoints so rotation stays by this run."""
        stale = sorted(self.out.glob("checkpoint-*.pt"))
        if self.checkpoint_path.exists() or stale:
            warnings.warn(f"{self.out} holds an earlier run; starting afresh (pass --resume to continue it): "
                          f"its checkpoint.pt will be replaced and {len(stale)} checkpoint-STEP.pt removed",
                          RuntimeWarning, stacklevel=3)
        for path in stale:
            path.unlink()

    def _periodic(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def _stop_for_bad_steps(self, reason: str) -> None:
        good = (f"the last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path.exists()
                else "no checkpoint was written yet")
        raise TrainingDiverged(f"{self.bad_steps} non-finite steps in a row (last: non-finite {reason}) after step "
                               f"{self.step}; stopping ({good}). Try a lower --lr, --grad-clip or --warmup.")

    def run(self) -> TrainResult:
        """Train to the configured number of steps, then evaluate, sample and checkpoint."""
        from tqdm import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        if self._resumed_step is None:
            self._clear_previous_run()
        metrics = _MetricsLog(self.out, self._resumed_step)
        conditional = self.glow_config.num_classes > 0
        # In a log file (not a terminal) a bar redrawn ten times a second floods it: redraw every 10 s there.
        interactive = sys.stderr.isatty()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.config.progress, unit="step",
                   dynamic_ncols=True, desc="train", mininterval=0.1 if interactive else 10.0)
        smoothed_bpd, smoothed_rate = None, None
        last_saved = -1
        try:
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
                    self.position.index += x.shape[0]
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    record.update(images_per_s=x.shape[0] / elapsed, peak_memory_mb=_peak_memory_mb(self.device))
                    metrics.write(record)
                    if "skipped" in record:
                        self.bad_steps += 1
                        warnings.warn(f"step {record['step']}: non-finite {record['skipped']} "
                                      f"(bits/dim {record['bpd']}); step skipped, parameters unchanged",
                                      NonFiniteStepWarning, stacklevel=2)
                        if self.bad_steps >= self.config.max_bad_steps:
                            self._stop_for_bad_steps(record["skipped"])
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
                    if self._periodic(self.config.eval_every) and not at_end:
                        test = self.evaluate()
                        metrics.write({"step": self.step, "test_bpd": float(test.mean()),
                                       "test_bpd_stderr": standard_error(test), "ema": self.ema is not None})
                        bar.write(f"step {self.step}: test bits/dim {float(test.mean()):.4f}")
                    if self._periodic(self.config.sample_every) and not at_end:
                        self.write_samples()
                if finished_epoch:
                    self.position = DataPosition(self.position.epoch + 1, 0)
            bar.close()
            if last_saved != self.step:
                self.save()
            test = self.evaluate()
            metrics.write({"step": self.step, "test_bpd": float(test.mean()), "test_bpd_stderr": standard_error(test),
                           "ema": self.ema is not None})
            samples = self.write_samples()
            baseline = self.baseline_bits_per_dim()
            metrics.write({"step": self.step, "baseline_bpd": baseline})
        finally:
            bar.close()
            metrics.close()
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
