"""Ctrl-C and SIGTERM during training: finish the step, save a checkpoint, say how to resume.

The first SIGINT or SIGTERM only sets a flag; the loop looks at it after every step (all ranks
agree through an all-reduce), saves a checkpoint and raises :class:`TrainingInterrupted`. A step
is never cut in half, so the checkpoint is exact. A second Ctrl-C stops at once (the last
checkpoint stays intact: checkpoints are written atomically). A SIGTERM (schedulers preempt
with it) never stops at once. ``torchrun`` passes on the signal it got: a Ctrl-C in its terminal
reaches a worker twice, from the terminal and from ``torchrun`` about a millisecond apart (in
three runs the two arrived as one, and the run stopped with an exact checkpoint).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .errors import TrainingInterrupted

__all__ = ["StopRequest"]

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The flag a signal sets. A second Ctrl-C raises :class:`TrainingInterrupted` with an empty
    message where the program is; the training loop replaces it with one saying what was saved.
    """

    def __init__(self) -> None:
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number (130 for Ctrl-C)."""
        return 128 + (self.signal or signal.SIGINT)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal is not None:  # after a SIGTERM too
            raise TrainingInterrupted("", self.exit_code)
        if self.signal is None:
            self.signal = signum
            log.warning(
                "%s: stopping after this step and saving a checkpoint (Ctrl-C again to stop "
                "at once)",
                signal.Signals(signum).name,
            )

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Within the block, SIGINT and SIGTERM set the flag (main thread only: elsewhere Python
        delivers no signals, and the handlers are left alone)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
