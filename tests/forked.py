"""Forked children of the pytest worker: `@forked` runs a test in one, `run_forked(main)` a program.

`@forked` is for tests that measure the process's resident set.

revglow.memory.device_meters.ResidentSet tells glibc to map and unmap every block above 64 KiB for the rest of the process
(it must: with larger thresholds freed blocks stay in glibc's heap, are reused, and the resident set no longer
follows live memory). In a pytest worker that would make every later test's large allocations system calls and
fresh pages (a training step about 20% slower). A forked child inherits the worker's imports, so it starts at
once, and takes the setting with it when it exits. The whole test runs in the child (fixtures such as capsys and
tmp_path, made before the fork, work there); its exception comes back through a pipe and is raised again here.

`run_forked(main, timeout)` runs `main()` as a program of its own in a forked child, for a program that would
otherwise need a fresh interpreter (seconds of importing torch): its output goes to a file, not to this test's
capture; it holds none of the worker's other file descriptors (pytest-xdist's worker talks to its controller
through inherited ones); `main()`'s int is its exit status. Returns (exit status, output).
"""
import functools
import os
import pickle
import signal
import sys
import tempfile
import time
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


def run_forked(main, timeout: float):
    """(exit status, output) of `main()` run as a program in a forked child (see the module docstring); a child
    still running after `timeout` seconds is killed and TimeoutError raised."""
    with tempfile.TemporaryFile() as output:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            status = 99
            try:
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
                os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
                os.closerange(3, os.sysconf("SC_OPEN_MAX"))
                sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__   # past the test's output capture
                status = int(main())
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        deadline = time.monotonic() + timeout
        while True:
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"the forked program ran for more than {timeout} s")
            time.sleep(0.05)
        output.seek(0)
        return os.waitstatus_to_exitcode(wait_status), output.read().decode(errors="replace")
