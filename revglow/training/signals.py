"""SIGINT/SIGTERM during a training run: finish the step in progress, checkpoint, and stop with
TrainingInterrupted (exit status 130 or 143); a second signal stops at once."""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Dict, Optional

__all__ = ["TrainingInterrupted", "StopSignals"]


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run: after the step in progress, with a checkpoint written
    (`checkpoint` is its path), or at once on a second signal (`checkpoint` is None).

    `exit_code` is the shell's convention, 128 + the signal number: 130 for SIGINT, 143 for SIGTERM.
    """

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]) -> None:
        self.signum = int(signum)
        self.step = step
        self.checkpoint = checkpoint
        self.exit_code = 128 + self.signum
        name = signal.Signals(self.signum).name
        if checkpoint is not None:
            message = (f"interrupted by {name} after step {step}; checkpoint written to {checkpoint} "
                       f"(continue with --resume)")
        else:
            message = f"interrupted by a second {name} at step {step}; stopped at once without writing a checkpoint"
        super().__init__(message)

    def __str__(self) -> str:
        return str(self.args[0])



class StopSignals:
    """SIGINT/SIGTERM handlers for the duration of a run: the first signal asks the loop to stop after the
    step in progress (the trainer then writes a checkpoint); a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.received: Optional[int] = None
        self.previous: Dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.restore()
            raise TrainingInterrupted(signum, self.trainer.step, None)
        self.received = int(signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():   # signal handlers live in the main thread
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()

