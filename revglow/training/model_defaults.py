"""The model a data set gets by default (`revglow train` without --preset), and whether a model fits a data set.

Example:
    >>> from revglow.training.data import load_dataset
    >>> glow = default_glow_config(load_dataset("digits"), depth=4)
    >>> glow.image_shape, glow.levels, glow.depth, glow.n_bits
    ((1, 8, 8), 2, 4, 4)
"""
from __future__ import annotations

import typing
from typing import Dict

from revglow.errors import ConfigError
from revglow.glow.config import GlowConfig
from revglow.training.datasets import ImageData

__all__ = ["MODEL_DEFAULTS", "default_glow_config", "check_model_fits_data"]

# Architecture defaults per data set (GlowConfig fields); anything else comes from GlowConfig itself.
MODEL_DEFAULTS: Dict[str, Dict] = {
    "digits": {"levels": 2, "depth": 8, "hidden": 64, "n_bits": 4},   # 17 grey levels: 4 bits keep nearly all
    "cifar10": {"levels": 3, "depth": 32, "hidden": 512},
    "folder": {"levels": 3, "depth": 32, "hidden": 512},
    "npz": {"levels": 2, "depth": 16, "hidden": 256},
    # a CPU-sized model for 64x64 crops of two photographs: 5 bits, as the paper's CelebA-HQ 256x256 model
    "photos": {"levels": 3, "depth": 8, "hidden": 64, "n_bits": 5},
}


def default_glow_config(data: ImageData, **overrides) -> GlowConfig:
    """GlowConfig for `data`: its image shape, MODEL_DEFAULTS[data.name], then `overrides` (None: not given, except
    for a field that may be None, such as zero_logscale_factor, where it is the value)."""
    options = dict(MODEL_DEFAULTS.get(data.name, {}))
    hints = typing.get_type_hints(GlowConfig)
    options.update({k: v for k, v in overrides.items()
                    if v is not None or type(None) in typing.get_args(hints.get(k))})
    options["image_shape"] = tuple(data.image_shape)
    return GlowConfig(**options)


def check_model_fits_data(glow_config: GlowConfig, data: ImageData) -> None:
    """A ConfigError unless the model takes the data's images, and has classes for its labels when it asks for
    labels."""
    if tuple(data.image_shape) != tuple(glow_config.image_shape):
        raise ConfigError(f"the data's images are {data.image_shape} but the model expects "
                          f"{tuple(glow_config.image_shape)}")
    if glow_config.num_classes and data.num_classes == 0:
        raise ConfigError(f"num_classes={glow_config.num_classes} asks for a class-conditional model but the "
                          f"{data.name} data set has no labels")
    if glow_config.num_classes and data.num_classes > glow_config.num_classes:
        raise ConfigError(f"the {data.name} data set has {data.num_classes} classes; "
                          f"num_classes={glow_config.num_classes} is too few")
