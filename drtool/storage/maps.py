"""Region maps: bitmaps, the era map and the manifest, paged.

Each map is an array over the volume's regions cut into pages of
:data:`~drtool.storage.pagestore.PAYLOAD` bytes.  A map reads and changes its pages
through a :class:`Pages` source: a volume's :class:`~drtool.storage.pagestore.PageStore`
(on disk, cached, committed by the volume) or :class:`MemoryPages` (a scratch map, such
as a plan's set of regions).  Memory follows the pages touched, not the volume's size.

Every map's default is a page of zeros, so a page never written costs nothing:

- the manifest stores 32 zero bytes for "this region is all zeros" (the real digest
  of zeros is :func:`zero_digest`; a blake3 digest of all zero bytes does not happen);
- the era map stores era 0 for "not written since the volume was registered";
- a bitmap keeps, per chunk of ``CHUNK_BITS`` regions (one page), the number of set
  bits (a summary array, itself paged); a chunk whose count is 0 or full needs no
  page at all ("run" containers, as roaring bitmaps have), so ``set_all`` and
  ``clear_all`` write a handful of summary pages, whatever the size.
"""

from __future__ import annotations

import heapq
import re
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from typing import Protocol

import blake3

from drtool.regions import Run
from drtool.storage.pagestore import PAYLOAD

DIGEST_SIZE = 32
NO_DIGEST = bytes(DIGEST_SIZE)
DIGESTS_PER_PAGE = PAYLOAD // DIGEST_SIZE  # 127
ERAS_PER_PAGE = PAYLOAD // 4  # 1016
COUNTS_PER_PAGE = PAYLOAD // 4  # 1016
CHUNK_BITS = PAYLOAD * 8  # 32512 regions a bitmap page
BLOCK_SIZE = 4096  # the unit a block digest covers (the page size clients read in)
BLOCK_DIGEST_SIZE = 16
NO_BLOCK_DIGEST = bytes(BLOCK_DIGEST_SIZE)
_ZERO_BLOCK = bytes(BLOCK_SIZE)
BLOCK_DIGESTS_PER_PAGE = PAYLOAD // BLOCK_DIGEST_SIZE  # 254
_ERA = struct.Struct("<I")
_NONZERO = re.compile(rb"[^\x00]+", re.DOTALL)
_FULL_BYTES = re.compile(rb"\xff+")
_LITTLE = sys.byteorder == "little"


def _pages_for(count: int, per_page: int) -> int:
    return (count + per_page - 1) // per_page


class Pages(Protocol):
    """Where a map's pages live (PageStore or MemoryPages)."""

    def page(self, page_no: int) -> bytearray: ...

    def page_for_write(self, page_no: int) -> bytearray: ...

    def written_pages(self, first: int, end: int) -> Iterator[int]: ...


class MemoryPages:
    """Pages in a dict: a scratch map's storage (a page never touched reads as zeros)."""

    def __init__(self) -> None:
        self._pages: dict[int, bytearray] = {}

    def page(self, page_no: int) -> bytearray:
        return self._pages.get(page_no) or bytearray(PAYLOAD)

    def page_for_write(self, page_no: int) -> bytearray:
        buf = self._pages.get(page_no)
        if buf is None:
            buf = self._pages[page_no] = bytearray(PAYLOAD)
        return buf

    def discard(self, page_no: int) -> None:
        self._pages.pop(page_no, None)

    def written_pages(self, first: int, end: int) -> Iterator[int]:
        return iter(sorted(p for p in self._pages if first <= p < end))


