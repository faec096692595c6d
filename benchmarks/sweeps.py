"""Sweeps of the training modes (benchmarks/modes.py): reversible, per-step checkpointing, segment checkpointing
(a checkpoint_sequential baseline, sqrt(K) segments) and plain autograd. Each sweep appends its rows (machine,
date, git revision, versions) to benchmarks/results/sweep_<name>.jsonl and draws benchmarks/results/sweep_<name>.png.

  depth       activation memory of one training step against K (steps per level)
  resolution  ... against the image size (32 to 256)
  batch       ... against the batch
  time        training-step time of each mode against K: all modes interleaved round after round on identical
              weights and data, medians, ratios to autograd printed side by side
  sample      sampling latency at batch 1 of the CelebA-HQ architecture (L=6, K=32, width 512, additive) at
              64, 128 and 256 pixels
  all         every sweep above with its defaults (what `make bench` runs)

Memory is revglow.memory.profile's LiveStorageTracker count: the tensor storage one training step (forward, backward,
Adam) allocates above parameters, gradients and Adam state; exact, and the same on every device. Time runs on
--threads intra-op threads (default 1: reproducible on a shared machine; the memory does not depend on it).

    python benchmarks/sweeps.py all
    python benchmarks/sweeps.py depth --values 4 8 16 32 --batch-size 8 [--results FILE] [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Dict, List, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import RESULTS, append_rows, environment, timed_training_step  # noqa: E402
from modes import MODES, activation, build_glow, build_models, example_images, segments_for  # noqa: E402
from revglow import GlowConfig  # noqa: E402

# Each sweep: the x it varies, its default values, and the fixed problem (image size, levels, K, width, batch).
SWEEPS = {
    "depth": dict(x="depth", values=[2, 4, 8, 16, 32, 64], image_size=32, levels=3, depth=None, hidden=128, batch=4),
    "resolution": dict(x="image_size", values=[32, 64, 128, 256], image_size=None, levels=3, depth=8, hidden=128,
                       batch=1),
    "batch": dict(x="batch", values=[1, 4, 16], image_size=32, levels=3, depth=16, hidden=64, batch=None),
    "time": dict(x="depth", values=[4, 16, 32], image_size=32, levels=3, depth=None, hidden=128, batch=8, rounds=5),
    "sample": dict(x="image_size", values=[64, 128, 256], image_size=None, levels=6, depth=32, hidden=512, batch=1,
                   rounds=2),
}
XLABEL = {"depth": "steps per level K", "image_size": "image size (pixels)", "batch": "batch"}


def _config(args, x_value, coupling="affine", n_bits=8) -> GlowConfig:
    values = {"image_size": args.image_size, "depth": args.depth, "batch": args.batch_size}
    values[SWEEPS[args.sweep]["x"]] = x_value
    size = values["image_size"]
    return GlowConfig(image_shape=(3, size, size), levels=args.levels, depth=values["depth"], hidden=args.hidden,
                      coupling=coupling, n_bits=n_bits)


def _problem(args, cfg: GlowConfig, batch: int) -> Dict:
    return {"image_size": cfg.image_shape[1], "levels": cfg.levels, "depth": cfg.depth, "hidden": cfg.hidden,
            "coupling": cfg.coupling, "n_bits": cfg.n_bits, "batch": batch, "device": args.device}


# -------------------------------------------------------------------------------------------- sweeps
def sweep_memory(args, env: Dict) -> List[Dict]:
    """Activation memory per mode at every value of the sweep's x (depth, image_size or batch)."""
    x = SWEEPS[args.sweep]["x"]
    rows = []
    if x == "batch":   # one model per mode, every batch measured on it (profile's points)
        cfg = _config(args, None)
        models = build_models(cfg, args.modes, batch=max(args.values), device=args.device)
        for mode in args.modes:
            row = activation(models.pop(mode), mode, args.values, device=args.device)
            for point in row["points"]:
                rows.append(_memory_row(env, args, cfg, mode, point["batch"], row, point["activation_mib"]))
        return rows
    for value in args.values:
        cfg = _config(args, value)
        models = build_models(cfg, args.modes, batch=args.batch_size, device=args.device)
        for mode in args.modes:
            row = activation(models.pop(mode), mode, [args.batch_size], device=args.device)
            rows.append(_memory_row(env, args, cfg, mode, args.batch_size, row, row["activation_mib"]))
    return rows


