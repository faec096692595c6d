"""The boundary checks of Glow's public calls: images (raw or preprocessed), labels, context maps, latents, sample
requests and initialization, each a clear TypeError/ValueError (RuntimeError: not initialized) that names the call
(`what`, such as "encode"). Glow itself holds the math; every public method checks its arguments here first.
Floating-point input of another dtype than the model's is computed in the model's dtype, as `model(x)` does.

A Glow's state dict carries its configuration (`register_config_check`): loading it into a Glow of another
configuration is refused (`ConfigMismatchError`), naming the options that differ.

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
import numbers
from dataclasses import fields
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch

from revglow.errors import RevglowError
from revglow.glow.config import RUNTIME_OPTIONS, GlowConfig

if TYPE_CHECKING:
    from revglow.glow.model import Glow

__all__ = ["require_initialized", "check_images", "check_raw_images", "check_preprocessed", "check_labels",
           "check_context", "check_inputs", "check_latents", "check_sample_request", "require_class_head",
           "ConfigMismatchError", "register_config_check"]



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
    images'), then that the model is initialized. Returns (images, y, context) as the model uses them: preprocessed
    images in the model's dtype (raw ones as given: Glow.quantize converts them)."""
    config = model.config
    if images is not None:
        (check_raw_images if raw else check_preprocessed)(images, config, what)
        n = images.shape[0]
        if not raw:
            images = images.to(_model_dtype(model))
    y = check_labels(y, n, config, what) if labels else None
    context = check_context(context, n, config, what)
    if initialized:
        require_initialized(model, what)
    return images, y, context


def _model_dtype(model: Glow) -> torch.dtype:
    return next(model.parameters()).dtype


def check_latents(latents, model: Glow) -> List[torch.Tensor]:
    """Glow.decode's latents: a list with one floating-point tensor [N, C, H, W] per level, of the levels' latent
    shapes (model.latent_shapes); returns them in the model's dtype."""
    shapes = model.latent_shapes
    if not isinstance(latents, (list, tuple)) or len(latents) != len(shapes):
        raise ValueError(f"Glow.decode: expects a list of {len(shapes)} latents (one per level)")
    n = latents[0].shape[0] if isinstance(latents[0], torch.Tensor) else None
    for i, (eps, shape) in enumerate(zip(latents, shapes)):
        if not isinstance(eps, torch.Tensor) or tuple(eps.shape) != (n,) + tuple(shape):
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"Glow.decode: latent {i} must have shape [N, {shape[0]}, {shape[1]}, {shape[2]}]; "
                             f"got {got}")
        if not eps.is_floating_point():
            raise TypeError(f"Glow.decode: latent {i} must be a floating-point tensor; got dtype {eps.dtype}")
    dtype = _model_dtype(model)
    return [eps.to(dtype) for eps in latents]


def check_sample_request(n, temperature, y, device: torch.device):
    """Glow.sample's n (a positive int), temperature (a finite number >= 0) and labels `y`: None, a tensor (checked
    with the images' labels), or one int label for all n images (returned as a tensor [n])."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Glow.sample: n must be a positive int; got {n!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise ValueError(f"Glow.sample: temperature must be a finite number >= 0; got {temperature!r}")
    if y is None or isinstance(y, torch.Tensor):
        return y
    if isinstance(y, bool) or not isinstance(y, numbers.Integral):
        raise TypeError(f"Glow.sample: y must be an int label or an integer tensor of n labels; got {y!r}")
    return torch.full((n,), int(y), dtype=torch.long, device=device)


def require_class_head(model: Glow) -> None:
    """A ValueError unless `model` has a class head (Glow.predict_class)."""
    if model.class_head is None:
        raise ValueError("Glow.predict_class: this model has no class head (it needs num_classes > 0 and "
                         "class_head=True)")


class ConfigMismatchError(RevglowError, RuntimeError):
    """A state dict of a Glow of one configuration loaded into a Glow of another (a RuntimeError, as torch's own
    load_state_dict errors are). `stored` and `expected` name the options that differ with their values in the
    state dict and in the model, such as "n_bits=4"."""

    def __init__(self, stored: str, expected: str) -> None:
        self.stored, self.expected = stored, expected
        super().__init__(f"Glow.load_state_dict: the state dict is of a Glow with {stored}; this one has {expected} "
                         f"(build the model from the configuration it was trained with; to load the tensors anyway, "
                         f"pass dict(state_dict), which carries no configuration)")


def register_config_check(model: Glow) -> None:
    """Make `model`'s state dicts carry its configuration (in the state dict's metadata, which torch.save keeps
    and no tensor loop sees) and refuse, in `model.load_state_dict(state)`, a state dict whose configuration differs
    but for RUNTIME_OPTIONS, naming the options, before any tensor is copied (strict=False too: torch hands the hook
    no strictness). A state dict without it (made before, or copied into a plain dict) loads as before: torch then
    checks the names and shapes alone.

    Example:
        >>> from revglow import Glow, GlowConfig
        >>> four = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=1, hidden=4, n_bits=4))
        >>> five = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=1, hidden=4, n_bits=5))
        >>> try:
        ...     five.load_state_dict(four.state_dict())
        ... except ConfigMismatchError as exc:
        ...     print(exc)
        Glow.load_state_dict: the state dict is of a Glow with n_bits=4; this one has n_bits=5 (build the model from the configuration it was trained with; to load the tensors anyway, pass dict(state_dict), which carries no \
configuration)
    """
    model.register_state_dict_post_hook(_store_config)
    model.register_load_state_dict_pre_hook(_check_stored_config)


def _store_config(model, state_dict, prefix: str, local_metadata: dict) -> None:
    local_metadata["glow_config"] = model.config.to_dict()


def _check_stored_config(model, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    saved = local_metadata.get("glow_config")
    if not isinstance(saved, dict):
        return
    try:
        saved = GlowConfig.from_dict(saved)
    except (ValueError, TypeError):    # not a configuration this version reads: torch's checks alone decide
        return
    differ = [f.name for f in fields(GlowConfig)
              if f.name not in RUNTIME_OPTIONS and getattr(saved, f.name) != getattr(model.config, f.name)]
    if differ:
        raise ConfigMismatchError(_options(saved, differ), _options(model.config, differ))


def _options(config: GlowConfig, names: Sequence[str]) -> str:
    return ", ".join(f"{name}={getattr(config, name)!r}" for name in names)
