"""One replica on the secondary: its files, its lock, its role state and its description.

A ReplicaVolume owns the open files of one replica and the lock that keeps
applies (writers) apart from reads: readers hold the shared side only while
they pick sources and copy bytes into a buffer, never while a slow client
drains the socket.

Role state lives in ``replica.json`` next to the geometry (see docs/api.md):
``primary`` (the primary released the role at a sequence number), ``promoted``
(this host's copy became a primary volume: the server never writes its image
again), ``adopted`` (the replica lives in place on a former primary's device,
``image``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from drtool.errors import UsageError
from drtool.regions import Geometry
from drtool.replica.applied import AppliedState, latest
from drtool.replica.journal import DEFAULT_JOURNAL_LIMIT, Journal
from drtool.replica.jsonstate import save_json
from drtool.replica.problems import RoleRefused, promoted_refusal
from drtool.replica.snapshots import SnapshotSet
from drtool.replica.tables import DigestTable
from drtool.storage.device import Device
from drtool.storage.direct import direct_io_pays

MANIFEST_MAGIC = b"DRTRMAN\0"
OVERLAY_MAGIC = b"DRTROVL\0"
META_FILE = "replica.json"
MIRROR_FILE = "mirror.img"


def check_volume_id(volume_id: object) -> str:
    """The primary's volume id (32 hex digits, lower case) or UsageError."""
    if not isinstance(volume_id, str) or len(volume_id) != 32:
        raise UsageError(f"volume_id must be 32 hex digits, not {volume_id!r}")
    try:
        bytes.fromhex(volume_id)
    except ValueError:
        raise UsageError(f"volume_id must be 32 hex digits, not {volume_id!r}") from None
    return volume_id.lower()


