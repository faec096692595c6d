"""`in_pristine_process(fn, *args)`: fn(*args) in a process that has done no tensor work, for measurements of the
resident set whose numbers a test checks.

A forked pytest worker is not enough for those: glibc serves a new allocation from the free chunks its heap
already holds before it considers mmap, so a child inherits the worker's freed blocks, reuses them, and its peak
resident set runs up to a few MiB above what it allocates (seen: +1.7 MiB on a 19 MiB convolution, in 1 suite run
of 6). A multiprocessing forkserver is a fresh interpreter that imports torch and revglow once and does nothing
else; each call forks a child from it, whose heap is as clean as a fresh `revglow profile` process's. `fn` must be
a module-level function (it is pickled by name); its result comes back pickled. The child runs one thread, as the
suite does (tests/conftest.py).
"""
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["torch", "revglow", "revglow.profile", "revglow.op_workspace"])


def _one_thread_then(fn, args, kwargs):
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return fn(*args, **kwargs)


def in_pristine_process(fn, *args, **kwargs):
    with ProcessPoolExecutor(max_workers=1, mp_context=_context) as pool:
        return pool.submit(_one_thread_then, fn, args, kwargs).result(timeout=300)
