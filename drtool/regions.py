"""Region arithmetic: the one place that turns byte ranges into regions and back.

A volume of ``size`` bytes is cut into regions of ``region_size`` bytes (a power
of two).  The last region is partial when the size is not a multiple of the
region size; every function here accounts for that.

Sets of regions travel as *runs*: sorted, non-overlapping ``(first, count)``
pairs.  That is the form of the JSON reports, of ``--regions`` arguments and
of the batched replica reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property

from drtool.errors import UsageError
from drtool.units import parse_size

MIN_REGION_SIZE = 4 * 1024
MAX_REGION_SIZE = 64 * 1024 * 1024
DEFAULT_REGION_SIZE = 64 * 1024

Run = tuple[int, int]


def validate_region_size(region_size: int | str) -> int:
    size = parse_size(region_size, "region size")
    if size < MIN_REGION_SIZE or size > MAX_REGION_SIZE or size & (size - 1):
        raise UsageError(
            f"region size {size} must be a power of two from 4K to 64M (for example 64K)"
        )
    return size


@dataclass(frozen=True)
class Geometry:
    """The shape of a volume: its size and how it is cut into regions."""

    size: int
    region_size: int

    def __post_init__(self) -> None:
        validate_region_size(self.region_size)
        if self.size <= 0:
            raise UsageError(f"volume size must be positive, not {self.size}")

    @cached_property
    def shift(self) -> int:
        return self.region_size.bit_length() - 1

    @cached_property
    def count(self) -> int:
        return (self.size + self.region_size - 1) >> self.shift

    @property
    def last_region_length(self) -> int:
        return self.size - ((self.count - 1) << self.shift)

    def region_of(self, offset: int) -> int:
        return offset >> self.shift

    def region_start(self, region: int) -> int:
        return region << self.shift

    def region_length(self, region: int) -> int:
        """Bytes in ``region``: region_size, except for a partial last region."""
        if region == self.count - 1:
            return self.last_region_length
        return self.region_size

    def region_bounds(self, region: int) -> tuple[int, int]:
        """(offset, length) of ``region``."""
        if not 0 <= region < self.count:
            raise UsageError(f"region {region} is outside the volume (0-{self.count - 1})")
        return region << self.shift, self.region_length(region)

    def run_bounds(self, first: int, count: int) -> tuple[int, int]:
        """(offset, length) in bytes of ``count`` regions starting at ``first``."""
        self.check_run(first, count)
        start = first << self.shift
        end = min((first + count) << self.shift, self.size)
        return start, end - start

    def check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0:
            raise UsageError(f"negative offset or length ({offset}, {length})")
        if offset + length > self.size:
            raise UsageError(
                f"range {offset}+{length} ends past the end of the volume ({self.size} bytes)"
            )

    def check_run(self, first: int, count: int) -> None:
        if first < 0 or count <= 0 or first + count > self.count:
            raise UsageError(
                f"region run {first}+{count} is outside the volume (regions 0-{self.count - 1})"
            )

    def regions_for(self, offset: int, length: int) -> range:
        """The regions that bytes ``[offset, offset+length)`` touch (empty for length 0)."""
        self.check_range(offset, length)
        if length == 0:
            return range(0)
        return range(offset >> self.shift, ((offset + length - 1) >> self.shift) + 1)

    def is_whole_region(self, offset: int, length: int) -> bool:
        """True when the range covers exactly one or more whole regions."""
        if offset & (self.region_size - 1):
            return False
        end = offset + length
        return end == self.size or not end & (self.region_size - 1)

    def split(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """Yield ``(region, offset_in_region, length_in_region)`` for a byte range."""
        for region in self.regions_for(offset, length):
            start = region << self.shift
            lo = max(offset, start)
            hi = min(offset + length, start + self.region_length(region))
            yield region, lo - start, hi - lo


def to_runs(regions: Iterable[int]) -> list[Run]:
    """Sorted, coalesced runs from region numbers in any order (duplicates allowed)."""
    runs: list[Run] = []
    for region in sorted(set(regions)):
        if runs and runs[-1][0] + runs[-1][1] == region:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((region, 1))
    return runs


def from_runs(runs: Iterable[Run]) -> Iterator[int]:
    for first, count in runs:
        yield from range(first, first + count)


def runs_total(runs: Iterable[Run]) -> int:
    return sum(count for _, count in runs)


def coalesce(runs: Iterable[Run], max_count: int | None = None) -> list[Run]:
    """Merge adjacent or overlapping runs; optionally cap each run at ``max_count``."""
    merged: list[list[int]] = []
    for first, count in sorted(runs):
        if count <= 0:
            continue
        if merged and first <= merged[-1][0] + merged[-1][1]:
            end = max(merged[-1][0] + merged[-1][1], first + count)
            merged[-1][1] = end - merged[-1][0]
        else:
            merged.append([first, count])
    if max_count is None:
        return [(a, n) for a, n in merged]
    out: list[Run] = []
    for first, count in merged:
        while count > 0:
            step = min(count, max_count)
            out.append((first, step))
            first += step
            count -= step
    return out


_RUN_TEXT = re.compile(r"^(\d+)(?:-(\d+)|\+(\d+))?$")


def runs_from_json(runs: object, geometry: Geometry) -> list[Run]:
    """Runs from a request body (a JSON list of [first, count] pairs), each inside the volume,
    in the order given; a UsageError naming what is wrong otherwise."""
    if not isinstance(runs, list) or not runs:
        raise UsageError('"runs" must be a non-empty list of [first, count] pairs')
    checked: list[Run] = []
    for run in runs:
        if (not isinstance(run, list) or len(run) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in run)):
            raise UsageError(f"run {run!r} is not a [first, count] pair of integers")
        geometry.check_run(*run)
        checked.append((run[0], run[1]))
    return checked


def parse_runs(text: str, geometry: Geometry | None = None) -> list[Run]:
    """Parse ``'3,10-12,40+4'`` (single, inclusive range, first+count) into runs."""
    runs: list[Run] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = _RUN_TEXT.match(part)
        if not match:
            raise UsageError(f"region list item {part!r} is not N, N-M or N+COUNT")
        first = int(match.group(1))
        if match.group(2) is not None:
            last = int(match.group(2))
            if last < first:
                raise UsageError(f"region range {part!r} ends before it starts")
            count = last - first + 1
        elif match.group(3) is not None:
            count = int(match.group(3))
        else:
            count = 1
        if geometry is not None:
            geometry.check_run(first, count)
        runs.append((first, count))
    if not runs:
        raise UsageError("empty region list")
    return coalesce(runs)


def format_runs(runs: Iterable[Run], limit: int | None = None) -> str:
    """``3,10-12``; with ``limit``, at most that many runs and then how many more there are."""
    runs = list(runs)
    shown = runs if limit is None else runs[:limit]
    text = ",".join(str(a) if n == 1 else f"{a}-{a + n - 1}" for a, n in shown)
    return text if len(shown) == len(runs) else f"{text} and {len(runs) - len(shown)} more runs"
