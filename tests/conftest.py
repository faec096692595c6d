"""Shared test set-up: seeds, and the Triton interpreter on machines without a GPU.

Tests run on the CPU in float64 unless they say otherwise. Kernel tests choose their device from the
environment variable REVGLOW_TEST_DEVICE ("cpu" or "cuda"; default: cuda when available), so the same
tests run unchanged on a GPU.
"""
import itertools
import os

import pytest

# A script run in its own process by test_kernels_compile.py (it refuses to import under the interpreter),
# not a module for --doctest-modules to import.
collect_ignore = ["kernel_compile_check.py"]


def pytest_sessionstart(session):
    """torch's set-up, in every process that collects or runs tests: before collection, so before any test module
    imports triton or torch. pytest-xdist's controller ("dsession") does neither: it would import torch (about
    1 s) for nothing, before it starts its workers, so every worker would start that much later."""
    if session.config.pluginmanager.has_plugin("dsession"):
        return
    import triton_env  # noqa: F401  (first: sets TRITON_INTERPRET before anything imports triton)
    import torch

    # The tests use tiny tensors, which gain nothing from intra-op threads; and when another process competes
    # for the cores, OpenMP's spin-waiting makes each tiny op orders of magnitude slower (seen: a 3-level,
    # 32-step model on 8x8 images took 80 s instead of 2 s). One thread keeps the suite fast and steady.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield


# The tests that take seconds (compiling, or starting processes that import torch) carry the marker
# `long(seconds, share=None)`: about how many seconds of CPU the test takes, or, as a module's pytestmark, all of the
# module's tests together. pytest-xdist's worksteal hands each worker a contiguous share of the collected tests and
# lets an idle worker take the tail of another's queue; when a long test comes late in a share, one worker can still
# be in it at the end while the other idles. pytest_collection_modifyitems therefore puts them at the head of the
# shares, spread so that each worker starts with a similar amount of long work, and the short tests last, to even
# out the end. Only the order changes: every test runs, as before. Long tests with the same `share` pay a cost that
# each pytest process pays once, so they go to the same worker: the fresh-heap measurements share one zygote
# interpreter (tests/pristine.py, share="zygote"), the compile tests dynamo's first compile (share="dynamo").


def _long_test(item):
    """(group, key, seconds) of a long test, None for a short one: the key is its module for a module-wide mark,
    else the test; the group is its share, else the key."""
    mark = item.get_closest_marker("long")
    if mark is None:
        return None
    own = any(m.name == "long" for m in getattr(getattr(item, "function", None), "pytestmark", []))
    key = item.nodeid.split("[")[0] if own else item.nodeid.partition("::")[0]
    return mark.kwargs.get("share") or key, key, mark.args[0]


def pytest_collection_modifyitems(config, items):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))   # the same in every worker: same order
    groups, seconds_of, short = {}, {}, []
    for item in items:
        long_test = _long_test(item)
        if long_test is None:
            short.append(item)
            continue
        family, key, seconds = long_test
        groups.setdefault(family, []).append(item)
        seconds_of.setdefault(family, {})[key] = seconds
    seconds = {family: sum(keys.values()) for family, keys in seconds_of.items()}
    # The shares worksteal sends at the start: the first of k workers gets n // k tests, the next a
    # (k - 1)-th of the rest, and so on (xdist/scheduler/worksteal.py, check_schedule).
    sizes, left = [], len(items)
    for i in range(workers):
        sizes.append(left // (workers - i))
        left -= sizes[-1]
    shares = [[] for _ in sizes]
    load = [0.0] * len(sizes)
    for key in sorted(groups, key=lambda k: -seconds[k]):   # longest first, each to the least loaded share
        fits = [i for i in range(len(shares)) if len(shares[i]) + len(groups[key]) <= sizes[i]] or [0]
        i = min(fits, key=lambda i: load[i])
        shares[i].extend(groups[key])
        load[i] += seconds[key]
    short_left = iter(short)
    ordered = []
    for share, size in zip(shares, sizes):
        ordered.extend(share)
        ordered.extend(itertools.islice(short_left, max(0, size - len(share))))   # (a small selection may run out)
    ordered.extend(short_left)
    assert sorted(map(id, ordered)) == sorted(map(id, items))
    items[:] = ordered


def pytest_report_header(config):
    import triton_env  # noqa: F401  (printed by the controller, which has not imported them; not under -q)
    import torch

    return (f"revglow tests: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
