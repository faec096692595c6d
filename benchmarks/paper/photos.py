"""Real photographs at 64x64 on a CPU: Glow trained on `--data photos` (crops of
scikit-learn's two sample photographs, disjoint train and test regions) for a few minutes; test bits/dim beside
the per-pixel baseline, and its samples.

    python benchmarks/paper/photos.py                              # README numbers (about 8 minutes here)
    python benchmarks/paper/photos.py --steps 5000 --batch-size 64  # a larger budget

The run is `revglow train --data photos --levels 3 --depth 8 --hidden 64 --batch-size 16 --memory autograd
--max-steps 300 --eval-every 100 --seed 0` (the photos defaults: 64x64 crops at 5 bits, L=3 K=8 width 64; Adam
1e-3; EMA weights evaluated on the 256 test crops). Its row (test bits/dim curve, the per-pixel baseline of the
trainer, the command) goes to benchmarks/results/paper_photos.jsonl; benchmarks/results/paper_photos.png shows
test crops and samples at T in {0.5, 0.7, 1.0}.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runs  # noqa: E402


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs.add_budget_flags(parser, results="paper_photos.jsonl", plot="paper_photos.png", steps=300, seeds=(0,),
                          eval_every=100, levels=3, depth=8, hidden=64, batch_size=16)
    parser.add_argument("--image-size", type=int, default=64, help="side of the crops")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 0.7, 1.0])
    parser.add_argument("--n", type=int, default=8, help="images per row of the figure")
    parser.add_argument("--keep", default=None, help="folder to keep the run (checkpoint, samples) in")
    args = parser.parse_args(argv)
    if args.plot_only:
        parser.error("--plot-only: the figure needs the checkpoint; rerun (with --keep to keep it)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    from revglow.training.data import load_dataset

    args = parse(argv)
    runs.start(args)
    model = runs.model_flags(args, data=("--data", "photos", "--image-size", str(args.image_size)))
    seed = args.seeds[0]
    with tempfile.TemporaryDirectory(prefix="revglow-paper-photos-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp) / "photos"
        run = runs.train(model, steps=args.steps, seed=seed, eval_every=args.eval_every, out=str(folder))
        r = runs.row("photos", args.tag, "photos", [], seed, run, model=" ".join(model))
        runs.record(args.results, [r])
        test = load_dataset("photos", image_size=args.image_size).test
        real = torch.stack([test[i][0] for i in range(0, len(test), max(1, len(test) // args.n))][:args.n])
        samples = runs.sample_rows(str(folder / "checkpoint.pt"), args.temperatures, args.n, seed)
    runs.plot_sample_rows([real, *samples], ["test crops", *[f"T={t:g}" for t in args.temperatures]], args.plot,
                          f"photos {args.image_size}x{args.image_size}, L={args.levels} K={args.depth} width "
                          f"{args.hidden}, {r['steps']} steps of batch {args.batch_size}: test {r['test_bpd']:.3f} "
                          f"bits/dim, per-pixel baseline {r['baseline_bpd']:.3f}")
    print(f"rows: {args.results} (tag {args.tag}); plot: {args.plot}")
    print("| steps | test bits/dim (EMA) | raw weights | per-pixel baseline | wall s | CPU s |\n|---|---|---|---|---|---|")
    print(f"| {r['steps']} | {r['test_bpd']:.4f} ± {r['test_bpd_stderr']:.4f} | {r['test_bpd_raw']:.4f} | "
          f"{r['baseline_bpd']:.4f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    return [r]


if __name__ == "__main__":
    main()
