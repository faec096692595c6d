"""`in_pristine_process(fn, *args)`: fn(*args) in a process with a fresh interpreter's heap, for measurements of
the resident set whose numbers a test checks.

A forked pytest worker is not enough for those: glibc serves a new allocation from the free chunks its heap
already holds before it considers mmap, so a forked child inherits the worker's freed blocks, reuses them, and
its peak resident set runs up to a few MiB above what it allocates (seen: +1.7 MiB on a 19 MiB convolution, in 1
suite run of 6). A fresh interpreter's heap is as clean as a `revglow profile` process's, but starting one costs
about 2 s of CPU (importing torch).

So each pytest process starts one fresh interpreter, the zygote, on its first call: it imports torch and revglow
and then only waits. Each call forks it (tests/forked.py's run_forked), and the forked child runs fn. The zygote
never runs a measurement, so every child starts from the heap of a fresh interpreter that has imported what fn
needs, as a measuring process of its own would. The zygote is single-threaded, so no child inherits a lock that
another thread held. (A multiprocessing forkserver is the same idea, but its pool deadlocked in 1 suite run of 3
under pytest-xdist.)

`fn` must be a module-level function of a module on sys.path (it is named, not pickled); its arguments and result
go through pickle. The child runs one thread, as the suite does (tests/conftest.py), with torch seeded to 0.
"""
import atexit
import os
import pickle
import select
import signal
import subprocess
import sys
import tempfile

_ZYGOTE = r"""
import pickle, sys
sys.path[:0] = pickle.loads(bytes.fromhex(sys.argv[1]))
import torch
torch.set_num_threads(1)
import revglow  # noqa: F401  (what every measurement imports, once, before any fork)
from forked import run_forked


def measure(module, name, args, kwargs, result_path):
    torch.manual_seed(0)
    result = getattr(sys.modules[module], name)(*args, **kwargs)
    with open(result_path, "wb") as f:
        pickle.dump(result, f)
    return 0


requests, replies = sys.stdin.buffer, sys.stdout
while True:
    header = requests.read(8)
    if len(header) < 8:          # the pytest process has gone: so does the zygote
        break
    module, name, args, kwargs, result_path, log_path, timeout = pickle.loads(
        requests.read(int.from_bytes(header, "little")))
    __import__(module)           # kept in the zygote: the next child of the same module starts with it
    try:
        status, log = run_forked(lambda: measure(module, name, args, kwargs, result_path), timeout)
    except TimeoutError as exc:
        status, log = "timeout", str(exc)
    with open(log_path, "w") as f:
        f.write(log)
    replies.write(f"{status}\n")
    replies.flush()
"""

_zygote = None


def _start_zygote():
    tests = os.path.dirname(os.path.abspath(__file__))
    # the helpers in tests/, revglow in the checkout, and each test folder (a measured function's module lives there)
    paths = [tests, os.path.dirname(tests)] + sorted(entry.path for entry in os.scandir(tests) if entry.is_dir())
    errors = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-c", _ZYGOTE, pickle.dumps(paths).hex()], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
    process.errors = errors
    atexit.register(_stop, process)
    return process


def _stop(process):
    if process.poll() is None:
        try:
            process.stdin.close()          # the zygote reads the end of its input and leaves
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _zygote_errors(process) -> str:
    process.errors.seek(0)
    return process.errors.read().decode(errors="replace")[-4000:]


def in_pristine_process(fn, *args, timeout=300, **kwargs):
    global _zygote
    if _zygote is None or _zygote.poll() is not None:
        _zygote = _start_zygote()
    zygote = _zygote
    with tempfile.TemporaryDirectory() as folder:
        result_path, log_path = os.path.join(folder, "result.pickle"), os.path.join(folder, "log.txt")
        request = pickle.dumps((fn.__module__, fn.__name__, args, kwargs, result_path, log_path, timeout))
        try:
            zygote.stdin.write(len(request).to_bytes(8, "little") + request)
            zygote.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(f"the zygote process has died:\n{_zygote_errors(zygote)}") from None
        ready, _, _ = select.select([zygote.stdout], [], [], timeout + 30)
        if not ready:                      # the zygote itself hangs: end it and its child (one process group)
            os.killpg(zygote.pid, signal.SIGKILL)
            zygote.wait()
            raise TimeoutError(f"the zygote did not answer within {timeout + 30} s")
        reply = zygote.stdout.readline().decode().strip()
        if not reply:
            raise RuntimeError(f"the zygote process has died:\n{_zygote_errors(zygote)}")
        log = open(log_path, errors="replace").read() if os.path.exists(log_path) else ""
        if reply == "timeout":
            raise TimeoutError(log)
        if reply != "0" or not os.path.exists(result_path):
            raise RuntimeError(f"the measuring process failed (exit status {reply}):\n{log[-4000:]}")
        with open(result_path, "rb") as f:
            return pickle.load(f)
