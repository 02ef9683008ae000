"""The replica's own scrub: re-read what is on disk, re-hash it, compare with the stored digests.

The secondary's disk rots too.  Two entry points share one walk:

- :func:`verify_batch` (``POST /v1/volumes/{name}/verify``): the primary's ``drtool verify``
  asks for region runs a bounded batch at a time; each answer lists, for every region that
  may hold data, the digest the server stored and the one it computed from the image now;
- :class:`ScrubJob` (``POST /v1/volumes/{name}/scrub``): the whole replica (mirror, then the
  overlay replica) in the background, throttled, its progress in ``GET /v1/volumes/{name}``.

Only regions that can hold data are read: those whose stored digest is not the zeros' slot,
and those where the image has allocated data (``SEEK_DATA``/``SEEK_HOLE``).  Every other region
reads as zeros and its table says zeros: it is verified without a read, so a sparse 15 TiB
replica is checked in what its data costs.  A region whose slot says zeros but whose image
range is a hole is not read either.

Regions whose bytes fail their stored digest (or cannot be read) are remembered in
``scrub.json`` (a checksummed JSON state file beside ``replica.json``), per target (``mirror``,
``overlay``), until a later verify or scrub reads them good again (a record that rewrote the
region, or a repair from the primary).
"""

from __future__ import annotations

import errno
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import blake3

from drtool.errors import CorruptStateFile, DeviceError, DrtoolError, UsageError
from drtool.regions import Geometry, Run, runs_from_json, to_runs
from drtool.replica.jsonstate import load_json, save_json
from drtool.replica.tables import DigestTable
from drtool.replica.volume import ReplicaVolume, Target
from drtool.storage.device import Device
from drtool.storage.maps import merge_regions
from drtool.wire import NO_DIGEST, zero_digest

SCRUB_FILE = "scrub.json"
#: the most a verify batch reads (the client asks for less to throttle)
MAX_BATCH_BYTES = 64 << 20
#: the most regions one verify request may name in its runs (as [first, count] pairs)
MAX_RUNS = 65536
_LOCKED_BYTES = 4 << 20  # bytes read while the volume's shared lock is held once
SOURCES = ("mirror", "overlay", "merged")


# -- where data may be ---------------------------------------------------------------------


def data_regions(fd: int, geometry: Geometry, first: int, end: int) -> Iterator[int]:
    """Regions in [first, end) where the file has allocated data (SEEK_DATA/SEEK_HOLE).

    A file system or device that cannot say (EINVAL) is all data."""
    if first >= end:
        return
    start, stop = geometry.region_start(first), geometry.region_start(end - 1) + geometry.region_length(end - 1)
    position = start
    last = -1
    while position < stop:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            data = position  # no hole support: everything is data
            hole = stop
        else:
            if data >= stop:
                return
            try:
                hole = os.lseek(fd, data, os.SEEK_HOLE)
            except OSError:
                hole = stop
        hole = min(hole, stop)
        for region in range(max(geometry.region_of(data), last + 1), geometry.region_of(hole - 1) + 1):
            last = region
            yield region
        position = hole if hole > data else data + 1


def _targets(volume: ReplicaVolume, source: str) -> list[tuple[str, Target]]:
    if source == "mirror":
        return [("mirror", volume.mirror)]
    if source == "overlay":
        return [("overlay", volume.overlay)]
    return [("overlay", volume.overlay), ("mirror", volume.mirror)]


def _candidates(volume: ReplicaVolume, source: str, first: int, end: int) -> Iterator[int]:
    """Regions of [first, end) that may hold data in ``source`` (call under the shared lock)."""
    geometry = volume.geometry
    streams: list[Iterable[int]] = []
    for kind, target in _targets(volume, source):
        table = target.table
        assert target.image is not None
        streams.append(r for r, _ in table.iter_nonzero(first, end))
        streams.append(data_regions(target.image.fd, geometry, first, end))
        if kind == "overlay":  # a present region of zeros hides the mirror's bytes
            streams.append(table.iter_present(first, end))
    return merge_regions(*streams)


