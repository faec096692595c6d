"""`revglow profile`: memory and time of one training step per memory mode, and the largest batch for a budget
(revglow.memory.profile), of a Glow model or of your own module (--module PKG.MOD:FACTORY)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from dataclasses import fields
from typing import Optional

import torch
from torch import nn

from revglow.cli.checks import CommandError
from revglow.cli.flags import PRESET_LIST, add_dataclass_flags
from revglow.cli.values import device_name, input_shape
from revglow.engine.options import MEMORY_MODES
from revglow.glow.config import GlowConfig
from revglow.memory.workload import AMP_MODES
from revglow.training.presets import PRESET_NAMES, preset_options

__all__ = ["add_profile_parser", "cmd_profile", "load_user_module"]


def add_profile_parser(commands) -> None:
    """The `profile` command, on the subparsers `commands`."""
    profile = commands.add_parser(
        "profile", help="memory and time of one training step per memory mode; the largest batch for a budget",
        description="Train one step of a Glow model (or of your own module: --module) in each memory mode and report "
                    "parameters, gradients, Adam state, the step's peak memory above them (counted tensor by tensor; "
                    "counted again with each convolution's working buffers, measured per call on the device; and as "
                    "the device's own peak), the tensors alive at the peak, step time, and with --budget the largest "
                    "batch that fits (the batch doubles from --batch-sizes until the step's memory rises well above "
                    "the noise; the line through the last three is the plan, reported with its spread). Model flags "
                    "default to GlowConfig's (the paper's CIFAR-10 model), or to --preset's.")
    profile.add_argument("--preset", choices=PRESET_NAMES, default=None,
                         help="start from a preset's model (its image shape included); flags given override it: "
                              + PRESET_LIST)
    profile.add_argument("--image-shape", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                         help="image shape (default: 3 32 32, or the preset's)")
    profile.add_argument("--module", default=None, metavar="PKG.MOD:FACTORY",
                         help="profile your own module instead of Glow: FACTORY() from module PKG.MOD (found from the "
                              "current folder or sys.path) returns an nn.Module with ReversibleSequence inside it whose "
                              "forward returns (y, logdet); needs --input-shape")
    profile.add_argument("--input-shape", type=input_shape, default=None, metavar="N,C,H,W",
                         help="with --module: the shape of its example input (standard normal), batch first; larger "
                              "batches repeat it")
    profile.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2], metavar="N",
                         help="batch sizes to measure (two or more to fit memory against batch; default: 1 2)")
    profile.add_argument("--modes", nargs="+", choices=MEMORY_MODES, default=list(MEMORY_MODES),
                         help="memory modes to profile (default: all)")
    profile.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    profile.add_argument("--amp", choices=AMP_MODES, default="off",
                         help="bf16: the forward under bfloat16 autocast, as revglow train --amp bf16 (default: off)")
    profile.add_argument("--rounds", type=int, default=3, help="interleaved timed steps per mode (0: no timing)")
    profile.add_argument("--budget", default=None, help="device memory, e.g. 24GiB: report the largest batch per mode")
    profile.add_argument("--verify", action="store_true", help="with --budget: train one step at that batch for real "
                         "(refining the plan from the measurement) and report its peak")
    profile.add_argument("--top", type=int, default=5, help="tensors alive at the peak to list per mode")
    profile.add_argument("--json", action="store_true", help="one JSON object per mode instead of the table")
    add_dataclass_flags(profile, GlowConfig, skip=("image_shape", "context_channels", "memory"), data_defaults=False)


def load_user_module(spec: str) -> nn.Module:
    """FACTORY() of the module PKG.MOD named by `spec` ("PKG.MOD:FACTORY"), imported with the current folder on
    sys.path (as `python -m` has it); one-line CommandErrors for what cannot be found or is not a module."""
    name, _, attr = spec.partition(":")
    if not name or not attr.isidentifier():
        raise CommandError(f"--module must be PKG.MOD:FACTORY (a module and a function in it); got {spec!r}")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
            raise                           # the user's module itself imports something missing: its traceback
        raise CommandError(f"--module {spec}: no module named {exc.name!r} here or on sys.path (run from the folder "
                           f"that holds it, or add it to PYTHONPATH)") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CommandError(f"--module {spec}: {name} has no function {attr!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise CommandError(f"--module {spec}: {attr}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _glow_config(args: argparse.Namespace) -> Optional[GlowConfig]:
    """The Glow model the flags describe; None with --module (which no Glow flag may accompany)."""
    given = vars(args)
    glow_over = {f.name: given[f.name] for f in fields(GlowConfig) if f.name in given and f.name != "image_shape"}
    if args.module is not None:
        if glow_over or args.preset is not None or args.image_shape is not None:
            flags = ["--" + k.replace("_", "-") for k in glow_over]
            flags += ["--preset"] * (args.preset is not None) + ["--image-shape"] * (args.image_shape is not None)
            raise CommandError(f"{', '.join(flags)} describe a Glow model; with --module your factory builds the model")
        return None
    if args.input_shape is not None:
        raise CommandError("--input-shape is the example input of --module; a Glow model takes --image-shape")
    if args.preset is not None:
        if args.image_shape is not None:
            raise CommandError(f"--preset {args.preset} fixes the image shape; give --image-shape without a preset")
        return GlowConfig(**preset_options(args.preset, glow_over)[0])
    return GlowConfig(image_shape=tuple(args.image_shape or (3, 32, 32)), **glow_over)


def cmd_profile(args: argparse.Namespace) -> int:
    from revglow.memory.profile import format_table, profile

    config = _glow_config(args)
    if args.verify and args.budget is None:
        raise CommandError("--verify needs --budget")
    if args.module is not None and args.input_shape is None:
        raise CommandError("--module needs --input-shape N,C,H,W (the shape of an example input)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    target, example = (config, None) if config is not None else (load_user_module(args.module),
                                                                  torch.randn(args.input_shape))
    rows = profile(target, example, batch_sizes=args.batch_sizes, modes=args.modes, device=device,
                   rounds=args.rounds, budget=args.budget, verify=args.verify, top=args.top, amp=args.amp)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    amp = ", bf16 autocast" if args.amp == "bf16" else ""
    if config is not None:
        c, h, w = config.image_shape
        print(f"revglow profile: Glow {c}x{h}x{w} levels={config.levels} depth={config.depth} hidden="
              f"{config.hidden} {config.coupling}, batch sizes {sorted(set(args.batch_sizes))}, device {device}{amp}")
    else:
        print(f"revglow profile: {args.module} ({type(target).__name__}), input {'x'.join(map(str, args.input_shape))}, "
              f"batch sizes {sorted(set(args.batch_sizes))}, device {device}{amp}")
    print(format_table(rows))
    return 0
