"""The run folder: its run id, resumes refused into another run's folder, the folder of a checkpoint found from
where it lies, and a checkpoint.pt at every moment of setting an abandoned branch aside."""
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from revglow.training.checkpoints import load_checkpoint, save_checkpoint, step_checkpoint_path
from revglow.training.run_folder import (RUN_INFO_NAME, RunExistsError, RunMismatchError, check_resume_folder,
                                         new_run_id, open_run_folder, read_run_id, resume_out_folder,
                                         set_aside_newer_checkpoints, write_run_info)


def _run(folder, steps=(2, 4), run_id="new", train_out=None):
    """A run folder as the trainer leaves it: run.json (unless run_id is None: one from before run ids),
    checkpoint-STEP.pt for each step, checkpoint.pt of the last, metrics.jsonl. Returns the run id."""
    run_id = new_run_id() if run_id == "new" else run_id
    folder.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        write_run_info(folder, run_id)
    for step in steps:
        state = {"step": step, "model": {"w": torch.full((2,), float(step))},
                 "train_config": {"out": str(train_out if train_out is not None else folder)}}
        if run_id is not None:
            state["run_id"] = run_id
        save_checkpoint(state, step_checkpoint_path(folder, step))
        save_checkpoint(state, folder / "checkpoint.pt")
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, steps[-1] + 1)))
    return run_id


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _open(out, checkpoint=None, overwrite=False):
    state = load_checkpoint(checkpoint) if checkpoint is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)        # the set-aside note
        return open_run_folder(out, overwrite, resume_state=state, resume_source=checkpoint)


def test_a_fresh_run_gets_a_run_id_in_run_json(tmp_path):
    with _open(tmp_path / "run") as folder:
        info = json.loads((tmp_path / "run" / RUN_INFO_NAME).read_text())
        assert info["run_id"] == folder.run_id == read_run_id(tmp_path / "run") and len(folder.run_id) == 32
        assert "created" in info
    with pytest.raises(RunExistsError, match="not empty"):
        _open(tmp_path / "run")                               # run.json marks the folder as holding a run
    with _open(tmp_path / "run", overwrite=True) as again:
        assert again.run_id != folder.run_id == info["run_id"]
        assert read_run_id(tmp_path / "run") == again.run_id
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".revglow.lock", RUN_INFO_NAME]


def test_resume_into_another_runs_folder_is_refused_touching_nothing(tmp_path):
    """The report's case: `revglow train --resume A/checkpoint-00000002.pt --out B` pruned and overwrote B."""
    a, b = tmp_path / "A", tmp_path / "B"
    _run(a, steps=(2, 4))
    _run(b, steps=(10, 20, 30))
    before = _snapshot(b), _snapshot(a)
    source = a / "checkpoint-00000002.pt"
    with pytest.raises(RunMismatchError, match=r"B holds another run \(run [0-9a-f]{32}\) than the checkpoint "
                                               r".*A/checkpoint-00000002.pt \(run [0-9a-f]{32}\).*Nothing was changed"):
        _open(b, source)
    with pytest.raises(RunMismatchError):
        resume_out_folder(source, load_checkpoint(source), out=b)
    assert (_snapshot(b), _snapshot(a)) == before            # not even a lock file


def test_a_legacy_checkpoint_into_another_legacy_folder_is_refused(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    _run(a, run_id=None)
    _run(b, steps=(10,), run_id=None)
    before = _snapshot(b)
    with pytest.raises(RunMismatchError, match=r"a run from before run ids.*\(no run id\)"):
        _open(b, a / "checkpoint.pt")
    assert _snapshot(b) == before


def test_resume_continues_the_folders_own_run(tmp_path):
    run = tmp_path / "run"
    run_id = _run(run, steps=(2, 4))
    with _open(run, run / "checkpoint.pt") as folder:
        assert folder.run_id == run_id
    with _open(run, run / "checkpoint-00000002.pt") as folder:      # an older one: the newer are set aside
        assert folder.run_id == run_id
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert load_checkpoint(run / "abandoned-after-step-00000002" / "checkpoint.pt")["step"] == 4
    with _open(run, run / "abandoned-after-step-00000002" / "checkpoint-00000004.pt") as folder:
        assert folder.run_id == run_id                              # the abandoned branch is still this run


def test_a_checkpoint_resumed_into_a_new_folder_starts_a_run_of_its_own(tmp_path):
    a = tmp_path / "A"
    a_id = _run(a)
    with _open(tmp_path / "B", a / "checkpoint-00000002.pt") as folder:
        assert folder.run_id != a_id and read_run_id(tmp_path / "B") == folder.run_id
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "notes.txt").write_text("not a run")          # files that are no run's do not count
    with _open(tmp_path / "C", a / "checkpoint.pt") as folder:
        assert folder.run_id not in (a_id, read_run_id(tmp_path / "B"))
    assert (tmp_path / "C" / "notes.txt").read_text() == "not a run"


