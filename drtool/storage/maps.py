"""In-memory region maps: bitmaps, the era array and the manifest.

Each map is persisted by :mod:`drtool.storage.mapfile` under its own magic;
this module only holds the bits and knows nothing of files.
"""

from __future__ import annotations

import re
import sys
from array import array
from collections.abc import Iterable, Iterator

import blake3

from drtool.regions import Run

DIGEST_SIZE = 32
_NONZERO = re.compile(rb"[^\x00]+", re.DOTALL)
_FULL_BYTES = re.compile(rb"\xff+")


class RegionBitmap:
    """One bit per region, packed little-endian (bit ``r % 8`` of byte ``r // 8``)."""

    __slots__ = ("count", "_bits", "_empty")

    def __init__(self, count: int, data: bytes | bytearray | None = None) -> None:
        self.count = count
        self._empty: bool | None = None  # cached answer of "no bit set"; None: unknown
        size = (count + 7) // 8
        if data is None:
            self._bits = bytearray(size)
        else:
            if len(data) != size:
                raise ValueError(f"bitmap of {count} regions needs {size} bytes, got {len(data)}")
            self._bits = bytearray(data)

    @staticmethod
    def body_size(count: int) -> int:
        return (count + 7) // 8

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def copy(self) -> RegionBitmap:
        return RegionBitmap(self.count, self._bits)

    def __contains__(self, region: int) -> bool:
        return bool(self._bits[region >> 3] >> (region & 7) & 1)

    def test(self, region: int) -> bool:
        return bool(self._bits[region >> 3] >> (region & 7) & 1)

    def set(self, region: int) -> None:
        self._bits[region >> 3] |= 1 << (region & 7)
        self._empty = False

    def clear(self, region: int) -> None:
        self._bits[region >> 3] &= ~(1 << (region & 7)) & 0xFF
        if self._empty is False:
            self._empty = None

    def set_run(self, first: int, count: int, value: bool = True) -> None:
        end = first + count
        # Head and tail bits one by one; whole bytes in between by slice.
        while first < end and first & 7:
            self.set(first) if value else self.clear(first)
            first += 1
        while end > first and end & 7:
            end -= 1
            self.set(end) if value else self.clear(end)
        if end > first:
            self._bits[first >> 3 : end >> 3] = (b"\xff" if value else b"\x00") * ((end - first) >> 3)
        self._empty = False if value and count > 0 else None

    def clear_run(self, first: int, count: int) -> None:
        self.set_run(first, count, False)

    def update(self, regions: Iterable[int], value: bool = True) -> None:
        for region in regions:
            self.set(region) if value else self.clear(region)

    def clear_all(self) -> None:
        self._bits[:] = bytes(len(self._bits))
        self._empty = True

    def set_all(self) -> None:
        self.set_run(0, self.count)

    def any(self) -> bool:
        if self._empty is None:
            self._empty = _NONZERO.search(self._bits) is None
        return not self._empty

    def popcount(self) -> int:
        return int.from_bytes(self._bits, "little").bit_count()

    def count_in(self, first: int, count: int) -> int:
        return sum(1 for r in range(first, first + count) if self.test(r))

    def __iter__(self) -> Iterator[int]:
        """The set regions, ascending."""
        return self.set_between(0, self.count)

    def set_between(self, first: int, end: int) -> Iterator[int]:
        """The set regions in [first, end), ascending (whole zero bytes skipped at C speed)."""
        first, end = max(first, 0), min(end, self.count)
        if first >= end:
            return
        bits = self._bits
        lo, hi = first >> 3, (end + 7) >> 3
        for match in _NONZERO.finditer(bits, lo, hi):
            for index in range(match.start(), match.end()):
                byte = bits[index]
                base = index << 3
                while byte:
                    low = byte & -byte
                    region = base + low.bit_length() - 1
                    if first <= region < end:
                        yield region
                    byte ^= low

    def runs(self) -> list[Run]:
        """The set regions as sorted runs; fast for long runs of whole bytes."""
        runs: list[list[int]] = []

        def add(first: int, count: int) -> None:
            if runs and runs[-1][0] + runs[-1][1] == first:
                runs[-1][1] += count
            else:
                runs.append([first, count])

        bits = self._bits
        for match in _NONZERO.finditer(bits):
            index = match.start()
            while index < match.end():
                full = _FULL_BYTES.match(bits, index, match.end())
                if full:
                    add(index << 3, (full.end() - index) << 3)
                    index = full.end()
                    continue
                byte = bits[index]
                for bit in range(8):
                    if byte >> bit & 1:
                        add((index << 3) + bit, 1)
                index += 1
        return [(first, count) for first, count in runs]

    def set_runs(self, runs: Iterable[Run], value: bool = True) -> None:
        for first, count in runs:
            self.set_run(first, count, value)

    def difference(self, other: RegionBitmap) -> RegionBitmap:
        """Regions set here and not in ``other`` (whole-bitmap integer arithmetic: fast)."""
        mine = int.from_bytes(self._bits, "little")
        theirs = int.from_bytes(other._bits, "little")
        return RegionBitmap(self.count, (mine & ~theirs).to_bytes(len(self._bits), "little"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RegionBitmap) and self._bits == other._bits


class EraMap:
    """The era of each region's last write (as dm-era keeps it): one uint32 a region."""

    __slots__ = ("count", "_eras")

    def __init__(self, count: int, data: bytes | bytearray | None = None, initial: int = 0) -> None:
        self.count = count
        self._eras = array("I")
        if data is None:
            self._eras.frombytes(initial.to_bytes(4, "little") * count)
        else:
            if len(data) != 4 * count:
                raise ValueError(f"era map of {count} regions needs {4 * count} bytes")
            self._eras.frombytes(bytes(data))
        if sys.byteorder == "big":
            self._eras.byteswap()

    @staticmethod
    def body_size(count: int) -> int:
        return 4 * count

    def to_bytes(self) -> bytes:
        if sys.byteorder == "big":
            swapped = array("I", self._eras)
            swapped.byteswap()
            return swapped.tobytes()
        return self._eras.tobytes()

    def __getitem__(self, region: int) -> int:
        return self._eras[region]

    def __setitem__(self, region: int, era: int) -> None:
        self._eras[region] = era

    def changed_since(self, era: int) -> Iterator[int]:
        """Regions whose last write happened in ``era`` or later."""
        for region, value in enumerate(self._eras):
            if value >= era:
                yield region


class Manifest:
    """The blake3 digest of what each region should contain."""

    __slots__ = ("count", "_digests")

    def __init__(self, count: int, data: bytes | bytearray | None = None) -> None:
        self.count = count
        if data is None:
            self._digests = bytearray(DIGEST_SIZE * count)
        else:
            if len(data) != DIGEST_SIZE * count:
                raise ValueError(f"manifest of {count} regions needs {DIGEST_SIZE * count} bytes")
            self._digests = bytearray(data)

    @staticmethod
    def body_size(count: int) -> int:
        return DIGEST_SIZE * count

    def to_bytes(self) -> bytes:
        return bytes(self._digests)

    def __getitem__(self, region: int) -> bytes:
        start = region * DIGEST_SIZE
        return bytes(self._digests[start : start + DIGEST_SIZE])

    def __setitem__(self, region: int, digest: bytes) -> None:
        start = region * DIGEST_SIZE
        self._digests[start : start + DIGEST_SIZE] = digest

    def matches(self, region: int, digest: bytes) -> bool:
        start = region * DIGEST_SIZE
        return self._digests[start : start + DIGEST_SIZE] == digest


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
