"""The `revglow` argument parser: one subcommand per command, each added by the module that runs it."""
from __future__ import annotations

import argparse

from revglow.cli.checkpoint_commands import add_checkpoint_parsers
from revglow.cli.profile_command import add_profile_parser
from revglow.cli.train_command import add_train_parser
from revglow.cli.values import positive_int

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """The `revglow` argument parser with its six commands.

    Example:
        >>> build_parser().parse_args(["sample", "--checkpoint", "c.pt", "--out", "grid.png"]).n
        64
    """
    parser = argparse.ArgumentParser(prog="revglow", description="Glow normalizing flows: train, evaluate, "
                                     "sample, interpolate and manipulate images.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_train_parser(commands)
    add_checkpoint_parsers(commands)
    add_profile_parser(commands)
    for command in commands.choices.values():     # one flag every command shares, added in one place
        command.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS, metavar="N",
                             help="CPU threads of torch's intra-op parallelism (torch.set_num_threads; default: "
                                  "torch's own choice, one per core)")
    return parser
