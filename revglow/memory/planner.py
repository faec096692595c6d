"""The batch planner: a least-squares line of memory against batch, and the largest batch whose step fits a memory
budget with parameters, gradients, Adam state and an allocator margin (`plan_batch`); `parse_size` reads a budget
such as 24GiB.

`search_plan` chooses the batch sizes the line is fitted on: it doubles the batch until the step's memory rises by
far more than a measurement's noise over the last FIT_POINTS of them (at small batches a step's memory is mostly
what does not grow with the batch, and a slope between batch 1 and 2 is the noise's: the same budget gave plans 2.7x
apart), fits those, and reports the spread of the leave-one-out fits with the plan (`BatchPlan`).

Example:
    >>> intercept, slope = fit_line([(1, 12.0), (2, 22.0), (4, 42.0)])
    >>> round(intercept, 6), round(slope, 6)
    (2.0, 10.0)
    >>> plan_batch(fixed_mib=100, intercept_mib=intercept, per_sample_mib=slope, budget_mib=parse_size("1GiB"),
    ...            margin=0.05)
    87
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from revglow.errors import ConfigError

__all__ = ["fit_line", "plan_batch", "parse_size", "allocator_margin", "BatchPlan", "search_plan", "FIT_POINTS",
           "MIN_SPAN_MIB"]

# The plan's line goes through the step's memory at this many batch sizes (the largest measured).
FIT_POINTS = 3
# How far the step's memory must rise over those batch sizes for their slope to be measured, not noise: a process's
# resident set wanders by a MiB or two, and allocators round; with a budget above 8 GiB, 1/64 of the budget. With
# +-2 MiB of noise on each point, the slope of three doubling batches is then within 2.2 * 2 / 128 = 3.4%.
MIN_SPAN_MIB = 128.0


def fit_line(points: Sequence[Tuple[int, float]]) -> Tuple[float, float]:
    """Least-squares line (intercept, slope) of memory against batch."""
    if len(points) == 1:
        b, m = points[0]
        return 0.0, m / b
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((b - mean_b) ** 2 for b, _ in points)
    slope = sum((b - mean_b) * (m - mean_m) for b, m in points) / var
    return mean_m - slope * mean_b, slope


def plan_batch(fixed_mib: float, intercept_mib: float, per_sample_mib: float, budget_mib: float,
               margin: float) -> int:
    """Largest batch b with (fixed + intercept + per_sample * b) * (1 + margin) <= budget (0: none fits).

    Example:
        >>> plan_batch(fixed_mib=100, intercept_mib=10, per_sample_mib=5, budget_mib=1000, margin=0.1)
        159
    """
    if per_sample_mib <= 0:
        raise ConfigError(f"plan_batch: memory per sample must be positive; got {per_sample_mib}")
    room = budget_mib / (1 + margin) - fixed_mib - intercept_mib
    return max(0, int(math.floor(room / per_sample_mib + 1e-9)))


def parse_size(text: str) -> float:
    """'24GiB', '512MiB', '1.5GB', '800M' -> MiB (GB and GiB both read as 2**30 bytes, as device makers' tools do).

    Example:
        >>> parse_size("24GiB"), parse_size("512MiB")
        (24576.0, 512.0)
    """
    t = str(text).strip().lower().replace(" ", "")
    for suffix, scale in (("gib", 1024), ("gb", 1024), ("g", 1024), ("mib", 1), ("mb", 1), ("m", 1),
                          ("tib", 2 ** 20), ("tb", 2 ** 20), ("t", 2 ** 20)):
        if t.endswith(suffix):
            number = t[:-len(suffix)]
            break
    else:
        raise ConfigError(f"memory budget {text!r}: give a number with a unit, e.g. 24GiB or 512MiB")
    try:
        value = float(number)
    except ValueError:
        raise ConfigError(f"memory budget {text!r}: {number!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"memory budget {text!r} must be a positive size")
    return value * scale


def allocator_margin(points: List[Dict]) -> float:
    """Room left for the allocator, as a fraction of the planned peak: on CUDA what the caching allocator reserved
    beyond what it handed out at the peak (measured), on the CPU (whose peaks are measured as resident memory,
    allocator included) a flat 5%; never less than 5%."""
    ratios = [p["reserved_ratio"] for p in points if p.get("reserved_ratio")]
    return max([0.05] + [r - 1 for r in ratios])



@dataclass
class BatchPlan:
    """The largest batch for a budget and how it was found: the line (intercept_mib + per_sample_mib * batch) fitted
    on `points` ((batch, MiB) of the step), over which the step's memory rose by `span_mib` (`span_reached`: at least the span asked for; not
    when the budget left no room to grow the batch further), and the spread of the fits that leave one of those
    batch sizes out: their slopes (`per_sample_range`) and plans (`max_batch_range`)."""

    max_batch: int
    intercept_mib: float
    per_sample_mib: float
    points: Tuple[Tuple[int, float], ...]
    span_mib: float
    span_reached: bool
    per_sample_range: Tuple[float, float]
    max_batch_range: Tuple[int, int]

    @property
    def spread(self) -> float:
        """Width of the leave-one-out slopes relative to the plan's slope (0.05: 5%)."""
        lo, hi = self.per_sample_range
        return (hi - lo) / self.per_sample_mib if self.per_sample_mib > 0 else float("inf")


