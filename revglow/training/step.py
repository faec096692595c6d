"""One training step, top-down: the forward under autocast, the loss, the backward, the all-reduce (under
torch.distributed), the gradient clipping, the optimizer, the learning-rate schedule and the EMA, and what
happens to a step that went wrong.

A non-finite loss or gradient, a numerical error raised in the forward or backward (a singular 1x1 convolution, an
input the reversible engine could not rebuild, a floating-point trap), and an input the reversible backward rebuilt
more than RECONSTRUCTION_FAILURE_FACTOR times worse than the check's tolerance (its gradients are wrong: with
check_reconstruction="warn" the engine only warns) skip the step: parameters, optimizer and EMA stay as they were,
and the step's record says why ("skipped"). The trainer counts skipped steps in a row and stops the run with
TrainingDiverged after TrainConfig.max_bad_steps of them (revglow.training.divergence).

An update that leaves the weights, the EMA or the optimizer state non-finite cannot be skipped: it has happened.
After each update the step computes on the device whether the state is finite (revglow.training.finite_state) and
reads that flag with the next step's loss (single process) or in its all-reduce (torch.distributed), so the check
costs no host sync of its own; that next step is then skipped as "update", and the trainer rolls back or stops.

Example:
    >>> from revglow import Glow, GlowConfig
    >>> from revglow.training.config import TrainConfig
    >>> from revglow.training.distributed import DistributedContext
    >>> model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8))
    >>> optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    >>> step = TrainingStep(model, optimizer, scheduler, None, TrainConfig(), DistributedContext(),
    ...                     torch.device("cpu"), torch.Generator())
    >>> record = step(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), None, step=1, epoch=0)
    >>> "skipped" in record, record["bpd"] > 0
    (False, True)
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from revglow.engine.reconstruction import ReconstructionError, reconstruction_tolerance
from revglow.errors import RevglowError
from revglow.glow.model import Glow
from revglow.training.config import TrainConfig
from revglow.training.distributed import DistributedContext
from revglow.training.ema import ExponentialMovingAverage
from revglow.training.finite_state import StateCheck, nonfinite_parts
from revglow.training.signals import StopSignals

__all__ = ["TrainingStep", "TrainingDiverged", "NonFiniteStepWarning", "FAILURE_ADVICE", "NUMERICAL_ERRORS",
           "RECONSTRUCTION_FAILURE_FACTOR", "reconstruction_errors", "reconstruction_tolerances",
           "reconstruction_far_flag"]

# Numerical failures inside a step that are handled like a non-finite loss: a singular 1x1 convolution
# (torch.linalg), an input the reversible engine could not rebuild, floating-point traps.
NUMERICAL_ERRORS = (torch.linalg.LinAlgError, ReconstructionError, FloatingPointError)
# A rebuilt input this many times worse than the reconstruction check's tolerance fails its step, whatever the
# check's mode: a healthy run stays below the tolerance, and at 10x its gradients are already far off.
RECONSTRUCTION_FAILURE_FACTOR = 10.0
# What to try after a run stopped for each kind of failed step (the keys are the kinds a record's "skipped" names).
FAILURE_ADVICE = {
    "loss": "Try a lower --lr, --grad-clip or --warmup.",
    "gradient": "Try a lower --lr, --grad-clip or --warmup.",
    "singular": ("A 1x1 convolution's weight became singular: try a lower --lr or --grad-clip, or "
                 "--permutation invconv_lu (its LU-parametrised weights stay invertible)."),
    "reconstruction": ("The flow became numerically non-invertible, so the reversible backward cannot rebuild "
                       "its inputs: try a lower --lr or --grad-clip, or resume with --memory checkpoint (it stores "
                       "the inputs instead of rebuilding them)."),
    "numerical": "Try a lower --lr, --grad-clip or --warmup.",
    "update": "Try a lower --lr, --grad-clip or --warmup, or --on-divergence rollback.",
}


class TrainingDiverged(RevglowError, RuntimeError):
    """The run's state went bad (too many failed steps in a row, or an update that left it non-finite); the run
    stopped without touching the last good checkpoint."""


class NonFiniteStepWarning(RuntimeWarning):
    """A step with a non-finite loss or gradient, or a numerical failure, was skipped."""


class TrainingStep:
    """One optimizer step of `model`; calling it returns the step's metrics record, with "skipped" set (and the
    parameters, optimizer and EMA untouched) when the step was not taken.

    Under torch.distributed every rank skips together, the loss logged is the mean over the ranks, and
    `agreed_stop` is the stop signal the ranks agreed on in the step's all-reduce (0: none). The step holds the
    model, optimizer, scheduler and EMA, never the trainer (no reference cycle keeps the trainer's DataLoader
    workers alive). `update_flags` is the device flag of the last update's state (finite_state.state_flags), until
    the next step reads it (None: nothing to read)."""

    def __init__(self, model: Glow, optimizer: torch.optim.Optimizer, scheduler,
                 ema: Optional[ExponentialMovingAverage], config: TrainConfig, dist: DistributedContext,
                 device: torch.device, noise_generator: torch.Generator) -> None:
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        self.config, self.dist, self.device = config, dist, device
        self.noise_generator = noise_generator     # the dequantization noise of training steps
        self.ddp = None
        self.agreed_stop = 0
        self.update_flags: Optional[torch.Tensor] = None
        self.state_check = StateCheck(model, ema, optimizer, device)
        self.tolerances = reconstruction_tolerances(model, config)

    def __call__(self, x: torch.Tensor, y: Optional[torch.Tensor], step: int, epoch: int,
                 signals: Optional[StopSignals] = None) -> Dict:
        """Step number `step` (1, 2, ...) on the batch (x, y) of `epoch`; `signals` are the run's stop signals
        (under torch.distributed the ranks agree on them in the step's all-reduce)."""
        record = {"step": step, "epoch": epoch, "lr": self.optimizer.param_groups[0]["lr"]}
        self.optimizer.zero_grad(set_to_none=True)
        failure, error, value, bpd = self._forward_backward(x, y, record)
        if self.dist.enabled:
            local_failure = failure
            failure, value = self._all_reduce(failure, bpd, signals)   # the loss logged: bits/dim (the class
            # term, if any, is in the gradients, whose norm catches a non-finite one)
            if failure == "update":
                error = None                   # which parts is not told by the all-reduce
            elif failure is not None and local_failure is None and failure != "loss":
                error = "on another process"
        elif failure is not None and failure != "update" and self.update_flags is not None:
            broken = self.read_update_flags()  # the forward failed before the loss read took them
            if broken is not None:
                failure, error = "update", broken
        if failure == "update":
            error = f"the update of step {step - 1} left {error or 'the training state'} non-finite"
        record["bpd"] = value if failure is None and math.isfinite(value) else None
        if failure is not None:
            return self._skip(record, failure, error)
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))  # one device sync
        record["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
        record.update(reconstruction_errors(self.model))
        if not math.isfinite(grad_norm):
            return self._skip(record, "gradient", None)
        far = _far_above_tolerance(record.get("reconstruction_error"), self.tolerances)
        if far is not None:
            return self._skip(record, "reconstruction", far)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        self.update_flags = self.state_check.flags()      # read with the next step's loss
        return record

    def read_update_flags(self, values: Optional[List[float]] = None) -> Optional[str]:
        """Settle the last update's flags (read them now, one sync, unless their `values` were read with something
        else): None when its state was finite or there is none to read, else the parts that were not."""
        if self.update_flags is None:
            return None
        if values is None:
            values = self.update_flags.tolist()
        self.update_flags = None
        broken = nonfinite_parts(values)
        return " and ".join(broken) if broken else None

    def stop_requested(self, signals: Optional[StopSignals]) -> Optional[int]:
        """The signal that asked the run to stop: under torch.distributed as all ranks agreed in the last step,
        else the one `signals` received (None: none)."""
        if self.dist.enabled:
            return self.agreed_stop or None
        return signals.received if signals is not None else None

    def _forward_backward(self, x: torch.Tensor, y: Optional[torch.Tensor],
                          record: Dict) -> Tuple[Optional[str], Optional[str], float, Optional[torch.Tensor]]:
        """The forward under autocast, the loss and its backward: (failure kind or None, error text or None, the
        bits/dim read back (single process), the bits/dim tensor). A programming error propagates."""
        network = self._network()
        failure, error, value, bpd = None, None, math.nan, None
        sync = self.ddp.no_sync() if self.ddp is not None else contextlib.nullcontext()
        try:
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bf16"):
                    out = network(x, y, generator=self.noise_generator, all_losses=True)
                bpd = out.bits_x.float().mean()
                class_bits = (out.bits_y.float().mean() if out.bits_y is not None and self.config.weight_y > 0
                              else None)
                loss = bpd if class_bits is None else bpd + self.config.weight_y * class_bits
                if self.dist.enabled:
                    loss.backward()              # a non-finite loss is caught with the flags, without a sync here
                else:
                    failure, error, value = self._read_loss(loss, bpd, class_bits, record)
                    if failure is None:
                        loss.backward()
        except NUMERICAL_ERRORS as exc:
            failure = ("singular" if isinstance(exc, torch.linalg.LinAlgError) else
                       "reconstruction" if isinstance(exc, ReconstructionError) else "numerical")
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return failure, error, value, bpd

    def _read_loss(self, loss: torch.Tensor, bpd: torch.Tensor, class_bits: Optional[torch.Tensor],
                   record: Dict) -> Tuple[Optional[str], Optional[str], float]:
        """The one read of a single-process step before its backward (logging needs it): the loss, its bits/dim,
        the class head's bits, and the flags of the last update's state. (failure or None, error, bits/dim)."""
        losses = [t.detach().float().reshape(1) for t in (loss, bpd, class_bits) if t is not None]
        flags = [] if self.update_flags is None else [self.update_flags.to(losses[0].device, torch.float32)]
        read = torch.cat(losses + flags).tolist()
        broken = self.read_update_flags(read[len(losses):]) if flags else None
        if broken is not None:
            return "update", broken, math.nan
        if not math.isfinite(read[0]):
            return "loss", None, math.nan
        if class_bits is not None:
            record["class_bits"] = read[2]
        return None, None, read[1]

    def _skip(self, record: Dict, failure: str, error: Optional[str]) -> Dict:
        """The step is not taken: its gradients are dropped and its record says why."""
        self.optimizer.zero_grad(set_to_none=True)
        record["skipped"] = failure
        if error:
            record["error"] = error
        return record

    def _network(self) -> nn.Module:
        """The model, wrapped in DistributedDataParallel under torch.distributed (once)."""
        if not self.dist.enabled:
            return self.model
        if self.ddp is None:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)
        return self.ddp

    def _all_reduce(self, failure: Optional[str], loss: Optional[torch.Tensor],
                    signals: Optional[StopSignals]) -> Tuple[Optional[str], float]:
        """Average the gradients over the ranks and agree on the step's fate, in one pass of all-reduces.

        The gradients are reduced here rather than by DDP's backward hooks (the backward runs under
        `no_sync`): a rank whose step failed (non-finite loss, or a numerical error in the middle of its
        backward) still takes part, and every rank then skips the step together; with the hooks, the others
        would wait forever for buckets it never reduces. The flags ride along, computed on the device: one per
        failure kind (the last update's state, and a reconstruction far above its tolerance, among them) and one
        per stop signal (each summed over the ranks: how many reported it), and the loss sum; reading them back is
        the step's one host sync before the gradient norm.
        """
        kinds, stops = list(FAILURE_ADVICE), list(StopSignals.SIGNALS)
        params = [p for p in self.model.parameters() if p.requires_grad]
        dtype = params[0].dtype
        device = self.dist.collective_device(self.device)
        flags = torch.zeros(len(kinds) + len(stops) + 1, dtype=dtype, device=device)
        if failure is not None:
            flags[kinds.index(failure)] = 1.0
        elif loss is not None:
            loss = loss.detach().to(device, dtype)
            finite = torch.isfinite(loss)
            flags[kinds.index("loss")] = (~finite).to(dtype)
            flags[-1] = torch.where(finite, loss, torch.zeros_like(loss))
            flags[kinds.index("reconstruction")] = reconstruction_far_flag(self.model, self.tolerances).to(device,
                                                                                                      dtype)
        if self.update_flags is not None:
            flags[kinds.index("update")] = (~self.update_flags.all()).to(device, dtype)
            self.update_flags = None
        if signals is not None and signals.received is not None:
            flags[len(kinds) + stops.index(signals.received)] = 1.0
        summed = self.dist.average_gradients(params, flags, device, drop_own=failure is not None)
        summed = summed.double().cpu().tolist()
        failed = [kind for kind, count in zip(kinds, summed) if count > 0]
        stopped = [int(signum) for signum, count in zip(stops, summed[len(kinds):]) if count > 0]
        self.agreed_stop = stopped[0] if stopped else 0
        if "update" in failed:
            failure = "update"
        elif failure is None and failed:
            failure = failed[0]
        return failure, summed[-1] / self.dist.world_size


