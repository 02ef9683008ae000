"""A file of fixed-size, checksummed pages, changed in place through a page journal.

This is where a volume's per-region metadata lives (the manifest, the era map, the
bitmaps: see :mod:`drtool.storage.maps`).  Memory follows the pages in use, not the
volume's size: clean pages sit in a bounded LRU cache, changed pages stay in memory
until the next :meth:`PageStore.commit`, which writes only them.

On disk (``maps.pages``), page ``n`` is the 4 KiB at ``n * PAGE_SIZE``::

    payload      4064 bytes
    checksum     16s  blake3(volume id, page number, generation, payload), truncated
    generation   Q    the commit that wrote this page
    page_no      Q    where the page belongs (a page copied elsewhere is refused)

A page of 4096 zero bytes was never written (a hole in the sparse file): its payload
is all zeros, the default of every map.  Page 0 is the superblock: the geometry, the
volume id, the commit generation and the replication-log sequence the maps cover.

A commit (crash-safe, as a database's page journal):

1. the changed pages and the new superblock go to ``maps.journal`` in one write,
   ending in a checksum over the whole journal; fdatasync;
2. each page is written in place; fdatasync.

A crash in 1 leaves a torn journal (its checksum fails: ignored) and an untouched
store; a crash in 2 leaves a complete journal that the next open replays (pages are
whole images, so replay is idempotent).  So a torn page in the store is either
repaired from the journal or refused with :class:`CorruptStateFile` naming the file
and the page; it is never taken for a default page.  Limits, said plainly: a page
that a disk silently reverts to an older, internally valid version (a lost write)
is not detected; a page newer than the superblock is.  Readers that do not hold the
volume's lock (``status`` while an agent runs) read the journal's pages over the
store's and retry a page whose checksum fails once the writer's commit is done.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import blake3

from drtool.errors import CorruptStateFile, StateError

PAGE_SIZE = 4096
TRAILER = struct.Struct("<16sQQ")
PAYLOAD = PAGE_SIZE - TRAILER.size  # 4064
ZERO_PAGE = bytes(PAGE_SIZE)

SUPER = struct.Struct("<8sHHIQQQ16sQd")
SUPER_MAGIC = b"DRTPAGES"
FORMAT_VERSION = 2

JOURNAL_HEAD = struct.Struct("<8sHH16sQQ")
JOURNAL_MAGIC = b"DRTJRNL\0"
JOURNAL_ENTRY = struct.Struct("<Q")
JOURNAL_SUM = 32

DEFAULT_CACHE_PAGES = 4096  # 16 MiB of clean pages
_READ_RETRIES = 20


@dataclass(frozen=True)
class Superblock:
    region_size: int
    region_count: int
    generation: int
    covered_seq: int
    volume_id: bytes
    high_water: int  # pages [0, high_water) may have been written
    committed: float

    def pack(self) -> bytes:
        raw = SUPER.pack(SUPER_MAGIC, FORMAT_VERSION, 0, self.region_size, self.region_count,
                         self.generation, self.covered_seq, self.volume_id, self.high_water, self.committed)
        return raw + bytes(PAYLOAD - len(raw))


def _checksum(volume_id: bytes, page_no: int, generation: int, payload: bytes | bytearray | memoryview) -> bytes:
    hasher = blake3.blake3(volume_id)
    hasher.update(struct.pack("<QQ", page_no, generation))
    hasher.update(payload)
    return hasher.digest(16)


def seal(volume_id: bytes, page_no: int, generation: int, payload: bytes | bytearray) -> bytes:
    """The on-disk image of a page."""
    return bytes(payload) + TRAILER.pack(_checksum(volume_id, page_no, generation, payload), generation, page_no)


class PageStore:
    """Open with :meth:`create` or :meth:`open`.  Thread-safe; callers serialise their changes
    to one page (the maps change under the engine's locks), the store guards its cache."""

    def __init__(self, path: str, journal_path: str, fd: int, writable: bool, volume_id: bytes,
                 superblock: Superblock, journal_pages: dict[int, bytes], cache_pages: int) -> None:
        self.path = path
        self.journal_path = journal_path
        self._fd = fd
        self.writable = writable
        self.volume_id = volume_id
        self.superblock = superblock
        self._journal_pages = journal_pages  # read-only opens: the last commit's pages, over the store's
        self._clean: OrderedDict[int, bytearray] = OrderedDict()
        self._dirty: dict[int, bytearray] = {}
        self._cache_pages = cache_pages
        self._lock = threading.Lock()
        self.bytes_written = 0  # by commits, journal included (for tests and benchmarks)
        self.commits = 0

    # -- opening --------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, journal_path: str, volume_id: bytes, region_size: int, region_count: int,
               covered_seq: int = 0, cache_pages: int = DEFAULT_CACHE_PAGES) -> PageStore:
        """A new, empty store (every page default), committed at generation 1."""
        for stale in (path, journal_path):
            try:
                os.unlink(stale)
            except FileNotFoundError:
                pass
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot create {path}: {exc.strerror}") from exc
        superblock = Superblock(region_size, region_count, 0, covered_seq, volume_id, 1, time.time())
        store = cls(path, journal_path, fd, True, volume_id, superblock, {}, cache_pages)
        store.commit(covered_seq)
        return store

    @classmethod
    def open(cls, path: str, journal_path: str, volume_id: bytes, region_size: int, region_count: int,
             writable: bool, cache_pages: int = DEFAULT_CACHE_PAGES) -> PageStore:
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CorruptStateFile(path, "the region map file is missing") from None
        except OSError as exc:
            raise CorruptStateFile(path, f"cannot open the region map file: {exc.strerror}") from None
        try:
            journal_pages = _recover(path, journal_path, fd, volume_id, writable)
            superblock = _read_superblock(path, fd, volume_id, journal_pages)
            if superblock.region_size != region_size or superblock.region_count != region_count:
                raise CorruptStateFile(
                    path, f"region maps are for {superblock.region_count} regions of {superblock.region_size} "
                          f"bytes, the volume has {region_count} of {region_size}")
            size = os.fstat(fd).st_size
            if size < superblock.high_water * PAGE_SIZE and not journal_pages:
                raise CorruptStateFile(
                    path, f"region map file is {size} bytes, its commit covers {superblock.high_water * PAGE_SIZE} "
                          "(truncated)")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, journal_path, fd, writable, volume_id, superblock, journal_pages, cache_pages)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- pages ------------------------------------------------------------------------

    def page(self, page_no: int) -> bytearray:
        """The payload of a page, to read (do not change it: use :meth:`page_for_write`)."""
        # A cache hit takes no lock (every verified read asks for a page): a dict lookup is
        # atomic, and a page moving from dirty to clean during a commit is found by the slow
        # path below, which looks again under the lock.
        buf = self._dirty.get(page_no)
        if buf is not None:
            return buf
        buf = self._clean.get(page_no)
        if buf is not None:
            try:
                self._clean.move_to_end(page_no)
            except KeyError:  # evicted meanwhile: still the page's current bytes
                pass
            return buf
        buf = self._load(page_no)
        with self._lock:
            current = self._dirty.get(page_no) or self._clean.get(page_no)
            if current is not None:
                return current
            self._clean[page_no] = buf
            if len(self._clean) > self._cache_pages:
                self._clean.popitem(last=False)
        return buf

    def page_for_write(self, page_no: int) -> bytearray:
        """The payload of a page, to change; it is written by the next commit."""
        with self._lock:
            buf = self._dirty.get(page_no)
            if buf is not None:
                return buf
            buf = self._clean.pop(page_no, None)
            if buf is not None:
                self._dirty[page_no] = buf
                return buf
        buf = self._load(page_no)
        with self._lock:
            current = self._dirty.get(page_no)
            if current is not None:
                return current
            self._clean.pop(page_no, None)
            self._dirty[page_no] = buf
        return buf

    def is_dirty(self, page_no: int) -> bool:
        return page_no in self._dirty

    @property
    def dirty_bytes(self) -> int:
        return len(self._dirty) * PAGE_SIZE

    def written_pages(self, first: int, end: int) -> Iterator[int]:
        """Pages in [first, end) that may hold something other than defaults, ascending: the
        changed ones and those the file holds data for (holes are skipped with SEEK_DATA)."""
        with self._lock:
            pending = sorted(p for p in (*self._dirty, *self._journal_pages) if first <= p < end)
        on_disk = self._data_pages(first, end)
        yield from _merge_sorted(pending, on_disk)

    def _data_pages(self, first: int, end: int) -> Iterator[int]:
        position = first * PAGE_SIZE
        stop = end * PAGE_SIZE
        while position < stop:
            try:
                data = os.lseek(self._fd, position, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    return
                if exc.errno == errno.EINVAL:  # a file system without SEEK_DATA: every page
                    yield from range(position // PAGE_SIZE, end)
                    return
                raise
            if data >= stop:
                return
            hole = os.lseek(self._fd, data, os.SEEK_HOLE)
            yield from range(data // PAGE_SIZE, min((hole + PAGE_SIZE - 1) // PAGE_SIZE, end))
            position = hole

    def _load(self, page_no: int) -> bytearray:
        journaled = self._journal_pages.get(page_no)
        if journaled is not None:
            return self._verify(page_no, journaled, "the journal's copy of ")
        for attempt in range(_READ_RETRIES if not self.writable else 1):
            raw = _pread(self._fd, page_no * PAGE_SIZE)
            try:
                return self._verify(page_no, raw, "")
            except CorruptStateFile:
                if self.writable or attempt == _READ_RETRIES - 1:
                    raise
                # A writer may be half way through a commit: once it is done, the journal
                # holds this page whole.
                time.sleep(0.05)
                self._reload_journal()
                journaled = self._journal_pages.get(page_no)
                if journaled is not None:
                    return self._verify(page_no, journaled, "the journal's copy of ")
        raise AssertionError("unreachable")

    def _verify(self, page_no: int, raw: bytes, where: str) -> bytearray:
        if raw == ZERO_PAGE:
            return bytearray(PAYLOAD)
        if len(raw) != PAGE_SIZE:
            raise CorruptStateFile(self.path, f"{where}page {page_no} is short ({len(raw)} bytes): truncated")
        checksum, generation, stored_no = TRAILER.unpack_from(raw, PAYLOAD)
        payload = memoryview(raw)[:PAYLOAD]
        if stored_no != page_no or _checksum(self.volume_id, page_no, generation, payload) != checksum:
            raise CorruptStateFile(self.path, f"{where}page {page_no} fails its checksum (torn write, damage, "
                                              "or a page of another volume)")
        if self.writable and generation > self.superblock.generation:
            raise CorruptStateFile(self.path, f"page {page_no} is from commit {generation}, newer than the "
                                              f"file's last commit {self.superblock.generation}")
        return bytearray(payload)

    def _reload_journal(self) -> None:
        try:
            pages = _read_journal(self.journal_path, self.volume_id)
        except CorruptStateFile:
            return
        if pages is not None:
            generation, entries = pages
            if generation >= self.superblock.generation:
                self._journal_pages = entries

    # -- committing ---------------------------------------------------------------------

    def commit(self, covered_seq: int) -> int:
        """Write the changed pages and a new superblock (see the module's docstring).  Returns
        the bytes written.  The caller holds its lock: no page changes during a commit."""
        if not self.writable:
            raise StateError(f"{self.path} was opened read-only")
        with self._lock:
            dirty = dict(self._dirty)
        generation = self.superblock.generation + 1
        high_water = max([self.superblock.high_water, *(p + 1 for p in dirty)])
        superblock = Superblock(self.superblock.region_size, self.superblock.region_count, generation,
                                covered_seq, self.volume_id, high_water, time.time())
        images = {0: seal(self.volume_id, 0, generation, superblock.pack())}
        for page_no in sorted(dirty):
            images[page_no] = seal(self.volume_id, page_no, generation, dirty[page_no])
        journal = bytearray(JOURNAL_HEAD.pack(JOURNAL_MAGIC, FORMAT_VERSION, 0, self.volume_id, generation,
                                              len(images)))
        for page_no, image in images.items():
            journal += JOURNAL_ENTRY.pack(page_no)
            journal += image
        journal += blake3.blake3(journal).digest()
        try:
            _write_file(self.journal_path, journal)
            for page_no, image in images.items():
                _pwrite_all(self._fd, image, page_no * PAGE_SIZE)
            os.fdatasync(self._fd)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StateError(f"no space left to commit {self.path}; the previous commit is intact "
                                 "(the replication log redoes what came after it)") from exc
            raise StateError(f"cannot commit {self.path}: {exc.strerror}") from exc
        with self._lock:
            for page_no, buf in dirty.items():
                if self._dirty.get(page_no) is buf:
                    del self._dirty[page_no]
                    self._clean[page_no] = buf
            while len(self._clean) > self._cache_pages:
                self._clean.popitem(last=False)
        self.superblock = superblock
        written = len(journal) + PAGE_SIZE * len(images)
        self.bytes_written += written
        self.commits += 1
        return written


def _merge_sorted(a: list[int], b: Iterable[int]) -> Iterator[int]:
    pending = iter(a)
    nxt = next(pending, None)
    last = -1
    for page in b:
        while nxt is not None and nxt <= page:
            if nxt != last:
                yield nxt
                last = nxt
            nxt = next(pending, None)
        if page != last:
            yield page
            last = page
    while nxt is not None:
        if nxt != last:
            yield nxt
            last = nxt
        nxt = next(pending, None)


def _pread(fd: int, offset: int) -> bytes:
    try:
        return os.pread(fd, PAGE_SIZE, offset) or ZERO_PAGE  # past the end: never written
    except OSError as exc:
        raise StateError(f"cannot read region maps at byte {offset}: {exc.strerror}") from exc


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _write_file(path: str, data: bytes | bytearray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _pwrite_all(fd, bytes(data), 0)
        os.ftruncate(fd, len(data))
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _read_journal(path: str, volume_id: bytes) -> tuple[int, dict[int, bytes]] | None:
    """(generation, {page: image}) of a complete journal; None when there is none or it is torn
    (a crash while it was written: the store was not touched by that commit)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptStateFile(path, f"cannot read the region map journal: {exc.strerror}") from None
    if len(data) < JOURNAL_HEAD.size + JOURNAL_SUM:
        return None
    magic, version, _flags, vid, generation, count = JOURNAL_HEAD.unpack_from(data)
    if magic != JOURNAL_MAGIC:
        raise CorruptStateFile(path, f"not a drtool region map journal (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise CorruptStateFile(path, f"region map journal format {version} is not supported (expected "
                                     f"{FORMAT_VERSION})")
    if vid != volume_id:
        raise CorruptStateFile(path, "the region map journal belongs to another volume")
    size = JOURNAL_HEAD.size + count * (JOURNAL_ENTRY.size + PAGE_SIZE)
    if len(data) < size + JOURNAL_SUM or blake3.blake3(memoryview(data)[:size]).digest() != data[size:size + JOURNAL_SUM]:
        return None  # torn: this commit never reached the store
    pages: dict[int, bytes] = {}
    position = JOURNAL_HEAD.size
    for _ in range(count):
        (page_no,) = JOURNAL_ENTRY.unpack_from(data, position)
        position += JOURNAL_ENTRY.size
        pages[page_no] = data[position:position + PAGE_SIZE]
        position += PAGE_SIZE
    return generation, pages


class _TornSuperblock(CorruptStateFile):
    """The superblock fails its checksum (a commit's journal may hold it whole)."""


def _superblock_from(path: str, raw: bytes, volume_id: bytes) -> Superblock:
    if raw == ZERO_PAGE or len(raw) != PAGE_SIZE:
        raise _TornSuperblock(path, "region map file has no superblock (empty, truncated or not drtool's)")
    checksum, generation, page_no = TRAILER.unpack_from(raw, PAYLOAD)
    magic, version, _f, rsize, rcount, sgen, seq, vid, high, committed = SUPER.unpack_from(raw)
    if magic != SUPER_MAGIC:
        raise CorruptStateFile(path, f"not a drtool region map file (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise CorruptStateFile(path, f"region map format {version} is not supported (expected {FORMAT_VERSION})")
    if vid != volume_id:
        raise CorruptStateFile(path, "the region map file belongs to another volume")
    if page_no != 0 or sgen != generation or _checksum(volume_id, 0, generation, raw[:PAYLOAD]) != checksum:
        raise _TornSuperblock(path, "the region map superblock fails its checksum (torn write or damage)")
    return Superblock(rsize, rcount, sgen, seq, vid, high, committed)


def _recover(path: str, journal_path: str, fd: int, volume_id: bytes, writable: bool) -> dict[int, bytes]:
    """Replay a complete journal the store may lack (a crash during a commit's page writes).
    A writer replays it into the file; a reader keeps its pages to read over the file's."""
    found = _read_journal(journal_path, volume_id)
    if found is None:
        return {}
    generation, pages = found
    try:
        current = _superblock_from(path, _pread(fd, 0), volume_id).generation
    except _TornSuperblock:
        current = -1  # the superblock itself is torn: the journal holds the commit that tore it
    if generation < current:
        return {}  # an older commit, already in the store
    if 0 not in pages:
        raise CorruptStateFile(journal_path, "the region map journal has no superblock")
    if generation == current:
        # Its superblock reached the file; the other pages may not have: only what differs
        # is written again (an open after a clean commit writes nothing).
        pages = {p: image for p, image in pages.items() if _pread(fd, p * PAGE_SIZE) != image}
        if not pages:
            return {}
    if not writable:
        return pages
    try:
        for page_no, image in pages.items():
            _pwrite_all(fd, image, page_no * PAGE_SIZE)
        os.fdatasync(fd)
    except OSError as exc:
        raise StateError(f"cannot replay the region map journal into {path}: {exc.strerror}") from exc
    return {}


def _read_superblock(path: str, fd: int, volume_id: bytes, journal_pages: dict[int, bytes]) -> Superblock:
    raw = journal_pages.get(0) or _pread(fd, 0)
    return _superblock_from(path, raw, volume_id)
