"""Read a device region by region as fast as the machine allows, digesting each region.

Two worker threads take 1 MiB (or one-region, if larger) chunks in turn; both
``os.preadv`` and blake3 release the GIL, so the two cores both hash.  Holes
in sparse files are not read: they are zeros by definition.  A chunk that
fails is re-read region by region, so an I/O error is pinned to exactly the
regions it hits.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import blake3

from drtool.buffers import aligned_bytes
from drtool.errors import DeviceIOError
from drtool.regions import Geometry
from drtool.storage.device import Device
from drtool.storage.maps import DIGEST_SIZE, zero_digest

CHUNK = 4 << 20
WORKERS = 2

ProgressFn = Callable[[int], None]

# Why a region could not be digested.
IO_ERROR = "io-error"
SHORT_READ = "short-read"


@dataclass
class DigestResult:
    """Digests of the regions read; ``errors`` maps a region to why it could not be read."""

    digests: bytearray
    errors: dict[int, str] = field(default_factory=dict)
    bytes_read: int = 0

    def digest(self, region: int) -> bytes:
        return bytes(self.digests[region * DIGEST_SIZE:(region + 1) * DIGEST_SIZE])


def digest_regions(
    device: Device,
    geometry: Geometry,
    runs: Sequence[tuple[int, int]] | None = None,
    progress: ProgressFn | None = None,
    workers: int = WORKERS,
) -> DigestResult:
    """Digest every region of ``runs`` (default: the whole volume)."""
    if runs is None:
        runs = [(0, geometry.count)]
    per_chunk = max(1, CHUNK // geometry.region_size)
    chunks: list[tuple[int, int]] = []
    for first, count in runs:
        for start in range(first, first + count, per_chunk):
            chunks.append((start, min(per_chunk, first + count - start)))
    result = DigestResult(bytearray(DIGEST_SIZE * geometry.count))
    tickets = itertools.count()
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        view = aligned_bytes(per_chunk * geometry.region_size)
        done = 0
        try:
            while True:
                index = next(tickets)
                if index >= len(chunks):
                    break
                first, count = chunks[index]
                done += _digest_chunk(device, geometry, first, count, view, result, lock)
                if progress:
                    progress(geometry.run_bounds(first, count)[1])
        except BaseException as exc:  # surfaced in the caller's thread
            failures.append(exc)
        with lock:
            result.bytes_read += done

    threads = [threading.Thread(target=work, name=f"digest-{n}") for n in range(max(1, workers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return result


def _digest_chunk(
    device: Device, geometry: Geometry, first: int, count: int,
    view: memoryview, result: DigestResult, lock: threading.Lock,
) -> int:
    offset, length = geometry.run_bounds(first, count)
    digests = result.digests
    if device.is_hole(offset, length):
        for region in range(first, first + count):
            digests[region * DIGEST_SIZE:(region + 1) * DIGEST_SIZE] = zero_digest(geometry.region_length(region))
        return 0
    try:
        device.readinto(view[:length], offset)
    except DeviceIOError:
        return _digest_one_by_one(device, geometry, first, count, view, result, lock)
    rsize = geometry.region_size
    hasher = blake3.blake3
    data = view[:length]  # the last region of the volume may be partial
    at = first * DIGEST_SIZE
    for start in range(0, length, rsize):
        digests[at:at + DIGEST_SIZE] = hasher(data[start:start + rsize]).digest()
        at += DIGEST_SIZE
    return length


def _digest_one_by_one(
    device: Device, geometry: Geometry, first: int, count: int,
    view: memoryview, result: DigestResult, lock: threading.Lock,
) -> int:
    done = 0
    for region in range(first, first + count):
        offset, length = geometry.region_bounds(region)
        part = view[:length]
        try:
            device.readinto(part, offset)
        except DeviceIOError as exc:
            with lock:
                result.errors[region] = SHORT_READ if exc.reason.startswith("short read") else IO_ERROR
            continue
        result.digests[region * DIGEST_SIZE:(region + 1) * DIGEST_SIZE] = blake3.blake3(part).digest()
        done += length
    return done
