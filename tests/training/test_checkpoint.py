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
