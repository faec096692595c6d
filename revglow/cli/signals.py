"""SIGINT and SIGTERM during a command other than train (which checkpoints first: revglow.training.signals): stop at
once with `CommandInterrupted`, exit status 130 or 143. Files are written atomically
(revglow.training.images), so a stopped command leaves no partial file behind."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["CommandInterrupted", "stop_on_signals"]


class CommandInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command; `exit_code` is the shell's 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.exit_code = 128 + int(signum)
        super().__init__(f"interrupted by {signal.Signals(signum).name}; nothing was written")

    def __str__(self) -> str:
        return str(self.args[0])


def _raise(signum, frame) -> None:
    raise CommandInterrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise CommandInterrupted (in the main thread, where Python runs signal
    handlers; elsewhere the block runs with the handlers as they are)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
