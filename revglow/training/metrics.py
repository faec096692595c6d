"""What a training run logs: metrics.jsonl (one JSON object per line), TensorBoard events when asked for, and
the peak memory figure of the progress bar.

metrics.jsonl is only ever appended to during a run. A resume drops the rows logged after the checkpoint's
step (those steps are done again) by writing the rows it keeps to a new file beside it and renaming that over
metrics.jsonl (os.replace), so a kill at any moment leaves the old file or the new one, whole. A symbolic link
at OUT/metrics.jsonl is refused on resume (appending and trimming would write its target, a file outside the
run that revglow does not own); a fresh run removes the link itself, never its target, and starts a plain file.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Dict, Optional, TextIO

import torch

from revglow.errors import ConfigError, RevglowError
from revglow.training.checkpoints import atomic_writer

__all__ = ["MetricsLog", "NoMetrics", "MetricsFileError", "METRICS_NAME", "peak_memory_mb", "trim_metrics_file"]

METRICS_NAME = "metrics.jsonl"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far in MiB: allocated CUDA memory on a GPU, else the resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10   # bytes on macOS, KiB on Linux



def _summary_writer_class():
    """torch's TensorBoard SummaryWriter (a function of its own so that tests can stand in for it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("--tensorboard needs the tensorboard package (pip install tensorboard)") from exc
    return SummaryWriter


# ------------------------------------------------------------------------------------------ metrics

class MetricsFileError(RevglowError, ValueError):
    """OUT/metrics.jsonl is a symbolic link (on resume), or cannot be opened for appending."""


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise MetricsFileError(f"{path} is a symbolic link; a resumed run appends to metrics.jsonl and drops the "
                               f"rows after its step, which would change the link's target: replace the link with "
                               f"a copy of that file, or remove it, and resume again")


def _kept_row(line: str, step: int) -> bool:
    """Whether a metrics.jsonl line stays on a resume from `step`: a whole JSON object of a step up to it."""
    try:
        row = json.loads(line)
    except ValueError:
        return False            # torn by a kill in the middle of a write
    row_step = row.get("step", 0) if isinstance(row, dict) else None
    return isinstance(row_step, (int, float)) and not isinstance(row_step, bool) and row_step <= step


def trim_metrics_file(path: Path, step: int) -> int:
    """Drop the rows of `path` (metrics.jsonl) logged after `step`, and torn lines, atomically (a new file
    beside it renamed over it); returns how many lines went. The file is left untouched when all stay.
    A symbolic link is refused (MetricsFileError), whatever it points to.

        >>> import tempfile, pathlib
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
        >>> _ = log.write_text('{"step": 1}\\n{"step": 2}\\n{"step": 3, "bpd"')
        >>> trim_metrics_file(log, 1), log.read_text()
        (2, '{"step": 1}\\n')
    """
    path = Path(path)
    _refuse_link(path)
    if not path.exists():
        return 0
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")          # not splitlines(): it also splits at characters JSON strings may hold
    if lines[-1] == "":
        lines.pop()
    kept = [line for line in lines if _kept_row(line, step)]
    if len(kept) == len(lines) and (not text or text.endswith("\n")):
        return 0
    with atomic_writer(path) as handle:
        handle.write("".join(line + "\n" for line in kept).encode("utf-8"))
    return len(lines) - len(kept)


def _open_for_append(path: Path) -> TextIO:
    """metrics.jsonl opened for appending, created with the mode the umask gives; never through a symbolic link."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        _refuse_link(path)
        raise MetricsFileError(f"cannot open {path} for appending: {exc.strerror or exc}") from exc
    return os.fdopen(fd, "a", encoding="utf-8")


class MetricsLog:
    """metrics.jsonl (one JSON object per line, appended), plus TensorBoard events when asked for.

    On resume (`resume_step` given) the rows after that step are dropped first (trim_metrics_file); a fresh run
    (`resume_step` None) starts the file anew.
    """

    def __init__(self, folder: Path, resume_step: Optional[int], tensorboard: bool = False) -> None:
        self.path = Path(folder) / METRICS_NAME
        if resume_step is not None:
            trim_metrics_file(self.path, resume_step)
        elif os.path.lexists(self.path):
            self.path.unlink()            # a symbolic link goes, its target stays
        self.handle = _open_for_append(self.path)
        self.tensorboard = None
        if tensorboard:
            try:
                self.tensorboard = _summary_writer_class()(str(Path(folder) / "tensorboard"), purge_step=resume_step)
            except BaseException:
                self.handle.close()
                raise

    def write(self, record: Dict) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def write_images(self, step: int, grids: Dict[str, torch.Tensor]) -> None:
        """Sample grids (uint8 [C, H, W]) as TensorBoard images."""
        if self.tensorboard is not None:
            for tag, grid in grids.items():
                self.tensorboard.add_image(tag, grid, step, dataformats="CHW")
            self.tensorboard.flush()

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


class NoMetrics:
    """What ranks other than 0 log: nothing."""

    def write(self, record: Dict) -> None:
        pass

    def write_images(self, step: int, grids: Dict[str, torch.Tensor]) -> None:
        pass

    def close(self) -> None:
        pass

