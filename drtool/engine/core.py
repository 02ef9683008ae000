"""The engine's core: opening a volume, crash replay, checkpoints, the mode transitions
(engine/modes.py says which exist), role and pairing changes, and the state the read path
(reads.py), the write path (writes.py) and the commit routine (changes.py, which also
states the locking rule) share.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import blake3

from drtool import detect
from drtool.engine import modes
from drtool.engine.changes import DEVICE, OVERLAY, StateChanges
from drtool.engine.reads import ReadPath
from drtool.engine.writes import WritePath
from drtool.errors import ConfirmationNeeded, DataUnavailable, DeviceError, DeviceIOError, NotPermitted, UsageError
from drtool.fetch import RemoteFetcher
from drtool.regions import Geometry, format_runs, to_runs
from drtool.storage import overlay as overlay_file
from drtool.storage.device import Device
from drtool.storage.maps import BLOCK_SIZE, RegionBitmap, merge_regions, overlay_block_digest, zero_digest
from drtool.storage.paths import state_root
from drtool.storage.records import Demoted, Failback, Loss, Recovery, Replication
from drtool.storage.replog import ReplicationLog
from drtool.storage.volume import Volume
from drtool.wire import KIND_BASE, KIND_WRITE

log = logging.getLogger("drtool.engine")

STRIPES = 256
DEFAULT_SETTINGS: dict[str, Any] = {
    "copy_on_read": True,  # keep regions fetched from the replica in the overlay
    "auto_degrade": True,  # a bad region seen while serving switches to degraded mode
    "log_limit": 1 << 30,  # bytes of pending log before bitmap mode
    # Seconds one request to the replica may wait while a client's read needs it; with the
    # client's retries, a read of regions only a hung replica holds fails with EIO after
    # about four times this.
    "fetch_timeout": 30.0,
}
MIN_LOG_LIMIT = 1 << 20  # below this, every burst of writes would overflow into bitmap mode
#: At most this many overlay regions (written since failback's last copy pass) are copied by
#: Engine.finish_resync itself, with every write held back; more go back to failback's copy loop.
FINISH_COPY_REGIONS = 64


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"setting {key} must be true or false, not {value!r}")
    return value


def _log_limit(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_LOG_LIMIT:
        raise UsageError(f"setting {key} must be a byte count of at least {MIN_LOG_LIMIT}, not {value!r}")
    return value


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.1 <= value <= 3600:
        raise UsageError(f"setting {key} must be seconds between 0.1 and 3600, not {value!r}")
    return float(value)


_CHECKS = {"copy_on_read": _flag, "auto_degrade": _flag, "log_limit": _log_limit, "fetch_timeout": _seconds}


def effective_settings(stored: dict[str, Any] | None) -> dict[str, Any]:
    """A volume's settings: the defaults, overridden by what its record stores."""
    return {**DEFAULT_SETTINGS, **(stored or {})}


def check_settings(changes: dict[str, Any]) -> dict[str, Any]:
    """Validated setting changes (the names of DEFAULT_SETTINGS, each with its own type)."""
    checked: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in DEFAULT_SETTINGS:
            raise UsageError(f"unknown setting {key!r} (known: {', '.join(sorted(DEFAULT_SETTINGS))})")
        checked[key] = _CHECKS[key](key, value)
    return checked


