"""Activation memory of a training step, measured for real (peak resident memory of a fresh subprocess),
not by counting what the code says it saved."""
import sys

import pytest

from revglow import GlowConfig
from revglow.profiling import training_step_memory_mib

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs")


def _activation(memory, depth):
    cfg = GlowConfig(image_shape=(3, 64, 64), levels=2, depth=depth, hidden=64, memory=memory, kernels="torch")
    return training_step_memory_mib(cfg, batch_size=8)["activation_mib"]


def test_reversible_memory_is_constant_in_depth_and_autograd_is_not():
    reversible = {k: _activation("reversible", k) for k in (2, 8)}
    autograd = {k: _activation("autograd", k) for k in (2, 8)}
    # reversible: at most 10% more from K=2 to K=8
    assert reversible[8] <= 1.10 * reversible[2], reversible
    # plain autograd stores every step: it grows with depth and needs several times more at K=8
    assert autograd[8] >= 2.5 * autograd[2], autograd
    assert autograd[8] >= 3.0 * reversible[8], (autograd, reversible)
    assert reversible[2] > 1.0  # the measurement sees the step's real activations
