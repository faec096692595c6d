"""Temperature and depth (the paper's Figures 8 and 9, small): models with K in {2, 8, 32} steps per level at a
fixed L trained briefly on the 8x8 digits, samples of each; and the samples of one of them (K=8) at
temperatures T in {0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0}.

    python benchmarks/paper/temperature_depth.py                            # README figures
    python benchmarks/paper/temperature_depth.py --steps 2000 --hidden 64   # a larger budget

Each model is `revglow train --data digits --levels 2 --depth K --hidden 16 --batch-size 32 --memory autograd
--max-steps 300 --eval-every 100 --seed 0`. A row per model (test bits/dim, its curve, the command) goes to
benchmarks/results/paper_depth.jsonl. benchmarks/results/paper_temperature.png has a row per temperature, all
rows from the same latent draw scaled by T; benchmarks/results/paper_depth.png a row per K at --depth-temperature.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runs  # noqa: E402

TEMPERATURES = (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs.add_budget_flags(parser, results="paper_depth.jsonl", plot="paper_depth.png", steps=300, seeds=(0,),
                          eval_every=100, depth=None, hidden=16, batch_size=32)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 8, 32], help="flow steps K per level")
    parser.add_argument("--temperature-depth", type=int, default=8, help="the K whose model gives the temperature grid")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    parser.add_argument("--depth-temperature", type=float, default=0.7, help="temperature of the depth grid")
    parser.add_argument("--n", type=int, default=16, help="samples per row")
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the latent draw")
    parser.add_argument("--temperature-plot", default="paper_temperature.png")
    parser.add_argument("--keep", default=None, help="folder to keep the runs (checkpoints, samples) in")
    args = parser.parse_args(argv)
    if args.temperature_depth not in args.depths:
        parser.error(f"--temperature-depth {args.temperature_depth} must be one of --depths {args.depths}")
    if args.plot_only:
        parser.error("--plot-only: the grids need the checkpoints; rerun (with --keep to keep them)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse(argv)
    runs.start(args)
    args.temperature_plot = runs.results_path(args.temperature_plot)
    seed = args.seeds[0]
    model = runs.model_flags(args, depth=False)      # each run adds its own --depth
    rows, checkpoints = [], {}
    with tempfile.TemporaryDirectory(prefix="revglow-paper-depth-") as tmp:
        keep = Path(args.keep) if args.keep else Path(tmp)
        for k in args.depths:
            folder = keep / f"K{k}"
            run = runs.train(model + ["--depth", str(k)], steps=args.steps, seed=seed, eval_every=args.eval_every,
                             out=str(folder))
            rows.append(runs.row("depth", args.tag, f"K={k}", ["--depth", str(k)], seed, run, model=" ".join(model),
                                 depth=k))
            runs.record(args.results, rows[-1:])
            checkpoints[k] = str(folder / "checkpoint.pt")
            print(f"K={k:3d}: test bits/dim {run.test_bpd:.4f} ± {run.test_bpd_stderr:.4f} ({run.wall_s:.0f} s)",
                  flush=True)
        by_k = {r["depth"]: r for r in rows}
        samples = [runs.sample_rows(checkpoints[k], [args.depth_temperature], args.n, args.sample_seed)[0]
                   for k in args.depths]
        runs.plot_sample_rows(samples, [f"K={k}\n{by_k[k]['test_bpd']:.3f} b/d" for k in args.depths], args.plot,
                              f"digits, L={args.levels} width {args.hidden}, {rows[0]['steps']} steps, "
                              f"T={args.depth_temperature} (test bits/dim at left)")
        k = args.temperature_depth
        samples = runs.sample_rows(checkpoints[k], args.temperatures, args.n, args.sample_seed)
        runs.plot_sample_rows(samples, [f"T={t:g}" for t in args.temperatures], args.temperature_plot,
                              f"digits, L={args.levels} K={k} width {args.hidden}, {rows[0]['steps']} steps "
                              f"(test {by_k[k]['test_bpd']:.3f} bits/dim); one latent draw, scaled by T")
    print(f"rows: {args.results} (tag {args.tag}); plots: {args.plot}, {args.temperature_plot}")
    print("| K | test bits/dim | wall s | CPU s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['depth']} | {r['test_bpd']:.4f} ± {r['test_bpd_stderr']:.4f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
