"""Errors a training run reports as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations

__all__ = ["CheckpointError", "TrainingError"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or from an incompatible run."""


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, an existing run in --out, ...)."""
