"""The CPU benchmark scripts run end to end on tiny problems (their numbers are not checked here: speed and
memory targets are for the scripts' full-size runs), and their rows land where they are told."""
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"revglow_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_step_time_script(tmp_path, capsys):
    results = str(tmp_path / "step.jsonl")
    _load("step_time").main(["--image-size", "8", "--levels", "2", "--depth", "2", "--hidden", "8",
                             "--batch-size", "2", "--rounds", "2", "--warmup", "1", "--results", results])
    out = capsys.readouterr().out
    assert "reversible / autograd" in out and "reversible / checkpoint" in out
    rows = _rows(results)
    assert sorted(r["mode"] for r in rows) == ["autograd", "checkpoint", "reversible", "reversible-bare"]
    assert "reversible / reversible without check and RNG replay" in out
    assert all(r["median_s"] > 0 and r["git"] and r["torch"] for r in rows)


def test_memory_vs_depth_script(tmp_path, capsys, monkeypatch):
    """The script's table, ratios and rows. The measurement itself (a fresh subprocess per configuration) is
    tests/test_memory.py's subject: here it answers with the configuration's depth, so no process is started."""
    from revglow.profiling import training_step_memory_mib

    calls = []

    def measure(cfg, batch_size, device="cpu"):
        calls.append((cfg.memory, cfg.depth))
        activation = 1.0 if cfg.memory == "reversible" else float(cfg.depth)
        return {"activation_mib": activation, "peak_mib": 100.0 + activation, "before_mib": 100.0}

    results = str(tmp_path / "mem.jsonl")
    module = _load("memory_vs_depth")
    assert module.training_step_memory_mib is training_step_memory_mib
    monkeypatch.setattr(module, "training_step_memory_mib", measure)
    module.main(["--depths", "1", "2", "--modes", "reversible", "autograd", "--image-size", "16",
                                   "--hidden", "8", "--batch-size", "2", "--results", results])
    out = capsys.readouterr().out
    assert "autograd / reversible at K=2" in out
    rows = _rows(results)
    assert [(r["mode"], r["depth"]) for r in rows] == [("reversible", 1), ("reversible", 2), ("autograd", 1),
                                                       ("autograd", 2)]
    assert all(r["peak_mib"] >= r["before_mib"] > 0 for r in rows)
    assert calls == [("reversible", 1), ("reversible", 2), ("autograd", 1), ("autograd", 2)]
