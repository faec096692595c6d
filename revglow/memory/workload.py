"""What `revglow profile` measures: a model in one memory mode with its Adam optimizer, batches and a loss (a
`Workload`: Glow from a GlowConfig, or any module built on ReversibleSequence with an example input), its forward
under bf16 autocast or not (`AMP_MODES`, as `revglow train --amp`), and the measurements of one of its training
steps (`measure_step`: the device's own peak, then the tensor-by-tensor count; `measure_plan_point`: the one of
them the batch planner fits) and of its step time (`time_steps`, interleaved over the modes).
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

from revglow.engine.sequence import ReversibleSequence
from revglow.errors import ConfigError, ConfigTypeError
from revglow.glow.config import GlowConfig
from revglow.memory.device_meters import device_peak as _device_peak
from revglow.memory.live_storage import LiveStorageTracker
from revglow.memory.workspaces import OpWorkspaces

__all__ = ["MiB", "AMP_MODES", "Workload", "glow_workload", "module_workload", "measure_step", "measure_plan_point",
           "time_steps"]

MiB = float(2 ** 20)
AMP_MODES = ("off", "bf16")   # the forward in float32 (the parameters' dtype), or under bfloat16 autocast


class Workload:
    """A model in one memory mode, its Adam optimizer, how to make a batch and a loss, and its autocast (`amp`)."""

    def __init__(self, model: nn.Module, make_batch: Callable[[int], tuple], loss: Callable, device: torch.device,
                 amp: str = "off"):
        if amp not in AMP_MODES:
            raise ConfigError(f"profile: amp must be one of {AMP_MODES}; got {amp!r}")
        self.model, self.make_batch, self.loss, self.device, self.amp = model, make_batch, loss, device, amp
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(self, batch) -> None:
        self.optimizer.zero_grad(set_to_none=False)   # gradients stay allocated, as the sizes below count them
        # as the trainer does: the model call under autocast, the loss and backward outside it
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            loss = self.loss(self.model, *batch)
        loss.float().backward()
        self.optimizer.step()

    def sizes(self) -> Dict[str, float]:
        params = list(self.model.parameters())
        grads = [p.grad for p in params if p.grad is not None]
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts) / MiB  # noqa: E731
        return {"params_mib": size(params), "grads_mib": size(grads), "optimizer_mib": size(state)}


def _set_memory_mode(model: nn.Module, mode: str) -> None:
    sequences = [m for m in model.modules() if isinstance(m, ReversibleSequence)]
    if not sequences:
        raise ValueError("profile: the model holds no ReversibleSequence, so it has no memory mode to switch")
    for seq in sequences:
        seq.memory = mode


def glow_workload(config: GlowConfig, mode: str, device: torch.device, state=None, amp: str = "off"):
    from revglow.glow.model import Glow

    cfg = GlowConfig.from_dict({**config.to_dict(), "memory": mode})
    model = Glow(cfg).to(device)
    c, h, w = cfg.image_shape

    def make_batch(n: int):
        g = torch.Generator().manual_seed(n)
        x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8).to(device)
        y = torch.randint(0, cfg.num_classes, (n,), generator=g).to(device) if cfg.num_classes else None
        return (x, y)

    def loss(model, x, y):
        return model(x, y).mean()

    if state is None:
        model.initialize(*make_batch(max(2, min(16, 64 // max(1, h * w // 1024)))))
    else:
        model.load_state_dict(state)
    return Workload(model, make_batch, loss, device, amp)


def module_workload(model: nn.Module, example: torch.Tensor, mode: str, device: torch.device, loss=None,
                    amp: str = "off"):
    model = model.to(device)
    _set_memory_mode(model, mode)

    def make_batch(n: int):
        reps = math.ceil(n / example.shape[0])
        return (example.to(device).repeat((reps,) + (1,) * (example.dim() - 1))[:n],)

    def default_loss(model, x):
        out = model(x)
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
            raise ConfigTypeError(f"profile: the module returns {type(out).__name__}, not (y, logdet), which the "
                                  f"default loss (a standard-normal negative log-likelihood) needs; in Python, pass "
                                  f"loss=lambda model, x: ... to profile()")
        y, logdet = out
        return (0.5 * y.float().square().flatten(1).sum(1) - logdet.float()).mean()

    return Workload(model, make_batch, loss or default_loss, device, amp)


def measure_step(work: Workload, batch_size: int, device_peak: bool, top: int,
             workspaces: Optional[OpWorkspaces] = None) -> Dict:
    """One batch size: a warm-up step, then the device's peak over one step, then the tracker's count over one
    more. The device goes first: the tracker's own Python objects (one per storage) and the workspace
    measurements would otherwise be part of the heap the device measurement starts from."""
    batch = work.make_batch(batch_size)
    work.step(batch)                       # warm-up: gradients, Adam state, lazy caches
    out = {"batch": batch_size, **work.sizes()}
    meter = _device_peak(work.device) if device_peak else None
    if meter is not None:
        gc.collect(1)                      # what the last steps left in reference cycles (young generations)
        with meter:
            work.step(batch)
        out["device_activation_mib"] = meter.peak / MiB
        if hasattr(meter, "reserved_ratio"):
            out["reserved_ratio"] = meter.reserved_ratio
    with LiveStorageTracker(work.model, top=top, workspaces=workspaces if meter is not None else None) as tracker:
        work.step(batch)
    out["activation_mib"] = tracker.peak / MiB
    out["live_at_peak"] = [{"mib": n / MiB, "tensor": label} for n, label in tracker.at_peak]
    if tracker.workspaces is not None and not tracker.workspace_unmeasured:
        out["activation_with_workspace_mib"] = tracker.peak_with_workspace / MiB
        out["workspace_at_peak"] = {"mib": tracker.workspace_at_peak[0] / MiB, "op": tracker.workspace_at_peak[1]}
    return out


def measure_plan_point(work: Workload, batch_size: int, device_peak: bool) -> Optional[float]:
    """MiB of one step at `batch_size` above the memory held before it, as the planner fits it: the device's own
    peak where it can be measured (`device_peak`), else the tensor-by-tensor count. A warm-up step first; None when
    the device ran out of memory."""
    batch = work.make_batch(batch_size)
    meter = _device_peak(work.device) if device_peak else None
    try:
        work.step(batch)
        if meter is not None:
            gc.collect(1)
            with meter:
                work.step(batch)
            return meter.peak / MiB
        with LiveStorageTracker() as tracker:
            work.step(batch)
        return tracker.peak / MiB
    except (torch.OutOfMemoryError, MemoryError):
        return None
    except RuntimeError as exc:
        if "can't allocate memory" in str(exc):   # the CPU allocator's failure
            return None
        raise


def time_steps(works: Dict[str, Workload], batch_size: int, rounds: int) -> Dict[str, float]:
    batches = {m: w.make_batch(batch_size) for m, w in works.items()}
    times = {m: [] for m in works}
    for mode, work in works.items():   # warm-up: Adam state, lazy caches, first-call costs
        work.step(batches[mode])
    for r in range(rounds):
        for mode in (list(works) if r % 2 == 0 else list(reversed(works))):
            work = works[mode]
            if work.device.type == "cuda":
                torch.cuda.synchronize(work.device)
            t0 = time.perf_counter()
            work.step(batches[mode])
            if work.device.type == "cuda":
                torch.cuda.synchronize(work.device)
            times[mode].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}

