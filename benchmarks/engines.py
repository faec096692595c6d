"""revglow's reversible engine against plain autograd, memcnn and revlib on the same stacks of coupling blocks.

Two problems, each a stack of D additive coupling blocks y1 = x1 + F(x2), y2 = x2 + G(y1) (float32, CPU), with
identical weights in every engine and one training step (forward + backward of a scalar loss):
- conv: x [8, 16, 64, 64] split on channels; F and G each conv3x3(8 -> 128) -> ReLU -> conv3x3(128 -> 8);
- transformer: x [4, T=256, 2 d] tokens split on features (dim=-1; RevViT's two residual streams of width d=256);
  F = pre-norm multi-head self-attention (4 heads), G = pre-norm MLP d -> 4 d -> d with GELU; in revglow a
  TwoNetworkCoupling(F, G, dim=-1), in revlib a ReversibleSequential(split_dim=-1), in memcnn an
  AdditiveCoupling(split_dim=-1) in an InvertibleModuleWrapper.
For each engine and D:
- activation memory: peak resident memory of a fresh process during one step above what it held before
  (revglow.memory.device_meters.ResidentSet, the meter of revglow.memory.fresh_process: glibc's heap trimmed
  and its mmap threshold pinned low, the kernel's peak counter reset);
- step time: all engines interleaved round after round in one process, medians;
- gradients: every engine's parameter gradients against plain autograd's, in float64 on a small problem.

memcnn and revlib are optional (`pip install -e .[bench]`); an engine whose library is not installed is skipped
with a note.

    python benchmarks/engines.py [--cases conv transformer] [--depths 4 8 16 32] [--transformer-depths 4 8]
                                 [--rounds 6] [--plot benchmarks/results/engines.png]
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
from typing import Callable, Dict, List, NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import append_rows, environment  # noqa: E402
from revglow import ReversibleSequence, TwoNetworkCoupling  # noqa: E402
from revglow.memory.device_meters import ResidentSet  # noqa: E402

ENGINES = ("autograd", "revlib", "memcnn", "revglow-generic", "revglow-generic-reuse", "revglow", "revglow-check-off",
           "revglow-checkpoint")
CASES = ("conv", "transformer")
DESCRIPTIONS = {
    "autograd": "plain autograd",
    "revlib": "revlib ReversibleSequential",
    "memcnn": "memcnn InvertibleModuleWrapper(AdditiveCoupling)",
    "revglow-generic": "revglow ReversibleSequence, block with forward/inverse only",
    "revglow-generic-reuse": "the same block with reuse_inverse_computations = True",
    "revglow": "revglow ReversibleSequence of TwoNetworkCoupling",
    "revglow-check-off": "the same with check='off': no reconstruction fingerprint (revlib and memcnn have none)",
    "revglow-checkpoint": "revglow memory='checkpoint'",
}


# ------------------------------------------------------------------------------------------------- problems
class Attention(nn.Module):
    """Pre-norm multi-head self-attention over tokens [N, T, width] (no dropout: the engines must agree exactly)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not a multiple of {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))


def _mlp(width: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


def _conv_network(channels: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(hidden, channels, 3, padding=1))


class Problem(NamedTuple):
    """What one stack computes on: case "conv", x [batch, channels, size, size] split on dim 1, or case
    "transformer", x [batch, size tokens, channels features] split on dim -1 (each network sees channels / 2)."""
    case: str
    batch: int
    channels: int
    size: int
    hidden: int      # conv: the networks' hidden channels; transformer: the MLP's hidden features
    heads: int = 4   # transformer only

    @property
    def split_dim(self) -> int:
        return 1 if self.case == "conv" else -1

    def shape(self) -> tuple:
        if self.case == "conv":
            return (self.batch, self.channels, self.size, self.size)
        return (self.batch, self.size, self.channels)

    def networks(self, depth: int, seed: int = 0) -> List[nn.Module]:
        """F_1, G_1, ..., F_D, G_D with weights fixed by `seed`."""
        torch.manual_seed(seed)
        half = self.channels // 2
        if self.case == "conv":
            return [_conv_network(half, self.hidden) for _ in range(2 * depth)]
        return [Attention(half, self.heads) if i % 2 == 0 else _mlp(half, self.hidden) for i in range(2 * depth)]

    def describe(self) -> str:
        if self.case == "conv":
            return (f"conv: D coupling blocks on {list(self.shape())}, F and G conv3x3({self.channels // 2}->"
                    f"{self.hidden})-ReLU-conv3x3")
        return (f"transformer: D coupling blocks on tokens {list(self.shape())} split on features, F attention "
                f"(d={self.channels // 2}, {self.heads} heads), G MLP {self.channels // 2}->{self.hidden}->"
                f"{self.channels // 2}")


def conv_problem(args) -> Problem:
    return Problem("conv", args.batch_size, args.channels, args.image_size, args.hidden)


def transformer_problem(args) -> Problem:
    return Problem("transformer", args.transformer_batch, 2 * args.width, args.tokens, 4 * args.width, args.heads)


# ----------------------------------------------------------------------------------------------- the engines
class ForwardInverseOnly(nn.Module):
    """The same block written as most users first write one: forward and inverse, no inverse_vjp."""

    def __init__(self, f: nn.Module, g: nn.Module, reuse: bool = False, dim: int = 1):
        super().__init__()
        self.f, self.g, self.dim = f, g, dim
        self.reuse_inverse_computations = reuse   # opt-in: the replay re-uses the inverse's network calls

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=self.dim)
        y1 = x1 + self.f(x2)
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=self.dim), x.new_zeros(x.shape[0])

    def inverse(self, y):
        y1, y2 = y.chunk(2, dim=self.dim)
        x2 = y2 - self.g(y1)
        x1 = y1 - self.f(x2)
        return torch.cat([x1, x2], dim=self.dim), y.new_zeros(y.shape[0])


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
    """The conv case's F_1, G_1, ..., F_D, G_D with weights fixed by `seed`."""
    return Problem("conv", 1, channels, 1, hidden).networks(depth, seed)


