"""What a training run does when its state goes bad, so that it never saves, names or keeps a broken state.

A run's state is bad when an update left its weights, EMA weights or optimizer state non-finite
(revglow.training.finite_state), or left a model that cannot take a step: the step that breaks a model usually
has a finite loss itself (it was computed before its update), and a model with finite weights can still overflow
on every input, or give non-finite gradients, so finite weights alone do not make a checkpoint resumable.
`DivergenceGuard.verify` checks all of it in one host sync, with one forward and backward of the last training
batch (a generator of its own, so no training stream moves; the gradients are dropped), before every checkpoint is
written: a checkpoint is a state from which a step can be taken. Failed steps in a row (TrainConfig.max_bad_steps)
and an update that the next step finds non-finite (revglow.training.step) are divergence too.

On divergence, TrainConfig.on_divergence says what happens:
    stop      TrainingDiverged, naming the last good checkpoint (every checkpoint was verified before it was
              written, so it resumes).
    rollback  the weights, EMA and optimizer state go back to the good state kept in memory (`GoodState`, on the
              CPU), the learning rate is halved (its schedule scaled: revglow.training.schedule.apply_learning_rate),
              the offending batch stays skipped, the rollback is logged in metrics.jsonl ({"step", "rollback":
              {...}}), and the run goes on; after TrainConfig.max_rollbacks of them, the next divergence stops the
              run. The state is copied every TrainConfig.rollback_every steps taken and at every checkpoint, and a
              copy becomes the good state once a step has been taken from it (its loss, gradient and update were
              fine), which costs no sync. The step counter goes on (the steps since the good state are lost, not
              repeated), and checkpoints carry the halved learning rate, so a resume without --lr continues at it.

Example:
    >>> guard = DivergenceGuard(model, ema, optimizer, scheduler, training_step, config, DistributedContext(),
    ...                         device, Path("runs/digits/checkpoint.pt"))                        # doctest: +SKIP
    >>> guard.verify((x, y), step=10)          # None: the state is good                         # doctest: +SKIP
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from revglow.training.config import TrainConfig
from revglow.training.distributed import DistributedContext
from revglow.training.ema import ExponentialMovingAverage
from revglow.training.finite_state import nonfinite_parts
from revglow.training.schedule import apply_learning_rate
from revglow.training.step import (FAILURE_ADVICE, NUMERICAL_ERRORS, NonFiniteStepWarning, TrainingDiverged,
                                   TrainingStep, reconstruction_far_flag)

__all__ = ["DivergenceGuard", "GoodState", "batch_step_flags", "failed_steps_reason", "warn_skipped_step"]


def warn_skipped_step(record: Dict) -> None:
    """Warn (NonFiniteStepWarning) about the skipped step of `record`; the warning points at the code that called
    the trainer's run()."""
    reason = record["skipped"]
    what = (f"non-finite {reason} (bits/dim {record['bpd']})" if reason in ("loss", "gradient")
            else f"numerical failure ({record.get('error', reason)})")
    warnings.warn(f"step {record['step']}: {what}; step skipped, parameters unchanged", NonFiniteStepWarning,
                  stacklevel=5)


def failed_steps_reason(record: Dict, bad_steps: int, step: int) -> str:
    """Why a run diverged after `bad_steps` failed steps in a row, the last of them `record`, after step `step`."""
    reason = record["skipped"]
    last = (f"non-finite {reason}" if reason in ("loss", "gradient")
            else f"numerical failure, {record.get('error', reason)}")
    return f"{bad_steps} non-finite steps in a row (last: {last}) after step {step}"