class Layout:
    """Where each map's pages start in a volume's page store (page 0 is the superblock).

    The block digests come last: a store written before they existed has no pages there
    (reads as zeros: "unknown"), so adding them changed no other map's place.  A map added
    later goes after them, for the same reason."""

    def __init__(self, count: int, bitmap_kinds: Iterable[str], region_size: int = 0) -> None:
        self.count = count
        position = 1
        self.manifest = position
        position += _pages_for(count, DIGESTS_PER_PAGE)
        self.eras = position
        era_pages = _pages_for(count, ERAS_PER_PAGE)
        position += era_pages
        self.era_summary = position
        position += _pages_for(era_pages, ERAS_PER_PAGE)
        chunks = _pages_for(count, CHUNK_BITS)
        self.bitmaps: dict[str, tuple[int, int]] = {}
        for kind in bitmap_kinds:
            self.bitmaps[kind] = (position, position + chunks)  # (chunk pages, summary pages)
            position += chunks + _pages_for(chunks, COUNTS_PER_PAGE)
        self.blocks = position
        block_count = count * blocks_per_region(region_size)
        position += _pages_for(block_count, BLOCK_DIGESTS_PER_PAGE)
        # The overlay's block map (issue 12's sub-region tracking): one bit per block, then one
        # digest per block.  After the block digests, for the same reason as they are last.
        block_chunks = _pages_for(block_count, CHUNK_BITS)
        self.overlay_blocks = (position, position + block_chunks)  # (chunk pages, summary pages)
        position += block_chunks + _pages_for(block_chunks, COUNTS_PER_PAGE)
        self.overlay_digests = position
        position += _pages_for(block_count, BLOCK_DIGESTS_PER_PAGE)
        self.pages = position


