"""The engine: one open volume serving verified reads and logged writes.

Reads are *merged*: each region comes from the overlay (when it holds the
region), from the replica (the *requested portion*: bad regions, plus regions
changed since ``local_era`` when the local copy is older), or from the local
device; every byte is checked against the manifest before it is returned.  A
local region that fails its check is marked bad and fetched instead (a
self-healing read); in normal mode that also switches the volume to degraded
mode when ``auto_degrade`` is on.

Writes are logged first (storage.replog), then applied to the device (normal
mode) or to the overlay (degraded and resync modes), then the manifest, era and
unreplicated bit of the region are updated.

Locking: a write holds its region's stripe lock while it changes the region;
reads take no lock and re-check a failed region under the lock before calling it
bad (a write may have been half way through).  Lock order: stripe -> meta -> log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import blake3

from drtool.errors import DataUnavailable, DeviceError, DeviceIOError, NotPermitted, UsageError
from drtool.regions import Geometry, Run, to_runs
from drtool.storage import overlay as overlay_file
from drtool.buffers import aligned_bytes
from drtool.storage.device import Device
from drtool.storage.maps import RegionBitmap, zero_digest
from drtool.storage.paths import state_root
from drtool.storage.replog import ReplicationLog
from drtool.storage.volume import Volume
from drtool.wire import FLAG_OVERLAY, KIND_WRITE, KIND_ZERO

log = logging.getLogger("drtool.engine")

STRIPES = 256
ALIGN_FROM = 64 * 1024
READAHEAD_REGIONS = 1024  # look this far ahead for requested regions ...
READAHEAD_MAX = 256  # ... and fetch at most this many of them with the read
DEFAULT_SETTINGS: dict[str, Any] = {
    "copy_on_read": True,  # keep regions fetched from the replica in the overlay
    "auto_degrade": True,  # a bad region seen while serving switches to degraded mode
    "log_limit": 1 << 30,  # bytes of pending log before bitmap mode
}


@dataclass
class RegionRead:
    """Where each region of a read comes from."""

    local: list[int]
    overlay: list[int]
    remote: list[int]


class Engine:
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
        self.device: Device | None = None
        self.overlay: Device | None = None
        self.fetcher: Any = None  # drtool.fetch.RemoteFetcher, created on first need
        self.replicator: Any = None  # drtool.replication.Replicator, set by the caller
        self.read_only_reason: str | None = None
        if self.record.role == "secondary":
            self.read_only_reason = "this host is the secondary for this volume"
        self._open_device()
        if self.record.mode != "normal":
            self.overlay = overlay_file.open_overlay(volume.paths.overlay, self.geometry.size)

    # -- lifecycle ------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | None, name: str) -> Engine:
        volume = Volume.open(state_root(root), name)
        try:
            last = max(volume.covered_seq.values())
            replog = ReplicationLog.open(volume.paths.log_dir, volume.record.volume_id_bytes,
                                         volume.geometry, last_seq=last)
        except BaseException:
            volume.close()
            raise
        engine = cls(volume, replog)
        try:
            engine._replay()
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
            if self.volume.lock is not None:
                self.flush()
                self.save()
        finally:
            for handle in (self.device, self.overlay):
                if handle is not None:
                    handle.close()
            self.device = self.overlay = None
            self.log.close()
            self.volume.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def settings(self) -> dict[str, Any]:
        return {**DEFAULT_SETTINGS, **(self.record.settings or {})}

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
        with self.meta:
            self.flush()  # maps on disk must never point at log records or bytes that are not
            covered = self.covered_seq()
            if not self.protected:
                # Without a peer the log is only a write-ahead log: checkpointed records are done.
                self.log.acknowledge([e.seq for e in self.log.pending() if e.seq <= covered])
                self.record.replication["acked_through"] = covered
            self.volume.save_content_maps(covered)
            self.volume.save_bitmaps(covered)
            self.volume.save_record()
        self.log.trim(covered)

    def save_bitmaps(self) -> None:
        with self.meta:
            self.volume.save_bitmaps(self.covered_seq())
            self.volume.save_record()

    def _replay(self) -> None:
        """Redo log records newer than the maps on disk (after a crash; idempotent)."""
        since = min(self.volume.covered_seq.values())
        records = self.log.records_after(since)
        if not records:
            return
        log.info("volume %s: replaying %d log records after sequence %d", self.name, len(records), since)
        touched: dict[int, bytes | None] = {}
        for entry in records:
            header = entry.header
            region = entry.region
            target = self._replay_target(header.overlay)
            if target is None:
                continue
            data = self.log.read_data(entry)
            if header.kind == KIND_WRITE:
                target.pwrite(data, header.offset)
            else:
                target.pwrite(bytes(header.length), header.offset)
            whole = header.length == self.geometry.region_length(region)
            if whole:
                touched[region] = header.digest if header.kind == KIND_WRITE else zero_digest(header.length)
            else:
                touched[region] = None
            self.volume.eras[region] = header.era
            if header.overlay:
                self.volume.overlay.set(region)
            if self.protected:
                self.volume.unreplicated.set(region)
        for region, digest in touched.items():
            if digest is None:
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
        self.save()

    def _forget_acknowledged(self) -> None:
        """Records the secondary acknowledged before we stopped are not pending any more."""
        acked = (self.record.replication or {}).get("acked_through", 0)
        done = [e.seq for e in self.log.pending() if e.seq <= acked]
        if done:
            self.region_acknowledged(self.log.acknowledge(done))

    def _replay_target(self, overlay: bool) -> Device | None:
        if overlay:
            return self.overlay  # None once failback folded the overlay into the device
        return self.device if self.device is not None and self.device.writable else None

    # -- eras and modes ---------------------------------------------------------------

    def checkpoint(self) -> int:
        with self.meta:
            return self.volume.checkpoint(self.log.next_seq)

    def enter_degraded(self, reason: str, local_era: int | None = None, source: str = "mirror",
                       auto: bool = False) -> bool:
        """Create the overlay and redirect writes to it.  Instant; idempotent."""
        with self.meta:
            if self.record.mode != "normal":
                recovery = self.record.recovery or {}
                if (local_era is not None and recovery.get("local_era") != local_era) or (
                        not auto and source != recovery.get("source", "mirror")):
                    raise NotPermitted(
                        f"volume {self.name} is already in {self.record.mode} mode with source "
                        f"{recovery.get('source')} and local era {recovery.get('local_era')}; "
                        "fail back before recovering differently")
                return False
            if not self.protected:
                raise NotPermitted(f"volume {self.name} has no replica (run drtool protect first)")
            if local_era is not None and not 1 <= local_era <= self.record.era:
                raise UsageError(f"local era {local_era} is not between 1 and the current era {self.record.era}")
            if source == "journal" and local_era is None:
                raise UsageError("--source journal needs --local-era (the changes are taken after that era)")
            overlay_file.create(self.volume.paths.overlay, self.geometry.size)
            self.overlay = overlay_file.open_overlay(self.volume.paths.overlay, self.geometry.size)
            # Regions written from now on carry a new era: failback ships exactly those to the mirror.
            era = self.volume.checkpoint(self.log.next_seq)
            self.record.mode = "degraded"
            self.record.recovery = {
                "entered": time.time(), "reason": reason, "auto": auto, "local_era": local_era,
                "source": source, "era": era, "fetched_regions": 0, "fetched_bytes": 0,
            }
            self.record.history.append({"event": "degraded", "time": time.time(), "reason": reason})
            self.save_bitmaps()
        log.log(logging.WARNING if auto else logging.INFO, "volume %s: entered degraded mode: %s", self.name, reason)
        return True

    def requested(self, region: int) -> bool:
        """Must this region's bytes come from the replica?"""
        if self.volume.overlay.test(region):
            return False
        if self.volume.bad.test(region):
            return True
        recovery = self.record.recovery
        if recovery and recovery.get("local_era") is not None:
            return self.volume.eras[region] >= recovery["local_era"]
        return False

    def requested_regions(self) -> RegionBitmap:
        recovery = self.record.recovery
        if not recovery or recovery.get("local_era") is None:
            return self.volume.bad.difference(self.volume.overlay)
        wanted = RegionBitmap(self.geometry.count)
        for region in range(self.geometry.count):
            if self.requested(region):
                wanted.set(region)
        return wanted

    def lost_regions(self) -> list[int]:
        """Requested regions nobody holds: never replicated and no log record left."""
        return [r for r in self.volume.norecord if self.requested(r)]

    # -- reads --------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> memoryview:
        """Verified bytes ``[offset, offset+length)`` of the merged volume."""
        geometry = self.geometry
        geometry.check_range(offset, length)
        if length == 0:
            return memoryview(b"")
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
        return view[offset - span_start:offset - span_start + length]

    def _healthy(self) -> bool:
        """Normal mode, no bad region, a device: every region is read locally."""
        return self.record.mode == "normal" and self.device is not None and not self.volume.bad.any()

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
            self._local_failure(failed)
        return failed

    def _recheck(self, device: Device, region: int, region_view: memoryview) -> bool:
        """Re-read a region that failed verification under its lock (a write may have raced)."""
        with self.stripes[region % STRIPES]:
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

    def _local_failure(self, regions: list[int]) -> None:
        """Self-healing: a device region failed while serving: mark it bad, maybe degrade."""
        self._set_bad(regions, io_error=False)
        log.warning("volume %s: regions %s failed verification while serving; marked bad",
                    self.name, to_runs(regions))
        if self.record.mode == "normal":
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
        if self.record.mode == "normal":
            if not (self.settings["auto_degrade"] and self.protected):
                raise DataUnavailable(f"volume {self.name}: regions {to_runs(regions)} are bad "
                                      "and the volume is not in recovery (drtool recover)")
            self.enter_degraded(f"read of bad regions {to_runs(regions)}", auto=True)
        fetcher = self._fetcher()
        fetcher.prepare(regions)  # lost check and forced replication: no region lock may be held
        ahead = self._readahead(regions)
        stripes = sorted({region % STRIPES for region in regions + ahead})
        for stripe in stripes:
            self.stripes[stripe].acquire()
        try:
            # A write may have moved a region into the overlay meanwhile: it is local now.
            moved = [r for r in regions if self.volume.overlay.test(r)]
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

    def _readahead(self, regions: list[int]) -> list[int]:
        """Requested regions just after a remote read, fetched in the same batch (copy-on-read
        keeps them): a sequential reader then pays one round trip per window, not per region."""
        if not self.settings["copy_on_read"] or self.overlay is None:
            return []
        volume = self.volume
        wanted = set(regions)
        ahead = []
        for region in range(max(regions) + 1, min(max(regions) + 1 + READAHEAD_REGIONS, self.geometry.count)):
            if (region not in wanted and self.requested(region) and not volume.norecord.test(region)
                    and not volume.unreplicated.test(region)):
                ahead.append(region)
                if len(ahead) >= READAHEAD_MAX:
                    break
        return ahead

    def _fetcher(self) -> Any:
        if self.fetcher is None:
            from drtool.fetch import RemoteFetcher

            self.fetcher = RemoteFetcher(self)
        return self.fetcher

    # -- writes --------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only_reason:
            raise NotPermitted(f"volume {self.name} does not accept writes: {self.read_only_reason}")

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        self.geometry.check_range(offset, len(view))
        position = 0
        for region, inner, length in self.geometry.split(offset, len(view)):
            self._write_region(region, inner, view[position:position + length])
            position += length
        self._after_write(fua)

    def write_zeroes(self, offset: int, length: int, fua: bool = False) -> None:
        self._check_writable()
        self.geometry.check_range(offset, length)
        for region, inner, part in self.geometry.split(offset, length):
            self._write_region(region, inner, None, zero_length=part)
        self._after_write(fua)

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        """Discard: whole regions become zeros (kept verifiable); partial regions are left alone."""
        self._check_writable()
        self.geometry.check_range(offset, length)
        for region, inner, part in self.geometry.split(offset, length):
            if part == self.geometry.region_length(region):
                self._write_region(region, inner, None, zero_length=part)
        self._after_write(fua)

    def _after_write(self, fua: bool) -> None:
        if fua:
            self.flush()
        if self.log.pending_bytes > self.settings["log_limit"] and self.replicator is not None:
            self.replicator.overflow()

    def flush(self) -> None:
        """Make every acknowledged write durable: the log, then the data files."""
        self.log.sync()
        for handle in (self.device, self.overlay):
            if handle is not None and handle.writable:
                handle.sync()

    def _write_region(self, region: int, inner: int, piece: memoryview | None, zero_length: int = 0) -> None:
        with self.stripes[region % STRIPES]:
            if self.record.mode == "normal":
                try:
                    self._write_device(region, inner, piece, zero_length)
                    return
                except _NeedsOverlay as why:
                    if not (self.settings["auto_degrade"] and self.protected):
                        raise DataUnavailable(f"volume {self.name}: cannot write region {region}: {why}") from None
                    self.enter_degraded(f"write to region {region} failed: {why}", auto=True)
            self._write_overlay(region, inner, piece, zero_length)

    def _new_content(self, region: int, inner: int, piece: memoryview | None, zero_length: int,
                     base: Callable[[], bytearray]) -> tuple[memoryview | None, bytes, bool]:
        """The region's bytes after the write: (whole-region data or None for zeros, digest, whole)."""
        length = self.geometry.region_length(region)
        size = zero_length if piece is None else len(piece)
        if inner == 0 and size == length:
            if piece is None:
                return None, zero_digest(length), True
            return piece, blake3.blake3(piece).digest(), True
        content = base()
        content[inner:inner + size] = piece if piece is not None else bytes(size)
        return memoryview(content), blake3.blake3(content).digest(), False

    def _write_device(self, region: int, inner: int, piece: memoryview | None, zero_length: int) -> None:
        if self.device is None or not self.device.writable:
            raise _NeedsOverlay("the device is not available for writing")
        if self.volume.bad.test(region) and not (inner == 0 and (zero_length or len(piece or b"")) ==
                                                  self.geometry.region_length(region)):
            raise _NeedsOverlay("the region is bad")
        start, length = self.geometry.region_bounds(region)

        def base() -> bytearray:
            content = bytearray(length)
            try:
                self.device.readinto(content, start)
            except DeviceIOError as exc:
                self._set_bad([region], io_error=True)
                raise _NeedsOverlay(str(exc)) from None
            if not self.volume.manifest.matches(region, blake3.blake3(content).digest()):
                self._set_bad([region], io_error=False)
                raise _NeedsOverlay("its current bytes fail verification")
            return content

        content, digest, whole = self._new_content(region, inner, piece, zero_length, base)
        size = zero_length if piece is None else len(piece)
        seq = self._log(region, start + inner, size, piece, digest if whole else None, flags=0)
        try:
            if piece is None:
                self._zero_device(self.device, start + inner, size, whole)
            else:
                self.device.pwrite(piece, start + inner)
        except DeviceError as exc:
            self._done(seq)
            self._set_bad([region], io_error=True)
            raise _NeedsOverlay(str(exc)) from None
        with self.meta:
            self.volume.manifest[region] = digest
            self.volume.eras[region] = self.record.era
            if whole:
                self.volume.bad.clear(region)
            if self.protected:
                self.volume.unreplicated.set(region)
        self._done(seq)

    def _write_overlay(self, region: int, inner: int, piece: memoryview | None, zero_length: int) -> None:
        start, length = self.geometry.region_bounds(region)
        content, digest, whole = self._new_content(
            region, inner, piece, zero_length, lambda: bytearray(self.read_region(region)))
        # Overlay records always hold the whole region: the overlay replica needs no base to apply them.
        seq = self._log(region, start, length, content, digest, flags=FLAG_OVERLAY)
        if content is None:
            self._zero_device(self.overlay, start, length, True)
        else:
            self.overlay.pwrite(content, start)
        with self.meta:
            self.volume.manifest[region] = digest
            self.volume.eras[region] = self.record.era
            self.volume.overlay.set(region)
            self.volume.unreplicated.set(region)
            if self.record.mode == "resync":
                self.volume.resync.set(region)
        self._done(seq)

    def _log(self, region: int, offset: int, length: int, data: memoryview | None, digest: bytes | None,
             flags: int) -> int:
        with self.seq_lock:
            if data is None:
                entry = self.log.append(KIND_ZERO, offset, length, self.record.era, flags=flags)
            else:
                entry = self.log.append(KIND_WRITE, offset, length, self.record.era, data, digest, flags)
            self.inflight.add(entry.seq)
        return entry.seq

    def _done(self, seq: int) -> None:
        with self.seq_lock:
            self.inflight.discard(seq)

    def _zero_device(self, device: Device, offset: int, length: int, whole: bool) -> None:
        if whole and device.punch_hole(offset, length):
            return
        device.pwrite(bytes(length), offset)

    def store_fetched(self, region: int, data: bytes, digest: bytes, rollback: bool = False) -> None:
        """Copy-on-read: keep a fetched region in the overlay so the next read is local.

        Bytes that differ from the manifest (a snapshot source rolls the region back)
        are a change of the volume: they are logged and replicated like a write.
        """
        with self.stripes[region % STRIPES]:
            if self.overlay is None or self.volume.overlay.test(region):
                return  # not in recovery any more, or a write got there first
            if not self.volume.manifest.matches(region, digest):
                if not rollback:
                    return  # the region changed while it was fetched: these bytes are stale
                start, length = self.geometry.region_bounds(region)
                seq = self._log(region, start, length, memoryview(data), digest, FLAG_OVERLAY)
                self.overlay.pwrite(data, start)
                with self.meta:
                    self.volume.manifest[region] = digest
                    self.volume.eras[region] = self.record.era
                    self.volume.overlay.set(region)
                    self.volume.unreplicated.set(region)
                self._done(seq)
                return
            self.overlay.pwrite(data, self.geometry.region_start(region))
            with self.meta:
                self.volume.overlay.set(region)

    # -- shipping support (called by the replicator) -------------------------------------

    def relog_region(self, region: int) -> int | None:
        """Append a log record holding a whole region's current bytes (bitmap-mode resync).

        Returns the sequence number, or None when the region cannot be read correctly
        (it stays marked: its bytes exist nowhere else).
        """
        with self.stripes[region % STRIPES]:
            in_overlay = self.volume.overlay.test(region)
            if not in_overlay and (self.volume.bad.test(region) or self.device is None):
                return None
            start, length = self.geometry.region_bounds(region)
            content = bytearray(length)
            source = self.overlay if in_overlay else self.device
            try:
                if self._read_local(source, region, 1, region, memoryview(content)):
                    return None
            except DataUnavailable:
                return None
            digest = self.volume.manifest[region]
            if digest == zero_digest(length):
                seq = self._log(region, start, length, None, None, FLAG_OVERLAY if in_overlay else 0)
            else:
                seq = self._log(region, start, length, memoryview(content), digest,
                                FLAG_OVERLAY if in_overlay else 0)
            with self.meta:
                self.volume.norecord.clear(region)
                self.volume.unreplicated.set(region)
            self._done(seq)
            return seq

    def region_acknowledged(self, regions: Iterable[int]) -> None:
        """The secondary holds these regions' latest records: clear their unreplicated bits."""
        with self.meta:
            for region in regions:
                if not self.volume.norecord.test(region) and not self.log.has_pending(region):
                    self.volume.unreplicated.clear(region)


class _NeedsOverlay(Exception):
    """Internal: the device cannot take this write; it must go to the overlay."""