def _resolve(volume: ReplicaVolume, source: str, region: int) -> tuple[str, Device, DigestTable]:
    if source == "mirror" or (source == "merged" and not volume.overlay.table.present(region)):
        target, kind = volume.mirror, "mirror"
    else:
        target, kind = volume.overlay, "overlay"
    assert target.image is not None
    return kind, target.image, target.table


# -- one batch ------------------------------------------------------------------------------


def check_runs(volume: ReplicaVolume, runs: object) -> list[Run]:
    """Runs from a request body: a non-empty list of [first, count] pairs inside the volume,
    at most MAX_RUNS of them, sorted."""
    if isinstance(runs, list) and len(runs) > MAX_RUNS:
        raise UsageError(f"a verify may name at most {MAX_RUNS} runs")
    return sorted(runs_from_json(runs, volume.geometry))


def verify_batch(volume: ReplicaVolume, runs: list[Run], start: int = 0, source: str = "mirror",
                 max_bytes: int = MAX_BATCH_BYTES) -> dict[str, Any]:
    """Re-read and re-hash the regions of ``runs`` from region ``start`` on, up to ``max_bytes``
    read (at least one region), and record the regions that fail their stored digest.

    Returns {"entries": [{"region", "source", "stored", "computed", "error"?}], "next",
    "bytes_read", "regions_read", "bad"}: one entry per region that may hold data; a region
    of the runs before ``next`` (None: the runs are done) without an entry is all zeros, as
    its table says, and was not read.  ``stored``/``computed`` are hex blake3 (``computed``
    null when the region could not be read, ``error`` then says why)."""
    if source not in SOURCES:
        raise UsageError(f"source {source!r} is not one of {', '.join(SOURCES)}")
    geometry = volume.geometry
    planned: list[int] = []
    next_region: int | None = None
    budget = 0
    with volume.lock.shared():
        for first, count in runs:
            if next_region is not None:
                break
            lo, hi = max(first, start), first + count
            for region in _candidates(volume, source, lo, hi):
                length = geometry.region_length(region)
                if planned and budget + length > max_bytes:
                    next_region = region
                    break
                planned.append(region)
                budget += length
    entries: list[dict[str, Any]] = []
    bytes_read = regions_read = 0
    index = 0
    while index < len(planned):
        chunk: list[tuple[int, str, bytes, bytes | None, str | None]] = []  # region, kind, stored, data, error
        used = 0
        with volume.lock.shared():
            while index < len(planned) and (not chunk or used + geometry.region_length(planned[index])
                                            <= _LOCKED_BYTES):
                region = planned[index]
                index += 1
                kind, device, table = _resolve(volume, source, region)
                stored = table.digest(region)
                if table.stored(region) == NO_DIGEST and device.is_hole(*geometry.region_bounds(region)):
                    chunk.append((region, kind, stored, None, None))  # zeros, as the table says
                    continue
                start_byte, length = geometry.region_bounds(region)
                data = bytearray(length)
                try:
                    device.readinto(data, start_byte)
                except DeviceError as exc:
                    chunk.append((region, kind, stored, None, str(exc)))
                    continue
                used += length
                chunk.append((region, kind, stored, bytes(data), None))
        for region, kind, stored, data, error in chunk:
            entry: dict[str, Any] = {"region": region, "source": kind, "stored": stored.hex()}
            if error is not None:
                entry.update(computed=None, error=error)
            elif data is None:
                entry["computed"] = zero_digest(geometry.region_length(region)).hex()
            else:
                entry["computed"] = blake3.blake3(data).hexdigest()
                bytes_read += len(data)
                regions_read += 1
            entries.append(entry)
    bad = state_of(volume).record(runs, start, next_region, source, entries)
    return {"entries": entries, "next": next_region, "bytes_read": bytes_read, "regions_read": regions_read,
            "bad": bad, "applied_seq": volume.mirror.applied.watermark}


# -- what the scrub found, remembered -------------------------------------------------------


