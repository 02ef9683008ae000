"""The volume's device: a regular file or a block device, read and written by offset."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

from drtool.errors import DeviceError, DeviceIOError, UsageError

BLKGETSIZE64 = 0x80081272


@dataclass(frozen=True)
class DeviceProbe:
    """What a quick look at the device path found (see :func:`probe`)."""

    path: str
    state: str  # "ok", "missing", "unreadable", "wrong-size", "not-a-device"
    size: int | None
    reason: str
    #: byte spans (offset, length) the probe could not read on a device that is nevertheless
    #: usable (``ok``): only the regions there are bad, and a scrub finds them
    read_errors: tuple[tuple[int, int], ...] = ()

    @property
    def ok(self) -> bool:
        """The device can be used: the volume is not FAULTED (some of its regions may be bad)."""
        return self.state == "ok"


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISBLK(mode):
        return "block device"
    return None


def device_size(fd: int, path: str) -> int:
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode):
        return info.st_size
    if stat.S_ISBLK(info.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return struct.unpack("<Q", buf)[0]
    raise UsageError(f"{path} is not a regular file or a block device")


def check_device_path(path: str) -> int:
    """Validate a device path for ``init``; return its size.  Raises UsageError/DeviceError."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise DeviceError(f"device {path} does not exist") from None
    except OSError as exc:
        raise DeviceError(f"device {path}: {exc.strerror}") from None
    if _kind(info.st_mode) is None:
        what = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file or block device"
        raise UsageError(f"device {path} is {what}")
    with Device(path) as device:
        if device.size == 0:
            raise UsageError(f"device {path} is empty (size 0)")
        return device.size


#: what the probe reads: 4 KiB at each end of the device, and when both fail, up to this many
#: 4 KiB blocks spread between them (a device that fails every one of them is dead)
PROBE_BLOCK = 4096
PROBE_SAMPLES = 6


