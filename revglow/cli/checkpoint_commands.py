"""The commands that load a trained checkpoint: `revglow eval` (test bits/dim), `sample` (a grid of samples),
`interpolate` (a straight line between two images' latents) and `manipulate` (an image moved along an attribute
direction in latent space).

Example:
    $ revglow sample --checkpoint runs/digits/checkpoint.pt --n 64 --temperature 0.7 --out grid.png
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from revglow.cli.checks import CommandError
from revglow.cli.flags import add_checkpoint_flags
from revglow.cli.loading import label_tensor, load_for_generation
from revglow.cli.sample_command import add_sample_parser
from revglow.cli.values import int_at_least, nonnegative_int, positive_int
from revglow.glow.latents import attribute_direction, encode_images, interpolate_latents, mean_latents, move_latents
from revglow.training.config import DATASETS
from revglow.training.data import load_dataset

__all__ = ["add_checkpoint_parsers", "cmd_eval", "cmd_interpolate", "cmd_manipulate"]


def add_checkpoint_parsers(commands) -> None:
    """The eval, sample, interpolate and manipulate commands, on the subparsers `commands`."""
    evaluate = commands.add_parser("eval", help="test-set bits/dim of a checkpoint")
    add_checkpoint_flags(evaluate)
    evaluate.add_argument("--data", choices=DATASETS, default=None, help="data set (default: the one trained on)")
    evaluate.add_argument("--data-root", default=None, help="its folder or file (see revglow train --help)")
    evaluate.add_argument("--image-size", type=int, default=None, help="folder data: image size")
    evaluate.add_argument("--skip-bad-images", action="store_true", default=None,
                          help="folder data: leave unreadable image files out (default: as in training)")
    evaluate.add_argument("--draws", type=positive_int, default=1, help="dequantization noise draws averaged per image")
    evaluate.add_argument("--batch-size", type=positive_int, default=256, help="images per batch")
    evaluate.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader worker processes")

    add_sample_parser(commands)

    interpolate = commands.add_parser("interpolate", help="decode a straight line between two images' latents")
    add_checkpoint_flags(interpolate)
    interpolate.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="two PNG/JPEG images")
    interpolate.add_argument("--steps", type=int_at_least(2), default=8, help="images in the strip, both ends "
                             "included (at least 2)")
    interpolate.add_argument("--out", required=True, help="PNG or JPEG file to write")

    manipulate = commands.add_parser("manipulate", help="move an image along an attribute direction in latent space")
    add_checkpoint_flags(manipulate)
    manipulate.add_argument("--labels", required=True, metavar="CSV",
                            help="CSV with a header row: image path (relative to the CSV), then 0/1 or -1/1 columns")
    manipulate.add_argument("--attribute", required=True, help="column of the CSV to use")
    manipulate.add_argument("--image", required=True, help="the PNG/JPEG image to manipulate")
    manipulate.add_argument("--alphas", default="-1,-0.5,0,0.5,1", help="comma-separated multiples of the direction")
    manipulate.add_argument("--batch-size", type=positive_int, default=64, help="images per encoding batch")
    manipulate.add_argument("--out", required=True, help="PNG or JPEG file to write")


def cmd_eval(args: argparse.Namespace) -> int:
    from revglow.training.evaluation import evaluate_bits_per_dim, standard_error

    state, model, device, _ = load_for_generation(args)
    trained = state.get("train_config", {})
    name = args.data or trained.get("data", "digits")
    same = args.data is None or args.data == trained.get("data")
    root = args.data_root if args.data_root is not None else (trained.get("data_root") if same else None)
    size = args.image_size if args.image_size is not None else (trained.get("image_size") if same else None)
    skip = args.skip_bad_images if args.skip_bad_images is not None else bool(same and trained.get("skip_bad_images"))
    data = load_dataset(name, root, size, skip)
    if tuple(data.image_shape) != tuple(model.config.image_shape):
        raise CommandError(f"the {name} images are {data.image_shape}; the model expects {tuple(model.config.image_shape)}")
    bpd = evaluate_bits_per_dim(model, data.test, args.batch_size, device, draws=args.draws, seed=args.seed,
                                workers=args.workers)
    bad = int((~torch.isfinite(bpd)).sum())
    if bad:
        raise CommandError(f"{bad} of {bpd.numel()} test images have non-finite bits/dim (NaN or Inf): the model in "
                           f"{args.checkpoint} gives no usable density (its weights overflow)")
    has_ema = bool(state.get("ema")) and args.ema
    print(f"test bits/dim: {float(bpd.mean()):.4f} ± {standard_error(bpd):.4f} (standard error; {bpd.numel()} {name} test "
          f"images, {args.draws} dequantization draw{'s' if args.draws > 1 else ''}, "
          f"{'EMA' if has_ema else 'raw'} weights, step {state.get('step', '?')})")
    return 0


def _load_images(model, paths: Sequence[str], device) -> torch.Tensor:
    from revglow.training.images import load_image

    c, h, w = model.config.image_shape
    return torch.stack([load_image(p, size=(h, w), channels=c) for p in paths]).to(device)


def _encode(model, images: torch.Tensor, label: Optional[int]) -> List[torch.Tensor]:
    return encode_images(model, images, label_tensor(label, images.shape[0], images.device))


def cmd_interpolate(args: argparse.Namespace) -> int:
    from revglow.training.images import save_grid

    _, model, device, label = load_for_generation(args)
    latents = _encode(model, _load_images(model, args.images, device), label)
    path_latents = interpolate_latents([z[:1] for z in latents], [z[1:] for z in latents], args.steps)
    with torch.no_grad():
        frames = model.postprocess(model.decode(path_latents, label_tensor(label, args.steps, device)))
    path = save_grid(frames, args.out, nrow=args.steps)
    print(f"wrote {args.steps} interpolated images between {args.images[0]} and {args.images[1]} to {path}")
    return 0


def _read_attribute_csv(csv_path: Path, attribute: str):
    if not csv_path.is_file():
        raise CommandError(f"{csv_path}: no such labels file")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or len(rows[0]) < 2:
        raise CommandError(f"{csv_path}: expected a header row 'path,ATTRIBUTE,...' and one row per image")
    header = [h.strip() for h in rows[0]]
    if attribute not in header[1:]:
        raise CommandError(f"{csv_path}: no attribute column {attribute!r}; the columns are {header[1:]}")
    column = header.index(attribute)
    positive, negative = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != len(header):
            raise CommandError(f"{csv_path}, line {line}: {len(row)} fields; the header has {len(header)}")
        value = row[column].strip()
        if value not in ("1", "0", "-1"):
            raise CommandError(f"{csv_path}, line {line}: {attribute} must be 0/1 or -1/1; got {value!r}")
        target = csv_path.parent / row[0].strip()
        (positive if value == "1" else negative).append(target)
    if not positive or not negative:
        raise CommandError(f"{csv_path}: need images both with and without {attribute!r}; "
                           f"found {len(positive)} with and {len(negative)} without")
    return positive, negative


def _mean_latent(model, paths: List[Path], batch_size: int, device, label) -> List[torch.Tensor]:
    return mean_latents(_encode(model, _load_images(model, paths[start:start + batch_size], device), label)
                        for start in range(0, len(paths), batch_size))


def cmd_manipulate(args: argparse.Namespace) -> int:
    from revglow.training.images import save_grid

    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise CommandError(f"--alphas must be comma-separated numbers, e.g. -1,-0.5,0,0.5,1; got {args.alphas!r}")
    if not alphas:
        raise CommandError("--alphas is empty")
    if not all(math.isfinite(a) for a in alphas):
        raise CommandError(f"--alphas must be finite numbers; got {args.alphas!r}")
    positive, negative = _read_attribute_csv(Path(args.labels), args.attribute)
    _, model, device, label = load_for_generation(args)
    with_attr = _mean_latent(model, positive, args.batch_size, device, label)
    without = _mean_latent(model, negative, args.batch_size, device, label)
    direction = attribute_direction(with_attr, without)
    base = _encode(model, _load_images(model, [args.image], device), label)
    moved = move_latents(base, direction, alphas)
    with torch.no_grad():
        frames = model.postprocess(model.decode(moved, label_tensor(label, len(alphas), device)))
    path = save_grid(frames, args.out, nrow=len(alphas))
    print(f"wrote {args.image} moved along {args.attribute!r} ({len(positive)} images with, {len(negative)} without) "
          f"by alphas {alphas} to {path}")
    return 0
