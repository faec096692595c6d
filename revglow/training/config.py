"""TrainConfig: everything about a training run that is not the model's architecture (that is GlowConfig), and
the option names the training modules take."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from revglow.config_fields import check_bools, check_choices, check_int, check_known_fields, option
from revglow.errors import ConfigError, ConfigTypeError

__all__ = ["TrainConfig", "AMP_MODES", "DATASETS", "OPTIMIZERS", "AUGMENTATIONS", "ON_DIVERGENCE", "MAX_SEED",
           "DEFAULT_MAX_STEPS", "override_train_options"]

AMP_MODES = ("off", "bf16")
DATASETS = ("digits", "cifar10", "folder", "npz", "photos")   # revglow.training.data has one reader per name
OPTIMIZERS = ("adam", "adamax")     # revglow.training.optimizers.make_optimizer builds each
AUGMENTATIONS = ("none", "shift")   # revglow.training.augment
ON_DIVERGENCE = ("stop", "rollback")   # revglow.training.divergence
MAX_SEED = 2 ** 32 - 1          # numpy's global RNG takes seeds below 2**32
DEFAULT_MAX_STEPS = 1500


# laid over (a checkpoint's, a preset's), so a run can switch between them.
_ALTERNATIVE_TRAIN_OPTIONS = (("max_steps", "epochs"), ("warmup", "warmup_epochs"))


def override_train_options(base: dict, overrides: dict) -> dict:
    """TrainConfig options `base` with `overrides` (options given explicitly) on top; an override of max_steps
    drops base's epochs and the other way round, and the same for warmup and warmup_epochs."""
    options = dict(base)
    for pair in _ALTERNATIVE_TRAIN_OPTIONS:
        for one, other in (pair, pair[::-1]):
            if overrides.get(one) is not None and other not in overrides:
                options.pop(other, None)
    options.update(overrides)
    return options


