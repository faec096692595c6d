"""Configuration dataclasses: GlowConfig (the model) and TrainConfig (a training run). The command line is built
from these (one flag per field, its help text and choices taken from the field's metadata); there are no other
settings. Every tuple of options lives here, once; the modules that take an option import its tuple from here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence, Tuple

from .errors import ConfigError, ConfigTypeError

__all__ = ["GlowConfig", "TrainConfig", "check_int", "check_known_fields", "COUPLINGS", "PERMUTATIONS",
           "MEMORY_MODES", "KERNEL_BACKENDS", "RECONSTRUCTION_CHECKS", "AMP_MODES", "DATASETS", "MAX_SEED",
           "DEFAULT_MAX_STEPS", "OPTIMIZERS", "AUGMENTATIONS", "override_train_options"]

COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("invconv_lu", "invconv", "shuffle", "reverse")
MEMORY_MODES = ("reversible", "checkpoint", "autograd")
KERNEL_BACKENDS = ("auto", "torch", "triton")
RECONSTRUCTION_CHECKS = ("off", "warn", "raise")
AMP_MODES = ("off", "bf16")
DATASETS = ("digits", "cifar10", "folder", "npz", "photos")   # revglow.data has one reader per name
OPTIMIZERS = ("adam", "adamax")     # revglow.optim.make_optimizer builds each
AUGMENTATIONS = ("none", "shift")   # revglow.augment
MAX_SEED = 2 ** 32 - 1          # numpy's global RNG takes seeds below 2**32
DEFAULT_MAX_STEPS = 1500


def option(default, help: str, choices: Optional[Sequence[str]] = None):
    """A dataclass field whose metadata carries its command-line help text (and choices, for a string option)."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


