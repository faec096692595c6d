"""Configuration dataclasses. The command line is built from these; there are no other settings."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Tuple

__all__ = ["GlowConfig", "check_int", "check_known_fields", "COUPLINGS", "PERMUTATIONS", "MEMORY_MODES", "KERNEL_BACKENDS", "RECONSTRUCTION_CHECKS"]

COUPLINGS = ("affine", "additive")
PERMUTATIONS = ("invconv_lu", "invconv", "shuffle", "reverse")
MEMORY_MODES = ("reversible", "checkpoint", "autograd")
KERNEL_BACKENDS = ("auto", "torch", "triton")
RECONSTRUCTION_CHECKS = ("off", "warn", "raise")


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str):
        raise TypeError(f"GlowConfig.{name} must be a string, one of {choices}; got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"GlowConfig.{name}={value!r} is not a known option; choose one of {choices}")


def check_int(owner: str, name: str, value, minimum: int) -> None:
    """A config field that must be an int (not a bool) of at least `minimum`; the error names `owner.name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int; got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}; got {value}")


def _check_int(name: str, value, minimum: int) -> None:
    check_int("GlowConfig", name, value, minimum)


def check_known_fields(cls, data: dict) -> None:
    """`cls.from_dict` refuses keys that are not fields of the dataclass `cls`, naming them."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown option(s) {sorted(unknown)}")


@dataclass
class GlowConfig:
    """Architecture and execution options of a multi-scale Glow model (paper, section 3).

    Example:
        >>> cfg = GlowConfig(image_shape=(1, 8, 8), levels=2, depth=4, hidden=32)
        >>> cfg.image_shape
        (1, 8, 8)
    """

    image_shape: Tuple[int, int, int] = (3, 32, 32)
    levels: int = 3                    # L: number of squeeze/flow/split scales
    depth: int = 32                    # K: flow steps per level
    hidden: int = 512                  # width of the coupling networks
    coupling: str = "affine"           # "affine" | "additive"
    permutation: str = "invconv_lu"    # "invconv_lu" | "invconv" | "shuffle" | "reverse"
    n_bits: int = 8                    # images are reduced to this many bits per channel
    learn_top: bool = True             # learned (zero-initialized) top prior instead of N(0, I)
    num_classes: int = 0               # > 0: class-conditional top prior
    context_channels: int = 0          # > 0: conditioned on a context map [N, this, H', W'] given to every call
    memory: str = "reversible"         # "reversible" | "checkpoint" | "autograd"
    kernels: str = "auto"              # "auto" | "torch" | "triton"
    compile: bool = False              # torch.compile the work inside each flow step (the engine stays eager)
    # Reconstruction check of the reversible engine: at the start of each level the rebuilt input is
    # compared with a copy of one sample kept at forward time (constant memory, one sample per level).
    check_reconstruction: str = "warn"  # "off" | "warn" | "raise"
    reconstruction_tol: float = 1e-3    # relative L2 error above which the check fires

    def __post_init__(self) -> None:
        shape = self.image_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 3:
            raise ValueError(f"GlowConfig.image_shape must be (C, H, W); got {shape!r}")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
            raise TypeError(f"GlowConfig.image_shape must hold ints; got {shape!r}")
        self.image_shape = tuple(shape)
        c, h, w = self.image_shape
        if c < 1:
            raise ValueError(f"GlowConfig.image_shape has an unusable channel count {c}; need at least 1")
        _check_int("levels", self.levels, 1)
        _check_int("depth", self.depth, 1)
        _check_int("hidden", self.hidden, 1)
        _check_int("n_bits", self.n_bits, 1)
        if self.n_bits > 8:
            raise ValueError(f"GlowConfig.n_bits must be between 1 and 8; got {self.n_bits}")
        _check_int("num_classes", self.num_classes, 0)
        _check_int("context_channels", self.context_channels, 0)
        for name in ("learn_top", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GlowConfig.{name} must be a bool; got {type(getattr(self, name)).__name__}")
        factor = 2 ** self.levels
        if h % factor or w % factor or h < factor or w < factor:
            raise ValueError(
                f"GlowConfig.image_shape {self.image_shape}: H and W must be divisible by 2**levels = {factor} "
                f"(levels={self.levels})")
        _check_choice("coupling", self.coupling, COUPLINGS)
        _check_choice("permutation", self.permutation, PERMUTATIONS)
        _check_choice("memory", self.memory, MEMORY_MODES)
        _check_choice("kernels", self.kernels, KERNEL_BACKENDS)
        _check_choice("check_reconstruction", self.check_reconstruction, RECONSTRUCTION_CHECKS)
        if not isinstance(self.reconstruction_tol, (int, float)) or not self.reconstruction_tol > 0:
            raise ValueError(f"GlowConfig.reconstruction_tol must be a positive number; got {self.reconstruction_tol!r}")

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
        check_known_fields(cls, data)
        data = dict(data)
        if "image_shape" in data:
            data["image_shape"] = tuple(data["image_shape"])
        return cls(**data)