@dataclass
class TrainConfig:
    """Everything about a training run that is not the model's architecture (that is GlowConfig).

    Example:
        >>> TrainConfig(max_steps=3, out="/tmp/revglow-doc", progress=False).batch_size
        64
    """

    data: str = option("digits", "data set (read from local files only)", DATASETS)
    data_root: Optional[str] = option(None, "cifar10: folder with the python batches; folder: image folder; npz: "
                                      "the .npz file")
    image_size: Optional[int] = option(None, "folder data: resize (shorter side) and centre-crop images to this size; "
                                       "photos: the side of the crops (default 64)")
    batch_size: int = option(64, "images per step")
    optimizer: str = option("adam", "adam (torch.optim.Adam) or adamax (the paper's code: Adamax, beta2 = 1 - "
                            "1/steps per epoch)", OPTIMIZERS)
    lr: float = option(1e-3, "learning rate")                         # paper, section 5
    warmup: Optional[int] = option(None, "linear learning-rate warm-up, in steps (default: min(200, total steps "
                                   "// 10))")
    warmup_epochs: Optional[float] = option(None, "linear learning-rate warm-up, in epochs (converted with the steps "
                                            "per epoch; instead of --warmup)")
    grad_clip: Optional[float] = option(None, "clip the global gradient norm to this ('none': no clipping)")
    weight_y: float = option(0.01, "class-conditional model with a class head: the loss is bits/dim + this times the "
                             "head's cross-entropy in bits (the paper's code: 0.01; 0: the head does not train)")
    max_steps: Optional[int] = option(None, f"total optimizer steps (default {DEFAULT_MAX_STEPS} unless --epochs)")
    epochs: Optional[int] = option(None, "train this many passes over the train split instead of --max-steps")
    seed: int = option(0, "seed of the data order, initialization and dequantization noise")
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    amp: str = option("off", "bf16: autocast the model call to bfloat16 (the flow itself stays float32)", AMP_MODES)
    ema: Optional[float] = option(0.999, "Polyak averaging decay of the weights used for eval and samples ('none': "
                                  "off)")
    out: Optional[str] = option(None, "output folder (default runs/DATA)")
    resume: Optional[str] = option(None, "a checkpoint to continue from")
    overwrite: bool = option(False, "start afresh in an --out that holds a run (its checkpoints, metrics and samples "
                             "are removed)")
    init_batch_size: Optional[int] = option(None, "images for ActNorm's data-dependent init, may exceed --batch-size "
                                            "(the paper's code uses 256; default: one global batch)")
    augment: str = option("none", "shift: translate each training image by up to 10%% of its size, edge pixels "
                          "repeated (the paper's CIFAR-10 augmentation)", AUGMENTATIONS)
    skip_bad_images: bool = option(False, "folder data: leave unreadable image files out (counted) instead of "
                                   "stopping")
    tensorboard: bool = option(False, "also write TensorBoard events to OUT/tensorboard (scalars and sample grids)")
    workers: int = option(0, "DataLoader worker processes")
    eval_every: int = option(500, "steps between test evaluations (0: only at the end)")
    eval_batch_size: Optional[int] = option(None, "images per evaluation batch: evaluation keeps no activations for a "
                                            "backward pass, so it may exceed --batch-size (default: --batch-size)")
    sample_every: int = option(500, "steps between sample grids (0: only at the end)")
    checkpoint_every: int = option(500, "steps between checkpoints (0: only at the end)")
    keep: int = option(3, "how many checkpoint-STEP.pt files to keep")
    max_bad_steps: int = option(5, "stop (or roll back, with --on-divergence rollback) after this many failed steps "
                                "in a row")
    on_divergence: str = option("stop", "when an update leaves non-finite weights, EMA or optimizer state, or a model "
                                "whose loss is non-finite: stop (the last checkpoint stays the last good one), or "
                                "rollback (back to the last good state kept in memory, at half the learning rate, "
                                "skipping the batch)", ON_DIVERGENCE)
    rollback_every: int = option(50, "--on-divergence rollback: steps between refreshes of the good state kept in "
                                 "memory (also refreshed at every checkpoint)")
    max_rollbacks: int = option(5, "--on-divergence rollback: stop after this many rollbacks in a run")
    n_samples: int = option(64, "images per sample grid")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ConfigError(f"TrainConfig.data={self.data!r} is not a known data set; choose one of {DATASETS}")
        if self.out is None:
            self.out = f"runs/{self.data}"
        if self.amp not in AMP_MODES:
            raise ConfigError(f"TrainConfig.amp={self.amp!r} is not a known option; choose one of {AMP_MODES}")
        for name in ("batch_size", "max_bad_steps", "n_samples", "rollback_every"):
            check_int("TrainConfig", name, getattr(self, name), 1)
        for name in ("workers", "eval_every", "sample_every", "checkpoint_every", "keep", "seed", "max_rollbacks"):
            check_int("TrainConfig", name, getattr(self, name), 0)
        for name in ("max_steps", "epochs", "image_size", "init_batch_size", "eval_batch_size"):
            if getattr(self, name) is not None:
                check_int("TrainConfig", name, getattr(self, name), 1)
        if self.warmup is not None:
            check_int("TrainConfig", "warmup", self.warmup, 0)
        if self.warmup_epochs is not None:
            if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, (int, float)):
                raise ConfigTypeError(f"TrainConfig.warmup_epochs must be a number or None; got "
                                      f"{type(self.warmup_epochs).__name__}")
            if not math.isfinite(self.warmup_epochs) or self.warmup_epochs < 0:
                raise ConfigError(f"TrainConfig.warmup_epochs must be a finite number >= 0; got {self.warmup_epochs!r}")
            if self.warmup is not None:
                raise ConfigError("TrainConfig: give warmup (steps) or warmup_epochs, not both")
        if not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"TrainConfig.lr must be a positive number; got {self.lr!r}")
        if (isinstance(self.weight_y, bool) or not isinstance(self.weight_y, (int, float))
                or not math.isfinite(self.weight_y) or self.weight_y < 0):
            raise ConfigError(f"TrainConfig.weight_y must be a finite number >= 0; got {self.weight_y!r}")
        if self.grad_clip is not None and (not isinstance(self.grad_clip, (int, float)) or not self.grad_clip > 0):
            raise ConfigError(f"TrainConfig.grad_clip must be a positive number or None; got {self.grad_clip!r}")
        if self.ema is not None and (not isinstance(self.ema, (int, float)) or not 0.0 < self.ema < 1.0):
            raise ConfigError(f"TrainConfig.ema must be a decay in (0, 1) or None; got {self.ema!r}")
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("TrainConfig: give max_steps or epochs, not both")
        if self.seed > MAX_SEED:
            raise ConfigError(f"TrainConfig.seed must be between 0 and 2**32 - 1 = {MAX_SEED}; got {self.seed}")
        check_bools(self, ("overwrite", "skip_bad_images", "tensorboard", "progress"))
        check_choices(self)

    def to_dict(self) -> dict:
        """Plain-typed dict (for checkpoints loaded with weights_only=True)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        check_known_fields(cls, data)
        return cls(**data)
