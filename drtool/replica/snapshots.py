"""Copy-on-write snapshots of a mirror.

A snapshot starts empty (creating one is instant).  Before a record changes a
region that a snapshot has not preserved yet, the region's current bytes and
digest are copied into the snapshot, durably; only then is the mirror written.
Reading a snapshot takes preserved regions from the snapshot and every other
region from the mirror.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

from drtool.errors import Conflict, CorruptStateFile
from drtool.regions import Geometry
from drtool.replica.jsonstate import load_json, save_json
from drtool.replica.tables import DigestTable
from drtool.storage.device import Device
from drtool.storage.paths import validate_name

SNAPSHOT_MAGIC = b"DRTRSNP\0"


class Snapshot:
    def __init__(self, directory: str, name: str, geometry: Geometry, volume_id: str) -> None:
        self.directory = directory
        self.name = name
        self.geometry = geometry
        self.volume_id = volume_id
        self.table = DigestTable(os.path.join(directory, "preserved"), SNAPSHOT_MAGIC,
                                 f"snapshot {name} table", geometry, bytes.fromhex(volume_id), lazy=True)
        self.data_path = os.path.join(directory, "data.img")
        self.info: dict[str, Any] = {}
        self.data: Device | None = None

    @property
    def info_path(self) -> str:
        return os.path.join(self.directory, "snapshot.json")

    def create(self, applied_seq: int) -> None:
        os.makedirs(self.directory)
        self.table.create()
        with open(self.data_path, "wb") as handle:
            handle.truncate(self.geometry.size)
        self.info = {"name": self.name, "created": time.time(), "applied_seq": applied_seq}
        save_json(self.info_path, "snapshot", self.volume_id, self.info)
        self.data = Device(self.data_path, writable=True)

    def load(self) -> None:
        """Read and check snapshot.json (nothing opened for writing)."""
        self.info = load_json(self.info_path, "snapshot", self.volume_id)
        if self.info.get("name") != self.name:
            raise CorruptStateFile(self.info_path, f"snapshot file names {self.info.get('name')!r}, "
                                   f"directory is {self.name!r}")

    def open(self) -> None:
        self.load()
        self.table.check(writable=True)
        self.data = Device(self.data_path, writable=True)

    def close(self) -> None:
        if self.data is not None:
            self.data.close()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "created": self.info["created"], "applied_seq": self.info["applied_seq"],
                "preserved_regions": self.table.present_count()}


class SnapshotSet:
    """The snapshots of one replica volume."""

    def __init__(self, directory: str, geometry: Geometry, volume_id: str) -> None:
        self.directory = directory
        self.geometry = geometry
        self.volume_id = volume_id
        self.by_name: dict[str, Snapshot] = {}

    def open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for snapshot in self._finished(warn=True):
            snapshot.open()
            self.by_name[snapshot.name] = snapshot

    def load_names(self) -> None:
        """The snapshots, each snapshot.json checked, nothing opened or created (a read-only look)."""
        for snapshot in self._finished(warn=False):
            snapshot.load()
            self.by_name[snapshot.name] = snapshot

    def _finished(self, warn: bool) -> list[Snapshot]:
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in sorted(os.listdir(self.directory)):
            snapshot = Snapshot(os.path.join(self.directory, name), name, self.geometry, self.volume_id)
            if not os.path.exists(snapshot.info_path):
                # snapshot.json is written last: without it the creation never finished
                # (and was never acknowledged).  Left in place for the operator to remove.
                if warn:
                    print(f"drtool-replica: ignoring {snapshot.directory}: an unfinished snapshot creation",
                          file=sys.stderr)
                continue
            found.append(snapshot)
        return found

    def close(self) -> None:
        for snapshot in self.by_name.values():
            snapshot.close()

    def get(self, name: str) -> Snapshot | None:
        return self.by_name.get(name)

    def create(self, name: str, applied_seq: int) -> Snapshot:
        validate_name(name, "snapshot name")
        if os.path.exists(os.path.join(self.directory, name)):
            raise Conflict(f"{os.path.join(self.directory, name)} exists (an unfinished snapshot?); "
                               "remove it by hand")
        snapshot = Snapshot(os.path.join(self.directory, name), name, self.geometry, self.volume_id)
        snapshot.create(applied_seq)
        self.by_name[name] = snapshot
        return snapshot

    def delete(self, name: str) -> None:
        snapshot = self.by_name.pop(name)
        snapshot.close()
        shutil.rmtree(snapshot.directory)

    def preserve(self, regions: set[int], mirror: Device, manifest: DigestTable) -> None:
        """Copy each region's current mirror content into every snapshot lacking it, durably.

        The bytes are flushed before the table marks them preserved (a large batch
        may write table pages before its save).
        """
        for snapshot in self.by_name.values():
            missing = sorted(r for r in regions if not snapshot.table.present(r))
            if not missing:
                continue
            assert snapshot.data is not None
            for region in missing:
                if not manifest.is_zero(region):
                    offset, length = self.geometry.region_bounds(region)
                    snapshot.data.pwrite(mirror.pread(length, offset), offset)
            snapshot.data.sync()
            for region in missing:
                snapshot.table.set(region, manifest.digest(region))
            snapshot.table.save(0)
