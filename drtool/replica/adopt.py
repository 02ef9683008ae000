"""Adopting a volume: the replica lives in place on a former primary's device.

After a role swap the old primary's device already holds almost all of the
volume; copying it into ``mirror.img`` would be a full copy.  Instead the entry
stores the device's path (``image`` in replica.json) and record batches from
the new primary are written into that very file.  The digests come from the
old primary's manifest, the watermark from its last sequence number; journal,
snapshots and overlay replica start empty.

Crash safety: replica.json is first rewritten with an ``adopting`` marker (an
entry that refuses to open: "send the adopt again"), then the old state files
are removed and the new ones written, then the marker is dropped.  A retried
adopt redoes every step.  The image itself is never deleted: an entry's own
``mirror.img`` is kept when it is the adopted image (a promoted host demoted
again), and external images are never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from typing import Any

import blake3

from drtool.errors import Conflict, UsageError
from drtool.regions import Geometry, Run, coalesce, validate_region_size
from drtool.replica.jsonstate import load_json, save_json
from drtool.replica.problems import promoted_refusal
from drtool.replica.volume import META_FILE, MIRROR_FILE, ReplicaVolume, check_volume_id
from drtool.storage.atomic import fsync_dir
from drtool.storage.device import Device
from drtool.storage.paths import validate_name
from drtool.wire import MANIFEST_ENTRY, WireError, iter_manifest_entries

_STATE_LEAVES = ("manifest", "applied.json", "journal", "snapshots", "overlay.img", "overlay",
                 "overlay-applied.json")


@dataclass(frozen=True)
class AdoptRequest:
    name: str
    image: str
    manifest: str
    size: int
    region_size: int
    volume_id: str
    applied_seq: int
    era: int
    divergent: list[Run]
    lost: dict[str, Any] | None

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.region_size)

    @classmethod
    def parse(cls, name: str, body: dict[str, Any]) -> AdoptRequest:
        """Validate an adopt body (docs/api.md): types, paths, the files and their sizes."""
        validate_name(name)
        try:
            size, region_size = _count(body, "size", 1), validate_region_size(_count(body, "region_size", 1))
            geometry = Geometry(size, region_size)
            request = cls(name, _path(body.get("image"), "image"), _path(body.get("manifest"), "manifest"),
                          size, region_size, check_volume_id(body.get("volume_id")),
                          _count(body, "applied_seq", 0), _count(body, "era", 0),
                          _runs(body.get("divergent", []), geometry), _lost(body.get("lost")))
        except KeyError as exc:
            raise UsageError(f"adopt needs {exc.args[0]!r} (see docs/api.md)") from None
        request._check_files()
        return request

    def _check_files(self) -> None:
        image = _stat(self.image, "image")
        if not (stat.S_ISREG(image.st_mode) or stat.S_ISBLK(image.st_mode)):
            raise UsageError(f"image {self.image} is not a regular file or a block device")
        with Device(self.image) as device:
            if device.size < self.size:
                raise UsageError(f"image {self.image} has {device.size} bytes, the volume needs {self.size}")
        manifest = _stat(self.manifest, "manifest")
        if not stat.S_ISREG(manifest.st_mode) or manifest.st_size % MANIFEST_ENTRY.size:
            raise UsageError(f"manifest {self.manifest} must be a file of manifest entries "
                             f"({MANIFEST_ENTRY.size} bytes each), not {manifest.st_size} bytes")
        with open(self.manifest, "rb") as handle:  # every entry checked before anything changes
            try:
                for _ in iter_manifest_entries(handle.read, self.geometry.count):
                    pass
            except WireError as exc:
                raise UsageError(f"manifest {self.manifest}: {exc}") from None

    def fingerprint(self) -> str:
        """Identifies this exact request, so a resent adopt is recognised and changes nothing."""
        return blake3.blake3(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()


def _count(body: dict[str, Any], key: str, minimum: int) -> int:
    value = body[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UsageError(f"{key} must be an integer >= {minimum}, not {value!r}")
    return value


def _path(value: object, what: str) -> str:
    """An absolute, normalised path: no '..', '.', '//' or trailing '/' to play tricks with."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise UsageError(f"{what} must be an absolute path, not {value!r}")
    if not os.path.isabs(value):
        raise UsageError(f"{what} {value!r} must be an absolute path")
    if os.path.normpath(value) != value or value.startswith("//") or ".." in value.split("/"):
        raise UsageError(f"{what} {value!r} must be a normalised path (no '..', '.', '//' or trailing '/')")
    return value


