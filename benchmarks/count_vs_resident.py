"""Memory per sample of one training step, counted op by op (revglow.memory.profile's tracker: tensors alone, and with
each convolution's measured working buffers) against the process's peak resident set, in every memory mode, over
several fresh processes (the resident set of one process wanders by a MiB or two; a fresh one per repeat shows
how far).

    python benchmarks/count_vs_resident.py [--repeats 6] [--batches 16 112] [--image-size 32] [--hidden 64]

Prints, per mode, the range over the repeats of resident set over count, for tensors alone and with workspaces.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from revglow.engine.options import MEMORY_MODES


def measure_once(spec: dict) -> dict:
    """One process's ratios: {mode: [resident over tensors, resident over tensors with workspaces]}, per sample."""
    import torch

    from revglow import GlowConfig
    from revglow.memory.profile import profile

    torch.set_num_threads(1)
    cfg = GlowConfig(image_shape=(3, spec["size"], spec["size"]), levels=spec["levels"], depth=spec["depth"],
                     hidden=spec["hidden"], kernels="torch")
    out = {}
    for r in profile(cfg, batch_sizes=tuple(spec["batches"]), modes=tuple(spec["modes"]), rounds=0):
        device = r["device_activation_mib_per_sample"]
        out[r["mode"]] = [device / r["activation_mib_per_sample"],
                          device / r["activation_with_workspace_mib_per_sample"]]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--batches", type=int, nargs=2, default=[16, 112])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--levels", type=int, default=1)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--modes", nargs="+", choices=MEMORY_MODES, default=list(MEMORY_MODES))
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)   # one measuring process
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_once(json.loads(args.child))))
        return {}
    spec = json.dumps({"size": args.image_size, "levels": args.levels, "depth": args.depth, "hidden": args.hidden,
                       "batches": args.batches, "modes": args.modes})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                       os.environ.get("PYTHONPATH", "")]))
    runs = []
    for _ in range(args.repeats):     # one fresh process each
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], capture_output=True,
                              text=True, env=env)
        if done.returncode != 0:
            sys.exit(f"count_vs_resident: the measuring process failed:\n{done.stderr.strip()}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"resident set over count, per sample: 3x{args.image_size}x{args.image_size}, L={args.levels} "
          f"K={args.depth} width {args.hidden}, batches {args.batches[0]} and {args.batches[1]}, "
          f"{args.repeats} fresh processes")
    print(f"{'mode':<11} {'tensors alone':>16} {'with workspaces':>18}")
    ranges = {}
    for mode in args.modes:
        alone = [run[mode][0] for run in runs]
        with_ws = [run[mode][1] for run in runs]
        ranges[mode] = {"tensors": (min(alone), max(alone)), "with_workspaces": (min(with_ws), max(with_ws))}
        print(f"{mode:<11} {min(alone):7.2f} - {max(alone):5.2f} {min(with_ws):9.2f} - {max(with_ws):5.2f}")
    return ranges


if __name__ == "__main__":
    main()
