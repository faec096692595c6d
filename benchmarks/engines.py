"""revglow's reversible engine against plain autograd, memcnn and revlib on the same stack of coupling blocks.

The problem: D additive coupling blocks y1 = x1 + F(x2), y2 = x2 + G(y1) on [8, 16, 64, 64] (float32, CPU),
F and G each conv3x3(8 -> 128) -> ReLU -> conv3x3(128 -> 8), identical weights in every engine, one training
step (forward + backward of a scalar loss). For each engine and D:
- activation memory: peak resident memory of a fresh process during one step above what it held before
  (the method of revglow.memory.fresh_process: glibc's mmap threshold pinned low, /proc/self/clear_refs);
- step time: all engines interleaved round after round in one process, medians;
- gradients: every engine's parameter gradients against plain autograd's, in float64 on a small problem.

memcnn and revlib are optional (`pip install -e .[bench]`); an engine whose library is not installed is skipped
with a note.

    python benchmarks/engines.py [--depths 4 8 16 32] [--rounds 6] [--plot benchmarks/results/engines.png]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common import append_rows, environment  # noqa: E402
from revglow import ReversibleSequence, TwoNetworkCoupling  # noqa: E402

ENGINES = ("autograd", "revlib", "memcnn", "revglow-generic", "revglow-generic-reuse", "revglow", "revglow-checkpoint")
DESCRIPTIONS = {
    "autograd": "plain autograd",
    "revlib": "revlib ReversibleSequential",
    "memcnn": "memcnn InvertibleModuleWrapper(AdditiveCoupling)",
    "revglow-generic": "revglow ReversibleSequence, block with forward/inverse only",
    "revglow-generic-reuse": "the same block with reuse_inverse_computations = True",
    "revglow": "revglow ReversibleSequence of TwoNetworkCoupling",
    "revglow-checkpoint": "revglow memory='checkpoint'",
}


def _network(channels: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(hidden, channels, 3, padding=1))


class ForwardInverseOnly(nn.Module):
    """The same block written as most users first write one: forward and inverse, no inverse_vjp."""

    def __init__(self, f: nn.Module, g: nn.Module, reuse: bool = False):
        super().__init__()
        self.f, self.g = f, g
        self.reuse_inverse_computations = reuse   # opt-in: the replay re-uses the inverse's network calls

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=1), x.new_zeros(x.shape[0])

    def inverse(self, y):
        y1, y2 = y.chunk(2, dim=1)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=1), y.new_zeros(y.shape[0])


def available(engine: str) -> Optional[str]:
    """None if the engine can run here, else why not."""
    module = {"revlib": "revlib", "memcnn": "memcnn"}.get(engine)
    if module is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            __import__(module)
    except ImportError:
        return f"{module} is not installed (pip install -e .[bench])"
    return None


def networks(depth: int, channels: int, hidden: int, seed: int = 0) -> List[nn.Module]:
    """F_1, G_1, ..., F_D, G_D with weights fixed by `seed`."""
    torch.manual_seed(seed)
    return [_network(channels // 2, hidden) for _ in range(2 * depth)]


def build(engine: str, nets: List[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A module-like callable x -> y running the stack of blocks F_i, G_i through `engine` (copies of `nets`)."""
    nets = [copy.deepcopy(n) for n in nets]
    pairs = list(zip(nets[0::2], nets[1::2]))
    if engine in ("autograd", "revglow", "revglow-checkpoint"):
        memory = {"autograd": "autograd", "revglow": "reversible", "revglow-checkpoint": "checkpoint"}[engine]
        seq = ReversibleSequence([TwoNetworkCoupling(f, g) for f, g in pairs], memory=memory)
        return _Wrapped(seq, lambda x: seq(x)[0], nets)
    if engine in ("revglow-generic", "revglow-generic-reuse"):
        seq = ReversibleSequence([ForwardInverseOnly(f, g, reuse=engine.endswith("reuse")) for f, g in pairs])
        return _Wrapped(seq, lambda x: seq(x)[0], nets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if engine == "revlib":
            import revlib
            seq = revlib.ReversibleSequential(*nets, split_dim=1)
            return _Wrapped(seq, seq, nets)
        if engine == "memcnn":
            import memcnn
            seq = nn.Sequential(*[memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=f, Gm=g),
                                                                 keep_input=False, keep_input_inverse=False)
                                  for f, g in pairs])
            return _Wrapped(seq, seq, nets)
    raise ValueError(f"unknown engine {engine!r}")


class _Wrapped:
    def __init__(self, module: nn.Module, run: Callable, nets: List[nn.Module]):
        self.module, self.run, self.nets = module, run, nets   # nets: F_1, G_1, ... inside `module`

    def to(self, dtype):
        self.module.to(dtype)
        return self

    def step(self, x: torch.Tensor) -> None:
        """One training step: a scalar loss of the output, backward. x is consumed (memcnn frees inputs)."""
        y = self.run(x)
        y.square().mean().backward()

    def grads(self) -> torch.Tensor:
        """In the order F_1, G_1, ..., whatever order the engine registers them in."""
        return torch.cat([p.grad.flatten() for net in self.nets for p in net.parameters()])

    def zero_grad(self) -> None:
        for p in self.module.parameters():
            p.grad = None


