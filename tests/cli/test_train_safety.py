"""`revglow train` runs that nothing can destroy or hijack: a resume into another run's folder, a second process on
a live folder, a crafted CIFAR-10 batch, a diverging run, signals during the final evaluation, flags that would be
ignored."""
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from revglow.cli import main
from revglow.training.evaluation import load_model
from revglow.training.run_evaluation import RunEvaluation
from data_writers import write_cifar10

TINY = ["--levels", "2", "--depth", "1", "--hidden", "8", "--batch-size", "8", "--eval-batch-size", "512",
        "--no-progress", "--n-samples", "4", "--ema", "0.9", "--eval-every", "0", "--sample-every", "0"]
REPO = Path(__file__).resolve().parents[2]


def _one_line_error(capsys, code, *fragments, status=1):
    err = capsys.readouterr().err
    assert code == status and err.startswith("revglow: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _snapshot(folder):
    """Every file's and folder's bytes and modification time under `folder`, itself included."""
    entries = {".": (None, folder.stat().st_mtime_ns)}
    for path in sorted(folder.rglob("*")):
        entries[str(path.relative_to(folder))] = (path.read_bytes() if path.is_file() else None,
                                                  path.stat().st_mtime_ns)
    return entries


def _steps_logged(out):
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and "images_per_s" in json.loads(line))


