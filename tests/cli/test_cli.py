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
from data_writers import write_cifar10, write_image_folder, write_npz

TINY = ["--levels", "2", "--depth", "1", "--hidden", "8", "--batch-size", "8", "--eval-batch-size", "512",
        "--max-steps", "2", "--no-progress", "--n-samples", "4", "--ema", "0.9"]
REPO = Path(__file__).resolve().parents[2]


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


def test_a_real_process_exits_1_with_one_line_on_stderr(tmp_path):
    """`python -m revglow` passes main's status to the shell. The other statuses of a real process are checked
    where a real process is run anyway: 0 by the torchrun test (torchrun succeeds only if each worker's
    `-m revglow train` exits 0), 130 and 143 by test_signals.py."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    bad = subprocess.run([sys.executable, "-m", "revglow", "eval", "--checkpoint", str(tmp_path / "nope.pt")],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip() == f"revglow: error: {tmp_path / 'nope.pt'}: no such checkpoint file"
    assert bad.stderr.count("\n") == 1 and not bad.stdout


def test_diverging_run_exits_1_with_checkpoint_intact(tmp_path, monkeypatch, capsys):
    from revglow import Glow

    real_forward = Glow.forward
    calls = {"n": 0}

    def forward(self, x, y=None, **options):     # the trainer asks for all losses (a GlowLosses)
        calls["n"] += 1
        out = real_forward(self, x, y, **options)
        return out._replace(bits_x=out.bits_x + float("inf")) if calls["n"] > 2 else out

    monkeypatch.setattr(Glow, "forward", forward)
    out = tmp_path / "run"
    argv = ["train", *TINY, "--max-steps", "10", "--checkpoint-every", "1", "--max-bad-steps", "2", "--out", str(out)]
    with pytest.warns(RuntimeWarning):
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert "revglow: error: 2 non-finite steps in a row" in err and "last good checkpoint" in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


# ------------------------------------------------------------------------------ runs that lose nothing

def _one_line_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("revglow: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 2-step digits run (lr 1e-3, EMA 0.9, --max-steps) that tests copy before resuming it."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *TINY, "--lr", "1e-3", "--warmup", "0", "--out", str(out)]) == 0
    return out


def _copy_run(base_run, tmp_path):
    import shutil

    return shutil.copytree(base_run, tmp_path / "run")


def test_rerun_without_resume_is_refused_and_overwrite_starts_afresh(base_run, tmp_path, capsys):
    out = _copy_run(base_run, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _one_line_error(capsys, main(["train", *TINY, "--out", str(out)]), "is not empty", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(["train", *TINY, "--max-steps", "1", "--overwrite", "--out", str(out)]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert sorted(p.name for p in out.glob("checkpoint-*.pt")) == ["checkpoint-00000001.pt"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 1


def _largest_tensor_offset(path):
    """Where the data of the largest member of a torch.save zip starts (past its local header)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_length + extra_length + info.file_size // 2 - 100


def test_corrupt_checkpoint_is_refused_by_every_loader(digits_run, tmp_path, capsys):
    from revglow.training.checkpoints import CheckpointError
    from revglow.training.evaluation import load_model

    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "checkpoint.pt"
    data = bytearray((digits_run / "checkpoint.pt").read_bytes())
    start = _largest_tensor_offset(digits_run / "checkpoint.pt")
    data[start:start + 200] = b"\x7f" * 200              # same length; 200 bytes of one tensor's data overwritten
    ckpt.write_bytes(bytes(data))
    picture = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(picture)
    (tmp_path / "attrs.csv").write_text("path,x\na.png,1\na.png,0\n")
    commands = [
        ["eval", "--checkpoint", str(ckpt)],
        ["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "s.png")],
        ["interpolate", "--checkpoint", str(ckpt), "--images", str(picture), str(picture), "--label", "1",
         "--out", str(tmp_path / "i.png")],
        ["manipulate", "--checkpoint", str(ckpt), "--labels", str(tmp_path / "attrs.csv"), "--attribute", "x",
         "--image", str(picture), "--label", "1", "--out", str(tmp_path / "m.png")],
        ["train", "--resume", "--out", str(run), "--max-steps", "3", "--no-progress"],
    ]
    for argv in commands:
        _one_line_error(capsys, main(argv), "checkpoint.pt: the checkpoint is corrupt")
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_model(ckpt, torch.device("cpu"))
    assert not (tmp_path / "s.png").exists() and sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]


def test_resume_flags_take_effect_and_are_recorded(base_run, tmp_path, capsys):
    out = _copy_run(base_run, tmp_path)
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "4", "--lr", "5e-4", "--ema", "0.5",
                 "--grad-clip", "1.5", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "images_per_s" in r] == [1e-3, 1e-3, 5e-4, 5e-4]
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["ema"]["decay"] == 0.5
    assert (state["train_config"]["lr"], state["train_config"]["ema"], state["train_config"]["grad_clip"]) == (5e-4, 0.5, 1.5)


