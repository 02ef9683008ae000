"""The replicas under a server's root: creating, opening, adopting, deleting, describing.

Lock order: the root's lock, then a volume's lock; nothing that holds a volume's
lock takes the root's.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from contextlib import nullcontext
from typing import Any

from drtool.errors import Conflict, CorruptStateFile, UsageError, VolumeNotFound
from drtool.regions import Geometry, validate_region_size
from drtool.replica import adopt as adoption
from drtool.replica.journal import DEFAULT_JOURNAL_LIMIT
from drtool.replica.jsonstate import load_json, save_json
from drtool.replica.volume import META_FILE, ReplicaVolume, check_volume_id
from drtool.storage.atomic import fsync_dir
from drtool.storage.paths import validate_name


class ReplicaRoot:
    """All replicas under one directory, opened on first use and kept open."""

    def __init__(self, root: str, journal_limit: int = DEFAULT_JOURNAL_LIMIT) -> None:
        self.root = os.path.abspath(root)
        self.journal_limit = journal_limit
        self._volumes: dict[str, ReplicaVolume] = {}
        self._lock = threading.Lock()
        os.makedirs(self.root, exist_ok=True)
        from drtool.replica.group import ReplicaGroups  # (it builds on this module)

        # Before any replica is opened: a member's journal may hold records no commit covers.
        self.groups = ReplicaGroups(self)
        try:
            self.groups.recover()
        except BaseException:
            self.close()
            raise

    def _meta_path(self, name: str) -> str:
        return os.path.join(self.root, name, META_FILE)

    def names(self) -> list[str]:
        return _names(self.root)

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
        volume = ReplicaVolume(os.path.join(self.root, name), name, _load_meta(self.root, name),
                               self.journal_limit).open()
        self._volumes[name] = volume
        return volume

    def ensure(self, name: str, size: int, region_size: int, volume_id: str) -> tuple[bool, ReplicaVolume]:
        """Create the replica, or accept an identical one; (created, volume)."""
        validate_name(name)
        region_size = validate_region_size(region_size)
        Geometry(size, region_size)
        volume_id = check_volume_id(volume_id)
        try:
            existing = self.get(name)
        except VolumeNotFound:
            existing = None
        if existing is not None:
            want = {"size": size, "region_size": region_size, "volume_id": volume_id}
            have = {k: existing.meta[k] for k in want}
            if have != want:
                diff = ", ".join(f"{k} {have[k]} (asked {want[k]})" for k in want if have[k] != want[k])
                raise Conflict(f"replica {name} already exists with {diff}")
            return False, existing
        with self._lock:
            directory = os.path.join(self.root, name)
            if os.path.exists(directory):
                raise Conflict(f"{directory} exists but holds no replica; remove it by hand")
            meta = {"name": name, "size": size, "region_size": region_size, "volume_id": volume_id,
                    "created": time.time(), "image": None, "primary": None, "promoted": None, "adopted": None}
            os.makedirs(directory)
            volume = ReplicaVolume(directory, name, meta, self.journal_limit)
            volume.create()
            # replica.json last: a crash before it leaves a directory that is refused, not half-used.
            save_json(self._meta_path(name), "replica", volume_id, meta)
            fsync_dir(self.root)
            self._volumes[name] = volume.open()
            return True, volume

    def adopt(self, request: adoption.AdoptRequest) -> ReplicaVolume:
        """Hold ``request.name`` in place on the request's image (see drtool.replica.adopt)."""
        name = request.name
        directory = os.path.join(self.root, name)
        with self._lock:
            existing = _load_meta(self.root, name, unfinished_ok=True) if os.path.exists(
                self._meta_path(name)) else None
            if existing is None and os.path.exists(directory):
                raise Conflict(f"{directory} exists but holds no replica; remove it by hand")
            keep_mirror = adoption.check_replaceable(self.root, name, existing, request)
            open_volume = self._volumes.get(name)
            if existing is not None and adoption.same_adoption(existing, request):
                return open_volume or self._open(name)  # a resent adopt: records may have landed since
            with open_volume.lock.exclusive() if open_volume is not None else nullcontext():
                self._volumes.pop(name, None)
                if open_volume is not None:
                    open_volume.close()
                meta = adoption.build(directory, request, keep_mirror, self.journal_limit)
                fsync_dir(self.root)
            return self._open(meta["name"])

    def delete(self, name: str) -> None:
        validate_name(name)
        with self._lock:
            volume = self._volumes.get(name) or (self._open(name) if os.path.exists(self._meta_path(name))
                                                 else None)
            if volume is None:
                raise VolumeNotFound(name, self.root)
            self.groups.refuse_delete_member(name)
            if volume.meta.get("promoted") and not volume.meta.get("image"):
                volume.refuse_if_promoted(f"its image {volume.image_path} is the primary volume now; adopt it "
                                          "(demote) before deleting the replica")
            with volume.lock.exclusive():
                self._volumes.pop(name, None)
                volume.close()
                # An adopted replica's image lives outside the directory: it stays.
                os.unlink(self._meta_path(name))
                shutil.rmtree(volume.directory)

    def close(self) -> None:
        with self._lock:
            for volume in self._volumes.values():
                with volume.lock.exclusive():
                    volume.close()
            self._volumes.clear()


def describe_root(root: str) -> list[dict[str, Any]]:
    """Every replica under ``root`` as ``GET /v1/volumes/{name}`` describes it, read from disk.

    For ``drtool status --replica-root`` on a secondary host: no server, no locks,
    nothing written (a torn journal tail is left for the server to cut).  A torn or
    foreign state file raises CorruptStateFile naming it; an adopt that did not
    finish raises Conflict.  ``journal.limit`` is null: it is the server's setting.
    """
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise UsageError(f"replica root {root} is not a directory")
    from drtool.replica.group import committed_ends

    ends = committed_ends(root)
    described = []
    for name in _names(root):
        meta = _load_meta(root, name)
        volume = ReplicaVolume(os.path.join(root, name), name, meta, None)
        end = ends.get(name)
        committed = end[0] if end is not None and end[1] in (None, meta.get("generation")) else None
        described.append(volume.load_readonly(committed).describe())
    return described


def _names(root: str) -> list[str]:
    return sorted(n for n in os.listdir(root) if os.path.exists(os.path.join(root, n, META_FILE)))


def load_meta(root: str, name: str, unfinished_ok: bool = False) -> dict[str, Any]:
    """A replica's replica.json, checked (see :func:`_load_meta`)."""
    return _load_meta(root, name, unfinished_ok)


def _load_meta(root: str, name: str, unfinished_ok: bool = False) -> dict[str, Any]:
    path = os.path.join(root, name, META_FILE)
    meta = load_json(path, "replica", None)
    if meta.get("name") != name:
        raise CorruptStateFile(path, f"it describes replica {meta.get('name')!r}")
    if meta.get("adopting") and not unfinished_ok:
        raise Conflict(f"replica {name}: an adopt started at {time.ctime(meta['adopting']['at'])} did not "
                       "finish; send the adopt again")
    return meta
