"""The kernels compile for an NVIDIA GPU (sm_90) through the real Triton pipeline, down to ptxas, on a
machine without one: catches what the interpreter does not check. Runs in a subprocess because the test
process imports triton under TRITON_INTERPRET=1."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.long(2)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # tests/, where the script lives


def test_kernels_compile_for_sm90():
    triton = pytest.importorskip("triton")
    nvidia_bin = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(nvidia_bin):
        pytest.skip("this Triton install has no NVIDIA backend (ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "kernel_compile_check.py"), "90"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "coupling backward h bf16" in proc.stdout
