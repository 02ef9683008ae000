"""Read a device region by region as fast as the machine allows, digesting each region.

:func:`digest_regions` streams: it yields one :class:`DigestBatch` per chunk of at most
``CHUNK`` bytes, so memory stays a few chunks whatever the volume's size.  Two worker
threads read and hash chunks in turn (both ``os.preadv`` and blake3 release the GIL, so
the two cores both hash) while the caller's thread consumes the finished batches.  A chunk
that fails is re-read region by region, so an I/O error is pinned to exactly the regions
it hits.

Where the kernel allows it, a chunk is hashed straight from a read-only mapping of the device
instead of a copy (the page cache's pages are hashed where they are, as ``b3sum`` does; the copy
cost a third of the CPU): the chunk's pages are first populated with
``madvise(MADV_POPULATE_READ)``, which answers an I/O error (or a range past the end) with an
error instead of SIGBUS, and such a chunk goes the ``preadv`` way, which pins the error to its
regions.  A mapping is used only for the part of a regular file its current size covers, or a
block device, and only by a plain :class:`Device` (one whose ``readinto`` a subclass
replaced is read through it).  The populated pages are then locked (mlock) until hashed, so
none can be reclaimed and read again (an I/O error at that moment would be SIGBUS, the whole
agent gone); a chunk that cannot be locked (RLIMIT_MEMLOCK) goes the ``preadv`` way.  What is
left, said plainly: a regular file truncated while a chunk of it is hashed (microseconds)
still ends the process with SIGBUS (block devices cannot be truncated); ``mapped=False`` (and
``DRTOOL_SCRUB_MMAP=0``) reads everything with ``preadv``.

:func:`data_runs` tells which regions of a sparse file hold any data (SEEK_DATA/SEEK_HOLE):
callers read only those, a region wholly in a hole is zeros by definition.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import queue
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import blake3

from drtool.buffers import aligned_bytes
from drtool.errors import DeviceIOError
from drtool.regions import Geometry, Run
from drtool.storage.device import Device

CHUNK = 4 << 20
WORKERS = 2
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14; Python 3.12 names it
#: hash chunks from a mapping of the device where that is safe (see the module docstring)
MAPPED = os.environ.get("DRTOOL_SCRUB_MMAP", "1") != "0"

ProgressFn = Callable[[int], None]

# Why a region could not be digested.
IO_ERROR = "io-error"
SHORT_READ = "short-read"


@dataclass
class DigestBatch:
    """The digests of regions ``first .. first+count-1`` (one run, read together).

    ``digests[i]`` is region ``first+i``'s digest, or None when it could not be read;
    ``errors`` then says why.  ``bytes_read`` counts the bytes actually read."""

    first: int
    count: int
    digests: list[bytes | None]
    errors: dict[int, str] = field(default_factory=dict)
    bytes_read: int = 0

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        """``(region, digest or None)`` in ascending order."""
        return zip(range(self.first, self.first + self.count), self.digests)


def data_runs(fd: int, geometry: Geometry, targets: Iterable[Run]) -> Iterator[Run]:
    """The regions of ``targets`` (ascending runs) that hold any data, as ascending runs.

    A region touching a data extent is in whole; a region wholly inside a hole is left out
    (it reads as zeros).  The walk asks SEEK_DATA/SEEK_HOLE once per extent, so holes cost
    nothing whatever their size.  Bytes past the end of the file count as data: a device
    that shrank must be read to report its short reads.  Where SEEK_DATA is unsupported
    everything counts as data (a block device answers so by itself: the kernel's generic
    llseek says every offset below the size is data, and ENXIO at or past it).
    """
    shift = geometry.shift
    try:
        eof = os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        eof = -1  # cannot even seek: read everything
    supported = eof >= 0
    # The extent known from the last question: [asked, data) is a hole, [data, hole) is data.
    asked = data = hole = -1
    pending: list[int] | None = None  # [first, end) in regions, not yet yielded

    for first, count in targets:
        run_end = first + count
        start, end = first << shift, min(run_end << shift, geometry.size)
        pos = start
        while pos < end:
            if not supported or pos >= eof:
                lo, hi = pos, end
            else:
                if not asked <= pos < hole:
                    try:
                        data = os.lseek(fd, pos, os.SEEK_DATA)
                    except OSError as exc:
                        if exc.errno != errno.ENXIO:
                            supported = False
                            continue
                        data = eof  # no data from pos to the end of the file
                    hole = eof
                    if data < eof:
                        try:
                            hole = max(os.lseek(fd, data, os.SEEK_HOLE), data + 1)
                        except OSError:  # the file shrank under us: read the rest
                            supported = False
                            continue
                    asked = pos
                if data >= end:
                    break
                lo, hi = max(data, pos), min(hole, end)
                if lo >= hi:  # the extent ended at the end of the file: the rest is past it
                    pos = max(pos, eof)
                    continue
            lo_region, hi_region = max(lo >> shift, first), min(((hi - 1) >> shift) + 1, run_end)
            if pending is not None and lo_region <= pending[1]:
                pending[1] = max(pending[1], hi_region)
            else:
                if pending is not None:
                    yield pending[0], pending[1] - pending[0]
                pending = [lo_region, hi_region]
            pos = hi_region << shift  # the rest of the last region is read anyway
    if pending is not None:
        yield pending[0], pending[1] - pending[0]


def _chunks(runs: Iterable[Run], per_chunk: int) -> Iterator[Run]:
    for first, count in runs:
        for start in range(first, first + count, per_chunk):
            yield start, min(per_chunk, first + count - start)


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


def digest_regions(
    device: Device,
    geometry: Geometry,
    runs: Iterable[Run] | None = None,
    progress: ProgressFn | None = None,
    workers: int = WORKERS,
    mapped: bool | None = None,
) -> Iterator[DigestBatch]:
    """Digest every region of ``runs`` (default: the whole volume), yielding batches.

    ``runs`` may be a lazy iterator (the workers draw from it in turn, under a lock).
    Batches come in the order they finish, not necessarily ascending.  At most a few
    batches wait for the caller; closing the iterator early stops the workers.
    ``progress(bytes)`` is called in the caller's thread, once per batch.  ``mapped``:
    hash from a mapping of the device where possible (default :data:`MAPPED`).
    """
    if runs is None:
        runs = [(0, geometry.count)]
    per_chunk = max(1, CHUNK // geometry.region_size)
    chunks = _chunks(runs, per_chunk)
    mapper = _Mapper(device) if (MAPPED if mapped is None else mapped) else None
    take = threading.Lock()
    finished: queue.Queue[object] = queue.Queue(maxsize=4 * max(1, workers))
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                finished.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        view = aligned_bytes(per_chunk * geometry.region_size)
        try:
            while not stop.is_set():
                with take:
                    chunk = next(chunks, None)
                if chunk is None:
                    break
                put(_digest_chunk(device, geometry, chunk[0], chunk[1], view, mapper))
        except BaseException as exc:  # surfaced in the caller's thread
            put(_Failed(exc))
        put(_DONE)

    threads = [threading.Thread(target=work, name=f"digest-{n}", daemon=True) for n in range(max(1, workers))]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = finished.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, _Failed):
                raise item.exc
            else:
                assert isinstance(item, DigestBatch)
                if progress:
                    progress(geometry.run_bounds(item.first, item.count)[1])
                yield item
    finally:
        stop.set()
        for thread in threads:
            thread.join()


class _Mapper:
    """Read-only mappings of a device's chunks, populated first (see the module docstring)."""

    def __init__(self, device: Device) -> None:
        self.device = device
        info = os.fstat(device.fd)
        self.regular = stat.S_ISREG(info.st_mode)
        # A Device whose reads are intercepted (a subclass's own readinto: fault injection, a
        # wrapper) is read through them: a mapping would go around them.
        self.usable = (self.regular or stat.S_ISBLK(info.st_mode)) and type(device).readinto is Device.readinto

    def map(self, offset: int, length: int) -> _Mapped | None:
        """The chunk's bytes, mapped, populated and locked; None when that cannot be done safely."""
        if not self.usable or _libc is None or offset % mmap.ALLOCATIONGRANULARITY:
            return None
        if self.regular and os.fstat(self.device.fd).st_size < offset + length:
            return None  # past the end: preadv reports the short read
        address = _libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, self.device.fd, offset)
        if address in (None, _MAP_FAILED):
            self.usable = False
            return None
        mapped = _Mapped(address, length)
        if _libc.madvise(address, length, MADV_POPULATE_READ) != 0:
            code = ctypes.get_errno()
            mapped.close()
            if code in (errno.EINVAL, errno.ENOSYS):  # a kernel without it: never again
                self.usable = False
            return None  # EFAULT / EIO: an unreadable page; preadv pins it to its regions
        # Pin the populated pages while they are hashed: a page reclaimed in between would be
        # read again by the hash, and an I/O error there is SIGBUS (the agent gone, with every
        # client of every volume).  Locked pages are never reclaimed; munmap unlocks them.
        # Where they cannot be locked (RLIMIT_MEMLOCK), the chunk goes the preadv way.
        if _libc.mlock(address, length) != 0:
            mapped.close()
            return None
        return mapped


