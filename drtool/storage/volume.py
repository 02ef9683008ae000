"""A registered volume: its record, its region maps and its device, under one lock.

State directory layout (``<state-root>/<name>/``)::

    volume.json    identity, geometry, mode, eras, settings (storage.record)
    bitmaps.bin    every region bitmap, in one file so they change together
    eras.bin       the era of each region's last write
    manifest.bin   the blake3 digest each region should have
    lock           flock'd by the one process that may mutate the volume
    log/           the replication log (storage.replog)
    overlay.img    the overlay's data, while one exists

The three binary files share the header of :mod:`drtool.storage.mapfile`.
Their ``seq`` field says up to which replication-log record they are
current; records after it are replayed when the volume is opened.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

from drtool.errors import CorruptStateFile, UsageError, VolumeExists, VolumeNotFound
from drtool.regions import Geometry, validate_region_size
from drtool.storage import mapfile
from drtool.storage.device import Device, check_device_path
from drtool.storage.lock import VolumeLock
from drtool.storage.maps import EraMap, Manifest, RegionBitmap
from drtool.storage.paths import StatePaths, validate_name
from drtool.storage.record import EraStart, VolumeRecord

#: The bitmaps a volume keeps, in their order inside bitmaps.bin.
#:   bad           cannot be served from the local device (checksum, I/O error, fault)
#:   ioerror       bad because of an I/O error or short read (scan must not clear these)
#:   unreplicated  written but not yet acknowledged by the secondary
#:   norecord      unreplicated with no log record left (bitmap mode): ship from the volume
#:   overlay       present in the overlay
#:   resync        still to be copied back into the device by failback
BITMAP_KINDS = ("bad", "ioerror", "unreplicated", "norecord", "overlay", "resync")

MAGIC_BITMAPS = b"DRTBMAPS"
MAGIC_ERAS = b"DRTERAS\0"
MAGIC_MANIFEST = b"DRTMANIF"


class Volume:
    """Open with :meth:`create`, :meth:`open` (mutating, locked) or :meth:`inspect` (read-only)."""

    def __init__(self, paths: StatePaths, record: VolumeRecord, lock: VolumeLock | None) -> None:
        self.paths = paths
        self.record = record
        self.lock = lock
        self.geometry = Geometry(record.size, record.region_size)
        count = self.geometry.count
        self.bitmaps: dict[str, RegionBitmap] = {kind: RegionBitmap(count) for kind in BITMAP_KINDS}
        self.eras = EraMap(count, initial=0)
        self.manifest = Manifest(count)
        self.generations = {"bitmaps": 0, "eras": 0, "manifest": 0}
        self.covered_seq = {"bitmaps": 0, "eras": 0, "manifest": 0}

    # -- opening --------------------------------------------------------------------

    @classmethod
    def create(
        cls, root: str, name: str, device: str, region_size: int | str, force: bool = False,
        size: int | None = None, volume_id: str | None = None,
    ) -> Volume:
        """Register a volume (maps empty: the caller fills the manifest).

        ``size`` and ``volume_id`` are given when the volume continues an existing one
        (a promoted replica keeps its identity); otherwise the device's size and a new id.
        """
        paths = StatePaths(root, validate_name(name))
        region_size = validate_region_size(region_size)
        device = os.path.abspath(device)
        device_size = check_device_path(device)
        if size is None:
            size = device_size
        elif device_size < size:
            raise UsageError(f"device {device} has {device_size} bytes, the volume needs {size}")
        os.makedirs(root, mode=0o700, exist_ok=True)
        existed = os.path.exists(paths.record)
        if existed and not force:
            raise VolumeExists(name, paths.dir)
        os.makedirs(paths.dir, mode=0o700, exist_ok=True)
        lock = VolumeLock(paths.dir, name).acquire()
        try:
            if existed:
                _clear_state_dir(paths)
            record = VolumeRecord.new(name, device, size, region_size)
            if volume_id is not None:
                record.volume_id = volume_id
            volume = cls(paths, record, lock)
            volume.save_all()
            return volume
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(cls, root: str, name: str) -> Volume:
        """Open for mutation: takes the volume's lock (VolumeBusy if held)."""
        paths = _existing(root, name)
        lock = VolumeLock(paths.dir, name).acquire()
        try:
            return cls._load(paths, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def inspect(cls, root: str, name: str) -> Volume:
        """Open read-only without the lock (status while another process runs)."""
        return cls._load(_existing(root, name), None)

    @classmethod
    def _load(cls, paths: StatePaths, lock: VolumeLock | None) -> Volume:
        record = VolumeRecord.load(paths.record)
        if record.name != paths.name:
            raise CorruptStateFile(paths.record, f"record names volume {record.name!r}, directory is {paths.name!r}")
        volume = cls(paths, record, lock)
        volume._load_maps()
        return volume

    def _load_maps(self) -> None:
        count = self.geometry.count
        common = dict(region_size=self.record.region_size, region_count=count,
                      volume_id=self.record.volume_id_bytes)
        size = RegionBitmap.body_size(count)
        header, body = mapfile.load(self.paths.bitmaps, MAGIC_BITMAPS, "bitmap file",
                                    body_size=size * len(BITMAP_KINDS), **common)
        for index, kind in enumerate(BITMAP_KINDS):
            self.bitmaps[kind] = RegionBitmap(count, body[index * size:(index + 1) * size])
        self._note("bitmaps", header)
        header, body = mapfile.load(self.paths.eras, MAGIC_ERAS, "era map",
                                    body_size=EraMap.body_size(count), **common)
        self.eras = EraMap(count, body)
        self._note("eras", header)
        header, body = mapfile.load(self.paths.manifest, MAGIC_MANIFEST, "manifest",
                                    body_size=Manifest.body_size(count), **common)
        self.manifest = Manifest(count, body)
        self._note("manifest", header)

    def _note(self, what: str, header: mapfile.MapHeader) -> None:
        self.generations[what] = header.generation
        self.covered_seq[what] = header.seq

    def close(self) -> None:
        if self.lock:
            self.lock.release()
            self.lock = None

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the maps ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def bad(self) -> RegionBitmap:
        return self.bitmaps["bad"]

    @property
    def ioerror(self) -> RegionBitmap:
        return self.bitmaps["ioerror"]

    @property
    def unreplicated(self) -> RegionBitmap:
        return self.bitmaps["unreplicated"]

    @property
    def norecord(self) -> RegionBitmap:
        return self.bitmaps["norecord"]

    @property
    def overlay(self) -> RegionBitmap:
        return self.bitmaps["overlay"]

    @property
    def resync(self) -> RegionBitmap:
        return self.bitmaps["resync"]

    @property
    def health(self) -> str:
        if self.record.faulted:
            return "FAULTED"
        if self.bad.any():
            return "DEGRADED"
        return "ONLINE"

    def requested(self, region: int) -> bool:
        """Must this region's bytes come from the replica?  Bad, or (when the local copy is an
        older point in time) written since that era; never when the overlay holds it."""
        if self.overlay.test(region):
            return False
        if self.bad.test(region):
            return True
        recovery = self.record.recovery
        if recovery and recovery.get("local_era") is not None:
            return self.eras[region] >= recovery["local_era"]
        return False

    def requested_between(self, first: int, end: int) -> Iterator[int]:
        """The requested regions in [first, end), ascending.  Without an older local copy only bad
        regions are requested, so the bad map's set bits are walked instead of every region."""
        recovery = self.record.recovery or {}
        candidates = (range(max(first, 0), min(end, self.geometry.count)) if recovery.get("local_era") is not None
                      else self.bad.set_between(first, end))
        return (region for region in candidates if self.requested(region))

    def requested_regions(self) -> RegionBitmap:
        wanted = RegionBitmap(self.geometry.count)
        for region in self.requested_between(0, self.geometry.count):
            wanted.set(region)
        return wanted

    def lost_regions(self) -> RegionBitmap:
        """Requested but unreplicated and without a log record: nobody holds their current bytes."""
        lost = RegionBitmap(self.geometry.count)
        for region in self.norecord:
            if self.requested(region):
                lost.set(region)
        return lost

    # -- persistence ------------------------------------------------------------------

    def _header(self, magic: bytes, what: str, seq: int | None) -> mapfile.MapHeader:
        self.generations[what] += 1
        if seq is not None:
            self.covered_seq[what] = seq
        return mapfile.MapHeader(magic, mapfile.FORMAT_VERSION, self.record.region_size,
                                 self.geometry.count, self.generations[what],
                                 self.covered_seq[what], self.record.volume_id_bytes)

    def save_record(self) -> None:
        self.record.save(self.paths.record)

    def save_bitmaps(self, seq: int | None = None) -> None:
        body = b"".join(self.bitmaps[kind].to_bytes() for kind in BITMAP_KINDS)
        mapfile.save(self.paths.bitmaps, self._header(MAGIC_BITMAPS, "bitmaps", seq), body)

    def save_content_maps(self, seq: int | None = None) -> None:
        """The manifest and the era map: written before the bitmaps that depend on them."""
        mapfile.save(self.paths.manifest, self._header(MAGIC_MANIFEST, "manifest", seq),
                     self.manifest.to_bytes())
        mapfile.save(self.paths.eras, self._header(MAGIC_ERAS, "eras", seq), self.eras.to_bytes())

    def save_all(self, seq: int | None = None) -> None:
        self.save_content_maps(seq)
        self.save_bitmaps(seq)
        self.save_record()

    # -- eras -------------------------------------------------------------------------

    def checkpoint(self, next_seq: int) -> int:
        """Start a new era; writes from now on carry it.  Returns its number."""
        self.record.era += 1
        self.record.eras.append(EraStart(self.record.era, time.time(), next_seq))
        self.save_record()
        return self.record.era

    # -- the device ----------------------------------------------------------------------

    def open_device(self, writable: bool = False, path: str | None = None) -> Device:
        return Device(path or self.record.device, writable=writable)

    def region_bytes(self, regions: Iterator[int] | list[int]) -> int:
        return sum(self.geometry.region_length(r) for r in regions)


def _existing(root: str, name: str) -> StatePaths:
    paths = StatePaths(root, validate_name(name))
    if not os.path.exists(paths.record):
        if os.path.isdir(paths.dir) and os.listdir(paths.dir):
            raise CorruptStateFile(paths.record, "state directory exists but the volume record is missing")
        raise VolumeNotFound(name, root)
    return paths


def _clear_state_dir(paths: StatePaths) -> None:
    """Remove a volume's state for ``init --force`` (the lock file stays: we hold it)."""
    for entry in os.listdir(paths.dir):
        if entry == "lock":
            continue
        target = os.path.join(paths.dir, entry)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)