def check_gradients(engines, depth: int = 3, shape=(2, 4, 8, 8), hidden: int = 6) -> Dict[str, float]:
    """Relative error of every engine's parameter gradients against plain autograd, float64."""
    nets = networks(depth, shape[1], hidden, seed=1)
    x = torch.randn(shape, dtype=torch.float64)
    grads = {}
    for engine in engines:
        model = build(engine, nets).to(torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.step(x.clone().requires_grad_())
        grads[engine] = model.grads()
    ref = grads["autograd"]
    return {e: float((g - ref).norm() / ref.norm()) for e, g in grads.items()}


def _child(args) -> None:
    """Measure one engine's activation memory in this (fresh) process and print it as JSON."""
    torch.set_num_threads(1)

    def status(key):
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError(key)

    model = build(args.engine, networks(args.child_depth, args.channels, args.hidden))
    make = lambda: torch.randn(args.batch_size, args.channels, args.image_size, args.image_size,  # noqa: E731
                               requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.step(make())              # warm-up: allocates every .grad
        x = make()
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = status("VmRSS")
        model.step(x)
        peak = status("VmHWM")
    print(json.dumps({"activation_mib": peak - before}))


def measure_memory(engine: str, depth: int, args) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, "--child-depth", str(depth),
           "--image-size", str(args.image_size), "--channels", str(args.channels), "--hidden", str(args.hidden),
           "--batch-size", str(args.batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} at D={depth} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["activation_mib"]


def measure_time(engines, depth: int, args) -> Dict[str, float]:
    nets = networks(depth, args.channels, args.hidden)
    models = {e: build(e, nets) for e in engines}
    times = {e: [] for e in engines}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(args.warmup + args.rounds):
            for engine in (engines if r % 2 == 0 else list(reversed(engines))):
                x = torch.randn(args.batch_size, args.channels, args.image_size, args.image_size, requires_grad=True)
                models[engine].zero_grad()
                t0 = time.perf_counter()
                models[engine].step(x)
                if r >= args.warmup:
                    times[engine].append(time.perf_counter() - t0)
    return {e: statistics.median(v) for e, v in times.items()}


def plot(rows: List[dict], engines, depths, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for engine in engines:
        mem = [next(r["activation_mib"] for r in rows if r["engine"] == engine and r["depth"] == d) for d in depths]
        rel = [next(r["time_vs_autograd"] for r in rows if r["engine"] == engine and r["depth"] == d) for d in depths]
        ax_mem.plot(depths, mem, marker="o", label=engine)
        ax_time.plot(depths, rel, marker="o", label=engine)
    ax_mem.set(xlabel="blocks D", ylabel="activation memory (MiB)", yscale="log", title="one training step")
    ax_time.set(xlabel="blocks D", ylabel="step time / autograd", title="interleaved medians")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.grid(alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for the timing (default: torch's)")
    parser.add_argument("--results", default="engines.jsonl",
                        help="JSON-lines file to append to (a bare name goes to benchmarks/results/)")
    parser.add_argument("--plot", default=None, help="write a PNG of memory and time against D")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-depth", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.engine = args.child
        _child(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if "autograd" not in args.engines:
        args.engines = ["autograd"] + args.engines
    engines = []
    for engine in args.engines:
        why = available(engine)
        if why:
            print(f"skipping {engine}: {why}")
        else:
            engines.append(engine)

    errors = check_gradients(engines)
    print("parameter gradients against plain autograd (float64, relative error): " +
          ", ".join(f"{e} {v:.1e}" for e, v in errors.items()))
    env = environment("cpu")
    print(f"stack of D coupling blocks on [{args.batch_size}, {args.channels}, {args.image_size}, "
          f"{args.image_size}], F and G conv3x3({args.channels // 2}->{args.hidden})-ReLU-conv3x3, float32, "
          f"{env['threads']} threads for timing, {args.rounds} interleaved rounds")
    rows = []
    for depth in args.depths:
        times = measure_time(engines, depth, args)
        for engine in engines:
            mib = measure_memory(engine, depth, args)
            rows.append({**env, "benchmark": "engines", "engine": engine, "depth": depth, "activation_mib": mib,
                         "step_s": times[engine], "time_vs_autograd": times[engine] / times["autograd"],
                         "grad_rel_err": errors[engine], "batch": args.batch_size, "channels": args.channels,
                         "image_size": args.image_size, "hidden": args.hidden, "rounds": args.rounds})
    print(f"\n{'engine':<20}" + "".join(f"{'D=' + str(d) + ' MiB':>11}" for d in args.depths)
          + "".join(f"{'D=' + str(d) + ' t/ag':>11}" for d in args.depths))
    for engine in engines:
        mine = [r for r in rows if r["engine"] == engine]
        print(f"{engine:<20}" + "".join(f"{r['activation_mib']:11.1f}" for r in mine)
              + "".join(f"{r['time_vs_autograd']:11.2f}" for r in mine))
    if {"revlib", "revglow"} <= set(engines):
        for depth in args.depths:
            ours = next(r for r in rows if r["engine"] == "revglow" and r["depth"] == depth)
            peer = next(r for r in rows if r["engine"] == "revlib" and r["depth"] == depth)
            print(f"D={depth}: revglow / revlib memory {ours['activation_mib'] / peer['activation_mib']:.3f}, "
                  f"time {ours['step_s'] / peer['step_s']:.3f}")
    if {"memcnn", "revglow-generic"} <= set(engines):
        for depth in args.depths:
            ours = next(r for r in rows if r["engine"] == "revglow-generic" and r["depth"] == depth)
            peer = next(r for r in rows if r["engine"] == "memcnn" and r["depth"] == depth)
            print(f"D={depth}: revglow generic / memcnn time {ours['step_s'] / peer['step_s']:.3f}")
    print(f"rows appended to {append_rows(args.results, rows)}")
    if args.plot:
        print(f"plot: {plot(rows, engines, args.depths, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
