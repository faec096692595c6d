"""The output folder of a training run: what `revglow train` writes there, refusing to start over an earlier
run unless told to, removing stale temp files, and setting aside the checkpoints of an abandoned branch."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from revglow.errors import RevglowError
from revglow.training.checkpoints import link_or_copy_atomic, remove_stale_temp_files
from revglow.training.metrics import METRICS_NAME

__all__ = ["RunExistsError", "CHECKPOINT_NAME", "check_out_folder", "prepare_out_folder",
           "set_aside_newer_checkpoints"]

CHECKPOINT_NAME = "checkpoint.pt"
# What `revglow train` writes into --out (what --overwrite removes; anything else there is left alone).
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME)
RUN_FOLDERS = ("samples", "tensorboard")


class RunExistsError(RevglowError, ValueError):
    """--out holds files and neither --resume nor --overwrite was given."""



def check_out_folder(out: Union[str, os.PathLike], overwrite: bool) -> None:
    """Refuse to start a fresh run in a folder that holds files, unless `overwrite` says to replace them."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RunExistsError(f"--out {folder} is a file, not a folder")
    if overwrite or not folder.is_dir():
        return
    entries = sorted(p.name for p in folder.iterdir())
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunExistsError(f"--out {folder} is not empty ({shown}); pass --resume to continue the run there, "
                             f"or --overwrite to start afresh (removing its checkpoints, metrics and samples)")



def prepare_out_folder(out: Path, overwrite: bool, resumed_step: Optional[int], resume_source: Optional[str]) -> None:
    """Before anything is written (rank 0): remove temp files of killed saves; on a fresh run refuse a folder that
    holds files unless `overwrite`, which removes the earlier run's files; on resume from an older checkpoint set
    the newer ones aside."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    if resumed_step is None:
        check_out_folder(out, overwrite)
        if overwrite:
            for path in list(out.glob("checkpoint-*.pt")) + [out / name for name in RUN_FILES]:
                if path.is_file():
                    path.unlink()
            for name in RUN_FOLDERS:
                if (out / name).is_dir():
                    shutil.rmtree(out / name)
    else:
        set_aside_newer_checkpoints(out, resumed_step, resume_source)


def set_aside_newer_checkpoints(out: Path, step: int, resume_source: Optional[str]) -> None:
    """Resuming from an older checkpoint abandons the steps after it: move the newer checkpoint-STEP.pt
    (and a newer checkpoint.pt) into OUT/abandoned-after-step-STEP/, so that rotation, --resume and eval
    only ever see this branch."""
    newer = []
    for path in sorted(out.glob("checkpoint-*.pt")):
        try:
            if int(path.stem.split("-")[1]) > step:
                newer.append(path)
        except (IndexError, ValueError):
            continue
    source = Path(resume_source) if resume_source else None
    latest = out / CHECKPOINT_NAME
    if latest.is_file() and not (source is not None and source.exists() and os.path.samefile(source, latest)):
        try:
            latest_step = int(torch.load(latest, map_location="cpu", weights_only=True, mmap=True)["step"])
        except Exception:
            latest_step = None       # unreadable: not the branch we continue
        if latest_step is None or latest_step > step:
            newer.append(latest)
    if not newer:
        return
    folder = out / f"abandoned-after-step-{step:08d}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = out / f"abandoned-after-step-{step:08d}-{suffix}"
    folder.mkdir()
    for path in newer:
        os.replace(path, folder / path.name)
    if not latest.exists() and source is not None and source.is_file():
        link_or_copy_atomic(source, latest)      # --resume without a path continues this branch
    warnings.warn(f"resumed from step {step}: moved {len(newer)} newer checkpoint(s) of the abandoned run to "
                  f"{folder}", RuntimeWarning, stacklevel=4)
