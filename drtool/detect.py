"""Detection: digest a new volume, scrub it, accept outside writes, probe its device.

Scrub is the zpool-scrub of drtool: every region the device should hold is read
and checked against the manifest; what fails goes into the bad map with its
reason, what verifies again leaves it.  A device that is missing or unreadable
faults the whole volume.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drtool.errors import DeviceError, DeviceIOError
from drtool.regions import Run, runs_total, to_runs
from drtool.storage.device import DeviceProbe, probe
from drtool.storage.maps import DIGEST_SIZE
from drtool.storage.reader import IO_ERROR, ProgressFn, digest_regions
from drtool.storage.volume import Volume

CHECKSUM = "checksum"


@dataclass
class ScrubReport:
    volume: str
    region_size: int
    regions_total: int
    regions_scanned: int
    bad_regions: list[Run]
    new_bad_regions: list[Run]
    cleared_regions: list[Run]
    errors: dict[str, int]
    bytes_scanned: int
    seconds: float
    started: float
    health: str
    faulted: str | None = None
    skipped_overlay: int = 0

    @property
    def bad_count(self) -> int:
        return runs_total(self.bad_regions)

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": self.volume,
            "region_size": self.region_size,
            "regions_total": self.regions_total,
            "regions_scanned": self.regions_scanned,
            "bad_regions": [list(run) for run in self.bad_regions],
            "bad_count": self.bad_count,
            "new_bad_regions": [list(run) for run in self.new_bad_regions],
            "cleared_regions": [list(run) for run in self.cleared_regions],
            "errors": dict(self.errors),
            "bytes_scanned": self.bytes_scanned,
            "seconds": round(self.seconds, 6),
            "started": self.started,
            "health": self.health,
            "faulted": self.faulted,
            "skipped_overlay_regions": self.skipped_overlay,
        }


@dataclass
class ScanReport:
    volume: str
    era: int
    changed_regions: list[Run]
    unreadable_regions: list[Run]
    bytes_scanned: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)
    cleared_regions: list[Run] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "volume": self.volume,
            "era": self.era,
            "changed_regions": [list(run) for run in self.changed_regions],
            "changed_count": runs_total(self.changed_regions),
            "unreadable_regions": [list(run) for run in self.unreadable_regions],
            "cleared_regions": [list(run) for run in self.cleared_regions],
            "bytes_scanned": self.bytes_scanned,
            "seconds": round(self.seconds, 6),
        }


def digest_new_volume(volume: Volume, progress: ProgressFn | None = None) -> None:
    """Fill the manifest of a freshly registered volume from its device.  Era 1 everywhere."""
    with volume.open_device() as device:
        result = digest_regions(device, volume.geometry, progress=progress)
    if result.errors:
        bad = to_runs(result.errors)
        raise DeviceError(
            f"device {volume.record.device} has {len(result.errors)} unreadable regions "
            f"(first at region {bad[0][0]}); a volume cannot be registered from unreadable data"
        )
    volume.manifest = type(volume.manifest)(volume.geometry.count, result.digests)
    for region in range(volume.geometry.count):
        volume.eras[region] = volume.record.era
    volume.save_all()


def _scrub_targets(volume: Volume) -> list[Run]:
    """Regions whose current bytes should be on the device (overlay regions live elsewhere)."""
    if not volume.overlay.any():
        return [(0, volume.geometry.count)]
    return to_runs(r for r in range(volume.geometry.count) if not volume.overlay.test(r))


def scrub(volume: Volume, progress: ProgressFn | None = None,
          recheck: Callable[[int], bool] | None = None, record: bool = True,
          lock: Any = None) -> ScrubReport:
    """Read and verify every region; update the bad map; save; report.

    ``recheck(region)`` (given by a running engine) re-reads a failed region under its
    write lock: a write in flight is not damage; ``lock`` (the engine's) guards applying
    the findings.  ``record=False`` (Ansible's check mode) reports and changes nothing.
    """
    started = time.time()
    clock = time.perf_counter()
    geometry = volume.geometry
    targets = _scrub_targets(volume)
    skipped = geometry.count - runs_total(targets)
    found = probe(volume.record.device, expected_size=geometry.size)
    errors = {CHECKSUM: 0, IO_ERROR: 0, "short-read": 0}
    bytes_scanned = 0
    faulted: str | None = None
    findings: Findings = ([], {})
    if not found.ok:
        faulted = f"{found.path}: {found.reason}"
    else:
        try:
            with volume.open_device(path=found.path) as device:
                result = digest_regions(device, geometry, targets, progress=progress)
        except (DeviceError, DeviceIOError) as exc:
            faulted = str(exc)
        else:
            bytes_scanned = result.bytes_read
            findings = _classify(volume, targets, result, errors, recheck)
    bad, ioerror = volume.bad.copy(), volume.ioerror.copy()
    _apply(bad, ioerror, findings, faulted)
    seconds = time.perf_counter() - clock
    report = ScrubReport(
        volume=volume.name, region_size=geometry.region_size, regions_total=geometry.count,
        regions_scanned=runs_total(targets) if not faulted else 0,
        bad_regions=bad.runs(), new_bad_regions=bad.difference(volume.bad).runs(),
        cleared_regions=volume.bad.difference(bad).runs(), errors=errors, bytes_scanned=bytes_scanned,
        seconds=seconds, started=started,
        health="FAULTED" if faulted else ("DEGRADED" if bad.any() else "ONLINE"),
        faulted=faulted, skipped_overlay=skipped,
    )
    if record:
        with lock or _NoLock():
            _apply(volume.bad, volume.ioerror, findings, faulted)  # in place: others hold these maps
            if faulted:
                since = (volume.record.faulted or {}).get("since") or time.time()
                volume.record.faulted = {"reason": faulted, "since": since}
            else:
                volume.record.faulted = None
            volume.record.last_scrub = {
                "started": started, "seconds": round(seconds, 6), "bytes": bytes_scanned,
                "errors": errors, "bad_count": report.bad_count, "faulted": faulted,
            }
            volume.save_bitmaps()
            volume.save_record()
    return report


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


Findings = tuple[list[Run], dict[int, str | None]]


def _classify(volume: Volume, targets: list[Run], result: Any, errors: dict[str, int],
              recheck: Callable[[int], bool] | None) -> Findings:
    """(runs verified whole, {region: None if verified else CHECKSUM or the read error}).

    A run whose digests all match (the common case) is settled with one comparison of
    bytes, not a loop over its regions."""
    manifest = volume.manifest
    digests = memoryview(result.digests)
    expected = memoryview(manifest.to_bytes())
    clean: list[Run] = []
    findings: dict[int, str | None] = {}
    for first, count in targets:
        lo, hi = first * DIGEST_SIZE, (first + count) * DIGEST_SIZE
        if digests[lo:hi] == expected[lo:hi] and not any(first <= r < first + count for r in result.errors):
            clean.append((first, count))
            continue
        for region in range(first, first + count):
            reason = result.errors.get(region)
            if reason is None and manifest.matches(region, result.digest(region)):
                findings[region] = None
                continue
            if recheck is not None and recheck(region):
                findings[region] = None
                continue
            reason = reason or CHECKSUM
            errors[reason] = errors.get(reason, 0) + 1
            findings[region] = reason
    return clean, findings


def _apply(bad: Any, ioerror: Any, findings: Findings, faulted: str | None) -> None:
    if faulted:
        bad.set_all()
        ioerror.set_all()
        return
    clean, regions = findings
    for first, count in clean:
        bad.clear_run(first, count)
        ioerror.clear_run(first, count)
    for region, reason in regions.items():
        if reason is None:
            bad.clear(region)
            ioerror.clear(region)
        else:
            bad.set(region)
            if reason == CHECKSUM:
                ioerror.clear(region)
            else:
                ioerror.set(region)


def scan(volume: Volume, progress: ProgressFn | None = None) -> ScanReport:
    """Accept writes made behind drtool's back: changed regions become the new truth.

    Regions bad for an I/O error stay bad; regions in the overlay are not the
    device's to decide.  Changed regions of a protected volume are marked for
    shipping from the device (they have no log record).
    """
    clock = time.perf_counter()
    targets = _scrub_targets(volume)
    with volume.open_device() as device:
        result = digest_regions(device, volume.geometry, targets, progress=progress)
    era = volume.record.era
    changed: list[int] = []
    unreadable: list[int] = []
    cleared: list[int] = []
    protected = volume.record.peer is not None
    for first, count in targets:
        for region in range(first, first + count):
            if region in result.errors:
                volume.bad.set(region)
                volume.ioerror.set(region)
                unreadable.append(region)
                continue
            if volume.ioerror.test(region):
                continue
            digest = result.digest(region)
            if not volume.manifest.matches(region, digest):
                volume.manifest[region] = digest
                volume.eras[region] = era
                volume.bad.clear(region)
                changed.append(region)
                if protected:
                    volume.unreplicated.set(region)
                    volume.norecord.set(region)
            elif volume.bad.test(region):  # its bytes were put back as they should be
                volume.bad.clear(region)
                cleared.append(region)
    volume.save_content_maps()
    volume.save_bitmaps()
    return ScanReport(volume.name, era, to_runs(changed), to_runs(unreadable),
                      result.bytes_read, time.perf_counter() - clock, cleared_regions=to_runs(cleared))


def quick_probe(volume: Volume) -> DeviceProbe:
    """Is the device there, the right size, and readable at both ends?"""
    return probe(volume.record.device, expected_size=volume.geometry.size)
