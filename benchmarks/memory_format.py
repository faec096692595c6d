"""The coupling networks' memory format (GlowConfig.memory_format): channels_last against contiguous NCHW.

(a) The coupling network op (revglow.ops.coupling_network), forward + backward with release=True (the reversible
    engine's recomputation), at docs/memory.md's sizes: batch 16 at 8x8, 16x16, 32x32 (6 -> 128 -> 12 channels)
    and batch 1 at 128x128 (6 -> 512 -> 12); the formats interleaved round by round (the order reversed every
    other round), `--threads` intra-op threads; the ratio of each round's pair, its median and range.
(b) One reversible training step of the 256x256 model (L=6, K=32, width 512, additive, n_bits 5, batch 1):
    - its peak resident memory above the model, each format in a fresh process (revglow.memory.fresh_process:
      glibc's mmap threshold pinned low, the kernel's peak-RSS counter reset; `--memory-threads`, 1 by default,
      as that module's);
    - its time, the formats interleaved on one model (the same weights; every network's memory_format switched
      between steps).
Target (issue 21): the 256x256 step's peak above the model at most 110 MiB in the default format ("auto"), and
the step no slower than contiguous.

    python benchmarks/memory_format.py [--op-rounds 15] [--step-rounds 2] [--step-formats contiguous auto
        channels_last] [--skip-step] [--skip-memory]

The default run takes about 4-5 minutes on 2 CPU cores (each fresh-process measurement about 70 s, a 256x256
step 11-14 s).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import os
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import append_rows, environment, timed_training_step  # noqa: E402
from revglow import Glow, GlowConfig  # noqa: E402
from revglow.glow.layers.coupling import CouplingNetwork  # noqa: E402
from revglow.memory.fresh_process import training_step_memory_mib  # noqa: E402
from revglow.ops.coupling_network import coupling_network, resolve_memory_format  # noqa: E402

FORMATS = ("contiguous", "channels_last", "auto")
# (batch, input channels, hidden, output channels, side): the op's sizes in docs/memory.md
OP_SIZES = [(16, 6, 128, 12, 8), (16, 6, 128, 12, 16), (16, 6, 128, 12, 32), (1, 6, 512, 12, 128)]
CONFIG_256 = dict(image_shape=(3, 256, 256), levels=6, depth=32, hidden=512, coupling="additive", n_bits=5)


def _interleaved(contenders: Dict[str, callable], rounds: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds of each contender per round, one call of each per round, the order reversed every other round."""
    times = {name: [] for name in contenders}
    for r in range(warmup + rounds):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):
            seconds = contenders[name]()
            if r >= warmup:
                times[name].append(seconds)
    return times


def _network_weights(c_in: int, hidden: int, c_out: int):
    """The reference network's weights (ActNorm, edge padding, output scale), leaves requiring gradients."""
    g = torch.Generator().manual_seed(0)

    def leaf(t):
        return t.requires_grad_(True)

    def rand(*shape):
        return leaf(torch.randn(*shape, generator=g) * 0.05)

    def positive(n):
        return leaf(torch.rand(n, generator=g) + 0.5)

    return [rand(hidden, c_in + 1, 3, 3), None, positive(hidden), rand(hidden), rand(hidden, hidden, 1, 1), None,
            positive(hidden), rand(hidden), rand(c_out, hidden + 1, 3, 3), rand(c_out), positive(c_out)]


