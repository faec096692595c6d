"""What a training run writes as it goes, and the hold it keeps on its folder: every step's record and every
evaluation in metrics.jsonl (rank 0; TensorBoard events too when asked for: revglow.training.metrics), the progress
bar (tqdm, rank 0, when asked for) with smoothed bits/dim, images/s and memory, and the open run folder (rank 0:
its lock, held while the run lives, and its run id: revglow.training.run_folder)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from revglow.training.config import TrainConfig
from revglow.training.distributed import DistributedContext
from revglow.training.evaluation import standard_error
from revglow.training.metrics import MetricsLog, NoMetrics
from revglow.training.run_folder import RunFolder, open_run_folder

__all__ = ["RunLog", "ProgressBar"]


class ProgressBar:
    """The tqdm bar of a run from step `initial` to `total`; shown on the main rank when `show_bar`."""

    def __init__(self, total: int, initial: int, main: bool, show_bar: bool) -> None:
        from tqdm import tqdm

        # In a log file (not a terminal) a bar redrawn ten times a second floods it: redraw every 10 s there.
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, disable=not (show_bar and main), unit="step",
                        dynamic_ncols=True, desc="train", mininterval=0.1 if interactive else 10.0)
        self.main = main
        self.bpd: Optional[float] = None
        self.rate: Optional[float] = None

    def step(self, record: Dict) -> None:
        """One step taken, with its metrics record."""
        self.bpd = record["bpd"] if self.bpd is None else 0.9 * self.bpd + 0.1 * record["bpd"]
        rate = record["images_per_s"]
        self.rate = rate if self.rate is None else 0.9 * self.rate + 0.1 * rate
        self.bar.update(1)
        self.bar.set_postfix(bpd=f"{self.bpd:.3f}", img_s=f"{self.rate:.0f}", mem=f"{record['peak_memory_mb']:.0f}MB",
                             refresh=False)

    def write(self, message: str) -> None:
        """A line above the bar (rank 0 only; printed with the bar off too)."""
        if self.main:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


class RunLog:
    """The metrics log (rank 0 writes it; the other ranks' is a NoMetrics), the progress bar from step `step` to
    `total_steps`, and rank 0's open run folder (None elsewhere) with the run's `run_id` (on every rank).
    `RunLog.open` makes one; `close` it when the run ends (that releases the folder's lock)."""

    def __init__(self, metrics: Union[MetricsLog, NoMetrics], progress: Optional["ProgressBar"],
                 folder: Optional[RunFolder], run_id: Optional[str]) -> None:
        self.metrics, self.progress, self.folder, self.run_id = metrics, progress, folder, run_id

    @classmethod
    def open(cls, out: Path, resume_header: Optional[Dict], config: TrainConfig, dist: DistributedContext,
             total_steps: int, step: int) -> "RunLog":
        """Open the run folder `out` on rank 0 (lock, checks, run id: open_run_folder; `resume_header` is the
        resumed checkpoint's {"step", "run_id"}, None for a new run), then its metrics log (on a resume that
        drops the rows after the checkpoint's step), under the lock. A refusal reaches every rank
        (DistributedContext.run_on_main) and leaves nothing open."""
        opened: Dict = {}

        def open_on_main() -> str:
            folder = open_run_folder(out, config.overwrite, resume_header, config.resume)
            try:
                opened["metrics"] = MetricsLog(out, None if resume_header is None else int(resume_header["step"]),
                                               config.tensorboard)
            except BaseException:
                folder.close()
                raise
            opened["folder"] = folder
            return folder.run_id          # a str: the RunFolder holds a descriptor and stays on rank 0

        run_id = dist.run_on_main(open_on_main)
        try:
            progress = ProgressBar(total_steps, step, dist.is_main, config.progress)
        except BaseException:
            cls(opened.get("metrics", NoMetrics()), None, opened.get("folder"), run_id).close()
            raise
        return cls(opened.get("metrics", NoMetrics()), progress, opened.get("folder"), run_id)

    def step(self, record: Dict) -> None:
        """A step's record: in the metrics log, and on the bar when the step was taken."""
        self.metrics.write(record)
        if "skipped" not in record:
            self.progress.step(record)

    def evaluation(self, step: int, test: torch.Tensor, raw: torch.Tensor, ema: bool,
                   class_head: Optional[Dict[str, float]]) -> None:
        """The per-image test bits/dim of the weights used for samples (`test`: the EMA's when `ema`) and of the
        raw weights, as test_bpd and test_bpd_raw with their standard errors, and the class head's metrics."""
        self.metrics.write({"step": step, "test_bpd": float(test.mean()), "test_bpd_stderr": standard_error(test),
                            "ema": ema, "test_bpd_raw": float(raw.mean()), "test_bpd_raw_stderr": standard_error(raw),
                            **(class_head or {})})

    def write(self, message: str) -> None:
        """A line above the progress bar (rank 0 only)."""
        self.progress.write(message)

    def close(self) -> None:
        """Close the bar and the metrics log, then release the run folder's lock."""
        try:
            if self.progress is not None:
                self.progress.close()
            self.metrics.close()
        finally:
            if self.folder is not None:
                self.folder.close()
                self.folder = None
