"""Micro-benchmarks (pytest-benchmark) of every fused op, one flow step and one Glow training step, kept across
revisions: `make bench-ops` saves each run under benchmarks/results/micro/DEVICE/, and
`pytest-benchmark compare` holds a change against the previous run on the same machine (README, "Micro-benchmarks across revisions").

Test ids read as a table, op-backend-channels-pass:
  - ops: actnorm_conv1x1, coupling_affine, coupling_additive; backend torch (always) or triton (CUDA only:
    interpreter timings mean nothing, so those cases skip on the CPU; additive coupling has no kernel);
    channels C of the flow step (the coupling acts on C/2 of them) at the spatial size C takes in a 256x256
    Glow (3x256x256 squeezed is 12@128x128; each level halves the channels by the split, then the squeeze
    quadruples them and halves H and W: 24@64, 48@32, 96@16, 192@8, 384@4); pass forward, inverse or
    backward (the reversible backward: input rebuilt from the output, and every gradient).
  - flowstep-backend-config-pass: FlowStep in a one-step ReversibleSequence; pass forward / inverse (no
    grad) or train_MEMORY (forward + backward in that memory mode).
  - glow-backend-config-train_MEMORY: forward, backward and an Adam step of a whole Glow.
  - coupling_network-path-side-train: forward and backward of Glow's coupling network (revglow.ops.coupling_network;
    the plain network, no ActNorm or edge padding, with the zero layer's output scale) through `path`: reference
    (plain autograd of the composition), lean (the one-op Function keeping its hidden tensors for backward, as in
    the autograd and checkpoint modes) or lean_release (the Function overwriting them in its backward, as in the
    reversible mode's recomputation). Sides 8, 16, 32 at the small Glow's sizes (6 channels in, width 128, 12 out,
    batch 16 whatever --bench-batch says: the sizes at which a slower bookkeeping once cost the small training
    step 20%); side 128 at the 256 config's (width 512, batch 1), marked glow256. extra_info: `flops` of the
    three convolutions forward and backward, and `gflops`.
  Configs: "small" (3x32x32, L=3, K=8, width 128; its flow step is the first level's, 12@16x16) and "256"
  (3x256x256, L=6, width 512 as the paper's CelebA-HQ model, K=4 per level, as benchmarks/kernels.py,
  so a CPU round takes seconds, not minutes: step time is linear in K; its flow step is the first level's,
  12@128x128). The "256" ones carry
  the marker glow256 (-m "not glow256" leaves them out).

extra_info of every op records `bytes` (the minimum traffic: each input read once, each output written once,
from the byte counts of benchmarks/kernels.py) and `gbps` (bytes over the median time), so a saved run shows
how close a memory-bound op comes to the device's bandwidth.

Run: make bench-ops (saves the run), or e.g.
    python -m pytest benchmarks/test_ops.py -k "actnorm and forward" --benchmark-group-by=group
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time

import pytest
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_kernel_benchmark():
    # The byte counts live in benchmarks/kernels.py (one definition for both benchmarks). Loaded by path: a
    # plain `import kernels` could find the repository's kernels/ package instead.
    spec = importlib.util.spec_from_file_location("revglow_bench_kernels", os.path.join(_HERE, "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_kb = _load_kernel_benchmark()


def _synchronizing_timer() -> float:
    """time.perf_counter once the CUDA work queued so far is done (a launch returns before its kernel ends).

    The timer of every benchmark here: the work between two readings is complete, yet a round of several calls
    pays for one synchronization, not one per call. On a machine that never initialized CUDA: perf_counter."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


pytestmark = pytest.mark.benchmark(timer=_synchronizing_timer)

