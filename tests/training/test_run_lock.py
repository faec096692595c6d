"""The run folder's lock: one process at a time, the holder named when refused, gone with a killed holder."""
import os
import signal
import socket

import pytest

from revglow.training.checkpoints import save_checkpoint
from revglow.training.run_folder import check_out_folder, open_run_folder
from revglow.training import run_lock
from revglow.training.run_lock import LOCK_NAME, RunLockedError, acquire_run_lock


def _as_another_process():
    """In a forked child: forget the parent's locks, whose descriptors the child shares (a forked child holds the
    parent's flock with them, as a DataLoader worker does), so that it asks for the lock as any other process."""
    run_lock._HELD.clear()


class _Holder:
    """A forked child that takes the lock of `folder` and waits to be killed (a run in progress elsewhere)."""

    def __init__(self, folder):
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(read_end)
                _as_another_process()
                acquire_run_lock(folder)
                os.write(write_end, b"locked")
                while True:
                    signal.pause()
            finally:
                os._exit(1)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as reader:
            assert reader.read(6) == b"locked"

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


@pytest.fixture
def holder(tmp_path):
    held = []

    def start(folder):
        held.append(_Holder(folder))
        return held[-1]

    yield start
    for child in held:
        try:
            child.kill()
        except (ProcessLookupError, ChildProcessError):
            pass


def test_a_second_process_is_refused_naming_the_holder_until_it_is_killed(tmp_path, holder):
    child = holder(tmp_path / "run")
    with pytest.raises(RunLockedError) as caught:
        acquire_run_lock(tmp_path / "run")
    message = str(caught.value)
    assert f"pid {child.pid} on host {socket.gethostname()}" in message and "\n" not in message
    assert str(tmp_path / "run") in message
    child.kill()                                           # SIGKILL: the OS drops the flock with the process
    with acquire_run_lock(tmp_path / "run") as lock:
        assert lock.held
        assert f'"pid": {os.getpid()}' in (tmp_path / "run" / LOCK_NAME).read_text()
    assert not lock.held


def test_the_lock_is_shared_within_a_process(tmp_path, holder):
    first = acquire_run_lock(tmp_path)
    second = acquire_run_lock(tmp_path)
    assert second is first
    first.release()
    pid = os.fork()
    if pid == 0:            # another process is still refused while one share is held here
        try:
            _as_another_process()
            acquire_run_lock(tmp_path)
            os._exit(3)
        except RunLockedError:
            os._exit(0)
        except BaseException:
            os._exit(4)
    assert os.waitpid(pid, 0)[1] == 0
    second.release()
    second.release()                                       # a release too many does nothing
    child = holder(tmp_path)                               # free: another process takes it
    with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
        acquire_run_lock(tmp_path)


def test_a_symlinked_lock_file_is_refused(tmp_path):
    target = tmp_path / "target"
    target.write_text("not a lock")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).symlink_to(target)
    with pytest.raises(RunLockedError, match="is a symbolic link"):
        acquire_run_lock(tmp_path / "run")
    assert target.read_text() == "not a lock"


def test_the_lock_file_marks_no_run(tmp_path):
    with acquire_run_lock(tmp_path):
        check_out_folder(tmp_path, overwrite=False)        # a folder holding only the lock file is empty


def test_overwrite_beside_a_live_run_touches_nothing(tmp_path, holder):
    run = tmp_path / "run"
    save_checkpoint({"step": 4}, run / "checkpoint.pt")
    save_checkpoint({"step": 4}, run / "checkpoint-00000004.pt")
    (run / "metrics.jsonl").write_text('{"step": 4}\n')
    (run / ".checkpoint.pt.0badc0de.tmp").write_bytes(b"the live run's checkpoint, half written")
    child = holder(run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunLockedError, match=f"in use by another revglow run \\(pid {child.pid}"):
        open_run_folder(run, overwrite=True)
    with pytest.raises(RunLockedError):
        open_run_folder(run, overwrite=False, resume_state={"step": 4}, resume_source=run / "checkpoint.pt")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="does not support locks"):
        lock = acquire_run_lock(tmp_path)
    lock.release()


def test_a_lock_is_no_data_for_other_processes(tmp_path):
    import pickle

    with acquire_run_lock(tmp_path) as lock:
        with pytest.raises(TypeError, match="belongs to the process"):
            pickle.dumps(lock)
    assert issubclass(RunLockedError, OSError)          # DistributedContext.run_on_main hands OSErrors to every rank