class RegionBitmap:
    """One bit per region, in chunks of CHUNK_BITS regions with a count of set bits each.

    ``RegionBitmap(count)`` is a scratch bitmap in memory; a volume's bitmaps are given
    their store's pages.  A chunk's page is only read when its count is neither 0 nor full.
    """

    __slots__ = ("count", "_pages", "_first", "_summary", "_counts", "_total", "_dirty_counts", "_memory")

    def __init__(self, count: int, pages: Pages | None = None, first_page: int = 0,
                 summary_page: int | None = None) -> None:
        self.count = count
        chunks = _pages_for(count, CHUNK_BITS)
        self._memory = pages is None
        self._pages: Pages = MemoryPages() if pages is None else pages
        self._first = first_page
        self._summary = summary_page
        self._dirty_counts: set[int] = set()
        if summary_page is None:
            self._counts = array("I", bytes(4 * chunks))
        else:
            self._counts = _load_counts(self._pages, summary_page, chunks)
            # Every chunk holds CHUNK_BITS regions but the last: two checks, not one a chunk.
            if chunks and (max(self._counts) > CHUNK_BITS or self._counts[-1] > self._valid(chunks - 1)):
                chunk = next(c for c, value in enumerate(self._counts) if value > self._valid(c))
                raise ValueError(f"bitmap summary says chunk {chunk} has {self._counts[chunk]} set bits, "
                                 "more than it holds")
        self._total = sum(self._counts)

    # -- chunks ---------------------------------------------------------------------

    def _valid(self, chunk: int) -> int:
        return min(CHUNK_BITS, self.count - chunk * CHUNK_BITS)

    def _set_count(self, chunk: int, value: int) -> None:
        self._total += value - self._counts[chunk]
        self._counts[chunk] = value
        self._dirty_counts.add(chunk // COUNTS_PER_PAGE)
        if self._memory and (value == 0 or value == self._valid(chunk)):
            self._pages.discard(self._first + chunk)  # type: ignore[attr-defined]

    def _implied(self, chunk: int) -> bytes | None:
        """The chunk's bits when its count alone says them (empty or full), else None."""
        value = self._counts[chunk]
        if value == 0:
            return bytes(PAYLOAD)
        valid = self._valid(chunk)
        if value == valid:
            full, rest = divmod(valid, 8)
            return b"\xff" * full + (bytes([(1 << rest) - 1]) if rest else b"") + bytes(PAYLOAD - full - (1 if rest else 0))
        return None

    def _chunk_bytes(self, chunk: int) -> bytes | bytearray:
        implied = self._implied(chunk)
        return implied if implied is not None else self._pages.page(self._first + chunk)

    def _writable(self, chunk: int) -> bytearray:
        implied = self._implied(chunk)
        buf = self._pages.page_for_write(self._first + chunk)
        if implied is not None:
            buf[:] = implied
        return buf

    def save_counts(self) -> None:
        """Copy the changed part of the summary into its pages (before the store commits)."""
        if self._summary is None:
            self._dirty_counts.clear()
            return
        for summary in sorted(self._dirty_counts):
            values = self._counts[summary * COUNTS_PER_PAGE:(summary + 1) * COUNTS_PER_PAGE]
            if not _LITTLE:
                values.byteswap()
            raw = values.tobytes()
            buf = self._pages.page_for_write(self._summary + summary)
            buf[:len(raw)] = raw
        self._dirty_counts.clear()

    # -- single regions ---------------------------------------------------------------

    def __contains__(self, region: int) -> bool:
        return self.test(region)

    def test(self, region: int) -> bool:
        chunk, bit = divmod(region, CHUNK_BITS)
        value = self._counts[chunk]
        if value == 0:
            return False
        if value == CHUNK_BITS or value == self._valid(chunk):
            return True
        return bool(self._pages.page(self._first + chunk)[bit >> 3] >> (bit & 7) & 1)

    def set(self, region: int) -> None:
        chunk, bit = divmod(region, CHUNK_BITS)
        value = self._counts[chunk]
        if value == self._valid(chunk):
            return
        buf = self._writable(chunk) if value == 0 else self._pages.page(self._first + chunk)
        mask = 1 << (bit & 7)
        if buf[bit >> 3] & mask:
            return
        buf = self._pages.page_for_write(self._first + chunk)
        buf[bit >> 3] |= mask
        self._set_count(chunk, value + 1)

    def clear(self, region: int) -> None:
        chunk, bit = divmod(region, CHUNK_BITS)
        value = self._counts[chunk]
        if value == 0:
            return
        if value == self._valid(chunk):
            buf = self._writable(chunk)
        else:
            buf = self._pages.page(self._first + chunk)
        mask = 1 << (bit & 7)
        if not buf[bit >> 3] & mask:
            return
        buf = self._pages.page_for_write(self._first + chunk)
        buf[bit >> 3] &= ~mask & 0xFF
        self._set_count(chunk, value - 1)

    # -- runs and the whole map ---------------------------------------------------------

    def set_run(self, first: int, count: int, value: bool = True) -> None:
        end = min(first + count, self.count)
        first = max(first, 0)
        while first < end:
            chunk = first // CHUNK_BITS
            base = chunk * CHUNK_BITS
            lo, hi = first - base, min(end - base, self._valid(chunk))
            if lo == 0 and hi == self._valid(chunk):
                self._set_count(chunk, hi if value else 0)
            elif self._counts[chunk] != (self._valid(chunk) if value else 0):
                buf = self._writable(chunk)
                _set_bits(buf, lo, hi, value)
                self._set_count(chunk, int.from_bytes(buf, "little").bit_count())
            first = base + hi

    def clear_run(self, first: int, count: int) -> None:
        self.set_run(first, count, False)

    def update(self, regions: Iterable[int], value: bool = True) -> None:
        for region in regions:
            self.set(region) if value else self.clear(region)

    def set_runs(self, runs: Iterable[Run], value: bool = True) -> None:
        for first, count in runs:
            self.set_run(first, count, value)

    def clear_all(self) -> None:
        self.set_run(0, self.count, False)

    def set_all(self) -> None:
        self.set_run(0, self.count, True)

    def any(self) -> bool:
        return self._total > 0

    def popcount(self) -> int:
        return self._total

    def count_in(self, first: int, count: int) -> int:
        return sum(1 for _ in self.set_between(first, first + count))

    def __iter__(self) -> Iterator[int]:
        """The set regions, ascending."""
        return self.set_between(0, self.count)

    def _busy_chunks(self, first_chunk: int, end_chunk: int) -> Iterator[int]:
        counts = self._counts
        for chunk in range(first_chunk, end_chunk):
            if counts[chunk]:
                yield chunk

    def set_between(self, first: int, end: int) -> Iterator[int]:
        """The set regions in [first, end), ascending (empty chunks and zero bytes skipped)."""
        first, end = max(first, 0), min(end, self.count)
        if first >= end:
            return
        for chunk in self._busy_chunks(first // CHUNK_BITS, (end - 1) // CHUNK_BITS + 1):
            base = chunk * CHUNK_BITS
            lo, hi = max(first, base), min(end, base + self._valid(chunk))
            if self._counts[chunk] == self._valid(chunk):
                yield from range(lo, hi)
                continue
            bits = self._pages.page(self._first + chunk)
            for match in _NONZERO.finditer(bits, (lo - base) >> 3, (hi - base + 7) >> 3):
                for index in range(match.start(), match.end()):
                    byte = bits[index]
                    while byte:
                        low = byte & -byte
                        region = base + (index << 3) + low.bit_length() - 1
                        if lo <= region < hi:
                            yield region
                        byte ^= low

    def runs(self) -> list[Run]:
        """The set regions as sorted runs; whole chunks and whole bytes at C speed."""
        runs: list[list[int]] = []

        def add(first: int, count: int) -> None:
            if runs and runs[-1][0] + runs[-1][1] == first:
                runs[-1][1] += count
            else:
                runs.append([first, count])

        for chunk in self._busy_chunks(0, len(self._counts)):
            base = chunk * CHUNK_BITS
            if self._counts[chunk] == self._valid(chunk):
                add(base, self._valid(chunk))
                continue
            bits = self._pages.page(self._first + chunk)
            for match in _NONZERO.finditer(bits):
                index = match.start()
                while index < match.end():
                    full = _FULL_BYTES.match(bits, index, match.end())
                    if full:
                        add(base + (index << 3), (full.end() - index) << 3)
                        index = full.end()
                        continue
                    byte = bits[index]
                    for bit in range(8):
                        if byte >> bit & 1:
                            add(base + (index << 3) + bit, 1)
                    index += 1
        return [(first, count) for first, count in runs]

    def copy(self) -> RegionBitmap:
        """A scratch copy."""
        out = RegionBitmap(self.count)
        for chunk in self._busy_chunks(0, len(self._counts)):
            out._put(chunk, self._chunk_bytes(chunk), self._counts[chunk])
        return out

    def _put(self, chunk: int, bits: bytes | bytearray, value: int) -> None:
        if 0 < value < self._valid(chunk):
            self._pages.page_for_write(self._first + chunk)[:] = bits
        self._set_count(chunk, value)

    def difference(self, other: RegionBitmap) -> RegionBitmap:
        """Regions set here and not in ``other``, as a scratch bitmap."""
        return self._combine(other, lambda a, b: a & ~b, keep_if_other_empty=True)

    def intersection(self, other: RegionBitmap) -> RegionBitmap:
        """Regions set in both, as a scratch bitmap."""
        return self._combine(other, lambda a, b: a & b, keep_if_other_empty=False)

    def union(self, other: RegionBitmap) -> RegionBitmap:
        """Regions set in either, as a scratch bitmap."""
        out = self.copy()
        for chunk in other._busy_chunks(0, len(other._counts)):
            if out._counts[chunk] == 0:
                out._put(chunk, other._chunk_bytes(chunk), other._counts[chunk])
            elif out._counts[chunk] != out._valid(chunk):
                value = int.from_bytes(out._chunk_bytes(chunk), "little") | int.from_bytes(other._chunk_bytes(chunk), "little")
                out._put(chunk, value.to_bytes(PAYLOAD, "little"), value.bit_count())
        return out

    def _combine(self, other: RegionBitmap, op, keep_if_other_empty: bool) -> RegionBitmap:
        """Chunk by chunk; an empty or full chunk on either side is settled by its count."""
        out = RegionBitmap(self.count)
        for chunk in self._busy_chunks(0, len(self._counts)):
            theirs = other._counts[chunk]
            mine_full = self._counts[chunk] == self._valid(chunk)
            if theirs == 0 or theirs == other._valid(chunk):
                other_full = theirs != 0
                if other_full != keep_if_other_empty:  # the result is this chunk as it is
                    out._put(chunk, self._chunk_bytes(chunk), self._counts[chunk])
                continue
            if mine_full and not keep_if_other_empty:  # full & theirs = theirs
                out._put(chunk, other._chunk_bytes(chunk), theirs)
                continue
            value = op(int.from_bytes(self._chunk_bytes(chunk), "little"),
                       int.from_bytes(other._chunk_bytes(chunk), "little"))
            out._put(chunk, value.to_bytes(PAYLOAD, "little"), value.bit_count())
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RegionBitmap) or other.count != self.count:
            return False
        if self._counts != other._counts:
            return False
        return all(bytes(self._chunk_bytes(c)) == bytes(other._chunk_bytes(c))
                   for c in self._busy_chunks(0, len(self._counts)))

    __hash__ = None  # type: ignore[assignment]


def _set_bits(buf: bytearray, lo: int, hi: int, value: bool) -> None:
    """Bits [lo, hi) of ``buf`` to ``value``."""
    while lo < hi and lo & 7:
        _bit(buf, lo, value)
        lo += 1
    while hi > lo and hi & 7:
        hi -= 1
        _bit(buf, hi, value)
    if hi > lo:
        buf[lo >> 3:hi >> 3] = (b"\xff" if value else b"\x00") * ((hi - lo) >> 3)


def _bit(buf: bytearray, index: int, value: bool) -> None:
    if value:
        buf[index >> 3] |= 1 << (index & 7)
    else:
        buf[index >> 3] &= ~(1 << (index & 7)) & 0xFF


def _load_counts(pages: Pages, summary_page: int, chunks: int) -> array:
    counts = array("I")
    for summary in range(_pages_for(chunks, COUNTS_PER_PAGE)):
        take = min(COUNTS_PER_PAGE, chunks - summary * COUNTS_PER_PAGE)
        counts.frombytes(bytes(pages.page(summary_page + summary)[:4 * take]))
    if not _LITTLE:
        counts.byteswap()
    return counts


class EraMap:
    """The era of each region's last write (as dm-era keeps it), 0 for "not since init".

    A summary page keeps the highest era of each era page, so "regions written in era E
    or later" reads only the pages that hold such regions."""

    __slots__ = ("count", "_pages", "_first", "_summary")

    def __init__(self, count: int, pages: Pages | None = None, first_page: int = 0,
                 summary_page: int | None = None) -> None:
        self.count = count
        self._pages: Pages = MemoryPages() if pages is None else pages
        self._first = first_page
        self._summary = summary_page if summary_page is not None else first_page + _pages_for(count, ERAS_PER_PAGE)

    def __getitem__(self, region: int) -> int:
        page, index = divmod(region, ERAS_PER_PAGE)
        return _ERA.unpack_from(self._pages.page(self._first + page), index * 4)[0]

    def __setitem__(self, region: int, era: int) -> None:
        page, index = divmod(region, ERAS_PER_PAGE)
        buf = self._pages.page(self._first + page)
        if _ERA.unpack_from(buf, index * 4)[0] == era:
            return
        _ERA.pack_into(self._pages.page_for_write(self._first + page), index * 4, era)
        summary, slot = divmod(page, ERAS_PER_PAGE)
        top = self._pages.page(self._summary + summary)
        if _ERA.unpack_from(top, slot * 4)[0] < era:
            _ERA.pack_into(self._pages.page_for_write(self._summary + summary), slot * 4, era)

    def changed_since(self, era: int, first: int = 0, end: int | None = None) -> Iterator[int]:
        """Regions in [first, end) whose last write happened in ``era`` or later, ascending."""
        end = self.count if end is None else min(end, self.count)
        first = max(first, 0)
        if first >= end:
            return
        if era <= 0:
            yield from range(first, end)
            return
        first_page, end_page = first // ERAS_PER_PAGE, (end - 1) // ERAS_PER_PAGE + 1
        for summary in range(first_page // ERAS_PER_PAGE, (end_page - 1) // ERAS_PER_PAGE + 1):
            tops = _eras_of(self._pages.page(self._summary + summary))
            base = summary * ERAS_PER_PAGE
            for slot in range(max(first_page - base, 0), min(end_page - base, ERAS_PER_PAGE)):
                if tops[slot] < era:
                    continue
                page = base + slot
                eras = _eras_of(self._pages.page(self._first + page))
                start = page * ERAS_PER_PAGE
                for index, value in enumerate(eras):
                    if value >= era and first <= start + index < end:
                        yield start + index


def _eras_of(buf: bytes | bytearray) -> array:
    values = array("I")
    values.frombytes(bytes(buf[:ERAS_PER_PAGE * 4]))
    if not _LITTLE:
        values.byteswap()
    return values


class Manifest:
    """The blake3 digest of what each region should contain (all zeros: stored as NO_DIGEST),
    and the owner of the regions' block digests (``blocks``): setting a region's digest is the
    one way to change them."""

    __slots__ = ("count", "_last_length", "_region_size", "_pages", "_first", "blocks")

    def __init__(self, count: int, region_size: int, last_length: int | None = None,
                 pages: Pages | None = None, first_page: int = 0, blocks_page: int | None = None) -> None:
        self.count = count
        self._region_size = region_size
        self._last_length = region_size if last_length is None else last_length
        self._pages: Pages = MemoryPages() if pages is None else pages
        self._first = first_page
        #: block digests live in the same page store (None: a scratch manifest keeps none)
        self.blocks: BlockDigests | None = None
        if blocks_page is not None and blocks_per_region(region_size):
            self.blocks = BlockDigests(count, region_size, self._pages, blocks_page)

    def _length(self, region: int) -> int:
        return self._last_length if region == self.count - 1 else self._region_size

    def stored(self, region: int) -> bytes:
        """The raw slot: NO_DIGEST for an all-zero region."""
        page, index = divmod(region, DIGESTS_PER_PAGE)
        start = index * DIGEST_SIZE
        return bytes(self._pages.page(self._first + page)[start:start + DIGEST_SIZE])

    def __getitem__(self, region: int) -> bytes:
        slot = self.stored(region)
        return zero_digest(self._length(region)) if slot == NO_DIGEST else slot

    def __setitem__(self, region: int, digest: bytes) -> None:
        self.set(region, digest)

    def set(self, region: int, digest: bytes, blocks: list[bytes] | None = None) -> None:
        """Set a region's digest.  A changed digest clears the region's block digests, unless
        ``blocks`` (:func:`block_digests` of the same bytes, keyed with ``digest``) replace
        them; an unchanged one keeps them (same bytes), or takes ``blocks`` when given."""
        zero = digest == zero_digest(self._length(region))
        stored = NO_DIGEST if zero else digest
        changed = self.stored(region) != stored
        if changed:
            page, index = divmod(region, DIGESTS_PER_PAGE)
            start = index * DIGEST_SIZE
            self._pages.page_for_write(self._first + page)[start:start + DIGEST_SIZE] = stored
        if self.blocks is not None and (changed or blocks is not None):
            # An all-zero region needs none: its blocks are checked against zeros.
            self.blocks._put(region, None if zero else blocks)

    def verify_block(self, region: int, block: int, data: bytes | bytearray | memoryview) -> bool:
        """Are ``data`` the bytes of block ``block`` of ``region`` (all of it, or the volume's
        short end)?  Against its block digest, compared in place; an all-zero region's blocks
        against zeros.  False also when the block digest is unknown (a zero slot matches no
        keyed digest): the caller then checks the region whole.  The one-block read's check."""
        page, index = divmod(region, DIGESTS_PER_PAGE)
        start = index * DIGEST_SIZE
        key = self._pages.page(self._first + page)[start:start + DIGEST_SIZE]
        if key == NO_DIGEST:
            return data == _ZERO_BLOCK[:len(data)]
        blocks = self.blocks
        page, at = divmod(region * blocks.per_region + block, BLOCK_DIGESTS_PER_PAGE)
        at *= BLOCK_DIGEST_SIZE
        digest = blake3.blake3(data, key=key).digest(BLOCK_DIGEST_SIZE)
        return self._pages.page(blocks._first + page).find(digest, at, at + BLOCK_DIGEST_SIZE) == at

    def remember_blocks(self, region: int, digest: bytes, blocks: list[bytes]) -> bool:
        """Keep block digests computed from bytes verified against ``digest``, if that is still
        the region's digest (a write may have changed it meanwhile: then nothing is kept)."""
        if self.blocks is None or not self.matches(region, digest) or self.is_zero(region):
            return False
        self.blocks._put(region, blocks)
        return True

    def matches(self, region: int, digest: bytes) -> bool:
        # On every verified read: compared in place (find with bounds copies nothing).
        page, index = divmod(region, DIGESTS_PER_PAGE)
        buf = self._pages.page(self._first + page)
        start = index * DIGEST_SIZE
        if buf.find(digest, start, start + DIGEST_SIZE) == start:
            return digest != NO_DIGEST
        if buf.find(NO_DIGEST, start, start + DIGEST_SIZE) == start:
            return digest == zero_digest(self._length(region))
        return False

    def matches_run(self, first: int, digests: list[bytes | None]) -> bool:
        """Do regions first, first+1, ... all have exactly these stored digests?  One compare per
        manifest page (scrub's common case); False says only "check them one by one" (a None,
        an all-zero region, a mismatch)."""
        at = 0
        while at < len(digests):
            page, index = divmod(first + at, DIGESTS_PER_PAGE)
            take = min(DIGESTS_PER_PAGE - index, len(digests) - at)
            part = digests[at:at + take]
            if None in part:
                return False
            buf = self._pages.page(self._first + page)
            start = index * DIGEST_SIZE
            if buf[start:start + take * DIGEST_SIZE] != b"".join(part):
                return False
            at += take
        return True

    def is_zero(self, region: int) -> bool:
        return self.stored(region) == NO_DIGEST

    def nonzero_between(self, first: int, end: int) -> Iterator[int]:
        """Regions in [first, end) whose content is not all zeros, ascending (pages never
        written are skipped without a read)."""
        first, end = max(first, 0), min(end, self.count)
        if first >= end:
            return
        first_page = first // DIGESTS_PER_PAGE
        end_page = (end - 1) // DIGESTS_PER_PAGE + 1
        for page_no in self._pages.written_pages(self._first + first_page, self._first + end_page):
            page = page_no - self._first
            buf = self._pages.page(page_no)
            base = page * DIGESTS_PER_PAGE
            last = -1
            for match in _NONZERO.finditer(buf):
                for index in range(max(match.start() // DIGEST_SIZE, last + 1), (match.end() - 1) // DIGEST_SIZE + 1):
                    region = base + index
                    last = index
                    if first <= region < end:
                        yield region


def blocks_per_region(region_size: int) -> int:
    """Block digests kept per region: none (0) when a region is one block already."""
    blocks = region_size // BLOCK_SIZE
    return blocks if blocks > 1 else 0


def block_digests(key: bytes, data: bytes | bytearray | memoryview) -> list[bytes]:
    """The block digests of one region's bytes ``data`` whose region digest is ``key``:
    blake3 keyed with the region digest, one per BLOCK_SIZE bytes (the last may be short),
    truncated to BLOCK_DIGEST_SIZE.  The key binds each block digest to the region content it
    was computed from: after the region changes (new digest), an old block digest matches no
    bytes, so a digest some path forgot to invalidate costs a whole-region check, never a
    wrong answer.  Callers must have verified ``data`` against ``key`` (or computed ``key``
    from it), which is what makes a block digest as trusted as the region digest."""
    view = memoryview(data).cast("B")
    hasher = blake3.blake3
    return [hasher(view[start:start + BLOCK_SIZE], key=key).digest(BLOCK_DIGEST_SIZE)
            for start in range(0, len(view), BLOCK_SIZE)]


class BlockDigests:
    """Sub-region digests: per region, one keyed digest per 4 KiB block (see
    :func:`block_digests`), so a small read verifies the blocks it returns instead of its
    whole region.  A slot of zeros is "unknown" (never written, invalidated, or a state from
    before block digests): the reader then checks the whole region, as it always did.

    Only :class:`Manifest` changes them: a new region digest clears the region's block
    digests unless fresh ones come with it (:meth:`Manifest.set`), so no path that sets a
    digest can leave stale ones behind.  Pages are only touched for regions that were read
    in small pieces; a volume read only in whole regions never writes one."""

    __slots__ = ("count", "per_region", "_pages", "_first")

    def __init__(self, count: int, region_size: int, pages: Pages | None = None, first_page: int = 0) -> None:
        self.count = count
        self.per_region = blocks_per_region(region_size)
        self._pages: Pages = MemoryPages() if pages is None else pages
        self._first = first_page

    def get(self, region: int, first_block: int, end_block: int) -> list[bytes] | None:
        """The digests of blocks [first_block, end_block) of ``region``; None when any of
        them is unknown."""
        out = []
        index = region * self.per_region + first_block
        for slot in range(index, index + end_block - first_block):
            page, at = divmod(slot, BLOCK_DIGESTS_PER_PAGE)
            at *= BLOCK_DIGEST_SIZE
            value = bytes(self._pages.page(self._first + page)[at:at + BLOCK_DIGEST_SIZE])
            if value == NO_BLOCK_DIGEST:
                return None
            out.append(value)
        return out

    def known(self, region: int) -> bool:
        """Are all of the region's block digests known?"""
        return self.get(region, 0, self.per_region) is not None

    def _put(self, region: int, values: list[bytes] | None) -> None:
        # A page's run of the region's slots at a time, compared and written as one slice (every
        # write of a region clears them: a slot at a time cost a write ~20 us of Python).
        per_region = self.per_region
        wanted = b"".join((values or [])[:per_region])
        wanted += NO_BLOCK_DIGEST * (per_region - len(wanted) // BLOCK_DIGEST_SIZE)
        slot, end = region * per_region, (region + 1) * per_region
        while slot < end:
            page, at = divmod(slot, BLOCK_DIGESTS_PER_PAGE)
            count = min(end - slot, BLOCK_DIGESTS_PER_PAGE - at)
            low, high = at * BLOCK_DIGEST_SIZE, (at + count) * BLOCK_DIGEST_SIZE
            done = (slot - region * per_region) * BLOCK_DIGEST_SIZE
            value = wanted[done:done + high - low]
            if self._pages.page(self._first + page)[low:high] != value:
                self._pages.page_for_write(self._first + page)[low:high] = value
            slot += count


def overlay_block_digest(data: bytes | bytearray | memoryview) -> bytes:
    """The digest the overlay's block map keeps for one block it holds: blake3 of its bytes,
    truncated as block digests are (unkeyed: the block's bytes are its whole content, whatever
    the region's digest is, which a partial region does not know yet)."""
    return blake3.blake3(data).digest(BLOCK_DIGEST_SIZE)


class OverlayBlocks:
    """Sub-region tracking of the overlay (as nbdkit's cow filter tracks blocks): which 4 KiB
    blocks of a region the overlay holds when it holds only some of them (a *partial* region),
    and each held block's digest (:func:`overlay_block_digest`).

    A partial region's content is its held blocks over its *base*: the bytes the manifest's
    digest describes (the manifest is not changed by a block write), which live where they
    would if the overlay did not hold the region (the device, or the replica when bad).  A
    region with no bit here and its overlay bit set is held whole, as before.  The bits are a
    :class:`RegionBitmap` over (region * blocks per region + block), so a volume without
    partial regions reads only its summary's counts."""

    __slots__ = ("per_region", "bits", "_pages", "_first")

    def __init__(self, count: int, region_size: int, pages: Pages | None = None, bits_page: int = 0,
                 summary_page: int | None = None, digests_page: int = 0) -> None:
        self.per_region = blocks_per_region(region_size)
        self.bits = RegionBitmap(count * self.per_region, pages, bits_page, summary_page)
        self._pages: Pages = self.bits._pages
        self._first = digests_page

    def partial(self, region: int) -> bool:
        """Does the overlay hold only some blocks of this region?"""
        if not self.bits._total:
            return False
        first = region * self.per_region
        return next(iter(self.bits.set_between(first, first + self.per_region)), None) is not None

    def held(self, region: int) -> list[int]:
        """The blocks of ``region`` the overlay holds (empty: none, or the region whole)."""
        if not self.bits._total:
            return []
        first = region * self.per_region
        return [slot - first for slot in self.bits.set_between(first, first + self.per_region)]

    def add(self, region: int, first_block: int, digests: list[bytes]) -> None:
        """The overlay now holds blocks first_block.. (one digest each) of ``region``."""
        slot = region * self.per_region + first_block
        for index, value in enumerate(digests):
            self.bits.set(slot + index)
            page, at = divmod(slot + index, BLOCK_DIGESTS_PER_PAGE)
            at *= BLOCK_DIGEST_SIZE
            self._pages.page_for_write(self._first + page)[at:at + BLOCK_DIGEST_SIZE] = value

    def clear(self, region: int) -> None:
        """The region is no longer partial (held whole, or back on the device): forget its blocks.
        (Their digest slots may keep old values: a slot counts only while its bit is set.)"""
        if self.bits._total:
            self.bits.clear_run(region * self.per_region, self.per_region)

    def verify(self, region: int, block: int, data: bytes | bytearray | memoryview) -> bool:
        """Are ``data`` the bytes the overlay's block ``block`` of ``region`` must hold?"""
        page, at = divmod(region * self.per_region + block, BLOCK_DIGESTS_PER_PAGE)
        at *= BLOCK_DIGEST_SIZE
        return self._pages.page(self._first + page).find(overlay_block_digest(data), at,
                                                          at + BLOCK_DIGEST_SIZE) == at

    def save_counts(self) -> None:
        self.bits.save_counts()


def merge_regions(*iterators: Iterable[int]) -> Iterator[int]:
    """Ascending regions from ascending iterators, each once."""
    last = -1
    for region in heapq.merge(*iterators):
        if region != last:
            yield region
            last = region


_zero_digests: dict[int, bytes] = {}


def zero_digest(length: int) -> bytes:
    """blake3 of ``length`` zero bytes (memoised: sparse regions are common)."""
    digest = _zero_digests.get(length)
    if digest is None:
        digest = blake3.blake3(bytes(length)).digest()
        _zero_digests[length] = digest
    return digest


def digest(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()
