"""SIGINT and SIGTERM sent to a real `python -m revglow train` process: it finishes the step in progress, writes
a checkpoint of it atomically and exits with 130 / 143 (the shell's 128 + signal number)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.long(5)

REPO = Path(__file__).resolve().parents[2]


def _steps_logged(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and "images_per_s" in json.loads(line))


@pytest.mark.slow
def test_sigint_and_sigterm_save_a_checkpoint_and_exit(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    runs = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / signum.name
        argv = [sys.executable, "-m", "revglow", "train", "--levels", "2", "--depth", "1", "--hidden", "8",
                "--batch-size", "8", "--max-steps", "1000000", "--checkpoint-every", "0", "--eval-every", "0",
                "--sample-every", "0", "--no-progress", "--out", str(out)]
        runs[signum] = (out, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              env=env, cwd=tmp_path))
    try:
        deadline = time.monotonic() + 120
        pending = dict(runs)
        while pending and time.monotonic() < deadline:   # signal each run once it is a few steps in
            for signum, (out, process) in list(pending.items()):
                assert process.poll() is None, process.communicate()[1]
                if _steps_logged(out) >= 3:
                    process.send_signal(signum)
                    del pending[signum]
            time.sleep(0.05)
        assert not pending, "the runs did not start training in time"
        for signum, (out, process) in runs.items():
            _, err = process.communicate(timeout=60)
            assert process.returncode == 128 + signum, err
            state = torch.load(out / "checkpoint.pt", weights_only=True)
            assert state["step"] >= 3 and state["step"] == _steps_logged(out)     # the step in progress is kept
            assert err.strip().splitlines()[-1] == (f"revglow: interrupted by {signum.name} after step "
                                                    f"{state['step']}; checkpoint written to {out / 'checkpoint.pt'} "
                                                    f"(continue with --resume)")
            assert not list(out.glob(".*.tmp"))
    finally:
        for _, process in runs.values():
            if process.poll() is None:
                process.kill()
