"""Failback: bring a repaired or replaced device back, copying only what it lacks.

What is copied: every bad region (from the recovery source, verified), every
overlay region (the writes and copy-on-reads of the incident) and, when the
local copy was an older point in time, every region changed since that era.
Overlay regions written during the incident are also logged as ordinary records
so the mirror receives them.  Progress persists in the ``resync`` bitmap, so an
interrupted failback resumes where it stopped; ``rate`` throttles it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from drtool import detect
from drtool.engine import modes
from drtool.errors import DeviceError, NotPermitted
from drtool.regions import to_runs
from drtool.storage import overlay as overlay_file
from drtool.storage.device import Device, probe
from drtool.storage.maps import zero_digest
from drtool.storage.records import Failback

log = logging.getLogger("drtool.failback")

BATCH_BYTES = 16 << 20


def failback(engine: Any, device: str | None = None, rate: int | None = None,
             progress_start: Callable[[int], None] | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) failback; returns a summary.  Idempotent in normal mode."""
    record = engine.record
    if modes.is_normal(record):
        if device and device != record.device:
            raise NotPermitted(f"volume {engine.name} is not in recovery; nothing to fail back onto {device}")
        return {"volume": engine.name, "changed": False, "mode": record.mode, "regions_copied": 0}
    if not modes.resyncing(record):
        _prepare(engine, device)
    elif device and device != record.device:
        raise NotPermitted(f"failback of {engine.name} is already running onto {record.device}")
    else:
        _check_device(engine, record.device)
    total = engine.volume.resync.popcount()
    if progress_start:
        progress_start(total * engine.geometry.region_size)
    copied = _copy(engine, rate, progress)
    _finish(engine)
    return {"volume": engine.name, "changed": True, "mode": record.mode, "regions_copied": copied,
            "device": record.device, "failback": record.failback.to_json()}


def _check_device(engine: Any, path: str) -> None:
    found = probe(path, expected_size=engine.geometry.size)
    if not found.ok:
        raise DeviceError(f"cannot fail back onto {path}: {found.reason}")


def _prepare(engine: Any, device: str | None) -> None:
    """Degraded -> resync: point at the device, verify what it holds, mark what to copy."""
    record = engine.record
    new_device = bool(device) and device != record.device
    path = device or record.device
    _check_device(engine, path)
    with engine.meta:
        if new_device:
            record.device = path
        if engine.device is not None:
            engine.device.close()
        engine.device = Device(path, writable=True)
    if new_device or record.faulted:
        # A replaced or repaired device holds unknown bytes: verify them all, copy only what differs.
        detect.scrub(engine.volume)
        if record.faulted:
            raise DeviceError(f"cannot fail back: device {path} is still unusable ({record.faulted.reason})")
        _drop_copies_the_device_holds(engine)
    lost = engine.lost_regions()
    if lost:
        raise NotPermitted(
            f"volume {engine.name}: regions {to_runs(lost)} are lost (never replicated); write them "
            "(they then live in the overlay) before failing back")
    with engine.meta:
        wanted = engine.requested_regions()
        for region in engine.volume.overlay:
            wanted.set(region)
        for region in wanted:
            engine.volume.resync.set(region)
        modes.start_resync(record, Failback(started=time.time(), device=path, total_regions=wanted.popcount()))
        engine.save()


def _drop_copies_the_device_holds(engine: Any) -> None:
    """Copy-on-read regions the (new) device already holds correctly need no copying back."""
    incident_era = engine.record.recovery.era
    volume = engine.volume
    for region in list(volume.overlay):
        if volume.eras[region] < incident_era and engine.recheck_region(region):
            with engine.meta:
                volume.overlay.clear(region)
                volume.bad.clear(region)
                volume.ioerror.clear(region)


def _copy(engine: Any, rate: int | None, progress: Callable[[int], None] | None) -> int:
    geometry = engine.geometry
    per_batch = max(1, BATCH_BYTES // geometry.region_size)
    started = time.monotonic()
    copied_bytes = 0
    copied = 0
    fetcher = engine._fetcher()
    while True:
        batch = []
        for region in engine.volume.resync:
            batch.append(region)
            if len(batch) >= per_batch:
                break
        if not batch:
            return copied
        remote = [r for r in batch if not engine.volume.overlay.test(r)]
        fetched = fetcher.fetch(remote) if remote else {}
        done_bytes = 0
        for region in batch:
            done_bytes += _copy_region(engine, region, fetched.get(region))
        engine.device.sync()
        copied += len(batch)
        copied_bytes += done_bytes
        with engine.meta:
            info = engine.record.failback
            info.done_regions += len(batch)
            info.bytes_copied += done_bytes
        engine.save()  # progress is durable: a restart resumes here
        if progress:
            progress(done_bytes)
        if rate:
            ahead = copied_bytes / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def _copy_region(engine: Any, region: int, fetched: tuple[bytes, bytes] | None) -> int:
    """Copy one region into the device under its lock; returns the bytes written."""
    geometry = engine.geometry
    start, length = geometry.region_bounds(region)
    volume = engine.volume
    with engine.stripes[region % len(engine.stripes)]:
        if volume.overlay.test(region):
            data = bytearray(length)
            if engine._read_local(engine.overlay, region, 1, region, memoryview(data)):
                raise DeviceError(f"overlay region {region} fails verification; failback stopped")
            incident_era = engine.record.recovery.era
            if volume.eras[region] >= incident_era:
                # Written during the incident: the mirror has not seen it yet.
                digest = volume.manifest[region]
                zero = digest == zero_digest(length)
                engine._done(engine._log(region, start, length, None if zero else memoryview(data), digest, 0))
                with engine.meta:
                    volume.unreplicated.set(region)
        elif fetched is not None:
            data = fetched[0]
        else:
            return 0  # a write moved it into the overlay meanwhile; a later batch copies it
        engine.device.pwrite(data, start)
        with engine.meta:
            volume.overlay.clear(region)
            volume.bad.clear(region)
            volume.ioerror.clear(region)
            volume.resync.clear(region)
    return length


def _finish(engine: Any) -> None:
    record = engine.record
    with engine.meta:
        if engine.volume.resync.any():
            return
        engine.flush()
        modes.finish_resync(record)
        if engine.overlay is not None:
            engine.overlay.close()
            engine.overlay = None
        engine.save()
        overlay_file.remove(engine.volume.paths.overlay)
    log.info("volume %s: failback complete, back to normal", engine.name)
