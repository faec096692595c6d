"""The command line's own errors: a problem with what the user asked for, printed as one line (exit status 1)."""
from __future__ import annotations

import argparse

from revglow.errors import RevglowError

__all__ = ["CommandError", "require_at_least"]


class CommandError(RevglowError):
    """A problem with what the user asked for; printed as one line, exit status 1."""


def require_at_least(args: argparse.Namespace, name: str, minimum, why: str = "") -> None:
    """A one-line error naming the flag when args.<name> is below `minimum`."""
    value = getattr(args, name)
    if value < minimum:
        raise CommandError(f"--{name.replace('_', '-')} must be >= {minimum}{why}; got {value}")