def test_resume_switches_from_max_steps_to_epochs(base_run, tmp_path, capsys):
    out = _copy_run(base_run, tmp_path)
    # 1438 train images at 256 per step: 5 steps per epoch; 2 steps of 8 images are done, so 4 remain.
    assert main(["train", "--resume", "--out", str(out), "--epochs", "1", "--batch-size", "256",
                 "--no-progress"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["data_position"] == {"epoch": 1, "index": 0}
    assert (state["train_config"]["epochs"], state["train_config"]["max_steps"]) == (1, None)
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "7", "--no-progress"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 7


def test_resume_may_change_memory_mode_and_kernels_not_the_model(base_run, tmp_path, capsys):
    out = _copy_run(base_run, tmp_path)
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "3", "--memory", "checkpoint",
                 "--kernels", "torch", "--no-progress"]) == 0
    config = torch.load(out / "checkpoint.pt", weights_only=True)["glow_config"]
    assert (config["memory"], config["kernels"]) == ("checkpoint", "torch")
    _one_line_error(capsys, main(["train", "--resume", "--out", str(out), "--hidden", "16"]),
                    "cannot change the model on resume (--hidden")
    _one_line_error(capsys, main(["train", "--resume", "--out", str(out), "--seed", "3"]), "--seed")


def test_corrupt_image_stops_the_run_before_training(tmp_path, capsys):
    root = write_image_folder(tmp_path / "pics", per_class=4)
    good = (root / "cat" / "img0.png").read_bytes()
    bad = root / "dog" / "img1.png"
    bad.write_bytes(good[: len(good) // 2])                       # a valid header, then the data stops
    out = tmp_path / "out"
    argv = ["train", *TINY, "--data", "folder", "--data-root", str(root), "--image-size", "8", "--out", str(out)]
    _one_line_error(capsys, main(argv), str(bad), "--skip-bad-images")
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
    assert main(argv + ["--skip-bad-images"]) == 0
    assert "(1 unreadable images skipped)" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "checkpoint.pt")]) == 0          # skips as the run did


def test_alphas_must_be_finite(digits_run, tmp_path, capsys):
    picture = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(picture)
    (tmp_path / "attrs.csv").write_text("path,x\na.png,1\na.png,0\n")
    argv = ["manipulate", "--checkpoint", str(digits_run / "checkpoint.pt"), "--labels", str(tmp_path / "attrs.csv"),
            "--attribute", "x", "--image", str(picture), "--label", "1", "--out", str(tmp_path / "m.png")]
    for alphas in ("nan", "0,inf"):
        _one_line_error(capsys, main(argv + ["--alphas", alphas]), "--alphas must be finite")
    assert not (tmp_path / "m.png").exists()


def test_help_shows_data_dependent_defaults_and_print_config(tmp_path, capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--levels LEVELS number of scales L (H and W must be divisible by 2**L) (default: depends on --data: " \
           "digits 2, cifar10 3, folder 3, npz 2, photos 3)" in text
    assert "(default: 512)" not in text and "--print-config" in text
    out = tmp_path / "never"
    assert main(["train", "--data", "digits", "--print-config", "--out", str(out)]) == 0
    resolved = json.loads(capsys.readouterr().out)
    glow = resolved["glow_config"]
    assert (glow["levels"], glow["depth"], glow["hidden"], glow["n_bits"], glow["image_shape"]) == (2, 8, 64, 4, [1, 8, 8])
    assert resolved["train_config"]["out"] == str(out) and not out.exists()


def test_out_of_range_seeds_are_one_line(digits_run, tmp_path, capsys):
    huge = str(2 ** 70)
    _one_line_error(capsys, main(["train", *TINY, "--seed", huge, "--out", str(tmp_path / "o")]),
                    "TrainConfig.seed must be between 0 and 2**32 - 1")
    _one_line_error(capsys, main(["sample", "--checkpoint", str(digits_run / "checkpoint.pt"), "--seed", huge,
                                  "--out", str(tmp_path / "s.png")]), "--seed must be between 0 and 2**32 - 1")


def test_recipe_flags_and_optimizer_fixed_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--optimizer", "adamax", "--warmup-epochs", "0.05", "--augment", "shift",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adamax lr=0.001 warm-up 9 steps, shifts" in printed        # round(0.05 * (1438 // 8))
    assert "raw weights, the same images and noise" in printed
    _one_line_error(capsys, main(["train", "--resume", str(out / "checkpoint.pt"), "--optimizer", "adam",
                                  "--max-steps", "3"]),
                    "cannot change the data, the seed or the optimizer on resume (--optimizer")
    _one_line_error(capsys, main(["train", *TINY, "--warmup", "3", "--warmup-epochs", "1", "--out",
                                  str(tmp_path / "both")]), "give warmup (steps) or warmup_epochs, not both")
