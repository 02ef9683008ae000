"""A plain file or block device served as an NBD export.

The reference implementation of :class:`drtool.nbd.export.NbdExport`: the
tests serve images through it, and ``bench/nbd_read.py`` measures the
server's own cost with it (no verification, no merging, just pread/pwrite).
"""

from __future__ import annotations

import ctypes
import errno
import os

from drtool.nbd.export import ExportFlags

# fallocate(2) modes; Python's os module has no fallocate with a mode.
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class FileExport:
    """Serve ``path`` (a regular file or a block device) under ``name``."""

    def __init__(self, path: str | os.PathLike[str], name: str = "", description: str = "",
                 read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.name = name
        self.description = description
        self.read_only = read_only
        self._fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size(self) -> int:
        # st_size is 0 for a block device; the end offset is right for both.
        return os.lseek(self._fd, 0, os.SEEK_END)

    def flags(self) -> ExportFlags:
        # One file descriptor and the kernel's page cache serve every
        # connection, so a flush on one is a flush for all: multi-conn is safe.
        return ExportFlags(read_only=self.read_only, can_flush=True, can_fua=True,
                           can_trim=True, can_write_zeroes=True, can_multi_conn=True)

    def read(self, offset: int, length: int) -> list[bytes]:
        data = os.pread(self._fd, length, offset)
        if len(data) != length:  # the file shrank under us
            raise OSError(errno.EIO, f"{self.path}: short read at {offset} (+{length})")
        return [data]

    def write(self, offset: int, data: memoryview, fua: bool) -> None:
        while data:
            done = os.pwrite(self._fd, data, offset)
            data = data[done:]
            offset += done
        if fua:
            os.fdatasync(self._fd)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        # A trim is a hint: where holes cannot be punched, keeping the data is correct.
        try:
            _fallocate(self._fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENODEV):
                raise
        if fua:
            os.fdatasync(self._fd)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool) -> None:
        mode = _FALLOC_FL_PUNCH_HOLE if may_trim else _FALLOC_FL_ZERO_RANGE
        try:
            _fallocate(self._fd, mode | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.ENODEV):
                raise
            self._write_zero_bytes(offset, length)
        if fua:
            os.fdatasync(self._fd)

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        zeroes = memoryview(bytes(min(length, _ZERO_CHUNK)))
        end = offset + length
        while offset < end:
            offset += os.pwrite(self._fd, zeroes[:end - offset], offset)