CHANNELS = (12, 24, 48, 96, 192, 384)
# Side of the square image that C channels take in a 256x256 Glow: 12@128, 24@64, ..., 384@4.
SIDE = {c: 128 * 12 // c for c in CHANNELS}
PASSES = ("forward", "inverse", "backward")
OPS = {"actnorm_conv1x1": ("torch", "triton"), "coupling_affine": ("torch", "triton"), "coupling_additive": ("torch",)}
MEMORY_MODES = ("reversible", "checkpoint", "autograd")
# name -> (image_shape, levels, depth, hidden); the flow step of a config is its first level's.
GLOW_CONFIGS = {"small": ((3, 32, 32), 3, 8, 128), "256": ((3, 256, 256), 6, 4, 512)}
# Coupling network cases: side -> (batch, in channels, width, out channels); the 128 one is the 256 config's.
NETWORK_SIZES = {8: (16, 6, 128, 12), 16: (16, 6, 128, 12), 32: (16, 6, 128, 12), 128: (1, 6, 512, 12)}
NETWORK_PATHS = ("reference", "lean", "lean_release")
# Rounds of the step-level benchmarks (after one warm-up round), fixed so a slow 256 config stays bounded.
STEP_ROUNDS = {"small": 10, "256": 3}


def _op_cases():
    for op, backends in OPS.items():
        for backend in backends:
            for c in CHANNELS:
                for pass_ in PASSES:
                    yield pytest.param(op, backend, c, pass_, id=f"{op}-{backend}-{c}-{pass_}")


def _step_cases(what, passes):
    for config in GLOW_CONFIGS:
        marks = [pytest.mark.glow256] if config == "256" else []
        for backend in ("torch", "triton"):
            for pass_ in passes:
                yield pytest.param(backend, config, pass_, id=f"{what}-{backend}-{config}-{pass_}", marks=marks)


@pytest.fixture(autouse=True)
def _explicit_backends(monkeypatch):
    # Every case names its backend; REVGLOW_KERNELS would silently relabel the model-level ones.
    monkeypatch.delenv("REVGLOW_KERNELS", raising=False)


@pytest.fixture
def device(bench_device):  # benchmarks/conftest.py: --bench-device
    return bench_device


@pytest.fixture
def batch(bench_batch):  # benchmarks/conftest.py: --bench-batch
    return bench_batch


def _require(backend: str, device: torch.device) -> None:
    if backend == "triton":
        if device.type != "cuda":
            pytest.skip("Triton is timed on CUDA only (interpreter timings mean nothing)")
        pytest.importorskip("triton")


def _record_bandwidth(benchmark, num_bytes: int) -> None:
    benchmark.extra_info["bytes"] = num_bytes
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["gbps"] = num_bytes / stats.stats.median / 1e9


def _actnorm_conv1x1_call(c, n, side, pass_, backend, device):
    from revglow.ops import actnorm_conv1x1 as ops

    g = torch.Generator().manual_seed(c)
    scale = torch.exp(torch.rand(c, generator=g) - 0.5).to(device)
    bias = torch.randn(c, generator=g).to(device)
    weight = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
    weight_inv = weight.t().contiguous().float().to(device)  # the inverse of a rotation
    weight = weight.float().to(device)
    act = torch.randn(n, c, side, side, generator=g).to(device)
    grad = torch.randn(n, c, side, side, generator=g).to(device)
    if pass_ == "forward":
        fn = lambda: ops.actnorm_conv1x1(act, scale, bias, weight, weight_inv, backend=backend)  # noqa: E731
    elif pass_ == "inverse":
        fn = lambda: ops.actnorm_conv1x1_inverse(act, scale, bias, weight_inv, backend=backend)  # noqa: E731
    else:
        fn = lambda: ops.actnorm_conv1x1_reversible_backward(  # noqa: E731
            act, grad, scale, bias, weight, weight_inv, backend=backend)
    return fn, _kb.actnorm_conv1x1_bytes(n, c, side, side, pass_)


def _coupling_call(op, c, n, side, pass_, backend, device):
    from revglow.ops import coupling_affine as ops

    ca = c // 2
    affine = op == "coupling_affine"
    g = torch.Generator().manual_seed(c)
    half = torch.randn(n, ca, side, side, generator=g).to(device)
    h = torch.randn(n, 2 * ca if affine else ca, side, side, generator=g).to(device)
    grad = torch.randn(n, ca, side, side, generator=g).to(device)
    grad_logdet = torch.randn(n, generator=g).to(device)
    if affine:
        fns = {"forward": ops.coupling_affine, "inverse": ops.coupling_affine_inverse,
               "backward": ops.coupling_affine_reversible_backward}
        num_bytes = _kb.coupling_affine_bytes(n, ca, side, side, pass_)
    else:
        fns = {"forward": ops.coupling_additive, "inverse": ops.coupling_additive_inverse,
               "backward": ops.coupling_additive_reversible_backward}
        # read the half and h, write the result; in the backward dL/dxa and dL/dh are dL/dya itself
        num_bytes = 3 * n * ca * side * side * 4
    if pass_ == "backward":
        return (lambda: fns[pass_](half, h, grad, grad_logdet, backend=backend)), num_bytes
    return (lambda: fns[pass_](half, h, backend=backend)), num_bytes


@pytest.mark.parametrize("op, backend, channels, pass_", list(_op_cases()))
def test_op(benchmark, op, backend, channels, pass_, device, batch):
    _require(backend, device)
    side = SIDE[channels]
    if op == "actnorm_conv1x1":
        fn, num_bytes = _actnorm_conv1x1_call(channels, batch, side, pass_, backend, device)
    else:
        fn, num_bytes = _coupling_call(op, channels, batch, side, pass_, backend, device)
    benchmark.group = f"{op}-{pass_}"
    benchmark.extra_info.update(shape=[batch, channels, side, side], device=str(device))
    with torch.no_grad():
        fn()  # compile (Triton), fill caches
        benchmark(fn)
    _record_bandwidth(benchmark, num_bytes)


def _glow_config(config: str, backend: str, memory: str):
    from revglow import GlowConfig

    image_shape, levels, depth, hidden = GLOW_CONFIGS[config]
    return GlowConfig(image_shape=image_shape, levels=levels, depth=depth, hidden=hidden, memory=memory,
                      kernels=backend)


def _pedantic(benchmark, fn, config: str):
    """A fixed number of rounds after one warm-up round (Triton compilation, allocator and cuDNN caches)."""
    benchmark.pedantic(fn, rounds=STEP_ROUNDS[config], warmup_rounds=1, iterations=1)


@pytest.mark.parametrize("backend, config, pass_",
                         list(_step_cases("flowstep", ("forward", "inverse") + tuple(f"train_{m}" for m in MEMORY_MODES))))
def test_flowstep(benchmark, backend, config, pass_, device, batch):
    from revglow import ReversibleSequence
    from revglow.glow.layers.flowstep import FlowStep

    _require(backend, device)
    image_shape, _, _, hidden = GLOW_CONFIGS[config]
    c, side = 4 * image_shape[0], image_shape[1] // 2  # the first level: one squeeze of the image
    memory = pass_[len("train_"):] if pass_.startswith("train_") else "reversible"
    torch.manual_seed(0)
    step = FlowStep(c, hidden=hidden, kernels=backend).to(device)
    seq = ReversibleSequence([step], memory=memory)
    x = torch.randn(batch, c, side, side, device=device)
    with torch.no_grad():
        y, _ = seq(x)  # data-dependent ActNorm init, and the output the inverse starts from

    if pass_ == "forward":
        def fn():
            with torch.no_grad():
                return seq(x)
    elif pass_ == "inverse":
        def fn():
            with torch.no_grad():
                return step.inverse(y)
    else:
        x.requires_grad_(True)  # a step inside the flow: its input needs a gradient too

        def fn():
            for p in seq.parameters():
                p.grad = None
            x.grad = None
            out, logdet = seq(x)
            (out.square().sum() - logdet.sum()).backward()

    benchmark.group = f"flowstep-{config}"
    benchmark.extra_info.update(shape=[batch, c, side, side], hidden=hidden, memory=memory, device=str(device))
    _pedantic(benchmark, fn, config)


@pytest.mark.parametrize("backend, config, pass_", list(_step_cases("glow", tuple(f"train_{m}" for m in MEMORY_MODES))))
def test_glow_train_step(benchmark, backend, config, pass_, device, batch):
    from revglow import Glow

    _require(backend, device)
    memory = pass_[len("train_"):]
    torch.manual_seed(0)
    cfg = _glow_config(config, backend, memory)
    model = Glow(cfg).to(device)
    x = torch.randint(0, 256, (batch,) + tuple(cfg.image_shape), dtype=torch.uint8, device=device)
    model.initialize(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)  # small: the weights barely move over the rounds

    def fn():
        opt.zero_grad(set_to_none=True)
        model(x).mean().backward()
        opt.step()

    benchmark.group = f"glow-{config}"
    benchmark.extra_info.update(shape=[batch] + list(cfg.image_shape), levels=cfg.levels, depth=cfg.depth,
                                hidden=cfg.hidden, memory=memory, device=str(device),
                                parameters=sum(p.numel() for p in model.parameters()))
    _pedantic(benchmark, fn, config)


def _network_cases():
    for side in NETWORK_SIZES:
        marks = [pytest.mark.glow256] if side == 128 else []
        for path in NETWORK_PATHS:
            yield pytest.param(path, side, id=f"coupling_network-{path}-{side}-train", marks=marks)


def _network_flops(n: int, c_in: int, width: int, c_out: int, side: int) -> int:
    """Multiply-adds x 2 of the three convolutions, forward and backward (input and weight gradients: 3x)."""
    per_pixel = 9 * c_in * width + width * width + 9 * width * c_out
    return 3 * 2 * n * side * side * per_pixel


@pytest.mark.parametrize("path, side", list(_network_cases()))
def test_coupling_network(benchmark, path, side, device):
    from revglow.ops.coupling_network import coupling_network, coupling_network_reference

    n, c_in, width, c_out = NETWORK_SIZES[side]
    g = torch.Generator().manual_seed(side)

    def param(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).to(device).requires_grad_(True)

    weights = [param(width, c_in, 3, 3), param(width), None, None, param(width, width, 1, 1), param(width), None,
               None, param(c_out, width, 3, 3), param(c_out), (1 + param(c_out)).detach().requires_grad_(True)]
    x = param(n, c_in, side, side, std=1.0)
    grad_out = torch.randn(n, c_out, side, side, generator=g).to(device)
    leaves = [x] + [w for w in weights if w is not None]
    if path == "reference":
        net = lambda: coupling_network_reference(x, *weights, False)  # noqa: E731
    else:
        net = lambda: coupling_network(x, *weights, False, release=path == "lean_release")  # noqa: E731

    def fn():
        return torch.autograd.grad(net(), leaves, grad_out)

    benchmark.group = f"coupling_network-{side}"
    flops = _network_flops(n, c_in, width, c_out, side)
    benchmark.extra_info.update(shape=[n, c_in, side, side], width=width, out_channels=c_out, device=str(device),
                                flops=flops)
    if side == 128:
        _pedantic(benchmark, fn, "256")
    else:
        fn()
        benchmark(fn)
    stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable
    if stats is not None:
        benchmark.extra_info["gflops"] = flops / stats.stats.median / 1e9
