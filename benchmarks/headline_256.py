"""The 256x256 headline: the paper's CelebA-HQ architecture (L=6, K=32, width 512, additive coupling, 5 bits) in
each training mode, measured.

1. Per mode (reversible, per-step checkpointing, segment checkpointing as a checkpoint_sequential baseline, plain
   autograd): the activation memory of one training step (forward, backward, Adam) at batch 1 and 2, counted by
   revglow.memory.profile's LiveStorageTracker (exact, device independent), its slope (memory per sample) and intercept.
2. The planner's largest batch for 24, 48, 80 and 141 GiB devices: revglow.memory.profile.plan_batch on parameters +
   gradients + Adam state + that line, with a 5% allocator margin. A PREDICTION from the CPU count: on a GPU a
   convolution library's workspace and the caching allocator's rounding come on top, which is what
   `revglow profile --device cuda --budget ... --verify` measures (benchmarks/gpu_checks.sh runs it).
3. One real training step in reversible mode at batch 1 (Adam, after one warm-up step): seconds, and the
   process's peak resident memory during it (revglow.memory.device_meters.ResidentSet: glibc's heap trimmed and
   the kernel's peak counter reset before it).

Rows go to benchmarks/results/headline_256.jsonl; a Markdown table for the README is printed. Re-runnable as the
engine changes; `--set FIELD=VALUE` overrides any GlowConfig field (e.g. a new option) without editing this file.

    python benchmarks/headline_256.py [--modes reversible checkpoint] [--set step_chunk=1] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import fields
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import append_rows, environment  # noqa: E402
from modes import MODES, activation, build_models, example_images  # noqa: E402
from revglow import GlowConfig  # noqa: E402
from revglow.memory.device_meters import ResidentSet  # noqa: E402
from revglow.memory.planner import parse_size, plan_batch  # noqa: E402

CELEBA_HQ = dict(image_shape=(3, 256, 256), levels=6, depth=32, hidden=512, coupling="additive", n_bits=5)
BUDGETS = ("24GiB", "48GiB", "80GiB", "141GiB")
MARGIN = 0.05     # the planner's allocator margin on the CPU (revglow.memory.profile); CUDA measures its own
MiB = float(2 ** 20)


def config(overrides: List[str]) -> GlowConfig:
    """The CelebA-HQ architecture with FIELD=VALUE overrides (values parsed as JSON, else kept as strings)."""
    values = dict(CELEBA_HQ)
    known = {f.name for f in fields(GlowConfig)}
    for item in overrides:
        name, sep, text = item.partition("=")
        if not sep or name not in known:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of GlowConfig's fields")
        try:
            values[name] = json.loads(text)
        except ValueError:
            values[name] = text
    if isinstance(values["image_shape"], list):
        values["image_shape"] = tuple(values["image_shape"])
    return GlowConfig(**values)


def plan(row: Dict, budgets) -> Dict[str, int]:
    fixed = row["params_mib"] + row["grads_mib"] + row["optimizer_mib"]
    return {b: plan_batch(fixed, max(0.0, row["activation_mib_fixed"]), row["activation_mib_per_sample"],
                          parse_size(b), MARGIN) for b in budgets}


def training_step(model, batch: int, device: str) -> Dict:
    """One real Adam step after a warm-up: seconds, and (CPU, Linux) the process's peak resident memory in it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = example_images(model.config, batch, seed=1).to(device)

    def step():
        optimizer.zero_grad(set_to_none=False)
        model(x).mean().backward()
        optimizer.step()

    step()                                   # warm-up: gradients and Adam state exist from here on
    out = {}
    meter = ResidentSet() if device == "cpu" and ResidentSet.available else None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["allocated_before_mib"] = torch.cuda.memory_allocated() / MiB
    t0 = time.perf_counter()
    with (meter or contextlib.nullcontext()):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / MiB
    out["step_s"] = time.perf_counter() - t0
    if meter is not None:   # the one resident-set meter of revglow.memory (heap trimmed first, peak reset)
        out["rss_before_mib"] = meter.before / MiB
        out["peak_rss_mib"] = (meter.before + meter.peak) / MiB
    return out


