"""Per-region digests with a presence bit, stored in pages that exist only once written.

The mirror's manifest, each snapshot's preserved set and the overlay replica's
region set are all "for some regions, this digest".  A table must cost what was
written to it, not the size of the volume (a 15 TiB volume has 251,658,240
regions of 64 KiB): creating or opening one reads and writes a few small files,
a batch rewrites only the pages it touched, and RAM holds a bounded cache of
pages.

Format 2 (this module), in the table's directory, every file a binary state
file (``drtool.storage.mapfile`` header: magic, format version 2, geometry,
generation, volume id, blake3 checksum)::

    index.bin             the root: the table's generation and the group files
                          that exist, each with the generation it was saved at
    group-NNNNNN.bin      for GROUP_PAGES pages each: the generation of the page's
                          file (0: never written), its present and non-zero slots
    pg-NNNNNNNN.bin       one page of PAGE_REGIONS regions: presence bitmap,
                          non-zero bitmap, then the non-zero digests, packed

A page (or group) the index does not list was never written: every region of it
is absent and all zeros.  A listed one whose file is missing, torn, foreign or of
another generation than the index says is refused with CorruptStateFile naming
the file, so a lost page is never taken for an empty one.

Saving (one generation G+1): the changed groups first, then the changed pages,
then index.bin, each file atomically (a step's files are fsync'ed together, then
renamed, then the directory is fsync'ed).  ``index.bin`` is the commit: a crash
before it leaves files newer than G, which opening recognises (a group newer
than the index, a group entry newer than G) and settles by reading the few pages
that save touched, so the counts stay exact; everything else must match.  A
batch changing more than MAX_DIRTY_PAGES pages writes them (groups first) before
its save, in the same generation.  A page whose regions are all absent again is
dropped: its group says "never written" and its file is removed after the commit.

A digest slot of all zero bytes means "the region is all zeros": that lets the
server answer ZERO frames without reading the image.  ``digest()`` returns the
real blake3 of the zeros.  A slot that is not present is always all zeros.

Format 1 (drtool before format 2: ``page-NNNNNNNN.bin`` files without an index,
every page of the manifest written at creation) is read and converted when the
server opens the replica (``check(writable=True)``); a read-only look
(``drtool status --replica-root``) refuses it, saying to start ``drtool serve``
on that root once.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

from drtool.errors import CorruptStateFile, StateError
from drtool.regions import Geometry, Run, to_runs
from drtool.storage import mapfile
from drtool.storage.atomic import fsync_dir
from drtool.storage.mapfile import HEADER, MapHeader
from drtool.wire import NO_DIGEST, zero_digest

FORMAT = 2
PAGE_REGIONS = 4096
_PAGE_SHIFT = 12
_BITMAP_BYTES = PAGE_REGIONS // 8
GROUP_PAGES = 256
CACHE_PAGES = 16  # clean pages kept in RAM per table (128.5 KiB each)
MAX_DIRTY_PAGES = 64  # changed pages held before they are written (the save finishes the generation)
INDEX_FILE = "index.bin"
_ROOT_HEAD = struct.Struct("<II")  # flags, groups listed
_ROOT_ENTRY = struct.Struct("<IIQ")  # group, reserved, generation of its file
_GROUP_ENTRY = struct.Struct("<QHHI")  # generation of the page's file (0: none), present, non-zero, reserved
_V1_LEFT = 1  # root flag: format-1 page files may remain (a conversion was interrupted before removing them)
_BITS = [tuple(bit for bit in range(8) if byte >> bit & 1) for byte in range(256)]


class DigestTable:
    """Digests of some regions of one volume.

    ``lazy`` only says how a format-1 table stored its pages (lazy: a missing
    page was empty; eager: every page was written at creation, so a missing one
    was lost); it matters only when such a table is converted.

    ``presence`` False: a table that only answers digests (the mirror's manifest).
    A region set to the zeros' digest is then absent, so zeroing regions (an
    initial sync sends a ZERO record for each region of zeros) writes no page.
    """

    def __init__(self, directory: str, magic: bytes, what: str, geometry: Geometry,
                 volume_id: bytes, lazy: bool, presence: bool = True) -> None:
        self.directory = directory
        self.magic = magic
        self.what = what
        self.geometry = geometry
        self.volume_id = volume_id
        self.lazy = lazy
        self.presence = presence
        self._group_magic = magic[:7] + b"G"
        self._index_magic = magic[:7] + b"I"
        self._generation = 0  # of the last index.bin written (or read)
        self._flags = 0
        self._groups: dict[int, _Group] = {}  # every group the index lists (or a save will)
        self._clean: OrderedDict[int, bytearray] = OrderedDict()  # LRU of unchanged pages
        self._dirty: dict[int, bytearray] = {}  # changed since the last write
        self._dirty_groups: set[int] = set()
        self._index_dirty = False
        self._unlink: set[int] = set()  # pages emptied: their files go once the index no longer lists them
        self._cache_lock = threading.Lock()  # readers share the volume's lock; the LRU is theirs too
        self._last: tuple[int, bytearray | None] = (-1, None)  # the page looked up last (most lookups)
        self._zero_pages: dict[int, bytes] = {}

    # -- geometry -----------------------------------------------------------------------

    @property
    def page_count(self) -> int:
        return (self.geometry.count + PAGE_REGIONS - 1) // PAGE_REGIONS

    def _regions_in(self, page: int) -> int:
        return min(PAGE_REGIONS, self.geometry.count - page * PAGE_REGIONS)

    def _pages_in(self, group: int) -> int:
        return min(GROUP_PAGES, self.page_count - group * GROUP_PAGES)

    def _page_path(self, page: int) -> str:
        return os.path.join(self.directory, f"pg-{page:08d}.bin")

    def _group_path(self, group: int) -> str:
        return os.path.join(self.directory, f"group-{group:06d}.bin")

    def _v1_path(self, page: int) -> str:
        return os.path.join(self.directory, f"page-{page:08d}.bin")

    @property
    def _index_path(self) -> str:
        return os.path.join(self.directory, INDEX_FILE)

    def _empty(self, page: int) -> bytearray:
        return bytearray(_BITMAP_BYTES + 32 * self._regions_in(page))

    # -- creating and opening -----------------------------------------------------------

    def create(self) -> None:
        """Start an empty table: one small index file, whatever the volume's size."""
        os.makedirs(self.directory, exist_ok=True)
        self._reset()
        self._index_dirty = True
        self.save(0)

    def _reset(self) -> None:
        self._last = (-1, None)
        self._generation, self._flags = 0, 0
        self._groups.clear()
        self._clean.clear()
        self._dirty.clear()
        self._dirty_groups.clear()
        self._unlink.clear()
        self._index_dirty = False

    def check(self, writable: bool = False) -> None:
        """Read the index and its groups; refuse what is missing, torn or stale, with the file's name.

        Costs the groups written so far (one 4 KiB file per 64 GiB touched at 64 KiB
        regions), never a walk of the volume.  Pages are read when first used.
        ``writable`` also settles a save a crash interrupted and converts format 1.
        """
        if not os.path.isdir(self.directory):
            raise CorruptStateFile(self.directory, f"the {self.what} directory is missing")
        self._reset()
        loaded = self._read(self._index_path, self._index_magic, f"{self.what} index", self.geometry.count)
        if loaded is None:
            self._convert_format_1(writable)
            return
        header, body = loaded
        self._generation = header.generation
        if len(body) < _ROOT_HEAD.size:
            raise CorruptStateFile(self._index_path, f"{self.what} index is truncated")
        self._flags, listed = _ROOT_HEAD.unpack_from(body)
        if len(body) != _ROOT_HEAD.size + listed * _ROOT_ENTRY.size:
            raise CorruptStateFile(self._index_path, f"{self.what} index lists {listed} groups in "
                                   f"{len(body)} bytes (torn?)")
        unsettled: list[int] = []
        for i in range(listed):
            group, _, generation = _ROOT_ENTRY.unpack_from(body, _ROOT_HEAD.size + i * _ROOT_ENTRY.size)
            if not 0 <= group * GROUP_PAGES < self.page_count or group in self._groups:
                raise CorruptStateFile(self._index_path, f"{self.what} index lists group {group} "
                                       "outside the volume or twice")
            self._groups[group] = self._load_group(group, generation)
            if self._groups[group].file_generation != generation:  # written by a save never committed
                self._dirty_groups.add(group)
            unsettled += self._groups[group].newer_than(self._generation, group)
        for page in unsettled:
            self._settle(page)
        if writable and (self._dirty_groups or self._flags & _V1_LEFT):
            self._remove_format_1()
            self.save(header.seq)

    def _load_group(self, group: int, generation: int) -> _Group:
        path = self._group_path(group)
        loaded = self._read(path, self._group_magic, f"{self.what} group {group}",
                            self._pages_in(group) * PAGE_REGIONS)
        if loaded is None:
            raise CorruptStateFile(path, f"the {self.what} group {group} is missing (the index lists it at "
                                   f"generation {generation})")
        header, body = loaded
        if header.generation < generation or generation < header.generation <= self._generation:
            raise CorruptStateFile(path, f"{self.what} group {group} is of generation {header.generation}, "
                                   f"the index says {generation} (a stale or foreign copy)")
        count = self._pages_in(group)
        if len(body) != count * _GROUP_ENTRY.size:
            raise CorruptStateFile(path, f"{self.what} group {group} body is {len(body)} bytes, expected "
                                   f"{count * _GROUP_ENTRY.size} (torn or truncated)")
        loaded_group = _Group(count, header.generation)
        for i in range(count):
            loaded_group.put(i, *_GROUP_ENTRY.unpack_from(body, i * _GROUP_ENTRY.size)[:3])
        return loaded_group

    def _settle(self, page: int) -> None:
        """A page whose group was written by a save that never reached index.bin: take its file as it is."""
        group = self._groups[page // GROUP_PAGES]
        loaded = self._read(self._page_path(page), self.magic, f"{self.what} page {page}", self._regions_in(page))
        if loaded is None:  # the save created the page and stopped before writing it
            group.put(page % GROUP_PAGES, 0, 0, 0)
        else:
            header, raw = loaded
            _, present, nonzero = self._decode(page, raw)
            group.put(page % GROUP_PAGES, header.generation, present, nonzero)
        self._dirty_groups.add(page // GROUP_PAGES)
        self._index_dirty = True

    # -- format 1 -----------------------------------------------------------------------

    def _convert_format_1(self, writable: bool) -> None:
        names = os.listdir(self.directory)
        old = sorted(int(n[5:13]) for n in names if n.startswith("page-") and n.endswith(".bin"))
        newer = [n for n in names if n.startswith(("pg-", "group-"))]
        if newer and not old:
            raise CorruptStateFile(self._index_path, f"the {self.what} index is missing ({len(newer)} "
                                   "page and group files are left without it)")
        if not self.lazy and not old:
            raise CorruptStateFile(self._index_path, f"the {self.what} index is missing")
        if not writable:
            raise StateError(f"{self.directory}: the {self.what} is in format 1 (an older drtool); start "
                             f"`drtool serve --root {os.path.dirname(self._replica_dir())}` once on this host: "
                             "the server converts it when it opens the replica")
        expected = range(self.page_count) if not self.lazy else old
        for page in expected:
            _, body = mapfile.load(self._v1_path(page), self.magic, f"{self.what} page {page} (format 1)",
                                   self.geometry.region_size, self._regions_in(page), self.volume_id,
                                   _BITMAP_BYTES + 32 * self._regions_in(page))
            count = self._regions_in(page)
            present = int.from_bytes(body[:_BITMAP_BYTES], "little") & ((1 << count) - 1)  # format 1 set
            if not self.presence:  # bits past the end; a manifest keeps the regions that are not zeros
                present = (1 << count) - 1
                for index in _aligned(body[_BITMAP_BYTES:], NO_DIGEST, count):
                    present &= ~(1 << index)
            body[:_BITMAP_BYTES] = present.to_bytes(_BITMAP_BYTES, "little")
            if body != self._empty(page):
                self._own(page, body)
                self._flush_if_full()
        self._flags |= _V1_LEFT  # the index must be durable before the format-1 files go
        self._index_dirty = True
        self.save(0)
        self._remove_format_1()
        self.save(0)

    def _replica_dir(self) -> str:
        """The replica's directory (this table's parent, or its snapshot's)."""
        parent = os.path.dirname(self.directory)
        while os.path.basename(os.path.dirname(parent)) == "snapshots":
            parent = os.path.dirname(os.path.dirname(parent))
        return parent

    def _remove_format_1(self) -> None:
        if not self._flags & _V1_LEFT:
            return
        for name in os.listdir(self.directory):
            if name.startswith("page-") and name.endswith(".bin"):
                os.unlink(os.path.join(self.directory, name))
        self._flags &= ~_V1_LEFT
        self._index_dirty = True

    # -- files --------------------------------------------------------------------------

    def _read(self, path: str, magic: bytes, what: str, region_count: int) -> tuple[MapHeader, memoryview] | None:
        """A format-2 state file's header and body; None when the file does not exist."""
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CorruptStateFile(path, f"cannot read the {what}: {exc.strerror}") from None
        if len(data) < HEADER.size:
            raise CorruptStateFile(path, f"truncated {what} ({len(data)} bytes, header needs {HEADER.size})")
        got_magic, version, flags, rsize, rcount, generation, seq, vid, _ = HEADER.unpack_from(data)
        if got_magic != magic:
            raise CorruptStateFile(path, f"not a drtool {what} (magic {got_magic!r}, expected {magic!r})")
        if version != FORMAT:
            raise CorruptStateFile(path, f"{what} format version {version} is not supported (expected {FORMAT})")
        if vid != self.volume_id:
            raise CorruptStateFile(path, f"{what} belongs to another volume")
        if rsize != self.geometry.region_size or rcount != region_count:
            raise CorruptStateFile(path, f"{what} is for {rcount} regions of {rsize} bytes, expected "
                                   f"{region_count} of {self.geometry.region_size}")
        body = memoryview(data)[HEADER.size:]
        header = MapHeader(got_magic, version, rsize, rcount, generation, seq, vid)
        if flags or mapfile.encode(header, body)[0] != data[:HEADER.size]:
            raise CorruptStateFile(path, f"{what} checksum mismatch (torn write or damage)")
        return header, body

    def _file(self, path: str, magic: bytes, region_count: int, generation: int, seq: int,
              body: bytes) -> tuple[str, list[bytes]]:
        header = MapHeader(magic, FORMAT, self.geometry.region_size, region_count, generation, seq, self.volume_id)
        return path, mapfile.encode(header, body)

    # -- pages --------------------------------------------------------------------------

    def _group(self, group: int) -> _Group:
        found = self._groups.get(group)
        if found is None:
            found = self._groups[group] = _Group(self._pages_in(group), 0)
        return found

    def _lookup(self, page: int) -> bytearray | None:
        """The page's body, or None when it was never written (all absent, all zeros).

        A body is changed in place and stays the page's body while it is cached
        or remembered as the last one looked up (only ``_own`` gives a page another).
        """
        last_page, body = self._last
        if last_page == page and body is not None:
            return body
        body = self._dirty.get(page)
        if body is None:
            with self._cache_lock:
                body = self._clean.get(page)
                if body is not None:
                    self._clean.move_to_end(page)
        if body is None:
            group = self._groups.get(page // GROUP_PAGES)
            generation = group.generation(page % GROUP_PAGES) if group is not None else 0
            if not generation:
                return None
            body = self._load_page(page, generation, group)  # type: ignore[arg-type]
            self._cache(page, body)
        self._last = (page, body)
        return body

    def _own(self, page: int, body: bytearray) -> None:
        """``body`` is the page's (changed) body from now on."""
        self._group(page // GROUP_PAGES)
        with self._cache_lock:
            self._clean.pop(page, None)
        self._dirty[page] = body
        self._last = (page, body)

    def _cache(self, page: int, body: bytearray) -> None:
        with self._cache_lock:
            self._clean[page] = body
            self._clean.move_to_end(page)
            while len(self._clean) > CACHE_PAGES:
                self._clean.popitem(last=False)

    def _load_page(self, page: int, generation: int, group: _Group) -> bytearray:
        path = self._page_path(page)
        loaded = self._read(path, self.magic, f"{self.what} page {page}", self._regions_in(page))
        if loaded is None:
            raise CorruptStateFile(path, f"the {self.what} page {page} is missing (the index lists it at "
                                   f"generation {generation})")
        header, raw = loaded
        if header.generation != generation:
            raise CorruptStateFile(path, f"{self.what} page {page} is of generation {header.generation}, the "
                                   f"index says {generation} (a stale or foreign copy)")
        body, *counts = self._decode(page, raw)
        if tuple(counts) != group.counts(page % GROUP_PAGES):
            raise CorruptStateFile(path, f"{self.what} page {page} holds {counts[0]} present and {counts[1]} "
                                   f"non-zero regions, its group says {group.counts(page % GROUP_PAGES)}")
        return body

    def _decode(self, page: int, raw: memoryview) -> tuple[bytearray, int, int]:
        """The page's body from its stored form, and its (present, non-zero) counts."""
        regions = self._regions_in(page)
        body = self._empty(page)
        present, nonzero = raw[:_BITMAP_BYTES], raw[_BITMAP_BYTES:2 * _BITMAP_BYTES]
        present_int, nonzero_int = int.from_bytes(present, "little"), int.from_bytes(nonzero, "little")
        count = nonzero_int.bit_count()
        if (len(raw) != 2 * _BITMAP_BYTES + 32 * count or nonzero_int & ~present_int
                or present_int >> regions):
            raise CorruptStateFile(self._page_path(page), f"{self.what} page {page} is malformed "
                                   f"({len(raw)} bytes for {count} digests)")
        body[:_BITMAP_BYTES] = present
        counts = present_int.bit_count(), count
        if count == regions:
            body[_BITMAP_BYTES:] = raw[2 * _BITMAP_BYTES:]
            return body, *counts
        at = 2 * _BITMAP_BYTES
        for byte_index, byte in enumerate(nonzero):
            if byte:
                for bit in _BITS[byte]:
                    start = _BITMAP_BYTES + 32 * (byte_index * 8 + bit)
                    body[start:start + 32] = raw[at:at + 32]
                    at += 32
        return body, *counts

    def _changing(self, page: int) -> bytearray:
        """The page's body, to be changed (a page never written starts empty)."""
        body = self._dirty.get(page)
        if body is None:
            body = self._lookup(page)
            self._own(page, self._empty(page) if body is None else body)
            body = self._dirty[page]
        return body

    # -- regions ------------------------------------------------------------------------

    def present(self, region: int) -> bool:
        body = self._lookup(region >> _PAGE_SHIFT)
        index = region & (PAGE_REGIONS - 1)
        return body is not None and bool(body[index >> 3] & (1 << (index & 7)))

    def stored(self, region: int) -> bytes:
        """The raw slot: NO_DIGEST for an all-zero region."""
        body = self._lookup(region >> _PAGE_SHIFT)
        if body is None:
            return NO_DIGEST
        start = _BITMAP_BYTES + 32 * (region & (PAGE_REGIONS - 1))
        return bytes(body[start:start + 32])

    def digest(self, region: int) -> bytes:
        slot = self.stored(region)
        return zero_digest(self.geometry.region_length(region)) if slot == NO_DIGEST else slot

    def is_zero(self, region: int) -> bool:
        return self.stored(region) == NO_DIGEST

    def set(self, region: int, digest: bytes) -> None:
        """Mark ``region`` present with ``digest`` (the real blake3; zeros are stored as NO_DIGEST)."""
        if digest == zero_digest(self.geometry.region_length(region)):
            digest = NO_DIGEST
        page, index = divmod(region, PAGE_REGIONS)
        if digest == NO_DIGEST and not self.presence:
            if self.present(region):
                self.discard(region)
            return
        body = self._changing(page)
        body[index >> 3] |= 1 << (index & 7)
        start = _BITMAP_BYTES + 32 * index
        body[start:start + 32] = digest
        self._flush_if_full()

    def discard(self, region: int) -> bool:
        """Mark ``region`` absent; returns whether it was present."""
        if not self.present(region):
            return False
        page, index = divmod(region, PAGE_REGIONS)
        body = self._changing(page)
        body[index >> 3] &= ~(1 << (index & 7)) & 0xFF
        start = _BITMAP_BYTES + 32 * index
        body[start:start + 32] = NO_DIGEST
        self._flush_if_full()
        return True

    def fill_from(self, read: Callable[[int], bytes]) -> None:
        """Start over with every region's digest from the next 32 bytes of ``read(n)`` (an adopted manifest).

        Regions whose digest is that of zeros stay absent (they read as zeros, as
        a manifest's absent regions do), the others are present; a page of zeros
        is not written at all.  Saved here, page by page, in bounded memory.
        """
        os.makedirs(self.directory, exist_ok=True)
        self.create()
        for page in range(self.page_count):
            count = self._regions_in(page)
            digests = read(32 * count)
            zero = self._zero_page(page)
            if digests == zero:
                continue
            body = self._empty(page)
            body[_BITMAP_BYTES:] = digests
            present = (1 << count) - 1
            for index in _aligned(digests, zero[:32], count):
                present &= ~(1 << index)
                body[_BITMAP_BYTES + 32 * index:_BITMAP_BYTES + 32 * index + 32] = NO_DIGEST
            if page == self._last_page and self.geometry.last_region_length != self.geometry.region_size:
                # The partial last region's zeros have their own digest (the loop above took the full one's).
                index = count - 1
                mine = digests[32 * index:32 * index + 32]
                if mine == zero[32 * index:32 * index + 32]:
                    present &= ~(1 << index)
                    body[_BITMAP_BYTES + 32 * index:_BITMAP_BYTES + 32 * index + 32] = NO_DIGEST
                else:
                    present |= 1 << index
                    body[_BITMAP_BYTES + 32 * index:_BITMAP_BYTES + 32 * index + 32] = mine
            body[:_BITMAP_BYTES] = present.to_bytes(_BITMAP_BYTES, "little")
            self._own(page, body)
            self._flush_if_full()
        self.save(0)

    @property
    def _last_page(self) -> int:
        return self.page_count - 1

    def _zero_page(self, page: int) -> bytes:
        """The real digests of an all-zero page (what ``digests_of_page`` answers for a page never written)."""
        last = page == self._last_page
        found = self._zero_pages.get(last)
        if found is None:
            count = self._regions_in(page)
            found = zero_digest(self.geometry.region_size) * count
            if last:
                found = found[:-32] + zero_digest(self.geometry.last_region_length)
            self._zero_pages[last] = found
        return found

    def digests_of_page(self, page: int) -> bytes:
        """The real blake3 of every region of ``page`` (zero regions included), 32 bytes each."""
        body = self._lookup(page)
        if body is None:
            return self._zero_page(page)
        raw = bytes(memoryview(body)[_BITMAP_BYTES:])
        if NO_DIGEST not in raw:  # (a match across slots only costs the slow path)
            return raw
        out = bytearray(raw)
        zero = self._zero_page(page)
        for index in _aligned(raw, NO_DIGEST, self._regions_in(page)):
            out[32 * index:32 * index + 32] = zero[32 * index:32 * index + 32]
        return bytes(out)

    # -- saving -------------------------------------------------------------------------

    def _flush_if_full(self) -> None:
        if len(self._dirty) >= MAX_DIRTY_PAGES:
            self._flush(self._generation + 1, 0)

    def _flush(self, generation: int, seq: int) -> None:
        """Write the changed pages (their groups first) as part of save ``generation``."""
        if not self._dirty:
            return
        encoded: dict[int, bytes] = {}
        for page, body in self._dirty.items():
            raw, present, nonzero = _encode(body)
            group = page // GROUP_PAGES
            if present or nonzero:
                encoded[page] = raw
                self._groups[group].put(page % GROUP_PAGES, generation, present, nonzero)
                self._unlink.discard(page)
            else:  # emptied: the page is "never written" again
                self._groups[group].put(page % GROUP_PAGES, 0, 0, 0)
                self._unlink.add(page)
            self._dirty_groups.add(group)
        self._write_groups(generation, seq)
        _replace_all(self.directory, [self._file(self._page_path(page), self.magic, self._regions_in(page),
                                                 generation, seq, encoded[page]) for page in sorted(encoded)])
        for page, body in self._dirty.items():
            if page in encoded:
                self._cache(page, body)
        self._dirty.clear()
        self._index_dirty = True

    def _write_groups(self, generation: int, seq: int) -> None:
        groups = sorted(self._dirty_groups)
        _replace_all(self.directory, [self._file(self._group_path(group), self._group_magic,
                                                 self._groups[group].count * PAGE_REGIONS, generation, seq,
                                                 self._groups[group].encode()) for group in groups])
        for group in groups:
            self._groups[group].file_generation = generation
        self._dirty_groups.clear()

    def save(self, seq: int) -> None:
        """Write what changed since the last save: groups, pages, then the index (the commit)."""
        if not (self._dirty or self._dirty_groups or self._index_dirty):
            return
        generation = self._generation + 1
        self._flush(generation, seq)
        self._write_groups(generation, seq)
        listed = sorted(g for g, entries in self._groups.items() if entries.file_generation)
        body = bytearray(_ROOT_HEAD.pack(self._flags, len(listed)))
        for group in listed:
            body += _ROOT_ENTRY.pack(group, 0, self._groups[group].file_generation)
        _replace_all(self.directory, [self._file(self._index_path, self._index_magic, self.geometry.count,
                                                 generation, seq, bytes(body))])
        self._generation = generation
        self._index_dirty = False
        for page in sorted(self._unlink):
            try:
                os.unlink(self._page_path(page))
            except FileNotFoundError:
                pass
        self._unlink.clear()

    # -- whole-table questions, answered from the index ----------------------------------

    def _stored_pages(self) -> list[int]:
        pages = set(self._dirty)
        for group, entries in self._groups.items():
            pages.update(group * GROUP_PAGES + i for i in entries.written())
        return sorted(pages)

    def _stored_bodies(self, first: int, end: int) -> Iterator[tuple[int, int, bytearray]]:
        """(page, its first region, its body) of the pages ever written that overlap [first, end)."""
        for page in self._stored_pages():
            base = page * PAGE_REGIONS
            if base + PAGE_REGIONS <= first:
                continue
            if base >= end:
                return
            body = self._lookup(page)
            if body is not None:
                yield page, base, body

    def iter_present(self, first: int = 0, end: int | None = None) -> Iterator[int]:
        """Present regions in [first, end), in order; reads only the pages ever written there."""
        end = self.geometry.count if end is None else min(end, self.geometry.count)
        for _page, base, body in self._stored_bodies(first, end):
            for byte_index, byte in enumerate(body[:_BITMAP_BYTES]):
                if byte:
                    for bit in _BITS[byte]:
                        region = base + byte_index * 8 + bit
                        if first <= region < end:
                            yield region

    def iter_nonzero(self, first: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(region, digest) of every region in [first, end) whose slot is not the all-zero one, in
        order; reads only the pages ever written there (a manifest as wire entries)."""
        end = self.geometry.count if end is None else min(end, self.geometry.count)
        for page, base, body in self._stored_bodies(first, end):
            view = memoryview(body)[_BITMAP_BYTES:]
            for index in range(max(first - base, 0), min(self._regions_in(page), end - base)):
                slot = view[32 * index:32 * index + 32]
                if slot != NO_DIGEST:
                    yield base + index, bytes(slot)

    def fill_entries(self, entries: Iterable[tuple[int, bytes]]) -> None:
        """Start over with these (region, digest) entries (an adopted manifest); every other
        region is all zeros.  Pages are written as they fill: bounded memory."""
        os.makedirs(self.directory, exist_ok=True)
        self.create()
        for region, digest in entries:
            self.set(region, digest)
        self.save(0)

    def present_regions(self) -> list[int]:
        return list(self.iter_present())

    def present_runs(self) -> list[Run]:
        return to_runs(self.iter_present())

    def _totals(self) -> tuple[int, int]:
        present = nonzero = 0
        for group, entries in self._groups.items():
            present += sum(entries.present)
            nonzero += sum(entries.nonzero)
        for page, body in self._dirty.items():  # not saved yet: count what they hold now
            group = self._groups[page // GROUP_PAGES]
            old_present, old_nonzero = group.counts(page % GROUP_PAGES)
            new_present, new_nonzero = _counts(body)
            present += new_present - old_present
            nonzero += new_nonzero - old_nonzero
        return present, nonzero

    def present_count(self) -> int:
        """Regions present, from the groups' counts (no page is read)."""
        return self._totals()[0]

    def zero_count(self) -> int:
        """Regions whose slot says all zeros (for the manifest: never written or zeroed); no page is read."""
        return self.geometry.count - self._totals()[1]


_SYNCERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="drtool-tables")


def _replace_all(directory: str, files: list[tuple[str, list[bytes]]]) -> None:
    """Replace each file (all in ``directory``) so a crash leaves either its old or its new content.

    Temporary files are written and fsync'ed in parallel (the file system
    commits concurrent fsyncs together), then renamed in the order given, then
    the directory is fsync'ed once: one flush per file plus one, not two per file.
    """
    if not files:
        return
    pid = os.getpid()

    def write(item: tuple[str, list[bytes]]) -> str:
        path, chunks = item
        tmp = f"{path}.tmp.{pid}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    try:
        tmps = [write(files[0])] if len(files) == 1 else list(_SYNCERS.map(write, files))
        for tmp, (path, _) in zip(tmps, files):
            _rename(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        for path, _ in files:
            try:
                os.unlink(f"{path}.tmp.{pid}")
            except OSError:
                pass
        where = files[0][0] if len(files) == 1 else f"{len(files)} files in {directory}"
        if exc.errno == errno.ENOSPC:
            raise StateError(f"no space left to write {where}; the previous versions are intact") from exc
        raise StateError(f"cannot write {where}: {exc.strerror}") from exc


def _rename(tmp: str, path: str) -> None:
    os.replace(tmp, path)


class _Group:
    """The entries of one group file: per page, its file's generation and its counts."""

    def __init__(self, count: int, file_generation: int) -> None:
        self.count = count
        self.file_generation = file_generation  # 0: not written yet
        self.generations = array("Q", bytes(8 * count))
        self.present = array("H", bytes(2 * count))
        self.nonzero = array("H", bytes(2 * count))

    def put(self, index: int, generation: int, present: int, nonzero: int) -> None:
        self.generations[index], self.present[index], self.nonzero[index] = generation, present, nonzero

    def generation(self, index: int) -> int:
        return self.generations[index]

    def counts(self, index: int) -> tuple[int, int]:
        return self.present[index], self.nonzero[index]

    def written(self) -> Iterator[int]:
        return (i for i, generation in enumerate(self.generations) if generation)

    def newer_than(self, generation: int, group: int) -> list[int]:
        """Pages this group says a save after ``generation`` wrote (a save the index never committed)."""
        return [group * GROUP_PAGES + i for i, g in enumerate(self.generations) if g > generation]

    def encode(self) -> bytes:
        return b"".join(_GROUP_ENTRY.pack(self.generations[i], self.present[i], self.nonzero[i], 0)
                        for i in range(self.count))


def _aligned(raw: bytes | bytearray, slot: bytes, count: int) -> Iterator[int]:
    """Indexes of the 32-byte slots of ``raw`` equal to ``slot``."""
    position = raw.find(slot)
    while position != -1:
        if position % 32:
            position = raw.find(slot, position + 32 - position % 32)
            continue
        if position // 32 >= count:
            return
        yield position // 32
        position = raw.find(slot, position + 32)


def _counts(body: bytearray) -> tuple[int, int]:
    """(present, non-zero) slots of a page body."""
    return int.from_bytes(body[:_BITMAP_BYTES], "little").bit_count(), len(_nonzero_slots(body))


def _nonzero_slots(body: bytearray) -> list[int]:
    """The slots of a page body that hold a digest other than zeros, in order."""
    slots = (len(body) - _BITMAP_BYTES) // 32
    bitmap = body[:_BITMAP_BYTES]
    if int.from_bytes(bitmap, "little").bit_count() * 4 < slots:
        # Sparse: look at the present slots only (a slot that is not present holds zeros).
        view = memoryview(body)
        found = []
        for byte_index, byte in enumerate(bitmap):
            if byte:
                for bit in _BITS[byte]:
                    start = _BITMAP_BYTES + 32 * (byte_index * 8 + bit)
                    if view[start:start + 32] != NO_DIGEST:
                        found.append(byte_index * 8 + bit)
        return found
    zero = set(_aligned(body[_BITMAP_BYTES:], NO_DIGEST, slots))
    return [index for index in range(slots) if index not in zero] if zero else list(range(slots))


def _encode(body: bytearray) -> tuple[bytes, int, int]:
    """A page body as stored: presence bitmap, non-zero bitmap, the non-zero digests; and its counts."""
    view = memoryview(body)
    slots = (len(body) - _BITMAP_BYTES) // 32
    nonzero = _nonzero_slots(body)
    if len(nonzero) == slots:
        bits = ((1 << slots) - 1).to_bytes(_BITMAP_BYTES, "little")
        packed = bytes(view[_BITMAP_BYTES:])
    else:
        marks = bytearray(_BITMAP_BYTES)
        for index in nonzero:
            marks[index >> 3] |= 1 << (index & 7)
        bits = bytes(marks)
        packed = b"".join(view[_BITMAP_BYTES + 32 * index:_BITMAP_BYTES + 32 * index + 32] for index in nonzero)
    present = int.from_bytes(view[:_BITMAP_BYTES], "little").bit_count()
    return bytes(view[:_BITMAP_BYTES]) + bits + packed, present, len(nonzero)