def _memory_row(env, args, cfg, mode, batch, row, activation_mib) -> Dict:
    return {**env, "benchmark": f"sweep_{args.sweep}", "mode": mode, **_problem(args, cfg, batch),
            "segments": segments_for(cfg.depth) if mode == "segment" else None,
            "activation_mib": activation_mib, "activation_mib_per_sample": activation_mib / batch,
            "params_mib": row["params_mib"], "grads_mib": row["grads_mib"], "optimizer_mib": row["optimizer_mib"],
            "live_at_peak": row["live_at_peak"]}


def sweep_time(args, env: Dict) -> List[Dict]:
    """Step time (forward + backward of the mean bits/dim) of every mode, interleaved, at every K."""
    rows = []
    for value in args.values:
        cfg = _config(args, value)
        models = build_models(cfg, args.modes, batch=args.batch_size, device=args.device)
        x = example_images(cfg, args.batch_size, seed=1).to(args.device)
        times: Dict[str, List[float]] = {m: [] for m in args.modes}
        for r in range(args.warmup + args.rounds):
            for mode in (args.modes if r % 2 == 0 else list(reversed(args.modes))):
                t = timed_training_step(models[mode], x, torch.device(args.device))
                if r >= args.warmup:
                    times[mode].append(t)
        for mode in args.modes:
            rows.append({**env, "benchmark": "sweep_time", "mode": mode, **_problem(args, cfg, args.batch_size),
                         "segments": segments_for(cfg.depth) if mode == "segment" else None,
                         "median_s": statistics.median(times[mode]), "min_s": min(times[mode]),
                         "max_s": max(times[mode]), "rounds": args.rounds})
        base = statistics.median(times["autograd"]) if "autograd" in times else None
        for row in rows[-len(args.modes):]:
            row["time_vs_autograd"] = row["median_s"] / base if base else None
    return rows


