"""`@forked`: run a test in a forked child of the pytest worker, for tests that measure the process's resident set.

revglow.device_peak.ResidentSet tells glibc to map and unmap every block above 64 KiB for the rest of the process
(it must: with larger thresholds freed blocks stay in glibc's heap, are reused, and the resident set no longer
follows live memory). In a pytest worker that would make every later test's large allocations system calls and
fresh pages (a training step about 20% slower). A forked child inherits the worker's imports, so it starts at
once, and takes the setting with it when it exits. The whole test runs in the child (fixtures such as capsys and
tmp_path, made before the fork, work there); its exception comes back through a pipe and is raised again here.
"""
import functools
import os
import pickle
import sys
import traceback


def forked(test):
    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:   # the child: run, send the outcome, leave without the parent's exit handlers
            try:
                os.close(read_end)
                try:
                    test(*args, **kwargs)
                    outcome = None
                except BaseException as exc:   # every failure goes back to the parent
                    outcome = exc
                    try:
                        pickle.dumps(exc)
                    except Exception:
                        outcome = RuntimeError("".join(traceback.format_exception(exc)))
                with os.fdopen(write_end, "wb") as pipe:
                    pickle.dump(("done", outcome), pipe)
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not data:
            raise RuntimeError(f"the forked test process ended without a result (wait status {status})")
        _, exc = pickle.loads(data)
        if exc is not None:
            raise exc

    return wrapper
