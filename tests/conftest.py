"""Shared test set-up: seeds, and the Triton interpreter on machines without a GPU.

Tests run on the CPU in float64 unless they say otherwise. Kernel tests choose their device from the
environment variable REVGLOW_TEST_DEVICE ("cpu" or "cuda"; default: cuda when available), so the same
tests run unchanged on a GPU.
"""
import os

import torch

# Triton reads TRITON_INTERPRET when it is imported: set it before anything imports triton, so kernels run
# (as the real kernel code, on CPU tensors) under the interpreter on a machine without a GPU.
if not torch.cuda.is_available() or os.environ.get("REVGLOW_TEST_DEVICE", "") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return (f"revglow tests: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