def sweep_sample(args, env: Dict) -> List[Dict]:
    """Seconds to draw one image (batch 1, temperature 0.7), median of rounds after one warm-up, per size."""
    rows = []
    for value in args.values:
        cfg = _config(args, value, coupling=args.coupling, n_bits=args.n_bits)
        model = build_glow(cfg, "reversible").to(args.device)
        t0 = time.perf_counter()
        model.initialize(example_images(cfg, 4 if value < 128 else 1).to(args.device))   # 256: top level 4x4
        init_s = time.perf_counter() - t0
        g = torch.Generator(device=args.device).manual_seed(0)
        times = []
        for r in range(1 + args.rounds):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.sample(args.batch_size, temperature=0.7, generator=g)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            if r > 0:
                times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in model.parameters())
        rows.append({**env, "benchmark": "sweep_sample", "mode": "sample", **_problem(args, cfg, args.batch_size),
                     "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                     "rounds": args.rounds, "initialize_s": init_s, "parameters": params})
    return rows


# --------------------------------------------------------------------------------------------- report
def table(rows: List[Dict], x: str, key: str, fmt: str = "{:9.1f}") -> str:
    """Modes as rows, the sweep's values as columns."""
    values = sorted({r[x] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    lines = [f"{'mode':>11} " + " ".join(f"{x[:5] + '=' + str(v):>9}" for v in values)]
    for mode in modes:
        cells = {r[x]: r[key] for r in rows if r["mode"] == mode}
        lines.append(f"{mode:>11} " + " ".join(fmt.format(cells[v]) if cells.get(v) is not None else f"{'-':>9}"
                                               for v in values))
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("the sweeps draw their plots with matplotlib, which is not installed here "
                           "(pip install matplotlib); the rows were written") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(rows: List[Dict], x: str, panels: Sequence[tuple], title: str, path: str) -> str:
    """One panel per (key, ylabel, log y) in `panels`, one line per mode, x on a log-2 axis."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    values = sorted({r[x] for r in rows})
    for ax, (key, ylabel, logy) in zip(axes[0], panels):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            points = sorted((r[x], r[key]) for r in rows if r["mode"] == mode and r.get(key) is not None)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.set(xlabel=XLABEL[x], ylabel=ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _describe(args) -> str:
    fixed = {"image_size": f"{args.image_size}x{args.image_size}x3", "depth": f"K={args.depth}",
             "batch": f"batch {args.batch_size}"}
    fixed.pop(SWEEPS[args.sweep]["x"])
    return ", ".join([*fixed.values(), f"L={args.levels}", f"width {args.hidden}", f"device {args.device}"])


def run(args) -> List[Dict]:
    """Run one sweep: measure, print, append rows, plot. Returns the rows."""
    if args.sweep not in ("sample",):
        for mode in args.modes:
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r}; choose from {MODES}")
    torch.manual_seed(0)
    env = environment(args.device)
    x = SWEEPS[args.sweep]["x"]
    t0 = time.perf_counter()
    if args.sweep == "time":
        rows = sweep_time(args, env)
        print(f"training-step time (ms, median of {args.rounds} interleaved rounds): {_describe(args)}, "
              f"{env['threads']} threads")
        print(table([{**r, "ms": 1e3 * r["median_s"]} for r in rows], x, "ms"))
        print("ratio to autograd (side by side, same run):")
        print(table(rows, x, "time_vs_autograd", "{:9.2f}"))
        panels = [("median_s", "step time (s)", True), ("time_vs_autograd", "step time / autograd", False)]
    elif args.sweep == "sample":
        rows = sweep_sample(args, env)
        print(f"sampling latency (s), batch {args.batch_size}, L={args.levels}, K={args.depth}, width {args.hidden}, "
              f"{args.coupling}, device {args.device}, {env['threads']} threads, median of {args.rounds}")
        for r in rows:
            print(f"  {r['image_size']:>4}x{r['image_size']}: {r['median_s']:8.3f} s  (min {r['min_s']:.3f}, "
                  f"{r['parameters'] / 1e6:.1f} M parameters)")
        panels = [("median_s", "seconds per image (batch 1)", True)]
    else:
        rows = sweep_memory(args, env)
        print(f"activation memory of one training step (MiB, tracker): {_describe(args)}")
        print(table(rows, x, "activation_mib"))
        panels = [("activation_mib", "activation memory (MiB)", True)]
        if x != "batch":
            _print_ratios(rows, x)
    print(f"({time.perf_counter() - t0:.0f} s)")
    print(f"rows appended to {append_rows(args.results, rows)}")
    print(f"plot: {plot(rows, x, panels, f'{args.sweep} sweep: {_describe(args)}', args.plot)}")
    return rows


def _print_ratios(rows: List[Dict], x: str) -> None:
    top = max(r[x] for r in rows)
    at = {r["mode"]: r["activation_mib"] for r in rows if r[x] == top}
    if "reversible" in at:
        print(f"at {x}={top}, relative to reversible: " +
              ", ".join(f"{m} {v / at['reversible']:.2f}x" for m, v in at.items() if m != "reversible"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("sweep", choices=list(SWEEPS) + ["all"])
    p.add_argument("--values", type=int, nargs="+", default=None, help="the values swept (default: per sweep)")
    p.add_argument("--modes", nargs="+", default=list(MODES))
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--levels", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--coupling", default="additive", help="sample sweep only (CelebA-HQ: additive)")
    p.add_argument("--n-bits", type=int, default=5, help="sample sweep only (CelebA-HQ: 5)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default: time 5, sample 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", default=None, help="JSON-lines file (default benchmarks/results/sweep_NAME.jsonl)")
    p.add_argument("--plot", default=None, help="PNG file (default benchmarks/results/sweep_NAME.png)")
    p.add_argument("--out-dir", default=None, help="folder for the default results and plot files")
    return p


def _defaults(args, sweep: str):
    """A copy of args for one sweep, its unset options filled from SWEEPS."""
    spec = SWEEPS[sweep]
    a = argparse.Namespace(**vars(args))
    a.sweep = sweep
    a.values = list(args.values) if args.values and args.sweep != "all" else list(spec["values"])
    for name, key in (("image_size", "image_size"), ("levels", "levels"), ("depth", "depth"), ("hidden", "hidden"),
                      ("batch_size", "batch")):
        if getattr(a, name) is None or args.sweep == "all":
            setattr(a, name, spec[key])
    if a.rounds is None or args.sweep == "all":
        a.rounds = spec.get("rounds", 0)
    out_dir = args.out_dir or RESULTS
    a.results = args.results if args.results and args.sweep != "all" else os.path.join(out_dir, f"sweep_{sweep}.jsonl")
    a.plot = args.plot if args.plot and args.sweep != "all" else os.path.join(out_dir, f"sweep_{sweep}.png")
    return a


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    for sweep in (list(SWEEPS) if args.sweep == "all" else [args.sweep]):
        if args.sweep == "all":
            print(f"\n== {sweep}")
        run(_defaults(args, sweep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
