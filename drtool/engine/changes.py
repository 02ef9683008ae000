"""Every change of a volume's state goes through here: the commit routine and its callers.

Locking, once for the whole engine:

- a region's **stripe** lock (256 of them, by region number; re-entrant) is held by whoever
  changes that region, for the whole change: a client write, a fetched region stored in the
  overlay, a bitmap-mode relog, a failback copy.  Readers take none unless a region fails
  verification (re-checked under its stripe) or comes from the replica (then they hold the
  stripes of the regions they fetch, so a racing write is read back from the overlay);
- ``meta`` guards the maps and the record (held only for in-memory updates and saves);
- the log has its own lock (``seq_lock`` here pairs each record with its in-flight mark).

Order: stripe -> meta -> log.  Whoever holds several stripes takes them in ascending stripe
order (a read from the replica takes those of its regions; the end of failback,
``Engine.finish_resync``, takes all 256 through :meth:`StateChanges.all_stripes` before
``meta``).  Never force replication while holding a stripe: the replicator takes stripes to
re-log bitmap-mode regions.

The end of failback (resync -> normal) holds every stripe: a write checks the mode under its
stripe and sets its overlay/resync bits in the commit's map step, after its bytes are in the
overlay, so a finish holding only ``meta`` could run in between, miss the region and delete the
overlay (the write lost; tests/faults/test_failback_race.py).  Holding every stripe, the finish
sees every write either done (its bits set: it is copied back) or not begun (it sees normal mode
and goes to the device).  Before this change the finish took ``meta`` alone.

Helpers (drtool.fetch, drtool.replication, drtool.failback, drtool.roles) see the engine
through drtool.ports and never take these locks; one that must keep a region still
across a read and a commit uses :meth:`StateChanges.holding`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import blake3

from drtool.engine import modes
from drtool.errors import DataUnavailable, DeviceError
from drtool.regions import to_runs
from drtool.storage.device import Device
from drtool.storage.maps import BLOCK_SIZE
from drtool.storage.records import Failback
from drtool.wire import FLAG_OVERLAY, FLAG_OVERLAY_HELD, KIND_BASE, KIND_WRITE, KIND_ZERO

DEVICE, OVERLAY = "device", "overlay"  # where a change's bytes go
MIRROR = "mirror"  # a log record for the mirror endpoint (OVERLAY: for the overlay replica)
#: Reads stop remembering block digests while this many bytes of map pages wait for a checkpoint
#: (the agent's checkpoint commits them; memory stays bounded between checkpoints).
BLOCKS_DIRTY_LIMIT = 16 << 20


class _BaseLags(Exception):
    """Internal: a partial region's base must come from the replica, which lacks its latest
    records; force them (with no stripe held) and try again."""


@dataclass(frozen=True)
class RegionChange:
    """One change of one region, as :meth:`StateChanges.commit_region` applies it.

    ``data`` None means zeros.  ``digest`` is the region's digest after the change (None: its
    content does not change, as when a relog or a failback copy moves bytes that are already
    the volume's).  ``log`` names the log record's endpoint (None: not logged); ``target``
    where the bytes are written (None: they are already in place).  ``blocks``: the region's
    block digests after the change (:func:`drtool.storage.maps.block_digests` of the whole
    region's new bytes, keyed with ``digest``), when the caller has them; None leaves them
    unknown (a small read then checks the whole region once and remembers them).  ``held``: a
    mirror record of bytes the overlay replica was sent (failback copies an incident write
    back): the replicator may ship it as a copy from there instead of the bytes."""

    region: int
    offset: int
    length: int
    data: memoryview | bytes | bytearray | None
    digest: bytes | None
    log: str | None
    target: str | None
    blocks: list[bytes] | None = None
    # (offset, length) inside a whole-region overlay record: the bytes the client wrote, all the
    # overlay replica needs when it fills the region from its mirror (storage.replog LogEntry.patch)
    patch: tuple[int, int] | None = None
    held: bool = False
    # A block write into a region the overlay does not hold whole (issue 12): (first block, the
    # digests of the blocks the change covers, storage.maps.overlay_block_digest).  The region's
    # digest does not change (``digest`` None): its base is still the manifest's.
    overlay_blocks: tuple[int, list[bytes]] | None = None
    # Log a KIND_BASE record (the manifest's digest of the region) before this one: the first
    # block write of a region the overlay replica may not hold (it fills it from the mirror,
    # checked against that digest).
    base: bool = False


class StateChanges:
    """Mixed into :class:`drtool.engine.Engine` (which holds the state these methods use)."""

    stripes: list[threading.RLock]
    meta: threading.RLock
    seq_lock: threading.Lock
    inflight: set[int]
    device: Device | None
    overlay: Device | None

    # -- the commit routine -------------------------------------------------------------

    def commit_region(self, change: RegionChange) -> int | None:
        """Apply one region change, in the one order crash recovery relies on: append the log
        record, write the bytes (device or overlay), update the manifest digest and era, the
        overlay/resync/bad bits and the unreplicated bit, then mark the record done (the maps
        now reflect it, so a checkpoint may cover it).  Returns the record's sequence number.

        Takes the region's stripe (a caller may already hold it).  A DeviceError while writing
        leaves the maps unchanged and is raised."""
        region = change.region
        start, length = self.geometry.region_bounds(region)
        whole = change.offset == start and change.length == length
        with self.stripes[region % len(self.stripes)]:
            seq = base_seq = None
            if change.base:
                base_seq = self._append_base(region)
            if change.log is not None:
                digest = (change.digest or self.volume.manifest[region]) if whole else None
                seq = self._append(change, digest)
            try:
                if change.target is not None:
                    self._put(self.device if change.target == DEVICE else self.overlay, change, whole)
            except DeviceError:
                for done in (seq, base_seq):
                    if done is not None:
                        self._done(done)
                raise
            self._commit_maps(region, change.digest, self.record.era, change.target, whole, seq is not None,
                              change.blocks, change.overlay_blocks)
            if seq is not None:
                # The record may have shipped and been acknowledged between its append and the
                # unreplicated bit just set (the acknowledgement found the bit clear then): with
                # nothing of the region pending any more, the bit would stay set for ever.
                self._acknowledged([region])
            for done in (seq, base_seq):
                if done is not None:
                    self._done(done)
        return seq

    def _commit_maps(self, region: int, digest: bytes | None, era: int, target: str | None, whole: bool,
                     logged: bool, blocks: list[bytes] | None = None,
                     overlay_blocks: tuple[int, list[bytes]] | None = None) -> None:
        """The commit routine's map step, the one owner of what a change does to the maps: the
        manifest digest and era (``digest`` None: the content did not change; a new digest
        clears the block digests unless ``blocks`` replace them: storage.maps.Manifest.set), the overlay and
        resync bits (``target`` OVERLAY), the bad/ioerror/overlay/resync bits (the device gets
        the whole region back), the unreplicated bit and, for a whole-region record, the
        norecord bit (``logged``).  Crash replay (core._replay) redoes a record through here too,
        so a replayed write rebuilds every map the live write set.  ``overlay_blocks``: a block
        write into a partial region (its blocks join the overlay's block map; the era moves,
        the digest stays the base's); a whole region in the overlay or back on the device is
        not partial any more."""
        volume = self.volume
        with self.meta:
            if digest is not None:
                volume.manifest.set(region, digest, blocks)
                volume.eras[region] = era
            if overlay_blocks is not None:
                volume.overlay_blocks.add(region, *overlay_blocks)
                volume.eras[region] = era
            elif whole and target is not None and volume.overlay_blocks is not None:
                volume.overlay_blocks.clear(region)
            if target == OVERLAY:
                volume.overlay.set(region)
                if modes.resyncing(self.record) and not volume.resync.test(region):
                    # Written during failback: copied back (again); the failback's total counts it.
                    volume.resync.set(region)
                    if self.record.failback is not None:
                        self.record.failback.total_regions += 1
            elif target == DEVICE and whole:  # the device holds the region again
                for bitmap in (volume.bad, volume.ioerror, volume.overlay, volume.resync):
                    bitmap.clear(region)
            if logged:
                if whole:  # the record carries the whole region: nothing left to re-log
                    volume.norecord.clear(region)
                if self.protected:
                    volume.unreplicated.set(region)

    def _append(self, change: RegionChange, digest: bytes | None) -> int:
        flags = FLAG_OVERLAY if change.log == OVERLAY else FLAG_OVERLAY_HELD if change.held else 0
        with self.seq_lock:
            if change.data is None:
                entry = self.log.append(KIND_ZERO, change.offset, change.length, self.record.era, flags=flags)
            else:
                entry = self.log.append(KIND_WRITE, change.offset, change.length, self.record.era,
                                        memoryview(change.data), digest, flags, change.patch)
            self.inflight.add(entry.seq)
        return entry.seq

    def _append_base(self, region: int) -> int:
        start, length = self.geometry.region_bounds(region)
        with self.seq_lock:
            entry = self.log.append(KIND_BASE, start, length, self.record.era, digest=self.volume.manifest[region],
                                    flags=FLAG_OVERLAY)
            self.inflight.add(entry.seq)
        return entry.seq

    def _done(self, seq: int) -> None:
        with self.seq_lock:
            self.inflight.discard(seq)

    @staticmethod
    def _put(handle: Device | None, change: RegionChange, whole: bool) -> None:
        if handle is None or not handle.writable:
            raise DeviceError(f"cannot write region {change.region}: no writable {change.target}")
        if change.data is not None:
            handle.pwrite(change.data, change.offset)
        elif not (whole and handle.punch_hole(change.offset, change.length)):
            handle.pwrite(bytes(change.length), change.offset)

    @contextmanager
    def all_stripes(self) -> Iterator[None]:
        """Every stripe, taken in ascending order (as a multi-region reader takes its own): no
        change of any region is in flight while it is held.  For the end of failback only."""
        with ExitStack() as stack:
            for stripe in self.stripes:
                stack.enter_context(stripe)
            yield

    @contextmanager
    def holding(self, region: int) -> Iterator[None]:
        """Keep ``region`` still (no write changes it) while a caller reads it and commits a
        change of it: the commit routine's own lock, for a read-then-commit."""
        with self.stripes[region % len(self.stripes)]:
            yield

    # -- block digests (sub-region digests, the read path's) ----------------------------------

    def remember_blocks(self, region: int, digest: bytes, blocks: list[bytes]) -> bool:
        """Keep the block digests a reader computed from a region it verified against ``digest``
        (storage.maps.block_digests), so later small reads of the region check only their
        blocks.  Not a change of the region: it takes no stripe (Manifest.remember_blocks keeps
        nothing when the digest moved on meanwhile, and ``meta`` orders it with the map step).
        Never waits: when ``meta`` is busy (a checkpoint writing) or many map pages already
        wait for the next checkpoint, nothing is kept and a later read tries again."""
        if not self.meta.acquire(blocking=False):
            return False
        try:
            if self.volume.dirty_bytes > BLOCKS_DIRTY_LIMIT:
                return False
            return self.volume.manifest.remember_blocks(region, digest, blocks)
        finally:
            self.meta.release()

    # -- reading a region whole ---------------------------------------------------------------

    def read_verified(self, region: int, base: bytes | None = None) -> bytes | None:
        """The region's bytes from where the volume keeps them (the overlay if it holds the
        region, else the device), verified against the manifest; None when they fail.

        A partial region (the overlay holds some of its blocks) is completed first: its base
        (``base``: verified bytes the caller fetched, else read and verified here, fetched only
        when the replica needs no forced replication) with the held blocks over it (each checked
        against its block digest) is written into the overlay whole and its digest becomes the
        region's: what failback, relog and verify's repair then copy or ship.  The caller holds
        the region (:meth:`holding`)."""
        if self._partial(region):
            return self._complete(region, base)
        source = self.overlay if self.volume.overlay.test(region) else self.device
        if source is None:
            return None
        content = bytearray(self.geometry.region_length(region))
        try:
            if self._read_local(source, region, 1, region, memoryview(content)):
                return None
        except DataUnavailable:
            return None
        return bytes(content)

    def _partial(self, region: int) -> bool:
        blocks = self.volume.overlay_blocks
        return blocks is not None and blocks.partial(region)

    def partial_matches(self, region: int, digest: bytes) -> bool:
        """Is ``digest`` the digest of this partial region's content (its base, read and verified,
        with the overlay's verified blocks over it)?  False for a region that is not partial, or
        whose base cannot be had now.  Changes nothing (drtool.verify asks it)."""
        if not self._partial(region):
            return False
        with self.holding(region):
            try:
                content = self._merged(region) if self._partial(region) else None
            except (DataUnavailable, _BaseLags):
                return False
        return content is not None and blake3.blake3(content).digest() == digest

    def partial_base_remote(self, region: int) -> bool:
        """Is ``region`` partial with a base only the replica holds (failback fetches it first)?"""
        return self._partial(region) and (self.volume.bad.test(region) or self.device is None)

    def _complete(self, region: int, base: bytes | None = None) -> bytes | None:
        """A partial region made whole in the overlay (see :meth:`read_verified`): not a change of
        the region's content, so not logged.  A crash before a checkpoint claims it leaves the
        maps on disk partial, which still describe the same bytes (the base is untouched)."""
        try:
            content = self._merged(region, base)
        except (DataUnavailable, _BaseLags):
            return None
        digest = blake3.blake3(content).digest()
        start, _length = self.geometry.region_bounds(region)
        self.overlay.pwrite(content, start)
        with self.meta:
            self.volume.manifest.set(region, digest)
            self.volume.overlay_blocks.clear(region)
        return bytes(content)

    def _merged(self, region: int, base: bytes | None = None) -> bytearray:
        """A partial region's verified content: its base, then the overlay's blocks over it.  The
        caller holds the region.  Raises DataUnavailable (a held block fails its digest, the base
        cannot be had) or _BaseLags (the base must come from the replica, which lacks its latest
        records: force them first, with no stripe held)."""
        length = self.geometry.region_length(region)
        if base is not None and not (len(base) == length and self.volume.manifest.matches(
                region, blake3.blake3(base).digest())):
            base = None  # fetched before the caller held the region, and not its base: read it here
        content = bytearray(base) if base is not None else self._base_content(region)
        self._blocks_over(region, content)
        return content

    def _base_content(self, region: int) -> bytearray:
        """The verified bytes of ``region`` the manifest describes, from the device when it holds
        them, else from the replica.  The caller holds the region's stripe."""
        content = bytearray(self.geometry.region_length(region))
        view = memoryview(content)
        # (requested() is False for any region in the overlay; a partial region's base is remote
        # when bad: partial regions exist only without a local era, engine.writes._blocks_allowed)
        volume = self.volume
        remote = volume.bad.test(region) if volume.overlay.test(region) else self.requested(region)
        if not remote and self.device is not None:
            if not self._read_local(self.device, region, 1, region, view):
                return content
            # It failed verification and is marked bad now (a self-healing read): fetch it.
        fetcher = self._fetcher()
        if volume.overlay.test(region):
            # A partial region's base: the mirror lacks it only while a mirror record of it is
            # pending (its own overlay records say nothing of the mirror); the fetch checks it
            # against the manifest either way.
            if self.log.has_pending_mirror(region):
                raise _BaseLags()
        elif fetcher.lagging([region]):  # (a lost region raises here)
            raise _BaseLags()
        got = fetcher.fetch([region], prepared=True)
        fetcher.account(got, store=False)
        view[:] = got[region][0]
        return content

    def _blocks_over(self, region: int, content: bytearray) -> None:
        """Put the overlay's held blocks of ``region`` over ``content`` (its base), each checked
        against its block digest; DataUnavailable when one fails."""
        blocks = self.volume.overlay_blocks
        start, length = self.geometry.region_bounds(region)
        size = BLOCK_SIZE
        for first, count in to_runs(blocks.held(region)):
            lo = first * size
            hi = min((first + count) * size, length)
            try:
                data = self.overlay.pread(hi - lo, start + lo)
            except DeviceError as exc:
                raise DataUnavailable(f"volume {self.name}: overlay region {region}: {exc}") from None
            if len(data) != hi - lo:
                raise DataUnavailable(f"volume {self.name}: overlay region {region} is short")
            for index in range(count):
                part = memoryview(data)[index * size:(index + 1) * size]
                if not blocks.verify(region, first + index, part):
                    raise DataUnavailable(f"volume {self.name}: overlay block {first + index} of region "
                                          f"{region} fails verification")
            content[lo:hi] = data

    def local_bytes(self, region: int) -> bytes | None:
        """The device's bytes of a region, unverified (a journal source patches them); None
        without a device."""
        if self.device is None:
            return None
        start, length = self.geometry.region_bounds(region)
        return self.device.pread(length, start)

    # -- the paths that change regions ------------------------------------------------------

    def store_fetched(self, region: int, data: bytes, digest: bytes, rollback: bool = False) -> None:
        """Copy-on-read: keep a fetched region in the overlay so the next read is local.

        Bytes that differ from the manifest (a snapshot source rolls the region back) are a
        change of the volume: they are logged and replicated like a write."""
        start, length = self.geometry.region_bounds(region)
        with self.holding(region):
            if self.overlay is None or self.volume.overlay.test(region):
                return  # not in recovery any more, or a write got there first
            if self.volume.manifest.matches(region, digest):
                self.commit_region(RegionChange(region, start, length, data, None, None, OVERLAY))
            elif rollback:
                self.commit_region(RegionChange(region, start, length, data, digest, OVERLAY, OVERLAY))
            # else the region changed while it was fetched: these bytes are stale

    def relog_region(self, region: int) -> int | None:
        """Append a log record holding a whole region's current bytes (bitmap-mode resync).

        Returns the sequence number, or None when the region cannot be read correctly
        (it stays marked: its bytes exist nowhere else)."""
        with self.holding(region):
            in_overlay = self.volume.overlay.test(region)
            if not in_overlay and (self.volume.bad.test(region) or self.device is None):
                return None
            content = self.read_verified(region)
            if content is None:
                return None
            start, length = self.geometry.region_bounds(region)
            data = None if self.volume.manifest.is_zero(region) else content
            return self.commit_region(RegionChange(region, start, length, data, None,
                                                   OVERLAY if in_overlay else MIRROR, None))

    def copy_back(self, region: int, data: bytes, relog: bool) -> int:
        """Failback: write a region's verified bytes into the device, which then holds it again;
        ``relog``: also log them for the mirror (written during the incident, never shipped
        there).  The caller holds the region (:meth:`holding`).  Returns the bytes written."""
        start, length = self.geometry.region_bounds(region)
        zero = self.volume.manifest.is_zero(region)
        self.commit_region(RegionChange(region, start, length, None if zero else data, None,
                                        MIRROR if relog else None, DEVICE, held=relog))
        return length

    def forget_overlay_copy(self, region: int) -> bool:
        """The device holds this region correctly (a copy-on-read kept it in the overlay too):
        stop keeping it there.  False when the device does not."""
        with self.holding(region):
            if self._partial(region) or not self.recheck_region(region):
                return False  # (a partial region's device bytes are only its base)
            with self.meta:
                for bitmap in (self.volume.overlay, self.volume.bad, self.volume.ioerror):
                    bitmap.clear(region)
            return True

    def replica_holds(self, region: int, digest: bytes) -> bool:
        """The mirror holds bytes of this region whose digest is ``digest`` (verified by the
        caller, drtool.fetch): when that is what the manifest says, no log record is needed to
        ship the region (its ``norecord`` bit goes, and its ``unreplicated`` bit unless records
        of it are pending).  False, nothing changed, when the region changed meanwhile."""
        with self.holding(region):
            if not self.volume.manifest.matches(region, digest):
                return False
            with self.meta:
                self.volume.norecord.clear(region)
                if not self.log.has_pending(region):
                    self.volume.unreplicated.clear(region)
            return True

    # -- replication's bookkeeping ----------------------------------------------------------

    def acknowledge(self, seqs: list[int]) -> None:
        """The secondary holds these records: forget them, clear the unreplicated bit of regions
        left with nothing pending, and move the watermark (forced batches are acknowledged out
        of order: those above it are remembered, so neither status nor a restart counts them)."""
        emptied = self.log.acknowledge(seqs)
        with self.meta:
            self._acknowledged(emptied)
            oldest = self.log.oldest_seq()
            through = (oldest - 1) if oldest else self.log.next_seq - 1
            replication = self.record.replication
            replication.acked_through = through
            ahead = set(replication.acked_ahead) | set(seqs)
            replication.acked_ahead = sorted(seq for seq in ahead if seq > through)

    def _acknowledged(self, regions: Iterable[int]) -> None:
        with self.meta:
            for region in regions:
                if not self.volume.norecord.test(region) and not self.log.has_pending(region):
                    self.volume.unreplicated.clear(region)

    def enter_bitmap_mode(self, now: float) -> int:
        """The log outgrew its limit: drop its records, keep their regions marked (they ship from
        the volume itself later).  Returns how many regions."""
        with self.meta:
            covered = self.covered_seq()
            self.save()
            regions = self.log.drop_through(covered)
            for region in regions:
                self.volume.norecord.set(region)
                self.volume.unreplicated.set(region)
            replication = self.record.replication
            replication.bitmap_mode_since = now
            replication.overflows = (replication.overflows or 0) + 1
            replication.dropped_through = covered
            self.save_bitmaps()
        return len(regions)

    # -- recovery's bookkeeping --------------------------------------------------------------

    def count_fetched(self, regions: int, nbytes: int) -> None:
        """Regions served from the replica, in the recovery's totals."""
        with self.meta:
            recovery = self.record.recovery
            if recovery is not None:
                recovery.fetched_regions += regions
                recovery.fetched_bytes += nbytes

    def failback_progress(self, nbytes: int) -> None:
        """Regions copied back: counted, and durable with the maps (a restart resumes here).

        Exact: the regions done are those marked to copy (``total_regions``, which grows when a
        write puts an already copied region back in the overlay) less those still marked, so a
        redone batch or a rewritten region never counts twice."""
        with self.meta:
            info = self.record.failback
            self._count_failback(info)
            info.bytes_copied += nbytes
        self.save()

    def _count_failback(self, info: Failback) -> None:
        remaining = self.volume.resync.popcount()
        info.total_regions = max(info.total_regions, remaining)
        info.done_regions = info.total_regions - remaining
