"""One training run per output folder: an exclusive lock on a file inside it, held while the run lives.

Two runs writing one folder destroy each other's work: a second --resume removed the live run's half-written
checkpoint as a "stale" temporary file, and --overwrite beside a live run deleted its checkpoints while it
wrote metrics. `acquire_run_lock` takes an exclusive `fcntl.flock` on OUT/.revglow.lock without waiting; the
holder writes its pid, host and start time into the file so that a refused process can say who holds it. The
operating system drops the lock when the holder's last descriptor closes, so a run killed with SIGKILL leaves
no stale lock behind (the file stays, but an unlocked file locks nothing). revglow never removes the file
(--overwrite leaves it): a lock file deleted by hand while a run holds it no longer excludes a new run.

flock is per open file: two descriptors of one process exclude each other too. Within a process the lock is
therefore shared (counted): a second `acquire_run_lock` of a folder this process holds returns the same lock,
and the file is unlocked when the last holder releases it. A forked child (a DataLoader worker) would share the
open file, and with it the lock, until it exits, so that a run's persistent workers kept its folder locked after
the run had released it: a child closes its copies of the lock descriptors as it starts (os.register_at_fork) and
holds no lock. Where fcntl is missing (Windows) the lock does
nothing. flock on a network file system (NFS) locks only where the server supports it.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with acquire_run_lock(folder) as lock:
    ...     acquire_run_lock(folder).release()         # the same process may take it again
    >>> lock.held
    False
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from revglow.errors import RevglowError

try:
    import fcntl
except ImportError:          # Windows: no flock; the lock does nothing there
    fcntl = None

__all__ = ["LOCK_NAME", "RunLockedError", "RunLock", "acquire_run_lock", "lock_holder"]

LOCK_NAME = ".revglow.lock"
# flock's failures on file systems without locks (some network ones): the run goes on unlocked, with a warning.
_NO_LOCKS = {getattr(errno, name) for name in ("ENOLCK", "EOPNOTSUPP", "ENOTSUP", "ENOSYS") if hasattr(errno, name)}
_HOLDER_BYTES = 4096      # more than a holder line ever takes; a bigger file is not ours to print

# The locks this process holds, by (device, inode) of the lock file: flock would refuse a second descriptor.
_HELD: Dict[Tuple[int, int], "RunLock"] = {}
_HELD_GUARD = threading.Lock()


class RunLockedError(RevglowError, OSError):
    """Another process holds the run folder's lock: a run is writing there now. (An OSError, so that
    DistributedContext.run_on_main hands it to every rank.)"""


def lock_holder(folder: Union[str, os.PathLike]) -> str:
    """Who the lock file of `folder` names as its holder ("pid 123 on host h since ..."), as well as it can tell."""
    path = Path(folder) / LOCK_NAME
    try:
        with open(path, "rb") as handle:
            info = json.loads(handle.read(_HOLDER_BYTES).decode("utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"pid {int(info['pid'])} on host {str(info['host'])[:255]} since {started}"
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError):
        return "a process that has not yet written its pid and host"   # between its lock and its write


class RunLock:
    """An exclusive lock on a run folder (see the module's docstring); `release` it, or use it as a context."""

    def __init__(self, folder: Path, fd: Optional[int], key: Optional[Tuple[int, int]]) -> None:
        self.folder = folder
        self.path = folder / LOCK_NAME
        self._fd = fd
        self._key = key
        self._count = 1

    @property
    def held(self) -> bool:
        return self._count > 0

    def release(self) -> None:
        """Give up this holder's share; the file is unlocked when the process's last holder releases it."""
        with _HELD_GUARD:
            if self._count == 0:
                return
            self._count -= 1
            if self._count:
                return
            _HELD.pop(self._key, None)
            if self._fd is not None:
                os.close(self._fd)        # closing the descriptor drops the flock
                self._fd = None

    def __getstate__(self) -> Dict:
        raise TypeError("a RunLock belongs to the process that took it; it cannot be pickled or sent to another")

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _forget_locks_in_child() -> None:
    """In a forked child: close its copies of this process's lock descriptors (the parent keeps its own) and
    forget the locks, so that they go when the parent releases them or dies, not when its last child does. (The
    guard is new too: another thread of the parent may have held it at the fork.)"""
    global _HELD_GUARD
    _HELD_GUARD = threading.Lock()
    for lock in _HELD.values():
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
            lock._fd = None
        lock._count = 0
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _open_lock_file(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, 0o666)
    except OSError as exc:
        if path.is_symlink():
            raise RunLockedError(f"{path} is a symbolic link; revglow keeps its run lock there as a plain file "
                                 f"(remove the link)") from exc
        raise RunLockedError(f"cannot open the run lock {path}: {exc.strerror or exc}") from exc


def _write_holder(fd: int) -> None:
    """Put this process's pid, host and start time into the lock file (for the message of a refused process)."""
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}) + "\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, line.encode("utf-8"), 0)


def acquire_run_lock(folder: Union[str, os.PathLike]) -> RunLock:
    """Lock `folder` (created if missing) for this process, without waiting; raise RunLockedError naming the
    holder's pid and host when another process holds it. Release it with `RunLock.release` (or a `with` block);
    a process that dies releases it by itself."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if fcntl is None:
        return RunLock(folder, None, None)
    fd = _open_lock_file(path)
    stat = os.fstat(fd)
    key = (stat.st_dev, stat.st_ino)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:               # this process holds it already: share it
            os.close(fd)
            held._count += 1
            return held
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(f"{folder} is in use by another revglow run ({lock_holder(folder)}); wait for it "
                                 f"to finish or stop it, or choose another --out") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                warnings.warn(f"{path}: this file system does not support locks ({exc.strerror}); the run goes on "
                              f"without one, so make sure that no other run writes {folder}", RuntimeWarning,
                              stacklevel=2)
                return RunLock(folder, None, None)
            raise RunLockedError(f"cannot lock {path}: {exc.strerror or exc}") from exc
        lock = RunLock(folder, fd, key)
        _HELD[key] = lock
    try:
        _write_holder(fd)
    except OSError:
        pass          # a full disk: the lock holds all the same, a refused process just cannot name us
    return lock
