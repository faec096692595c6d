"""revglow.memory.workspaces: what an op allocates below the dispatcher, measured on the CPU, against the allocation of
an algorithm whose buffers are known: the fallback convolution's im2col (mkldnn off), which unfolds the whole batch
into columns of C * kh * kw rows by H * W, and needs none for a 1x1 kernel."""
import contextlib
import sys

import pytest
import torch

from revglow.memory.workspaces import OpWorkspaces
from revglow.memory.live_storage import LiveStorageTracker

from forked import forked
from pristine import in_pristine_process

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU's own peak needs /proc"), pytest.mark.long(2, share="zygote")]
conv = torch.ops.aten.convolution.default
MiB = 2 ** 20
# The kernel's resident-set counters are kept per thread and folded in every 64 page faults, so a peak read from
# /proc is exact to a few hundred KiB: the shapes below make the columns 18 MiB, the output 1 MiB.
RESOLUTION = 0.5 * MiB


@contextlib.contextmanager
def mkldnn_off():
    """torch.backends.mkldnn.flags would also set oneDNN's TF32 switch, which warns on builds without Intel GPUs."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _conv_args(n, c_in, c_out, k, size):
    x = torch.randn(n, c_in, size, size, dtype=torch.float64)
    w = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
    return (x, w, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1)


N, C_IN, C_OUT, SIZE = 8, 32, 16, 32
OUTPUT = N * C_OUT * SIZE * SIZE * 8


def _measurements():
    """Every number these tests check, measured in one fresh process with a clean heap (tests/pristine.py)."""
    out = {}
    with mkldnn_off():
        for k in (1, 3):
            args = _conv_args(N, C_IN, C_OUT, k, SIZE)
            out[k] = (torch._C._select_conv_backend(*args[:9], None) == torch._C._ConvBackend.Slow2d,
                      OpWorkspaces().measure(conv, args, {}))
        x, w = _conv_args(N, C_IN, C_OUT, 3, SIZE)[:2]
        with LiveStorageTracker(workspaces=OpWorkspaces()) as tracker:
            y = torch.nn.functional.conv2d(x, w, padding=1)
            z = y * 2                                                  # after the convolution: tensors only
    assert z.shape == y.shape
    out["tracker"] = (tracker.peak, tracker.peak_with_workspace, tracker.workspace_at_peak)
    return out


def test_the_fallback_convolution_grows_by_its_columns_and_its_output_and_the_tracker_adds_that_rise():
    """One test for every number, measured in one fresh process (pytest-xdist cannot split it over two)."""
    measured = in_pristine_process(_measurements)
    for k in (1, 3):
        slow2d, grown = measured[k]
        assert slow2d
        columns = N * C_IN * k * k * SIZE * SIZE * 8 if k > 1 else 0     # a 1x1 kernel reads its input as it is
        assert abs(grown - (OUTPUT + columns)) < RESOLUTION, (k, grown / MiB, (OUTPUT + columns) / MiB)
    # the tracker: the tensors' count unchanged, the convolution's rise added while it ran, its hidden part named
    columns = N * C_IN * 9 * SIZE * SIZE * 8
    peak, peak_with_workspace, (hidden, where) = measured["tracker"]
    assert peak == 2 * OUTPUT
    assert abs(peak_with_workspace - (OUTPUT + columns)) < RESOLUTION
    assert abs(hidden - columns) < RESOLUTION and "convolution" in where


@forked
def test_a_signature_is_measured_once_and_another_shape_again():
    workspaces = OpWorkspaces()
    with mkldnn_off():
        first = workspaces.measure(conv, _conv_args(4, 8, 8, 3, 16), {})
        assert workspaces.measure(conv, _conv_args(4, 8, 8, 3, 16), {}) == first and len(workspaces) == 1
        workspaces.measure(conv, _conv_args(8, 8, 8, 3, 16), {})
    assert len(workspaces) == 2
    with pytest.raises(ValueError, match="repeats"):
        OpWorkspaces(repeats=0)
