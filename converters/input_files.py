"""What a path handed in as a checkpoint must be before any loader opens it."""
from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError


def check_input_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
