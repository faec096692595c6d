"""The paper's Figure 3 at small scale: reverse, shuffle and invertible 1x1 convolution, each with additive and
affine coupling, several seeds at the same budget on the 8x8 digits; test bits/dim against steps.

    python benchmarks/paper/figure3.py                                  # 6 variants x 3 seeds (README numbers)
    python benchmarks/paper/figure3.py --steps 3000 --hidden 128 --depth 8 --seeds 0 1 2 3 4   # a larger budget
    python benchmarks/paper/figure3.py --variants affine-reverse affine-shuffle --tag T   # split over processes,
    python benchmarks/paper/figure3.py --plot-only --tag T                               # then one table and plot

Each run is `revglow train --data digits --levels 2 --depth 4 --hidden 32 --batch-size 64 --memory autograd
--coupling C --permutation P --max-steps 500 --eval-every 100 --seed S` (Adam 1e-3, the reference network, EMA
weights evaluated on the 359 test images). A row per run (with its curve and command) goes to
benchmarks/results/paper_figure3.jsonl; the table (mean and standard deviation over seeds of the final test
bits/dim) is printed and the curves drawn to benchmarks/results/paper_figure3.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runs  # noqa: E402

PERMUTATIONS = {"reverse": "reverse", "shuffle": "shuffle", "1x1conv": "invconv_lu"}
COUPLINGS = ("additive", "affine")
VARIANTS: Dict[str, List[str]] = {f"{c}-{p}": ["--coupling", c, "--permutation", perm]
                                  for c in COUPLINGS for p, perm in PERMUTATIONS.items()}
COLOURS = {"reverse": "tab:blue", "shuffle": "tab:green", "1x1conv": "tab:red"}


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs.add_budget_flags(parser, results="paper_figure3.jsonl", plot="paper_figure3.png", steps=500,
                          seeds=(0, 1, 2), eval_every=100)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--conv", choices=["invconv_lu", "invconv"], default="invconv_lu",
                        help="which 1x1 convolution stands for the paper's (LU-parametrized: the default here)")
    return parser.parse_args(argv)


def plot(summary: Sequence[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, coupling in zip(axes, COUPLINGS):
        for s in summary:
            c, p = s["variant"].split("-", 1)
            if c != coupling:
                continue
            steps = [q[0] for q in s["curve"]]
            mean = [q[1] for q in s["curve"]]
            std = [0.0 if q[2] != q[2] else q[2] for q in s["curve"]]
            ax.plot(steps, mean, color=COLOURS[p], marker="o", ms=3, label=f"{p} (n={len(s['seeds'])})")
            ax.fill_between(steps, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)],
                            color=COLOURS[p], alpha=0.2)
        if summary:
            ax.axhline(summary[0]["baseline_bpd"], color="grey", ls="--", lw=1, label="per-pixel baseline")
        ax.set_title(f"{coupling} coupling")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("test bits/dim (mean ± std over seeds)")
    fig.suptitle(title, fontsize=9)
    runs.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse(argv)
    runs.start(args)
    variants = {name: [f if f != "invconv_lu" else args.conv for f in VARIANTS[name]] for name in args.variants}
    rows = runs.sweep("figure3", args, variants)
    summary = runs.summarize(rows, list(VARIANTS))
    if summary:
        first = rows[0]
        plot(summary, args.plot, f"{first['model']}, {first['steps']} steps; tag {args.tag}")
        runs.finish(args, summary, rows)
    return rows


if __name__ == "__main__":
    main()