def test_a_folder_from_before_run_ids_is_continued_and_gets_one(tmp_path):
    run = tmp_path / "run"
    _run(run, run_id=None)
    with _open(run, run / "checkpoint.pt") as folder:
        assert read_run_id(run) == folder.run_id
    # its old checkpoints, without a run id, still continue it
    check_resume_folder(run, run / "checkpoint-00000002.pt", None)
    with pytest.raises(RunMismatchError):                           # but not one from elsewhere
        check_resume_folder(run, tmp_path / "elsewhere" / "checkpoint.pt", None)


def test_a_run_json_lost_is_restored_from_a_checkpoint_inside(tmp_path):
    run = tmp_path / "run"
    run_id = _run(run)
    (run / RUN_INFO_NAME).unlink()
    with _open(run, run / "checkpoint.pt") as folder:
        assert folder.run_id == run_id == read_run_id(run)


def test_a_malformed_run_json_leaves_the_folder_alone(tmp_path):
    run = tmp_path / "run"
    _run(run)
    (run / RUN_INFO_NAME).write_text('{"run_id": "../../elsewhere"}')
    before = _snapshot(run)
    with pytest.raises(RunMismatchError, match="not a run file revglow wrote"):
        _open(run, run / "checkpoint.pt")
    assert _snapshot(run) == before


def test_the_resume_folder_is_where_the_checkpoint_lies_never_the_cwd(tmp_path, monkeypatch):
    """A checkpoint names a folder (train_config.out); a crafted one could name any folder, relative to wherever
    the command runs. The resumed run writes where the checkpoint lies instead."""
    victim = tmp_path / "victim"
    _run(victim, steps=(5, 6, 7))
    before = _snapshot(victim)
    run = tmp_path / "runs" / "mine"
    _run(run, train_out="../victim")                     # relative: resolved against the cwd it would hit victim
    monkeypatch.chdir(tmp_path / "runs")
    state = load_checkpoint(run / "checkpoint.pt")
    assert resume_out_folder(run / "checkpoint.pt", state) == run
    assert resume_out_folder("mine/checkpoint.pt", state) == Path("mine")      # the path given, as given
    aside = run / "abandoned-after-step-00000002"
    aside.mkdir()
    os.link(run / "checkpoint-00000004.pt", aside / "checkpoint-00000004.pt")
    assert os.path.samefile(resume_out_folder(aside / "checkpoint-00000004.pt", state), run)
    assert resume_out_folder(run / "checkpoint.pt", state, out=tmp_path / "fresh") == tmp_path / "fresh"
    assert _snapshot(victim) == before


def test_a_checkpoint_outside_a_run_folder_needs_an_out(tmp_path):
    run = tmp_path / "run"
    _run(run)
    (tmp_path / "downloads").mkdir()
    copy = tmp_path / "downloads" / "glow.pt"
    copy.write_bytes((run / "checkpoint.pt").read_bytes())
    with pytest.raises(RunMismatchError, match=r"glow\.pt does not lie in a run folder .*give --out"):
        resume_out_folder(copy, load_checkpoint(copy))
    assert sorted(os.listdir(tmp_path / "downloads")) == ["glow.pt"]


class _Killed(BaseException):
    """Stands for SIGKILL at a file operation: nothing after it happens."""


def test_a_kill_at_any_moment_of_setting_aside_leaves_a_checkpoint_pt(tmp_path, monkeypatch):
    """Every file operation of set_aside_newer_checkpoints, in turn, is where the process dies; checkpoint.pt
    must exist (and be readable) after each, and a resume run again afterwards must end as an unkilled one."""
    real = {name: getattr(os, name) for name in ("replace", "link", "rename", "unlink", "mkdir")}
    kill_at = 0
    while True:
        run = tmp_path / f"run{kill_at}"
        _run(run, steps=(2, 4, 6))
        calls = {"n": 0}

        def counting(name):
            def operation(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] > kill_at:
                    raise _Killed(name)
                return real[name](*args, **kwargs)
            return operation

        for name in real:
            monkeypatch.setattr(os, name, counting(name))
        killed = False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                set_aside_newer_checkpoints(run, 2, str(run / "checkpoint-00000002.pt"))
        except _Killed:
            killed = True
        finally:
            monkeypatch.undo()
        assert load_checkpoint(run / "checkpoint.pt")["step"] in (2, 6), kill_at
        if not killed:
            break
        kill_at += 1
    assert kill_at >= 4                                              # the loop did stop inside every step
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 2
    assert sorted(os.listdir(run / "abandoned-after-step-00000002")) == ["checkpoint-00000004.pt",
                                                                        "checkpoint-00000006.pt", "checkpoint.pt"]


def test_overwrite_removes_links_never_their_targets(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    _run(run)
    (elsewhere / "pictures").mkdir(parents=True)
    (elsewhere / "pictures" / "keep.png").write_bytes(b"png")
    (elsewhere / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(elsewhere / "metrics.jsonl")
    (run / "samples").symlink_to(elsewhere / "pictures")
    (run / "notes.txt").write_text("not the run's")
    with _open(run, overwrite=True):
        pass
    assert sorted(os.listdir(run)) == [".revglow.lock", "notes.txt", RUN_INFO_NAME]
    assert (elsewhere / "pictures" / "keep.png").exists() and (elsewhere / "metrics.jsonl").exists()