def probe(path: str, expected_size: int | None = None) -> DeviceProbe:
    """Is the device usable at all?  A quick look, not a scrub: a few reads, no digests.

    The volume is FAULTED (``ok`` false: every region is bad until a scrub finds the device
    usable again) exactly when its device

    - is ``missing``: the path does not exist;
    - is ``not-a-device``: neither a regular file nor a block device;
    - is ``unreadable``: it cannot be stat'ed or opened, its size cannot be found, or every
      read the probe tries fails (the first and the last 4 KiB, then up to
      :data:`PROBE_SAMPLES` 4 KiB blocks spread between them: a dead or detached disk);
    - has the ``wrong-size``: fewer bytes than the volume (``expected_size``).

    A device that is there, of the right size, and reads somewhere is ``ok``, even when some
    of the probe's reads fail (an I/O error in the first or the last 4 KiB): those spans are
    listed in ``read_errors`` and named in ``reason``, and only the regions that fail are
    bad, which the scrub then finds (as ``io-error`` regions).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return DeviceProbe(path, "missing", None, "device does not exist")
    except OSError as exc:
        return DeviceProbe(path, "unreadable", None, exc.strerror or str(exc))
    if _kind(info.st_mode) is None:
        return DeviceProbe(path, "not-a-device", None, "not a regular file or block device")
    try:
        with Device(path) as device:
            size = device.size
            if expected_size is not None and size < expected_size:
                return DeviceProbe(path, "wrong-size", size,
                                   f"device has {size} bytes, volume needs {expected_size}")
            failed, first_error, any_read = _probe_reads(device)
    except (DeviceError, OSError) as exc:
        return DeviceProbe(path, "unreadable", None, str(exc))
    if failed and not any_read:
        return DeviceProbe(path, "unreadable", size,
                           f"every read failed ({len(failed)} blocks tried; first: {first_error})",
                           tuple(failed))
    if failed:
        spans = ", ".join(f"{offset} (+{length})" for offset, length in failed)
        return DeviceProbe(path, "ok", size,
                           f"read errors at offset {spans}: only the regions there are bad (scrub finds them)",
                           tuple(failed))
    return DeviceProbe(path, "ok", size, "")


def _probe_blocks(size: int) -> list[tuple[int, int]]:
    """The 4 KiB-aligned blocks the probe may read: the first, the last, then the samples."""
    if size <= 0:
        return []
    last = (size - 1) // PROBE_BLOCK * PROBE_BLOCK
    blocks = [(0, min(PROBE_BLOCK, size))]
    if last > 0:
        blocks.append((last, size - last))
    inner = last // PROBE_BLOCK - 1  # the whole blocks strictly between the first and the last
    for i in range(1, min(PROBE_SAMPLES, inner) + 1):
        offset = (1 + inner * i // (min(PROBE_SAMPLES, inner) + 1)) * PROBE_BLOCK
        blocks.append((offset, PROBE_BLOCK))
    return list(dict.fromkeys(blocks))


def _probe_reads(device: Device) -> tuple[list[tuple[int, int]], str, bool]:
    """Read both ends; when both fail, the samples between until one reads.
    Returns (the spans that failed, the first error, whether any read succeeded)."""
    failed: list[tuple[int, int]] = []
    first_error = ""
    blocks = _probe_blocks(device.size)
    ends = blocks[:2]
    any_read = False
    for index, (offset, length) in enumerate(blocks):
        if index >= len(ends) and any_read:
            break  # the samples only decide between "some reads fail" and "every read fails"
        try:
            device.pread(length, offset)
            any_read = True
        except DeviceIOError as exc:
            failed.append((offset, length))
            first_error = first_error or str(exc)
    return failed, first_error, any_read or not blocks


class Device:
    """An open device.  Every failure names the path and the byte range."""

    def __init__(self, path: str, writable: bool = False) -> None:
        self.path = path
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise DeviceError(f"device {path} does not exist") from None
        except IsADirectoryError:
            raise UsageError(f"device {path} is a directory") from None
        except OSError as exc:
            raise DeviceError(f"cannot open device {path}: {exc.strerror}") from None
        self.writable = writable
        try:
            self.size = device_size(self.fd, path)
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def readinto(self, buffer: bytearray | memoryview, offset: int) -> None:
        """Fill ``buffer`` from ``offset``; a short read or EIO raises DeviceIOError."""
        view = memoryview(buffer)
        want = len(view)
        done = 0
        while done < want:
            try:
                got = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                raise DeviceIOError(self.path, offset + done, want - done,
                                    f"I/O error ({errno.errorcode.get(exc.errno, exc.errno)})") from None
            if got == 0:
                raise DeviceIOError(self.path, offset + done, want - done, "short read (device ends early)")
            done += got

    def pread(self, length: int, offset: int) -> bytes:
        buffer = bytearray(length)
        self.readinto(buffer, offset)
        return bytes(buffer)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                done += os.pwrite(self.fd, view[done:], offset + done)
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DeviceError(f"{self.path}: no space left writing at offset {offset + done}") from None
                raise DeviceIOError(self.path, offset + done, len(view) - done,
                                    f"write error ({errno.errorcode.get(exc.errno, exc.errno)})") from None

    def sync(self) -> None:
        """The bytes written so far, durable (fdatasync: the data and what reading it needs,
        not the times a plain fsync also journals)."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise DeviceError(f"{self.path}: fsync failed: {exc.strerror}") from None

    def start_writeback(self, offset: int, length: int) -> None:
        """Start writing ``[offset, offset+length)`` back to the disk without waiting for it
        (sync_file_range WRITE), so a later fsync finds little left; a no-op where unsupported."""
        _libc().sync_file_range(self.fd, ctypes.c_longlong(offset), ctypes.c_longlong(length),
                                ctypes.c_uint(SYNC_FILE_RANGE_WRITE))

    def is_hole(self, offset: int, length: int) -> bool:
        """True when ``[offset, offset+length)`` is a hole in a sparse file (reads as zeros)."""
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            # ENXIO: no data at or after offset, so the rest of the file is a hole.
            return exc.errno == errno.ENXIO
        return data >= offset + length

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range of a regular file (it then reads as zeros); False if unsupported."""
        result = _libc().fallocate(
            self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
            ctypes.c_longlong(offset), ctypes.c_longlong(length),
        )
        return result == 0


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SYNC_FILE_RANGE_WRITE = 0x02
_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _LIBC