def _finite_checkpoint(path):
    state = torch.load(path, weights_only=True)
    tensors = list(state["model"].values()) + list((state["ema"] or {}).get("shadow", {}).values())
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two 2-step digits runs, A and B, with checkpoint-1 and checkpoint-2 each; tests copy them."""
    base = tmp_path_factory.mktemp("runs")
    for name in ("A", "B"):
        assert main(["train", *TINY, "--max-steps", "2", "--checkpoint-every", "1", "--out", str(base / name)]) == 0
    return base


def _copies(two_runs, tmp_path):
    return [Path(shutil.copytree(two_runs / name, tmp_path / name)) for name in ("A", "B")]


def test_a_resume_into_another_runs_folder_is_refused_touching_nothing(two_runs, tmp_path, capsys):
    """The report's case: `--resume A/checkpoint-00000002.pt --out B` pruned and overwrote B's checkpoints and mixed
    A's metrics into B's."""
    a, b = _copies(two_runs, tmp_path)
    before = _snapshot(b)
    code = main(["train", "--resume", str(a / "checkpoint-00000002.pt"), "--out", str(b), "--max-steps", "3",
                 "--no-progress"])
    _one_line_error(capsys, code, f"{b} holds another run", "Nothing was changed")
    assert _snapshot(b) == before


def test_every_checkpoint_carries_the_run_id_and_a_moved_run_resumes_where_it_lies(two_runs, tmp_path, capsys):
    """The checkpoint's saved --out names the folder it was written in: a run moved elsewhere resumes where its
    checkpoint lies (the folder printed at start-up), never into the saved folder."""
    a, _ = _copies(two_runs, tmp_path)
    moved = tmp_path / "moved"
    a.rename(moved)
    assert torch.load(moved / "checkpoint.pt", weights_only=True)["train_config"]["out"] == str(two_runs / "A")
    capsys.readouterr()
    assert main(["train", "--resume", str(moved / "checkpoint.pt"), "--max-steps", "3", "--no-progress"]) == 0
    assert f"run folder {moved.resolve()}" in capsys.readouterr().out
    assert not a.exists() and _snapshot(two_runs / "A")          # nothing written to the saved folder
    run_id = json.loads((moved / "run.json").read_text())["run_id"]
    checkpoints = sorted(moved.glob("checkpoint*.pt"))
    assert len(checkpoints) == 4 and torch.load(moved / "checkpoint.pt", weights_only=True)["step"] == 3
    assert {torch.load(path, weights_only=True)["run_id"] for path in checkpoints} == {run_id}


@pytest.mark.long(8)
def test_a_second_process_on_a_live_folder_is_refused_while_the_live_run_goes_on(two_runs, tmp_path, capsys):
    """A second --resume deleted the live run's half-written checkpoint, and --overwrite beside a live run lost its
    data with both processes exiting 0. Here a real `python -m revglow train` lives in the folder."""
    a, _ = _copies(two_runs, tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    live = subprocess.Popen([sys.executable, "-m", "revglow", "train", "--resume", "--out", str(a), "--max-steps",
                             "1000000", "--checkpoint-every", "0", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while _steps_logged(a) < 4 and time.monotonic() < deadline:     # 2 steps of its own
            assert live.poll() is None, live.communicate()[1]
            time.sleep(0.05)
        checkpoint, run_json = (a / "checkpoint.pt").read_bytes(), (a / "run.json").read_bytes()
        rows = (a / "metrics.jsonl").read_text().split("\n")[:-1]       # the whole lines the live run wrote
        holder = f"in use by another revglow run (pid {live.pid} on host {socket.gethostname()}"
        for argv in (["--resume", "--out", str(a), "--max-steps", "5", "--no-progress"],
                     [*TINY, "--max-steps", "1", "--overwrite", "--out", str(a)]):
            _one_line_error(capsys, main(["train", *argv]), holder)
        logged = _steps_logged(a)
        while _steps_logged(a) <= logged and time.monotonic() < deadline:   # the live run goes on
            assert live.poll() is None, live.communicate()[1]
            time.sleep(0.05)
        assert (a / "checkpoint.pt").read_bytes() == checkpoint and (a / "run.json").read_bytes() == run_json
        assert (a / "metrics.jsonl").read_text().split("\n")[:len(rows)] == rows    # appended to, never trimmed
        assert sorted(p.name for p in a.glob("checkpoint*.pt")) == ["checkpoint-00000001.pt",
                                                                    "checkpoint-00000002.pt", "checkpoint.pt"]
        live.send_signal(signal.SIGTERM)
        _, err = live.communicate(timeout=60)
        assert live.returncode == 143, err
        assert torch.load(a / "checkpoint.pt", weights_only=True)["step"] == _steps_logged(a) > logged
    finally:
        if live.poll() is None:
            live.kill()


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_batch_is_refused_with_no_side_effect(tmp_path, capsys):
    root = write_cifar10(tmp_path / "cifar", per_batch=4)
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, _RunsShell(marker)]}
    (root / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    out = tmp_path / "run"
    code = main(["train", *TINY, "--data", "cifar10", "--data-root", str(root), "--out", str(out)])
    _one_line_error(capsys, code, f"{root / 'data_batch_3'}: refused to unpickle posix.system")
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("data", ["digits", "photos"])
def test_a_data_root_that_would_be_ignored_is_a_usage_error(tmp_path, capsys, data):
    code = main(["train", "--data", data, "--data-root", str(tmp_path), "--out", str(tmp_path / "run")])
    _one_line_error(capsys, code, f"--data-root does not apply to --data {data}", status=2)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum, during", [(signal.SIGTERM, "bits_per_dim"), (signal.SIGINT, "write_samples")])
def test_a_signal_during_the_final_evaluation_or_samples_stops_with_its_status(tmp_path, monkeypatch, capsys,
                                                                            signum, during):
    """The signal was ignored there (exit 0); now the run stops after the evaluation or grid in progress, keeping
    its final checkpoint, with 128 + the signal number."""
    real, sent = getattr(RunEvaluation, during), []

    def signalled(self, *args, **kwargs):
        if not sent:                                 # one real signal, to the handler of the run
            sent.append(os.kill(os.getpid(), signum))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(RunEvaluation, during, signalled)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--max-steps", "2", "--out", str(out)]) == 128 + signum
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"revglow: interrupted by {signum.name} after step 2; checkpoint written to {out / 'checkpoint.pt'} "
        f"(continue with --resume)")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    assert not any("baseline_bpd" in line for line in (out / "metrics.jsonl").read_text().splitlines())
    assert (out / "samples").exists() == (during == "write_samples")


@pytest.mark.long(4)
def test_a_diverging_run_saves_only_good_states_and_names_one_that_resumes(tmp_path, capsys):
    """--lr 10 (warming up over 40 steps): the update of step 2 leaves finite weights whose gradient is not finite.
    That state used to be saved and named "the last good checkpoint", which failed at once on resume."""
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", *TINY, "--lr", "10", "--warmup", "40", "--max-steps", "20", "--checkpoint-every", "1",
                     "--keep", "20", "--out", str(out)])
    err = _one_line_error(capsys, code, "that step's update broke the model; stopping (the last good checkpoint is")
    named = Path(re.search(r"the last good checkpoint is (\S+)\)", err).group(1))
    checkpoints = sorted(out.glob("checkpoint*.pt"))
    assert named in checkpoints and all(_finite_checkpoint(path) for path in checkpoints)
    load_model(named, torch.device("cpu"))                      # refuses non-finite weights
    step = torch.load(named, weights_only=True)["step"]
    assert main(["train", "--resume", str(named), "--lr", "1e-3", "--warmup", "0", "--max-steps", str(step + 3),
                 "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in rows if "images_per_s" in r and r["step"] > step]
    assert len(resumed) == 3 and all("skipped" not in r and np.isfinite(r["bpd"]) for r in resumed)
    assert _finite_checkpoint(out / "checkpoint.pt")


@pytest.mark.long(4)
def test_a_rollback_run_ends_finite_logs_its_rollbacks_and_resumes_at_their_rate(tmp_path, capsys):
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", *TINY, "--lr", "0.3", "--warmup", "0", "--max-steps", "8", "--checkpoint-every", "4",
                     "--on-divergence", "rollback", "--max-rollbacks", "10", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [r["rollback"] for r in rows if "rollback" in r]
    assert rollbacks and [r["count"] for r in rollbacks] == list(range(1, len(rollbacks) + 1))
    assert [r["lr"] for r in rollbacks] == [0.3 / 2 ** r["count"] for r in rollbacks]
    assert "rolled back to the state of step" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert _finite_checkpoint(out / "checkpoint.pt") and state["step"] == 8
    assert state["train_config"]["lr"] == rollbacks[-1]["lr"] and state["rollbacks"] == len(rollbacks)
    assert main(["train", "--resume", "--out", str(out), "--max-steps", "9", "--no-progress"]) == 0
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"images_per_s"' in line]
    assert last[-1]["step"] == 9 and last[-1]["lr"] == rollbacks[-1]["lr"] and np.isfinite(last[-1]["bpd"])
