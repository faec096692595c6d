"""Memory that no tensor holds: a 3x3 and a 1x1 convolution's forward and backward on the CPU, counted by the
live-storage tracker of revglow.profile and measured as the process's peak resident set, per sample.

The convolution kernels allocate their working buffers below the dispatcher, where the tracker cannot see them;
the resident set can. This is the gap between the two measurements of `revglow profile` in the reversible and
checkpoint modes, whose stored activations are small beside those buffers.

    python benchmarks/conv_workspace.py [--channels 7 64] [--size 16] [--batches 16 64]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from revglow.profile import LiveStorageTracker, _ResidentSet

MiB = 2 ** 20


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs=2, default=[7, 64], metavar=("IN", "HIDDEN"))
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--batches", type=int, nargs=2, default=[16, 64])
    args = parser.parse_args(argv)
    if not _ResidentSet.available:
        sys.exit("conv_workspace: the resident-set measurement needs Linux (/proc/self/clear_refs)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c_in, hidden = args.channels
    w1 = torch.randn(hidden, c_in, 3, 3, requires_grad=True)
    w2 = torch.randn(hidden, hidden, 1, 1, requires_grad=True)

    def step(x):
        F.conv2d(F.conv2d(x, w1, padding=1).relu(), w2).sum().backward()

    counted, measured = {}, {}
    for n in args.batches:
        x = torch.randn(n, c_in, args.size, args.size, requires_grad=True)
        step(x)                                    # warm-up: gradients allocated
        with LiveStorageTracker() as tracker:
            step(x)
        with _ResidentSet() as resident:
            step(x)
        counted[n], measured[n] = tracker.peak / MiB, resident.peak / MiB
        print(f"batch {n:4d}: counted {counted[n]:8.2f} MiB   resident set {measured[n]:8.2f} MiB")
    a, b = args.batches
    per_counted, per_measured = (counted[b] - counted[a]) / (b - a), (measured[b] - measured[a]) / (b - a)
    ratio = per_measured / per_counted
    print(f"per sample: counted {per_counted:.4f} MiB, resident set {per_measured:.4f} MiB, ratio {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