class ScrubState:
    """``scrub.json``: the regions that failed their digests (per target) and the last whole scrub."""

    def __init__(self, volume: ReplicaVolume) -> None:
        self.volume = volume
        self.path = os.path.join(volume.directory, SCRUB_FILE)
        self.lock = threading.Lock()
        self.bad: dict[str, set[int]] = {"mirror": set(), "overlay": set()}
        self.found_at: float | None = None
        self.last: dict[str, Any] | None = None  # the last (or running) whole scrub
        self.job: ScrubJob | None = None
        self.damage: CorruptStateFile | None = None  # a torn scrub.json: described, and refused for new findings
        body: dict[str, Any] = {}
        if os.path.exists(self.path):
            try:
                body = load_json(self.path, "replica-scrub", volume.volume_id)
            except CorruptStateFile as exc:
                self.damage = exc
        if body:
            if body.get("image") == volume.image_path:  # else: another image was adopted since
                for kind in self.bad:
                    self.bad[kind] = {r for first, count in body.get("bad", {}).get(kind, [])
                                      for r in range(first, first + count)}
                self.found_at = body.get("found_at")
                self.last = body.get("last")

    def save(self) -> None:
        if self.damage is not None:  # never write over what we could not read: say so instead
            raise CorruptStateFile(self.path, f"{self.damage.reason}; remove it to start the replica's scrub "
                                   "records afresh")
        save_json(self.path, "replica-scrub", self.volume.volume_id,
                  {"image": self.volume.image_path, "found_at": self.found_at, "last": self.last,
                   "bad": {kind: [list(run) for run in to_runs(regions)] for kind, regions in self.bad.items()}})

    def record(self, runs: list[Run], start: int, end: int | None, source: str,
               entries: list[dict[str, Any]]) -> list[list[int]]:
        """Regions read in this batch: those that failed go in, those read good again go out.
        Returns the failed regions of this batch as runs."""
        failed: set[tuple[str, int]] = set()
        good: set[tuple[str, int]] = set()
        for entry in entries:
            key = (entry["source"], entry["region"])
            (good if entry["computed"] is not None and entry["computed"] == entry["stored"] else failed).add(key)
        listed = {entry["region"] for entry in entries}
        kinds = [kind for kind, _ in _targets(self.volume, source)]
        with self.lock:
            changed = False
            for kind in kinds:
                regions = self.bad[kind]
                # Read good again, or (no entry at all) all zeros now as its table says.
                cleared = [r for r in regions if (kind, r) in good or (r not in listed and _within(runs, start, end, r))]
                for region in cleared:
                    regions.discard(region)
                    changed = True
            for kind, region in failed:
                if region not in self.bad[kind]:
                    self.bad[kind].add(region)
                    self.found_at = time.time()
                    changed = True
            if changed:
                self.save()
        return [list(run) for run in to_runs(region for _, region in failed)]

    def marked(self) -> dict[str, frozenset[int]]:
        """The regions found bad, per target (only targets that have some): the replica's read
        path reads and hashes these again before it sends them, instead of sending them blind."""
        with self.lock:
            return {kind: frozenset(regions) for kind, regions in self.bad.items() if regions}

    def found_unreadable(self, kind: str, regions: Iterable[int]) -> None:
        """A read for a client could not read these regions of ``kind``: they are bad until a
        later verify or scrub reads them good.  Kept in memory even when scrub.json cannot be
        written (raised after)."""
        with self.lock:
            new = [region for region in regions if region not in self.bad[kind]]
            if not new:
                return
            self.bad[kind].update(new)
            self.found_at = time.time()
            self.save()

    def describe(self) -> dict[str, Any]:
        with self.lock:
            running = self.job is not None and self.job.is_alive()
            last = dict(self.job.progress) if running and self.job is not None else (dict(self.last) if self.last else None)
            if last and last.get("state") == "running" and not running:
                last["state"] = "interrupted"  # the server stopped mid-scrub: POST .../scrub resumes it
            described = {"bad_regions": {kind: [list(run) for run in to_runs(regions)]
                                         for kind, regions in self.bad.items()},
                         "bad_count": sum(len(regions) for regions in self.bad.values()),
                         "found_at": self.found_at, "last": last}
            if self.damage is not None:
                described["error"] = str(self.damage)
            return described


def _within(runs: list[Run], start: int, end: int | None, region: int) -> bool:
    if region < start or (end is not None and region >= end):
        return False
    return any(first <= region < first + count for first, count in runs)


