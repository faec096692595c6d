"""metrics.jsonl: appended during a run, trimmed on resume by an atomic rename, never written through a link."""
import json
import os

import pytest

import revglow.training.checkpoints as checkpoint_module
from revglow.training.metrics import METRICS_NAME, MetricsFileError, MetricsLog, trim_metrics_file


def _rows(*steps):
    return "".join(json.dumps({"step": s, "bpd": 1.0 / s}) + "\n" for s in steps)


def test_resume_drops_the_rows_after_its_step_and_torn_lines(tmp_path):
    path = tmp_path / METRICS_NAME
    path.write_text(_rows(1, 2, 3) + '{"step": 2, "test_bpd": 5.0}\n' + _rows(4, 5) + "[1, 2]\n" + '{"step": 6, "bp')
    log = MetricsLog(tmp_path, resume_step=3)
    log.write({"step": 4, "bpd": 0.5})
    log.close()
    assert path.read_text() == _rows(1, 2, 3) + '{"step": 2, "test_bpd": 5.0}\n' + '{"step": 4, "bpd": 0.5}\n'


def test_a_file_with_nothing_to_drop_is_not_rewritten(tmp_path):
    path = tmp_path / METRICS_NAME
    path.write_text(_rows(1, 2))
    inode = path.stat().st_ino
    assert trim_metrics_file(path, 5) == 0
    assert path.stat().st_ino == inode
    path.write_text(_rows(1, 2) + '{"step": 2}')                 # whole, but its newline was never written
    assert trim_metrics_file(path, 5) == 0 and path.read_text() == _rows(1, 2) + '{"step": 2}\n'


def test_a_kill_during_the_trim_keeps_every_row(tmp_path, monkeypatch):
    path = tmp_path / METRICS_NAME
    original = _rows(1, 2, 3, 4)
    path.write_text(original)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(tmp_path, resume_step=2)
    monkeypatch.undo()
    assert path.read_text() == original
    assert os.listdir(tmp_path) == [METRICS_NAME]                # the new file was removed too


def test_rows_are_appended_not_rewritten(tmp_path):
    log = MetricsLog(tmp_path, resume_step=None)
    log.write({"step": 1})
    inode = (tmp_path / METRICS_NAME).stat().st_ino
    with (tmp_path / METRICS_NAME).open("a") as other:
        other.write('{"step": 1, "note": "from elsewhere"}\n')
    log.write({"step": 2})
    log.close()
    assert (tmp_path / METRICS_NAME).stat().st_ino == inode
    assert [json.loads(line)["step"] for line in (tmp_path / METRICS_NAME).read_text().splitlines()] == [1, 1, 2]


def test_a_symlinked_metrics_file_is_refused_on_resume(tmp_path):
    """The choice made: refuse (one line) rather than replace the link; the link's target is never written."""
    target = tmp_path / "shared.jsonl"
    target.write_text(_rows(1, 2, 3, 4))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / METRICS_NAME).symlink_to(target)
    for step in (2, 10):                                         # rows to drop, and none
        with pytest.raises(MetricsFileError, match="metrics.jsonl is a symbolic link") as caught:
            MetricsLog(tmp_path / "run", resume_step=step)
        assert "\n" not in str(caught.value)
    assert target.read_text() == _rows(1, 2, 3, 4)
    assert (tmp_path / "run" / METRICS_NAME).is_symlink()


def test_a_fresh_run_removes_a_symlink_never_its_target(tmp_path):
    target = tmp_path / "shared.jsonl"
    target.write_text(_rows(1, 2))
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / METRICS_NAME
    link.symlink_to(target)
    log = MetricsLog(tmp_path / "run", resume_step=None)
    log.write({"step": 1})
    log.close()
    assert not link.is_symlink() and link.read_text() == '{"step": 1}\n'
    assert target.read_text() == _rows(1, 2)
    link.unlink()
    link.symlink_to(tmp_path / "dangling.jsonl")                 # a link to nothing: nothing is created there
    MetricsLog(tmp_path / "run", resume_step=None).close()
    assert not (tmp_path / "dangling.jsonl").exists() and link.is_file() and not link.is_symlink()


def test_metrics_file_mode_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        MetricsLog(tmp_path, resume_step=None).close()
        (tmp_path / METRICS_NAME).write_text(_rows(1, 2, 3))
        os.chmod(tmp_path / METRICS_NAME, 0o666 & ~0o027)
        MetricsLog(tmp_path, resume_step=1).close()          # the trimmed file, a new one, too
    finally:
        os.umask(previous)
    assert (tmp_path / METRICS_NAME).stat().st_mode & 0o777 == 0o640
