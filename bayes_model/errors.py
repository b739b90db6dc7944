"""Exceptions the model library raises for users' mistakes and verdicts.

They live apart from the modules that raise them so that a caller catching them (the CLI's
one-paragraph error handler) does not import torch and e3nn to do so.
"""

from __future__ import annotations

__all__ = ["DeviceError", "UndertrainedError"]


class UndertrainedError(RuntimeError):
    """A model worse than the trivial predictor, or stopped by its budget too early."""


class DeviceError(RuntimeError):
    """A device setting this machine cannot honour (no CUDA, a GPU index not visible), or a
    GPU out of memory where smaller batches cannot help: one line naming the setting, what
    was found and the fix."""
