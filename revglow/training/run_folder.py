"""The output folder of a training run: what `revglow train` writes there, which run it holds, and who may write it.

A run folder holds one run. `open_run_folder` (rank 0, before anything is written) locks it for this process
(revglow.training.run_lock), checks that a resumed checkpoint belongs to the run the folder holds, removes
temp files of killed saves, refuses to start over an earlier run unless told to, sets aside the checkpoints of
an abandoned branch, and gives the run its id.

The run id (uuid4 hex) is written to OUT/run.json when the folder gets its run, and every checkpoint carries
it (RUN_ID_KEY). A resume into a folder that holds another run is refused before anything there is touched:
`revglow train --resume A/checkpoint-00000020.pt --out B` would otherwise set aside and prune B's checkpoints
and mix A's steps into B's metrics. Without --out, `resume_out_folder` takes the folder the checkpoint lies in
(never the current directory, nor a folder named inside the checkpoint, which a crafted file could aim anywhere).

Folders written before run ids (no run.json) are continued from checkpoints that lie in them; a checkpoint
from elsewhere may start a new run only in a folder that holds none.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from revglow.errors import RevglowError
from revglow.training.checkpoints import (RUN_ID_KEY, atomic_writer, is_run_id, link_or_copy_atomic,
                                          remove_stale_temp_files)
from revglow.training.metrics import METRICS_NAME
from revglow.training.run_lock import LOCK_NAME, RunLock, acquire_run_lock

__all__ = ["RunExistsError", "RunMismatchError", "RunFolder", "CHECKPOINT_NAME", "RUN_INFO_NAME", "RUN_ID_KEY",
           "check_out_folder", "check_resume_folder", "holds_run", "new_run_id", "open_run_folder",
           "prepare_out_folder", "read_run_id", "resume_out_folder", "set_aside_newer_checkpoints",
           "write_run_info"]

PathLike = Union[str, os.PathLike]

CHECKPOINT_NAME = "checkpoint.pt"
RUN_INFO_NAME = "run.json"
# What `revglow train` writes into --out (what --overwrite removes; anything else there is left alone).
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME, RUN_INFO_NAME)
RUN_FOLDERS = ("samples", "tensorboard")
_STEP_CHECKPOINT = re.compile(r"^checkpoint-\d+\.pt$")
_ABANDONED = re.compile(r"^abandoned-after-step-\d+(-\d+)?$")
_RUN_INFO_BYTES = 1 << 16        # run.json is a line; a bigger file is not one revglow wrote


class RunExistsError(RevglowError, ValueError):
    """--out holds files and neither --resume nor --overwrite was given."""


class RunMismatchError(RevglowError, ValueError):
    """The folder a resumed run would write holds another run than its checkpoint's (or none it can tell)."""


# ------------------------------------------------------------------------------------------ run id

def new_run_id() -> str:
    """A fresh run id: 32 lowercase hex digits (uuid4)."""
    return uuid.uuid4().hex


def read_run_id(folder: PathLike) -> Optional[str]:
    """The run id in FOLDER/run.json; None where there is no run.json. A run.json that is not one revglow
    wrote (unreadable, a symbolic link, a malformed id) raises RunMismatchError: its run cannot be told."""
    path = Path(folder) / RUN_INFO_NAME
    if not os.path.lexists(path):
        return None
    try:
        if path.is_symlink():
            raise ValueError("a symbolic link")
        with open(path, "rb") as handle:
            info = json.loads(handle.read(_RUN_INFO_BYTES).decode("utf-8"))
        run_id = info.get(RUN_ID_KEY) if isinstance(info, dict) else None
        if not is_run_id(run_id):
            raise ValueError(f"no {RUN_ID_KEY} of 32 hex digits")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise RunMismatchError(f"{path} is not a run file revglow wrote ({exc}); the folder's run cannot be "
                               f"told, so it is left alone (choose another --out)") from exc
    return run_id


