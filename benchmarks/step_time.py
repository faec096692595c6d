"""Training-step time of the memory modes, measured side by side in one process.

The modes run interleaved (one step of each, round after round) on identical weights and data, so load from
other processes on a shared machine hits all of them alike; the medians are compared. Default problem: CPU,
32x32 RGB, 3 levels, K=8, width 128, batch 16. Targets: reversible/autograd <= 1.25 and
reversible <= checkpoint.

    python benchmarks/step_time.py [--rounds 20] [--device cuda] [--kernels torch|triton|auto]
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

MODES = ("autograd", "checkpoint", "reversible")
# The reversible mode once more without the reconstruction check and RNG replay: the price of both, side by side.
BARE = "reversible-bare"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_flags(parser, "step_time.jsonl", rounds=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kernels", default="auto")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    models = {}
    state = None
    for mode in MODES + (BARE,):
        cfg = GlowConfig(image_shape=shape, levels=args.levels, depth=args.depth, hidden=args.hidden,
                         memory=mode.replace("-bare", ""), kernels=args.kernels,
                         check_reconstruction="off" if mode == BARE else "warn")
        model = Glow(cfg).to(device)
        if state is None:
            x = random_images(args, device)
            model.initialize(x)
            state = model.state_dict()
        model.load_state_dict(state)
        if mode == BARE:
            for flow in model.flows:
                flow.preserve_rng_state = False
        models[mode] = model

    def step(model):
        return timed_training_step(model, x, device)

    variants = MODES + (BARE,)
    times = {m: [] for m in variants}
    for r in range(args.warmup + args.rounds):
        order = variants if r % 2 == 0 else tuple(reversed(variants))
        for mode in order:
            t = step(models[mode])
            if r >= args.warmup:
                times[mode].append(t)
    med = {m: statistics.median(v) for m, v in times.items()}
    spread = {m: (min(v), max(v)) for m, v in times.items()}

    env = environment(args.device)
    print(f"training step (forward + backward), {args.image_size}x{args.image_size}x3, L={args.levels}, "
          f"K={args.depth}, width {args.hidden}, batch {args.batch_size}, device {args.device}, "
          f"{args.rounds} interleaved rounds, {env['threads']} threads")
    print(f"{'mode':>15} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for m in variants:
        print(f"{m:>15} {med[m] * 1e3:10.1f} {spread[m][0] * 1e3:8.1f} {spread[m][1] * 1e3:8.1f}")
    r_auto = med["reversible"] / med["autograd"]
    r_ckpt = med["reversible"] / med["checkpoint"]
    print(f"reversible / reversible without check and RNG replay: {med['reversible'] / med[BARE]:.3f}")
    print(f"reversible / autograd:   {r_auto:.3f} (target <= 1.25) {'PASS' if r_auto <= 1.25 else 'FAIL'}")
    print(f"reversible / checkpoint: {r_ckpt:.3f} (target <= 1.00) {'PASS' if r_ckpt <= 1.0 else 'FAIL'}")
    rows = [{**env, "benchmark": "step_time", "mode": m, "median_s": med[m], "min_s": spread[m][0],
             "max_s": spread[m][1], "device": args.device, "kernels": args.kernels, "image_size": args.image_size,
             "levels": args.levels, "depth": args.depth, "hidden": args.hidden, "batch": args.batch_size,
             "rounds": args.rounds} for m in variants]
    print(f"rows appended to {append_rows(args.results, rows)}")
    return 0 if (r_auto <= 1.25 and r_ckpt <= 1.0) else 1


if __name__ == "__main__":
    sys.exit(main())
