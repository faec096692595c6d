"""The examples run as scripts (tiny settings)."""
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_train_digits_example(tmp_path, monkeypatch, capsys):
    # In this process (runpy), as `python examples/train_digits.py ...` would run it, without a second interpreter
    # and torch import.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train_digits.py", "--steps", "3", "--batch-size", "16", "--out", str(tmp_path)])
    runpy.run_path(str(REPO / "examples" / "train_digits.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "step     3  train bits/dim" in out and "test bits/dim" in out
    assert (tmp_path / "digits_samples.png").exists()


def test_train_ddp_example(tmp_path):
    # The script as torchrun starts each of its processes (env:// rendezvous), as a world of one: it checks that the
    # example runs. What two processes add is held by tests/training/test_ddp.py, for the library and the trainer
    # (gradients against one process, ActNorm's all-reduced init, a torchrun launch); a 2-process run of this script
    # took 9 s of the suite and caught nothing those do not. It runs in a process of its own: in a pytest worker that
    # had run other tests first, gloo's process group once hung in its destructor (joining its own thread) when the
    # script's DDP reducer was freed after the group was destroyed.
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "train_ddp.py"), "--steps", "2", "--batch-size", "8"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step    2  train bits/dim" in proc.stdout
    assert "max parameter difference between ranks: 0" in proc.stdout
