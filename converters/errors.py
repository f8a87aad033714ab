"""The errors every loader and writer raises: one line each, shown as `error: ...`."""
from __future__ import annotations

class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with what was found instead."""


class DownloadError(RuntimeError):
    pass


class OutputExistsError(FileExistsError):
    pass
