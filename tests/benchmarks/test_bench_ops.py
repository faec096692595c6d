"""The micro-benchmarks of benchmarks/test_ops.py (`make bench-ops`) run, so they cannot rot: every parameter set
of the small configurations once with --benchmark-disable, and one saved run that carries the machine info and
the bytes moved. Their timings are not checked here (benchmarks are judged against a previous run, not by tests).

The benchmarks run in a pytest session of their own, as `make bench-ops` runs them (benchmarks/ has its own conftest
and is outside this suite's testpaths), in a forked child of this process.
"""
import importlib.util
import json
import os
import re
import sys
import warnings

import pytest

from forked import run_forked

pytestmark = pytest.mark.long(6)

pytest.importorskip("pytest_benchmark")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join("benchmarks", "test_ops.py")


def _bench_module():
    spec = importlib.util.spec_from_file_location("revglow_bench_test_ops", os.path.join(ROOT, BENCH))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        with warnings.catch_warnings():
            # Its glow256 marker is registered by benchmarks/conftest.py, which this suite does not load.
            warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
            spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def _run_benchmarks(*args, timeout=120):
    """`pytest benchmarks/test_ops.py --bench-device cpu ARGS`, a pytest session of its own in a forked child of
    this process (which has imported torch already: a fresh interpreter would spend seconds on that); its
    output."""
    cmd = [BENCH, "-p", "no:cacheprovider", "--bench-device", "cpu", *args]

    def session():
        os.chdir(ROOT)
        # Without this suite's xdist worker variables, which would make pytest-benchmark believe it runs in
        # parallel and disable itself; and without its conftest and helper modules, whose names the benchmarks'
        # own (benchmarks/conftest.py, common.py) would otherwise resolve to.
        for name in [k for k in os.environ if k.startswith("PYTEST_XDIST")] + ["REVGLOW_KERNELS"]:
            os.environ.pop(name, None)
        for name in ("conftest", "common"):
            sys.modules.pop(name, None)
        return pytest.main(cmd)

    code, out = run_forked(session, timeout)
    assert code == 0, f"pytest {' '.join(cmd)} exited with {code}:\n{out[-6000:]}"
    return out


def test_every_small_benchmark_runs_once():
    out = _run_benchmarks("--benchmark-disable", "-m", "not glow256", "-v")
    outcomes = dict(re.findall(r"::test_\w+\[([\w-]+)\] (PASSED|SKIPPED|FAILED|ERROR)", out))
    bench = _bench_module()

    # The op table is complete: every op, channel count and pass ran on torch; Triton skips on the CPU.
    for op, backends in bench.OPS.items():
        for c in bench.CHANNELS:
            for pass_ in bench.PASSES:
                assert outcomes.get(f"{op}-torch-{c}-{pass_}") == "PASSED", (op, c, pass_, out[-3000:])
                if "triton" in backends:
                    assert outcomes.get(f"{op}-triton-{c}-{pass_}") == "SKIPPED"
    for memory in bench.MEMORY_MODES:
        assert outcomes.get(f"flowstep-torch-small-train_{memory}") == "PASSED"
        assert outcomes.get(f"glow-torch-small-train_{memory}") == "PASSED"
    assert outcomes.get("flowstep-torch-small-forward") == outcomes.get("flowstep-torch-small-inverse") == "PASSED"
    # The coupling network op at the small Glow's sizes, each path, so that a slower bookkeeping shows here.
    small_sides = [side for side in bench.NETWORK_SIZES if side <= 32]
    assert small_sides == [8, 16, 32] and all(bench.NETWORK_SIZES[side][:3:2] == (16, 128) for side in small_sides)
    for side in small_sides:
        for path in bench.NETWORK_PATHS:
            assert outcomes.get(f"coupling_network-{path}-{side}-train") == "PASSED", (path, side)
    assert not any("-256-" in case for case in outcomes), "the glow256 cases were not deselected"
    assert set(outcomes.values()) <= {"PASSED", "SKIPPED"}

    # The 256x256 configurations are valid Glow configurations (building the models is too slow for this suite).
    for memory in bench.MEMORY_MODES:
        cfg = bench._glow_config("256", "torch", memory)
        assert cfg.image_shape == (3, 256, 256) and cfg.levels == 6


def test_a_saved_run_has_machine_info_and_bytes(tmp_path):
    storage = tmp_path / "micro"
    _run_benchmarks("-k", "coupling_additive-torch-12-forward or actnorm_conv1x1-torch-96-backward",
                    "--benchmark-autosave", f"--benchmark-storage={storage}", "--benchmark-max-time=0.001",
                    "--benchmark-min-rounds=2", "--benchmark-warmup=off", "-q")
    saved = list(storage.rglob("*.json"))
    assert len(saved) == 1, saved
    run = json.loads(saved[0].read_text())
    info = run["machine_info"]["revglow"]
    assert info["bench_device"] == "cpu" and info["bench_batch"] == 1 and info["torch"] and info["threads"] >= 1
    assert "date" not in info and "git" not in info  # they would differ from every saved run compared with
    assert run["commit_info"]["id"] and run["datetime"]
    by_name = {b["param"]: b for b in run["benchmarks"]}
    assert set(by_name) == {"coupling_additive-torch-12-forward", "actnorm_conv1x1-torch-96-backward"}

    additive = by_name["coupling_additive-torch-12-forward"]
    # Batch 1, 6 of 12 channels at 128x128: read the half and h, write the result, float32.
    assert additive["extra_info"]["bytes"] == 3 * 6 * 128 * 128 * 4
    actnorm = by_name["actnorm_conv1x1-torch-96-backward"]
    assert actnorm["extra_info"]["shape"] == [1, 96, 16, 16]
    for b in (additive, actnorm):
        assert b["extra_info"]["gbps"] == pytest.approx(b["extra_info"]["bytes"] / b["stats"]["median"] / 1e9)
        assert b["stats"]["rounds"] >= 2
        assert b["options"]["timer"] == "_synchronizing_timer"  # waits for CUDA work before each reading
