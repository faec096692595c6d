"""The device a command or a training process runs on.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""
from __future__ import annotations

import torch

from revglow.errors import ConfigError
from revglow.training.distributed import DistributedContext

__all__ = ["resolve_device", "process_device"]


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else must be a device torch knows and has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {name!r} is not a device name (try cpu, cuda or cuda:0)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return device


def process_device(name: str, dist: DistributedContext) -> torch.device:
    """resolve_device(name), and under torch.distributed a plain "cuda" becomes this process's own GPU (one GPU
    per process: cuda:LOCAL_RANK)."""
    device = resolve_device(name)
    if dist.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    return device
