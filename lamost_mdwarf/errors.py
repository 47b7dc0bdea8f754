"""Errors a user can act on (shown as one-line messages by the command line)."""
from __future__ import annotations

__all__ = ["PipelineError"]


class PipelineError(RuntimeError):
    """A stage cannot run as asked: a missing earlier stage, too few stars, ... ."""