def build(engine: str, nets: List[nn.Module], split_dim: int = 1) -> "_Wrapped":
    """A module-like callable x -> y running the stack of blocks F_i, G_i through `engine` (copies of `nets`),
    each block splitting its input in two halves along `split_dim`."""
    nets = [copy.deepcopy(n) for n in nets]
    pairs = list(zip(nets[0::2], nets[1::2]))
    if engine in ("autograd", "revglow", "revglow-check-off", "revglow-checkpoint"):
        memory = {"autograd": "autograd", "revglow-checkpoint": "checkpoint"}.get(engine, "reversible")
        seq = ReversibleSequence([TwoNetworkCoupling(f, g, dim=split_dim) for f, g in pairs], memory=memory,
                                 check="off" if engine == "revglow-check-off" else "warn", logdet=False)
        return _Wrapped(seq, seq, nets)
    if engine in ("revglow-generic", "revglow-generic-reuse"):
        seq = ReversibleSequence([ForwardInverseOnly(f, g, reuse=engine.endswith("reuse"), dim=split_dim)
                                  for f, g in pairs], logdet=False)
        return _Wrapped(seq, seq, nets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if engine == "revlib":
            import revlib
            seq = revlib.ReversibleSequential(*nets, split_dim=split_dim)
            return _Wrapped(seq, seq, nets)
        if engine == "memcnn":
            import memcnn
            seq = nn.Sequential(*[memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=f, Gm=g,
                                                                                         split_dim=split_dim),
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


GRADIENT_PROBLEMS = {"conv": Problem("conv", 2, 4, 8, 6), "transformer": Problem("transformer", 2, 8, 6, 12, heads=2)}


def check_gradients(engines, depth: int = 3, case: str = "conv") -> Dict[str, float]:
    """Relative error of every engine's parameter gradients against plain autograd, float64, on a small problem."""
    problem = GRADIENT_PROBLEMS[case]
    nets = problem.networks(depth, seed=1)
    x = torch.randn(problem.shape(), dtype=torch.float64)
    grads = {}
    for engine in engines:
        model = build(engine, nets, problem.split_dim).to(torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.step(x.clone().requires_grad_())
        grads[engine] = model.grads()
    ref = grads["autograd"]
    return {e: float((g - ref).norm() / ref.norm()) for e, g in grads.items()}


# ------------------------------------------------------------------------------------------------ measuring
def _child(engine: str, depth: int, problem: Problem) -> None:
    """Measure one engine's activation memory in this (fresh) process and print it as JSON."""
    torch.set_num_threads(1)
    model = build(engine, problem.networks(depth), problem.split_dim)
    meter = ResidentSet()   # revglow.memory's resident-set meter: glibc's heap trimmed, the peak counter reset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.step(torch.randn(problem.shape(), requires_grad=True))   # warm-up: allocates every .grad
        x = torch.randn(problem.shape(), requires_grad=True)
        with meter:
            model.step(x)
    print(json.dumps({"activation_mib": meter.peak / 2 ** 20}))


def measure_memory(engine: str, depth: int, problem: Problem) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, "--child-depth", str(depth),
           "--child-problem", json.dumps(problem._asdict())]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{engine} at D={depth} ({problem.case}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["activation_mib"]


def measure_time(engines, depth: int, problem: Problem, rounds: int, warmup: int) -> Dict[str, float]:
    nets = problem.networks(depth)
    models = {e: build(e, nets, problem.split_dim) for e in engines}
    times = {e: [] for e in engines}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(warmup + rounds):
            for engine in (engines if r % 2 == 0 else list(reversed(engines))):
                x = torch.randn(problem.shape(), requires_grad=True)
                models[engine].zero_grad()
                t0 = time.perf_counter()
                models[engine].step(x)
                if r >= warmup:
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


# ------------------------------------------------------------------------------------------------- the run
def run_case(problem: Problem, depths: List[int], engines: List[str], args, env: dict) -> List[dict]:
    """Time, memory and gradient rows of every engine at every depth of one problem; prints its table and ratios."""
    errors = check_gradients(engines, case=problem.case)
    print(f"\n{problem.describe()}, float32, {env['threads']} threads for timing, {args.rounds} interleaved rounds")
    print(f"parameter gradients against plain autograd ({problem.case}, float64, relative error): " +
          ", ".join(f"{e} {v:.1e}" for e, v in errors.items()))
    rows = []
    for depth in depths:
        times = measure_time(engines, depth, problem, args.rounds, args.warmup)
        for engine in engines:
            rows.append({**env, "benchmark": "engines", **problem._asdict(), "engine": engine,
                         "depth": depth, "activation_mib": measure_memory(engine, depth, problem),
                         "step_s": times[engine], "time_vs_autograd": times[engine] / times["autograd"],
                         "grad_rel_err": errors[engine], "rounds": args.rounds,
                         **({"image_size": problem.size} if problem.case == "conv" else {})})   # as older rows
    print(f"{'engine':<22}" + "".join(f"{'D=' + str(d) + ' MiB':>11}" for d in depths)
          + "".join(f"{'D=' + str(d) + ' t/ag':>11}" for d in depths))
    for engine in engines:
        mine = [r for r in rows if r["engine"] == engine]
        print(f"{engine:<22}" + "".join(f"{r['activation_mib']:11.1f}" for r in mine)
              + "".join(f"{r['time_vs_autograd']:11.2f}" for r in mine))
    both = "memory and time"
    for ours, peer, what in (("revglow", "revlib", both), ("revglow-check-off", "revlib", both),
                             ("revglow", "memcnn", both), ("revglow-generic", "memcnn", "time")):
        if {ours, peer} <= set(engines):
            for depth in depths:
                a, b = (next(r for r in rows if r["engine"] == e and r["depth"] == depth) for e in (ours, peer))
                memory = f"memory {a['activation_mib'] / b['activation_mib']:.3f}, " if "memory" in what else ""
                print(f"{problem.case} D={depth}: {ours} / {peer} {memory}time {a['step_s'] / b['step_s']:.3f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32], help="conv: blocks D")
    parser.add_argument("--image-size", type=int, default=64, help="conv: H = W")
    parser.add_argument("--channels", type=int, default=16, help="conv: channels of the input")
    parser.add_argument("--hidden", type=int, default=128, help="conv: hidden channels of F and G")
    parser.add_argument("--batch-size", type=int, default=8, help="conv: batch")
    parser.add_argument("--transformer-depths", type=int, nargs="+", default=[4, 8], help="transformer: blocks D")
    parser.add_argument("--tokens", type=int, default=256, help="transformer: tokens T")
    parser.add_argument("--width", type=int, default=256, help="transformer: d, the features each network sees")
    parser.add_argument("--heads", type=int, default=4, help="transformer: attention heads")
    parser.add_argument("--transformer-batch", type=int, default=4, help="transformer: batch")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads for the timing (default: torch's)")
    parser.add_argument("--results", default="engines.jsonl",
                        help="JSON-lines file to append to (a bare name goes to benchmarks/results/)")
    parser.add_argument("--plot", default=None, help="write a PNG of memory and time against D (conv; the "
                                                     "transformer's beside it, named *_transformer.png)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-depth", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-problem", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child, args.child_depth, Problem(**json.loads(args.child_problem)))
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
    env = environment("cpu")
    rows = []
    for case in args.cases:
        problem = conv_problem(args) if case == "conv" else transformer_problem(args)
        depths = args.depths if case == "conv" else args.transformer_depths
        case_rows = run_case(problem, depths, engines, args, env)
        rows += case_rows
        if args.plot:
            root, ext = os.path.splitext(args.plot)
            path = args.plot if case == "conv" else f"{root}_{case}{ext or '.png'}"
            print(f"plot: {plot(case_rows, engines, depths, path)}")
    print(f"rows appended to {append_rows(args.results, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
