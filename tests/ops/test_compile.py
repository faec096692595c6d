"""GlowConfig(compile=True): the work inside each flow step compiles with fullgraph=True (no graph breaks),
the number of compiled graphs does not grow with depth (the K steps of a level share them), no recompile
limit is hit, and gradients equal eager's. Traced by dynamo with the "eager" backend: the same graphs and
guards as inductor gets, without generating code (inductor would add minutes of C++ compilation; the
benchmark benchmarks/compile_step.py runs it for real)."""
import logging

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from flow_checks import flat_grads, rel_err
from revglow import Glow, GlowConfig

pytestmark = pytest.mark.long(9, share="dynamo")


def _train_steps(depth, compile, batch_sizes=(4, 3)):
    torch.manual_seed(0)
    model = Glow(GlowConfig(image_shape=(1, 8, 8), levels=2, depth=depth, hidden=8, kernels="torch",
                            compile=compile)).double()
    x = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    model.initialize(x)
    for i, n in enumerate(batch_sizes):
        torch.manual_seed(i)
        model(x[:n]).mean().backward()
    with torch.no_grad():
        model.sample(2)   # the inverse compiles too
    return model


def test_compiled_steps_match_eager_and_compile_once_per_shape(monkeypatch, caplog):
    monkeypatch.setenv("REVGLOW_COMPILE_BACKEND", "eager")
    graphs = {}
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for depth in (1, 2):    # one dynamo session: the second model's steps must find the first one's graphs
            compiled = _train_steps(depth, compile=True)
            graphs[depth] = counters["stats"]["unique_graphs"]
            assert not counters["graph_break"], dict(counters["graph_break"])
            eager = _train_steps(depth, compile=False)
            assert rel_err(flat_grads(compiled), flat_grads(eager)) < 1e-9
    # shared by every step (of a level, of a model, of another model): not one graph per step
    assert graphs[2] == graphs[1] > 0
    assert not [r for r in caplog.records if "recompile" in r.getMessage().lower() and "limit" in r.getMessage().lower()]


def test_compile_flag_is_validated():
    with pytest.raises(TypeError, match="compile must be a bool"):
        GlowConfig(compile="yes")
