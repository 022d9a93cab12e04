"""Errors a training run reports as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations

__all__ = ["CheckpointError", "Diverged", "TrainingError", "TrainingInterrupted"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or from an incompatible run."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, an existing run in --out, ...).

    ``every_rank``: under torchrun every rank raised the same error at the same point (the CLI
    then prints it on rank 0 alone)."""

    def __init__(self, message: str, every_rank: bool = False) -> None:
        super().__init__(message)
        self.every_rank = every_rank


class Diverged(TrainingError):
    """The run stopped on a non-finite loss, gradient, weight or validation loss (``--nonfinite
    stop``): it diverged, and the last checkpoint is kept. ``fqtorch train`` exits with
    :data:`EXIT_DIVERGED`, so that a script tells it from other failures without reading text."""


EXIT_DIVERGED = 3  # fqtorch train's exit status for a run that diverged (2: bad input, others)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the run; the message says what was saved and how to resume.

    A ``KeyboardInterrupt``, so code that already handles Ctrl-C around ``train()`` keeps working.
    ``exit_code`` is the shell's convention for the signal (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
