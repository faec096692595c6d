"""The `revglow` command line: train, eval, sample, interpolate, manipulate, profile.

`main` runs it; the parser is built in revglow.cli.parser from the commands' own modules: train_command (`revglow
train`, its flags built from the fields of GlowConfig and TrainConfig: revglow.cli.flags), checkpoint_commands (eval,
sample, interpolate, manipulate) and profile_command.

Example:
    $ revglow train --max-steps 1500 --out runs/digits
    $ revglow train --preset cifar10 --data-root data/cifar-10-batches-py --print-config
    $ revglow sample --checkpoint runs/digits/checkpoint.pt --n 64 --temperature 0.7 --out grid.png
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import List, Optional, Sequence

import torch

from revglow.cli.checkpoint_commands import cmd_eval, cmd_interpolate, cmd_manipulate
from revglow.cli.checks import out_of_memory_message
from revglow.cli.parser import build_parser
from revglow.cli.profile_command import cmd_profile
from revglow.cli.sample_command import cmd_sample
from revglow.cli.signals import CommandInterrupted, stop_on_signals
from revglow.cli.train_command import cmd_train
from revglow.errors import RevglowError
from revglow.training.signals import TrainingInterrupted

__all__ = ["main", "COMMANDS"]

COMMANDS = ("train", "eval", "sample", "interpolate", "manipulate", "profile")

_COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "interpolate": cmd_interpolate,
             "manipulate": cmd_manipulate, "profile": cmd_profile}


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `revglow` with `argv` (default sys.argv[1:]); returns the exit status.

    Usage errors (flags, and flag values a command cannot use) exit with argparse's status 2; revglow's own errors
    about what it was given (RevglowError: options, data, checkpoints, image files), file-system errors and running
    out of memory print one line `revglow: error: ...` and return 1 (set REVGLOW_DEBUG=1 to see the traceback
    instead). SIGINT and SIGTERM return 130 and 143 (train first writes a checkpoint). Anything else is a bug and
    keeps its traceback.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(_join_negative_values(argv))
    except SystemExit as exc:          # --help, or a usage error argparse has already printed
        return int(exc.code) if isinstance(exc.code, int) else 2
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    # train handles the signals itself (it checkpoints before stopping); the other commands stop at once
    signals = contextlib.nullcontext() if args.command == "train" else stop_on_signals()
    try:
        with signals:
            return _COMMANDS[args.command](args)
    except (TrainingInterrupted, CommandInterrupted) as exc:
        print(f"revglow: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("revglow: interrupted", file=sys.stderr)
        return 130
    except (RevglowError, OSError, MemoryError, RuntimeError) as exc:
        message = out_of_memory_message(exc, args.command)
        if os.environ.get("REVGLOW_DEBUG") or (message is None and not isinstance(exc, (RevglowError, OSError))):
            raise
        print(f"revglow: error: {message or str(exc) or type(exc).__name__}", file=sys.stderr)
        return 1