class Engine(ReadPath, WritePath, StateChanges):
    """Open with :meth:`open`; thread-safe for concurrent reads and writes."""

    def __init__(self, volume: Volume, log_: ReplicationLog) -> None:
        self.volume = volume
        self.log = log_
        self.geometry: Geometry = volume.geometry
        self.record = volume.record
        self.name = volume.name
        self.stripes = [threading.RLock() for _ in range(STRIPES)]
        self.meta = threading.RLock()
        self.seq_lock = threading.Lock()
        self.inflight: set[int] = set()
        self._finish_refused = False  # finish_resync left regions to failback's copy loop once
        self._retired: list[Device] = []  # handles replaced (an overlay, a device), closed by close()
        self.device: Device | None = None
        self.overlay: Device | None = None
        self.fetcher: RemoteFetcher | None = None  # created on first need
        self.replicator: Any = None  # drtool.replication.Replicator, set by the caller
        self.read_only_reason: str | None = None
        self.look_only = False  # set by open(look_only=True): close() saves nothing
        if self.record.role == "secondary":
            self.read_only_reason = "this host is the secondary for this volume"
        self._open_device()
        if modes.in_recovery(self.record):
            self.overlay = overlay_file.open_overlay(volume.paths.overlay, self.geometry.size)

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | None, name: str, look_only: bool = False) -> Engine:
        """Open (and lock) a volume.  ``look_only``: the caller only reads (a plan, check mode),
        so closing saves nothing unless opening had to replay the log after a crash."""
        volume = Volume.open(state_root(root), name)
        try:
            last = max(volume.covered_seq.values())
            replication = volume.record.replication
            replog = ReplicationLog.open(volume.paths.log_dir, volume.record.volume_id_bytes,
                                         volume.geometry, last_seq=last,
                                         covered_through=min(volume.covered_seq.values()),
                                         done_through=replication.done_through(),
                                         acked_ahead=replication.acked_ahead, report_damage=True)
        except BaseException:
            volume.close()
            raise
        engine = cls(volume, replog)
        engine.look_only = look_only
        try:
            engine._replay()
            engine._account_log_damage()
            engine._forget_acknowledged()
        except BaseException:
            engine.close()
            raise
        return engine

    def _open_device(self) -> None:
        if self.device is not None:
            return
        try:
            self.device = self.volume.open_device(writable=True)
        except (DeviceError, UsageError):
            try:
                self.device = self.volume.open_device(writable=False)
            except (DeviceError, UsageError) as exc:
                self.device = None
                log.warning("volume %s: device unavailable: %s", self.name, exc)

    def reopen_device(self) -> None:
        if self.device is None:
            self._open_device()

    def drop_device(self) -> None:
        """The device is gone: stop using its file descriptor (it may point at a deleted file)."""
        with self.meta:
            if self.device is not None:
                self.device.close()
                self.device = None

    def close(self) -> None:
        try:
            if self.volume.lock is not None and not self.look_only:
                self.sync_all()
                self.save()
        finally:
            for handle in (self.device, self.overlay, *self._retired):
                if handle is not None:
                    handle.close()
            self.device = self.overlay = None
            self._retired.clear()
            self.log.close()
            self.volume.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def settings(self) -> dict[str, Any]:
        return effective_settings(self.record.settings)

    def configure(self, changes: dict[str, Any]) -> bool:
        """Change settings (live: every reader of ``settings`` sees them at once); saved durably."""
        changes = check_settings(changes)
        with self.meta:
            current = self.settings
            if all(current[key] == value for key, value in changes.items()):
                return False
            self.record.settings = {**(self.record.settings or {}), **changes}
            self.volume.save_record()
        log.info("volume %s: settings changed: %s", self.name, changes)
        return True

    @property
    def size(self) -> int:
        return self.geometry.size

    @property
    def mode(self) -> str:
        return self.record.mode

    @property
    def protected(self) -> bool:
        return self.record.peer is not None

    # -- persistence ------------------------------------------------------------------

    def covered_seq(self) -> int:
        """Every record up to this sequence is fully reflected in the in-memory maps."""
        with self.seq_lock:
            return (min(self.inflight) - 1) if self.inflight else self.log.next_seq - 1

    def save(self) -> None:
        """Checkpoint the maps and trim the log records they (and the secondary) no longer need."""
        # The bulk of the data files' sync first, without ``meta``: a FLUSH syncs only the log,
        # so a checkpoint may find seconds of writes to sync, and writers wait for ``meta`` in
        # their map step; under ``meta`` the sync below then has only what came meanwhile.
        self.sync_all()
        with self.meta:
            self.sync_all()  # maps on disk must never point at log records or bytes that are not
            covered = self.covered_seq()
            if self.record.failback is not None and modes.resyncing(self.record):
                self._count_failback(self.record.failback)  # the progress saved is the maps
            if not self.protected:
                # Without a peer the log is only a write-ahead log: checkpointed records are done.
                self.log.acknowledge([e.seq for e in self.log.pending() if e.seq <= covered])
                self.record.replication.acked_through = covered
            self.volume.save_content_maps(covered)
            self.volume.save_bitmaps(covered)
            self.volume.save_record()
        self.log.trim(covered)

    def save_bitmaps(self) -> None:
        with self.meta:
            self.sync_all()  # the maps may only claim records (and bytes) that are durable
            self.volume.save_bitmaps(self.covered_seq())
            self.volume.save_record()

    def _replay(self) -> None:
        """Redo log records newer than the maps on disk (after a crash; idempotent).

        Each record's bytes go back where the live change wrote them (the device, or the
        overlay for an overlay record), and the maps are rebuilt by the commit routine's own map
        step (changes.StateChanges._commit_maps): an overlay record written during failback is
        marked to be copied back again, a whole region back on the device leaves the overlay."""
        since = min(self.volume.covered_seq.values())
        records = self.log.records_after(since)
        if not records:
            return
        log.info("volume %s: replaying %d log records after sequence %d", self.name, len(records), since)
        partial: dict[int, int] = {}  # region -> era of its last partial record: digested at the end
        blocks = self.volume.overlay_blocks
        for entry in records:
            header = entry.header
            region = entry.region
            if header.kind == KIND_BASE:
                continue  # for the overlay replica: the block record after it says what changed here
            target = self._replay_target(header.overlay)
            if target is None:
                continue
            data = self.log.read_data(entry)
            if header.kind == KIND_WRITE:
                target.pwrite(data, header.offset)
            else:
                target.pwrite(bytes(header.length), header.offset)
            whole = header.length == self.geometry.region_length(region)
            digest = None
            if (not whole and header.overlay and blocks is not None
                    and (not self.volume.overlay.test(region) or blocks.partial(region))):
                # A block write into a region the overlay did not hold whole (engine.writes.
                # _write_blocks): its blocks join the block map again, their digests taken from
                # the overlay as the record left it (a record smaller than a block: the rest of
                # that block was put there by the live write, as for any partial record).
                partial.pop(region, None)
                self._commit_maps(region, None, header.era, OVERLAY, False, logged=True,
                                  overlay_blocks=self._overlay_blocks_of(target, region, header.offset,
                                                                         header.length))
                continue
            if whole:
                digest = header.digest if header.kind == KIND_WRITE else zero_digest(header.length)
                partial.pop(region, None)
            else:
                partial[region] = header.era
            self._commit_maps(region, digest, header.era, OVERLAY if header.overlay else DEVICE, whole,
                              logged=True)
        for region, era in partial.items():
            if blocks is not None and blocks.partial(region):
                continue  # (its digest is its base's; its blocks were digested as replayed)
            target = self.overlay if self.volume.overlay.test(region) else self.device
            start, length = self.geometry.region_bounds(region)
            try:
                digest = blake3.blake3(target.pread(length, start)).digest() if target else None
            except DeviceIOError:
                digest = None
            if digest is None:
                self._set_bad([region], io_error=True)
                continue
            self.volume.manifest[region] = digest
            self.volume.eras[region] = era
        self.save()

    def _overlay_blocks_of(self, overlay: Device, region: int, offset: int, length: int) -> tuple[int, list[bytes]]:
        """(first block, digests) of the blocks of ``region`` that [offset, offset+length) touches,
        as the overlay holds them now."""
        start, size = self.geometry.region_bounds(region)
        lo = (offset - start) // BLOCK_SIZE * BLOCK_SIZE
        hi = min(-(-(offset + length - start) // BLOCK_SIZE) * BLOCK_SIZE, size)
        data = memoryview(overlay.pread(hi - lo, start + lo))
        return lo // BLOCK_SIZE, [overlay_block_digest(data[at:at + BLOCK_SIZE])
                                  for at in range(0, hi - lo, BLOCK_SIZE)]

    def _account_log_damage(self) -> None:
        """The log lost records (damage found at open, storage.replog): never believe them
        shipped.  Their regions are shipped whole from the volume (bitmap mode); regions whose
        current bytes the maps may not know are digested again from where they live."""
        damaged = self.log
        if not (damaged.damage or damaged.damaged_regions or damaged.rescan_regions or damaged.lost_ranges):
            return
        for line in damaged.damage:
            log.error("volume %s: replication log damage: %s", self.name, line)
        with self.meta:
            volume = self.volume
            ship_whole = set(damaged.damaged_regions)
            if damaged.lost_ranges and self.protected:
                # Lost pending records of unknown regions: every unreplicated region ships whole.
                volume.norecord.set_runs(volume.unreplicated.runs())
            for region in sorted(damaged.rescan_regions):
                if self._partial(region) and self.overlay is not None:
                    # Its held blocks are digested again from the overlay; its base is untouched.
                    start, length = self.geometry.region_bounds(region)
                    for block in volume.overlay_blocks.held(region):
                        volume.overlay_blocks.add(region, *self._overlay_blocks_of(
                            self.overlay, region, start + block * BLOCK_SIZE, 1))
                    ship_whole.add(region)
                    continue
                target = self.overlay if volume.overlay.test(region) else self.device
                start, length = self.geometry.region_bounds(region)
                try:
                    digest = blake3.blake3(target.pread(length, start)).digest() if target else None
                except DeviceIOError:
                    digest = None
                if digest is None:
                    self._set_bad([region], io_error=True)
                    continue
                if not volume.manifest.matches(region, digest):
                    volume.manifest[region] = digest
                    volume.eras[region] = self.record.era
                ship_whole.add(region)
            if self.protected:
                for region in ship_whole:
                    volume.unreplicated.set(region)
                    volume.norecord.set(region)
            self.record.history.append({"event": "log-damage", "time": time.time(),
                                        "findings": damaged.damage[:20],
                                        "regions_shipped_whole": len(ship_whole)})
        self.save()
        damaged.settle_damage()

    def _forget_acknowledged(self) -> None:
        """Records the secondary acknowledged before we stopped are not pending any more."""
        replication = self.record.replication
        acked = replication.done_through()
        ahead = set(replication.acked_ahead)
        done = [e.seq for e in self.log.pending() if e.seq <= acked or e.seq in ahead]
        if done:
            self._acknowledged(self.log.acknowledge(done))

    def _replay_target(self, overlay: bool) -> Device | None:
        if overlay:
            return self.overlay  # None once failback folded the overlay into the device
        return self.device if self.device is not None and self.device.writable else None

    # -- eras and modes ---------------------------------------------------------------

    def checkpoint(self) -> int:
        with self.meta:
            return self.volume.checkpoint(self.log.next_seq)

    def enter_degraded(self, reason: str, local_era: int | None = None, source: str = "mirror",
                       auto: bool = False, accept_rollback: bool = False) -> bool:
        """Create the overlay and redirect writes to it.  Instant; idempotent.  A snapshot
        source must exist on the replica server, and the regions it would take back in time
        (the requested regions the snapshot holds older bytes of) must be accepted
        (``accept_rollback``): both asked first, nothing changes otherwise."""
        recovery = self.record.recovery
        rolled_back: list[list[int]] | None = None
        if source.startswith("snapshot:") and not (recovery is not None and recovery.source == source):
            snapshot = source.split(":", 1)[1]
            fetcher = self._fetcher()
            fetcher.check_snapshot(snapshot)
            if not modes.in_recovery(self.record) and self.protected:
                back = to_runs(fetcher.rolled_back(
                    snapshot, lambda region: self.volume.would_request(region, local_era)))
                if back and not accept_rollback:
                    count = sum(n for _, n in back)
                    raise ConfirmationNeeded(
                        f"volume {self.name}: recovering from snapshot {snapshot} takes {count} "
                        f"region{'s' if count != 1 else ''} back to the snapshot's time ({format_runs(back, limit=20)}); "
                        "the rest of the volume stays as it is now, so data spanning them may be half old "
                        "and half new.  Nothing changed; run again with --accept-rollback to go ahead")
                rolled_back = [list(run) for run in back]
        with self.meta:
            if modes.in_recovery(self.record):
                recovery = self.record.recovery
                if recovery is not None and ((local_era is not None and recovery.local_era != local_era) or (
                        not auto and source != recovery.source)):
                    raise NotPermitted(
                        f"volume {self.name} is already in {self.record.mode} mode with source "
                        f"{recovery.source} and local era {recovery.local_era}; "
                        "fail back before recovering differently")
                return False
            if not self.protected:
                raise NotPermitted(f"volume {self.name} has no replica (run drtool protect first)")
            first = self.record.eras[0].era if self.record.eras else 1  # a promoted volume starts later
            if local_era is not None and not first <= local_era <= self.record.era:
                raise UsageError(f"local era {local_era} is not between {first} and the current era {self.record.era}")
            if source == "journal" and local_era is None:
                raise UsageError("--source journal needs --local-era (the changes are taken after that era)")
            overlay_file.create(self.volume.paths.overlay, self.geometry.size)
            self.overlay = overlay_file.open_overlay(self.volume.paths.overlay, self.geometry.size)
            # Regions written from now on carry a new era: failback ships exactly those to the mirror.
            era = self.volume.checkpoint(self.log.next_seq)
            modes.degrade(self.record, Recovery(entered=time.time(), reason=reason, auto=auto,
                                                local_era=local_era, source=source, era=era,
                                                rolled_back=rolled_back))
            self.save_bitmaps()
        log.log(logging.WARNING if auto else logging.INFO, "volume %s: entered degraded mode: %s", self.name, reason)
        return True

    def begin_resync(self, device: str) -> int:
        """degraded -> resync: mark every region the device must get back (the requested
        portion and the overlay); returns how many."""
        volume = self.volume
        with self.meta:
            modes.check(self.record, modes.RESYNC)  # before any bit is set
            wanted = 0
            for region in merge_regions(volume.requested_between(0, self.geometry.count), iter(volume.overlay)):
                volume.resync.set(region)
                wanted += 1
            modes.start_resync(self.record, Failback(started=time.time(), device=device, total_regions=wanted))
            self.save()
        return wanted

    def finish_resync(self) -> bool:
        """resync -> normal once every region is back in the device: the overlay goes.  False
        (nothing changes) while regions remain to copy, the first time it is asked: failback's
        copy loop copies them without stopping writes and asks again; asked again, it copies
        the rest itself, unless the replica must supply any or more than FINISH_COPY_REGIONS
        remain.

        Writes are shut out while it decides: it takes every stripe (in order, before ``meta``:
        changes.py's locking rule), so no write is between its mode check and its map step (a
        write's bytes in the overlay with its overlay/resync bits not set yet).  The few overlay
        regions still marked are copied here, under the stripes; a write waiting for its stripe
        runs after the switch, sees normal mode and goes to the device."""
        volume = self.volume
        with self.all_stripes(), self.meta:
            modes.check(self.record, modes.NORMAL)  # before any bit is set
            # The overlay goes with this transition: a region it still holds must be on the
            # device first (a write during failback marks it; this catches any it did not).
            for region in list(volume.overlay):
                if not volume.resync.test(region):
                    log.warning("volume %s: overlay region %d was not marked to copy back; copying it",
                                self.name, region)
                    volume.resync.set(region)
                    if self.record.failback is not None:
                        self.record.failback.total_regions += 1
            if volume.resync.any():
                left = list(volume.resync)
                if (not self._finish_refused or len(left) > FINISH_COPY_REGIONS
                        or not all(volume.overlay.test(r) and not self.partial_base_remote(r) for r in left)):
                    self._finish_refused = True  # failback's loop copies them, then asks again
                    return False
                # Asked again and written again meanwhile: copied here, or writes that never
                # pause would keep failback from ever finishing.
                copied = sum(self._copy_overlay_back(region) for region in left)
                if self.record.failback is not None:
                    self.record.failback.bytes_copied += copied
            if self.record.failback is not None:
                self._count_failback(self.record.failback)
            self._finish_refused = False
            self.sync_all()
            modes.finish_resync(self.record)
            if self.overlay is not None:
                # Not closed here: a flush (no lock) or a read may still hold this handle; it
                # stays open (its file unlinked) until the engine closes.
                self._retired.append(self.overlay)
                self.overlay = None
            self.save()
            overlay_file.remove(self.volume.paths.overlay)
        log.info("volume %s: failback complete, back to normal", self.name)
        return True

    def _copy_overlay_back(self, region: int) -> int:
        """finish_resync: one overlay region onto the device (logged for the mirror when written
        during the incident, as drtool.failback copies it).  Returns the bytes written."""
        data = self.read_verified(region)
        if data is None:
            raise DeviceError(f"overlay region {region} fails verification; failback stopped")
        recovery = self.record.recovery
        relog = recovery is None or self.volume.eras[region] >= recovery.era
        return self.copy_back(region, data, relog=relog)

    # -- roles --------------------------------------------------------------------------

    def refuse_writes(self, reason: str | None) -> str | None:
        """Refuse client writes with ``reason`` (None: accept them again); returns the previous one."""
        previous, self.read_only_reason = self.read_only_reason, reason
        return previous

    def become_secondary(self, demoted: Demoted) -> None:
        """The primary role is handed over: writes are refused from now on, durably."""
        with self.meta:
            self.record.role = "secondary"
            self.record.demoted = demoted
            self.record.history.append({"event": "demoted", "time": demoted.time, "forced": demoted.forced})
            self.read_only_reason = "this host is the secondary for this volume"
            self.save()

    # -- pairing ------------------------------------------------------------------------------

    def pair(self, peer: dict[str, Any], sync: Replication, lacking: Iterable[int] | None,
             lost: Loss | None = None) -> None:
        """Pair with ``peer``: the initial sync starts, durably.  The peer lacks exactly the
        ``lacking`` regions (None: every region); they ship from the volume itself (bitmap
        mode).  ``lost``: what a returning old primary lost, recorded on our promotion."""
        volume = self.volume
        with self.meta:
            self.record.peer = {**peer, "paired": time.time()}
            self.record.replication = sync
            if lost is not None and self.record.promoted is not None:
                self.record.promoted.lost = lost
            if lacking is None:
                volume.unreplicated.set_all()
                volume.norecord.set_all()
            else:
                volume.unreplicated.clear_all()
                volume.norecord.clear_all()
                for region in lacking:
                    volume.unreplicated.set(region)
                    volume.norecord.set(region)
            self.save()

    def update_peer(self, **settings: Any) -> None:
        """Change how the peer is reached (token file, CA) without pairing again."""
        with self.meta:
            self.record.peer.update(settings)
            self.save()

    def initial_sync_done(self) -> bool:
        """The peer holds every region: the initial sync is done (False: it already was)."""
        with self.meta:
            replication = self.record.replication
            changed = replication.initial_sync != "done"
            if changed:
                replication.initial_sync = "done"
                replication.finished = time.time()
            self.save()
        return changed

    # -- the device ------------------------------------------------------------------------

    def use_device(self, path: str) -> None:
        """Serve from (and fail back onto) the device at ``path`` from now on.

        Another device than the record's holds unknown bytes until a scrub's findings are
        saved: that scrub is recorded as pending (``failback.scrub_pending``), durably, before
        the record names the new device (a checkpoint may save that at any moment after), and
        only :meth:`scrub` clears it."""
        with self.meta:
            if path != self.record.device:
                info = self.record.failback
                if info is None or info.finished is not None:  # (a resync keeps its own)
                    info = Failback(started=time.time(), device=path, total_regions=0)
                info.device = info.scrub_pending = path
                self.record.failback = info
                self.volume.save_record()
                self.record.device = path
            if self.device is not None:
                self._retired.append(self.device)  # a flush (no lock) may still hold it: closed by close()
            self.device = Device(path, writable=True)

    def scrub(self, progress: Any = None, record: bool = True) -> Any:
        """Verify every local region (drtool.detect.scrub) with this engine's re-check and lock;
        a faulted device is dropped, a device back after a fault reopened.  A scrub of the
        device whose scrub use_device left pending clears that once its findings are saved."""
        device = self.record.device
        report = detect.scrub(self.volume, progress, recheck=self.recheck_region, record=record, lock=self.meta)
        if record:
            if report.faulted:
                self.drop_device()
            else:
                self.reopen_device()
                with self.meta:
                    info = self.record.failback
                    if info is not None and info.scrub_pending is not None and info.scrub_pending == device:
                        info.scrub_pending = None  # the findings are on disk (detect.scrub saved them)
                        self.volume.save_record()
        return report

    def fetch(self, regions: list[int]) -> dict[int, tuple[bytes, bytes]]:
        """Verified ``{region: (bytes, digest)}`` from the recovery source (drtool.fetch)."""
        return self._fetcher().fetch(regions)

    def requested(self, region: int) -> bool:
        """Must this region's bytes come from the replica?"""
        return self.volume.requested(region)

    def requested_regions(self) -> RegionBitmap:
        return self.volume.requested_regions()

    def lost_regions(self) -> RegionBitmap:
        """Requested regions that no log record holds and that the replica is not known to hold
        (:meth:`settle_lost` asks it)."""
        return self.volume.lost_regions()

    def settle_lost(self) -> RegionBitmap:
        """The lost regions, after asking the replica: a region is lost only when no copy
        matching the manifest exists anywhere, so those the mirror holds are not (their marks
        go, drtool.fetch.RemoteFetcher.settle).  The replica unreachable: as far as is known."""
        lost = self.lost_regions()
        if lost.any() and self.protected:
            try:
                self._fetcher().settle(iter(lost))
            except DataUnavailable as exc:
                log.warning("%s", exc)
            lost = self.lost_regions()
        return lost
