"""What the scripts of benchmarks/paper/ share: one `revglow train` run in this process, its row, seeds averaged,
and the figures' common pieces.

A run is the command line's own `revglow train` (revglow.cli.main), so every row carries the exact command that
reproduces it. The rows get the machine, date, git revision and versions from benchmarks/common.environment and
are appended with common.append_rows; the helpers here add only what training runs need on top of that: the test
bits/dim curve read back from the run's metrics.jsonl, wall and CPU seconds, and mean and spread over seeds.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

PAPER = Path(__file__).resolve().parent
ROOT = PAPER.parent.parent
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from common import RESULTS, append_rows, environment, git_revision  # noqa: E402
from fidelity_digits import PLAIN  # noqa: E402  (the four reference options switched off)
from revglow.cli import main as revglow_main  # noqa: E402

__all__ = ["PLAIN", "RESULTS", "TrainRun", "add_budget_flags", "train", "row", "record", "load_rows", "summarize",
           "print_table", "start", "finish", "sample_rows", "plot_sample_rows", "results_path"]

# No periodic samples or checkpoints (the final ones are written anyway), no progress bar.
QUIET = ["--sample-every", "0", "--checkpoint-every", "0", "--no-progress"]


@dataclass
class TrainRun:
    """One finished `revglow train`: the command, its test bits/dim curve and final numbers, its cost."""
    argv: List[str]
    curve: List[Tuple[int, float, float]]      # (step, test bits/dim of the EMA weights, its standard error)
    test_bpd: float
    test_bpd_stderr: float
    baseline_bpd: float
    wall_s: float
    cpu_s: float
    out: Optional[str] = None                  # the run folder, when kept
    extra: Dict[str, float] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The command line that repeats the run (the output folder written as OUT when it was temporary)."""
        argv = list(self.argv)
        if self.out is None:
            argv[argv.index("--out") + 1] = "OUT"
        return "python -m revglow " + shlex.join(argv)


def add_budget_flags(parser: argparse.ArgumentParser, *, results: str, plot: str, steps: int, seeds: Sequence[int],
                     eval_every: int, levels: int = 2, depth: Optional[int] = 4, hidden: int = 32,
                     batch_size: int = 64) -> None:
    """The flags every script here has: the model, the budget, the seeds, threads and where rows and plot go
    (no --depth when `depth` is None: a script that sweeps it)."""
    parser.add_argument("--levels", type=int, default=levels)
    if depth is not None:
        parser.add_argument("--depth", type=int, default=depth)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=int, default=eval_every, help="steps between test evaluations")
    parser.add_argument("--eval-batch-size", type=int, default=None,
                        help="images per evaluation batch (default: --batch-size)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    parser.add_argument("--memory", default="autograd", choices=["reversible", "checkpoint", "autograd"],
                        help="equal gradients in every mode; autograd is the fastest for small models on a CPU")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine one thread is ~10x faster than two)")
    parser.add_argument("--results", default=results, help="JSON-lines file to append to (bare name: benchmarks/results/)")
    parser.add_argument("--plot", default=plot, help="PNG to write (bare name: benchmarks/results/)")
    parser.add_argument("--tag", default=None,
                        help="name shared by the rows of one experiment (default: the start time); processes that "
                             "split the variants between them pass the same tag, then one --plot-only")
    parser.add_argument("--plot-only", action="store_true",
                        help="train nothing: table and plot from the rows of --results with this --tag")


def results_path(path: str) -> str:
    """`path`, a bare file name taken as one in benchmarks/results/."""
    return str(Path(RESULTS) / path) if Path(path).parent == Path("") else path


# The revision of the code this process imported: read by `start`, before the first run (the checkout may move on
# while a long sweep runs; the code in memory does not).
_STARTED_AT_GIT: Optional[str] = None


