"""Training-step time of the memory modes, measured side by side in one run, against a peer Glow and an earlier
revision.

The contenders run interleaved (one step of each, round after round, the order reversed every other round) on
identical weights and data, so load from other processes on a shared machine hits all of them alike; the medians
are compared, and the spread (min, max) is printed beside them. Default problem: CPU, 32x32 RGB, 3 levels, K=8,
width 128, batch 16, affine coupling, LU-decomposed 1x1 convolution, the plain coupling network
(`--network plain`: conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero conv3x3, as in rosinality/glow-pytorch; `reference`:
GlowConfig's defaults, with ActNorm in the network and edge padding).

`--peer PATH`: rosinality/glow-pytorch's model.py (or a file with its interface), loaded from PATH; its Glow is
built with the same L, K, width, affine coupling and LU convolution, and one training step is its forward on the
dequantized batch and the backward of the mean negative log-likelihood, timed like revglow's.

`--baseline-checkout PATH`: a checkout of an earlier revision (e.g. `git worktree add /tmp/old REV`). Its modes
run in a subprocess that imports revglow from PATH, alternating with this run's contenders step by step (one
process waits while the other computes); its rows carry `contender: baseline` and its revision.

Beside the steps, `networks-forward` times every coupling network's forward alone (no graph, on the inputs a
forward of the model gives them): the reversible backward computes it once more than autograd does, so its share
of the autograd step is about the least reversible / autograd can be (less what the reversible forward saves by
recording no graph); the script prints it.

Targets on the default problem: autograd / peer <= 1.00, reversible / peer <= 1.25, reversible / autograd <= 1.15,
reversible / checkpoint <= 0.95.

    python benchmarks/step_time.py [--rounds 20] [--peer model.py] [--baseline-checkout DIR] [--device cuda]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import add_problem_flags, append_rows, environment, random_images, timed_training_step  # noqa: E402

MODES = ("autograd", "checkpoint", "reversible")
# The reversible mode once more without the reconstruction check and RNG replay: the price of both, side by side.
BARE = "reversible-bare"
# Every coupling network's forward, no graph: what the reversible backward recomputes (not a training step).
NETWORKS_FORWARD = "networks-forward"
PEER = "peer"
BASELINE = "baseline:"    # prefix of the earlier revision's contenders
NETWORKS = {"plain": dict(nn_actnorm=False, edge_padding=False), "reference": {}}
# (numerator, denominator, bound) on the default problem; a ratio whose contenders did not run is left out
TARGETS = (("autograd", PEER, 1.00), ("reversible", PEER, 1.25), ("reversible", "autograd", 1.15),
           ("reversible", "checkpoint", 0.95))


def revglow_model(args: argparse.Namespace, mode: str, device: torch.device):
    """This revision's (or, in a --serve process, the checkout's) Glow for `mode`, and a random uint8 batch.

    GlowConfig fields that the imported revision does not have are left out (an older one had fewer options), so
    a checkout from before an option existed runs its only network."""
    from revglow import Glow, GlowConfig

    known = {f.name for f in dataclasses.fields(GlowConfig)}
    wanted = dict(image_shape=(3, args.image_size, args.image_size), levels=args.levels, depth=args.depth,
                  hidden=args.hidden, memory=mode.replace("-bare", ""), kernels=args.kernels,
                  check_reconstruction="off" if mode == BARE else "warn", **NETWORKS[args.network])
    if args.memory_format:
        wanted["memory_format"] = args.memory_format
    torch.manual_seed(0)
    model = Glow(GlowConfig(**{k: v for k, v in wanted.items() if k in known})).to(device)
    x = random_images(args, device)
    model.initialize(x)
    if mode == BARE:
        for flow in model.flows:
            flow.preserve_rng_state = False
    return model, x


def load_peer_module(path: str) -> types.ModuleType:
    """The peer's model.py as a module of its own (nothing of it is copied or installed)."""
    spec = importlib.util.spec_from_file_location("step_time_peer_model", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--peer {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("Glow", "AffineCoupling"):
        if not hasattr(module, name):
            raise ValueError(f"--peer {path}: no {name} (rosinality/glow-pytorch's model.py interface expected)")
    return module


def peer_step(args: argparse.Namespace, device: torch.device) -> Callable[[], float]:
    """A timed training step of the peer's Glow (rosinality/glow-pytorch's interface: Glow(in_channel, n_flow,
    n_block, affine, conv_lu), forward -> (log_p, logdet, z_outs)) with this problem's sizes."""
    module = load_peer_module(args.peer)
    width = args.hidden

    class Coupling(module.AffineCoupling):   # its Flow builds AffineCoupling(in_channel) at the default width
        def __init__(self, in_channel, filter_size=None, affine=True):
            super().__init__(in_channel, width, affine=affine)

    module.AffineCoupling = Coupling
    torch.manual_seed(0)
    model = module.Glow(3, args.depth, args.levels, affine=True, conv_lu=True).to(device)
    n_bins = 256.0
    x = random_images(args, device).float() / n_bins - 0.5
    num_dims = x[0].numel()
    with torch.no_grad():
        model(x + torch.rand_like(x) / n_bins)   # ActNorm's data-dependent initialization

    def loss(images):
        log_p, logdet, _ = model(images + torch.rand_like(images) / n_bins)
        return -(log_p + logdet - num_dims * math.log(n_bins)) / (num_dims * math.log(2.0))

    class Step(torch.nn.Module):   # timed_training_step's interface: parameters(), and model(x).mean()
        def __init__(self):
            super().__init__()
            self.glow = model

        def forward(self, images):
            return loss(images)

    step = Step()
    return lambda: timed_training_step(step, x, device)


class BaselineCheckout:
    """This script in `--serve` mode in a subprocess that imports revglow from an earlier checkout: `step(mode)`
    runs one training step there and returns its seconds. Only one of the two processes computes at a time."""

    def __init__(self, checkout: str, args: argparse.Namespace, modes: List[str]):
        checkout = os.path.abspath(checkout)
        if not os.path.isfile(os.path.join(checkout, "revglow", "__init__.py")):
            raise ValueError(f"--baseline-checkout {checkout}: no revglow/ package there")
        path = [checkout] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
        flags = ["--serve", ",".join(modes), "--threads", str(torch.get_num_threads())] + _problem_argv(args)
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + flags, cwd=checkout, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self._read())
        imported = os.path.realpath(hello["revglow"])
        if not imported.startswith(os.path.realpath(checkout) + os.sep):
            self.close()
            raise RuntimeError(f"the baseline process imported revglow from {imported}, not from {checkout}")
        self.revision = _git_revision(checkout)

    def _read(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the baseline process exited with {self.process.wait()}")
        return line

    def step(self, mode: str) -> float:
        self.process.stdin.write(mode + "\n")
        self.process.stdin.flush()
        return float(self._read())

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def _problem_argv(args: argparse.Namespace) -> List[str]:
    return ["--image-size", str(args.image_size), "--levels", str(args.levels), "--depth", str(args.depth),
            "--hidden", str(args.hidden), "--batch-size", str(args.batch_size), "--device", args.device,
            "--kernels", args.kernels, "--network", args.network] \
        + (["--memory-format", args.memory_format] if args.memory_format else [])


def _git_revision(path: str) -> str:
    """The checkout's short commit (its folder's path when it is no git checkout, e.g. a `git archive` copy)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return path


def serve(args: argparse.Namespace) -> int:
    """--serve: build the asked modes with the revglow on sys.path, then answer each mode name read from stdin
    with the seconds of one training step of it."""
    import revglow

    device = torch.device(args.device)
    models = {mode: revglow_model(args, mode, device) for mode in args.serve.split(",")}
    print(json.dumps({"revglow": revglow.__file__}), flush=True)
    for line in sys.stdin:
        model, x = models[line.strip()]
        print(repr(timed_training_step(model, x, device)), flush=True)
    return 0


def networks_forward(model, x, device: torch.device) -> Callable[[], float]:
    """Seconds of every coupling network's forward alone (no graph), on the inputs they see in a forward of the
    model: what the reversible backward computes once more than autograd does, the floor of its extra cost."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    from revglow.glow.layers.coupling import CouplingNetwork

    inputs = []

    def keep(module, args):
        if type(module) is CouplingNetwork:
            inputs.append((module, args[0].detach().clone()))

    handle = register_module_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for net, h in inputs:
                net(h)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return run


def contenders(args: argparse.Namespace, device: torch.device
               ) -> Tuple[Dict[str, Callable[[], float]], Optional["BaselineCheckout"]]:
    """name -> a callable timing one training step; and the baseline process, if any (to close)."""
    steps: Dict[str, Callable[[], float]] = {}
    state = None
    for mode in MODES + (BARE,):
        model, x = revglow_model(args, mode, device)
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        steps[mode] = (lambda m, xb: lambda: timed_training_step(m, xb, device))(model, x)
    steps[NETWORKS_FORWARD] = networks_forward(*revglow_model(args, "reversible", device), device)
    if args.peer:
        steps[PEER] = peer_step(args, device)
    baseline = None
    if args.baseline_checkout:
        baseline = BaselineCheckout(args.baseline_checkout, args, list(MODES))
        baseline.revision = args.baseline_label or baseline.revision
        for mode in MODES:
            steps[BASELINE + mode] = (lambda m: lambda: baseline.step(m))(mode)
    return steps, baseline


def measure(steps: Dict[str, Callable[[], float]], warmup: int, rounds: int) -> Dict[str, List[float]]:
    names = list(steps)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            t = steps[name]()
            if r >= warmup:
                times[name].append(t)
    return times


def report(args: argparse.Namespace, times: Dict[str, List[float]], baseline: Optional[BaselineCheckout]
           ) -> Tuple[List[dict], int]:
    """Print the table and the ratios; (the rows to append, how many targets failed)."""
    med = {m: statistics.median(v) for m, v in times.items()}
    failed = 0
    env = environment(args.device)
    print(f"training step (forward + backward), {args.image_size}x{args.image_size}x3, L={args.levels}, "
          f"K={args.depth}, width {args.hidden}, batch {args.batch_size}, {args.network} coupling network, device "
          f"{args.device}, {args.rounds} interleaved rounds, {env['threads']} threads")
    print(f"{'contender':>20} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for m, v in times.items():
        print(f"{m:>20} {med[m] * 1e3:10.1f} {min(v) * 1e3:8.1f} {max(v) * 1e3:8.1f}")
    print(f"reversible / reversible without check and RNG replay: {med['reversible'] / med[BARE]:.3f}")
    extra = med[NETWORKS_FORWARD] / med["autograd"]
    print(f"the coupling networks' forward alone / autograd step: {extra:.3f} (the reversible backward runs it once "
          f"more: reversible / autograd cannot go much below {1 + extra:.2f}, less what its graph-free forward "
          f"saves)")
    for a, b, bound in TARGETS:
        if a in med and b in med:
            ratio = med[a] / med[b]
            failed += ratio > bound
            print(f"{a} / {b}: {ratio:.3f} (target <= {bound:.2f}) {'PASS' if ratio <= bound else 'FAIL'}")
    for a, b, bound in TARGETS:   # the same ratios of the earlier revision, for comparison (not counted)
        a, b = BASELINE + a, b if b == PEER else BASELINE + b
        if a in med and b in med:
            print(f"{a} / {b}: {med[a] / med[b]:.3f} (target <= {bound:.2f})")
    for m in MODES:
        if BASELINE + m in med:
            print(f"{m} / baseline {baseline.revision} {m}: {med[m] / med[BASELINE + m]:.3f} (side by side)")
    rows = []
    for m, v in times.items():
        row = {**env, "benchmark": "step_time", "mode": m.split(":")[-1], "median_s": med[m], "min_s": min(v),
               "max_s": max(v), "device": args.device, "kernels": args.kernels, "image_size": args.image_size,
               "levels": args.levels, "depth": args.depth, "hidden": args.hidden, "batch": args.batch_size,
               "network": args.network, "rounds": args.rounds, "memory_format": args.memory_format or "default",
               "contender": "peer" if m == PEER else "baseline" if m.startswith(BASELINE) else "revglow"}
        if m == NETWORKS_FORWARD:
            row.update(mode="none", part="coupling networks' forward")
        if m == PEER:
            row.update(mode="autograd", peer=os.path.basename(args.peer))
        if m.startswith(BASELINE):
            row["git"] = baseline.revision
        rows.append(row)
    return rows, failed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_problem_flags(parser, "step_time.jsonl", rounds=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kernels", default="auto")
    parser.add_argument("--network", choices=sorted(NETWORKS), default="plain",
                        help="the coupling network: plain (conv-ReLU-conv-ReLU-zero conv) or reference (GlowConfig's "
                             "defaults: ActNorm inside, edge padding)")
    parser.add_argument("--memory-format", choices=("auto", "channels_last", "contiguous"),
                        help="GlowConfig.memory_format of revglow's contenders (default: GlowConfig's)")
    parser.add_argument("--peer", help="rosinality/glow-pytorch's model.py, timed on the same problem")
    parser.add_argument("--baseline-checkout", help="a checkout of an earlier revision, timed side by side")
    parser.add_argument("--baseline-label", help="what the baseline's rows call it (default: its git commit)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)    # the baseline process: modes to build
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.serve:
        return serve(args)

    device = torch.device(args.device)
    steps, baseline = contenders(args, device)
    try:
        times = measure(steps, args.warmup, args.rounds)
    finally:
        if baseline is not None:
            baseline.close()
    rows, failed = report(args, times, baseline)
    print(f"rows appended to {append_rows(args.results, rows)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
