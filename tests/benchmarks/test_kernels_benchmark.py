"""benchmarks/kernels.py is a GPU script; here: it imports, its byte counts are right, and without CUDA it
stops with a clear message instead of a traceback."""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    path = os.path.join(ROOT, "benchmarks", "kernels.py")
    spec = importlib.util.spec_from_file_location("revglow_bench_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the module executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_byte_counts(bench):
    n, c, h, w = 16, 12, 128, 128
    act = n * c * h * w * 4
    params = (c * c + 2 * c) * 4
    assert bench.actnorm_conv1x1_bytes(n, c, h, w, "forward") == 2 * act + params
    assert bench.actnorm_conv1x1_bytes(n, c, h, w, "inverse") == 2 * act + params
    # y, dL/dy in; x, dL/dx out; s, b, W, W^-1 in; their gradients (not W^-1's) out
    assert bench.actnorm_conv1x1_bytes(n, c, h, w, "backward") == 4 * act + (2 * c * c + 2 * c) * 4 + params

    ca = 6
    half = n * ca * h * w
    # xa in (4 B), h in (2 * Ca channels), ya out (4 B), logdet out
    assert bench.coupling_affine_bytes(n, ca, h, w, "forward") == 4 * half + 8 * half + 4 * half + 4 * n
    assert bench.coupling_affine_bytes(n, ca, h, w, "forward", torch.bfloat16) == 4 * half + 4 * half + 4 * half + 4 * n
    # ya, h, dL/dya in; xa, dL/dxa, dL/dh (float32, 2 * Ca channels) out; dL/dlogdet in
    assert bench.coupling_affine_bytes(n, ca, h, w, "backward", torch.bfloat16) == (
        4 * half + 4 * half + 4 * half + 4 * n + 4 * half + 4 * half + 8 * half)
    assert bench.copy_bytes(1000) == 8000
    assert bench.copy_bytes(1000, torch.bfloat16) == 4000
    assert bench.gbps(2 * 10 ** 9, 1000.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bench.actnorm_conv1x1_bytes(n, c, h, w, "sideways")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_fails_clearly_without_cuda(bench):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--quick"])