def _check_choice(owner: str, name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise ConfigTypeError(f"{owner}.{name} must be a string, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ConfigError(f"{owner}.{name}={value!r} is not a known option; choose one of {choices}")


def check_int(owner: str, name: str, value, minimum: int) -> None:
    """A config field that must be an int (not a bool) of at least `minimum`; the error names `owner.name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{owner}.{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"{owner}.{name} must be >= {minimum}; got {value}")


def _check_bools(config, names: Sequence[str]) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ConfigTypeError(f"{type(config).__name__}.{name} must be a bool; got {type(getattr(config, name)).__name__}")


def _check_choices(config) -> None:
    """Every field with `choices` in its metadata holds one of them."""
    for item in fields(config):
        if "choices" in item.metadata:
            _check_choice(type(config).__name__, item.name, getattr(config, item.name), item.metadata["choices"])


def check_known_fields(cls, data: dict) -> None:
    """`cls.from_dict` refuses keys that are not fields of the dataclass `cls`, naming them."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ConfigError(f"{cls.__name__}.from_dict: unknown option(s) {sorted(unknown)}")


def check_logscale_factor(name: str, value, allow_none: bool) -> Optional[float]:
    """A log-scale factor (GlowConfig, ActNorm, the zero convolutions): a positive finite number, or None where
    the option can be off; the error names `name`."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"{name} must be a number{' or None' if allow_none else ''}; got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive finite number{' or None (off)' if allow_none else ''}; "
                          f"got {value!r}")
    return float(value)


@dataclass
class GlowConfig:
    """Architecture and execution options of a multi-scale Glow model (paper, section 3).

    Example:
        >>> cfg = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=4, hidden=32)
        >>> cfg.image_shape
        (1, 8, 8)
    """

    image_shape: Tuple[int, int, int] = option((3, 32, 32), "(C, H, W) of the images")
    levels: int = option(3, "number of scales L (H and W must be divisible by 2**L)")
    depth: int = option(32, "flow steps K per level")
    hidden: int = option(512, "channels of the coupling networks")
    coupling: str = option("affine", "coupling layer", COUPLINGS)
    permutation: str = option("invconv_lu", "channel permutation between couplings", PERMUTATIONS)
    n_bits: int = option(8, "bits per channel the images are reduced to")
    learn_top: bool = option(True, "learned (zero-initialized) top prior instead of N(0, I)")
    num_classes: int = option(0, "> 0: class-conditional prior (the data set must have labels)")
    class_head: bool = option(True, "class-conditional models also predict the class from the spatial mean of the "
                              "top latent (zero-initialized linear head; the trainer adds --weight-y times its "
                              "cross-entropy in bits)")
    context_channels: int = option(0, "> 0: conditioned on a context map [N, this, H', W'] given to every call")
    # The reference implementation's coupling network and zero-initialized layers (paper section 3.3; openai/glow
    # tfops.py). A checkpoint written before these options existed has none of them in its config: from_dict reads
    # it with the values of _BEFORE_FIDELITY_OPTIONS, the model it was trained as.
    nn_actnorm: bool = option(True, "coupling network: hidden convolutions without bias, each followed by ActNorm "
                              "(conv3x3 -> ActNorm -> ReLU -> conv1x1 -> ActNorm -> ReLU -> zero conv3x3)")
    edge_padding: bool = option(True, "3x3 convolutions of the coupling networks and split priors see one more input "
                                "channel, 1 on the zero-padded border")
    zero_logscale_factor: Optional[float] = option(3.0, "zero-initialized last layers (coupling network, priors) "
                                                   "scale their output by exp(this * logs), logs per channel from 0 "
                                                   "('none': off)")
    actnorm_logscale_factor: float = option(3.0, "ActNorm stores its log-scale divided by this (how the optimizer "
                                            "sees it; 1: plain)")
    memory: str = option("reversible", "how training keeps activations: reversible (constant in depth), checkpoint "
                         "or autograd", MEMORY_MODES)
    kernels: str = option("auto", "fused Triton kernels on CUDA (auto), or force torch/triton", KERNEL_BACKENDS)
    compile: bool = option(False, "torch.compile the work inside each flow step (pays on long runs: the first step "
                           "compiles; the engine stays eager)")
    # Reconstruction check of the reversible engine: each sequence compares a fingerprint of every sample of its
    # input, kept at forward time, with the same fingerprint of the input its backward rebuilt.
    check_reconstruction: str = option("warn", "check of the reversible engine's rebuilt inputs",
                                       RECONSTRUCTION_CHECKS)
    reconstruction_tol: float = option(1e-3, "relative error above which that check fires")

    def __post_init__(self) -> None:
        shape = self.image_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 3:
            raise ConfigError(f"GlowConfig.image_shape must be (C, H, W); got {shape!r}")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise ConfigTypeError(f"GlowConfig.image_shape must hold ints; got {shape!r}")
        self.image_shape = tuple(shape)
        c, h, w = self.image_shape
        if c < 1:
            raise ConfigError(f"GlowConfig.image_shape has an unusable channel count {c}; need at least 1")
        for name, minimum in (("levels", 1), ("depth", 1), ("hidden", 1), ("n_bits", 1)):
            check_int("GlowConfig", name, getattr(self, name), minimum)
        if self.n_bits > 8:
            raise ConfigError(f"GlowConfig.n_bits must be between 1 and 8; got {self.n_bits}")
        check_int("GlowConfig", "num_classes", self.num_classes, 0)
        check_int("GlowConfig", "context_channels", self.context_channels, 0)
        _check_bools(self, ("learn_top", "class_head", "compile", "nn_actnorm", "edge_padding"))
        self.zero_logscale_factor = check_logscale_factor("GlowConfig.zero_logscale_factor", self.zero_logscale_factor,
                                                          allow_none=True)
        self.actnorm_logscale_factor = check_logscale_factor("GlowConfig.actnorm_logscale_factor",
                                                             self.actnorm_logscale_factor, allow_none=False)
        factor = 2 ** self.levels
        if h % factor or w % factor or h < factor or w < factor:
            raise ConfigError(
                f"GlowConfig.image_shape {self.image_shape}: H and W must be divisible by 2**levels = {factor} "
                f"(levels={self.levels})")
        _check_choices(self)
        if not isinstance(self.reconstruction_tol, (int, float)) or not self.reconstruction_tol > 0:
            raise ConfigError(f"GlowConfig.reconstruction_tol must be a positive number; got {self.reconstruction_tol!r}")

    @property
    def num_dims(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def to_dict(self) -> dict:
        """Plain-typed dict (for checkpoints loaded with weights_only=True)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["image_shape"] = list(self.image_shape)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "GlowConfig":
        """The config saved by to_dict. A saved config without the reference-network options (written before they
        existed) gets the values that describe the model it was trained as (plain network, factors off, no class
        head)."""
        check_known_fields(cls, data)
        data = {**_BEFORE_FIDELITY_OPTIONS, **data}
        if "image_shape" in data:
            data["image_shape"] = tuple(data["image_shape"])
        return cls(**data)


# What a GlowConfig dict without these keys (a checkpoint from before they existed) means: the model it was
# trained as (plain coupling network, no log-scale factors, no class head).
_BEFORE_FIDELITY_OPTIONS = {"nn_actnorm": False, "edge_padding": False, "zero_logscale_factor": None,
                            "actnorm_logscale_factor": 1.0, "class_head": False}


# TrainConfig options that stand in for each other: giving one explicitly drops the other from the options it is
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
    max_bad_steps: int = option(5, "stop after this many non-finite steps in a row")
    n_samples: int = option(64, "images per sample grid")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.data not in DATASETS:
            raise ConfigError(f"TrainConfig.data={self.data!r} is not a known data set; choose one of {DATASETS}")
        if self.out is None:
            self.out = f"runs/{self.data}"
        if self.amp not in AMP_MODES:
            raise ConfigError(f"TrainConfig.amp={self.amp!r} is not a known option; choose one of {AMP_MODES}")
        for name in ("batch_size", "max_bad_steps", "n_samples"):
            check_int("TrainConfig", name, getattr(self, name), 1)
        for name in ("workers", "eval_every", "sample_every", "checkpoint_every", "keep", "seed"):
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
        _check_bools(self, ("overwrite", "skip_bad_images", "tensorboard", "progress"))
        _check_choices(self)

    def to_dict(self) -> dict:
        """Plain-typed dict (for checkpoints loaded with weights_only=True)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        check_known_fields(cls, data)
        return cls(**data)
