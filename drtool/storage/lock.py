"""One mutating process per volume: an exclusive flock on the state directory's lock file."""

from __future__ import annotations

import fcntl
import os

from drtool.errors import StateError, VolumeBusy


class VolumeLock:
    """Held for the life of a mutating process; released by close() or process exit."""

    def __init__(self, state_dir: str, name: str) -> None:
        self.path = os.path.join(state_dir, "lock")
        self.name = name
        self.fd = -1

    def acquire(self) -> VolumeLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder_pid(self.path)
            os.close(fd)
            raise VolumeBusy(self.name, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> VolumeLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder_pid(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def is_locked(state_dir: str) -> int | None:
    """The pid holding the volume's lock, or None when nobody holds it."""
    path = os.path.join(state_dir, "lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return holder_pid(path) or -1
    finally:
        os.close(fd)
    return None
