"""Unpickling of data files that admits plain data only: dicts, lists, tuples, strings, bytes, numbers, None
and numpy arrays, the content of the CIFAR-10 "python" batches.

pickle.load runs whatever a file names: a crafted batch file whose `__reduce__` names os.system runs a shell
command as the data loads. `safe_load` uses an Unpickler whose find_class hands out only the few callables
that numpy arrays and scalars are rebuilt with, and refuses every other global with a one-line
UnsafePickleError naming the file and the global, before anything it names is imported or called. The
containers and literals (dict, list, tuple, str, bytes, int, float, bool, None) need no global at all.

The globals admitted, as pickletools shows them in numpy pickles (numpy 1.x writes `numpy.core`, 2.x
`numpy._core`; both are mapped to this numpy's functions, without importing the deprecated `numpy.core`):
    numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype     an array (protocols 0 to 4, and the
                                                                       Python 2 batches of CIFAR-10)
    numpy.core.numeric._frombuffer                                     an array (protocol 5)
    numpy.core.multiarray.scalar                                       a numpy scalar (np.int64(3))
    _codecs.encode, with the latin1 codec only                         bytes written by Python 3 at protocol 2

Example:
    >>> import io, pickle, numpy as np
    >>> data = pickle.dumps({b"data": np.zeros((2, 3), np.uint8), b"labels": [1, 2]}, protocol=2)
    >>> safe_loads(data)[b"labels"]
    [1, 2]
    >>> try:
    ...     safe_loads(pickle.dumps(print))
    ... except UnsafePickleError as exc:
    ...     print(str(exc)[:46])
    <bytes>: refused to unpickle builtins.print: a
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, Tuple, Union

import numpy as np

from revglow.errors import RevglowError

__all__ = ["UnsafePickleError", "SafeUnpickler", "safe_load", "safe_loads", "ALLOWED_GLOBALS"]

_RECONSTRUCT = np.zeros(1).__reduce__()[0]          # numpy's multiarray._reconstruct, whatever its module
_SCALAR = np.int64(1).__reduce__()[0]               # multiarray.scalar
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]       # numeric._frombuffer (protocol 5's array)


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """_codecs.encode as protocol-2 pickles of Python 3 bytes call it (text, "latin1"), and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode is admitted for (str, 'latin1') only; got "
                                     f"({type(text).__name__}, {encoding!r})")
    return codecs.encode(text, "latin1")


ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable] = {}
for _module in ("numpy.core", "numpy._core"):
    ALLOWED_GLOBALS[(f"{_module}.multiarray", "_reconstruct")] = _RECONSTRUCT
    ALLOWED_GLOBALS[(f"{_module}.multiarray", "scalar")] = _SCALAR
    ALLOWED_GLOBALS[(f"{_module}.numeric", "_frombuffer")] = _FROMBUFFER
ALLOWED_GLOBALS[("numpy", "ndarray")] = np.ndarray
ALLOWED_GLOBALS[("numpy", "dtype")] = np.dtype
ALLOWED_GLOBALS[("_codecs", "encode")] = _latin1_encode
del _module


class UnsafePickleError(RevglowError, ValueError):
    """A pickled data file names a global that plain data never needs (it may be crafted to run code)."""


class SafeUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only ALLOWED_GLOBALS; `source` names the file in its error."""

    def __init__(self, file, source: str, encoding: str = "bytes") -> None:
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str) -> Callable:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self.source}: refused to unpickle {module}.{name}: a data file holds only "
                                    f"dicts, lists, strings, numbers and numpy arrays (this one may be crafted "
                                    f"to run code; it was not loaded)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refused a persistent id in the pickle: a data file holds plain "
                                f"data only (it was not loaded)")


def safe_load(path: Union[str, os.PathLike], encoding: str = "bytes") -> Any:
    """Unpickle the file at `path` with SafeUnpickler. `encoding` decodes Python 2 strings: "bytes" (as the
    CIFAR-10 reader uses) keeps them bytes, "latin1" makes them str. Raises UnsafePickleError for a refused
    global; other failures (a truncated file) raise what pickle raises."""
    with open(path, "rb") as handle:
        return SafeUnpickler(handle, str(Path(path)), encoding=encoding).load()


def safe_loads(data: bytes, encoding: str = "bytes", source: str = "<bytes>") -> Any:
    """safe_load of a pickle in memory; `source` names it in errors."""
    return SafeUnpickler(io.BytesIO(data), source, encoding=encoding).load()
