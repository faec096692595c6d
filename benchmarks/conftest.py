"""pytest set-up of the micro-benchmarks (benchmarks/test_ops.py, run by `make bench-ops`; never by `make test`,
whose testpaths are tests/ and revglow/).

Options: --bench-device (default: cuda when available, else cpu) and --bench-batch (default: 1 on the CPU,
8 on CUDA). The versions, threads, GPU and batch go into the machine info of every saved run (pytest-benchmark
adds the CPU, the git commit and the date), so a saved run says what it measured.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("revglow micro-benchmarks")
    group.addoption("--bench-device", default=None,
                    help="device to time on: cpu or cuda (default: cuda when available, else cpu)")
    group.addoption("--bench-batch", type=int, default=None,
                    help="batch size of every benchmark (default: 1 on the CPU, 8 on CUDA)")


def pytest_configure(config):
    config.addinivalue_line("markers", "glow256: the 256x256 flow-step and model-level benchmarks (slow on the CPU; "
                                       "deselect with -m 'not glow256')")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device {name}: CUDA is not available on this machine")
    return device


def _batch(config) -> int:
    batch = config.getoption("--bench-batch")
    if batch is None:
        return 8 if _device(config).type == "cuda" else 1
    if batch < 1:
        raise pytest.UsageError(f"--bench-batch must be at least 1; got {batch}")
    return batch


@pytest.fixture
def bench_device(request) -> torch.device:
    """The device every benchmark runs on (--bench-device)."""
    return _device(request.config)


@pytest.fixture
def bench_batch(request) -> int:
    """The batch size of every benchmark (--bench-batch)."""
    return _batch(request.config)


def pytest_benchmark_update_machine_info(config, machine_info):
    device = _device(config)
    # What stays fixed on one machine: pytest-benchmark warns when a run is compared with a saved one whose
    # machine info differs, so the date and the git revision stay out (the saved run's commit_info and
    # datetime hold them).
    env = {k: v for k, v in environment(str(device)).items() if k not in ("date", "git")}
    machine_info["revglow"] = dict(env, bench_device=str(device), bench_batch=_batch(config),
                                   triton_interpret=os.environ.get("TRITON_INTERPRET", ""))
