"""The examples run as scripts (tiny settings)."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_train_digits_example(tmp_path, monkeypatch, capsys):
    # In this process (runpy), as `python examples/train_digits.py ...` would run it, without a second interpreter
    # and torch import.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_digits.py", "--steps", "3", "--batch-size", "16", "--out", str(tmp_path)])
    runpy.run_path(str(REPO / "examples" / "train_digits.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "step     3  train bits/dim" in out and "test bits/dim" in out
    assert (tmp_path / "digits_samples.png").exists()


def test_train_ddp_example_under_torchrun(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(REPO / "examples" / "train_ddp.py"), "--steps", "4",
                          "--batch-size", "8"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step    4  train bits/dim" in run.stdout
    assert "max parameter difference between ranks: 0" in run.stdout
