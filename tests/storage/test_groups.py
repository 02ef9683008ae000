import json

import pytest

from drtool.errors import Conflict, CorruptStateFile, GroupNotFound, UsageError
from drtool.storage import groups


def test_create_add_remove_round_trip(tmp_path):
    root = str(tmp_path)
    created = groups.create_group(root, "db", ["wal", "data"])
    assert groups.load_group(root, "db").members == ["wal", "data"]
    assert groups.group_of(root, "data") == "db"
    assert groups.group_of(root, "other") is None
    group, new = groups.add_members(root, "db", ["data", "logs"])
    assert new == ["logs"] and group.members == ["wal", "data", "logs"]
    group, gone = groups.remove_members(root, "db", ["wal", "nope"])
    assert gone == ["wal"] and groups.load_group(root, "db").members == ["data", "logs"]
    assert groups.load_group(root, "db").group_id == created.group_id
    assert groups.list_groups(root) == ["db"]
    assert groups.delete_group(root, "db") and not groups.delete_group(root, "db")
    with pytest.raises(GroupNotFound, match="group db is not defined"):
        groups.load_group(root, "db")


def test_a_volume_belongs_to_one_group(tmp_path):
    root = str(tmp_path)
    groups.create_group(root, "a", ["v1"])
    with pytest.raises(Conflict, match="volume v1 is already in group a"):
        groups.create_group(root, "b", ["v1"])
    with pytest.raises(Conflict, match="exists already"):
        groups.create_group(root, "a", ["v2"])
    with pytest.raises(UsageError):
        groups.create_group(root, "c", [])
    with pytest.raises(UsageError):
        groups.create_group(root, "../x", ["v3"])


def test_torn_or_edited_group_file_is_refused(tmp_path):
    root = str(tmp_path)
    groups.create_group(root, "db", ["wal", "data"])
    path = groups.group_path(root, "db")
    data = json.loads(open(path).read())
    data["members"].append("intruder")
    open(path, "w").write(json.dumps(data))
    with pytest.raises(CorruptStateFile, match="checksum mismatch"):
        groups.load_group(root, "db")
    open(path, "w").write('{"kind": "drtool-gr')
    with pytest.raises(CorruptStateFile, match="not JSON"):
        groups.load_group(root, "db")
