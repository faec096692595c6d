"""The CPU benchmark scripts run end to end on tiny problems (their numbers are not checked here: speed and
memory targets are for the scripts' full-size runs), and their rows land where they are told."""
import importlib.util
import json
import os
import sys

import pytest

from forked import forked
from pristine import in_pristine_process

pytestmark = pytest.mark.long(4, share="zygote")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"revglow_bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.pop(0)


def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_step_time_script(tmp_path, capsys):
    results = str(tmp_path / "step.jsonl")
    _load("step_time").main(["--image-size", "8", "--levels", "2", "--depth", "2", "--hidden", "8",
                             "--batch-size", "2", "--rounds", "2", "--warmup", "1", "--results", results,
                             "--memory-format", "channels_last"])
    out = capsys.readouterr().out
    assert "reversible / autograd" in out and "reversible / checkpoint" in out
    rows = _rows(results)
    steps = [r for r in rows if r.get("part") is None]
    assert sorted(r["mode"] for r in steps) == ["autograd", "checkpoint", "reversible", "reversible-bare"]
    assert all(r["contender"] == "revglow" and r["network"] == "plain" for r in rows)
    assert "reversible / reversible without check and RNG replay" in out
    # the floor of the reversible step's extra cost: every coupling network's forward once more
    networks, = [r for r in rows if r.get("part") == "coupling networks' forward"]
    assert 0 < networks["median_s"] < min(r["median_s"] for r in steps)
    assert "the coupling networks' forward alone / autograd step" in out
    assert all(r["median_s"] > 0 and r["git"] and r["torch"] for r in rows)
    assert all(r["memory_format"] == "channels_last" for r in rows)


_PEER = """
import torch
from torch import nn


class AffineCoupling(nn.Module):   # rosinality/glow-pytorch's interface, the network's width a default argument
    def __init__(self, in_channel, filter_size=512, affine=True):
        super().__init__()
        if filter_size != {width}:
            raise AssertionError(f"the peer's couplings were built at width {{filter_size}}, not {width}")
        self.net = nn.Sequential(nn.Conv2d(in_channel // 2, filter_size, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(filter_size, in_channel, 3, padding=1))

    def forward(self, x):
        a, b = x.chunk(2, 1)
        log_s, t = self.net(a).chunk(2, 1)
        s = torch.sigmoid(log_s + 2)
        return torch.cat([a, (b + t) * s], 1), torch.log(s).flatten(1).sum(1)


class Glow(nn.Module):
    def __init__(self, in_channel, n_flow, n_block, affine=True, conv_lu=True):
        super().__init__()
        self.flows = nn.ModuleList(AffineCoupling(4 * in_channel) for _ in range(n_flow))

    def forward(self, x):
        n, c, h, w = x.shape
        out = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
        logdet = 0
        for flow in self.flows:
            out, det = flow(out)
            logdet = logdet + det
        return (-0.5 * out.square()).flatten(1).sum(1), logdet, [out]
"""


def test_step_time_against_a_peer_model_file(tmp_path, capsys):
    """--peer: the peer's Glow built from its file at this problem's width, timed beside revglow's modes."""
    peer = tmp_path / "model.py"
    peer.write_text(_PEER.format(width=8))
    results = str(tmp_path / "step.jsonl")
    _load("step_time").main(["--image-size", "8", "--levels", "1", "--depth", "2", "--hidden", "8",
                             "--batch-size", "2", "--rounds", "2", "--warmup", "1", "--results", results,
                             "--peer", str(peer)])
    out = capsys.readouterr().out
    assert "autograd / peer:" in out and "reversible / peer:" in out
    rows = _rows(results)
    peer_rows = [r for r in rows if r["contender"] == "peer"]
    assert len(peer_rows) == 1 and peer_rows[0]["mode"] == "autograd" and peer_rows[0]["median_s"] > 0
    assert peer_rows[0]["peer"] == "model.py" and all(r["network"] == "plain" for r in rows)
    with pytest.raises(ValueError, match="no Glow"):
        (tmp_path / "empty.py").write_text("x = 1\n")
        _load("step_time").load_peer_module(str(tmp_path / "empty.py"))


