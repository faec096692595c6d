"""The `revglow` command line: train, eval, sample, interpolate, manipulate.

The training flags are built from the fields of GlowConfig and TrainConfig (dataclasses.fields), so
every option of either has exactly one flag, named after the field (`--n-bits`, `--batch-size`, ...), with the
help text and choices that the field's metadata carries (revglow.glow.config.option).

A preset (revglow.training.presets: the paper's models and recipes) gives defaults that explicit flags override.

Example:
    $ revglow train --max-steps 1500 --out runs/digits
    $ revglow train --preset cifar10 --data-root data/cifar-10-batches-py --print-config
    $ revglow sample --checkpoint runs/digits/checkpoint.pt --n 64 --temperature 0.7 --out grid.png
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from revglow.training.checkpoints import load_checkpoint
from revglow.engine.options import MEMORY_MODES
from revglow.glow.config import GlowConfig
from revglow.training.config import DATASETS, MAX_SEED, TrainConfig
from revglow.training.data import load_dataset
from revglow.errors import RevglowError
from revglow.glow.latents import attribute_direction, encode_images, interpolate_latents, mean_latents, move_latents
from revglow.training.presets import PRESET_NAMES, PRESETS, preset_options
from revglow.training.signals import TrainingInterrupted

__all__ = ["main", "build_parser", "COMMANDS"]

COMMANDS = ("train", "eval", "sample", "interpolate", "manipulate", "profile")

# Model flags whose default depends on --data (revglow.training.trainer.MODEL_DEFAULTS); --print-config shows the result.
_DATA_DEPENDENT = ("levels", "depth", "hidden", "n_bits")


# The presets as a flag's help lists them (train and profile take --preset).
_PRESET_LIST = "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())


class CommandError(RevglowError):
    """A problem with what the user asked for; printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------ flag building

