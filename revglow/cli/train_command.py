"""`revglow train`: its flags (every field of GlowConfig and TrainConfig, --preset, --resume, --print-config), the
configuration they resolve to, and the run.

A preset (revglow.training.presets: the paper's models and recipes) gives defaults that explicit flags override; a
resumed run (--resume) takes its configuration from the checkpoint, with the training flags given on top, and
writes --out or else the folder the checkpoint lies in (never a folder named inside the checkpoint: see
revglow.training.run_folder.resume_out_folder). The start-up line names the run folder used.

--data-root with a data set that reads no files (digits, photos) is a usage error (exit status 2), not ignored.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from revglow.cli.checks import CommandError
from revglow.cli.flags import PRESET_LIST, add_dataclass_flags
from revglow.glow.config import GlowConfig
from revglow.training.config import TrainConfig
from revglow.training.data import load_dataset
from revglow.training.presets import PRESET_NAMES, preset_options

__all__ = ["add_train_parser", "train_configs", "cmd_train"]

# Training options that a resumed run may not change: they fix the data, its order and the random streams.
_FIXED_ON_RESUME = ("data", "image_size", "seed", "optimizer")   # and the optimizer, whose state it carries
# The data sets that ship with scikit-learn: their readers read no files, so --data-root would be ignored.
_NO_DATA_ROOT = ("digits", "photos")


class UsageError(CommandError):
    """Flags that do not go together; printed as one line, exit status 2 (as argparse's usage errors)."""


def _check_data_root(data: str, train_over: dict) -> None:
    if train_over.get("data_root") is not None and data in _NO_DATA_ROOT:
        raise UsageError(f"--data-root does not apply to --data {data} (it ships with scikit-learn and reads no "
                         f"files); drop --data-root, or choose --data cifar10, folder or npz")


def add_train_parser(commands) -> None:
    """The `train` command, on the subparsers `commands`."""
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
                       help="start from a preset model and recipe; flags given override it: " + PRESET_LIST)
    # context_channels: the command line has no source of conditioning maps (see
    # examples/train_conditional_digits.py for a conditional flow trained from Python)
    add_dataclass_flags(train, GlowConfig, skip=("image_shape", "context_channels"))
    add_dataclass_flags(train, TrainConfig, skip=("resume",))


def train_configs(given: dict):
    """(GlowConfig, TrainConfig, data, resume state) from the flags given."""
    from revglow.training.distributed import DistributedContext
    from revglow.training.model_defaults import default_glow_config
    from revglow.glow.config import RUNTIME_OPTIONS
    from revglow.training.resume import load_resume_state, train_config_for_resume
    from revglow.training.run_folder import check_out_folder, resume_out_folder

    glow_over = {f.name: given[f.name] for f in fields(GlowConfig) if f.name in given}
    train_over = {f.name: given[f.name] for f in fields(TrainConfig) if f.name in given and f.name != "resume"}
    if "preset" in given:
        if "resume" in given:
            raise CommandError("--preset starts a new run; --resume continues one with the configuration saved in "
                               "its checkpoint (give the flags to change, without --preset)")
        return _preset_configs(given, glow_over, train_over)
    if "resume" not in given:
        config = TrainConfig(**train_over)
        _check_data_root(config.data, train_over)
        if "print_config" not in given:   # refuse before the (possibly slow) data loading
            DistributedContext.current().run_on_main(check_out_folder, config.out, config.overwrite)
        data = load_dataset(config.data, config.data_root, config.image_size, config.skip_bad_images)
        return default_glow_config(data, **glow_over), config, data, None
    path = given["resume"] or str(Path(TrainConfig(**{k: v for k, v in train_over.items()
                                                        if k in ("data", "out")}).out) / "checkpoint.pt")
    state = load_resume_state(path)
    _check_data_root(str(state["train_config"].get("data")), train_over)
    saved = GlowConfig.from_dict(state["glow_config"]).to_dict()
    model_changes = sorted(k for k, v in glow_over.items() if saved.get(k) != v and k not in RUNTIME_OPTIONS)
    saved_train = state["train_config"]
    data_changes = sorted(k for k in _FIXED_ON_RESUME if k in train_over and train_over[k] != saved_train.get(k))
    for what, changed in (("the model", model_changes), ("the data, the seed or the optimizer", data_changes)):
        if changed:
            flags = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise CommandError(f"{path}: cannot change {what} on resume ({flags} differ from the checkpoint); start "
                               f"a new run (another --out, or --overwrite) to change them")
    glow = GlowConfig.from_dict({**saved, **{k: v for k, v in glow_over.items() if k in RUNTIME_OPTIONS}})
    # Where the resumed run writes: --out, else the checkpoint's own folder; refused (touching nothing) when that
    # folder holds another run. The checkpoint's saved out is never used.
    folder = DistributedContext.current().run_on_main(resume_out_folder, path, state, train_over.get("out"))
    config = train_config_for_resume(state, {**train_over, "resume": path, "out": str(folder)})
    data = load_dataset(config.data, config.data_root, config.image_size, config.skip_bad_images)
    return glow, config, data, state


def _preset_configs(given: dict, glow_over: dict, train_over: dict):
    """(GlowConfig, TrainConfig, data, None) of --preset with the flags given on top; with --print-config the
    data are not read (the preset fixes the image shape)."""
    from revglow.training.distributed import DistributedContext
    from revglow.training.run_folder import check_out_folder

    name = given["preset"]
    glow_options, train_options = preset_options(name, glow_over, train_over)
    glow, config = GlowConfig(**glow_options), TrainConfig(**train_options)
    _check_data_root(config.data, train_over)
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


def cmd_train(args: argparse.Namespace) -> int:
    """`revglow train`, under torchrun too (one process per rank)."""
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

    try:
        glow, config, data, state = train_configs(given)
    except UsageError as exc:
        print(f"revglow: error: {exc}", file=sys.stderr)
        return 2
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
              f"{', shifts' if config.augment == 'shift' else ''}, {processes}; {start}; run folder "
              f"{trainer.out.resolve()}", flush=True)
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
