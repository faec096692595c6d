"""How long a training run is and how its learning rate ramps up: the total steps (from --max-steps, or the steps
that finish --epochs), the linear warm-up in steps, and the LambdaLR scheduler that applies it.

Example:
    >>> from revglow.training.config import TrainConfig
    >>> warmup_steps(TrainConfig(max_steps=100), total_steps=100, batches_per_epoch=10)
    10
    >>> warmup_steps(TrainConfig(warmup_epochs=0.5), total_steps=100, batches_per_epoch=10)
    5
"""
from __future__ import annotations

from typing import List

import torch

from revglow.training.config import DEFAULT_MAX_STEPS, TrainConfig
from revglow.training.loaders import DataPosition, EpochBatchSampler

__all__ = ["total_steps", "warmup_steps", "warmup_scheduler", "apply_learning_rate"]


def total_steps(config: TrainConfig, step: int, position: DataPosition, sampler: EpochBatchSampler) -> int:
    """--max-steps, or the steps that finish --epochs passes from `position` (the data position of step `step`)."""
    if config.epochs is None:
        return config.max_steps if config.max_steps is not None else DEFAULT_MAX_STEPS
    if position.epoch >= config.epochs:
        return step
    full_epochs = config.epochs - position.epoch - 1
    return step + sampler.remaining(position) + full_epochs * sampler.batches_per_epoch


def warmup_steps(config: TrainConfig, total_steps: int, batches_per_epoch: int) -> int:
    """The warm-up in steps: --warmup-epochs converted with the steps per epoch, else --warmup, else
    min(200, total steps // 10)."""
    if config.warmup_epochs is not None:
        return round(config.warmup_epochs * batches_per_epoch)
    if config.warmup is None:
        return min(200, total_steps // 10)
    return config.warmup


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup: List[int]) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate of step k (1, 2, ...) is lr * min(1, k / warmup[0]); the warm-up is read from the
    one-element list `warmup` at every step, so its owner can change it (Trainer.warmup). A list, not a bound method
    of the owner: that would tie the owner into a reference cycle (trainer -> scheduler -> trainer), and with it the
    DataLoader's worker processes.

    The reference's is lr * min(1, (k - 1) / warmup steps) (openai/glow train.py: `n_processed / (n_train *
    epochs_warmup)`, images seen before the step), so its first step runs at learning rate 0: the same ramp, one
    step earlier here. warmup_epochs counts epochs as the trainer does (full global batches, the remainder left
    out)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup[0])))


def apply_learning_rate(scheduler: torch.optim.lr_scheduler.LambdaLR, optimizer: torch.optim.Optimizer,
                        lr: float) -> None:
    """The learning rate `lr` and the scheduler's warm-up, from the scheduler's step on (LambdaLR's own formula,
    so an unchanged lr gives bit for bit the learning rate a checkpointed run would have used)."""
    scheduler.base_lrs = [lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