def _flag_type(name: str, hint):
    """argparse type for a dataclass field's type hint; Optional[...] also accepts 'none'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = origin is typing.Union and type(None) in args
    base = next(a for a in args if a is not type(None)) if optional else hint

    def convert(text: str):
        if optional and text.lower() in ("none", "off"):
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an' if base is int else 'a'} {base.__name__}"
                                             f"{' or none' if optional else ''}; got {text!r}") from None
    convert.__name__ = base.__name__
    return base, convert


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: Sequence[str] = (),
                         data_defaults: bool = True) -> List[str]:
    """One flag per field of `cls`; only flags given on the command line appear in the namespace. With
    `data_defaults`, the help of model flags whose default depends on --data says so."""
    hints = typing.get_type_hints(cls)
    names = []
    group = parser.add_argument_group(f"{cls.__name__} options")
    for item in fields(cls):
        if item.name in skip:
            continue
        flag = "--" + item.name.replace("_", "-")
        default = item.default if item.default is not MISSING else None
        help_text = item.metadata.get("help", "")
        if data_defaults and cls is GlowConfig and item.name in _DATA_DEPENDENT:
            default = _data_dependent_default(item.name, default)
        base, convert = _flag_type(item.name, hints[item.name])
        if base is bool:
            group.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{help_text} (default: {default})")
        else:
            kwargs = {"choices": item.metadata["choices"]} if "choices" in item.metadata else {}
            group.add_argument(flag, dest=item.name, type=convert, default=argparse.SUPPRESS,
                               metavar=None if kwargs else item.name.upper(),
                               help=f"{help_text} (default: {default})", **kwargs)
        names.append(item.name)
    return names


def _data_dependent_default(name: str, fallback) -> str:
    """'depends on --data: digits 2, cifar10 3, ...' for a model flag whose default MODEL_DEFAULTS sets."""
    from revglow.training.trainer import MODEL_DEFAULTS

    per_data = ", ".join(f"{data} {MODEL_DEFAULTS.get(data, {}).get(name, fallback)}" for data in DATASETS)
    return f"depends on --data: {per_data}"


def _add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint.pt written by revglow train")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and dequantization noise")
    parser.add_argument("--no-ema", dest="ema", action="store_false",
                        help="use the raw weights even when the checkpoint has EMA weights")
    parser.add_argument("--label", type=int, default=None, help="class label, for class-conditional models")


def build_parser() -> argparse.ArgumentParser:
    """The `revglow` argument parser with its six commands."""
    parser = argparse.ArgumentParser(prog="revglow", description="Glow normalizing flows: train, evaluate, "
                                     "sample, interpolate and manipulate images.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a Glow model",
                                description="Train a Glow model; the defaults train a small one on the 8x8 digits.")
    train.add_argument("--resume", nargs="?", const="", default=argparse.SUPPRESS, metavar="CHECKPOINT",
                       help="continue a run exactly (default checkpoint: OUT/checkpoint.pt); training flags given "
                            "with it take effect, model flags may not change (except --memory, --kernels, "
                            "--check-reconstruction, --reconstruction-tol)")
    train.add_argument("--print-config", action="store_true", default=argparse.SUPPRESS,
                       help="print the resolved model and training configuration as JSON and exit (with --preset: "
                            "without reading the data)")
    train.add_argument("--preset", choices=PRESET_NAMES, default=argparse.SUPPRESS,
                       help="start from a preset model and recipe; flags given override it: " + _PRESET_LIST)
    # context_channels: the command line has no source of conditioning maps (see
    # examples/train_conditional_digits.py for a conditional flow trained from Python)
    _add_dataclass_flags(train, GlowConfig, skip=("image_shape", "context_channels"))
    _add_dataclass_flags(train, TrainConfig, skip=("resume",))

    evaluate = commands.add_parser("eval", help="test-set bits/dim of a checkpoint")
    _add_checkpoint_flags(evaluate)
    evaluate.add_argument("--data", choices=DATASETS, default=None, help="data set (default: the one trained on)")
    evaluate.add_argument("--data-root", default=None, help="its folder or file (see revglow train --help)")
    evaluate.add_argument("--image-size", type=int, default=None, help="folder data: image size")
    evaluate.add_argument("--skip-bad-images", action="store_true", default=None,
                          help="folder data: leave unreadable image files out (default: as in training)")
    evaluate.add_argument("--draws", type=int, default=1, help="dequantization noise draws averaged per image")
    evaluate.add_argument("--batch-size", type=int, default=256, help="images per batch")
    evaluate.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")

    sample = commands.add_parser("sample", help="a grid of samples from a checkpoint")
    _add_checkpoint_flags(sample)
    sample.add_argument("--n", type=int, default=64, help="number of samples")
    sample.add_argument("--temperature", type=float, default=0.7, help="latent standard deviation (paper, section 5)")
    sample.add_argument("--nrow", type=int, default=None, help="images per row of the grid")
    sample.add_argument("--out", required=True, help="PNG or JPEG file to write")

    interpolate = commands.add_parser("interpolate", help="decode a straight line between two images' latents")
    _add_checkpoint_flags(interpolate)
    interpolate.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="two PNG/JPEG images")
    interpolate.add_argument("--steps", type=int, default=8, help="images in the strip, both ends included")
    interpolate.add_argument("--out", required=True, help="PNG or JPEG file to write")

    manipulate = commands.add_parser("manipulate", help="move an image along an attribute direction in latent space")
    _add_checkpoint_flags(manipulate)
    manipulate.add_argument("--labels", required=True, metavar="CSV",
                            help="CSV with a header row: image path (relative to the CSV), then 0/1 or -1/1 columns")
    manipulate.add_argument("--attribute", required=True, help="column of the CSV to use")
    manipulate.add_argument("--image", required=True, help="the PNG/JPEG image to manipulate")
    manipulate.add_argument("--alphas", default="-1,-0.5,0,0.5,1", help="comma-separated multiples of the direction")
    manipulate.add_argument("--batch-size", type=int, default=64, help="images per encoding batch")
    manipulate.add_argument("--out", required=True, help="PNG or JPEG file to write")
    profile = commands.add_parser(
        "profile", help="memory and time of one training step per memory mode; the largest batch for a budget",
        description="Train one step of a Glow model in each memory mode and report parameters, gradients, Adam "
                    "state, the step's peak memory above them (counted tensor by tensor; counted again with each "
                    "convolution's working buffers, measured per call on the device; and as the device's own "
                    "peak), the tensors alive at the peak, step time, and with --budget the largest batch that fits. "
                    "Model flags default to GlowConfig's (the paper's CIFAR-10 model), or to --preset's.")
    profile.add_argument("--preset", choices=PRESET_NAMES, default=None,
                         help="start from a preset's model (its image shape included); flags given override it: "
                              + _PRESET_LIST)
    profile.add_argument("--image-shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                         help="image shape (default: 3 32 32, or the preset's)")
    profile.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], metavar="N",
                         help="batch sizes to measure (two or more to fit memory against batch; default: 1 2)")
    profile.add_argument("--modes", nargs="+", choices=MEMORY_MODES, default=list(MEMORY_MODES),
                         help="memory modes to profile (default: all)")
    profile.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    profile.add_argument("--rounds", type=int, default=3, help="interleaved timed steps per mode (0: no timing)")
    profile.add_argument("--budget", default=None, help="device memory, e.g. 24GiB: report the largest batch per mode")
    profile.add_argument("--verify", action="store_true", help="with --budget: train one step at that batch for real "
                         "(refining the plan from the measurement) and report its peak")
    profile.add_argument("--top", type=int, default=5, help="tensors alive at the peak to list per mode")
    profile.add_argument("--json", action="store_true", help="one JSON object per mode instead of the table")
    _add_dataclass_flags(profile, GlowConfig, skip=("image_shape", "context_channels", "memory"), data_defaults=False)
    return parser


# ----------------------------------------------------------------------------------------- commands

# Training options that a resumed run may not change: they fix the data, its order and the random streams.
_FIXED_ON_RESUME = ("data", "image_size", "seed", "optimizer")   # and the optimizer, whose state it carries


def _train_configs(given: dict):
    """(GlowConfig, TrainConfig, data, resume state) from the flags given."""
    from revglow.training.trainer import (RESUME_GLOW_FIELDS, check_out_folder, default_glow_config, load_resume_state,
                        train_config_for_resume)
    from revglow.training.distributed import DistributedContext

    glow_over = {f.name: given[f.name] for f in fields(GlowConfig) if f.name in given}
    train_over = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given and f.name != "resume"}
    if "preset" in given:
        if "resume" in given:
            raise CommandError("--preset starts a new run; --resume continues one with the configuration saved in "
                               "its checkpoint (give the flags to change, without --preset)")
        return _preset_configs(given, glow_over, train_over)
    if "resume" not in given:
        config = TrainConfig(**train_over)
        if "print_config" not in given:   # refuse before the (possibly slow) data loading
            DistributedContext.current().run_on_main(check_out_folder, config.out, config.overwrite)
        data = load_dataset(config.data, config.data_root, config.image_size, config.skip_bad_images)
        return default_glow_config(data, **glow_over), config, data, None
    path = given["resume"] or str(Path(TrainConfig(**{k: v for k, v in train_over.items()
                                                        if k in ("data", "out")}).out) / "checkpoint.pt")
    state = load_resume_state(path)
    saved = GlowConfig.from_dict(state["glow_config"]).to_dict()
    model_changes = sorted(k for k, v in glow_over.items() if saved.get(k) != v and k not in RESUME_GLOW_FIELDS)
    saved_train = state["train_config"]
    data_changes = sorted(k for k in _FIXED_ON_RESUME if k in train_over and train_over[k] != saved_train.get(k))
    for what, changed in (("the model", model_changes), ("the data, the seed or the optimizer", data_changes)):
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise CommandError(f"{path}: cannot change {what} on resume ({flags} differ from the checkpoint); start "
                               f"a new run (another --out, or --overwrite) to change them")
    glow = GlowConfig.from_dict({**saved, **{k: v for k, v in glow_over.items() if k in RESUME_GLOW_FIELDS}})
    config = train_config_for_resume(state, {**train_over, "resume": path})
    data = load_dataset(config.data, config.data_root, config.image_size, config.skip_bad_images)
    return glow, config, data, state


def _preset_configs(given: dict, glow_over: dict, train_over: dict):
    """(GlowConfig, TrainConfig, data, None) of --preset with the flags given on top; with --print-config the
    data are not read (the preset fixes the image shape)."""
    from revglow.training.distributed import DistributedContext
    from revglow.training.trainer import check_out_folder

    name = given["preset"]
    glow_options, train_options = preset_options(name, glow_over, train_over)
    glow, config = GlowConfig(**glow_options), TrainConfig(**train_options)
    if "print_config" in given:
        return glow, config, None, None
    DistributedContext.current().run_on_main(check_out_folder, config.out, config.overwrite)   # before reading data
    data = load_dataset(config.data, config.data_root, config.image_size, config.skip_bad_images)
    if tuple(data.image_shape) != glow.image_shape:
        c, h, w = glow.image_shape
        raise CommandError(f"--preset {name} is built for {c}x{h}x{w} images; the {data.name} data are "
                           f"{'x'.join(map(str, data.image_shape))} (folder data: --image-size {h}; or choose "
                           f"another preset)")
    return glow, config, data, None


def _cmd_train(args: argparse.Namespace) -> int:
    from revglow.training.distributed import end_process_group, init_from_environment

    given = vars(args)
    started_group = init_from_environment(given.get("device", "auto"))
    finished = False
    try:
        code = _train(given)
        finished = True
    finally:
        if started_group:
            end_process_group(after_success=finished)
    if started_group:
        # A process torchrun started leaves without the interpreter's teardown: after a finished run (checkpoint,
        # metrics and samples written and closed, the group destroyed) gloo's threads could still abort the
        # C++ teardown ("terminate called without an active exception", about 1 run in 25 on a loaded 2-core
        # machine), and torchrun then reports the whole run as failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train(given: dict) -> int:
    from revglow.training.trainer import Trainer

    glow, config, data, state = _train_configs(given)
    if "print_config" in given:
        shown = {"preset": given["preset"]} if "preset" in given else {}
        print(json.dumps({**shown, "glow_config": glow.to_dict(), "train_config": config.to_dict()}, indent=2))
        return 0
    trainer = Trainer(glow, config, data=data, resume_state=state)
    main = trainer.dist.is_main
    n_params = sum(p.numel() for p in trainer.model.parameters())
    c, h, w = data.image_shape
    start = f"resuming at step {trainer.step}" if state is not None else "starting"
    world = trainer.dist.world_size
    processes = (f"{world} processes ({trainer.dist.backend}), global batch {trainer.sampler.global_batch_size} = "
                 f"{trainer.sampler.batch_size} x {world}" if world > 1 else "1 process")
    skipped = f" ({len(data.skipped)} unreadable images skipped)" if data.skipped else ""
    if main:
        print(f"revglow train: {data.name}, {len(data.train)} train / {len(data.test)} test images {c}x{h}x{w}{skipped}; "
              f"Glow levels={glow.levels} depth={glow.depth} hidden={glow.hidden} {glow.coupling} n_bits={glow.n_bits} "
              f"memory={glow.memory}, {n_params:,} parameters; {trainer.total_steps} steps on {trainer.device}, "
              f"{config.optimizer} lr={config.lr:g} warm-up {trainer.warmup} steps"
              f"{', shifts' if config.augment == 'shift' else ''}, {processes}; {start}", flush=True)
    result = trainer.run()
    if not main:
        return 0
    weights = "EMA weights" if result.used_ema else "raw weights"
    print(f"test bits/dim:     {result.test_bpd:.4f} ± {result.test_bpd_stderr:.4f} "
          f"(Glow, {weights}, {result.test_images} test images, step {result.step})")
    if result.used_ema:
        print(f"                   {result.test_bpd_raw:.4f} ± {result.test_bpd_raw_stderr:.4f} (Glow, raw weights, "
              f"the same images and noise)")
    print(f"baseline bits/dim: {result.baseline_bpd:.4f} (independent per-pixel categorical at {glow.n_bits} bits, "
          f"Laplace smoothing, fitted on the train split)")
    print(f"checkpoint: {result.checkpoint}")
    print(f"samples:    {', '.join(str(p) for p in result.samples)}")
    print(f"metrics:    {result.out / 'metrics.jsonl'}")
    return 0


def _load_for_generation(args: argparse.Namespace):
    from revglow.training.trainer import load_model, resolve_device

    if not 0 <= args.seed <= MAX_SEED:
        raise CommandError(f"--seed must be between 0 and 2**32 - 1 = {MAX_SEED}; got {args.seed}")
    state = load_checkpoint(args.checkpoint, required=("model", "glow_config"))
    device = resolve_device(args.device)
    model = load_model(state, device, use_ema=args.ema)
    torch.manual_seed(args.seed)
    label = None   # one class for every image generated (an int), or None
    k = model.config.num_classes
    if args.label is not None:
        if k == 0:
            raise CommandError(f"--label {args.label}: the model in {args.checkpoint} is not class-conditional")
        if not 0 <= args.label < k:
            raise CommandError(f"--label must lie in [0, {k - 1}]; got {args.label}")
        label = args.label
    elif k > 0 and args.command in ("interpolate", "manipulate"):
        raise CommandError(f"the model in {args.checkpoint} is class-conditional ({k} classes): pass --label")
    return state, model, device, label


def _require_at_least(args: argparse.Namespace, name: str, minimum, why: str = "") -> None:
    """A one-line error naming the flag when args.<name> is below `minimum`."""
    value = getattr(args, name)
    if value < minimum:
        raise CommandError(f"--{name.replace('_', '-')} must be >= {minimum}{why}; got {value}")


def _label_tensor(label: Optional[int], n: int, device) -> Optional[torch.Tensor]:
    return None if label is None else torch.full((n,), label, dtype=torch.long, device=device)


def _cmd_eval(args: argparse.Namespace) -> int:
    from revglow.training.trainer import evaluate_bits_per_dim, standard_error

    _require_at_least(args, "draws", 1)
    _require_at_least(args, "batch_size", 1)
    state, model, device, _ = _load_for_generation(args)
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
    has_ema = bool(state.get("ema")) and args.ema
    print(f"test bits/dim: {float(bpd.mean()):.4f} ± {standard_error(bpd):.4f} (standard error; {bpd.numel()} {name} test "
          f"images, {args.draws} dequantization draw{'s' if args.draws > 1 else ''}, "
          f"{'EMA' if has_ema else 'raw'} weights, step {state.get('step', '?')})")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from revglow.training.images import save_grid

    _require_at_least(args, "n", 1)
    _require_at_least(args, "temperature", 0)
    _, model, device, label = _load_for_generation(args)
    labels = _label_tensor(label, args.n, device)
    if labels is None and model.config.num_classes > 0:
        labels = torch.arange(args.n, device=device) % model.config.num_classes
    generator = torch.Generator(device).manual_seed(args.seed)
    images = model.sample(args.n, temperature=args.temperature, y=labels, generator=generator)
    path = save_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {args.n} samples (temperature {args.temperature}) to {path}")
    return 0


def _load_images(model, paths: Sequence[str], device) -> torch.Tensor:
    from revglow.training.images import load_image

    c, h, w = model.config.image_shape
    return torch.stack([load_image(p, size=(h, w), channels=c) for p in paths]).to(device)


def _encode(model, images: torch.Tensor, label: Optional[int]) -> List[torch.Tensor]:
    return encode_images(model, images, _label_tensor(label, images.shape[0], images.device))


def _cmd_interpolate(args: argparse.Namespace) -> int:
    from revglow.training.images import save_grid

    _require_at_least(args, "steps", 2, " (both ends are included)")
    _, model, device, label = _load_for_generation(args)
    latents = _encode(model, _load_images(model, args.images, device), label)
    path_latents = interpolate_latents([z[:1] for z in latents], [z[1:] for z in latents], args.steps)
    with torch.no_grad():
        frames = model.postprocess(model.decode(path_latents, _label_tensor(label, args.steps, device)))
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


def _cmd_manipulate(args: argparse.Namespace) -> int:
    from revglow.training.images import save_grid

    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise CommandError(f"--alphas must be comma-separated numbers, e.g. -1,-0.5,0,0.5,1; got {args.alphas!r}")
    if not alphas:
        raise CommandError("--alphas is empty")
    if not all(math.isfinite(a) for a in alphas):
        raise CommandError(f"--alphas must be finite numbers; got {args.alphas!r}")
    _require_at_least(args, "batch_size", 1)
    positive, negative = _read_attribute_csv(Path(args.labels), args.attribute)
    _, model, device, label = _load_for_generation(args)
    with_attr = _mean_latent(model, positive, args.batch_size, device, label)
    without = _mean_latent(model, negative, args.batch_size, device, label)
    direction = attribute_direction(with_attr, without)
    base = _encode(model, _load_images(model, [args.image], device), label)
    moved = move_latents(base, direction, alphas)
    with torch.no_grad():
        frames = model.postprocess(model.decode(moved, _label_tensor(label, len(alphas), device)))
    path = save_grid(frames, args.out, nrow=len(alphas))
    print(f"wrote {args.image} moved along {args.attribute!r} ({len(positive)} images with, {len(negative)} without) "
          f"by alphas {alphas} to {path}")
    return 0


def _join_negative_values(argv: List[str]) -> List[str]:
    """Let `--alphas -1,-0.5,0` through: argparse would read a value starting with '-' as a flag."""
    out = []
    for item in argv:
        looks_negative = item[:1] == "-" and (item[1:2].isdigit() or item[1:2] == ".")
        if out and out[-1] == "--alphas" and looks_negative:
            out[-1] = f"--alphas={item}"
        else:
            out.append(item)
    return out


def _cmd_profile(args: argparse.Namespace) -> int:
    from revglow.memory.profile import format_table, profile

    given = vars(args)
    glow_over = {f.name: given[f.name] for f in fields(GlowConfig) if f.name in given and f.name != "image_shape"}
    if args.preset is not None:
        if args.image_shape is not None:
            raise CommandError(f"--preset {args.preset} fixes the image shape; give --image-shape without a preset")
        config = GlowConfig(**preset_options(args.preset, glow_over)[0])
    else:
        config = GlowConfig(image_shape=tuple(args.image_shape or (3, 32, 32)), **glow_over)
    if args.verify and args.budget is None:
        raise CommandError("--verify needs --budget")
    rows = profile(config, batch_sizes=args.batch_sizes, modes=args.modes, device=args.device, rounds=args.rounds,
                   budget=args.budget, verify=args.verify, top=args.top)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        c, h, w = config.image_shape
        print(f"revglow profile: Glow {c}x{h}x{w} levels={config.levels} depth={config.depth} hidden="
              f"{config.hidden} {config.coupling}, batch sizes {sorted(set(args.batch_sizes))}, device {args.device}")
        print(format_table(rows))
    return 0


_COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample, "interpolate": _cmd_interpolate,
             "manipulate": _cmd_manipulate, "profile": _cmd_profile}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `revglow` with `argv` (default sys.argv[1:]); returns the exit status.

    Usage errors exit with argparse's status 2; revglow's own errors about what it was given (RevglowError:
    options, data, checkpoints, image files) and file-system errors print one line `revglow: error: ...` and
    return 1 (set REVGLOW_DEBUG=1 to see the traceback instead). Anything else is a bug and keeps its traceback.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_join_negative_values(argv))
    except SystemExit as exc:          # --help, or a usage error argparse has already printed
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        return _COMMANDS[args.command](args)
    except TrainingInterrupted as exc:
        print(f"revglow: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("revglow: interrupted", file=sys.stderr)
        return 130
    except (RevglowError, OSError) as exc:
        if os.environ.get("REVGLOW_DEBUG"):
            raise
        message = str(exc) or type(exc).__name__
        print(f"revglow: error: {message}", file=sys.stderr)
        return 1