_STATES: weakref.WeakKeyDictionary[ReplicaVolume, ScrubState] = weakref.WeakKeyDictionary()
_STATES_LOCK = threading.Lock()


def state_of(volume: ReplicaVolume) -> ScrubState:
    with _STATES_LOCK:
        state = _STATES.get(volume)
        if state is None:
            state = _STATES[volume] = ScrubState(volume)
        return state


def describe(volume: ReplicaVolume) -> dict[str, Any]:
    """The ``scrub`` object of ``GET /v1/volumes/{name}``."""
    return state_of(volume).describe()


# -- the whole replica, in the background ----------------------------------------------------


class ScrubJob(threading.Thread):
    """Scrubs the mirror, then the overlay replica, at most ``rate`` bytes/s; resumable."""

    def __init__(self, volume: ReplicaVolume, state: ScrubState, rate: int | None, resume: dict[str, Any] | None) -> None:
        super().__init__(name=f"scrub:{volume.name}", daemon=True)
        self.volume = volume
        self.state = state
        self.rate = rate
        count = volume.geometry.count
        now = time.time()
        self.progress: dict[str, Any] = resume or {
            "state": "running", "started": now, "finished": None, "target": "mirror", "next_region": 0,
            "total_regions": 2 * count, "done_regions": 0, "regions_read": 0, "bytes_read": 0, "bad_found": 0,
            "error": None}
        self.progress.update(state="running", rate=rate, error=None, resumed_at=now if resume else None)

    def run(self) -> None:
        progress = self.progress
        count = self.volume.geometry.count
        clock, read_here = time.monotonic(), 0
        saved = 0.0
        try:
            for index, target in enumerate(("mirror", "overlay")):
                if index < ("mirror", "overlay").index(progress["target"]):
                    continue
                progress["target"] = target
                position = progress["next_region"]
                while position is not None:
                    batch = MAX_BATCH_BYTES if not self.rate else max(self.volume.geometry.region_size,
                                                                      min(MAX_BATCH_BYTES, self.rate // 4))
                    answer = verify_batch(self.volume, [(0, count)], position, target, batch)
                    done_to = answer["next"] if answer["next"] is not None else count
                    with self.state.lock:
                        progress["done_regions"] = index * count + done_to
                        progress["bytes_read"] += answer["bytes_read"]
                        progress["regions_read"] += answer["regions_read"]
                        progress["bad_found"] += sum(n for _, n in answer["bad"])
                        progress["next_region"] = answer["next"]
                    position = answer["next"]
                    read_here += answer["bytes_read"]
                    if self.rate:
                        ahead = read_here / self.rate - (time.monotonic() - clock)
                        if ahead > 0:
                            time.sleep(ahead)
                    if time.monotonic() - saved > 2.0:
                        self._save()
                        saved = time.monotonic()
                if target == "mirror":
                    progress["next_region"] = 0
            progress.update(state="done", finished=time.time(), next_region=None, done_regions=2 * count)
        except (DrtoolError, OSError, ValueError) as exc:  # the replica was deleted or closed meanwhile
            progress.update(state="failed", finished=time.time(), error=str(exc))
        finally:
            try:
                self._save()
            except DrtoolError:
                pass

    def _save(self) -> None:
        with self.state.lock:
            self.state.last = dict(self.progress)
            self.state.save()


def start_scrub(volume: ReplicaVolume, rate: int | None = None, restart: bool = False) -> tuple[bool, dict[str, Any]]:
    """Start a whole scrub in the background (resuming an interrupted one unless ``restart``).

    Returns (started, the scrub description); a scrub already running is left as it is."""
    volume.refuse_if_promoted("its stored digests no longer describe its image, so there is nothing to "
                              "scrub it against")
    state = state_of(volume)
    with state.lock:
        if state.job is not None and state.job.is_alive():
            started = False
        else:
            last = state.last
            resume = dict(last) if (last and last.get("state") in ("running", "interrupted")
                                    and last.get("next_region") is not None and not restart) else None
            state.job = ScrubJob(volume, state, rate, resume)
            state.last = dict(state.job.progress)
            state.save()
            state.job.start()
            started = True
    return started, state.describe()
