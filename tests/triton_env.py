"""The one place the tests set up the Triton interpreter (imported first by conftest.py and by kernel_utils.py).

Triton reads TRITON_INTERPRET when it is imported: this sets it before anything imports triton, so kernels run (as
the real kernel code, on CPU tensors) under the interpreter on a machine without a GPU, or when
REVGLOW_TEST_DEVICE=cpu asks for the CPU. An explicit TRITON_INTERPRET in the environment wins.
"""
import os

import torch

if not torch.cuda.is_available() or os.environ.get("REVGLOW_TEST_DEVICE", "") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
