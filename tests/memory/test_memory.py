"""Activation memory of a training step, measured for real (peak resident memory of a fresh subprocess),
not by counting what the code says it saved."""
import sys

import pytest

from revglow import GlowConfig
from revglow.memory.fresh_process import training_steps_memory_mib

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/clear_refs"), pytest.mark.long(4)]


def _config(memory, depth):
    return GlowConfig(image_shape=(3, 64, 64), levels=2, depth=depth, hidden=64, memory=memory, kernels="torch")


def test_reversible_memory_is_constant_in_depth_and_autograd_is_not():
    """The four measurements in one fresh process, one after another (one interpreter start, not four)."""
    cases = [(memory, k) for memory in ("reversible", "autograd") for k in (2, 8)]
    measured = training_steps_memory_mib([_config(*case) for case in cases], batch_size=8)
    reversible = {k: m["activation_mib"] for (memory, k), m in zip(cases, measured) if memory == "reversible"}
    autograd = {k: m["activation_mib"] for (memory, k), m in zip(cases, measured) if memory == "autograd"}
    # reversible: at most 10% more from K=2 to K=8
    assert reversible[8] <= 1.10 * reversible[2], reversible
    # plain autograd stores every step: it grows with depth and needs several times more at K=8
    assert autograd[8] >= 2.5 * autograd[2], autograd
    assert autograd[8] >= 3.0 * reversible[8], (autograd, reversible)
    assert reversible[2] > 1.0  # the measurement sees the step's real activations
