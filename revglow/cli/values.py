"""Types of the command line's own flag values: each reads the text and refuses what the command cannot use with
argparse's usage error (one `revglow CMD: error: argument --FLAG: ...` line after the usage, exit status 2), before
anything is loaded.

Example:
    >>> parser = argparse.ArgumentParser(prog="revglow sample")
    >>> _ = parser.add_argument("--nrow", type=positive_int)
    >>> parser.parse_args(["--nrow", "8"]).nrow
    8
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be an int >= 1; got '0'
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Tuple

import torch

__all__ = ["int_at_least", "positive_int", "nonnegative_int", "finite_nonnegative_float", "device_name", "input_shape",
           "DEVICE_TYPES"]

# The devices revglow's commands run on ("auto": cuda when available, else cpu).
DEVICE_TYPES = ("cpu", "cuda")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """The type of a flag whose value is an int >= `minimum`."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}; got {text!r}")
        return value
    convert.__name__ = f"int_at_least_{minimum}"
    return convert


positive_int = int_at_least(1)      # counts of images, batch sizes, threads
nonnegative_int = int_at_least(0)   # worker processes (0: load in the main process)


def finite_nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a sampling temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0; got {text!r}")
    return value


def device_name(text: str) -> str:
    """auto, cpu, cuda or cuda:N: a device revglow runs on (whether this machine has it is checked when the
    command runs: a missing GPU is not a usage error)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device revglow runs on; choose auto, cpu, cuda or "
                                         f"cuda:N")
    return text


def input_shape(text: str) -> Tuple[int, ...]:
    """Comma-separated positive ints, such as 8,3,32,32: the shape of an example input, batch first."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) < 2 or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"must be comma-separated positive sizes, batch first (such as 8,3,32,32); "
                                         f"got {text!r}")
    return shape
