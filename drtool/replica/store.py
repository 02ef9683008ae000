"""The replicas under a server's root: creating, opening, describing, deleting.

A ReplicaVolume owns the open files of one replica and the lock that keeps
applies (writers) apart from reads: readers hold the shared side only while
they pick sources and copy bytes into a buffer, never while a slow client
drains the socket.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from drtool.errors import CorruptStateFile, NotPermitted, UsageError, VolumeNotFound
from drtool.regions import Geometry, validate_region_size
from drtool.replica.applied import AppliedState
from drtool.replica.journal import DEFAULT_JOURNAL_LIMIT, Journal
from drtool.replica.jsonstate import load_json, save_json
from drtool.replica.snapshots import SnapshotSet
from drtool.replica.tables import DigestTable
from drtool.storage.atomic import fsync_dir
from drtool.storage.device import Device
from drtool.storage.paths import validate_name

MANIFEST_MAGIC = b"DRTRMAN\0"
OVERLAY_MAGIC = b"DRTROVL\0"


class RWLock:
    """Many readers or one writer; a waiting writer holds off new readers (no starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Target:
    """An image, the digests of its regions and the records applied to it."""

    def __init__(self, image_path: str, table: DigestTable, applied: AppliedState) -> None:
        self.image_path = image_path
        self.table = table
        self.applied = applied
        self.image: Device | None = None

    def create(self, size: int) -> None:
        with open(self.image_path, "xb") as handle:
            handle.truncate(size)
        self.table.create()
        self.applied.create()

    def open(self) -> None:
        self.table.check()
        self.applied.load()
        self.image = Device(self.image_path, writable=True)

    def close(self) -> None:
        if self.image is not None:
            self.image.close()


class ReplicaVolume:
    def __init__(self, directory: str, name: str, meta: dict[str, Any], journal_limit: int) -> None:
        self.directory = directory
        self.name = name
        self.meta = meta
        self.volume_id: str = meta["volume_id"]
        self.geometry = Geometry(int(meta["size"]), int(meta["region_size"]))
        vid = bytes.fromhex(self.volume_id)
        self.mirror = Target(self._path("mirror.img"),
                             DigestTable(self._path("manifest"), MANIFEST_MAGIC, "manifest", self.geometry,
                                         vid, lazy=False),
                             AppliedState(self._path("applied.json"), self.volume_id))
        self.overlay = Target(self._path("overlay.img"),
                              DigestTable(self._path("overlay"), OVERLAY_MAGIC, "overlay table",
                                          self.geometry, vid, lazy=True),
                              AppliedState(self._path("overlay-applied.json"), self.volume_id))
        self.journal = Journal(self._path("journal"), self.geometry, self.volume_id, journal_limit)
        self.snapshots = SnapshotSet(self._path("snapshots"), self.geometry, self.volume_id)
        self.lock = RWLock()

    def _path(self, leaf: str) -> str:
        return os.path.join(self.directory, leaf)

    def create(self) -> None:
        self.mirror.create(self.geometry.size)
        self.overlay.create(self.geometry.size)
        self.journal.create()
        os.makedirs(self._path("snapshots"))

    def open(self) -> ReplicaVolume:
        try:
            self.mirror.open()
            self.overlay.open()
            self.journal.open()
            self.snapshots.open()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        self.mirror.close()
        self.overlay.close()
        self.snapshots.close()

    def describe(self) -> dict[str, Any]:
        with self.lock.shared():
            first, last = self.journal.range()
            return {
                "name": self.name,
                "size": self.geometry.size,
                "region_size": self.geometry.region_size,
                "region_count": self.geometry.count,
                "volume_id": self.volume_id,
                "applied_seq": self.mirror.applied.watermark,
                "applied_ahead": sorted(self.mirror.applied.ahead),
                "zero_regions": self.mirror.table.zero_count(),
                "snapshots": sorted(self.snapshots.by_name),
                "journal": {"base_seq": self.journal.base_seq, "first_seq": first, "last_seq": last,
                            "records": len(self.journal.entries), "bytes": self.journal.total_bytes(),
                            "limit": self.journal.limit},
                "overlay": {"regions": len(self.overlay.table.present_regions()),
                            "applied_seq": self.overlay.applied.watermark},
            }

    def drop_overlay(self) -> None:
        """Forget the overlay replica (after failback): empty image, table and applied state."""
        with self.lock.exclusive():
            self.overlay.close()
            os.unlink(self.overlay.image_path)
            shutil.rmtree(self.overlay.table.directory)
            self.overlay.table = DigestTable(self.overlay.table.directory, OVERLAY_MAGIC, "overlay table",
                                             self.geometry, bytes.fromhex(self.volume_id), lazy=True)
            self.overlay.applied = AppliedState(self.overlay.applied.path, self.volume_id)
            self.overlay.create(self.geometry.size)
            self.overlay.open()


class ReplicaRoot:
    """All replicas under one directory, opened on first use and kept open."""

    def __init__(self, root: str, journal_limit: int = DEFAULT_JOURNAL_LIMIT) -> None:
        self.root = os.path.abspath(root)
        self.journal_limit = journal_limit
        self._volumes: dict[str, ReplicaVolume] = {}
        self._lock = threading.Lock()
        os.makedirs(self.root, exist_ok=True)

    def _meta_path(self, name: str) -> str:
        return os.path.join(self.root, name, "replica.json")

    def names(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root) if os.path.exists(self._meta_path(n)))

    def get(self, name: str) -> ReplicaVolume:
        validate_name(name)
        with self._lock:
            volume = self._volumes.get(name)
            if volume is None:
                if not os.path.exists(self._meta_path(name)):
                    raise VolumeNotFound(name, self.root)
                volume = self._open(name)
            return volume

    def _open(self, name: str) -> ReplicaVolume:
        meta = load_json(self._meta_path(name), "replica", None)
        if meta.get("name") != name:
            raise CorruptStateFile(self._meta_path(name), f"it describes replica {meta.get('name')!r}")
        volume = ReplicaVolume(os.path.join(self.root, name), name, meta, self.journal_limit).open()
        self._volumes[name] = volume
        return volume

    def ensure(self, name: str, size: int, region_size: int, volume_id: str) -> tuple[bool, ReplicaVolume]:
        """Create the replica, or accept an identical one; (created, volume)."""
        validate_name(name)
        region_size = validate_region_size(region_size)
        Geometry(size, region_size)
        volume_id = _check_volume_id(volume_id)
        try:
            existing = self.get(name)
        except VolumeNotFound:
            existing = None
        if existing is not None:
            want = {"size": size, "region_size": region_size, "volume_id": volume_id}
            have = {k: existing.meta[k] for k in want}
            if have != want:
                diff = ", ".join(f"{k} {have[k]} (asked {want[k]})" for k in want if have[k] != want[k])
                raise NotPermitted(f"replica {name} already exists with {diff}")
            return False, existing
        with self._lock:
            directory = os.path.join(self.root, name)
            if os.path.exists(directory):
                raise NotPermitted(f"{directory} exists but holds no replica; remove it by hand")
            meta = {"name": name, "size": size, "region_size": region_size, "volume_id": volume_id,
                    "created": time.time()}
            os.makedirs(directory)
            volume = ReplicaVolume(directory, name, meta, self.journal_limit)
            volume.create()
            # replica.json last: a crash before it leaves a directory that is refused, not half-used.
            save_json(self._meta_path(name), "replica", volume_id, meta)
            fsync_dir(self.root)
            self._volumes[name] = volume.open()
            return True, volume

    def delete(self, name: str) -> None:
        volume = self.get(name)
        with volume.lock.exclusive():
            with self._lock:
                self._volumes.pop(name, None)
            volume.close()
            os.unlink(self._meta_path(name))
            shutil.rmtree(volume.directory)

    def close(self) -> None:
        with self._lock:
            for volume in self._volumes.values():
                with volume.lock.exclusive():
                    volume.close()
            self._volumes.clear()


def _check_volume_id(volume_id: object) -> str:
    if not isinstance(volume_id, str) or len(volume_id) != 32:
        raise UsageError(f"volume_id must be 32 hex digits, not {volume_id!r}")
    try:
        bytes.fromhex(volume_id)
    except ValueError:
        raise UsageError(f"volume_id must be 32 hex digits, not {volume_id!r}") from None
    return volume_id.lower()