def _stat(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None


def _runs(value: object, geometry: Geometry) -> list[Run]:
    if not isinstance(value, list):
        raise UsageError(f"divergent must be a list of [first, count] runs, not {value!r}")
    runs = []
    for run in value:
        if (not isinstance(run, (list, tuple)) or len(run) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in run)):
            raise UsageError(f"divergent run {run!r} is not a [first, count] pair of integers")
        geometry.check_run(run[0], run[1])
        runs.append((run[0], run[1]))
    return coalesce(runs)


def _lost(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UsageError(f'lost must be {{"records": N, "bytes": N}} or null, not {value!r}')
    if "records" not in value or "bytes" not in value:
        raise UsageError('lost must carry "records" and "bytes"')
    _count(value, "records", 0)
    _count(value, "bytes", 0)
    return value  # other keys (the primary's own details) are kept as given


# -- replacing an entry ---------------------------------------------------------------------


def check_replaceable(root: str, name: str, existing: dict[str, Any] | None, request: AdoptRequest) -> bool:
    """Refuse what adopt must not replace; True when the image is the entry's own ``mirror.img``."""
    own_mirror = os.path.join(root, name, MIRROR_FILE)
    current_image = (existing.get("image") or own_mirror) if existing else None
    is_current = current_image is not None and os.path.exists(current_image) and os.path.samefile(
        request.image, current_image)
    if existing is not None:
        if existing.get("volume_id") != request.volume_id:
            raise Conflict(f"replica {name} holds volume {existing.get('volume_id')}, not {request.volume_id}: "
                           "adopt never replaces another volume (delete that replica first)")
        if existing.get("promoted") and not is_current:
            raise promoted_refusal(name, f"adopt it on its own image {current_image} (to demote this host), "
                                   f"not on {request.image}")
    keep_mirror = is_current and not (existing or {}).get("image")
    real_root = os.path.realpath(root) + os.sep
    if os.path.realpath(request.image).startswith(real_root) and not keep_mirror:
        raise UsageError(f"image {request.image} lies inside the replica root {root} (another replica's file?)")
    for other in os.listdir(root):
        meta_path = os.path.join(root, other, META_FILE)
        if other == name or not os.path.exists(meta_path):
            continue
        theirs = load_json(meta_path, "replica", None).get("image")
        if theirs and os.path.exists(theirs) and os.path.samefile(theirs, request.image):
            raise Conflict(f"image {request.image} already holds replica {other}")
    return keep_mirror


def same_adoption(existing: dict[str, Any], request: AdoptRequest) -> bool:
    """The entry is this very adoption, finished and still in place (a resent request)."""
    adopted = existing.get("adopted") or {}
    return (adopted.get("request") == request.fingerprint() and not existing.get("adopting")
            and not existing.get("promoted"))


def build(directory: str, request: AdoptRequest, keep_mirror: bool, journal_limit: int) -> dict[str, Any]:
    """Write the adopted entry's state files (see the module's docstring for the order); its meta."""
    now = time.time()
    meta: dict[str, Any] = {
        "name": request.name, "size": request.size, "region_size": request.region_size,
        "volume_id": request.volume_id, "created": now, "image": None if keep_mirror else request.image,
        "primary": None, "promoted": None, "rebased": None,
        "adopted": {"era": request.era, "seq": request.applied_seq, "divergent": [list(r) for r in request.divergent],
                    "lost": request.lost, "at": now, "image": request.image, "manifest": request.manifest,
                    "request": request.fingerprint()},
    }
    os.makedirs(directory, exist_ok=True)
    meta_path = os.path.join(directory, META_FILE)
    save_json(meta_path, "replica", request.volume_id, {**meta, "adopting": {"at": now}})
    _clear(directory, keep_mirror)
    volume = ReplicaVolume(directory, request.name, meta, journal_limit)
    with open(request.manifest, "rb") as manifest:
        try:
            volume.mirror.table.fill_entries(iter_manifest_entries(manifest.read, request.geometry.count))
        except WireError as exc:
            raise UsageError(f"manifest {request.manifest}: {exc}") from None
    volume.mirror.applied.max_era = request.era  # the image holds the old primary's writes up to this era
    volume.mirror.applied.create(watermark=request.applied_seq)
    volume.overlay.create(request.size)
    volume.journal.create(base_seq=request.applied_seq)
    os.makedirs(os.path.join(directory, "snapshots"))
    save_json(meta_path, "replica", request.volume_id, meta)
    fsync_dir(directory)
    return meta


def _clear(directory: str, keep_mirror: bool) -> None:
    """Remove the previous entry's state (a retried adopt finds some of it gone already)."""
    leaves = [*_STATE_LEAVES, *(() if keep_mirror else (MIRROR_FILE,))]
    leaves += [n for n in os.listdir(directory) if ".tmp." in n]
    for leaf in leaves:
        path = os.path.join(directory, leaf)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
