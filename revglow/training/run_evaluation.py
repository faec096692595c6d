"""The evaluations of a training run: test bits/dim with the EMA and with the raw weights, the class head's
cross-entropy and accuracy, sample grids, and the per-pixel baseline. Under torch.distributed each rank evaluates
its share of the test split and every rank gets the whole result.

Example:
    >>> evaluation = RunEvaluation(model, ema, data, train_config, DistributedContext(), device)   # doctest: +SKIP
    >>> evaluation.bits_per_dim(use_ema=False).mean()                                          # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager, Dict, List, Optional

import torch
from torch.utils.data import Dataset, Subset

from revglow.glow.model import Glow
from revglow.training.baseline import PixelCategoricalBaseline
from revglow.training.config import TrainConfig
from revglow.training.datasets import ImageData, stack_images
from revglow.training.distributed import DistributedContext
from revglow.training.ema import ExponentialMovingAverage
from revglow.training.evaluation import evaluate_bits_per_dim, evaluate_class_head
from revglow.training.samples import write_sample_grids

__all__ = ["RunEvaluation", "rank_share"]


def rank_share(dataset: Dataset, dist: DistributedContext) -> Dataset:
    """This rank's share of an evaluation split: every world_size-th image from its rank (all of it in one process)."""
    if dist.enabled:
        dataset = Subset(dataset, list(range(dist.rank, len(dataset), dist.world_size)))
    return dataset


class RunEvaluation:
    """The evaluations of one run's model on its data, with the weights evaluation and samples use (the EMA's
    when the run keeps one), at TrainConfig.eval_batch_size (read at each call)."""

    def __init__(self, model: Glow, ema: Optional[ExponentialMovingAverage], data: ImageData, config: TrainConfig,
                 dist: DistributedContext, device: torch.device) -> None:
        self.model, self.ema, self.data, self.config, self.dist, self.device = model, ema, data, config, dist, device

    @property
    def batch_size(self) -> int:
        """Images per evaluation batch: TrainConfig.eval_batch_size, by default the training batch."""
        return self.config.eval_batch_size or self.config.batch_size

    def weights(self, use_ema: bool = True) -> ContextManager[Glow]:
        """The model with the EMA's weights swapped in, when the run keeps an EMA and `use_ema`; else as it is."""
        return self.ema.applied() if self.ema is not None and use_ema else contextlib.nullcontext(self.model)

    def bits_per_dim(self, draws: int = 1, use_ema: bool = True) -> torch.Tensor:
        """Per-image test bits/dim (EMA weights when on and `use_ema`, else the raw weights); under
        torch.distributed each rank does a share. Both weights see the same dequantization noise."""
        test = rank_share(self.data.test, self.dist)
        local = torch.empty(0, dtype=torch.float64)      # (a rank without a share: more processes than images)
        if len(test):
            with self.weights(use_ema) as model:
                local = evaluate_bits_per_dim(model, test, self.batch_size, self.device, draws=draws,
                                              seed=self.config.seed + self.dist.rank, workers=self.config.workers)
        return torch.cat(self.dist.all_gather_object(local)) if self.dist.enabled else local

    def class_head(self) -> Optional[Dict[str, float]]:
        """The class head's test cross-entropy (bits) and accuracy with the weights used for samples (EMA when
        on); None for a model without a class head. Under torch.distributed each rank does a share."""
        if self.model.class_head is None:
            return None
        test = rank_share(self.data.test, self.dist)
        bits, correct = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
        if len(test):
            with self.weights() as model:
                bits, correct = evaluate_class_head(model, test, self.batch_size, self.device, self.config.workers)
        if self.dist.enabled:
            bits, correct = (torch.cat(parts) for parts in zip(*self.dist.all_gather_object((bits, correct))))
        return {"test_class_bits": float(bits.mean()), "test_class_accuracy": float(correct.mean())}

    def write_samples(self, folder: Path, step: int, metrics=None) -> List[Path]:
        """Sample grids of step `step` in `folder` (revglow.training.samples), also handed to `metrics` (a
        MetricsLog) when given; rank 0 only (the others return [])."""
        if not self.dist.is_main:
            return []
        with self.weights() as model:
            paths, grids = write_sample_grids(model, folder, step, self.config.n_samples, self.config.seed,
                                              self.device)
        if metrics is not None:
            metrics.write_images(step, grids)
        return paths

    def baseline_bits_per_dim(self) -> float:
        """Test bits/dim of an independent per-pixel categorical fitted on the train split (the model's n_bits)."""
        train_images, _ = stack_images(self.data.train, workers=self.config.workers)
        test_images, _ = stack_images(self.data.test, workers=self.config.workers)
        baseline = PixelCategoricalBaseline.fit(train_images, n_bits=self.model.config.n_bits)
        return float(baseline.bits_per_dim(test_images).mean())