@pytest.mark.long(8)
def test_step_time_against_an_earlier_checkout(tmp_path, capsys):
    """--baseline-checkout: the modes of another checkout (here this one) run in a process that imports revglow
    from it, alternating with this run's; their rows say so."""
    results = str(tmp_path / "step.jsonl")
    step_time = _load("step_time")
    step_time.main(["--image-size", "8", "--levels", "1", "--depth", "2", "--hidden", "8", "--batch-size", "2",
                    "--rounds", "2", "--warmup", "1", "--results", results, "--baseline-checkout", ROOT])
    out = capsys.readouterr().out
    assert "reversible / baseline" in out and "(side by side)" in out
    baseline = [r for r in _rows(results) if r["contender"] == "baseline"]
    assert sorted(r["mode"] for r in baseline) == ["autograd", "checkpoint", "reversible"]
    assert all(r["median_s"] > 0 for r in baseline)
    with pytest.raises(ValueError, match="no revglow"):
        step_time.BaselineCheckout(str(tmp_path), None, ["autograd"])


def test_memory_vs_depth_script(tmp_path, capsys, monkeypatch):
    """The script's table, ratios and rows. The measurement itself (a fresh subprocess per configuration) is
    tests/memory/test_memory.py's subject: here it answers with the configuration's depth, so no process is started."""
    from revglow.memory.fresh_process import training_step_memory_mib

    calls = []

    def measure(cfg, batch_size, device="cpu"):
        calls.append((cfg.memory, cfg.depth))
        activation = 1.0 if cfg.memory == "reversible" else float(cfg.depth)
        return {"activation_mib": activation, "peak_mib": 100.0 + activation, "before_mib": 100.0}

    results = str(tmp_path / "mem.jsonl")
    module = _load("memory_vs_depth")
    assert module.training_step_memory_mib is training_step_memory_mib
    monkeypatch.setattr(module, "training_step_memory_mib", measure)
    module.main(["--depths", "1", "2", "--modes", "reversible", "autograd", "--image-size", "16",
                                   "--hidden", "8", "--batch-size", "2", "--results", results])
    out = capsys.readouterr().out
    assert "autograd / reversible at K=2" in out
    rows = _rows(results)
    assert [(r["mode"], r["depth"]) for r in rows] == [("reversible", 1), ("reversible", 2), ("autograd", 1),
                                                       ("autograd", 2)]
    assert all(r["peak_mib"] >= r["before_mib"] > 0 for r in rows)
    assert calls == [("reversible", 1), ("reversible", 2), ("autograd", 1), ("autograd", 2)]


# ------------------------------------------------------------------- sweeps.py, modes.py, headline_256.py
_TINY = ["--image-size", "8", "--levels", "2", "--hidden", "8"]


def test_memory_sweep_rows_and_plot(tmp_path, capsys):
    """A depth sweep on an 8x8 model: one row per mode and K with the measurement's keys, and a PNG."""
    results, png = str(tmp_path / "depth.jsonl"), str(tmp_path / "depth.png")
    _load("sweeps").main(["depth", "--values", "1", "4", "--batch-size", "2", *_TINY, "--results", results,
                          "--plot", png])
    rows = _rows(results)
    assert [(r["mode"], r["depth"]) for r in rows] == [(m, k) for k in (1, 4) for m in
                                                       ("reversible", "checkpoint", "segment", "autograd")]
    for r in rows:
        assert {"git", "date", "torch", "cpu", "activation_mib", "activation_mib_per_sample", "params_mib",
                "grads_mib", "optimizer_mib", "live_at_peak", "image_size", "batch"} <= set(r)
        assert r["activation_mib"] > 0 and r["benchmark"] == "sweep_depth"
    assert next(r["segments"] for r in rows if r["mode"] == "segment" and r["depth"] == 4) == 2
    by = {(r["mode"], r["depth"]): r["activation_mib"] for r in rows}
    assert by[("autograd", 4)] > by[("autograd", 1)]
    assert os.path.getsize(png) > 1000 and open(png, "rb").read(4) == b"\x89PNG"
    assert "relative to reversible" in capsys.readouterr().out


def test_batch_time_and_sample_sweeps(tmp_path, capsys):
    sweeps = _load("sweeps")
    sweeps.main(["batch", "--values", "1", "3", "--depth", "2", "--modes", "reversible", "autograd", *_TINY,
                 "--out-dir", str(tmp_path)])
    rows = _rows(tmp_path / "sweep_batch.jsonl")
    assert [(r["mode"], r["batch"]) for r in rows] == [("reversible", 1), ("reversible", 3), ("autograd", 1),
                                                       ("autograd", 3)]
    sweeps.main(["time", "--values", "2", "--batch-size", "2", "--rounds", "2", *_TINY, "--out-dir", str(tmp_path)])
    rows = _rows(tmp_path / "sweep_time.jsonl")
    assert sorted(r["mode"] for r in rows) == ["autograd", "checkpoint", "reversible", "segment"]
    assert all(r["median_s"] > 0 for r in rows)
    assert next(r["time_vs_autograd"] for r in rows if r["mode"] == "autograd") == 1.0
    assert "ratio to autograd" in capsys.readouterr().out
    sweeps.main(["sample", "--values", "8", "--levels", "2", "--depth", "2", "--hidden", "8", "--rounds", "1",
                 "--out-dir", str(tmp_path)])
    (row,) = _rows(tmp_path / "sweep_sample.jsonl")
    assert row["batch"] == 1 and row["median_s"] > 0 and row["coupling"] == "additive" and row["n_bits"] == 5
    for name in ("batch", "time", "sample"):
        assert (tmp_path / f"sweep_{name}.png").stat().st_size > 1000


