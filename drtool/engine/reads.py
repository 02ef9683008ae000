"""The engine's read path: merged, verified reads.

Each region of a read comes from the overlay (when it holds the region), from the replica
(the *requested portion*: bad regions, plus regions changed since ``local_era`` when the
local copy is older), or from the local device; every byte is checked against the
manifest before it is returned.  A local region that fails its check is marked bad and
fetched instead (a self-healing read); in normal mode that also switches the volume to
degraded mode when ``auto_degrade`` is on.  Readers take no lock unless a region fails
verification (re-checked under its write lock) or comes from the replica.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

import blake3

from drtool.buffers import aligned_bytes
from drtool.engine import modes
from drtool.engine.changes import _BaseLags
from drtool.errors import DataUnavailable, DeviceIOError
from drtool.fetch import RemoteFetcher
from drtool.regions import to_runs
from drtool.storage.device import Device
from drtool.storage.maps import BLOCK_DIGEST_SIZE, BLOCK_SIZE, NO_DIGEST, block_digests

log = logging.getLogger("drtool.engine")

ALIGN_FROM = 64 * 1024  # reads at least this large land in page-aligned buffers
READAHEAD_REGIONS = 1024  # look this far ahead for requested regions ...
READAHEAD_MAX = 256  # ... and fetch at most this many of them with the read
BLOCK_SHIFT = BLOCK_SIZE.bit_length() - 1
_ZERO_BLOCK = bytes(BLOCK_SIZE)
_PARTIAL_ATTEMPTS = 8  # a partial region's base read waits for its forced replication at most so often


@dataclass
class RegionRead:
    """Where each region of a read comes from."""

    local: list[int]
    overlay: list[int]
    remote: list[int]


class ReadPath:
    """Mixed into :class:`drtool.engine.Engine` (which holds the state these methods use)."""

    def read(self, offset: int, length: int) -> memoryview:
        """Verified bytes ``[offset, offset+length)`` of the merged volume."""
        geometry = self.geometry
        geometry.check_range(offset, length)
        if length == 0:
            return memoryview(b"")
        if self._healthy():
            if offset >> BLOCK_SHIFT == (offset + length - 1) >> BLOCK_SHIFT:
                block = self._read_one_block(offset, length)  # the common small random read
                if block is not None:
                    return block
            view = self._read_healthy(offset, length)
            if view is not None:
                return view
        return self._read_whole_regions(offset, length)

    def _read_one_block(self, offset: int, length: int) -> memoryview | None:
        """A read inside one 4 KiB block whose digest is known: one pread, one keyed hash.
        None otherwise (unknown digest, a mismatch, an error): _read_healthy decides then."""
        manifest = self.volume.manifest
        if manifest.blocks is None:
            return None
        start = offset & ~(BLOCK_SIZE - 1)
        size = self.geometry.size
        size = BLOCK_SIZE if start + BLOCK_SIZE <= size else size - start
        try:
            data = os.pread(self.device.fd, size, start)
        except (OSError, AttributeError):  # an I/O error, or the device went meanwhile
            return None
        shift = self.geometry.shift
        region = offset >> shift
        if len(data) != size or not manifest.verify_block(
                region, (start - (region << shift)) >> BLOCK_SHIFT, data):
            return None
        return memoryview(data)[offset - start:offset - start + length]

    def _read_whole_regions(self, offset: int, length: int, refresh: Iterable[int] = ()) -> memoryview:
        """The read, every region it touches read and verified whole.  ``refresh``: regions whose
        block digests disagreed with their bytes: remembered again from the verified bytes."""
        geometry = self.geometry
        shift = geometry.shift
        first = offset >> shift
        last = (offset + length - 1) >> shift
        span_start = first << shift
        span = min((last + 1) << shift, geometry.size) - span_start
        # Alignment pays for bulk copies; for a small read a plain buffer is cheaper to make.
        view = aligned_bytes(span) if span >= ALIGN_FROM else memoryview(bytearray(span))
        if self._healthy():
            failed = self._read_local(self.device, first, last - first + 1, first, view)
            if failed:  # now marked bad (and the volume maybe degraded): fetch just those
                self._read_remote(failed, first, view)
        else:
            self._read_regions(first, last - first + 1, view)
        for region in refresh:
            lo = (region - first) << shift
            self._remember_blocks(region, view[lo:lo + geometry.region_length(region)])
        return view[offset - span_start:offset - span_start + length]

    def _read_healthy(self, offset: int, length: int) -> memoryview | None:
        """The healthy read, in one device read: whole regions verified against their digest,
        a partly read region at either end against the digests of the 4 KiB blocks read (when
        they are known; else the region is read whole and its block digests remembered).
        None when anything fails to verify or read: the caller reads it again region by region
        (re-check under the lock, self-healing), as every read did before block digests."""
        geometry = self.geometry
        shift = geometry.shift
        end = offset + length
        first = offset >> shift
        last = (end - 1) >> shift
        start = first << shift
        stop = min((last + 1) << shift, geometry.size)
        manifest = self.volume.manifest
        blocks = manifest.blocks
        head = tail = None  # (region, first block, end block, key, expected digests or None: zeros)
        fill: list[int] = []  # partly read regions read whole: remember their block digests
        if blocks is not None:
            if offset > start or (first == last and end < stop):
                head = self._block_plan(first, offset, min(end, (first + 1) << shift), fill)
                if head is not None:
                    start = (first << shift) + (head[1] << BLOCK_SHIFT)
                    if first == last:
                        stop = min((first << shift) + (head[2] << BLOCK_SHIFT), stop)
            if last != first and end < stop:
                tail = self._block_plan(last, last << shift, end, fill)
                if tail is not None:
                    stop = min((last << shift) + (tail[2] << BLOCK_SHIFT), stop)
        span = stop - start
        device = self.device
        if device is None:
            return None  # the device went meanwhile
        if span >= ALIGN_FROM:
            # Bulk: a page-aligned buffer (the kernel copies whole pages into it; a bytes
            # object's data starts mid-page, which measured slower for nbdcopy).
            view = aligned_bytes(span)
            try:
                device.readinto(view, start)
            except DeviceIOError:
                return None  # the whole-region read says which region and why
        else:
            # Small: os.pread fills a new bytes object (no zeroed buffer first), one copy.
            try:
                data = os.pread(device.fd, span, start)
            except OSError:
                return None
            if len(data) != span:
                return None
            view = memoryview(data)
        hasher = blake3.blake3
        whole_first, whole_last = first, last
        if head is not None:
            if not _blocks_match(view, 0, head):
                return self._read_whole_regions(offset, length, refresh=[first])
            whole_first += 1
        if tail is not None:
            if not _blocks_match(view, (last << shift) + (tail[1] << BLOCK_SHIFT) - start, tail):
                return self._read_whole_regions(offset, length, refresh=[last])
            whole_last -= 1
        rsize = geometry.region_size
        verified = {}
        for region in range(whole_first, whole_last + 1):
            lo = (region << shift) - start
            digest = hasher(view[lo:lo + rsize]).digest()
            if not manifest.matches(region, digest):
                return None
            verified[region] = digest
        for region in fill:
            lo = (region << shift) - start
            self._remember_blocks(region, view[lo:lo + rsize], verified[region])
        return view[offset - start:offset - start + length]

    def _block_plan(self, region: int, lo: int, hi: int, fill: list[int]) -> tuple | None:
        """How to verify bytes [lo, hi) of ``region`` (a part of it) by blocks: (region, first
        block, end block, key, the blocks' digests or None for an all-zero region); None to
        verify the region whole (most of it is read anyway, or its block digests are not known:
        then it goes into ``fill``)."""
        base = region << self.geometry.shift
        first_block = (lo - base) >> BLOCK_SHIFT
        end_block = (hi - base + BLOCK_SIZE - 1) >> BLOCK_SHIFT
        manifest = self.volume.manifest
        if (end_block - first_block) * 2 > manifest.blocks.per_region:
            return None  # one hash of the region costs less than this many block hashes
        key = manifest.stored(region)
        if key == NO_DIGEST:
            return region, first_block, end_block, key, None
        expected = manifest.blocks.get(region, first_block, end_block)
        if expected is None:
            fill.append(region)
            return None
        return region, first_block, end_block, key, expected

    def _remember_blocks(self, region: int, region_view: memoryview, digest: bytes | None = None) -> None:
        """The region's bytes were verified whole: keep their block digests for small reads.
        They are keyed with ``digest``, the digest of these very bytes (computed here when not
        given), never with the manifest's digest as it is now: a write may have changed it
        since the bytes were verified, and then remember_blocks keeps nothing."""
        if self.volume.manifest.blocks is None:
            return
        if digest is None:
            digest = blake3.blake3(region_view).digest()
        self.remember_blocks(region, digest, block_digests(digest, region_view))

    def _healthy(self) -> bool:
        """Normal mode, no bad region, a device: every region is read locally."""
        # On every read: attribute tests, no calls (modes.is_normal, RegionBitmap.any say the same).
        return self.record.mode == modes.NORMAL and self.device is not None and not self.volume.bad._total

    def read_region(self, region: int) -> bytes:
        start, length = self.geometry.region_bounds(region)
        return bytes(self.read(start, length))

    def _plan(self, first: int, count: int) -> RegionRead:
        plan = RegionRead([], [], [])
        for region in range(first, first + count):
            if self.volume.overlay.test(region):
                plan.overlay.append(region)
            elif self.requested(region) or self.device is None:
                plan.remote.append(region)
            else:
                plan.local.append(region)
        return plan

    def _read_regions(self, first: int, count: int, view: memoryview) -> None:
        """Fill ``view`` (regions first..first+count-1, region-aligned) with verified bytes."""
        plan = self._plan(first, count)
        remote = list(plan.remote)
        for run_first, run_count in to_runs(plan.local):
            remote.extend(self._read_local(self.device, run_first, run_count, first, view))
        partial = [r for r in plan.overlay if self._partial(r)]
        if partial:
            plan.overlay = [r for r in plan.overlay if r not in set(partial)]
            for region in partial:
                self._read_partial(region, first, view)
        for run_first, run_count in to_runs(plan.overlay):
            failed = self._read_local(self.overlay, run_first, run_count, first, view)
            if failed:
                raise DataUnavailable(
                    f"volume {self.name}: overlay regions {to_runs(failed)} fail verification")
        if remote:
            self._read_remote(sorted(remote), first, view)

    def _read_local(self, device: Device | None, run_first: int, run_count: int,
                    base: int, view: memoryview) -> list[int]:
        """Read and verify a run from a local file; return the regions that failed."""
        if device is None:
            return list(range(run_first, run_first + run_count))
        geometry = self.geometry
        shift = geometry.shift
        start = (run_first - base) << shift
        offset = run_first << shift
        length = min((run_first + run_count) << shift, geometry.size) - offset
        part = view[start:start + length]
        failed: list[int] = []
        unreadable: list[int] = []  # of those, the ones the device would not read at all
        try:
            device.readinto(part, offset)
            readable = range(run_first, run_first + run_count)
        except DeviceIOError:
            readable = []
            for region in range(run_first, run_first + run_count):
                region_view = view[(region - base) << shift:((region - base) << shift) + geometry.region_length(region)]
                try:
                    device.readinto(region_view, region << shift)
                    readable.append(region)
                except DeviceIOError:
                    failed.append(region)
                    unreadable.append(region)
        manifest = self.volume.manifest
        rsize = geometry.region_size
        hasher = blake3.blake3
        for region in readable:
            lo = (region - base) << shift
            region_view = part[lo - start:lo - start + rsize]  # part ends where the volume does
            if not manifest.matches(region, hasher(region_view).digest()):
                if not self._recheck(device, region, region_view):
                    failed.append(region)
        if failed and device is self.device:
            self._local_failure(failed, unreadable)
        return failed

    def _recheck(self, device: Device, region: int, region_view: memoryview) -> bool:
        """Re-read a region that failed verification under its lock (a write may have raced)."""
        with self.stripes[region % len(self.stripes)]:
            try:
                device.readinto(region_view, region << self.geometry.shift)
            except DeviceIOError:
                return False
            return self.volume.manifest.matches(region, blake3.blake3(region_view).digest())

    def recheck_region(self, region: int) -> bool:
        """Does the device hold the region's expected bytes?  (Read under the region's lock.)"""
        if self.device is None:
            self._open_device()
        if self.device is None:
            return False
        buffer = bytearray(self.geometry.region_length(region))
        return self._recheck(self.device, region, memoryview(buffer))

    def _local_failure(self, regions: list[int], unreadable: list[int] = ()) -> None:
        """Self-healing: a device region failed while serving: mark it bad, maybe degrade.
        ``unreadable`` ones (an I/O error, not a checksum mismatch) are marked so: scan keeps them bad."""
        unreadable = set(unreadable)
        mismatched = [r for r in regions if r not in unreadable]
        if mismatched:
            self._set_bad(mismatched, io_error=False)
        if unreadable:
            self._set_bad(sorted(unreadable), io_error=True)
        log.warning("volume %s: regions %s failed %s while serving; marked bad", self.name, to_runs(regions),
                    "to read" if not mismatched else "verification")
        if modes.is_normal(self.record):
            if self.settings["auto_degrade"] and self.protected:
                self.enter_degraded(f"regions {to_runs(regions)} failed verification while serving", auto=True)
            else:
                raise DataUnavailable(
                    f"volume {self.name}: regions {to_runs(regions)} are bad and the volume is not in recovery")

    def _set_bad(self, regions: Iterable[int], io_error: bool) -> None:
        with self.meta:
            for region in regions:
                self.volume.bad.set(region)
                if io_error:
                    self.volume.ioerror.set(region)
            self.save_bitmaps()

    def _read_remote(self, regions: list[int], base: int, view: memoryview) -> None:
        if modes.is_normal(self.record):
            if not (self.settings["auto_degrade"] and self.protected):
                raise DataUnavailable(f"volume {self.name}: regions {to_runs(regions)} are bad "
                                      "and the volume is not in recovery (drtool recover)")
            self.enter_degraded(f"read of bad regions {to_runs(regions)}", auto=True)
        fetcher = self._fetcher()
        fetcher.prepare(regions)  # lost check and forced replication: no region lock may be held
        ahead = self._readahead(regions)
        stripes = sorted({region % len(self.stripes) for region in regions + ahead})
        for stripe in stripes:
            self.stripes[stripe].acquire()
        later: list[int] = []
        try:
            # A write may have moved a region into the overlay meanwhile: it is local now (its
            # blocks only, its base still remote: read after these stripes go).
            later = [r for r in regions if self._partial(r)]
            moved = [r for r in regions if self.volume.overlay.test(r) and r not in later]
            for run_first, run_count in to_runs(moved):
                if self._read_local(self.overlay, run_first, run_count, base, view):
                    raise DataUnavailable(f"volume {self.name}: overlay regions fail verification")
            rest = [r for r in regions if not self.volume.overlay.test(r)]
            if rest:
                extra = [r for r in ahead if not self.volume.overlay.test(r)]
                fetcher.fetch_into(rest, base, view, prepared=True, extra=extra)
        finally:
            for stripe in reversed(stripes):
                self.stripes[stripe].release()
        for region in later:
            self._read_partial(region, base, view)

    def _read_partial(self, region: int, base: int, view: memoryview) -> None:
        """A region the overlay holds in part: its base (device or replica, verified) with the
        overlay's blocks over it (each verified), under the region's stripe (a write of a block
        is not half seen); the replica's latest records forced first when the base needs them."""
        lo = (region - base) << self.geometry.shift
        region_view = view[lo:lo + self.geometry.region_length(region)]
        for _ in range(_PARTIAL_ATTEMPTS):
            try:
                with self.stripes[region % len(self.stripes)]:
                    region_view[:] = self._content_for_write(region)  # whatever the region is now
                return
            except _BaseLags:
                self._fetcher().prepare([region])
        raise DataUnavailable(f"volume {self.name}: region {region} kept changing while its base "
                              "waited for its replication; try again")

    def _readahead(self, regions: list[int]) -> list[int]:
        """Requested regions just after a remote read, fetched in the same batch (copy-on-read
        keeps them): a sequential reader then pays one round trip per window, not per region."""
        if not self.settings["copy_on_read"] or self.overlay is None:
            return []
        volume = self.volume
        wanted = set(regions)
        ahead = []
        start = max(regions) + 1
        # Every reader waiting for a fetch computes this: it must be cheap (requested_between is).
        for region in volume.requested_between(start, start + READAHEAD_REGIONS):
            if (region not in wanted and not volume.norecord.test(region)
                    and not volume.unreplicated.test(region)):
                ahead.append(region)
                if len(ahead) >= READAHEAD_MAX:
                    break
        return ahead

    def _fetcher(self) -> RemoteFetcher:
        if self.fetcher is None:
            self.fetcher = RemoteFetcher(self)
        return self.fetcher



def _blocks_match(view: memoryview, at: int, plan: tuple) -> bool:
    """Do the blocks of ``plan`` (see ReadPath._block_plan), read into ``view`` from ``at``,
    verify?  Against their keyed digests, or against zeros for an all-zero region."""
    _region, first_block, end_block, key, expected = plan
    hasher = blake3.blake3
    for index in range(end_block - first_block):
        block = view[at + (index << BLOCK_SHIFT):at + ((index + 1) << BLOCK_SHIFT)]
        if expected is None:
            if block != _ZERO_BLOCK[:len(block)]:
                return False
        elif hasher(block, key=key).digest(BLOCK_DIGEST_SIZE) != expected[index]:
            return False
    return True
