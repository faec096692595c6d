"""The reference network's four options ablated on the 8x8 digits: the plain network, each
option added to it alone, and all four (GlowConfig's defaults), same budget and seeds.

    python benchmarks/paper/ablation.py                         # 6 variants x 3 seeds (README numbers)
    python benchmarks/paper/ablation.py --steps 2000 --hidden 64 --seeds 0 1 2 3 4   # a larger budget
    python benchmarks/paper/ablation.py --variants plain all-four --tag T   # split over processes, then
    python benchmarks/paper/ablation.py --plot-only --tag T                 # one table and plot

Each run is `revglow train --data digits --levels 2 --depth 4 --hidden 32 --batch-size 64 --memory autograd
--max-steps 500 --eval-every 100 --seed S` plus the variant's four option flags (affine coupling, invconv_lu).
Rows to benchmarks/results/paper_ablation.jsonl, the table printed, final test bits/dim per variant (mean and
standard deviation over seeds, each seed a dot) drawn to benchmarks/results/paper_ablation.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runs  # noqa: E402

# Each option: its flags off (the plain network's) and on (the reference's value, GlowConfig's default).
OPTIONS: Dict[str, tuple] = {
    "nn-actnorm": (["--no-nn-actnorm"], ["--nn-actnorm"]),
    "edge-padding": (["--no-edge-padding"], ["--edge-padding"]),
    "zero-logscale-3": (["--zero-logscale-factor", "none"], ["--zero-logscale-factor", "3"]),
    "actnorm-logscale-3": (["--actnorm-logscale-factor", "1"], ["--actnorm-logscale-factor", "3"]),
}


def _flags(on: Sequence[str]) -> List[str]:
    return [f for name, (off_flags, on_flags) in OPTIONS.items() for f in (on_flags if name in on else off_flags)]


VARIANTS: Dict[str, List[str]] = {"plain": _flags(()), **{f"plain+{name}": _flags((name,)) for name in OPTIONS},
                                  "all-four": _flags(tuple(OPTIONS))}
assert VARIANTS["plain"] == runs.PLAIN, "the plain network must be fidelity_digits.PLAIN"


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs.add_budget_flags(parser, results="paper_ablation.jsonl", plot="paper_ablation.png", steps=500,
                          seeds=(0, 1, 2), eval_every=100)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    return parser.parse_args(argv)


def plot(summary: Sequence[dict], rows: Sequence[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, s in enumerate(summary):
        ax.errorbar([i], [s["mean"]], yerr=[0.0 if s["std"] != s["std"] else s["std"]], fmt="s", color="k",
                    capsize=4, zorder=3)
        per = [r["test_bpd"] for r in rows if r["variant"] == s["variant"]]
        ax.scatter([i + 0.12] * len(per), per, color="tab:orange", s=12, zorder=2)
    if summary:
        ax.axhline(summary[0]["baseline_bpd"], color="grey", ls="--", lw=1, label="per-pixel baseline")
    ax.set_xticks(range(len(summary)))
    ax.set_xticklabels([s["variant"] for s in summary], rotation=20, ha="right")
    ax.set_ylabel("final test bits/dim")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    runs.save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse(argv)
    runs.start(args)
    rows = runs.sweep("ablation", args, {name: VARIANTS[name] for name in args.variants}, width=26)
    summary = runs.summarize(rows, list(VARIANTS))
    if summary:
        plot(summary, rows, args.plot, f"{rows[0]['model']}, {rows[0]['steps']} steps\nmean ± std over "
                                       f"seeds (dots: the seeds); tag {args.tag}")
        runs.finish(args, summary, rows)
    return rows


if __name__ == "__main__":
    main()
