"""Atomic checkpoint writes, clear errors for bad files, RNG states, rotation."""
import os
import random

import numpy as np
import pytest
import torch

import revglow.training.checkpoints as checkpoint_module
from revglow.training.checkpoints import (CheckpointError, capture_rng_state, load_checkpoint, prune_step_checkpoints,
                                restore_rng_state, save_checkpoint, step_checkpoint_path)


def _state(value):
    return {"model": {"w": torch.full((4,), float(value))}, "step": value, "rng": capture_rng_state(),
            "config": {"shape": [1, 8, 8], "name": "x", "flag": True, "none": None}}


def test_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(_state(3), tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 3 and raw["format"] == "revglow-checkpoint"
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((4,), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("failing", ["replace", "write"])
def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = save_checkpoint(_state(1), tmp_path / "c.pt")

    def boom(*args, **kwargs):
        raise OSError("injected failure")

    if failing == "replace":
        monkeypatch.setattr(checkpoint_module.os, "replace", boom)
    else:
        real_save = torch.save

        def half_save(obj, handle):
            real_save(obj, handle)
            handle.truncate(100)
            raise OSError("injected failure")
        monkeypatch.setattr(checkpoint_module.torch, "save", half_save)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]   # no temporary file left behind


def test_truncated_corrupt_and_foreign_files(tmp_path):
    good = save_checkpoint(_state(1), tmp_path / "good.pt")
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot read the checkpoint: truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: the checkpoint file is empty"):
        load_checkpoint(tmp_path / "empty.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not a revglow checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    torch.save({"format": "revglow-checkpoint", "obj": np.random.default_rng(0)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"pickled\.pt: .*weights_only"):
        load_checkpoint(tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"missing\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="lacks optimizer"):
        load_checkpoint(good, required=["model", "optimizer"])


def test_rng_state_restores_all_generators():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(3), np.random.rand(), random.random()
    state = capture_rng_state()
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn())
    torch.rand(7), np.random.rand(7), random.random()
    restore_rng_state(state)
    got = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)], np.random.randn())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1])
    assert expected[2] == got[2] and expected[3] == got[3]


def test_rng_state_survives_weights_only_file(tmp_path):
    np.random.randn()  # leaves a cached gaussian in the numpy state
    path = save_checkpoint({"rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.randn(3), random.random())
    restore_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.randn(3), expected[1])
    assert random.random() == expected[2]


def test_prune_keeps_newest(tmp_path):
    for step in (5, 10, 100, 20):
        save_checkpoint({"step": step}, step_checkpoint_path(tmp_path, step))
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    removed = prune_step_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-00000005.pt", "checkpoint-00000010.pt"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000020.pt", "checkpoint-00000100.pt", "checkpoint.pt"]


def test_same_length_corruption_is_detected(tmp_path):
    path = save_checkpoint({"model": {"w": torch.randn(4096)}, "step": 1}, tmp_path / "c.pt")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(200)          # the length and the zip structure stay as they were
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c\.pt: the checkpoint is corrupt \(Bad CRC-32"):
        load_checkpoint(path)


def test_stale_temp_files_are_removed(tmp_path):
    from revglow.training.checkpoints import remove_stale_temp_files

    ours = [tmp_path / ".checkpoint.pt.abcd1234.tmp", tmp_path / ".checkpoint-00000012.pt.777.tmp"]
    theirs = [tmp_path / ".other.pt.1.tmp", tmp_path / "checkpoint.pt"]
    for path in ours + theirs:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in theirs)


def test_stale_temp_files_of_metrics_and_run_info_are_removed(tmp_path):
    from revglow.training.checkpoints import remove_stale_temp_files

    ours = [tmp_path / ".metrics.jsonl.0f0f0f0f.tmp", tmp_path / ".run.json.1a2b3c4d.tmp"]
    theirs = [tmp_path / "metrics.jsonl", tmp_path / "run.json", tmp_path / ".metrics.jsonl.tmp"]
    for path in ours + theirs:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in theirs)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = save_checkpoint(_state(1), tmp_path / "c.pt")
        save_checkpoint(_state(2), path)                    # replacing a file gives the new one the same mode
        plain = tmp_path / "plain"
        plain.write_bytes(b"")                              # what open() gives under this umask
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask) == (plain.stat().st_mode & 0o777)
    assert load_checkpoint(path)["step"] == 2


def test_atomic_writer_replaces_a_link_never_its_target(tmp_path):
    from revglow.training.checkpoints import atomic_writer

    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    (tmp_path / "run.json").symlink_to(target)
    with atomic_writer(tmp_path / "run.json") as handle:
        handle.write(b"{}")
    assert not (tmp_path / "run.json").is_symlink() and (tmp_path / "run.json").read_text() == "{}"
    assert target.read_text() == "keep me"
    with pytest.raises(RuntimeError, match="half way"):
        with atomic_writer(tmp_path / "run.json") as handle:
            handle.write(b"partial")
            raise RuntimeError("half way")
    assert (tmp_path / "run.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.txt", "run.json"]


def _raw_checkpoint(path, **entries):
    state = {"format": "revglow-checkpoint", "format_version": 1, "step": 3, "model": {}}
    state.update(entries)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("version", [0, -5, True, False, 1.0, "1", None, [1]])
def test_odd_format_versions_are_refused(tmp_path, version):
    path = _raw_checkpoint(tmp_path / "v.pt", format_version=version)
    with pytest.raises(CheckpointError, match=r"v\.pt: checkpoint format version .* not one revglow writes") as caught:
        load_checkpoint(path)
    assert "\n" not in str(caught.value)


def test_newer_format_version_is_named_newer(tmp_path):
    with pytest.raises(CheckpointError, match="format version 2 is newer than this revglow understands"):
        load_checkpoint(_raw_checkpoint(tmp_path / "v.pt", format_version=2))


@pytest.mark.parametrize("step", [-1, -100, True, 2.5, "3", None])
def test_odd_steps_are_refused(tmp_path, step):
    path = _raw_checkpoint(tmp_path / "s.pt", step=step)
    with pytest.raises(CheckpointError, match=r"s\.pt: the checkpoint's step .* is not a count of steps"):
        load_checkpoint(path)


def test_run_id_must_be_hex(tmp_path):
    good = "0123456789abcdef" * 2
    assert load_checkpoint(_raw_checkpoint(tmp_path / "a.pt", run_id=good))["run_id"] == good
    assert load_checkpoint(_raw_checkpoint(tmp_path / "b.pt", run_id=None))["run_id"] is None
    for bad in ("../../etc", good.upper(), good[:-1], 7):
        with pytest.raises(CheckpointError, match=r"c\.pt: the checkpoint's run_id .* is not a run id"):
            load_checkpoint(_raw_checkpoint(tmp_path / "c.pt", run_id=bad))