def batch_step_flags(step: TrainingStep,
                     batch: Tuple[torch.Tensor, Optional[torch.Tensor]]) -> Tuple[torch.Tensor, Optional[str]]:
    """(Float [3] on the step's device, 1.0 for good: whether the training loss of the step's model on `batch`
    (x, y) is finite, whether its gradient is, and whether its reversible rebuild stays within
    RECONSTRUCTION_FAILURE_FACTOR of the tolerance; the numerical error raised, if any, which fails all three): the
    step's computation (Glow.losses under the run's autocast, backward), with a dequantization generator of its own
    (seed 0); the gradients are dropped after."""
    model, config, device = step.model, step.config, step.device
    x, y = batch
    error = None
    try:
        with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp == "bf16"):
            out = model.losses(x, y, generator=torch.Generator(device).manual_seed(0))
        loss = out.bits_x.float().mean()
        if out.bits_y is not None and config.weight_y > 0:
            loss = loss + config.weight_y * out.bits_y.float().mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        gradient = torch.stack(torch._foreach_norm(grads)).sum() if grads else torch.zeros((), device=device)
        far = reconstruction_far_flag(model, step.tolerances).to(device).bool()
        flags = torch.stack([torch.isfinite(loss), torch.isfinite(gradient), ~far]).float()
    except NUMERICAL_ERRORS as exc:
        flags = torch.zeros(3, device=device)
        error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    finally:
        model.zero_grad(set_to_none=True)
    return flags, error


