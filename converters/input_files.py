"""What a path handed in as a checkpoint must be before any loader opens it: a
regular file with something in it. Devices (/dev/zero, /dev/urandom), FIFOs and
sockets have no size to bound a read by, and a FIFO can block forever."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import CheckpointError


def check_input_file(path: Path) -> int:
    """The file's size in bytes; refuses anything but a non-empty regular file."""
    try:
        info = os.stat(path)  # follows symlinks: the target is what gets read
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read: {err.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a character device" if stat.S_ISCHR(info.st_mode)
                else "a block device" if stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a checkpoint file")
    if info.st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    return info.st_size
