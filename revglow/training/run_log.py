"""What a training run reports as it goes: every step's record and every evaluation in metrics.jsonl (rank 0;
TensorBoard events too when asked for: revglow.training.metrics), and the progress bar (tqdm, rank 0, when asked
for) with smoothed bits/dim, images/s and memory."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional

import torch

from revglow.training.config import TrainConfig
from revglow.training.distributed import DistributedContext
from revglow.training.evaluation import standard_error
from revglow.training.metrics import MetricsLog, NoMetrics

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
    """The metrics log (rank 0 writes it; the other ranks' is a NoMetrics) and the progress bar of one run from
    step `step` to `total_steps`; `resumed_step` is the checkpoint's step on a resume (None: a new run)."""

    def __init__(self, out: Path, resumed_step: Optional[int], config: TrainConfig, dist: DistributedContext,
                 total_steps: int, step: int) -> None:
        self.metrics = MetricsLog(out, resumed_step, config.tensorboard) if dist.is_main else NoMetrics()
        self.progress = ProgressBar(total_steps, step, dist.is_main, config.progress)

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
        self.progress.close()
        self.metrics.close()
