"""Training-step time of a Glow with `GlowConfig(compile=True)` against the same model eager, side by side.

Both models hold identical weights and see the same batches; after the warm-up (whose first step includes the
compilation, reported separately) the two run interleaved, round after round, and the medians are compared.

    python benchmarks/compile_step.py [--rounds 10] [--device cuda] [--memory reversible]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import add_problem_flags, append_rows, environment, random_images, timed_training_step  # noqa: E402
from revglow import Glow, GlowConfig  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_flags(parser, "compile_step.jsonl", rounds=10)
    parser.add_argument("--memory", default="reversible")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kernels", default="torch")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    x = random_images(args, device)
    models = {}
    for name in ("eager", "compiled"):
        cfg = GlowConfig(image_shape=shape, levels=args.levels, depth=args.depth, hidden=args.hidden,
                         memory=args.memory, kernels=args.kernels, compile=name == "compiled")
        models[name] = Glow(cfg).to(device)
    models["eager"].initialize(x)
    models["compiled"].load_state_dict(models["eager"].state_dict())

    def step(model):
        return timed_training_step(model, x, device)

    first = {name: step(model) for name, model in models.items()}   # includes compilation
    times = {name: [] for name in models}
    for r in range(args.warmup + args.rounds):
        for name in (("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")):
            t = step(models[name])
            if r >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    env = environment(args.device)
    print(f"training step, {args.image_size}x{args.image_size}x3, L={args.levels}, K={args.depth}, width "
          f"{args.hidden}, batch {args.batch_size}, memory={args.memory}, device {args.device}, {args.rounds} "
          f"interleaved rounds, {env['threads']} threads, torch {torch.__version__}")
    print(f"first compiled step (compilation included): {first['compiled']:.1f} s; first eager step "
          f"{first['eager']:.2f} s")
    for name in models:
        print(f"{name:>9}: median {med[name] * 1e3:8.1f} ms (min {min(times[name]) * 1e3:.1f}, "
              f"max {max(times[name]) * 1e3:.1f})")
    print(f"compiled / eager: {med['compiled'] / med['eager']:.3f}")
    rows = [{**env, "benchmark": "compile_step", "variant": k, "median_s": med[k], "first_step_s": first[k],
             "device": args.device, "memory": args.memory, "image_size": args.image_size, "levels": args.levels,
             "depth": args.depth, "hidden": args.hidden, "batch": args.batch_size, "rounds": args.rounds}
            for k in models]
    print(f"rows appended to {append_rows(args.results, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