def new_generation() -> str:
    """A replica's generation: random, made when the replica is created (32 hex digits).  With the
    volume id it names this copy: a replica deleted and created again, a wiped root or a replaced
    disk gets another one, so the primary never mistakes it for the copy it filled."""
    return secrets.token_hex(16)


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
        self._direct: int | None = None  # the O_DIRECT descriptor (-1: none), opened when first asked

    def create(self, size: int) -> None:
        with open(self.image_path, "xb") as handle:
            handle.truncate(size)
        self.table.create()
        self.applied.create()

    def load(self, writable: bool = False) -> None:
        """Check the table and read the applied state; ``writable`` False: a read-only look (no image opened)."""
        self.table.check(writable)
        self.applied.load()

    def open(self) -> None:
        self.load(writable=True)
        self.image = Device(self.image_path, writable=True)

    def direct(self) -> int | None:
        """A second descriptor of the image that bypasses the page cache, where that saves work
        (a regular file on a disk's file system); None elsewhere."""
        if self._direct is None:
            self._direct = -1
            if os.path.isfile(self.image_path) and direct_io_pays(os.path.dirname(self.image_path)):
                self._direct = os.open(self.image_path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        return None if self._direct < 0 else self._direct

    def close(self) -> None:
        if self._direct is not None and self._direct >= 0:
            os.close(self._direct)
        self._direct = None
        if self.image is not None:
            self.image.close()


class ReplicaVolume:
    def __init__(self, directory: str, name: str, meta: dict[str, Any], journal_limit: int | None) -> None:
        self.directory = directory
        self.name = name
        self.meta = meta
        self.volume_id: str = meta["volume_id"]
        self.geometry = Geometry(int(meta["size"]), int(meta["region_size"]))
        vid = bytes.fromhex(self.volume_id)
        self.mirror = Target(self.image_path,
                             DigestTable(self._path("manifest"), MANIFEST_MAGIC, "manifest", self.geometry,
                                         vid, lazy=False, presence=False),
                             AppliedState(self._path("applied.json"), self.volume_id))
        self.overlay = Target(self._path("overlay.img"), self._overlay_table(),
                              AppliedState(self._path("overlay-applied.json"), self.volume_id))
        # describe_root (journal_limit None) only reads the journal: its limit does not matter there.
        self.journal = Journal(self._path("journal"), self.geometry, self.volume_id,
                               DEFAULT_JOURNAL_LIMIT if journal_limit is None else journal_limit)
        self.journal_limit = journal_limit
        self.snapshots = SnapshotSet(self._path("snapshots"), self.geometry, self.volume_id)
        self.lock = RWLock()
        self._opened = False  # open() finished: close() checkpoints what the journal holds beyond

    def _path(self, leaf: str) -> str:
        return os.path.join(self.directory, leaf)

    def _overlay_table(self) -> DigestTable:
        return DigestTable(self._path("overlay"), OVERLAY_MAGIC, "overlay table", self.geometry,
                           bytes.fromhex(self.volume_id), lazy=True)

    @property
    def image_path(self) -> str:
        """The mirror's image: ``mirror.img`` here, or the device an adopted replica lives on."""
        return self.meta.get("image") or self._path(MIRROR_FILE)

    @property
    def meta_path(self) -> str:
        return self._path(META_FILE)

    def create(self) -> None:
        """Create the replica's files; it gets a new generation (the caller saves the meta after)."""
        self.meta["generation"] = new_generation()
        self.mirror.create(self.geometry.size)
        self.overlay.create(self.geometry.size)
        self.journal.create()
        os.makedirs(self._path("snapshots"))

    def open(self) -> ReplicaVolume:
        try:
            self.mirror.open()
            self.overlay.open()
            self.journal.scan()
            self.snapshots.open()
            # The journal is the mirror's write-ahead log: what a crash left only there goes into
            # the mirror before anything is served, then the journal's limit is applied.
            from drtool.replica.apply import replay_journal  # (apply builds on this module)

            replay_journal(self)
            self.checkpoint()
            self.journal.settle_limit(self.mirror.applied.highest)
            self.checkpoint()
            self._opened = True
            if not self.meta.get("generation"):
                # A replica made before generations existed (or adopted in place): it gets one
                # now, kept from here on, so its primary can tell it from a replacement.
                self.meta["generation"] = new_generation()
                self.save_meta()
        except BaseException:
            self.close()
            raise
        return self

    def load_readonly(self, committed_end: tuple[int, int] | None = None) -> ReplicaVolume:
        """Read every state file without opening images or repairing anything (describe_root).
        ``committed_end``: the journal position its group's last commit names (records after it
        were never acknowledged: the server cuts them when it opens the root)."""
        self.mirror.load()
        self.overlay.load()
        self.journal.open(writable=False)
        self.snapshots.load_names()
        # Records durable in the journal past the mirror's checkpoint are applied (a replay
        # writes them into the mirror when the server opens it).
        self.journal.checkpoint = self.mirror.applied.journal_at
        self.mirror.applied.mark(self.journal.seqs_after_checkpoint(committed_end))
        return self

    def checkpoint(self) -> None:
        """Make the mirror hold durably every record its journal holds: flush the image, save
        the digests, then the applied state naming the journal's end (the commit).  Records
        after that position are replayed after a crash; segments before it may be trimmed.
        Call with the exclusive lock held, or before the volume is shared."""
        mirror = self.mirror
        if mirror.image is None:
            return
        at = None if self.journal.disabled else self.journal.end()
        mirror.image.sync()
        mirror.table.save(mirror.applied.watermark)
        mirror.applied.journal_at = at
        mirror.applied.save()
        self.journal.checkpoint = at
        self.journal.trim()

    def close(self) -> None:
        if self._opened and self.mirror.image is not None and self.mirror.image.fd >= 0:
            self._opened = False
            if self.journal.since_checkpoint():
                self.checkpoint()  # (a kill -9 instead would leave the records to the next replay)
        self.mirror.close()
        self.overlay.close()
        self.snapshots.close()

    def save_meta(self) -> None:
        save_json(self.meta_path, "replica", self.volume_id, self.meta)

    # -- role ---------------------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.meta.get("promoted"):
            return "promoted"
        if (self.meta.get("primary") or {}).get("state") == "released":
            return "released"
        return "replica"

    def refuse_if_promoted(self, what: str) -> None:
        if self.meta.get("promoted"):
            raise promoted_refusal(self.name, what)

    def check_accepts_records(self) -> None:
        """New records are refused once the primary released the role (promoted: see apply)."""
        released = self.meta.get("primary")
        if self.state == "released":
            raise RoleRefused(f"volume {self.name} was released by its primary at seq {released['seq']} "
                              f"(era {released['era']}); new records contradict that release (the primary "
                              "must cancel it first: DELETE .../release)",
                              f"volume {self.name} was released by its primary", "released")

    # -- description --------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        with self.lock.shared():
            first, last = self.journal.range()
            mirror, overlay = self.mirror.applied, self.overlay.applied
            return {
                "name": self.name,
                "size": self.geometry.size,
                "region_size": self.geometry.region_size,
                "region_count": self.geometry.count,
                "volume_id": self.volume_id,
                "generation": self.meta.get("generation"),
                "image": self.image_path,
                "state": self.state,
                "primary": self.meta.get("primary"),
                "promoted": self.meta.get("promoted"),
                "adopted": self.meta.get("adopted"),
                "rebased": self.meta.get("rebased"),
                "applied_seq": mirror.watermark,
                "applied_ahead": sorted(mirror.ahead),
                "max_era": max(mirror.max_era, overlay.max_era),
                "last_record_at": latest(mirror, overlay),
                "zero_regions": self.mirror.table.zero_count(),
                "snapshots": sorted(self.snapshots.by_name),
                "journal": {"enabled": not self.journal.disabled, "base_seq": self.journal.base_seq,
                            "first_seq": first, "last_seq": last,
                            "records": self.journal.records, "bytes": self.journal.total_bytes(),
                            "limit": self.journal_limit},
                "overlay": {"regions": self.overlay.table.present_count(),
                            "applied_seq": overlay.watermark},
                "scrub": self._scrub(),
            }

    def _scrub(self) -> dict[str, Any]:
        """What the replica's own scrub found (drtool.replica.scrub: it builds on this module)."""
        from drtool.replica import scrub

        return scrub.describe(self)

    # -- the overlay replica ------------------------------------------------------------

    def drop_overlay(self) -> None:
        """Forget the overlay replica (after failback): empty image, table and applied state."""
        with self.lock.exclusive():
            self.reset_overlay()

    def reset_overlay(self) -> None:
        """Empty the overlay replica; what its records said about the primary stays, in the mirror's state.

        Call with the exclusive lock held.
        """
        if self.overlay.applied.records:
            self.mirror.applied.absorb_facts(self.overlay.applied)
            self.mirror.applied.save()
        self.overlay.close()
        os.unlink(self.overlay.image_path)
        shutil.rmtree(self.overlay.table.directory)
        self.overlay.table = self._overlay_table()
        self.overlay.applied = AppliedState(self.overlay.applied.path, self.volume_id)
        self.overlay.create(self.geometry.size)
        self.overlay.open()
