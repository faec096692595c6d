"""Shared test set-up: seeds, and the Triton interpreter on machines without a GPU.

Tests run on the CPU in float64 unless they say otherwise. Kernel tests choose their device from the
environment variable REVGLOW_TEST_DEVICE ("cpu" or "cuda"; default: cuda when available), so the same
tests run unchanged on a GPU.
"""
import os

import triton_env  # noqa: F401  (first: sets TRITON_INTERPRET before anything imports triton)

import pytest  # noqa: E402
import torch  # noqa: E402

# A script run in its own process by test_kernels_compile.py (it refuses to import under the interpreter),
# not a module for --doctest-modules to import.
collect_ignore = ["kernel_compile_check.py"]

# The tests use tiny tensors, which gain nothing from intra-op threads; and when another process competes
# for the cores, OpenMP's spin-waiting makes each tiny op orders of magnitude slower (seen: a 3-level,
# 32-step model on 8x8 images took 80 s instead of 2 s). One thread keeps the suite fast and steady.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return (f"revglow tests: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
