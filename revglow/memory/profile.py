"""Memory and time of one training step in each memory mode, and the largest batch that fits a budget.

`profile(model_or_config, ...)` (and `revglow profile` on the command line) trains one step of a Glow model, or
of any module built on `ReversibleSequence` with an example input, in each memory mode, and reports:

- parameters, gradients and Adam state (MiB), and the peak memory of the step above them ("activation"),
  measured two ways: exact accounting of the tensor storage the step allocates (`LiveStorageTracker`, a
  dispatch mode, the same on every device: `revglow.memory.live_storage`) and the device's own peak (CUDA's
  max_memory_allocated; on the CPU the peak resident set, with glibc told to hand large freed blocks back at once:
  `revglow.memory.device_meters`);
- where the device can be measured, the count again with each convolution's working buffers added while it
  runs ("with workspace"; they sit below the dispatcher, so the tracker measures them per call signature with
  `revglow.memory.workspaces`): the count that the device's peak should equal, and on the CPU does within 10%;
- the tensors live at the peak (op, shape, and the module or autograd node that made them);
- step time (median of interleaved rounds, without the tracker) and images/s;
- with two or more batch sizes, memory per sample and, given a budget, the largest batch that fits with
  parameters, gradients, Adam state and a measured allocator margin included: planned from a line fitted where its
  slope is measurable (the batch doubles until the step's memory rises far above the noise; `search_plan`:
  `revglow.memory.planner`), with the spread of its leave-one-out fits;
- with `amp="bf16"`, all of it with the forward under bfloat16 autocast (as `revglow train --amp bf16`).

The workloads and the measurement of one step are in `revglow.memory.workload`.

Example:
    >>> from revglow import GlowConfig
    >>> rows = profile(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=2, hidden=8), batch_sizes=(2, 4),
    ...                modes=("reversible",), rounds=1, device_peak=False)
    >>> rows[0]["mode"], rows[0]["activation_mib"] > 0
    ('reversible', True)
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from revglow.engine.options import MEMORY_MODES
from revglow.errors import ConfigError, ConfigTypeError
from revglow.glow.config import GlowConfig
from revglow.memory.device_meters import device_peak as device_meter
from revglow.memory.planner import BatchPlan, allocator_margin, fit_line, parse_size, plan_batch, search_plan
from revglow.memory.workload import (AMP_MODES, Workload, glow_workload, measure_plan_point, measure_step,
                                     module_workload, time_steps)
from revglow.memory.workspaces import OpWorkspaces

__all__ = ["profile", "format_table"]


def profile(model_or_config, example: Optional[torch.Tensor] = None, *, batch_sizes: Sequence[int] = (1, 2),
            modes: Sequence[str] = MEMORY_MODES, device: str = "cpu", rounds: int = 3, budget: Optional[str] = None,
            verify: bool = False, device_peak: bool = True, top: int = 5, loss: Optional[Callable] = None,
            amp: str = "off", plan_span_mib: Optional[float] = None) -> List[Dict]:
    """One row per memory mode; see the module docstring. `model_or_config` is a GlowConfig, or a module with
    ReversibleSequence inside it together with `example` (a batch of inputs; larger batches repeat it) and
    optionally `loss(model, x) -> scalar` (default: a standard-normal negative log-likelihood of its (y, logdet)).
    `plan_span_mib`: the rise of the step's memory the planner's batch sizes must span (see `search_plan`)."""
    dev = _check_request(batch_sizes, modes, budget, device, amp)
    batch_sizes = sorted(set(batch_sizes))
    make = _workload_factory(model_or_config, example, modes, dev, loss, amp)
    works = {mode: make(mode) for mode in modes}
    workspaces = OpWorkspaces()   # shared by the modes: their convolutions are the same calls
    rows = []
    step_times = time_steps(works, batch_sizes[-1], rounds) if rounds > 0 else {}
    budget_mib = parse_size(budget) if budget is not None else None
    for mode in modes:
        points = [measure_step(works[mode], b, device_peak, top, workspaces) for b in batch_sizes]
        row = _mode_row(mode, points, step_times.get(mode), batch_sizes[-1])
        row["amp"] = amp
        if budget_mib is not None:
            plan = _plan(row, points, works[mode], budget_mib, device_peak, plan_span_mib)
            if verify and row["max_batch"] > 0:
                row["max_batch"], row["verify"] = _refine_and_verify(
                    make(mode), row["max_batch"], list(plan.points),
                    row["params_mib"] + row["grads_mib"] + row["optimizer_mib"], budget_mib, row["allocator_margin"],
                    top, device_peak)
        rows.append(row)
    return rows


def _check_request(batch_sizes, modes: Sequence[str], budget: Optional[str], device: str, amp: str) -> torch.device:
    """ConfigErrors for what profile() cannot measure: batch sizes that are not positive ints, unknown memory
    modes or autocast, a budget with fewer than two batch sizes to fit a line through, a device that is not the
    CPU or an available GPU. Returns the device."""
    if isinstance(batch_sizes, int) or not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                              for b in batch_sizes):
        raise ConfigError(f"profile: batch_sizes must be positive ints; got {batch_sizes!r}")
    for mode in modes:
        if mode not in MEMORY_MODES:
            raise ConfigError(f"profile: unknown memory mode {mode!r}; choose from {MEMORY_MODES}")
    if amp not in AMP_MODES:
        raise ConfigError(f"profile: amp must be one of {AMP_MODES}; got {amp!r}")
    if budget is not None and len(set(batch_sizes)) < 2:
        raise ConfigError("profile: a budget needs at least two batch sizes to fit memory against batch")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"profile: {device!r} is not a device name (try cpu, cuda or cuda:0)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"profile: measures on the CPU or a CUDA device; got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"profile: device {device!r}: CUDA is not available on this machine")
    return dev


def _workload_factory(model_or_config, example: Optional[torch.Tensor], modes: Sequence[str], dev: torch.device,
                      loss: Optional[Callable], amp: str) -> Callable[[str], Workload]:
    """mode -> the Workload of that memory mode: a Glow of the config (every mode with the first one's initial
    weights), or a copy of the module."""
    if isinstance(model_or_config, GlowConfig):
        first = glow_workload(model_or_config, modes[0], dev, amp=amp)
        state = first.model.state_dict()
        return lambda mode: first if mode == modes[0] else glow_workload(model_or_config, mode, dev, state, amp)
    if isinstance(model_or_config, nn.Module):
        if not isinstance(example, torch.Tensor):
            raise ConfigTypeError("profile: a module needs an example input tensor (example=...)")
        base = model_or_config
        return lambda mode: module_workload(copy.deepcopy(base), example, mode, dev, loss, amp)
    raise ConfigTypeError(f"profile: expects a GlowConfig or an nn.Module; got {type(model_or_config).__name__}")


def _mode_row(mode: str, points: List[Dict], step_s: Optional[float], timed_batch: int) -> Dict:
    """The report of one memory mode from its measurements at each batch size (`points`, the largest last) and its
    step time at batch `timed_batch` (None: not timed)."""
    last = points[-1]
    intercept, slope = fit_line([(p["batch"], p["activation_mib"]) for p in points])
    row = {"mode": mode, "batch": last["batch"], "params_mib": last["params_mib"], "grads_mib": last["grads_mib"],
           "optimizer_mib": last["optimizer_mib"], "activation_mib": last["activation_mib"],
           "activation_mib_per_sample": slope if len(points) > 1 else last["activation_mib"] / last["batch"],
           "activation_mib_fixed": intercept if len(points) > 1 else None,
           "device_activation_mib": last.get("device_activation_mib"),
           "step_s": step_s, "images_per_s": timed_batch / step_s if step_s is not None else None,
           "live_at_peak": last["live_at_peak"],
           "points": [{key: p.get(key) for key in ("batch", "activation_mib", "activation_with_workspace_mib",
                                                   "device_activation_mib")} for p in points]}
    if all("activation_with_workspace_mib" in p for p in points):
        row["activation_with_workspace_mib"] = last["activation_with_workspace_mib"]
        row["workspace_at_peak"] = last["workspace_at_peak"]
        if len(points) > 1:
            row["activation_with_workspace_mib_per_sample"] = fit_line(
                [(p["batch"], p["activation_with_workspace_mib"]) for p in points])[1]
    device_points = _device_points(points)
    if len(device_points) == len(points) and len(points) > 1:
        row["device_activation_mib_per_sample"] = fit_line(device_points)[1]
    return row


def _device_points(points: List[Dict]) -> List[Tuple[int, float]]:
    """(batch, the device's own peak above the fixed memory) of the measurements that have one."""
    return [(p["batch"], p["device_activation_mib"]) for p in points if p.get("device_activation_mib") is not None]


def _plan(row: Dict, points: List[Dict], work: Workload, budget_mib: float, device_peak: bool,
          span_mib: Optional[float]) -> BatchPlan:
    """The largest batch for `budget_mib` into `row` (max_batch, the plan with its spread, the allocator margin and
    the budget). Planned from the device's own peaks where the device can be measured (they include what no tensor
    shows: a convolution library's workspace, the allocator's rounding), else from the tracker's count; the
    measurements at the batch sizes asked for start the planner's search."""
    use_device = device_peak and device_meter(work.device) is not None and len(_device_points(points)) == len(points)
    start = dict(_device_points(points)) if use_device else {p["batch"]: p["activation_mib"] for p in points}
    margin = allocator_margin(points)
    fixed = row["params_mib"] + row["grads_mib"] + row["optimizer_mib"]
    plan = search_plan(lambda b: measure_plan_point(work, b, use_device), start, fixed, budget_mib, margin, span_mib)
    row["allocator_margin"] = margin
    row["budget_mib"] = budget_mib
    row["max_batch"] = plan.max_batch
    row["plan"] = {**asdict(plan), "points": [list(p) for p in plan.points], "spread": plan.spread,
                   "measure": "device" if use_device else "count"}
    return plan


def _refine_and_verify(work: Workload, batch: int, points: List[Tuple[int, float]], fixed_mib: float,
                       budget_mib: float, margin: float, top: int, device_peak: bool = True, max_rounds: int = 4):
    """Train one step at the planned batch for real; while the plan moves, refit the line through the two
    measured points nearest to it and try again (a line from small batches extrapolates poorly: per-step
    overheads that do not grow with the batch make it too steep). Returns (batch, the last measurement)."""
    points = sorted(points)

    def measure(b):
        out = measure_step(work, b, device_peak=device_peak, top=top)
        peak = out.get("device_activation_mib", out["activation_mib"])
        return peak, {"batch": b, "activation_mib": out["activation_mib"],
                      "device_activation_mib": out.get("device_activation_mib"), "total_mib": fixed_mib + peak}

    for _ in range(max_rounds):
        peak, measured = measure(batch)
        points = sorted([p for p in points if p[0] != batch] + [(batch, peak)])
        intercept, slope = fit_line(sorted(points, key=lambda p: abs(p[0] - batch))[:2])
        new_batch = plan_batch(fixed_mib, max(0.0, intercept), slope, budget_mib, margin) if slope > 0 else batch
        if new_batch == batch or new_batch < 1:
            return batch, measured
        batch = new_batch
    return batch, measure(batch)[1]


# ------------------------------------------------------------------------------------------- report
def _cell(value: Optional[float], fmt: str) -> str:
    """`value` in `fmt` (such as "9.1f"), or "-" right-aligned to the same width where there is none."""
    return f"{value:{fmt}}" if value is not None else f"{'-':>{fmt.split('.')[0]}}"


def format_table(rows: List[Dict]) -> str:
    """The plain-text table `revglow profile` prints. "activ.": the tensors' count; "+ wksp": the same count with
    each convolution's working buffers added while it runs (where the device can be measured); "device": the
    device's own peak; "/sample": memory per sample: with a budget the slope the plan uses, else that of the count
    (with workspace where there is one)."""
    lines = []
    head = (f"{'mode':<11} {'params':>8} {'grads':>8} {'adam':>8} {'activ.':>9} {'+ wksp':>9} {'device':>9} "
            f"{'/sample':>9} {'step s':>8} {'img/s':>8}")
    if any("max_batch" in r for r in rows):
        head += f" {'max batch':>10}"
    lines.append(head + "   (MiB)")
    for r in rows:
        per_sample = (r["plan"]["per_sample_mib"] if "plan" in r else
                      r.get("activation_with_workspace_mib_per_sample", r["activation_mib_per_sample"]))
        line = (f"{r['mode']:<11} {r['params_mib']:8.1f} {r['grads_mib']:8.1f} {r['optimizer_mib']:8.1f} "
                f"{r['activation_mib']:9.1f} {_cell(r.get('activation_with_workspace_mib'), '9.1f')} "
                f"{_cell(r.get('device_activation_mib'), '9.1f')} {per_sample:9.4f} "
                f"{_cell(r.get('step_s') or None, '8.3f')} {_cell(r.get('images_per_s') or None, '8.1f')}")
        if "max_batch" in r:
            line += f" {r['max_batch']:10d}"
        lines.append(line)
    for r in rows:
        lines.append(f"\n{r['mode']}: largest tensors alive at the peak (batch {r['batch']})")
        for item in r["live_at_peak"]:
            lines.append(f"  {item['mib']:9.2f} MiB  {item['tensor']}")
        if r.get("workspace_at_peak", {}).get("mib"):
            w = r["workspace_at_peak"]
            lines.append(f"  counted with workspaces, the peak is at {w['op']}; its working buffers hold {w['mib']:.2f} MiB")
        if "plan" in r:
            lines.extend(_plan_lines(r))
        if "verify" in r:
            v = r["verify"]
            lines.append(f"  verified: one step at batch {v['batch']} peaked at {v['total_mib']:.1f} MiB with "
                         f"parameters, gradients and Adam state ({'within' if v['total_mib'] <= r['budget_mib'] else 'OVER'}"
                         f" the budget)")
    return "\n".join(lines)



def _plan_lines(row: Dict) -> List[str]:
    """How the largest batch of `row` was planned: the line, what it was fitted on, and its spread."""
    plan = row["plan"]
    batches = [b for b, _ in plan["points"]]
    measure = "the device's peak" if plan["measure"] == "device" else "the tensors' count"
    lo, hi = plan["per_sample_range"]
    lines = [f"  plan: {plan['per_sample_mib']:.4f} MiB per sample + {plan['intercept_mib']:.1f} MiB, fitted on "
             f"{measure} at batches {batches} (a rise of {plan['span_mib']:.0f} MiB); leave-one-out slopes "
             f"{lo:.4f}-{hi:.4f} ({100 * plan['spread']:.1f}%)",
             f"  budget {row['budget_mib']:.0f} MiB, allocator margin {100 * row['allocator_margin']:.0f}%: largest "
             f"batch {row['max_batch']} (leave-one-out fits: {plan['max_batch_range'][0]}-{plan['max_batch_range'][1]})"]
    if plan["spread"] > 0.1:
        lines.append(f"  warning: the leave-one-out slopes differ by {100 * plan['spread']:.0f}%: memory does not "
                     f"grow linearly over these batches, so the plan is uncertain; --verify measures it")
    if not plan["span_reached"]:
        lines.append("  warning: the budget left no room to grow the batch until its memory rose well above the "
                     "noise; the plan is uncertain: --verify measures it")
    return lines