def write_run_info(folder: PathLike, run_id: str) -> Path:
    """Write FOLDER/run.json (the run id and its creation time) atomically; returns its path."""
    if not is_run_id(run_id):
        raise ValueError(f"run_id must be 32 lowercase hex digits (new_run_id()); got {run_id!r}")
    path = Path(folder) / RUN_INFO_NAME
    info = {RUN_ID_KEY: run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_writer(path) as handle:
        handle.write((json.dumps(info) + "\n").encode("utf-8"))
    return path


def holds_run(folder: PathLike) -> bool:
    """Whether `folder` holds a run: a run.json, checkpoint.pt, metrics.jsonl or checkpoint-STEP.pt."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(name in RUN_FILES or _STEP_CHECKPOINT.match(name) for name in os.listdir(folder))


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _lies_in(checkpoint: Path, folder: Path) -> bool:
    """Whether `checkpoint` lies in `folder`, directly or in one of its abandoned-after-step-* folders."""
    parent = checkpoint.parent
    return _same_folder(parent, folder) or (_ABANDONED.match(parent.name) is not None
                                            and _same_folder(parent.parent, folder))


# ------------------------------------------------------------------------------------------ checks

def check_out_folder(out: PathLike, overwrite: bool) -> None:
    """Refuse to start a fresh run in a folder that holds files, unless `overwrite` says to replace them."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RunExistsError(f"--out {folder} is a file, not a folder")
    if overwrite or not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)   # the lock file marks no run
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunExistsError(f"--out {folder} is not empty ({shown}); pass --resume to continue the run there, "
                             f"or --overwrite to start afresh (removing its checkpoints, metrics and samples)")


def check_resume_folder(folder: PathLike, checkpoint: Optional[PathLike], checkpoint_run_id: Optional[str]) -> None:
    """Refuse (RunMismatchError, one line, nothing touched) to resume into `folder` a checkpoint of another run.

    Accepted: a folder that holds no run (a new one: the resumed run starts a run of its own there); a folder
    whose run.json holds the checkpoint's run id; a checkpoint that lies in the folder (or in one of its
    abandoned-after-step-* folders) and either carries no run id (written before run ids) or the folder has no
    run.json (one written before run ids). `checkpoint` is the checkpoint's path (None: unknown).
    """
    folder = Path(folder)
    if not holds_run(folder):
        return
    folder_id = read_run_id(folder)
    inside = checkpoint is not None and _lies_in(Path(checkpoint), folder)
    if folder_id is not None and folder_id == checkpoint_run_id:
        return
    if inside and (folder_id is None or checkpoint_run_id is None):
        return
    theirs = f"run {folder_id}" if folder_id is not None else "a run from before run ids"
    ours = f"run {checkpoint_run_id}" if checkpoint_run_id is not None else "no run id"
    where = f"the checkpoint {checkpoint}" if checkpoint is not None else "the checkpoint"
    raise RunMismatchError(f"{folder} holds another run ({theirs}) than {where} ({ours}); resuming there would "
                           f"set aside its checkpoints and mix the two runs' metrics. Nothing was changed: resume "
                           f"into the checkpoint's own folder, or give an --out that holds no run")


def resume_out_folder(checkpoint: PathLike, state: Dict, out: Optional[PathLike] = None) -> Path:
    """The folder a run resumed from `checkpoint` (loaded as `state`) writes: `out` when given, else the folder
    the checkpoint lies in (the run folder above it for one in an abandoned-after-step-* folder), never one
    named inside the checkpoint nor the current directory. Raises RunMismatchError, touching nothing, when that
    folder holds another run (check_resume_folder), or when, without `out`, the checkpoint lies in no run
    folder (a copy elsewhere: say with --out where the resumed run goes)."""
    checkpoint = Path(checkpoint)
    if out is not None:
        folder = Path(out)
    else:
        folder = checkpoint.parent
        if _ABANDONED.match(folder.resolve().name):
            folder = folder.resolve().parent
        if not holds_run(folder):
            raise RunMismatchError(f"{checkpoint} does not lie in a run folder (no {RUN_INFO_NAME} or "
                                   f"{CHECKPOINT_NAME} beside it); give --out FOLDER for the resumed run")
    check_resume_folder(folder, checkpoint, state.get(RUN_ID_KEY))
    return folder


# ------------------------------------------------------------------------------------------ preparing

