"""GlowConfig: the architecture and execution options of a Glow model. The command line is built from it (one flag
per field, its help text and choices taken from the field's metadata)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Tuple

from revglow.config_fields import check_bools, check_choices, check_int, check_known_fields, option
from revglow.engine.options import MEMORY_MODES, RECONSTRUCTION_CHECKS
from revglow.errors import ConfigError, ConfigTypeError
from revglow.ops.coupling_network import MEMORY_FORMATS

__all__ = ["GlowConfig", "COUPLINGS", "PERMUTATIONS", "KERNEL_BACKENDS", "MEMORY_FORMATS", "RUNTIME_OPTIONS",
           "check_logscale_factor"]

COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("invconv_lu", "invconv", "shuffle", "reverse")
KERNEL_BACKENDS = ("auto", "torch", "triton")
# The fields that say how the model runs, not what it computes: a state dict loads across them, and they may
# change on --resume.
RUNTIME_OPTIONS = ("memory", "kernels", "memory_format", "compile", "check_reconstruction", "reconstruction_tol")


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


def _check_tolerance(value) -> Optional[float]:
    """GlowConfig.reconstruction_tol: None (the engine derives it from the networks' precision) or a positive
    finite number."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigTypeError(f"GlowConfig.reconstruction_tol must be a number or None; got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"GlowConfig.reconstruction_tol must be a positive finite number or None (follow the "
                          f"networks' precision); got {value!r}")
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
    memory_format: str = option("auto", "layout of the coupling networks' convolutions and of what they keep for "
                                "backward (the flow stays NCHW): channels_last, contiguous, or auto (channels_last "
                                "on CUDA; on the CPU where the hidden tensors are large against the weights)",
                                MEMORY_FORMATS)
    compile: bool = option(False, "torch.compile the work inside each flow step (pays on long runs: the first step "
                           "compiles; the engine stays eager)")
    # Reconstruction check of the reversible engine: each sequence compares a fingerprint of every sample of its
    # input, kept at forward time, with the same fingerprint of the input its backward rebuilt.
    check_reconstruction: str = option("warn", "check of the reversible engine's rebuilt inputs",
                                       RECONSTRUCTION_CHECKS)
    reconstruction_tol: Optional[float] = option(None, "relative error above which that check fires ('none': "
                                                 "follow the networks' precision, 1e-3 without autocast and wider "
                                                 "under it)")

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
        check_bools(self, ("learn_top", "class_head", "compile", "nn_actnorm", "edge_padding"))
        self.zero_logscale_factor = check_logscale_factor("GlowConfig.zero_logscale_factor", self.zero_logscale_factor,
                                                          allow_none=True)
        self.actnorm_logscale_factor = check_logscale_factor("GlowConfig.actnorm_logscale_factor",
                                                             self.actnorm_logscale_factor, allow_none=False)
        factor = 2 ** self.levels
        if h % factor or w % factor or h < factor or w < factor:
            raise ConfigError(
                f"GlowConfig.image_shape {self.image_shape}: H and W must be divisible by 2**levels = {factor} "
                f"(levels={self.levels})")
        check_choices(self)
        self.reconstruction_tol = _check_tolerance(self.reconstruction_tol)

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
