"""Presets (`revglow train --preset NAME`): the paper's models and training recipes, and the project's digits demo,
as one table of GlowConfig and TrainConfig values. Flags given on the command line override a preset's values.

Where each number comes from: the paper (Kingma & Dhariwal 2018, section 5 and appendix), the commands of the
authors' README (openai/glow README.md, "Quantitative result" runs: `--n_level --depth --flow_permutation 2
--flow_coupling --learntop --lr 0.001 --n_bits_x`) and the defaults of their train.py (`--optimizer adamax`,
`--epochs_warmup 10`, `--width 512`, `--n_batch_train 64`, `--n_batch_init 256`, `--anchor_size 32`, `--dal 1`).
Their train.py scales both batch sizes per process by (32 / image size)**2, and their runs used 8 processes
(`mpiexec -n 8`; 40 for CelebA-HQ): the presets' --batch-size is that per-process batch, so torchrun with as many
processes gives the reference's global batch; their init batch was rank 0's, which --init-batch-size matches.

A preset names a data set but reads only local files: point it at yours with --data-root (and --data to read
another format of the same images). Nothing is downloaded.

Example:
    >>> glow, train = preset_configs("cifar10", train_overrides={"lr": 5e-4})
    >>> glow.levels, glow.depth, glow.hidden, glow.coupling, train.optimizer, train.lr
    (3, 32, 512, 'affine', 'adamax', 0.0005)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from revglow.glow.config import GlowConfig
from revglow.training.config import TrainConfig, override_train_options
from revglow.errors import ConfigError, ConfigTypeError

__all__ = ["Preset", "PRESETS", "PRESET_NAMES", "get_preset", "preset_options", "preset_configs"]


@dataclass(frozen=True)
class Preset:
    """A named model and recipe: the image shape it is built for, and GlowConfig / TrainConfig values."""

    name: str
    description: str
    image_shape: Tuple[int, int, int]
    glow: Mapping[str, Any]
    train: Mapping[str, Any]


# The reference network (openai/glow tfops.py / model.py), written out so a preset does not move with
# GlowConfig's defaults. flow_permutation 2 is the plain invertible 1x1 convolution (invconv, not the LU form).
_PAPER_NETWORK = dict(hidden=512, permutation="invconv", learn_top=True, nn_actnorm=True, edge_padding=True,
                      zero_logscale_factor=3.0, actnorm_logscale_factor=3.0)
# The reference train.py's optimizer defaults; --lr 0.001 in every README command.
_PAPER_RECIPE = dict(optimizer="adamax", lr=1e-3, warmup_epochs=10.0)

PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("cifar10", "CIFAR-10 32x32, 3.35 bits/dim in the paper (README: CIFAR-10 Quantitative result)",
           (3, 32, 32),
           dict(_PAPER_NETWORK, levels=3, depth=32, coupling="affine", n_bits=8),
           # --dal 1 (default): shifts of up to 10% for CIFAR-10 (data_loaders/get_mnist_cifar.py)
           dict(_PAPER_RECIPE, data="cifar10", batch_size=64, init_batch_size=256, augment="shift")),
    Preset("imagenet32", "ImageNet 32x32, 4.09 bits/dim in the paper (README: ImageNet 32x32 Quantitative result)",
           (3, 32, 32),
           dict(_PAPER_NETWORK, levels=3, depth=48, coupling="affine", n_bits=8),
           # images in a folder, resized and centre-cropped to 32 (an .npz of 32x32 images works too: --data npz);
           # the reference's ImageNet loader (data_loaders/get_data.py) does not augment
           dict(_PAPER_RECIPE, data="folder", image_size=32, batch_size=64, init_batch_size=256, augment="none")),
    Preset("imagenet64", "ImageNet 64x64, 3.81 bits/dim in the paper (README: ImageNet 64x64 Quantitative result)",
           (3, 64, 64),
           dict(_PAPER_NETWORK, levels=4, depth=48, coupling="affine", n_bits=8),
           # batch 64 * (32/64)**2 = 16 per process, init 256 * (32/64)**2 = 64
           dict(_PAPER_RECIPE, data="folder", image_size=64, batch_size=16, init_batch_size=64, augment="none")),
    Preset("celeba256", "CelebA-HQ 256x256 at 5 bits, additive coupling (README: CelebA-HQ 256x256 Qualitative "
           "result)", (3, 256, 256),
           dict(_PAPER_NETWORK, levels=6, depth=32, coupling="additive", n_bits=5),
           # batch 64 * (32/256)**2 = 1 per process (40 processes in the README), init 256 * (32/256)**2 = 4
           dict(_PAPER_RECIPE, data="folder", image_size=256, batch_size=1, init_batch_size=4, augment="none")),
    # The project's demo (Makefile `demo` runs this preset: the digits model defaults of
    # revglow.training.model_defaults.MODEL_DEFAULTS), not a model of the paper. The random shifts keep the reference
    # network from overfitting the 1,438 training digits (README, Quickstart: 2.04 test bits/dim with them, 2.11 for
    # the plain network, same budget).
    Preset("digits", "the 8x8 digits demo of `make demo` (about three minutes on 2 CPU cores)",
           (1, 8, 8),
           dict(levels=2, depth=8, hidden=64, n_bits=4),
           dict(data="digits", lr=3e-3, max_steps=1200, augment="shift")),
)}
PRESET_NAMES = tuple(PRESETS)

_GLOW_FIELDS = frozenset(f.name for f in fields(GlowConfig))
_TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))


def get_preset(name: str) -> Preset:
    """The preset called `name`; an unknown name is a ConfigError listing the known ones."""
    if not isinstance(name, str):
        raise ConfigTypeError(f"a preset name must be a string, one of {PRESET_NAMES}; got {type(name).__name__}")
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {PRESET_NAMES}")
    return PRESETS[name]


def preset_options(name: str, glow_overrides: Optional[Mapping[str, Any]] = None,
                   train_overrides: Optional[Mapping[str, Any]] = None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(GlowConfig options, TrainConfig options) of preset `name` with the overrides (flags given explicitly)
    on top. The output folder defaults to runs/NAME. Giving max_steps drops a preset's epochs and the other way
    round, and the same for warmup and warmup_epochs, as on --resume."""
    preset = get_preset(name)
    glow_overrides, train_overrides = dict(glow_overrides or {}), dict(train_overrides or {})
    for given, known, cls in ((glow_overrides, _GLOW_FIELDS, GlowConfig), (train_overrides, _TRAIN_FIELDS,
                                                                           TrainConfig)):
        unknown = sorted(set(given) - known)
        if unknown:
            raise ConfigError(f"preset {name}: {cls.__name__} has no option(s) {unknown}")
    if "image_shape" in glow_overrides:
        raise ConfigError(f"preset {name} is built for images {preset.image_shape}; its image shape cannot be "
                          f"overridden (choose another preset, or no preset)")
    train = override_train_options({"out": f"runs/{name}", **preset.train}, train_overrides)
    glow = {"image_shape": preset.image_shape, **preset.glow, **glow_overrides}
    return glow, train


def preset_configs(name: str, glow_overrides: Optional[Mapping[str, Any]] = None,
                   train_overrides: Optional[Mapping[str, Any]] = None) -> Tuple[GlowConfig, TrainConfig]:
    """The GlowConfig and TrainConfig of preset `name` with the overrides; no weights are built, no data read."""
    glow, train = preset_options(name, glow_overrides, train_overrides)
    return GlowConfig(**glow), TrainConfig(**train)
