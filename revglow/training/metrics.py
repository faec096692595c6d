"""What a training run logs: metrics.jsonl (one JSON object per line), TensorBoard events when asked for, and
the peak memory figure of the progress bar."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from revglow.errors import ConfigError

__all__ = ["MetricsLog", "NoMetrics", "METRICS_NAME", "peak_memory_mb"]

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

class MetricsLog:
    """metrics.jsonl (one JSON object per line), plus TensorBoard events when asked for."""

    def __init__(self, folder: Path, resume_step: Optional[int], tensorboard: bool = False) -> None:
        self.path = folder / METRICS_NAME
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from: those steps are done again.
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tensorboard = None
        if tensorboard:
            self.tensorboard = _summary_writer_class()(str(folder / "tensorboard"), purge_step=resume_step)
        self.handle = open(self.path, "a", encoding="utf-8")

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

