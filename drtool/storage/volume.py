"""A registered volume: its record, its region maps and its device, under one lock.

State directory layout (``<state-root>/<name>/``)::

    volume.json    identity, geometry, mode, eras, settings (storage.record)
    maps.pages     every region map, paged: the manifest (a blake3 digest per region),
                   the era of each region's last write, the bitmaps, the block digests
                   (per 4 KiB, for regions read in small pieces) (storage.pagestore)
    maps.journal   the last commit's pages, replayed after a crash during a commit
    lock           flock'd by the one process that may mutate the volume
    log/           the replication log (storage.replog)
    overlay.img    the overlay's data, while one exists

The page store's superblock says up to which replication-log record the maps are
current; records after it are replayed when the volume is opened.  A commit writes
the pages changed since the last one, so its cost follows the work, not the size.

A state directory of the first format (whole-volume ``manifest.bin``, ``eras.bin``,
``bitmaps.bin``) is refused with :class:`UpgradeNeeded`; :func:`upgrade` converts it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from typing import Any

from drtool.errors import CorruptStateFile, StateError, UpgradeNeeded, UsageError, VolumeExists, VolumeNotFound
from drtool.regions import Geometry, validate_region_size
from drtool.storage import mapfile
from drtool.storage.device import Device, check_device_path
from drtool.storage.lock import VolumeLock
from drtool.storage.maps import EraMap, Layout, Manifest, OverlayBlocks, RegionBitmap, blocks_per_region, merge_regions
from drtool.storage.pagestore import PageStore
from drtool.storage.paths import StatePaths, validate_name
from drtool.storage.record import FORMAT as RECORD_FORMAT
from drtool.storage.record import EraStart, VolumeRecord

#: The bitmaps a volume keeps.
#:   bad           cannot be served from the local device (checksum, I/O error, fault)
#:   ioerror       bad because of an I/O error or short read (scan must not clear these)
#:   unreplicated  written but not yet acknowledged by the secondary
#:   norecord      unreplicated with no log record left (bitmap mode): ship from the volume
#:   overlay       present in the overlay
#:   resync        still to be copied back into the device by failback
BITMAP_KINDS = ("bad", "ioerror", "unreplicated", "norecord", "overlay", "resync")

# The first format's files (read by `upgrade` only).
MAGIC_BITMAPS = b"DRTBMAPS"
MAGIC_ERAS = b"DRTERAS\0"
MAGIC_MANIFEST = b"DRTMANIF"


class Volume:
    """Open with :meth:`create`, :meth:`open` (mutating, locked) or :meth:`inspect` (read-only)."""

    def __init__(self, paths: StatePaths, record: VolumeRecord, lock: VolumeLock | None,
                 store: PageStore) -> None:
        self.paths = paths
        self.record = record
        self.lock = lock
        self.store = store
        self.geometry = Geometry(record.size, record.region_size)
        count = self.geometry.count
        layout = Layout(count, BITMAP_KINDS, record.region_size)
        self.bitmaps: dict[str, RegionBitmap] = {}
        for kind in BITMAP_KINDS:
            chunks, summary = layout.bitmaps[kind]
            try:
                self.bitmaps[kind] = RegionBitmap(count, store, chunks, summary)
            except ValueError as exc:
                raise CorruptStateFile(store.path, f"{kind} bitmap: {exc}") from None
        self.eras = EraMap(count, store, layout.eras, layout.era_summary)
        self.manifest = Manifest(count, record.region_size, self.geometry.last_region_length, store,
                                 layout.manifest, layout.blocks)
        #: which blocks the overlay holds of the regions it holds in part (None: a region is one block)
        self.overlay_blocks: OverlayBlocks | None = None
        if blocks_per_region(record.region_size):
            bits, summary = layout.overlay_blocks
            try:
                self.overlay_blocks = OverlayBlocks(count, record.region_size, store, bits, summary,
                                                    layout.overlay_digests)
            except ValueError as exc:
                raise CorruptStateFile(store.path, f"overlay block map: {exc}") from None
        self._saved_record: str | None = None  # volume.json as last read or written

    @property
    def covered_seq(self) -> dict[str, int]:
        """The replication-log sequence every map is current to (one commit covers them all)."""
        seq = self.store.superblock.covered_seq
        return {"bitmaps": seq, "eras": seq, "manifest": seq}

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
        check_private(root)
        check_private(paths.dir)
        lock = VolumeLock(paths.dir, name).acquire()
        try:
            if existed:
                _clear_state_dir(paths)
            record = VolumeRecord.new(name, device, size, region_size)
            if volume_id is not None:
                record.volume_id = volume_id
            geometry = Geometry(size, region_size)
            store = PageStore.create(paths.maps, paths.maps_journal, record.volume_id_bytes, region_size,
                                     geometry.count)
            volume = cls(paths, record, lock, store)
            volume.save_record()
            return volume
        except BaseException:
            lock.release()
            raise

    @classmethod
    def open(cls, root: str, name: str) -> Volume:
        """Open for mutation: takes the volume's lock (VolumeBusy if held)."""
        paths = _existing(root, name)
        check_private(paths.root)
        check_private(paths.dir)
        lock = VolumeLock(paths.dir, name).acquire()
        try:
            _remove_leftovers(paths)
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
        if not os.path.exists(paths.maps) and os.path.exists(paths.manifest):
            raise UpgradeNeeded(paths.dir, record.name, "the first format (whole-volume maps)")
        geometry = Geometry(record.size, record.region_size)
        store = PageStore.open(paths.maps, paths.maps_journal, record.volume_id_bytes, record.region_size,
                               geometry.count, writable=lock is not None)
        try:
            volume = cls(paths, record, lock, store)
        except BaseException:
            store.close()
            raise
        volume._saved_record = json.dumps(record.to_json(), sort_keys=True, default=str)
        return volume

    def close(self) -> None:
        self.store.close()
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
        recovery = self.record.recovery
        return self.would_request(region, recovery.get("local_era") if recovery else None)

    def would_request(self, region: int, local_era: int | None) -> bool:
        """:meth:`requested` for a recovery with ``local_era`` (one that may not have begun)."""
        if self.overlay.test(region):
            return False
        if self.bad.test(region):
            return True
        return local_era is not None and self.eras[region] >= local_era

    def requested_between(self, first: int, end: int) -> Iterator[int]:
        """The requested regions in [first, end), ascending: the bad map's set bits, and (for an
        older local copy) the regions written since its era, walked through the era summary."""
        recovery = self.record.recovery or {}
        local_era = recovery.get("local_era")
        candidates = self.bad.set_between(first, end)
        if local_era is not None:
            candidates = merge_regions(candidates, self.eras.changed_since(local_era, first, end))
        return (region for region in candidates if self.requested(region))

    def requested_regions(self) -> RegionBitmap:
        """Every requested region, computed chunk by chunk (a faulted 15 TiB device's full bad
        map costs its chunk counts, not 251M region tests)."""
        wanted = self.bad.difference(self.overlay)
        recovery = self.record.recovery
        local_era = recovery.get("local_era") if recovery else None
        if local_era is not None:
            changed = RegionBitmap(self.geometry.count)
            changed.update(self.eras.changed_since(local_era))
            wanted = wanted.union(changed.difference(self.overlay))
        return wanted

    def lost_regions(self) -> RegionBitmap:
        """Requested but unreplicated and without a log record: nobody holds their current bytes."""
        if not self.norecord.any():
            return RegionBitmap(self.geometry.count)
        return self.requested_regions().intersection(self.norecord)

    # -- persistence ------------------------------------------------------------------

    @property
    def dirty_bytes(self) -> int:
        """Bytes of map pages changed since the last commit (long jobs commit past a bound)."""
        return self.store.dirty_bytes

    def commit(self, seq: int | None = None) -> int:
        """Write the map pages changed since the last commit, crash-safe (storage.pagestore).
        ``seq``: the replication-log sequence the maps now cover (unchanged when None).
        Returns the bytes written (0 when nothing changed)."""
        for bitmap in self.bitmaps.values():
            bitmap.save_counts()
        if self.overlay_blocks is not None:
            self.overlay_blocks.save_counts()
        covered = self.store.superblock.covered_seq if seq is None else seq
        if not self.store.dirty_bytes and covered == self.store.superblock.covered_seq:
            return 0
        return self.store.commit(covered)

    def save_record(self) -> None:
        current = json.dumps(self.record.to_json(), sort_keys=True, default=str)
        if current == self._saved_record:
            return  # unchanged: a checkpoint writes nothing for it
        self.record.save(self.paths.record)
        self._saved_record = current

    def save_bitmaps(self, seq: int | None = None) -> None:
        self.commit(seq)

    def save_content_maps(self, seq: int | None = None) -> None:
        self.commit(seq)

    def save_all(self, seq: int | None = None) -> None:
        self.commit(seq)
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