@dataclass
class RunFolder:
    """An open run folder: its path, the run id its checkpoints carry, and the lock held on it."""

    path: Path
    run_id: str
    lock: RunLock

    def close(self) -> None:
        """Release this holder's share of the lock (the process keeps it while another share is held)."""
        self.lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_run_folder(out: PathLike, overwrite: bool, resume_state: Optional[Dict] = None,
                    resume_source: Optional[PathLike] = None) -> RunFolder:
    """Rank 0, before anything is written: lock `out` (RunLockedError naming the holder when another process
    has it), check that a resumed checkpoint (`resume_state`, read from `resume_source`) belongs to the run
    there (RunMismatchError otherwise), then prepare_out_folder, then the run id: the folder's on a resume
    (the checkpoint's, where it lies in a folder from before run ids), a new one on a fresh run and in a
    folder that held no run, written to run.json. The checks run before the lock is taken too, so a refused
    run leaves the folder exactly as it was; on a refusal under the lock, the lock is released again.

    Returns the RunFolder, which holds the lock: keep it for the run's life and `close()` it at the end (only
    in the process that opened it: it cannot be pickled, e.g. through DistributedContext.run_on_main)."""
    out = Path(out)
    checkpoint_id = resume_state.get(RUN_ID_KEY) if resume_state is not None else None
    # Checked before the lock too, so that a refusal leaves not even the lock file; and again under it, where
    # no other process can change the folder between the check and the changes.
    if resume_state is not None:
        check_resume_folder(out, resume_source, checkpoint_id)
    else:
        check_out_folder(out, overwrite)
    lock = acquire_run_lock(out)
    try:
        run_id = None
        if resume_state is not None:
            check_resume_folder(out, resume_source, checkpoint_id)
            inside = resume_source is not None and _lies_in(Path(resume_source), out)
            run_id = read_run_id(out) or (checkpoint_id if inside and is_run_id(checkpoint_id) else None)
        prepare_out_folder(out, overwrite, None if resume_state is None else int(resume_state["step"]),
                           None if resume_source is None else str(resume_source))
        if run_id is None or read_run_id(out) != run_id:
            run_id = run_id or new_run_id()
            write_run_info(out, run_id)
    except BaseException:
        lock.release()
        raise
    return RunFolder(out, run_id, lock)


def prepare_out_folder(out: Path, overwrite: bool, resumed_step: Optional[int], resume_source: Optional[str]) -> None:
    """Before anything is written (rank 0, holding the folder's lock): remove temp files of killed saves; on a
    fresh run refuse a folder that holds files unless `overwrite`, which removes the earlier run's files; on
    resume from an older checkpoint set the newer ones aside."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    if resumed_step is None:
        check_out_folder(out, overwrite)
        if overwrite:
            for path in list(out.glob("checkpoint-*.pt")) + [out / name for name in RUN_FILES]:
                if path.is_file() or path.is_symlink():
                    path.unlink()        # a symbolic link goes, its target stays
            for name in RUN_FOLDERS:
                if (out / name).is_dir() and not (out / name).is_symlink():
                    shutil.rmtree(out / name)
                elif (out / name).is_symlink():
                    (out / name).unlink()
    else:
        set_aside_newer_checkpoints(out, resumed_step, resume_source)


def _newer_latest(latest: Path, step: int, source: Optional[Path]) -> bool:
    """Whether OUT/checkpoint.pt belongs to the abandoned branch: later than `step`, or unreadable, and not the
    checkpoint resumed from."""
    if not latest.is_file() or (source is not None and source.exists() and os.path.samefile(source, latest)):
        return False
    try:
        latest_step = int(torch.load(latest, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return True       # unreadable: not the branch we continue
    return latest_step > step


def set_aside_newer_checkpoints(out: Path, step: int, resume_source: Optional[str]) -> None:
    """Resuming from an older checkpoint abandons the steps after it: move the newer checkpoint-STEP.pt
    (and a newer checkpoint.pt) into OUT/abandoned-after-step-STEP/, so that rotation, --resume and eval
    only ever see this branch.

    OUT/checkpoint.pt exists at every moment (a kill at any point leaves one): the newer one is linked into
    the abandoned folder first, then replaced by the resumed checkpoint in one rename. Only without a
    `resume_source` file (a state given from Python) is it moved away, to be written at the first save.
    """
    newer = []
    for path in sorted(out.glob("checkpoint-*.pt")):
        try:
            if int(path.stem.split("-")[1]) > step:
                newer.append(path)
        except (IndexError, ValueError):
            continue
    source = Path(resume_source) if resume_source else None
    latest = out / CHECKPOINT_NAME
    latest_is_newer = _newer_latest(latest, step, source)
    if not newer and not latest_is_newer:
        return
    folder = out / f"abandoned-after-step-{step:08d}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = out / f"abandoned-after-step-{step:08d}-{suffix}"
    folder.mkdir()
    if latest_is_newer:
        if source is not None and source.is_file():
            link_or_copy_atomic(latest, folder / CHECKPOINT_NAME)
            link_or_copy_atomic(source, latest)      # --resume without a path continues this branch
        else:
            os.replace(latest, folder / CHECKPOINT_NAME)
    for path in newer:
        if path.exists():        # the resumed checkpoint itself, misnamed, may be among them: it is in latest now
            os.replace(path, folder / path.name)
    if not os.path.lexists(latest) and source is not None and source.is_file():
        link_or_copy_atomic(source, latest)          # there was none: --resume without a path continues here
    moved = len(newer) + int(latest_is_newer)
    warnings.warn(f"resumed from step {step}: moved {moved} newer checkpoint(s) of the abandoned run to "
                  f"{folder}", RuntimeWarning, stacklevel=4)
