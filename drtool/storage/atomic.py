"""Crash-safe file replacement: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import errno
import os

from drtool.errors import StateError


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, chunks: bytes | list[bytes], mode: int = 0o600) -> None:
    """Replace ``path`` with ``chunks`` so a crash leaves either the old or the new file."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if exc.errno == errno.ENOSPC:
            raise StateError(f"no space left to write {path}; the previous version is intact") from exc
        raise StateError(f"cannot write {path}: {exc.strerror}") from exc