def search_plan(measure: Callable[[int], Optional[float]], points: Dict[int, float], fixed_mib: float,
                budget_mib: float, margin: float, min_span_mib: Optional[float] = None,
                max_batch: int = 2 ** 20) -> BatchPlan:
    """Plan the largest batch from measurements `points` {batch: MiB of one step above the fixed memory}, measuring
    more with `measure(batch)` (None: it could not: out of memory): the batch doubles until the step's memory rises
    by `min_span_mib` (default: MIN_SPAN_MIB, or 1/64 of the budget if more) over the largest FIT_POINTS batches,
    but never to a batch whose step, at twice the last one's memory, would fill more than half the budget's room.

    Example (a step of 2 MiB plus 0.5 MiB per sample, measured exactly):
        >>> plan = search_plan(lambda b: 2 + 0.5 * b, {1: 2.5, 2: 3.0}, fixed_mib=100, budget_mib=1124, margin=0.0)
        >>> plan.max_batch, [batch for batch, _ in plan.points], plan.per_sample_range
        (2044, [128, 256, 512], (0.5, 0.5))
    """
    points = dict(points)
    span = min_span_mib if min_span_mib is not None else max(MIN_SPAN_MIB, budget_mib / 64)
    room = budget_mib / (1 + margin) - fixed_mib
    while True:
        fit = sorted(points.items())[-FIT_POINTS:]
        rise = fit[-1][1] - fit[0][1]
        if len(fit) >= FIT_POINTS and rise >= span:
            break
        batch = 2 * fit[-1][0]
        if batch > max_batch or 2 * max(0.0, fit[-1][1]) > room / 2:
            break
        measured = measure(batch)
        if measured is None:
            break
        points[batch] = measured
    return _plan_of(fit, fixed_mib, budget_mib, margin, rise, rise >= span)


def _plan_of(fit: List[Tuple[int, float]], fixed_mib: float, budget_mib: float, margin: float, rise: float,
             span_reached: bool) -> BatchPlan:
    """The BatchPlan of the line through `fit`, with the leave-one-out fits' slopes and plans."""
    if len(fit) < 2:
        raise ConfigError(f"profile: the budget leaves no room to measure a second batch size beyond {fit[0][0]}; "
                          f"give a larger budget")
    intercept, slope = fit_line(fit)
    if slope <= 0:
        raise ConfigError(f"profile: the step's memory did not grow with the batch over batches "
                          f"{[b for b, _ in fit]}; no plan")
    others = [fit_line(fit[:i] + fit[i + 1:]) for i in range(len(fit))] if len(fit) > 2 else [(intercept, slope)]
    plans = [plan_batch(fixed_mib, max(0.0, i), s, budget_mib, margin) if s > 0 else 0 for i, s in others]
    return BatchPlan(max_batch=plan_batch(fixed_mib, max(0.0, intercept), slope, budget_mib, margin),
                     intercept_mib=intercept, per_sample_mib=slope, points=tuple(fit),
                     span_mib=rise, span_reached=span_reached,
                     per_sample_range=(min(s for _, s in others), max(s for _, s in others)),
                     max_batch_range=(min(plans), max(plans)))
