"""Images in and out as ordinary PNG/JPEG files (Pillow), and grids of samples.

Tensors here are images in the usual PyTorch layout: one image is [C, H, W], a batch is [N, C, H, W],
with C = 1 (grey) or 3 (RGB). uint8 tensors hold 0..255; float tensors hold [0, 1]. Files are written atomically
(a temporary file beside the target, renamed over it): a full disk or a signal never leaves a partial image.

Example:
    >>> import torch
    >>> grid = make_grid(torch.rand(6, 1, 8, 8), nrow=3)
    >>> tuple(grid.shape), grid.dtype
    ((1, 19, 28), torch.uint8)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from revglow.errors import RevglowError
from revglow.training.checkpoints import atomic_writer

__all__ = [
    "ImageFileError",
    "IMAGE_SUFFIXES",
    "to_uint8",
    "make_grid",
    "save_image",
    "save_grid",
    "load_image",
    "resize_and_center_crop",
    "is_grey_mode",
]

PathLike = Union[str, os.PathLike]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}   # Pillow's name of each, for a temporary file's handle
_GREY_MODES = ("1", "L", "LA", "F")


class ImageFileError(RevglowError, ValueError):
    """An image file revglow cannot read or write: an unsupported type, or not a readable image."""


def is_grey_mode(mode: str) -> bool:
    """Whether images of this PIL mode are read as one grey channel by `load_image` ("I;16", "I" ...: 16-bit)."""
    return mode in _GREY_MODES or mode.startswith("I")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a declared extra
        raise ImportError("revglow.training.images needs Pillow: pip install Pillow") from exc
    return Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 copy of images: floats in [0, 1] are scaled by 255, rounded and clamped; uint8 is returned as is."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"to_uint8 expects a torch.Tensor; got {type(images).__name__}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"to_uint8 expects uint8 or floating-point images; got {images.dtype}")
    return (images.detach().float() * 255.0).round().clamp(0, 255).to(torch.uint8)


def _check_batch(images: torch.Tensor, what: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor; got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what} expects images [N, C, H, W] with C = 1 or 3; got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} got an empty batch of images")


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 1, pad_value: int = 255) -> torch.Tensor:
    """Tile images [N, C, H, W] into one uint8 image [C, H', W'] with `nrow` images per row.

    nrow defaults to ceil(sqrt(N)); images are separated (and framed) by `padding` pixels of `pad_value`.
    """
    _check_batch(images, "make_grid")
    images = to_uint8(images.cpu())
    n, c, h, w = images.shape
    if nrow is None:
        nrow = int(np.ceil(np.sqrt(n)))
    if nrow < 1:
        raise ValueError(f"make_grid: nrow must be >= 1; got {nrow}")
    if padding < 0:
        raise ValueError(f"make_grid: padding must be >= 0; got {padding}")
    ncol = min(nrow, n)
    nrows = (n + nrow - 1) // nrow
    grid = torch.full((c, padding + nrows * (h + padding), padding + ncol * (w + padding)), pad_value, dtype=torch.uint8)
    for i in range(n):
        top = padding + (i // nrow) * (h + padding)
        left = padding + (i % nrow) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def _check_suffix(path: Path) -> None:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageFileError(f"{path}: unsupported image file type {path.suffix!r}; use one of {IMAGE_SUFFIXES}")


def save_image(image: torch.Tensor, path: PathLike, scale: int = 1) -> Path:
    """Write one image [C, H, W] (uint8, or float in [0, 1]) to a PNG or JPEG file chosen by the suffix.

    `scale` > 1 enlarges it by pixel repetition (nearest neighbour), which keeps 8x8 digits legible.
    Parent folders are created. The file appears whole or not at all (on an error, such as a full disk, the
    temporary file is removed and an existing file at `path` is left as it was). Returns the path written.
    """
    path = Path(path)
    _check_suffix(path)
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"save_image expects one image [C, H, W] with C = 1 or 3; got {shape}")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"save_image: scale must be an int >= 1; got {scale!r}")
    array = to_uint8(image.cpu()).permute(1, 2, 0).numpy()
    if scale > 1:
        array = array.repeat(scale, axis=0).repeat(scale, axis=1)
    Image = _pil()
    picture = Image.fromarray(array[:, :, 0], mode="L") if array.shape[2] == 1 else Image.fromarray(array, mode="RGB")
    with atomic_writer(path) as handle:
        picture.save(handle, format=_FORMATS[path.suffix.lower()])
    return path


def save_grid(images: torch.Tensor, path: PathLike, nrow: Optional[int] = None, padding: int = 1,
              scale: Optional[int] = None, min_size: int = 256) -> Path:
    """Tile a batch of images (see `make_grid`) and write it to `path`.

    scale defaults to the smallest integer factor that makes the grid at least `min_size` pixels wide.
    """
    grid = make_grid(images, nrow=nrow, padding=padding)
    if scale is None:
        scale = max(1, int(np.ceil(min_size / grid.shape[2])))
    return save_image(grid, path, scale=scale)


def resize_and_center_crop(picture, height: int, width: int):
    """Resize a PIL image so that it covers height x width (the shorter side fits), then crop the centre."""
    Image = _pil()
    if height < 1 or width < 1:
        raise ValueError(f"resize_and_center_crop: size must be positive; got {height}x{width}")
    src_w, src_h = picture.size
    factor = max(height / src_h, width / src_w)
    new_w, new_h = max(width, round(src_w * factor)), max(height, round(src_h * factor))
    if (new_w, new_h) != (src_w, src_h):
        picture = picture.resize((new_w, new_h), Image.BICUBIC if factor > 1 else Image.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return picture.crop((left, top, left + width, top + height))


def load_image(path: PathLike, size: Optional[Sequence[int]] = None, channels: Optional[int] = None) -> torch.Tensor:
    """Read a PNG/JPEG file as a uint8 tensor [C, H, W].

    channels: 1 (grey) or 3 (RGB); None keeps grey images grey and turns everything else into RGB.
    size: (H, W) to resize (shorter side) and centre-crop to; None keeps the file's size.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    if channels not in (None, 1, 3):
        raise ValueError(f"load_image: channels must be 1, 3 or None; got {channels!r}")
    Image = _pil()
    try:
        with Image.open(path) as opened:
            opened.load()
            picture = opened
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError... for bad files
        raise ImageFileError(f"{path}: not a readable image ({exc})") from exc
    if channels is None:
        channels = 1 if is_grey_mode(picture.mode) else 3
    if picture.mode.startswith("I"):
        # 16-bit greys (PNG opens them as "I;16*" or "I"): the range is fixed by the bit depth, 0..65535, never by
        # the image's own maximum (a dark 16-bit image must stay dark).
        values = np.asarray(picture, dtype=np.float64)
        picture = Image.fromarray(np.clip(values / 65535.0 * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    elif picture.mode == "F":  # float greys: taken as 0..255 like 8-bit ones
        values = np.asarray(picture, dtype=np.float64)
        picture = Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), mode="L")
    picture = picture.convert("L" if channels == 1 else "RGB")
    if size is not None:
        if len(size) != 2:
            raise ValueError(f"load_image: size must be (H, W); got {size!r}")
        picture = resize_and_center_crop(picture, int(size[0]), int(size[1]))
    array = np.asarray(picture, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
