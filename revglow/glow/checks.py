"""The boundary checks of Glow's public calls: images (raw or preprocessed), labels, context maps, latents, sample
requests and initialization, each a clear TypeError/ValueError (RuntimeError: not initialized) that names the call
(`what`, such as "encode"). Glow itself holds the math; every public method checks its arguments here first.

Example:
    >>> from revglow import Glow, GlowConfig
    >>> model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8))
    >>> check_raw_images(torch.zeros(2, 1, 8, 8), model.config, "forward")
    >>> try:
    ...     check_raw_images(torch.zeros(2, 3, 8, 8), model.config, "forward")
    ... except ValueError as exc:
    ...     print(exc)
    Glow.forward: images of shape (3, 8, 8) given to a model of image_shape (1, 8, 8)
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch

from revglow.glow.config import GlowConfig

if TYPE_CHECKING:
    from revglow.glow.model import Glow

__all__ = ["require_initialized", "check_images", "check_raw_images", "check_preprocessed", "check_labels",
           "check_context", "check_inputs", "check_latents", "check_sample_request", "require_class_head"]


def require_initialized(model: Glow, what: str) -> None:
    """A RuntimeError unless every ActNorm of `model` has had its data-dependent initialization."""
    if not model.is_initialized:
        raise RuntimeError(f"Glow.{what}: the model is not initialized; call model.initialize(x) on a batch of "
                           f"data (or run a training forward, model(x)) first")


def check_images(x, config: GlowConfig, what: str) -> None:
    """A tensor [N, C, H, W] of N >= 1 images of the model's image_shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Glow.{what}: images must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"Glow.{what}: images must be 4-D [N, C, H, W]; got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"Glow.{what}: empty batch")
    if tuple(x.shape[1:]) != tuple(config.image_shape):
        raise ValueError(f"Glow.{what}: images of shape {tuple(x.shape[1:])} given to a model of image_shape "
                         f"{tuple(config.image_shape)}")


def check_raw_images(x, config: GlowConfig, what: str) -> None:
    """Images as data: uint8 (0..255), or finite floats in [0, 1]."""
    check_images(x, config, what)
    if x.dtype == torch.uint8:
        return
    if not x.is_floating_point():
        raise TypeError(f"Glow.{what}: images must be uint8 (0..255) or float in [0, 1]; got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"Glow.{what}: images contain NaN or Inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"Glow.{what}: float images must lie in [0, 1]; got values in [{lo:g}, {hi:g}] "
                         f"(pass uint8 for 0..255 data)")


def check_preprocessed(xc, config: GlowConfig, what: str) -> None:
    """Images as the flow takes them (Glow.preprocess): finite floats."""
    check_images(xc, config, what)
    if not xc.is_floating_point():
        raise TypeError(f"Glow.{what}: expects preprocessed float input (see Glow.preprocess); got {xc.dtype}")
    if not torch.isfinite(xc).all():
        raise ValueError(f"Glow.{what}: input contains NaN or Inf")


def check_labels(y, n: int, config: GlowConfig, what: str) -> Optional[torch.Tensor]:
    """Labels for a batch of n: none for an unconditional model, else integers [n] in [0, num_classes); returns
    them as int64 (None for an unconditional model)."""
    k = config.num_classes
    if k == 0:
        if y is not None:
            raise ValueError(f"Glow.{what}: labels y were given to an unconditional model (num_classes=0)")
        return None
    if y is None:
        raise ValueError(f"Glow.{what}: this model is class-conditional (num_classes={k}); pass labels y")
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"Glow.{what}: labels y must be an integer tensor; got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"Glow.{what}: labels y must have shape [{n}]; got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
        raise ValueError(f"Glow.{what}: labels y must lie in [0, {k - 1}]; got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    return y.long()


def check_context(context, n: int, config: GlowConfig, what: str) -> Optional[torch.Tensor]:
    """A conditioning map for a batch of n: none for a model without conditioning, else floats [n,
    context_channels, H, W] (any H, W: the model resizes it per level)."""
    k = config.context_channels
    if k == 0:
        if context is not None:
            raise ValueError(f"Glow.{what}: a context was given to a model without conditioning "
                             f"(GlowConfig.context_channels=0)")
        return None
    if context is None:
        raise ValueError(f"Glow.{what}: this model is conditioned on a context map (context_channels={k}); "
                         f"pass context=[N, {k}, H, W]")
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"Glow.{what}: context must be a torch.Tensor; got {type(context).__name__}")
    if not context.is_floating_point():
        raise TypeError(f"Glow.{what}: context must be a floating-point tensor; got dtype {context.dtype}")
    if context.dim() != 4 or context.shape[0] != n or context.shape[1] != k:
        raise ValueError(f"Glow.{what}: context must have shape [{n}, {k}, H, W]; got {tuple(context.shape)}")
    return context


def check_inputs(model: Glow, what: str, images=None, raw: bool = False, y=None, context=None, n: Optional[int] = None,
                 initialized: bool = True, labels: bool = True) -> Tuple[Optional[torch.Tensor], ...]:
    """Every check of a public call, in one place: the images (raw: uint8 or float in [0, 1]; else preprocessed
    floats), then labels (unless the call takes none: `labels` False) and context for a batch of n (default: the
    images'), then that the model is initialized. Returns (y, context) as the model uses them."""
    config = model.config
    if images is not None:
        (check_raw_images if raw else check_preprocessed)(images, config, what)
        n = images.shape[0]
    y = check_labels(y, n, config, what) if labels else None
    context = check_context(context, n, config, what)
    if initialized:
        require_initialized(model, what)
    return y, context


def check_latents(latents, latent_shapes: Sequence[Tuple[int, int, int]]) -> int:
    """Glow.decode's latents: a list with one tensor [N, C, H, W] per level, of the levels' latent shapes; returns
    N."""
    if not isinstance(latents, (list, tuple)) or len(latents) != len(latent_shapes):
        raise ValueError(f"Glow.decode: expects a list of {len(latent_shapes)} latents (one per level)")
    n = latents[0].shape[0]
    for i, (eps, shape) in enumerate(zip(latents, latent_shapes)):
        if not isinstance(eps, torch.Tensor) or tuple(eps.shape) != (n,) + tuple(shape):
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"Glow.decode: latent {i} must have shape [N, {shape[0]}, {shape[1]}, {shape[2]}]; "
                             f"got {got}")
    return n


def check_sample_request(n, temperature) -> None:
    """Glow.sample's n (a positive int) and temperature (a finite number >= 0)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Glow.sample: n must be a positive int; got {n!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"Glow.sample: temperature must be a finite number >= 0; got {temperature!r}")


def require_class_head(model: Glow) -> None:
    """A ValueError unless `model` has a class head (Glow.predict_class)."""
    if model.class_head is None:
        raise ValueError("Glow.predict_class: this model has no class head (it needs num_classes > 0 and "
                         "class_head=True)")
