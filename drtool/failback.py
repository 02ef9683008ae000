"""Failback: bring a repaired or replaced device back, copying only what it lacks.

What is copied: every bad region (from the recovery source, verified), every
overlay region (the writes and copy-on-reads of the incident) and, when the
local copy was an older point in time, every region changed since that era.
Overlay regions written during the incident are also logged as ordinary records
so the mirror receives them.  Progress persists in the ``resync`` bitmap, so an
interrupted failback resumes where it stopped; ``rate`` throttles it.

The engine makes every change (drtool.ports.FailbackPort): this module
decides what to copy, in which order and how fast.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from drtool.engine import modes
from drtool.errors import DeviceError, NotPermitted
from drtool.ports import FailbackPort
from drtool.storage.device import probe

log = logging.getLogger("drtool.failback")

BATCH_BYTES = 16 << 20


def failback(engine: FailbackPort, device: str | None = None, rate: int | None = None,
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
    copied = 0
    while True:
        copied += _copy(engine, rate, progress)
        if engine.finish_resync():  # False: a write put a region back in the overlay meanwhile
            break
    return {"volume": engine.name, "changed": True, "mode": record.mode, "regions_copied": copied,
            "device": record.device, "failback": record.failback.to_json()}


def _check_device(engine: FailbackPort, path: str) -> None:
    found = probe(path, expected_size=engine.geometry.size)
    if not found.ok:
        raise DeviceError(f"cannot fail back onto {path}: {found.reason}")


def _prepare(engine: FailbackPort, device: str | None) -> None:
    """Degraded -> resync: point at the device, verify what it holds, mark what to copy."""
    record = engine.record
    path = device or record.device
    _check_device(engine, path)
    # Another device: use_device records its scrub as pending (durably, before the record names
    # it), and only the scrub's saved findings clear that; a run killed in the scrub (after a
    # checkpoint saved the new device) scrubs again.
    engine.use_device(path)
    if _scrub_pending(engine, path) or record.faulted:
        # A replaced or repaired device holds unknown bytes: verify them all, copy only what differs.
        engine.scrub()
        if record.faulted:
            raise DeviceError(f"cannot fail back: device {path} is still unusable ({record.faulted.reason})")
        _drop_copies_the_device_holds(engine)
    lost = engine.settle_lost()  # lost only when the replica lacks them too
    if lost.any():
        raise NotPermitted(
            f"volume {engine.name}: regions {lost.runs()} are lost (never replicated); write them "
            "(they then live in the overlay) before failing back")
    engine.begin_resync(path)


def _scrub_pending(engine: FailbackPort, path: str) -> bool:
    info = engine.record.failback
    return info is not None and info.scrub_pending == path


def _drop_copies_the_device_holds(engine: FailbackPort) -> None:
    """Copy-on-read regions the (new) device already holds correctly need no copying back."""
    incident_era = engine.record.recovery.era
    volume = engine.volume
    for region in list(volume.overlay):
        if volume.eras[region] < incident_era:
            engine.forget_overlay_copy(region)


def _copy(engine: FailbackPort, rate: int | None, progress: Callable[[int], None] | None) -> int:
    geometry = engine.geometry
    per_batch = max(1, BATCH_BYTES // geometry.region_size)
    started = time.monotonic()
    copied_bytes = 0
    copied = 0
    while True:
        batch = []
        for region in engine.volume.resync:
            batch.append(region)
            if len(batch) >= per_batch:
                break
        if not batch:
            return copied
        # (a region the overlay holds in part whose base is bad: its base comes from the replica)
        remote = [r for r in batch if not engine.volume.overlay.test(r) or engine.partial_base_remote(r)]
        fetched = engine.fetch(remote) if remote else {}
        done_bytes = 0
        for region in batch:
            written = _copy_region(engine, region, fetched.get(region))
            copied += 1 if written else 0
            done_bytes += written
        copied_bytes += done_bytes
        engine.failback_progress(done_bytes)  # durable: a restart resumes here
        if progress:
            progress(done_bytes)
        if rate:
            ahead = copied_bytes / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)


def _copy_region(engine: FailbackPort, region: int, fetched: tuple[bytes, bytes] | None) -> int:
    """Copy one region into the device; returns the bytes written."""
    with engine.holding(region):
        if engine.volume.overlay.test(region):
            # A partial region is completed from its base (fetched above when remote) first.
            data = engine.read_verified(region, fetched[0] if fetched is not None else None)
            if data is None:
                raise DeviceError(f"overlay region {region} fails verification; failback stopped")
            # Written during the incident: the mirror has not seen it yet.
            relog = engine.volume.eras[region] >= engine.record.recovery.era
            return engine.copy_back(region, data, relog=relog)
        if fetched is not None:
            return engine.copy_back(region, fetched[0], relog=False)
        return 0  # a write moved it into the overlay meanwhile; a later batch copies it
