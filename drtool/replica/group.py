"""Consistency groups on the secondary: group transactions applied all or nothing.

A group (``{root}/@groups/{name}/``) names member replicas that the primary keeps write-order
consistent with each other.  Their records arrive only as **group transactions**
(``POST /v1/groups/{name}/records``, body format in drtool.wire): every record the primary
appended between two consistent cuts of the members' logs.  A transaction is applied so that
at every point the server can stop at, each member holds the records of the same transactions:

1. Every part is checked first (parse, bounds, promoted/released, Complete-Through, overlay
   copies resolved): a refusal writes nothing.
2. Each mirror part's new records are appended, exactly as received, to its member's journal
   (the mirror's write-ahead log) and fdatasync'ed.  The images are not touched yet.
3. One commit entry goes to the group's ``commits.log``: the transaction id, every member's
   journal end (and its replica generation), and the overlay parts' records inline.  Its
   fdatasync is the **commit point**; the answer to the primary follows it.
4. The images are written behind (mirror: as a single-volume batch is, made durable by the
   next checkpoint; overlay: written and flushed), digests and applied states set.

If the commit does not happen (an error, a full disk) the members' journals are cut back to
where they ended before step 2.  After a crash, the group is recovered when the server opens
its root, before any member replica is opened: each member's journal is cut to the end the
last commit names (records past it were never acknowledged), then the member's own open
replays its journal into its mirror as usual, then committed overlay parts not yet applied
are applied (idempotent: by sequence number).

``commits.log``: a 32-byte header (magic ``DRTGCOMM``, version, the group id, crc32), then
entries: a 56-byte head (magic ``DRTC``, txn id, metadata length, payload length, blake3 of
metadata and payload, crc32 of the head), JSON metadata, then the overlay parts' records.  A
damaged entry with no intact entry after it is a torn append (never acknowledged): cut.  A
damaged entry followed by an intact one, or a file of another group, is refused.  The file is
compacted (replaced by one entry without payload) once it outgrows COMPACT_BYTES.

Lock order: the root's lock, then a group's lock, then its members' volume locks in name order.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import blake3

from drtool.errors import Conflict, CorruptStateFile, DeviceError, GroupNotFound, StateError, UsageError
from drtool.replica import apply
from drtool.replica.jsonstate import load_json, save_json
from drtool.replica.problems import RoleRefused
from drtool.replica.volume import ReplicaVolume, check_volume_id
from drtool.storage.atomic import fsync_dir, write_atomic
from drtool.storage.paths import validate_name
from drtool.wire import WireError, decode_group_txn

if TYPE_CHECKING:
    from drtool.replica.store import ReplicaRoot

GROUPS_DIR = "@groups"
GROUP_FILE = "group.json"
COMMITS_FILE = "commits.log"
COMMITS_MAGIC = b"DRTGCOMM"
COMMITS_VERSION = 1
COMMITS_HEAD = struct.Struct("<8sHH16s")
COMMITS_HEADER_SIZE = COMMITS_HEAD.size + 4  # 32
ENTRY_MAGIC = b"DRTC"
ENTRY_HEAD = struct.Struct("<4sIQIQ32s")  # magic, reserved, txn, meta length, payload length, blake3
ENTRY_HEADER_SIZE = ENTRY_HEAD.size + 4
MAX_META = 16 << 20
COMPACT_BYTES = 64 << 20
_CRC = struct.Struct("<I")


@dataclass
class Commit:
    txn: int
    meta: dict[str, Any]
    payload: bytes
    position: int  # of the entry in commits.log


class CommitLog:
    """The group's commits.log: append-only, fdatasync'ed per entry (the commit point)."""

    def __init__(self, path: str, group_id: str) -> None:
        self.path = path
        self.group_id = group_id
        self.size = 0

    def create(self) -> None:
        head = COMMITS_HEAD.pack(COMMITS_MAGIC, COMMITS_VERSION, 0, bytes.fromhex(self.group_id))
        write_atomic(self.path, head + _CRC.pack(zlib.crc32(head)))
        self.size = COMMITS_HEADER_SIZE

    def read(self, repair: bool = True) -> list[Commit]:
        """Every intact entry; a torn tail is cut (``repair``) or left out."""
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise CorruptStateFile(self.path, f"cannot read the group's commit log: {exc.strerror}") from None
        if len(raw) < COMMITS_HEADER_SIZE:
            raise CorruptStateFile(self.path, "the group's commit log has no header")
        magic, version, _flags, group_id = COMMITS_HEAD.unpack_from(raw)
        if magic != COMMITS_MAGIC or zlib.crc32(raw[:COMMITS_HEAD.size]) != _CRC.unpack_from(raw, COMMITS_HEAD.size)[0]:
            raise CorruptStateFile(self.path, "not a drtool group commit log (bad magic or header checksum)")
        if version != COMMITS_VERSION:
            raise CorruptStateFile(self.path, f"group commit log version {version} is not supported")
        if group_id.hex() != self.group_id:
            raise CorruptStateFile(self.path, f"the commit log belongs to group id {group_id.hex()}, "
                                   f"not this group's {self.group_id}")
        commits: list[Commit] = []
        position = COMMITS_HEADER_SIZE
        while position < len(raw):
            try:
                commit = _decode_entry(raw, position)
            except WireError as exc:
                if _intact_entry_after(raw, position + 1):
                    raise CorruptStateFile(self.path, f"damaged commit entry at byte {position} ({exc}) "
                                           "followed by intact ones") from None
                if repair:
                    print(f"drtool-replica: {self.path}: cutting a torn commit entry at byte {position} ({exc}); "
                          "it was never acknowledged", file=sys.stderr)
                    os.truncate(self.path, position)
                raw = raw[:position]
                break
            commits.append(commit)
            position += ENTRY_HEADER_SIZE + _entry_size(raw, position)
        self.size = len(raw)
        return commits

    def append(self, txn: int, meta: dict[str, Any], payload: list[memoryview]) -> None:
        """Append one entry and fdatasync it: the commit point."""
        data = json.dumps(meta, sort_keys=True).encode()
        length = sum(len(p) for p in payload)
        digest = blake3.blake3(data)
        for chunk in payload:
            digest.update(chunk)
        head = ENTRY_HEAD.pack(ENTRY_MAGIC, 0, txn, len(data), length, digest.digest())
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                chunks = [head + _CRC.pack(zlib.crc32(head)) + data, *payload]
                written = 0
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    done = 0
                    while done < len(view):
                        done += os.pwrite(fd, view[done:], self.size + written + done)
                    written += len(view)
                os.fdatasync(fd)
            except OSError:
                try:
                    os.ftruncate(fd, self.size)  # nothing half-written stays behind this process
                except OSError:
                    pass
                raise
            finally:
                os.close(fd)
        except OSError as exc:
            raise DeviceError(f"cannot append to the group's commit log {self.path}: {exc.strerror}") from None
        self.size += written

    def compact(self, last: Commit) -> None:
        """Replace the file with its header and ``last``'s metadata (its overlay records were applied
        durably): the log stays bounded by what one transaction carries."""
        head = COMMITS_HEAD.pack(COMMITS_MAGIC, COMMITS_VERSION, 0, bytes.fromhex(self.group_id))
        meta = {**last.meta, "overlay": []}
        data = json.dumps(meta, sort_keys=True).encode()
        entry = ENTRY_HEAD.pack(ENTRY_MAGIC, 0, last.txn, len(data), 0, blake3.blake3(data).digest())
        body = head + _CRC.pack(zlib.crc32(head)) + entry + _CRC.pack(zlib.crc32(entry)) + data
        write_atomic(self.path, body)
        self.size = len(body)


def _entry_size(raw: bytes, position: int) -> int:
    _magic, _r, _txn, meta_len, payload_len, _digest = ENTRY_HEAD.unpack_from(raw, position)
    return meta_len + payload_len


def _decode_entry(raw: bytes, position: int) -> Commit:
    if len(raw) - position < ENTRY_HEADER_SIZE:
        raise WireError("truncated entry header")
    magic, _reserved, txn, meta_len, payload_len, digest = ENTRY_HEAD.unpack_from(raw, position)
    if magic != ENTRY_MAGIC:
        raise WireError("bad entry magic")
    if zlib.crc32(raw[position:position + ENTRY_HEAD.size]) != _CRC.unpack_from(raw, position + ENTRY_HEAD.size)[0]:
        raise WireError("entry header checksum mismatch")
    start = position + ENTRY_HEADER_SIZE
    if meta_len > MAX_META or start + meta_len + payload_len > len(raw):
        raise WireError("entry runs past the end of the file")
    body = raw[start:start + meta_len + payload_len]
    if blake3.blake3(body).digest() != digest:
        raise WireError("entry digest mismatch")
    try:
        meta = json.loads(body[:meta_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("entry metadata is not JSON") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("members"), dict):
        raise WireError("entry metadata has no members")
    return Commit(txn, meta, body[meta_len:], position)


def _intact_entry_after(raw: bytes, start: int) -> bool:
    at = raw.find(ENTRY_MAGIC, start)
    while at >= 0:
        try:
            _decode_entry(raw, at)
            return True
        except WireError:
            at = raw.find(ENTRY_MAGIC, at + 1)
    return False


class ReplicaGroup:
    def __init__(self, directory: str, name: str, info: dict[str, Any]) -> None:
        self.directory = directory
        self.name = name
        self.group_id: str = info["group_id"]
        self.members: list[str] = list(info["members"])
        self.created: float = float(info.get("created", 0.0))
        self.commits = CommitLog(os.path.join(directory, COMMITS_FILE), self.group_id)
        self.committed_txn = 0
        self.last: Commit | None = None
        self.lock = threading.Lock()
        self.broken: str | None = None  # a failed commit could not be undone: no more until reopened

    @property
    def info_path(self) -> str:
        return os.path.join(self.directory, GROUP_FILE)

    def save_info(self) -> None:
        save_json(self.info_path, "replica-group", self.group_id,
                  {"name": self.name, "group_id": self.group_id, "members": self.members, "created": self.created})

    def describe(self, volumes: dict[str, ReplicaVolume]) -> dict[str, Any]:
        return {"name": self.name, "group_id": self.group_id, "members": list(self.members),
                "committed_txn": self.committed_txn,
                "members_applied": {n: v.mirror.applied.watermark for n, v in volumes.items()},
                "overlay_applied": {n: v.overlay.applied.watermark for n, v in volumes.items()}}

    def commit_members(self, volumes: dict[str, ReplicaVolume]) -> dict[str, Any]:
        """What a commit entry says of each member: its journal end and its replica's identity."""
        return {n: {"end": list(v.journal.end()), "generation": v.meta.get("generation"),
                    "applied_seq": v.mirror.applied.watermark} for n, v in volumes.items()}


_MEMBERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="drtool-group")


def _together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run ``calls`` side by side (one alone runs here); their results in order, once every one
    has ended; the first exception is raised then (none is left running behind it)."""
    if len(calls) <= 1:
        return [call() for call in calls]
    futures = [_MEMBERS.submit(call) for call in calls]
    wait(futures)
    return [future.result() for future in futures]


def committed_ends(root: str) -> dict[str, tuple[tuple[int, int], str | None]]:
    """Read-only (describe_root): each group member's journal end at its group's last commit,
    with the replica generation it was committed for.  Nothing is repaired."""
    ends: dict[str, tuple[tuple[int, int], str | None]] = {}
    directory = os.path.join(root, GROUPS_DIR)
    if not os.path.isdir(directory):
        return ends
    for name in sorted(os.listdir(directory)):
        if not os.path.exists(os.path.join(directory, name, GROUP_FILE)):
            continue
        info = load_json(os.path.join(directory, name, GROUP_FILE), "replica-group", None)
        commits = CommitLog(os.path.join(directory, name, COMMITS_FILE), info["group_id"]).read(repair=False)
        if commits:
            for member, fact in commits[-1].meta["members"].items():
                if member in info["members"]:
                    ends[member] = ((int(fact["end"][0]), int(fact["end"][1])), fact.get("generation"))
    return ends


class ReplicaGroups:
    """The groups under a server's root; recovered when the root is opened."""

    def __init__(self, replicas: ReplicaRoot) -> None:
        self.replicas = replicas
        self.directory = os.path.join(replicas.root, GROUPS_DIR)
        self._groups: dict[str, ReplicaGroup] = {}
        self._creating: set[str] = set()
        self._lock = threading.Lock()

    # -- opening and recovery ---------------------------------------------------------

    def recover(self) -> None:
        """Open every group: cut what no commit covers from the members' journals (before the
        members are opened), then open them and apply committed overlay parts."""
        if not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if not os.path.exists(os.path.join(self.directory, name, GROUP_FILE)):
                continue
            group = self._load(name)
            if self.replicas.journal_limit == 0:
                raise UsageError(f"group {name}: its members need their journals (the commit point of a group "
                                 "transaction is in them); this server was started with a journal limit of 0")
            commits = group.commits.read(repair=True)
            if commits:
                group.last = commits[-1]
                group.committed_txn = max(c.txn for c in commits)
                self._cut_uncommitted(group, commits[-1])
            self._groups[name] = group
            volumes = self._volumes(group)
            for commit in commits:
                self._apply_overlay(group, volumes, commit)

    def _load(self, name: str) -> ReplicaGroup:
        directory = os.path.join(self.directory, name)
        info = load_json(os.path.join(directory, GROUP_FILE), "replica-group", None)
        if info.get("name") != name:
            raise CorruptStateFile(os.path.join(directory, GROUP_FILE), f"it describes group {info.get('name')!r}")
        return ReplicaGroup(directory, name, info)

    def _cut_uncommitted(self, group: ReplicaGroup, last: Commit) -> None:
        from drtool.replica.journal import Journal
        from drtool.replica.store import load_meta

        for name, fact in last.meta["members"].items():
            if name not in group.members or not os.path.exists(os.path.join(self.replicas.root, name)):
                continue
            meta = load_meta(self.replicas.root, name)
            if fact.get("generation") and meta.get("generation") != fact["generation"]:
                continue  # another replica under that name now (adopted, recreated): not this commit's
            volume = ReplicaVolume(os.path.join(self.replicas.root, name), name, meta, self.replicas.journal_limit)
            journal: Journal = volume.journal
            journal.scan()
            journal.checkpoint = volume.mirror.applied.load().journal_at
            end = (int(fact["end"][0]), int(fact["end"][1]))
            if journal.end() < end:
                raise CorruptStateFile(journal.directory, f"group {group.name} committed transaction {last.txn} "
                                       f"with this journal ending at {end}, but it ends at {journal.end()}: "
                                       "committed records are missing")
            removed = journal.cut_to(end)
            if removed:
                print(f"drtool-replica: group {group.name}: cut {removed} bytes of uncommitted records from "
                      f"{name}'s journal (after transaction {last.txn}; never acknowledged)", file=sys.stderr)

    def _volumes(self, group: ReplicaGroup) -> dict[str, ReplicaVolume]:
        return {name: self.replicas.get(name) for name in sorted(group.members)}

    # -- lookup -------------------------------------------------------------------------

    def get(self, name: str) -> ReplicaGroup:
        validate_name(name, "group name")
        with self._lock:
            group = self._groups.get(name)
        if group is None:
            raise GroupNotFound(name, self.replicas.root)
        return group

    def _still(self, group: ReplicaGroup) -> None:
        """``group`` was not deleted while the caller waited for its lock."""
        with self._lock:
            if self._groups.get(group.name) is not group:
                raise GroupNotFound(group.name, self.replicas.root)

    def group_of(self, volume: str) -> ReplicaGroup | None:
        with self._lock:
            for group in self._groups.values():
                if volume in group.members:
                    return group
        return None

    def refuse_member_records(self, volume: str) -> None:
        group = self.group_of(volume)
        if group is not None:
            raise RoleRefused(f"volume {volume} is in group {group.name}: records come as group transactions "
                              f"(POST /v1/groups/{group.name}/records)", f"volume {volume} is in a group", "in-group")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._groups)

    # -- create, change, delete --------------------------------------------------------

    def ensure(self, name: str, group_id: str, members: list[str]) -> tuple[bool, dict[str, Any]]:
        """Create the group or set its members (idempotent); (created, description)."""
        validate_name(name, "group name")
        group_id = check_volume_id(group_id)
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise UsageError('"members" must be a non-empty list of replica names')
        members = [validate_name(m) for m in members]
        if len(set(members)) != len(members):
            raise UsageError("a member is named twice")
        if self.replicas.journal_limit == 0:
            raise Conflict("a group's members need their journals (the commit point of a group transaction is "
                           "in them): this server runs with a journal limit of 0")
        volumes = {m: self.replicas.get(m) for m in sorted(members)}
        for member, volume in volumes.items():
            volume.refuse_if_promoted("it cannot join a group")
            other = self.group_of(member)
            if other is not None and other.name != name:
                raise Conflict(f"volume {member} is in group {other.name} already")
        with self._lock:
            group = self._groups.get(name)
            created = group is None
            if group is None:
                if name in self._creating:
                    raise Conflict(f"group {name} is being created by another request; send it again")
                self._creating.add(name)
            elif group.group_id != group_id:
                raise Conflict(f"group {name} exists with group id {group.group_id} (asked {group_id})")
        try:
            if created:
                directory = os.path.join(self.directory, name)
                if os.path.exists(directory):
                    shutil.rmtree(directory)  # a create that crashed before group.json: nothing in it counts
                os.makedirs(directory)
                group = ReplicaGroup(directory, name, {"group_id": group_id, "members": members,
                                                       "created": time.time()})
                group.commits.create()
            with group.lock, ExitStack() as stack:
                for volume in volumes.values():
                    stack.enter_context(volume.lock.exclusive())
                if created or sorted(group.members) != sorted(members):
                    # A commit entry naming every member's journal end now, before any transaction
                    # can be sent (a new group is not visible yet): recovery cuts a member's journal
                    # only past what a commit names, and a new member is named from here on.
                    self._commit(group, group.committed_txn, volumes, [])
                    group.members = members
                    group.save_info()  # a new group exists from here (group.json is what recovery looks for)
                    if created:
                        fsync_dir(self.directory)
                        with self._lock:
                            self._groups[name] = group
                return created, group.describe(volumes)
        finally:
            if created:
                with self._lock:
                    self._creating.discard(name)

    def delete(self, name: str) -> None:
        group = self.get(name)
        with group.lock:  # (not under self._lock: a transaction holding group.lock opens replicas)
            with self._lock:
                if self._groups.get(name) is not group:
                    raise GroupNotFound(name, self.replicas.root)
                del self._groups[name]
            os.unlink(group.info_path)  # first: a crash after it leaves no group, only a directory
            fsync_dir(group.directory)
            shutil.rmtree(group.directory)

    def refuse_delete_member(self, volume: str) -> None:
        group = self.group_of(volume)
        if group is not None:
            raise Conflict(f"volume {volume} is in group {group.name}: remove it from the group first")

    def describe(self, name: str) -> dict[str, Any]:
        group = self.get(name)
        volumes = self._volumes(group)
        with ExitStack() as stack:
            for volume in volumes.values():
                stack.enter_context(volume.lock.shared())
            return group.describe(volumes)

    # -- transactions -------------------------------------------------------------------

    def apply_txn(self, name: str, body: memoryview, max_records: int) -> dict[str, Any]:
        group = self.get(name)
        try:
            txn = decode_group_txn(body)
        except WireError as exc:
            raise UsageError(f"malformed group transaction: {exc}") from None
        for part in txn.parts:
            if part.volume not in group.members:
                raise UsageError(f"group transaction {txn.txn}: volume {part.volume!r} is not a member of group "
                                 f"{name} ({', '.join(group.members)})")
        # Every record checked (digests hashed) before any lock is taken, the members side by side.
        batches = _together([lambda part=part: apply.parse_batch(self.replicas.get(part.volume), part.body,
                                                                 part.overlay, max_records) for part in txn.parts])
        with group.lock:
            self._still(group)
            if group.broken:
                raise StateError(f"group {name}: {group.broken}; restart the replica server (opening the root "
                                 "recovers the group)")
            volumes = self._volumes(group)
            with ExitStack() as stack:
                for volume in volumes.values():
                    stack.enter_context(volume.lock.exclusive())
                plans = []
                for part, batch in zip(txn.parts, batches):
                    volume = volumes[part.volume]
                    if volume.journal.disabled:
                        raise Conflict(f"volume {part.volume} keeps no journal: it cannot be in a group")
                    plans.append(apply.plan_batch(volume, batch, part.complete_through or None, part.overlay))
                results = self._apply(group, txn.txn, volumes, plans)
                answer = group.describe(volumes)
        answer.update(txn=txn.txn, parts=[{"volume": p.volume.name, "overlay": p.overlay, **r}
                                          for p, r in zip(plans, results)])
        return answer

    def _apply(self, group: ReplicaGroup, txn: int, volumes: dict[str, ReplicaVolume],
               plans: list[apply.Plan]) -> list[dict[str, Any]]:
        mirror = [p for p in plans if not p.overlay and p.todo]
        overlay = [p for p in plans if p.overlay and p.todo]
        if mirror or overlay:
            for plan in mirror:
                apply.prepare(plan)  # copy-on-write into snapshots (harmless if no commit follows)
            before = {n: v.journal.end() for n, v in volumes.items()}
            try:
                _together([lambda plan=plan: apply.append_journal(plan) for plan in mirror])  # one wait
                self._commit(group, txn, volumes, overlay)
            except BaseException as exc:
                self._undo(group, volumes, before, exc)
                raise
            group.committed_txn = max(group.committed_txn, txn)
        # The images, behind the commit: members side by side, each member's parts in order (an
        # overlay part's partial regions start from the mirror as this transaction left it).
        by_volume: dict[str, list[apply.Plan]] = {}
        for plan in plans:
            by_volume.setdefault(plan.volume.name, []).append(plan)
        finals: dict[int, dict[int, bytes | None]] = {}

        def write(member_plans: list[apply.Plan]) -> None:
            for plan in member_plans:
                if not plan.todo:
                    continue
                if plan.overlay:
                    apply.prepare(plan)
                    finals[id(plan)] = apply.write_durably(plan)
                else:
                    finals[id(plan)] = apply.write_behind(plan)

        _together([lambda each=each: write(each) for each in by_volume.values()])
        results = [apply.finish(plan, finals.get(id(plan), {})) for plan in plans]
        if group.commits.size > COMPACT_BYTES and group.last is not None:
            group.commits.compact(group.last)
        return results

    def _commit(self, group: ReplicaGroup, txn: int, volumes: dict[str, ReplicaVolume],
                overlay: list[apply.Plan]) -> None:
        payload: list[memoryview] = []
        parts = []
        for plan in overlay:
            raw = plan.batch.raw(plan.todo)
            parts.append({"volume": plan.volume.name, "complete_through": plan.complete_through or 0,
                          "length": sum(len(c) for c in raw)})
            payload += raw
        meta = {"txn": txn, "at": time.time(), "members": group.commit_members(volumes), "overlay": parts}
        group.commits.append(txn, meta, payload)
        group.last = Commit(txn, {**meta, "overlay": []}, b"", 0)

    def _undo(self, group: ReplicaGroup, volumes: dict[str, ReplicaVolume], before: dict[str, tuple[int, int]],
              exc: BaseException) -> None:
        """The commit did not happen: the records appended to the members' journals are cut (never
        acknowledged).  If that fails too, the group takes no transaction until the server restarts
        (its recovery cuts them)."""
        try:
            for name, volume in volumes.items():
                volume.journal.cut_to(before[name])
        except BaseException as undo:
            group.broken = f"a transaction failed ({exc}) and its journal records could not be cut ({undo})"
            print(f"drtool-replica: group {group.name}: {group.broken}", file=sys.stderr)

    def _apply_overlay(self, group: ReplicaGroup, volumes: dict[str, ReplicaVolume], commit: Commit) -> None:
        """Apply the overlay parts of a commit that are not applied yet (recovery)."""
        at = 0
        payload = memoryview(commit.payload)
        for part in commit.meta.get("overlay") or []:
            body = payload[at:at + int(part["length"])]
            at += int(part["length"])
            volume = volumes.get(part["volume"])
            if volume is None:
                continue
            with volume.lock.exclusive():
                batch = apply.parse_batch(volume, body, True, 1 << 30)
                plan = apply.plan_batch(volume, batch, part.get("complete_through") or None, True)
                if plan.todo:
                    apply.prepare(plan)
                    apply.finish(plan, apply.write_durably(plan))

    # -- snapshots ----------------------------------------------------------------------

    def snapshot(self, name: str, snap: str) -> dict[str, Any]:
        """Every member's snapshot at one point between two transactions."""
        group = self.get(name)
        snap = validate_name(snap, "snapshot name")
        with group.lock:
            self._still(group)
            volumes = self._volumes(group)
            with ExitStack() as stack:
                for volume in volumes.values():
                    stack.enter_context(volume.lock.exclusive())
                for member, volume in volumes.items():
                    volume.refuse_if_promoted("a snapshot needs copy-on-write, and the server no longer sees "
                                              "its writes")
                    if volume.snapshots.get(snap) is not None:
                        raise Conflict(f"replica {member} (group {name}) already has a snapshot {snap}")
                made = []
                try:
                    for member, volume in volumes.items():
                        made.append((volume, volume.snapshots.create(snap, volume.mirror.applied.watermark)))
                except BaseException:
                    for volume, _ in made:
                        try:
                            volume.snapshots.delete(snap)
                        except Exception:  # (the error that stopped us is the one to report)
                            pass
                    raise
                return {"group": name, "name": snap, "committed_txn": group.committed_txn,
                        "members": {v.name: s.describe() for v, s in made}}