def test_sweep_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib raises ImportError
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        _load("sweeps").main(["depth", "--values", "1", "--modes", "reversible", "--batch-size", "1", *_TINY,
                              "--out-dir", str(tmp_path)])
    assert len(_rows(tmp_path / "sweep_depth.jsonl")) == 1    # the rows were written before the plot


def test_segment_checkpointing_gradients_equal_autograd():
    """The checkpoint_sequential baseline: the same gradients as plain autograd (float64), and it really
    recomputes: a step of a checkpointed segment runs twice per training step, one of the last segment once."""
    import torch

    modes = _load("modes")
    from revglow import GlowConfig
    cfg = GlowConfig(image_shape=(3, 8, 8), levels=2, depth=4, hidden=8)
    models = modes.build_models(cfg, ("segment", "autograd"), batch=2)
    x = modes.example_images(cfg, 3)
    calls = []
    seg = models["segment"]
    seg.levels[0].flow.carries[0].step.register_forward_hook(lambda *a: calls.append(0))
    seg.levels[0].flow.carries[3].step.register_forward_hook(lambda *a: calls.append(3))
    grads = {}
    for mode, model in models.items():
        model.double()
        torch.manual_seed(1)          # the same dequantization noise
        model(x).mean().backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert seg.levels[0].flow.segments == 2
    assert sorted(calls) == [0, 0, 3]
    torch.testing.assert_close(grads["segment"], grads["autograd"], rtol=1e-10, atol=1e-12)
    # sampling (no grad) goes through the sequence's own inverse and plain forward
    assert seg.sample(1).shape == (1, 3, 8, 8)


def test_headline_256_script(tmp_path, capsys):
    """The headline script on a tiny configuration (--set): the training-step row, one row per mode with the
    planner's batch for every budget, and the README table."""
    results = str(tmp_path / "headline.jsonl")
    _load("headline_256").main(["--set", "image_shape=[3,16,16]", "--set", "levels=2", "--set", "depth=4",
                                "--set", "hidden=8", "--budgets", "1GiB", "2GiB", "--results", results])
    rows = _rows(results)
    step, modes = rows[0], rows[1:]
    assert step["kind"] == "training_step" and step["step_s"] > 0
    assert [r["mode"] for r in modes] == ["reversible", "checkpoint", "segment", "autograd"]
    for r in modes:
        assert r["config"]["coupling"] == "additive" and r["config"]["n_bits"] == 5
        assert set(r["max_batch"]) == {"1GiB", "2GiB"} and r["max_batch"]["2GiB"] > r["max_batch"]["1GiB"] > 0
        assert [p["batch"] for p in r["points"]] == [1, 2]
    assert "| reversible |" in capsys.readouterr().out


def _conv_workspace_run():
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):    # ~35 MiB apart: clear of the resident set's few-MiB wander
        ratios = _load("conv_workspace").main(["--size", "16", "--batches", "16", "128"])
    return ratios, out.getvalue()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident set needs /proc")
def test_conv_workspace_script():
    """The CPU convolutions use memory per sample that the tensors alone do not show, and that the count with each
    convolution's measured workspace does (what the script shows), measured in a process with a clean heap
    (tests/pristine.py)."""
    ratios, out = in_pristine_process(_conv_workspace_run)
    assert "per sample: counted" in out
    assert ratios["resident_over_tensors"] > 1.2
    assert 0.9 < ratios["resident_over_with_workspace"] < 1.1


@forked
def test_count_vs_resident_measures_each_mode_in_process():
    """The script's measuring process, run here in-process on a tiny model (its ratios mean something only at the
    script's default size, which test_profile holds within 10%): one pair of finite ratios per mode asked for."""
    import math
    ratios = _load("count_vs_resident").measure_once({"size": 8, "levels": 1, "depth": 2, "hidden": 8,
                                                      "batches": [4, 8], "modes": ["reversible", "autograd"]})
    assert set(ratios) == {"reversible", "autograd"}
    assert all(len(pair) == 2 and all(math.isfinite(r) for r in pair) for pair in ratios.values())