def start(args: argparse.Namespace) -> None:
    """Resolve the paths and the tag, set the threads and note the git revision, before any run."""
    global _STARTED_AT_GIT
    _STARTED_AT_GIT = git_revision()
    torch.set_num_threads(args.threads)
    args.results = results_path(args.results)
    args.plot = results_path(args.plot)
    if args.tag is None:
        if args.plot_only:
            raise SystemExit("--plot-only needs the --tag of the rows to plot")
        args.tag = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")


def train(flags: Sequence[str], *, steps: int, seed: int, eval_every: int, out: Optional[str] = None) -> TrainRun:
    """`revglow train FLAGS` for `steps` steps with `seed`, evaluated every `eval_every` steps (and at the end).

    Without `out` the run folder is temporary (its checkpoint and samples are dropped)."""
    with tempfile.TemporaryDirectory(prefix="revglow-paper-") as tmp:
        folder = out if out is not None else tmp
        argv = ["train", *flags, *QUIET, "--max-steps", str(steps), "--seed", str(seed),
                "--eval-every", str(eval_every), "--out", folder, "--overwrite"]
        wall, cpu = time.perf_counter(), time.process_time()
        status = revglow_main(argv)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if status != 0:
            raise RuntimeError(f"`revglow {shlex.join(argv)}` exited with status {status}")
        metrics = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "test_bpd" in m]
    final = evals[-1]
    baseline = [m["baseline_bpd"] for m in metrics if "baseline_bpd" in m][-1]
    return TrainRun(argv=argv, curve=[(m["step"], m["test_bpd"], m["test_bpd_stderr"]) for m in evals],
                    test_bpd=final["test_bpd"], test_bpd_stderr=final["test_bpd_stderr"], baseline_bpd=baseline,
                    wall_s=round(wall, 1), cpu_s=round(cpu, 1), out=out,
                    extra={"test_bpd_raw": final["test_bpd_raw"]})


def row(experiment: str, tag: str, variant: str, flags: Sequence[str], seed: int, run: TrainRun, **more) -> dict:
    """The JSON row of one run: what was run (variant, its flags, the full command), what came out, where; `git`
    is the revision when the script started (`start`), the code the run used."""
    env = environment()
    env["git"] = _STARTED_AT_GIT or env["git"]
    return {"experiment": experiment, "tag": tag, "variant": variant, "flags": shlex.join(flags), "seed": seed,
            "steps": int(run.curve[-1][0]), "test_bpd": run.test_bpd, "test_bpd_stderr": run.test_bpd_stderr,
            "test_bpd_raw": run.extra["test_bpd_raw"], "baseline_bpd": run.baseline_bpd,
            "curve": [list(point) for point in run.curve], "wall_s": run.wall_s, "cpu_s": run.cpu_s,
            "command": run.command, **more, **env}


def record(path: str, rows: Iterable[dict]) -> None:
    append_rows(path, rows)


def load_rows(path: str, tag: str, experiment: Optional[str] = None) -> List[dict]:
    """The rows of `path` with this tag (and experiment)."""
    if not Path(path).exists():
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("tag") == tag and (experiment is None or r.get("experiment") == experiment)]


def model_flags(args: argparse.Namespace, data: Sequence[str] = ("--data", "digits"), depth: bool = True) -> List[str]:
    """The `revglow train` flags of the data (`data`), then the model and batch in a script's budget flags
    (without --depth when the script varies it itself; --eval-batch-size only when it was given)."""
    flags = [*data, "--levels", str(args.levels)]
    if depth:
        flags += ["--depth", str(args.depth)]
    flags += ["--hidden", str(args.hidden), "--batch-size", str(args.batch_size), "--memory", args.memory]
    if args.eval_batch_size is not None:
        flags += ["--eval-batch-size", str(args.eval_batch_size)]
    return flags


