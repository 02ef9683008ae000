"""Per-region digests with a presence bit, stored in pages.

The mirror's manifest, each snapshot's preserved set and the overlay replica's
region set are all "for some regions, this digest".  The table is cut into
pages of PAGE_REGIONS regions, each page its own state file (mapfile header:
magic, geometry, volume id, checksum), so a batch rewrites only the pages it
touched and an apply costs what it changes, not the size of the volume.

A digest slot of all zero bytes means "the region is all zeros": that keeps
fresh pages valid as they are and lets the server answer ZERO frames without
reading the image.  ``digest()`` returns the real blake3 of the zeros.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from drtool.errors import CorruptStateFile
from drtool.regions import Geometry, Run, to_runs
from drtool.storage import mapfile
from drtool.wire import NO_DIGEST, zero_digest

PAGE_REGIONS = 4096
_PAGE_SHIFT = 12
_BITMAP_BYTES = PAGE_REGIONS // 8


class DigestTable:
    """Digests of some regions of one volume; ``lazy`` tables treat a missing page as empty."""

    def __init__(self, directory: str, magic: bytes, what: str, geometry: Geometry,
                 volume_id: bytes, lazy: bool) -> None:
        self.directory = directory
        self.magic = magic
        self.what = what
        self.geometry = geometry
        self.volume_id = volume_id
        self.lazy = lazy
        self._pages: dict[int, bytearray] = {}
        self._dirty: set[int] = set()

    @property
    def page_count(self) -> int:
        return (self.geometry.count + PAGE_REGIONS - 1) // PAGE_REGIONS

    def _regions_in(self, page: int) -> int:
        return min(PAGE_REGIONS, self.geometry.count - page * PAGE_REGIONS)

    def _path(self, page: int) -> str:
        return os.path.join(self.directory, f"page-{page:08d}.bin")

    def create(self) -> None:
        """Start an empty table; an eager table writes every page now so a lost one is noticed."""
        os.makedirs(self.directory, exist_ok=True)
        if not self.lazy:
            for page in range(self.page_count):
                self._pages[page] = self._empty(page)
                self._dirty.add(page)
            self.save(0)

    def _empty(self, page: int) -> bytearray:
        return bytearray(_BITMAP_BYTES + 32 * self._regions_in(page))

    def _page(self, page: int) -> bytearray:
        body = self._pages.get(page)
        if body is None:
            path = self._path(page)
            if self.lazy and not os.path.exists(path):
                body = self._empty(page)
            else:
                _, body = mapfile.load(path, self.magic, f"{self.what} page {page}",
                                       self.geometry.region_size, self._regions_in(page),
                                       self.volume_id, _BITMAP_BYTES + 32 * self._regions_in(page))
            self._pages[page] = body
        return body

    def check(self) -> None:
        """Load every page now, so a torn or missing one is refused at start, not mid-request."""
        if not os.path.isdir(self.directory):
            raise CorruptStateFile(self.directory, f"the {self.what} directory is missing")
        for page in range(self.page_count):
            self._page(page)

    def present(self, region: int) -> bool:
        page, index = divmod(region, PAGE_REGIONS)
        return bool(self._page(page)[index >> 3] & (1 << (index & 7)))

    def stored(self, region: int) -> bytes:
        """The raw slot: NO_DIGEST for an all-zero region."""
        body = self._pages.get(region >> _PAGE_SHIFT) or self._page(region >> _PAGE_SHIFT)
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
        body = self._page(page)
        body[index >> 3] |= 1 << (index & 7)
        start = _BITMAP_BYTES + 32 * index
        body[start:start + 32] = digest
        self._dirty.add(page)

    def discard(self, region: int) -> bool:
        """Mark ``region`` absent; returns whether it was present."""
        if not self.present(region):
            return False
        page, index = divmod(region, PAGE_REGIONS)
        body = self._page(page)
        body[index >> 3] &= ~(1 << (index & 7)) & 0xFF
        start = _BITMAP_BYTES + 32 * index
        body[start:start + 32] = bytes(32)
        self._dirty.add(page)
        return True

    def fill_from(self, read: Callable[[int], bytes]) -> None:
        """Every region present, its digest the next 32 bytes of ``read(n)`` (an adopted manifest).

        Written page by page; the caller saves.  A digest of zeros is stored as
        NO_DIGEST, like ``set`` does, so ZERO frames need no read of the image.
        """
        os.makedirs(self.directory, exist_ok=True)
        for page in range(self.page_count):
            count = self._regions_in(page)
            digests = read(32 * count)
            body = self._empty(page)
            body[:_BITMAP_BYTES] = b"\xff" * _BITMAP_BYTES
            body[_BITMAP_BYTES:] = digests
            self._blank_zero_slots(page, body)
            self._pages[page] = body
            self._dirty.add(page)
            self.save(0)

    def _blank_zero_slots(self, page: int, body: bytearray) -> None:
        full, last = zero_digest(self.geometry.region_size), self.geometry.count - 1
        view = memoryview(body)
        for index in range(self._regions_in(page)):
            start = _BITMAP_BYTES + 32 * index
            region = page * PAGE_REGIONS + index
            zero = full if region != last else zero_digest(self.geometry.region_length(region))
            if view[start:start + 32] == zero:
                view[start:start + 32] = NO_DIGEST

    def digests_of_page(self, page: int) -> bytes:
        """The real blake3 of every region of ``page`` (zero regions included), 32 bytes each."""
        raw = bytes(memoryview(self._page(page))[_BITMAP_BYTES:])
        if NO_DIGEST not in raw:  # (a match across slots only costs the slow path)
            return raw
        out = bytearray(raw)
        base = page * PAGE_REGIONS
        for index in range(0, len(out), 32):
            if out[index:index + 32] == NO_DIGEST:
                out[index:index + 32] = zero_digest(self.geometry.region_length(base + index // 32))
        return bytes(out)

    def save(self, seq: int) -> None:
        """Write the pages changed since the last save, each atomically."""
        for page in sorted(self._dirty):
            header = mapfile.MapHeader(self.magic, mapfile.FORMAT_VERSION, self.geometry.region_size,
                                       self._regions_in(page), 0, seq, self.volume_id)
            mapfile.save(self._path(page), header, self._pages[page])
        self._dirty.clear()

    def _loaded_or_stored_pages(self) -> Iterable[int]:
        if not self.lazy:
            return range(self.page_count)
        on_disk = {int(n[5:13]) for n in os.listdir(self.directory) if n.startswith("page-")
                   and n.endswith(".bin")}
        return sorted(on_disk | set(self._pages))

    def present_regions(self) -> list[int]:
        regions = []
        for page in self._loaded_or_stored_pages():
            bitmap = self._page(page)[:_BITMAP_BYTES]
            base = page * PAGE_REGIONS
            for byte_index, byte in enumerate(bitmap):
                if byte:
                    regions.extend(base + byte_index * 8 + bit for bit in range(8) if byte >> bit & 1)
        return regions

    def present_runs(self) -> list[Run]:
        return to_runs(self.present_regions())

    def zero_count(self) -> int:
        """Regions whose slot says all zeros (for the manifest: never written or zeroed)."""
        zero = 0
        for page in range(self.page_count):
            digests = memoryview(self._page(page))[_BITMAP_BYTES:]
            zero += sum(1 for i in range(0, len(digests), 32) if digests[i:i + 32] == NO_DIGEST)
        return zero