def check_private(directory: str) -> None:
    """A state directory (or the root above it) that other users can write is refused: they
    could replace the maps or the log, and drtool would serve what they wrote as verified."""
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return
    if info.st_mode & 0o022:
        raise StateError(f"state directory {directory} is writable by other users (mode "
                         f"{info.st_mode & 0o777:o}); refusing it: chmod go-w {directory}")


def _existing(root: str, name: str) -> StatePaths:
    paths = StatePaths(root, validate_name(name))
    if not os.path.exists(paths.record):
        if os.path.isdir(paths.dir) and os.listdir(paths.dir):
            raise CorruptStateFile(paths.record, "state directory exists but the volume record is missing")
        raise VolumeNotFound(name, root)
    return paths


def _remove_leftovers(paths: StatePaths) -> None:
    """Temporary files a killed process left (``volume.json.tmp.<pid>``, a half-built upgrade):
    only the lock holder writes here, and we hold the lock, so none is in use."""
    for entry in os.listdir(paths.dir):
        if ".tmp." in entry or entry.endswith(".upgrade"):
            try:
                os.unlink(os.path.join(paths.dir, entry))
            except OSError:
                pass


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


def upgrade(root: str, name: str) -> dict[str, Any]:
    """Convert a state directory of the first format (whole-volume map files) to the paged one.

    Crash-safe and repeatable: the new map file is built beside the old files and renamed
    into place in one step (before that, the old format is intact; after it, the new one is
    complete), and only then are the old files removed.  Running it on a current state
    directory changes nothing (or finishes the removal an interrupted run left).
    """
    from drtool.storage.atomic import fsync_dir

    paths = _existing(root, name)
    with VolumeLock(paths.dir, name):
        record = VolumeRecord.load(paths.record, allow_first_format=True)
        with open(paths.record, "rb") as handle:
            old_record = json.loads(handle.read()).get("format") != RECORD_FORMAT
        old_files = [p for p in (paths.manifest, paths.eras, paths.bitmaps) if os.path.exists(p)]
        if os.path.exists(paths.maps):
            if old_record:  # interrupted after the maps' switch: the record's turn
                record.save(paths.record)
            for path in old_files:
                os.unlink(path)
            if old_files:
                fsync_dir(paths.dir)
            return {"volume": name, "changed": bool(old_files) or old_record,
                    "from": "first format (volume.json)" if old_record and not old_files else None,
                    "format": "paged", "removed": [os.path.basename(p) for p in old_files]}
        geometry = Geometry(record.size, record.region_size)
        count = geometry.count
        common = dict(region_size=record.region_size, region_count=count, volume_id=record.volume_id_bytes)
        bitmap_size = (count + 7) // 8
        bits_header, bits = mapfile.load(paths.bitmaps, MAGIC_BITMAPS, "bitmap file",
                                         body_size=bitmap_size * len(BITMAP_KINDS), **common)
        eras_header, eras = mapfile.load(paths.eras, MAGIC_ERAS, "era map", body_size=4 * count, **common)
        manifest_header, digests = mapfile.load(paths.manifest, MAGIC_MANIFEST, "manifest",
                                                body_size=32 * count, **common)
        # Records after the oldest file's sequence are replayed at the next open (idempotent).
        covered = min(bits_header.seq, eras_header.seq, manifest_header.seq)
        building, building_journal = paths.maps + ".upgrade", paths.maps_journal + ".upgrade"
        store = PageStore.create(building, building_journal, record.volume_id_bytes, record.region_size,
                                 count, covered)
        try:
            volume = Volume(paths, record, None, store)
            view = memoryview(digests)
            for region in range(count):
                volume.manifest[region] = bytes(view[32 * region:32 * region + 32])
                era = int.from_bytes(eras[4 * region:4 * region + 4], "little")
                if era:
                    volume.eras[region] = era
                if volume.dirty_bytes > (64 << 20):
                    volume.commit()
            for index, kind in enumerate(BITMAP_KINDS):
                body = bits[index * bitmap_size:(index + 1) * bitmap_size]
                bitmap = volume.bitmaps[kind]
                for byte_index, byte in enumerate(body):
                    while byte:
                        low = byte & -byte
                        bitmap.set(byte_index * 8 + low.bit_length() - 1)
                        byte ^= low
            volume.commit(covered)
        finally:
            store.close()
        os.unlink(building_journal)  # its commit is in the file (fdatasync'd)
        os.replace(building, paths.maps)
        fsync_dir(paths.dir)
        record.save(paths.record)  # now with its checksum
        for path in old_files:
            os.unlink(path)
        fsync_dir(paths.dir)
        return {"volume": name, "changed": True, "from": "first format (whole-volume maps)", "format": "paged",
                "removed": [os.path.basename(p) for p in old_files], "regions": count}
