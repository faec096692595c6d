"""The command line's own errors: a problem with what the user asked for, printed as one line (exit status 1);
and running out of memory, told as one line that names the flag that sets the batch."""
from __future__ import annotations

from typing import Optional

import torch

from revglow.errors import RevglowError

__all__ = ["CommandError", "out_of_memory_message"]

# The flag that sets how many images a command holds at once, per command: what to lower when memory runs out.
_BATCH_FLAGS = {"train": "--batch-size", "eval": "--batch-size", "sample": "--batch-size",
                "manipulate": "--batch-size", "interpolate": "--steps", "profile": "--batch-sizes or --budget"}


class CommandError(RevglowError):
    """A problem with what the user asked for; printed as one line, exit status 1."""


def out_of_memory_message(exc: BaseException, command: str) -> Optional[str]:
    """One line for `exc` if it says that the device or the host ran out of memory (None otherwise): torch's
    OutOfMemoryError (CUDA), its CPU allocator's failure (a plain RuntimeError) or Python's MemoryError.

    Example:
        >>> out_of_memory_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "sample")
        'out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); try a smaller --batch-size'
        >>> out_of_memory_message(ValueError("bad"), "sample") is None
        True
    """
    text = str(exc).strip()
    is_oom = (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
              or (isinstance(exc, RuntimeError) and "can't allocate memory" in text))
    if not is_oom:
        return None
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    return f"out of memory ({first}); try a smaller {_BATCH_FLAGS.get(command, '--batch-size')}"
