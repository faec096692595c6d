"""`revglow sample`: a grid of samples from a checkpoint, decoded in batches (revglow.glow.latents.sample_in_batches)
so that memory does not grow with --n, and the same grid for a seed whatever --batch-size.

Samples that decode to non-finite values (weights that overflow) are counted: drawn black with a warning when some
are, an error without a file when all are.

Example:
    $ revglow sample --checkpoint runs/digits/checkpoint.pt --n 64 --temperature 0.7 --out grid.png
"""
from __future__ import annotations

import argparse
import sys

import torch

from revglow.cli.checks import CommandError
from revglow.cli.flags import add_checkpoint_flags
from revglow.cli.loading import load_for_generation
from revglow.cli.values import finite_nonnegative_float, positive_int
from revglow.glow.latents import SAMPLE_BATCH_VALUES, default_sample_batch, sample_in_batches

__all__ = ["add_sample_parser", "cmd_sample"]


def add_sample_parser(commands) -> None:
    """The `sample` command, on the subparsers `commands`."""
    sample = commands.add_parser(
        "sample", help="a grid of samples from a checkpoint",
        description="Draw --n samples and write them as one grid. They are decoded --batch-size at a time, and for "
                    "a --seed the grid is the same whatever the batch size or device.")
    add_checkpoint_flags(sample)
    sample.add_argument("--n", type=positive_int, default=64, help="number of samples")
    sample.add_argument("--temperature", type=finite_nonnegative_float, default=0.7,
                        help="latent standard deviation (paper, section 5)")
    sample.add_argument("--nrow", type=positive_int, default=None, help="images per row of the grid")
    sample.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"images decoded at once (default: as many as keep the widest level's activations "
                             f"near {SAMPLE_BATCH_VALUES:,} values, 64 MiB in float32)")
    sample.add_argument("--out", required=True, help="PNG or JPEG file to write")


def cmd_sample(args: argparse.Namespace) -> int:
    from revglow.training.images import save_grid, to_uint8

    _, model, _, label = load_for_generation(args)
    batch_size = args.batch_size or default_sample_batch(model.config)
    images, finite = [], 0
    for batch, ok in sample_in_batches(model, args.n, batch_size, args.temperature, label, args.seed):
        images.append(to_uint8(batch.cpu()))    # the grid's bytes: a quarter of the float images
        finite += int(ok.sum())
    bad = args.n - finite
    if bad == args.n:
        raise CommandError(f"all {args.n} samples decode to NaN or Inf: the model in {args.checkpoint} gives no "
                           f"usable samples (its weights overflow); nothing written")
    path = save_grid(torch.cat(images), args.out, nrow=args.nrow)
    if bad:
        print(f"revglow: warning: {bad} of {args.n} samples decode to NaN or Inf; they are drawn black",
              file=sys.stderr)
    print(f"wrote {args.n} samples (temperature {args.temperature}) to {path}")
    return 0
