"""What inverting the 1x1 convolutions from the current weights costs, against a whole training step.

The reversible backward needs W^-1 once per flow step and training step; revglow inverts it from the current
weights on every use instead of caching it (a cache could go stale through `.data` edits or carry an
inference-mode tensor into training). This times those inversions (all L*K of them, as one step does them)
and one reversible training step of the same model, interleaved, and prints the ratio.

    python benchmarks/inverse_cost.py [--hidden 512] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import add_problem_flags, append_rows, environment, random_images  # noqa: E402
from revglow import Glow, GlowConfig  # noqa: E402
from revglow.glow.layers.permutation import ChannelMixing  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_flags(parser, "inverse_cost.jsonl", depth=4, hidden=512, rounds=5)   # K: the ratio does not depend on it
    parser.add_argument("--permutation", default="invconv_lu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    model = Glow(GlowConfig(image_shape=shape, levels=args.levels, depth=args.depth, hidden=args.hidden,
                            permutation=args.permutation)).to(device)
    x = random_images(args, device)
    model.initialize(x)
    mixings = [m for m in model.modules() if isinstance(m, ChannelMixing)]

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def step():
        model.zero_grad(set_to_none=True)
        model(x).mean().backward()

    def inversions():
        for m in mixings:
            m.weight_inverse()

    step()
    steps, invs = [], []
    for _ in range(args.rounds):
        steps.append(timed(step))
        invs.append(timed(inversions))
    s, i = statistics.median(steps), statistics.median(invs)
    print(f"{args.image_size}x{args.image_size}x3, L={args.levels}, K={args.depth}, width {args.hidden}, batch "
          f"{args.batch_size}, {args.permutation}, {args.device}: training step {s * 1e3:.1f} ms; the step's "
          f"{len(mixings)} inversions of W {i * 1e3:.3f} ms = {100 * i / s:.3f}% of the step")
    env = environment(args.device)
    append_rows(args.results, [{**env, "benchmark": "inverse_cost", "step_s": s, "inversions_s": i,
                                "fraction": i / s, "hidden": args.hidden, "levels": args.levels,
                                "depth": args.depth, "batch": args.batch_size, "permutation": args.permutation,
                                "device": args.device}])
    return 0


if __name__ == "__main__":
    sys.exit(main())