class _Mapped:
    """A read-only mapping made through libc (Python's mmap cannot mlock its pages)."""

    def __init__(self, address: int, length: int) -> None:
        self.address = address
        self.length = length
        self.view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")

    def close(self) -> None:
        self.view.release()
        _libc.munmap(self.address, self.length)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mmap.restype = ctypes.c_void_p
        for name in ("madvise",):
            getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            getattr(libc, name).restype = ctypes.c_int
        for name in ("mlock", "munmap"):
            getattr(libc, name).argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            getattr(libc, name).restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
_MAP_FAILED = ctypes.c_void_p(-1).value


def _digest_chunk(device: Device, geometry: Geometry, first: int, count: int, view: memoryview,
                  mapper: _Mapper | None = None) -> DigestBatch:
    offset, length = geometry.run_bounds(first, count)
    rsize = geometry.region_size
    hasher = blake3.blake3
    mapping = mapper.map(offset, length) if mapper is not None else None
    if mapping is not None:
        try:
            data = mapping.view
            digests = [hasher(data[start:start + rsize]).digest() for start in range(0, length, rsize)]
        finally:
            mapping.close()
        return DigestBatch(first, count, digests, bytes_read=length)
    try:
        device.readinto(view[:length], offset)
    except DeviceIOError:
        return _digest_one_by_one(device, geometry, first, count, view)
    data = view[:length]  # the last region of the volume may be partial
    digests: list[bytes | None] = [hasher(data[start:start + rsize]).digest() for start in range(0, length, rsize)]
    return DigestBatch(first, count, digests, bytes_read=length)


def _digest_one_by_one(device: Device, geometry: Geometry, first: int, count: int, view: memoryview) -> DigestBatch:
    batch = DigestBatch(first, count, [])
    for region in range(first, first + count):
        offset, length = geometry.region_bounds(region)
        part = view[:length]
        try:
            device.readinto(part, offset)
        except DeviceIOError as exc:
            batch.errors[region] = SHORT_READ if exc.reason.startswith("short read") else IO_ERROR
            batch.digests.append(None)
            continue
        batch.digests.append(blake3.blake3(part).digest())
        batch.bytes_read += length
    return batch
