"""End-to-end runs of every `revglow` command on tiny models, and clear errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revglow.cli import main
from test_data import write_cifar10, write_image_folder, write_npz

TINY = ["--levels", "2", "--depth", "1", "--hidden", "8", "--batch-size", "8", "--max-steps", "2", "--no-progress",
        "--n-samples", "4", "--ema", "0.9"]
REPO = Path(__file__).resolve().parents[1]


def _png_size(path):
    with Image.open(path) as picture:
        return picture.size


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One tiny digits run shared by the generation tests (class-conditional, so --label is exercised)."""
    out = tmp_path_factory.mktemp("digits")
    assert main(["train", *TINY, "--num-classes", "10", "--out", str(out)]) == 0
    return out


def test_train_digits_outputs(digits_run, capsys):
    names = {p.name for p in digits_run.iterdir()}
    assert {"checkpoint.pt", "metrics.jsonl", "samples", "checkpoint-00000002.pt"} <= names
    rows = [json.loads(line) for line in (digits_run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "bpd", "lr", "grad_norm", "images_per_s", "peak_memory_mb"} <= set(rows[0])
    assert any("test_bpd" in r for r in rows) and any("baseline_bpd" in r for r in rows)
    assert len(list((digits_run / "samples").glob("*.png"))) == 3


def test_eval_sample_interpolate_manipulate(digits_run, tmp_path, capsys):
    ckpt = str(digits_run / "checkpoint.pt")
    assert main(["eval", "--checkpoint", ckpt, "--draws", "2"]) == 0
    assert "test bits/dim:" in capsys.readouterr().out
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", ckpt, "--n", "6", "--temperature", "0.5", "--label", "3",
                 "--out", str(grid)]) == 0
    assert grid.exists()
    pictures = []
    rng = np.random.default_rng(0)
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), mode="L").save(path)
        pictures.append(path)
    strip = tmp_path / "strip.png"
    assert main(["interpolate", "--checkpoint", ckpt, "--images", str(pictures[0]), str(pictures[1]),
                 "--steps", "5", "--label", "1", "--out", str(strip)]) == 0
    width, height = _png_size(strip)
    assert width > 4 * height          # one row of 5 images
    csv_path = tmp_path / "attrs.csv"
    csv_path.write_text("path,Smiling,Young\n" + "".join(f"img{i}.png,{1 if i % 2 else -1},1\n" for i in range(4)))
    moved = tmp_path / "moved.jpg"
    assert main(["manipulate", "--checkpoint", ckpt, "--labels", str(csv_path), "--attribute", "Smiling",
                 "--image", str(pictures[2]), "--alphas", "-1,0,1", "--label", "0", "--out", str(moved)]) == 0
    assert moved.exists()
    assert main(["manipulate", "--checkpoint", ckpt, "--labels", str(csv_path), "--attribute", "Young",
                 "--image", str(pictures[2]), "--label", "0", "--out", str(moved)]) == 1
    assert "need images both with and without 'Young'" in capsys.readouterr().err


def test_resume_via_cli(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", out]) == 0
    assert main(["train", "--resume", "--out", out, "--max-steps", "4", "--no-progress"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out
    assert torch.load(Path(out) / "checkpoint.pt", weights_only=True)["step"] == 4
    assert main(["train", "--resume", "--out", out, "--depth", "3", "--max-steps", "5"]) == 1
    assert "cannot change the model on resume (--depth" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["cifar10", "folder", "npz"])
def test_train_on_file_data_sets(tmp_path, kind):
    if kind == "cifar10":
        root = write_cifar10(tmp_path / "cifar", per_batch=4)
        extra = []
    elif kind == "folder":
        root = write_image_folder(tmp_path / "pics", per_class=4)
        extra = ["--image-size", "8"]
    else:
        root = write_npz(tmp_path / "d.npz", n=20, layout="nchw", channels=3)
        extra = []
    out = tmp_path / "out"
    assert main(["train", *TINY, "--data", kind, "--data-root", str(root), *extra, "--out", str(out)]) == 0
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--no-ema"]) == 0


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "cifar10", "--data-root", "{tmp}/none"], "no such folder"),
    (["train", "--data", "cifar10", "--data-root", "{tmp}"], "missing CIFAR-10 python batch file(s) data_batch_1"),
    (["train", "--data", "folder", "--data-root", "{tmp}"], "--image-size"),
    (["train", "--data", "npz", "--data-root", "{tmp}/x.npz"], "no such file"),
    (["train", "--levels", "4"], "divisible by 2**levels"),
    (["train", "--resume", "{tmp}/missing.pt"], "no such checkpoint file"),
    (["sample", "--checkpoint", "{tmp}/bad.pt", "--out", "{tmp}/g.png"], "not a revglow checkpoint"),
    (["eval", "--checkpoint", "{tmp}/cut.pt"], "truncated or corrupt"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    torch.save({"weights": torch.ones(1)}, tmp_path / "bad.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("revglow: error: ") and message in err
    assert "Traceback" not in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["train", "--lr", "fast"], ["train", "--coupling", "spline"], ["fly"], [],
                                  ["sample", "--out", "x.png"], ["train", "--max-steps", "none-ish"]])
def test_bad_flags_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: revglow" in capsys.readouterr().err


def test_subprocess_exit_codes(digits_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    ok = subprocess.run([sys.executable, "-m", "revglow", "sample", "--checkpoint", str(digits_run / "checkpoint.pt"),
                         "--n", "2", "--out", str(tmp_path / "s.png")], capture_output=True, text=True, env=env,
                        cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "revglow", "eval", "--checkpoint", str(tmp_path / "nope.pt")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == f"revglow: error: {tmp_path / 'nope.pt'}: no such checkpoint file"


def test_diverging_run_exits_1_with_checkpoint_intact(tmp_path, monkeypatch, capsys):
    from revglow import Glow

    real_forward = Glow.forward
    calls = {"n": 0}

    def forward(self, x, y=None):
        calls["n"] += 1
        bpd = real_forward(self, x, y)
        return bpd + float("inf") if calls["n"] > 2 else bpd

    monkeypatch.setattr(Glow, "forward", forward)
    out = tmp_path / "run"
    argv = ["train", *TINY, "--max-steps", "10", "--checkpoint-every", "1", "--max-bad-steps", "2", "--out", str(out)]
    with pytest.warns(RuntimeWarning):
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "revglow: error: 2 non-finite steps in a row" in err and "last good checkpoint" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
