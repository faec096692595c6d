"""The batch planner: a least-squares line of memory against batch, and the largest batch whose step fits a memory
budget with parameters, gradients, Adam state and an allocator margin (`plan_batch`); `parse_size` reads a budget
such as 24GiB.

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
from typing import Dict, List, Sequence, Tuple

from revglow.errors import ConfigError

__all__ = ["fit_line", "plan_batch", "parse_size", "allocator_margin"]


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

