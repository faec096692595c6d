"""The batch planner on memory curves known exactly, with a measurement's noise added: where it measures, what it
fits, and the spread it reports (revglow.memory.planner.search_plan)."""
import random

import pytest

from revglow.errors import ConfigError
from revglow.memory.planner import FIT_POINTS, fit_line, plan_batch, search_plan

FIXED, BUDGET, MARGIN = 700.0, 8192.0, 0.05


def _noisy(intercept, slope, noise, seed):
    """A step's memory: intercept + slope * batch, read with up to ±noise MiB of error (a resident set's wander)."""
    rng = random.Random(seed)
    return lambda batch: intercept + slope * batch + rng.uniform(-noise, noise)


def _truth(intercept, slope):
    return plan_batch(FIXED, intercept, slope, BUDGET, MARGIN)


def test_noise_at_small_batches_no_longer_moves_the_plan():
    """0.33 MiB per sample under 2 MiB of noise (the reversible paper model's shape): the line through batches 1 and
    2 gives plans that scatter by orders of magnitude; the searched one stays within 4% of the truth."""
    truth = _truth(20.0, 0.33)
    old, new = [], []
    for seed in range(20):
        measure = _noisy(20.0, 0.33, 2.0, seed)
        start = {1: measure(1), 2: measure(2)}
        intercept, slope = fit_line(sorted(start.items()))
        old.append(plan_batch(FIXED, max(0.0, intercept), slope, BUDGET, MARGIN) if slope > 0 else 0)
        plan = search_plan(measure, start, FIXED, BUDGET, MARGIN)
        new.append(plan.max_batch)
        assert len(plan.points) == FIT_POINTS and plan.span_reached and plan.span_mib >= 128
        assert plan.max_batch_range[0] <= plan.max_batch <= plan.max_batch_range[1]
    assert max(old) > 3 * min(old) or min(old) == 0
    assert max(new) <= 1.04 * truth and min(new) >= 0.96 * truth, (min(new), truth, max(new))


def test_exact_measurements_give_the_exact_plan_and_no_spread():
    plan = search_plan(lambda b: 20.0 + 0.5 * b, {1: 20.5, 2: 21.0}, FIXED, BUDGET, MARGIN)
    assert plan.max_batch == _truth(20.0, 0.5) and plan.spread == pytest.approx(0, abs=1e-9)
    assert plan.intercept_mib == pytest.approx(20.0) and plan.per_sample_mib == pytest.approx(0.5)


def test_a_curve_that_bends_shows_in_the_spread():
    """Memory that is not linear in the batch over the fitted points (a convolution switching to an algorithm with
    a larger workspace at batch 128): the leave-one-out fits disagree, and say so."""
    plan = search_plan(lambda b: 0.5 * b + (40.0 if b >= 128 else 0.0), {1: 0.5, 2: 1.0}, FIXED, BUDGET, MARGIN)
    assert plan.spread > 0.1 and plan.max_batch_range[1] > plan.max_batch_range[0]


def test_it_never_measures_past_half_the_room_and_stops_when_memory_runs_out():
    asked = []

    def measure(batch):
        asked.append(batch)
        return 10.0 * batch

    plan = search_plan(measure, {1: 10.0, 2: 20.0}, fixed_mib=100.0, budget_mib=600.0, margin=0.0)
    assert max(asked) * 10.0 * 2 <= (600.0 - 100.0) / 2 * 2       # the next doubling would have passed half of it
    assert not plan.span_reached and plan.max_batch == 50
    out_of_memory = search_plan(lambda b: None if b > 8 else 2.0 * b, {1: 2.0, 2: 4.0}, FIXED, BUDGET, MARGIN)
    assert [b for b, _ in out_of_memory.points] == [2, 4, 8] and not out_of_memory.span_reached


def test_memory_that_does_not_grow_has_no_plan():
    with pytest.raises(ConfigError, match="did not grow with the batch"):
        search_plan(lambda b: 5.0, {1: 5.0, 2: 5.0}, FIXED, BUDGET, MARGIN, max_batch=64)
