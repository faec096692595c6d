"""The scripts of benchmarks/paper/ end to end on a tiny budget (2 steps, 1 seed, 2 variants, tiny models): each
writes its rows (with the command and the machine) and its PNGs, and --plot-only redraws from the rows."""
import importlib.util
import json
import os

import pytest
import torch

pytestmark = pytest.mark.long(5)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER = os.path.join(ROOT, "benchmarks", "paper")
TINY = ["--steps", "2", "--eval-every", "1", "--seeds", "0", "--hidden", "4", "--batch-size", "8", "--eval-batch-size",
        "512"]


@pytest.fixture(autouse=True)
def _keep_threads():
    """The scripts set torch's thread count (--threads); later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"revglow_paper_{name}", os.path.join(PAPER, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _check_row(row, experiment, tag):
    assert row["experiment"] == experiment and row["tag"] == tag
    assert row["steps"] == 2 and [p[0] for p in row["curve"]] == [1, 2]
    assert row["curve"][-1][1] == row["test_bpd"] and row["test_bpd"] > 0 and row["baseline_bpd"] > 0
    assert row["command"].startswith("python -m revglow train ") and "--max-steps 2" in row["command"]
    for key in ("date", "git", "torch", "cpu", "threads", "wall_s", "cpu_s"):
        assert key in row


def _png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name, experiment, variants", [
    ("figure3", "figure3", ["additive-reverse", "affine-1x1conv"]),
    ("ablation", "ablation", ["plain", "plain+edge-padding"]),
])
def test_variant_sweeps(tmp_path, capsys, name, experiment, variants):
    script = _load(name)
    results, plot = str(tmp_path / "rows.jsonl"), str(tmp_path / "plot.png")
    common = ["--results", results, "--plot", plot, "--tag", "t"]
    script.main([*TINY, "--depth", "1", "--variants", *variants, *common])
    rows = _rows(results)
    assert [r["variant"] for r in rows] == variants
    for r, v in zip(rows, variants):
        _check_row(r, experiment, "t")
        assert r["flags"] in r["command"] and r["flags"] == " ".join(script.VARIANTS[v])
    _png(plot)
    os.remove(plot)
    assert script.main(["--plot-only", *common]) == rows      # redrawn from the rows alone, nothing trained
    _png(plot)
    table = capsys.readouterr().out
    assert all(f"| {v} |" in table for v in variants)


def test_ablation_variants_add_one_option_each():
    script = _load("ablation")
    plain = script.VARIANTS["plain"]
    for name, flags in script.VARIANTS.items():
        changed = sum(a != b for a, b in zip(flags, plain))
        assert len(flags) == len(plain) and changed == {"plain": 0, "all-four": 4}.get(name, 1)


def test_temperature_depth(tmp_path):
    script = _load("temperature_depth")
    results = str(tmp_path / "rows.jsonl")
    script.main([*TINY, "--depths", "1", "2", "--temperature-depth", "2", "--temperatures", "0", "1", "--n", "3",
                 "--results", results, "--plot", str(tmp_path / "depth.png"),
                 "--temperature-plot", str(tmp_path / "temperature.png"), "--tag", "t"])
    rows = _rows(results)
    assert [r["depth"] for r in rows] == [1, 2]
    for r in rows:
        _check_row(r, "depth", "t")
    _png(tmp_path / "depth.png")
    _png(tmp_path / "temperature.png")


def test_photos(tmp_path):
    script = _load("photos")
    results = str(tmp_path / "rows.jsonl")
    script.main([*TINY, "--image-size", "8", "--levels", "1", "--depth", "1", "--n", "2", "--temperatures", "0.7",
                 "--results", results, "--plot", str(tmp_path / "photos.png"), "--tag", "t"])
    (row,) = _rows(results)
    _check_row(row, "photos", "t")
    assert "--data photos --image-size 8" in row["command"]
    _png(tmp_path / "photos.png")
