"""Consistency groups on the primary: which volumes replicate and fail over together.

A group is a small checksummed JSON file in the state root, ``@groups/<name>.json``
('@' cannot start a volume's name, so no volume's directory is called that).  It is the one
owner of membership: a volume's own record does not repeat it; :func:`group_of` answers
"which group is this volume in" by reading the (few, small) group files.

    {"kind": "drtool-group", "format": 1, "name": ..., "group_id": 32 hex digits,
     "members": [volume names, in the order they joined], "created": unix time,
     "checksum": blake3 of the rest}

A volume belongs to at most one group.  Membership changes are atomic file replacements
(storage.atomic); a torn, hand-edited or misplaced file is refused with CorruptStateFile.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import blake3

from drtool.errors import Conflict, CorruptStateFile, GroupNotFound, StateError, UsageError
from drtool.storage.atomic import write_atomic
from drtool.storage.paths import validate_name

GROUPS_DIR = "@groups"
KIND = "drtool-group"
FORMAT = 1


@dataclass
class GroupRecord:
    name: str
    group_id: str
    members: list[str] = field(default_factory=list)
    created: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "group_id": self.group_id, "members": list(self.members),
                "created": self.created}


def groups_dir(root: str) -> str:
    return os.path.join(root, GROUPS_DIR)


def group_path(root: str, name: str) -> str:
    return os.path.join(groups_dir(root), validate_name(name, "group name") + ".json")


def _checksum(body: dict[str, Any]) -> str:
    return blake3.blake3(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_group(root: str, group: GroupRecord) -> None:
    os.makedirs(groups_dir(root), mode=0o700, exist_ok=True)
    body = {**group.to_json(), "kind": KIND, "format": FORMAT}
    text = json.dumps({**body, "checksum": _checksum(body)}, sort_keys=True, indent=1)
    write_atomic(group_path(root, group.name), text.encode() + b"\n")


def load_group(root: str, name: str) -> GroupRecord:
    path = group_path(root, name)
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise GroupNotFound(name, root) from None
    except OSError as exc:
        raise StateError(f"cannot read group file {path}: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CorruptStateFile(path, "not JSON (torn or foreign)") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise CorruptStateFile(path, "not a drtool group file")
    checksum = data.pop("checksum", None)
    if checksum != _checksum(data):
        raise CorruptStateFile(path, "checksum mismatch (torn or edited)")
    if data.get("format") != FORMAT:
        raise CorruptStateFile(path, f"group file format {data.get('format')!r} is not {FORMAT}")
    members = data.get("members")
    if (data.get("name") != name or not isinstance(members, list)
            or not all(isinstance(m, str) for m in members) or not isinstance(data.get("group_id"), str)):
        raise CorruptStateFile(path, "group file does not describe group " + name)
    return GroupRecord(name, data["group_id"], list(members), float(data.get("created") or 0.0))


def list_groups(root: str) -> list[str]:
    try:
        entries = sorted(os.listdir(groups_dir(root)))
    except FileNotFoundError:
        return []
    return [e[:-5] for e in entries if e.endswith(".json") and not e.startswith(".")]


def load_groups(root: str) -> list[GroupRecord]:
    return [load_group(root, name) for name in list_groups(root)]


def group_of(root: str, volume: str) -> str | None:
    """The group ``volume`` belongs to, or None."""
    for group in load_groups(root):
        if volume in group.members:
            return group.name
    return None


def _check_free(root: str, members: list[str], group: str) -> None:
    if len(set(members)) != len(members):
        raise UsageError(f"group {group}: a volume is named twice")
    for volume in members:
        validate_name(volume)
        owner = group_of(root, volume)
        if owner is not None and owner != group:
            raise Conflict(f"volume {volume} is already in group {owner}: a volume belongs to one group "
                           f"(drtool group remove {owner} {volume} first)")


def create_group(root: str, name: str, members: list[str]) -> GroupRecord:
    """A new group of ``members`` (volumes registered under ``root``; the caller checks that)."""
    validate_name(name, "group name")
    if not members:
        raise UsageError(f"group {name}: name at least one volume")
    if os.path.exists(group_path(root, name)):
        raise Conflict(f"group {name} exists already (drtool group add {name} VOLUME to grow it)")
    _check_free(root, members, name)
    group = GroupRecord(name, uuid.uuid4().hex, list(members), time.time())
    save_group(root, group)
    return group


def add_members(root: str, name: str, volumes: list[str]) -> tuple[GroupRecord, list[str]]:
    """Add ``volumes``; returns the group and those that were not members yet (idempotent)."""
    group = load_group(root, name)
    new = [v for v in volumes if v not in group.members]
    _check_free(root, new, name)
    if new:
        group.members.extend(new)
        save_group(root, group)
    return group, new


def remove_members(root: str, name: str, volumes: list[str]) -> tuple[GroupRecord, list[str]]:
    """Remove ``volumes``; returns the group and those that were members (idempotent)."""
    group = load_group(root, name)
    gone = [v for v in volumes if v in group.members]
    if gone:
        group.members = [m for m in group.members if m not in gone]
        save_group(root, group)
    return group, gone


def delete_group(root: str, name: str) -> bool:
    try:
        os.unlink(cuts_path(root, name))
    except FileNotFoundError:
        pass
    try:
        os.unlink(group_path(root, name))
    except FileNotFoundError:
        return False
    return True


# -- the group's recorded cuts (drtool.group_replication) ---------------------------------
#
# ``@groups/<name>.cuts``: the consistent cuts recorded and not shipped yet, so that after a
# restart the pending records still go in transactions of a few MiB.  Written lazily (replaced
# without fsync): a lost or stale file only makes a later transaction bigger, and the reader
# checks every cut against the members' logs before using it.


def cuts_path(root: str, name: str) -> str:
    return os.path.join(groups_dir(root), validate_name(name, "group name") + ".cuts")


def save_cuts(root: str, name: str, group_id: str, cuts: list[dict[str, int]]) -> None:
    path = cuts_path(root, name)
    body = {"kind": "drtool-group-cuts", "group_id": group_id, "cuts": cuts}
    text = json.dumps({**body, "checksum": _checksum(body)}, sort_keys=True).encode()
    temp = f"{path}.tmp"
    try:
        with open(temp, "wb") as handle:
            handle.write(text)
        os.replace(temp, path)
    except OSError:
        pass  # a lost cut only makes a later transaction bigger


def load_cuts(root: str, name: str, group_id: str) -> list[dict[str, int]]:
    """The cuts saved for the group ([] when none, or the file is torn, stale or foreign)."""
    try:
        with open(cuts_path(root, name), "rb") as handle:
            data = json.loads(handle.read())
        checksum = data.pop("checksum", None)
        if checksum != _checksum(data) or data.get("group_id") != group_id:
            return []
        cuts = data.get("cuts")
        if not isinstance(cuts, list) or not all(
                isinstance(c, dict) and all(isinstance(v, int) for v in c.values()) for c in cuts):
            return []
        return cuts
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return []