def save_figure(fig, path: str) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(experiment: str, args: argparse.Namespace, variants: Dict[str, List[str]], width: int = 18) -> List[dict]:
    """Train each of `variants` (name -> its flags beside the model's) at each of args.seeds, a row per run in
    args.results (unless --plot-only); returns the rows of this experiment and args.tag."""
    model = model_flags(args)
    if not args.plot_only:
        for name, flags in variants.items():
            for seed in args.seeds:
                run = train(model + flags, steps=args.steps, seed=seed, eval_every=args.eval_every)
                record(args.results, [row(experiment, args.tag, name, flags, seed, run, model=" ".join(model))])
                print(f"{name:{width}s} seed {seed}: test bits/dim {run.test_bpd:.4f} ± {run.test_bpd_stderr:.4f} "
                      f"({run.wall_s:.0f} s)", flush=True)
    return load_rows(args.results, args.tag, experiment)


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def summarize(rows: Sequence[dict], order: Sequence[str]) -> List[dict]:
    """Per variant (in `order`): seeds, mean and sample standard deviation over seeds of the final test bits/dim,
    and the mean curve (mean and standard deviation over seeds at each evaluated step)."""
    out = []
    for variant in order:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        mean, std = _mean_std([r["test_bpd"] for r in mine])
        steps = sorted({p[0] for r in mine for p in r["curve"]})
        curve = []
        for s in steps:
            at = [p[1] for r in mine for p in r["curve"] if p[0] == s]
            if len(at) == len(mine):
                curve.append((s, *_mean_std(at)))
        out.append({"variant": variant, "flags": mine[0]["flags"], "seeds": sorted(r["seed"] for r in mine),
                    "mean": mean, "std": std, "curve": curve, "baseline_bpd": mine[0]["baseline_bpd"],
                    "wall_s": sum(r["wall_s"] for r in mine), "cpu_s": sum(r["cpu_s"] for r in mine)})
    return out


def print_table(summary: Sequence[dict]) -> None:
    """A Markdown table: variant, flags, seeds, final test bits/dim mean ± standard deviation over seeds."""
    print("| variant | flags | seeds | test bits/dim, mean ± std over seeds | per seed | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['variant']} | `{s['flags']}` | {len(s['seeds'])} | {s['mean']:.4f} ± {s['std']:.4f} | "
              f"{s.get('per_seed', '')} | {s['wall_s']:.0f} | {s['cpu_s']:.0f} |")


def finish(args: argparse.Namespace, summary: Sequence[dict], rows: Sequence[dict]) -> None:
    """Per-seed values into the summary, then the table."""
    for s in summary:
        mine = sorted((r for r in rows if r["variant"] == s["variant"]), key=lambda r: r["seed"])
        s["per_seed"] = ", ".join(f"{r['test_bpd']:.4f}" for r in mine)
    print(f"rows: {args.results} (tag {args.tag}); plot: {args.plot}")
    print_table(summary)


def sample_rows(checkpoint: str, temperatures: Sequence[float], n: int, seed: int) -> List[torch.Tensor]:
    """`n` samples per temperature from the EMA weights of `checkpoint`, images in [0, 1]. Every row starts from
    the same latent draw (generator seeded with `seed`), so the rows differ by the temperature alone."""
    from revglow.training.evaluation import load_model

    model = load_model(checkpoint, torch.device("cpu"))
    model.eval()
    out = []
    with torch.no_grad():
        for t in temperatures:
            out.append(model.sample(n, temperature=float(t), generator=torch.Generator().manual_seed(seed)))
    return out


def plot_sample_rows(rows: Sequence[torch.Tensor], labels: Sequence[str], path: str, title: str) -> None:
    """One image: a row of samples per entry of `rows`, labelled on the left."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from revglow.training.images import make_grid

    grids = [make_grid(r, nrow=r.shape[0]).permute(1, 2, 0).numpy() for r in rows]
    h, w = grids[0].shape[:2]
    fig, axes = plt.subplots(len(grids), 1, figsize=(min(14, 1.2 + w / h * 1.0), 0.5 + 1.0 * len(grids)),
                             squeeze=False)
    for ax, grid, label in zip(axes[:, 0], grids, labels):
        ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
