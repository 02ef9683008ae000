"""Detection: digest a new volume, scrub it, accept outside writes, probe its device.

Scrub is the zpool-scrub of drtool: every region the device should hold is read
and checked against the manifest; what fails goes into the bad map with its
reason, what verifies again leaves it.  A device that cannot be used at all faults the
whole volume (missing, not a file or block device, cannot be opened, smaller than the
volume, or fails every read the probe tries: :func:`drtool.storage.device.probe`); a
device that is there and reads is never faulted for the regions that fail: those are
bad, as ``io-error`` regions, and only those.

All three cost what the data costs, not what the volume's size costs.  The regions read
are those that should hold data (a digest other than the all-zero default in the
manifest) or do (a data extent of the device, :func:`~drtool.storage.reader.data_runs`),
outside the overlay.  Every other region is all zeros on both sides: a hole of the
device whose expected content is zeros verifies without a read.  A region the manifest
says holds data is always read, so data lost to a hole (punched, discarded) reads as
zeros and fails its checksum.  On a block device every region is data and is read.
Digests stream from the reader in batches; nothing holds a value per region of the volume.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from drtool.errors import DeviceError, DeviceIOError
from drtool.regions import Geometry, Run, runs_total
from drtool.storage.device import DeviceProbe, probe
from drtool.storage.reader import IO_ERROR, SHORT_READ, ProgressFn, data_runs, digest_regions
from drtool.storage.records import Faulted
from drtool.storage.volume import Volume

CHECKSUM = "checksum"

#: Long jobs commit the maps they changed once this much is pending, so memory stays bounded.
COMMIT_BYTES = 64 << 20


@dataclass
class ScrubReport:
    """``regions_scanned``: the regions verified, read or proved zeros by a hole (every region
    outside the overlay; 0 when the device faulted); ``bytes_scanned``: the bytes read."""

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
    """Fill the manifest of a freshly registered volume from its device.

    Only the device's data extents are read, and only digests other than the all-zero
    default are stored.  The era map is not touched: every region keeps era 0, "not written
    since the volume was registered".  Nothing needs era 1 there: eras are only ever
    compared as "written in era E or later" (the local copy of ``recover --local-era``, an
    incident's or a promotion's era, all at least 1), and a region that still holds what it
    held at registration was written in none of them.  (With era 1, ``--local-era 1`` would
    fetch every region instead of the ones written since registration.)
    """
    geometry = volume.geometry
    unreadable = 0
    first_unreadable = geometry.count
    with volume.open_device() as device:
        targets = list(data_runs(device.fd, geometry, [(0, geometry.count)]))
        _skip_progress(progress, geometry, targets)
        for batch in digest_regions(device, geometry, targets, progress=progress):
            for region, digest in batch:
                if digest is None:
                    unreadable += 1
                    first_unreadable = min(first_unreadable, region)
                else:
                    volume.manifest[region] = digest  # an all-zero digest is the default: not stored
            _commit_now_and_then(volume)
    if unreadable:
        raise DeviceError(
            f"device {volume.record.device} has {unreadable} unreadable regions "
            f"(first at region {first_unreadable}); a volume cannot be registered from unreadable data"
        )
    volume.save_all()


def _targets(volume: Volume, fd: int, overlay: list[Run]) -> list[Run]:
    """The regions to read: those the manifest says hold data, and the device's data extents,
    outside the overlay (its regions live elsewhere).  Ascending runs.

    A list (its length follows the data's runs, not the volume's size), walked here in the
    caller's thread: the reader's workers do not read the manifest while scan changes it."""
    count = volume.geometry.count
    outside = list(_minus([(0, count)], overlay))
    on_device = data_runs(fd, volume.geometry, outside)
    in_manifest = _runs_of(volume.manifest.nonzero_between(0, count))
    return list(_minus(_union(on_device, in_manifest), overlay))


def scrub(volume: Volume, progress: ProgressFn | None = None,
          recheck: Callable[[int], bool] | None = None, record: bool = True,
          lock: Any = None) -> ScrubReport:
    """Verify every region outside the overlay; update the bad map; save; report.

    The regions that should hold data or do are read and checked; the others are holes
    expected to be zeros, verified without a read.  ``recheck(region)`` (given by a running
    engine) re-reads a failed region under its write lock: a write in flight is not damage;
    ``lock`` (the engine's) guards the bitmaps while they are read and while the findings
    are applied.  ``record=False`` (Ansible's check mode) reports and changes nothing.
    """
    started = time.time()
    clock = time.perf_counter()
    geometry = volume.geometry
    lock = lock or _NoLock()
    errors = {CHECKSUM: 0, IO_ERROR: 0, SHORT_READ: 0}
    bytes_scanned = 0
    faulted: str | None = None
    findings: Findings = ([], {})
    with lock:
        overlay = volume.overlay.runs()
        # Regions now bad, outside the overlay: each is read or proved zeros, so all verify
        # (first cleared as a run), except the failures found (then set one by one).
        suspect = list(_minus(_union(volume.bad.runs(), volume.ioerror.runs()), overlay))
    skipped = runs_total(overlay)
    found = probe(volume.record.device, expected_size=geometry.size)
    if not found.ok:
        faulted = f"{found.path}: {found.reason}"
    else:
        try:
            with volume.open_device(path=found.path) as device:
                targets = _targets(volume, device.fd, overlay)
                _skip_progress(progress, geometry, targets)
                failed: dict[int, str | None] = {}
                for batch in digest_regions(device, geometry, targets, progress=progress):
                    bytes_scanned += batch.bytes_read
                    _classify(volume, batch, failed, errors, recheck)
                findings = (suspect, failed)
        except (DeviceError, DeviceIOError) as exc:
            faulted = str(exc)
    bad, ioerror = volume.bad.copy(), volume.ioerror.copy()
    _apply(bad, ioerror, findings, faulted)
    seconds = time.perf_counter() - clock
    report = ScrubReport(
        volume=volume.name, region_size=geometry.region_size, regions_total=geometry.count,
        regions_scanned=geometry.count - skipped if not faulted else 0,
        bad_regions=bad.runs(), new_bad_regions=bad.difference(volume.bad).runs(),
        cleared_regions=volume.bad.difference(bad).runs(), errors=errors, bytes_scanned=bytes_scanned,
        seconds=seconds, started=started,
        health="FAULTED" if faulted else ("DEGRADED" if bad.any() else "ONLINE"),
        faulted=faulted, skipped_overlay=skipped,
    )
    if record:
        with lock:
            _apply(volume.bad, volume.ioerror, findings, faulted)  # in place: others hold these maps
            if faulted:
                since = volume.record.faulted.since if volume.record.faulted else time.time()
                volume.record.faulted = Faulted(reason=faulted, since=since)
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


#: (runs that verify, {region: None if it verified on a recheck, else CHECKSUM or the read error}).
Findings = tuple[list[Run], dict[int, str | None]]


def _classify(volume: Volume, batch: Any, failed: dict[int, str | None], errors: dict[str, int],
              recheck: Callable[[int], bool] | None) -> None:
    """Note in ``failed`` the regions of ``batch`` that do not verify (those that do need no note)."""
    manifest = volume.manifest
    if manifest.matches_run(batch.first, batch.digests):
        return  # every region verifies: one compare per manifest page
    for region, digest in batch:
        if digest is not None and manifest.matches(region, digest):
            continue
        if recheck is not None and recheck(region):
            failed[region] = None
            continue
        reason = batch.errors.get(region) or CHECKSUM
        errors[reason] = errors.get(reason, 0) + 1
        failed[region] = reason


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
    shipping from the device (they have no log record).  Read: the same regions as
    scrub; a hole whose expected content is zeros is unchanged without a read.
    """
    clock = time.perf_counter()
    geometry = volume.geometry
    era = volume.record.era
    protected = volume.record.peer is not None
    changed, unreadable, cleared = _RunSet(), _RunSet(), _RunSet()
    bytes_scanned = 0
    overlay = volume.overlay.runs()
    with volume.open_device() as device:
        targets = _targets(volume, device.fd, overlay)
        # Bad (not for an I/O error) regions left unread hold zeros, as they should: put back.
        for first, count in _minus(_minus(_minus(volume.bad.runs(), volume.ioerror.runs()), overlay), targets):
            volume.bad.clear_run(first, count)
            cleared.add(first, count)
        _skip_progress(progress, geometry, targets)
        for batch in digest_regions(device, geometry, targets, progress=progress):
            bytes_scanned += batch.bytes_read
            for region, digest in batch:
                if digest is None:
                    volume.bad.set(region)
                    volume.ioerror.set(region)
                    unreadable.add(region)
                elif volume.ioerror.test(region):
                    continue
                elif not volume.manifest.matches(region, digest):
                    volume.manifest[region] = digest
                    volume.eras[region] = era
                    volume.bad.clear(region)
                    changed.add(region)
                    if protected:
                        volume.unreplicated.set(region)
                        volume.norecord.set(region)
                elif volume.bad.test(region):  # its bytes were put back as they should be
                    volume.bad.clear(region)
                    cleared.add(region)
            _commit_now_and_then(volume)
    volume.save_content_maps()
    volume.save_bitmaps()
    return ScanReport(volume.name, era, changed.runs(), unreadable.runs(),
                      bytes_scanned, time.perf_counter() - clock, cleared_regions=cleared.runs())


def _commit_now_and_then(volume: Volume) -> None:
    if volume.dirty_bytes >= COMMIT_BYTES:
        volume.commit()


def _skip_progress(progress: ProgressFn | None, geometry: Geometry, targets: list[Run]) -> None:
    """What is not read is done at once: the progress bar counts it first."""
    if progress:
        skipped = geometry.size - sum(geometry.run_bounds(first, count)[1] for first, count in targets)
        if skipped:
            progress(skipped)


# -- sets of regions as ascending runs (lazy where they can be) ---------------------------------

class _RunSet:
    """Regions added one run at a time, in any order, each at most once; kept as merged runs."""

    def __init__(self) -> None:
        self._by_first: dict[int, int] = {}  # first -> end
        self._by_end: dict[int, int] = {}  # end -> first

    def add(self, first: int, count: int = 1) -> None:
        end = first + count
        if first in self._by_end:
            first = self._by_end.pop(first)
            del self._by_first[first]
        if end in self._by_first:
            end = self._by_first.pop(end)
            del self._by_end[end]
        self._by_first[first] = end
        self._by_end[end] = first

    def runs(self) -> list[Run]:
        return [(first, end - first) for first, end in sorted(self._by_first.items())]


def _runs_of(regions: Iterable[int]) -> Iterator[Run]:
    """Ascending regions -> ascending runs."""
    first = end = -1
    for region in regions:
        if region == end:
            end += 1
            continue
        if end > first:
            yield first, end - first
        first, end = region, region + 1
    if end > first:
        yield first, end - first


def _union(*sources: Iterable[Run]) -> Iterator[Run]:
    """Ascending runs from ascending runs, overlapping or touching ones merged."""
    first = end = -1
    for run_first, count in heapq.merge(*sources):
        if run_first <= end:
            end = max(end, run_first + count)
            continue
        if end > first:
            yield first, end - first
        first, end = run_first, run_first + count
    if end > first:
        yield first, end - first


def _minus(runs: Iterable[Run], removed: list[Run]) -> Iterator[Run]:
    """Ascending ``runs`` without the regions of ``removed`` (ascending, disjoint)."""
    ends = [first + count for first, count in removed]
    for first, count in runs:
        end = first + count
        at = bisect_right(ends, first)  # the first removed run ending after ``first``
        pos = first
        while at < len(removed) and removed[at][0] < end:
            gone_first, gone_count = removed[at]
            if gone_first > pos:
                yield pos, gone_first - pos
            pos = max(pos, gone_first + gone_count)
            at += 1
        if pos < end:
            yield pos, end - pos


def quick_probe(volume: Volume) -> DeviceProbe:
    """Is the device usable (there, the right size, readable)?  ``ok`` false means FAULTED;
    an ``ok`` probe may still list ``read_errors`` (a scrub finds the regions they hit)."""
    return probe(volume.record.device, expected_size=volume.geometry.size)