def markdown(rows: List[Dict], budgets) -> str:
    head = ("| mode | activation MiB, batch 1 | batch 2 | MiB per sample | "
            + " | ".join(f"largest batch, {b}" for b in budgets) + " |")
    lines = [head, "|" + "---|" * (4 + len(budgets))]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['points'][0]['activation_mib']:.0f} | {r['points'][-1]['activation_mib']:.0f} "
                     f"| {r['activation_mib_per_sample']:.1f} | "
                     + " | ".join(str(r["max_batch"][b]) for b in budgets) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch-sizes", type=int, nargs=2, default=[1, 2])
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--no-step", action="store_true", help="skip the real reversible training step")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", default="headline_256.jsonl",
                   help="JSON-lines file to append to (a bare name goes to benchmarks/results/)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = config(args.overrides)
    env = environment(args.device)
    problem = {"config": cfg.to_dict(), "device": args.device}
    print(f"{cfg.image_shape[1]}x{cfg.image_shape[2]}, L={cfg.levels}, K={cfg.depth}, width {cfg.hidden}, "
          f"{cfg.coupling}, {cfg.n_bits} bits, device {args.device}, {env['threads']} threads"
          + (f", overrides {args.overrides}" if args.overrides else ""))

    rows = []
    if not args.no_step:
        # First, while the process is fresh: the real step (its resident peak includes everything the process holds).
        (model,) = build_models(cfg, ["reversible"], batch=2, device=args.device).values()
        step = training_step(model, args.batch_sizes[0], args.device)
        fixed = sum(p.numel() * p.element_size() for p in model.parameters()) / MiB
        del model
        row = {**env, "benchmark": "headline_256", "kind": "training_step", "mode": "reversible",
               "batch": args.batch_sizes[0], "params_mib": fixed, **step, **problem}
        rows.append(row)
        print(f"one reversible training step (Adam) at batch {row['batch']}: {step['step_s']:.1f} s"
              + (f", peak resident memory {step['peak_rss_mib']:.0f} MiB (before the step {step['rss_before_mib']:.0f}; "
                 f"parameters {fixed:.0f} MiB, with gradients and Adam state x4)" if "peak_rss_mib" in step else "")
              + (f", peak allocated {step['peak_allocated_mib']:.0f} MiB" if "peak_allocated_mib" in step else ""))
        append_rows(args.results, [row])

    mode_rows = []
    for mode in args.modes:
        t0 = time.perf_counter()
        (model,) = build_models(cfg, [mode], batch=2, device=args.device).values()
        r = activation(model, mode, args.batch_sizes, device=args.device, labels=True)
        del model
        r["max_batch"] = plan(r, args.budgets)
        row = {**env, "benchmark": "headline_256", "kind": "activation", **problem, "margin": MARGIN,
               "seconds": time.perf_counter() - t0, **{k: v for k, v in r.items() if k != "batch"}}
        mode_rows.append(row)
        print(f"{mode:>11}: {r['points'][0]['activation_mib']:.1f} MiB at batch {args.batch_sizes[0]}, "
              f"{r['points'][-1]['activation_mib']:.1f} at {args.batch_sizes[1]}, "
              f"{r['activation_mib_per_sample']:.1f} per sample; largest batch "
              + ", ".join(f"{b}: {n}" for b, n in r["max_batch"].items()) + f"  ({row['seconds']:.0f} s)")
        append_rows(args.results, [row])   # row by row: a long run that is stopped keeps what it measured
    rows += mode_rows
    params = mode_rows[0] if mode_rows else None
    if params:
        print(f"\nparameters {params['params_mib']:.0f} MiB, gradients {params['grads_mib']:.0f}, "
              f"Adam {params['optimizer_mib']:.0f}; planner margin {100 * MARGIN:.0f}% "
              f"(a prediction from the tracker's count on {args.device})\n")
        print(markdown(mode_rows, args.budgets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
