"""`in_pristine_process(fn, *args)`: fn(*args) in a fresh Python process, for measurements of the resident set
whose numbers a test checks.

A forked pytest worker is not enough for those: glibc serves a new allocation from the free chunks its heap
already holds before it considers mmap, so a forked child inherits the worker's freed blocks, reuses them, and
its peak resident set runs up to a few MiB above what it allocates (seen: +1.7 MiB on a 19 MiB convolution, in 1
suite run of 6). A fresh interpreter's heap is as clean as a `revglow profile` process's. (A multiprocessing
forkserver would start faster, but its pool deadlocked in 1 suite run of 3 under pytest-xdist.) `fn` must be a
module-level function of a module on sys.path (it is named, not pickled); its arguments and result go through
pickle. The child runs one thread, as the suite does (tests/conftest.py).
"""
import os
import pickle
import subprocess
import sys

_CHILD = r"""
import os, pickle, sys
sys.path[:0] = pickle.loads(bytes.fromhex(sys.argv[1]))
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
module, name, args, kwargs = pickle.loads(sys.stdin.buffer.read())
fn = getattr(__import__(module, fromlist=[name]), name)
result = fn(*args, **kwargs)
sys.stdout.flush()
os.write(1, b"\n--pristine-result--\n" + pickle.dumps(result))
"""


def in_pristine_process(fn, *args, timeout=300, **kwargs):
    tests = os.path.dirname(os.path.abspath(__file__))
    paths = [tests, os.path.dirname(tests)]
    done = subprocess.run([sys.executable, "-c", _CHILD, pickle.dumps(paths).hex()],
                          input=pickle.dumps((fn.__module__, fn.__name__, args, kwargs)), capture_output=True,
                          timeout=timeout)
    marker = b"\n--pristine-result--\n"
    if done.returncode != 0 or marker not in done.stdout:
        raise RuntimeError(f"the measuring process failed (exit {done.returncode}):\n"
                           f"{done.stderr.decode(errors='replace')[-4000:]}")
    return pickle.loads(done.stdout.split(marker, 1)[1])