def _cpu_copy(value: Any) -> Any:
    """`value` (a state dict: nested dicts, lists and tuples of tensors and plain values) with its tensors copied to
    the CPU."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return copy.deepcopy(value)


class GoodState:
    """A copy of a run's weights, EMA and optimizer state at step `step`, on the CPU (a run that saves memory with
    the reversible engine should not spend four copies of its parameters on the accelerator for it)."""

    def __init__(self, model: nn.Module, ema: Optional[ExponentialMovingAverage], optimizer: torch.optim.Optimizer,
                 step: int) -> None:
        self.step = step
        self.model = _cpu_copy(model.state_dict())
        self.ema = _cpu_copy(ema.state_dict()) if ema is not None else None
        self.optimizer = _cpu_copy(optimizer.state_dict())

    def restore(self, model: nn.Module, ema: Optional[ExponentialMovingAverage],
                optimizer: torch.optim.Optimizer) -> None:
        """Put the copy back (copies again: loading may alias the tensors it is given, and the copy must survive
        the training that follows, for a later rollback)."""
        model.load_state_dict(self.model)
        if ema is not None and self.ema is not None:
            ema.load_state_dict(copy.deepcopy(self.ema))
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))


class DivergenceGuard:
    """Verifies a run's state and handles its failed steps and divergence as TrainConfig.on_divergence says
    (module docstring); `checkpoint` is the run's checkpoint.pt, which a stop names as the last good one.

    `lr` is the run's learning rate (halved by each rollback), `rollbacks` how many the run made and `bad_steps`
    its failed steps in a row (checkpoints carry all three); `last_batch` is the last training batch (x, y), set
    by the trainer, which `verify` runs the model on."""

    def __init__(self, model: nn.Module, ema: Optional[ExponentialMovingAverage], optimizer: torch.optim.Optimizer,
                 scheduler, step: TrainingStep, config: TrainConfig, dist: DistributedContext,
                 device: torch.device, checkpoint: Path) -> None:
        self.model, self.ema, self.optimizer, self.scheduler = model, ema, optimizer, scheduler
        self.training_step, self.config, self.dist, self.device = step, config, dist, device
        self.checkpoint = checkpoint
        self.lr = float(config.lr)
        self.rollbacks, self.bad_steps = 0, 0
        self.good: Optional[GoodState] = None
        self.candidate: Optional[GoodState] = None      # a copy no step has been taken from yet
        self.good_steps = 0          # steps taken since the state was last copied
        self.last_batch: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self.verified_step = -1      # the step whose state verify() found good

    @property
    def rolls_back(self) -> bool:
        return self.config.on_divergence == "rollback"

    def failed_step(self, record: Dict, step: int, log) -> None:
        """A step not taken (`record`), after step `step`: an update that left a bad state diverges at once; other
        failures are warned about and diverge after max_bad_steps of them in a row. `log` is the run's RunLog."""
        if record["skipped"] == "update":
            self.diverged(record["error"], "update", step, log)
            return
        self.bad_steps += 1
        warn_skipped_step(record)
        if self.bad_steps >= self.config.max_bad_steps:
            self.diverged(failed_steps_reason(record, self.bad_steps, step), record["skipped"], step, log)

    def taken_step(self) -> None:
        """A step was taken: the failed ones in a row end, the copy it was taken from becomes the good state, and
        the good state ages by a step."""
        self.bad_steps = 0
        self.good_steps += 1
        if self.candidate is not None:
            self.good, self.candidate = self.candidate, None

    def ensure_good(self, step: int, log) -> None:
        """Diverge (stop or roll back) unless the state after step `step` is good; verified once per step."""
        if self.verified_step != step:
            reason = self.verify(self.last_batch, step)
            if reason is not None:
                self.diverged(reason, "update", step, log)
            self.verified_step = step

    def verify(self, batch: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]], step: int) -> Optional[str]:
        """None when the state after step `step` is good: finite weights, EMA and optimizer state, and a finite
        loss and gradient on `batch` (the last training batch; None: not checked). Else why not. One host sync
        (and, under torch.distributed, one small all-reduce: every rank must call it, and all agree)."""
        flags, error = self.training_step.state_check.flags().float(), None
        if batch is not None:
            batch_flags, error = batch_step_flags(self.training_step, batch)
            flags = torch.cat([flags, batch_flags])
        values = flags.tolist()
        self.training_step.update_flags = None             # this read settles them
        reason, broken = None, nonfinite_parts(values[:3])
        if broken:
            reason = f"the training state after step {step} is not finite ({' and '.join(broken)})"
        elif len(values) > 3 and not all(values[3:]):
            what = (f"step on its batch raised {error}" if error is not None else
                    "loss on its batch is not finite" if not values[3] else
                    "gradient on its batch is not finite" if not values[4] else
                    "reversible backward's rebuild of its batch is far off")
            reason = f"after step {step} the {what}: that step's update broke the model"
        if self.dist.enabled and self.dist.max_over_ranks(int(reason is not None), self.device) and reason is None:
            reason = f"the state after step {step} went bad on another process"
        return reason

    def keep_good(self, step: int) -> None:
        """Copy the current state (rollback mode only); it becomes the good state once a step is taken from it."""
        if self.rolls_back:
            self.candidate = GoodState(self.model, self.ema, self.optimizer, step)
            self.good_steps = 0

    def keep_due(self) -> bool:
        """Whether the state is due to be copied (rollback mode: every rollback_every steps taken)."""
        return self.rolls_back and self.good_steps >= self.config.rollback_every

    def diverged(self, reason: str, kind: str, step: int, log) -> None:
        """The run diverged (`reason`, a failure `kind` of FAILURE_ADVICE) at step `step`: stop (TrainingDiverged
        naming the last good checkpoint), or roll back to the good state and log it to `log` (a RunLog)."""
        last_good = (f"the last good checkpoint is {self.checkpoint}" if self.checkpoint.exists()
                     else "no checkpoint was written yet")
        if not self.rolls_back or self.good is None:
            raise TrainingDiverged(f"{reason}; stopping ({last_good}). {FAILURE_ADVICE[kind]}")
        if self.rollbacks >= self.config.max_rollbacks:
            raise TrainingDiverged(f"{reason}, after {self.rollbacks} rollback(s) (--max-rollbacks "
                                   f"{self.config.max_rollbacks}, learning rate now {self.lr:g}); stopping "
                                   f"({last_good}). {FAILURE_ADVICE[kind]}")
        self.good.restore(self.model, self.ema, self.optimizer)
        self.candidate = None
        self.optimizer.zero_grad(set_to_none=True)
        self.training_step.update_flags = None
        self.rollbacks += 1
        self.lr *= 0.5
        apply_learning_rate(self.scheduler, self.optimizer, self.lr)
        self.bad_steps, self.good_steps, self.verified_step = 0, 0, step    # the good state was verified
        rollback = {"to_step": self.good.step, "reason": reason, "lr": self.lr, "count": self.rollbacks}
        log.metrics.write({"step": step, "rollback": rollback})
        log.write(f"step {step}: {reason}; rolled back to the state of step {self.good.step} at learning rate "
                  f"{self.lr:g} (rollback {self.rollbacks} of at most {self.config.max_rollbacks})")