def op_times(rounds: int) -> List[dict]:
    rows = []
    print("(a) coupling network op, forward + backward (release=True), channels_last / contiguous")
    print(f"{'size':>28} {'auto':>14} {'contiguous ms':>14} {'channels_last ms':>17} {'ratio':>7} {'range':>12}")
    for n, c_in, hidden, c_out, side in OP_SIZES:
        weights = _network_weights(c_in, hidden, c_out)
        x = torch.randn(n, c_in, side, side, requires_grad=True)
        grad = torch.randn(n, c_out, side, side)

        def step(layout):
            def run():
                t0 = time.perf_counter()
                coupling_network(x, *weights, True, release=True, memory_format=layout).backward(grad)
                return time.perf_counter() - t0
            return run

        times = _interleaved({f: step(f) for f in FORMATS[:2]}, rounds)
        ratios = [a / b for a, b in zip(times["channels_last"], times["contiguous"])]
        med = {f: statistics.median(v) for f, v in times.items()}
        auto = resolve_memory_format("auto", x, weights[0], weights[8])
        auto = "channels_last" if auto == torch.channels_last else "contiguous"
        size = f"{n}x[{c_in}->{hidden}->{c_out}] {side}x{side}"
        print(f"{size:>28} {auto:>14} {1e3 * med['contiguous']:14.2f} {1e3 * med['channels_last']:17.2f} "
              f"{statistics.median(ratios):7.3f} {min(ratios):5.2f}-{max(ratios):.2f}")
        rows.append({"part": "op", "batch": n, "channels": [c_in, hidden, c_out], "side": side, "auto": auto,
                     "median_s": med, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "rounds": rounds})
    return rows


def step_memory(formats, threads: int) -> List[dict]:
    rows = []
    print(f"\n(b) 256x256 reversible step, peak resident memory above the model (fresh process each, "
          f"{threads} thread(s))")
    for fmt in formats:
        started = time.perf_counter()
        r = training_step_memory_mib(GlowConfig(**CONFIG_256, memory_format=fmt), 1, threads=threads)
        print(f"{fmt:>14}: {r['activation_mib']:7.1f} MiB above {r['before_mib']:.1f} MiB "
              f"({time.perf_counter() - started:.0f} s to measure)", flush=True)
        rows.append({"part": "step_memory", "memory_format": fmt, "threads": threads, **r})
    return rows


def step_times(formats, rounds: int) -> List[dict]:
    torch.manual_seed(0)
    model = Glow(GlowConfig(**CONFIG_256))
    x = torch.randint(0, 256, (1, *CONFIG_256["image_shape"]), dtype=torch.uint8)
    model.initialize(x)
    nets = [m for m in model.modules() if isinstance(m, CouplingNetwork)]

    def step(fmt):
        def run():
            for net in nets:
                net.memory_format = fmt
            return timed_training_step(model, x, torch.device("cpu"))
        return run

    times = _interleaved({f: step(f) for f in formats}, rounds)
    print(f"\n(b) 256x256 reversible step time ({torch.get_num_threads()} threads, {rounds} interleaved rounds)")
    rows = []
    for fmt in formats:
        ratios = [a / b for a, b in zip(times[fmt], times["contiguous"])]
        print(f"{fmt:>14}: median {statistics.median(times[fmt]):6.2f} s  (min {min(times[fmt]):.2f}, max "
              f"{max(times[fmt]):.2f}); / contiguous per round {min(ratios):.3f}-{max(ratios):.3f}")
        rows.append({"part": "step_time", "memory_format": fmt, "median_s": statistics.median(times[fmt]),
                     "times_s": times[fmt], "ratio_to_contiguous": ratios})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of (a) and the step times")
    parser.add_argument("--memory-threads", type=int, default=1, help="threads of the fresh-process measurement")
    parser.add_argument("--op-rounds", type=int, default=15)
    parser.add_argument("--step-rounds", type=int, default=2)
    parser.add_argument("--memory-formats", nargs="+", default=["contiguous", "auto"], choices=FORMATS,
                        help="(auto is channels_last where the 256x256 model's peak is, its first level)")
    parser.add_argument("--step-formats", nargs="+", default=["contiguous", "auto"], choices=FORMATS,
                        help="formats of the step-time comparison (contiguous is always among them)")
    parser.add_argument("--skip-step", action="store_true", help="only (a) and the memory of (b)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--results", default="memory_format.jsonl",
                        help="JSON-lines file to append to (a bare name goes to benchmarks/results/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    rows = op_times(args.op_rounds)
    if not args.skip_memory:
        rows += step_memory(args.memory_formats, args.memory_threads)
    if not args.skip_step:
        rows += step_times(["contiguous"] + [f for f in args.step_formats if f != "contiguous"], args.step_rounds)
    path = append_rows(args.results, [{**env, "benchmark": "memory_format", **row} for row in rows])
    print(f"\nrows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
