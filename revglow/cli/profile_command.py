"""`revglow profile`: memory and time of one training step per memory mode, and the largest batch for a budget
(revglow.memory.profile)."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

from revglow.cli.checks import CommandError
from revglow.cli.flags import PRESET_LIST, add_dataclass_flags
from revglow.engine.options import MEMORY_MODES
from revglow.glow.config import GlowConfig
from revglow.training.presets import PRESET_NAMES, preset_options

__all__ = ["add_profile_parser", "cmd_profile"]


def add_profile_parser(commands) -> None:
    """The `profile` command, on the subparsers `commands`."""
    profile = commands.add_parser(
        "profile", help="memory and time of one training step per memory mode; the largest batch for a budget",
        description="Train one step of a Glow model in each memory mode and report parameters, gradients, Adam "
                    "state, the step's peak memory above them (counted tensor by tensor; counted again with each "
                    "convolution's working buffers, measured per call on the device; and as the device's own "
                    "peak), the tensors alive at the peak, step time, and with --budget the largest batch that fits. "
                    "Model flags default to GlowConfig's (the paper's CIFAR-10 model), or to --preset's.")
    profile.add_argument("--preset", choices=PRESET_NAMES, default=None,
                         help="start from a preset's model (its image shape included); flags given override it: "
                              + PRESET_LIST)
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
    add_dataclass_flags(profile, GlowConfig, skip=("image_shape", "context_channels", "memory"), data_defaults=False)


def cmd_profile(args: argparse.Namespace) -> int:
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
