"""Memory that no tensor holds: a 3x3 and a 1x1 convolution's forward and backward on the CPU, counted by the
live-storage tracker of revglow.memory.profile (tensors alone, and with each convolution's working buffers measured per
call signature by revglow.memory.workspaces) and measured as the process's peak resident set, per sample.

The convolution kernels allocate their working buffers below the dispatcher, where the tracker cannot see them;
the resident set can. Counted without them, the tensors fall well short of the resident set; with them, the two
agree. This was the gap between the two measurements of `revglow profile` in the reversible and checkpoint modes,
whose stored activations are small beside those buffers.

    python benchmarks/conv_workspace.py [--channels 7 64] [--size 16] [--batches 16 64]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from revglow.memory.device_meters import ResidentSet
from revglow.memory.workspaces import OpWorkspaces
from revglow.memory.live_storage import LiveStorageTracker

MiB = 2 ** 20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs=2, default=[7, 64], metavar=("IN", "HIDDEN"))
    parser.add_argument("--size", type=int, default=16, help="image height and width")
    parser.add_argument("--batches", type=int, nargs=2, default=[16, 64])
    args = parser.parse_args(argv)
    if not ResidentSet.available:
        sys.exit("conv_workspace: the resident-set measurement needs Linux (/proc/self/clear_refs)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c_in, hidden = args.channels
    w1 = torch.randn(hidden, c_in, 3, 3, requires_grad=True)
    w2 = torch.randn(hidden, hidden, 1, 1, requires_grad=True)

    def step(x):
        F.conv2d(F.conv2d(x, w1, padding=1).relu(), w2).sum().backward()

    counted, with_workspace, measured = {}, {}, {}
    workspaces = OpWorkspaces()
    for n in args.batches:
        x = torch.randn(n, c_in, args.size, args.size, requires_grad=True)
        step(x)                                    # warm-up: gradients allocated
        with ResidentSet() as resident:
            step(x)
        with LiveStorageTracker(workspaces=workspaces) as tracker:
            step(x)
        counted[n], with_workspace[n] = tracker.peak / MiB, tracker.peak_with_workspace / MiB
        measured[n] = resident.peak / MiB
        print(f"batch {n:4d}: counted {counted[n]:8.2f} MiB, with workspaces {with_workspace[n]:8.2f} MiB   "
              f"resident set {measured[n]:8.2f} MiB")
    a, b = args.batches

    def per_sample(mib):
        return (mib[b] - mib[a]) / (b - a)

    ratios = {"resident_over_tensors": per_sample(measured) / per_sample(counted),
              "resident_over_with_workspace": per_sample(measured) / per_sample(with_workspace)}
    print(f"per sample: counted {per_sample(counted):.4f} MiB, with workspaces {per_sample(with_workspace):.4f} MiB, "
          f"resident set {per_sample(measured):.4f} MiB; resident set over the count "
          f"{ratios['resident_over_tensors']:.2f} (tensors alone), {ratios['resident_over_with_workspace']:.2f} "
          f"(with workspaces)")
    return ratios


if __name__ == "__main__":
    main()
