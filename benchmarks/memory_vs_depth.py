"""Activation memory of one training step against depth K, for each memory mode.

Measured for real: peak resident memory of a fresh subprocess during one forward + backward, above what the
model already held (revglow.memory.fresh_process). Default problem: CPU, 64x64 RGB, 2 levels, width 128,
batch 8, K in {4, 8, 16, 32}. Targets: reversible grows at most 10% from K=4 to K=32; plain autograd at K=32
needs at least 10x what reversible needs.

    python benchmarks/memory_vs_depth.py [--depths 4 32] [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import append_rows, environment  # noqa: E402
from revglow import GlowConfig  # noqa: E402
from revglow.memory.fresh_process import training_step_memory_mib  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--modes", nargs="+", default=["reversible", "checkpoint", "autograd"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default="memory_vs_depth.jsonl",
                        help="JSON-lines file to append to (a bare name goes to benchmarks/results/)")
    args = parser.parse_args(argv)

    env = environment(args.device)
    results = {}
    rows = []
    print(f"activation memory of one training step (MiB): {args.image_size}x{args.image_size}x3, L={args.levels}, "
          f"width {args.hidden}, batch {args.batch_size}, device {args.device}")
    print(f"{'mode':>11} " + " ".join(f"{'K=' + str(k):>9}" for k in args.depths))
    for mode in args.modes:
        line = []
        for k in args.depths:
            cfg = GlowConfig(image_shape=(3, args.image_size, args.image_size), levels=args.levels, depth=k,
                             hidden=args.hidden, memory=mode, kernels="auto")
            r = training_step_memory_mib(cfg, args.batch_size, device=args.device)
            results[(mode, k)] = r["activation_mib"]
            rows.append({**env, "benchmark": "memory_vs_depth", "mode": mode, "depth": k, "device": args.device,
                         "image_size": args.image_size, "levels": args.levels, "hidden": args.hidden,
                         "batch": args.batch_size, **r})
            line.append(f"{r['activation_mib']:9.1f}")
        print(f"{mode:>11} " + " ".join(line))
    path = append_rows(args.results, rows)

    ok = True
    k0, k1 = min(args.depths), max(args.depths)
    if ("reversible", k0) in results and ("reversible", k1) in results:
        growth = results[("reversible", k1)] / results[("reversible", k0)]
        passed = growth <= 1.10
        ok &= passed
        print(f"reversible K={k1} / K={k0}: {growth:.3f} (target <= 1.10) {'PASS' if passed else 'FAIL'}")
    if ("autograd", k1) in results and ("reversible", k1) in results:
        ratio = results[("autograd", k1)] / results[("reversible", k1)]
        passed = ratio >= 10.0
        ok &= passed
        print(f"autograd / reversible at K={k1}: {ratio:.1f}x (target >= 10x) {'PASS' if passed else 'FAIL'}")
    if ("checkpoint", k1) in results and ("reversible", k1) in results:
        print(f"checkpoint / reversible at K={k1}: {results[('checkpoint', k1)] / results[('reversible', k1)]:.2f}x")
    print(f"rows appended to {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
