"""Digits, the same budget for each variant: the reference implementation's coupling network (GlowConfig's
defaults) against the plain one, and the two 1x1 convolutions (invconv, the reference's default, and invconv_lu).

    python benchmarks/fidelity_digits.py                       # every variant, one after the other
    python benchmarks/fidelity_digits.py --variants plain      # some of them (run several processes side by side)

Each variant is `revglow train --data digits --levels 2 --depth 4 --hidden 64 --max-steps 500` (Adam 1e-3, batch 64,
EMA weights evaluated on the 359 test images) plus its flags; a row per variant (test bits/dim, its standard error,
wall time, machine, torch version) is appended to benchmarks/results/fidelity_digits.jsonl and printed.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from revglow.cli import main  # noqa: E402

COMMON = ["--data", "digits", "--levels", "2", "--depth", "4", "--hidden", "64", "--eval-every", "0",
          "--sample-every", "0", "--checkpoint-every", "0", "--no-progress"]
PLAIN = ["--no-nn-actnorm", "--no-edge-padding", "--zero-logscale-factor", "none", "--actnorm-logscale-factor", "1"]
VARIANTS = {
    "reference": [],                                         # today's defaults: reference network, invconv_lu
    "plain": PLAIN,                                          # the network before the reference options
    "reference-invconv": ["--permutation", "invconv"],       # the reference's default channel mixing
}


def run(name: str, steps: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        argv = ["train", *COMMON, "--max-steps", str(steps), "--seed", str(seed), "--out", out, *VARIANTS[name]]
        if main(argv) != 0:
            raise SystemExit(f"variant {name} failed")
        wall = time.perf_counter() - start
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "test_bpd" in r][-1]
    train = [r["bpd"] for r in rows if "bpd" in r][-50:]
    return {"variant": name, "flags": " ".join(VARIANTS[name]), "steps": steps, "seed": seed,
            "test_bpd": final["test_bpd"], "test_bpd_stderr": final["test_bpd_stderr"],
            "train_bpd_last50": sum(train) / len(train), "wall_s": round(wall, 1),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main_(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "fidelity_digits.jsonl"))
    args = parser.parse_args(argv)
    for name in args.variants:
        row = run(name, args.steps, args.seed)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name:20s} test bits/dim {row['test_bpd']:.4f} ± {row['test_bpd_stderr']:.4f}  "
              f"train (last 50 steps) {row['train_bpd_last50']:.4f}  {row['wall_s']:.0f} s")


if __name__ == "__main__":
    main_()
