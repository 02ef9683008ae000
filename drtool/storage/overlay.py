"""The overlay's data file: a sparse file the size of the volume, in the state directory.

Which regions it holds is the ``overlay`` bitmap (storage.volume); this file only
stores bytes.  Creating it is instant whatever the volume size.
"""

from __future__ import annotations

import os

from drtool.errors import StateError
from drtool.storage.atomic import fsync_dir
from drtool.storage.device import Device


def create(path: str, size: int) -> None:
    """Create (or keep) a sparse overlay file of ``size`` bytes, durably."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path))
    except OSError as exc:
        raise StateError(f"cannot create the overlay {path}: {exc.strerror}") from None


def open_overlay(path: str, size: int) -> Device:
    if not os.path.exists(path):
        raise StateError(f"the overlay {path} is missing although the volume is in recovery")
    device = Device(path, writable=True)
    if device.size != size:
        device.close()
        raise StateError(f"the overlay {path} has {device.size} bytes, the volume {size}")
    return device


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(os.path.dirname(path))