def reconstruction_tolerances(model: Glow, config: TrainConfig) -> List[float]:
    """Per level, the tolerance of the reconstruction check in this run: the model's reconstruction_tol, else the
    engine's default for the precision the networks run in (bfloat16 under --amp bf16)."""
    autocast = torch.bfloat16 if config.amp == "bf16" else None
    return [flow.tol if getattr(flow, "tol", None) is not None else reconstruction_tolerance(autocast)
            for flow in model.flows]


def reconstruction_errors(model: Glow) -> Dict:
    """Per level, the worst per-sample relative error of the input the reversible backward rebuilt in this
    step (the engine keeps them on the device; read together, after the gradient norm has synced anyway)."""
    errors = model.reconstruction_errors()
    present = [e for e in errors if e is not None]
    if not present:
        return {}
    worst = torch.stack([e.detach().max().float() for e in present]).tolist()
    values = iter(worst)
    return {"reconstruction_error": [next(values) if e is not None else None for e in errors]}


def _far_above_tolerance(errors: Optional[List[Optional[float]]], tolerances: List[float]) -> Optional[str]:
    """The error text of a rebuild more than RECONSTRUCTION_FAILURE_FACTOR times worse than its level's tolerance
    (from the errors reconstruction_errors read), or None."""
    for level, (error, tol) in enumerate(zip(errors or (), tolerances)):
        if error is not None and not error <= RECONSTRUCTION_FAILURE_FACTOR * tol:
            return (f"ReconstructionWarning: level {level}'s rebuilt input is off by relative error {error:.3g}, "
                    f"{error / tol:.3g}x the tolerance {tol:g}")
    return None


def reconstruction_far_flag(model: Glow, tolerances: List[float]) -> torch.Tensor:
    """On the device: 1.0 when a level's rebuilt input of this step is more than RECONSTRUCTION_FAILURE_FACTOR
    times worse than its tolerance, else 0.0 (torch.distributed: it rides in the step's all-reduce)."""
    far = [~(e.detach().float().max() <= RECONSTRUCTION_FAILURE_FACTOR * tol)
           for e, tol in zip(model.reconstruction_errors(), tolerances) if e is not None]
    return torch.stack(far).any().float() if far else torch.zeros(())
