"""Consistency groups on the replica server: a group transaction is applied to every member or to
none, at every point the server can stop at (an error before the commit, a kill -9 anywhere, a
torn commit log), and the per-volume records routes refuse a member's records."""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import pytest

from drtool import wire
from drtool.errors import (Conflict, CorruptStateFile, DeviceError, NotPermitted, PeerAuthError, PeerError,
                           UsageError)
from drtool.replica import group as group_module
from drtool.replica.store import ReplicaRoot
from tests.replica.conftest import VOLUME_ID, assert_problem, call, write

RS = 65536
REGIONS = 8
SIZE = REGIONS * RS
GROUP_ID = "fedcba9876543210fedcba9876543210"
OTHER_ID = "00112233445566778899aabbccddeeff"


def txn_parts(n: int, members: tuple[str, ...] = ("a", "b")) -> list[tuple[str, bool, int, list[bytes]]]:
    """Transaction ``n``: region n % REGIONS of every member filled with the number n (seq n)."""
    data = n.to_bytes(8, "little") * (RS // 8)
    return [(m, False, 0, write(n, (n % REGIONS) * RS, data)) for m in members]


def body(n: int, members: tuple[str, ...] = ("a", "b")) -> memoryview:
    return memoryview(bytearray(b"".join(bytes(c) for c in wire.encode_group_txn(n, txn_parts(n, members)))))


def numbers(image: bytes) -> list[int]:
    """The number each region holds (0: never written)."""
    return [int.from_bytes(image[r * RS:r * RS + 8], "little") for r in range(REGIONS)]


def make_root(path: Path) -> ReplicaRoot:
    root = ReplicaRoot(str(path), journal_limit=64 << 20)
    for name in ("a", "b"):
        root.ensure(name, SIZE, RS, VOLUME_ID)
    root.groups.ensure("g", GROUP_ID, ["a", "b"])
    return root


def crash(root: ReplicaRoot) -> None:
    """The process dies: nothing is checkpointed or cleaned up at close (as after kill -9)."""
    for name in ("a", "b"):
        root.get(name)._opened = False
    root.close()


def state(root: ReplicaRoot) -> dict[str, tuple[int, list[int]]]:
    """Each member's applied watermark and the numbers its mirror holds."""
    out = {}
    for name in ("a", "b"):
        volume = root.get(name)
        out[name] = (volume.mirror.applied.watermark, numbers(volume.mirror.image.pread(SIZE, 0)))
    return out


def test_a_transaction_reaches_every_member_and_their_records_routes_refuse(server, client) -> None:
    for name in ("a", "b", "c"):
        client.ensure_volume(name, SIZE, RS, VOLUME_ID)
    created = client.ensure_group("g", GROUP_ID, ["a", "b"])
    assert created["members"] == ["a", "b"] and created["committed_txn"] == 0
    assert client.ensure_group("g", GROUP_ID, ["a", "b"])["members"] == ["a", "b"]  # idempotent
    answer = client.send_group_txn("g", 1, txn_parts(1))
    assert answer["members_applied"] == {"a": 1, "b": 1} and answer["committed_txn"] == 1
    assert [p["applied"] for p in answer["parts"]] == [1, 1]
    for name in ("a", "b"):
        assert numbers(client.read_range(name, 0, SIZE))[1] == 1
    info = client.group_info("g")
    assert info["committed_txn"] == 1 and info["members_applied"] == {"a": 1, "b": 1}
    # A member's own records route refuses records (409, naming the group); a non-member's takes them.
    with pytest.raises(NotPermitted, match="volume a is in group g: records come as group transactions"):
        client.send_records("a", write(2, 0, b"x" * RS))
    assert client.send_records("c", write(1, 0, b"x" * RS))["applied_seq"] == 1
    with pytest.raises(UsageError, match="not a member of group g"):
        client.send_group_txn("g", 2, txn_parts(2, ("a", "c")))
    with pytest.raises(Conflict, match="volume a is in group g already"):
        client.ensure_group("h", OTHER_ID, ["a", "c"])
    with pytest.raises(Conflict, match="exists with group id"):
        client.ensure_group("g", OTHER_ID, ["a", "b"])
    with pytest.raises(Conflict, match="remove it from the group first"):
        client.delete_volume("a")
    # Out of the group, a volume takes its own records again.
    client.ensure_group("g", GROUP_ID, ["b"])
    assert client.send_records("a", write(2, 0, b"y" * RS))["applied_seq"] == 2
    client.delete_group("g")
    assert client.send_records("b", write(2, 0, b"y" * RS))["applied_seq"] == 2
    from drtool.errors import GroupNotFound
    with pytest.raises(GroupNotFound):
        client.group_info("g")


def test_a_resent_committed_transaction_is_acknowledged_and_applied_once(server, client) -> None:
    for name in ("a", "b"):
        client.ensure_volume(name, SIZE, RS, VOLUME_ID)
    client.ensure_group("g", GROUP_ID, ["a", "b"])
    client.send_group_txn("g", 1, txn_parts(1))
    again = client.send_group_txn("g", 1, txn_parts(1))
    assert [(p["applied"], p["skipped"]) for p in again["parts"]] == [(0, 1), (0, 1)]
    assert again["members_applied"] == {"a": 1, "b": 1} and again["committed_txn"] == 1
    assert client.volume_info("a")["journal"]["records"] == 1  # not appended twice


def test_malformed_group_transactions_are_refused_with_400_and_change_nothing(server, client) -> None:
    for name in ("a", "b"):
        client.ensure_volume(name, SIZE, RS, VOLUME_ID)
    client.ensure_group("g", GROUP_ID, ["a", "b"])
    good = bytes(body(1))
    bad_record = bytearray(good)
    bad_record[-1] ^= 0xFF  # b's data no longer matches its digest: a's part is good, yet nothing applies
    too_big = wire.encode_group_txn(1, [("a", False, 0, write(1, SIZE - 100, b"z" * 100 + b"!"))])
    cases = {
        "group transaction header needs 24 bytes": good[:10],
        "bad group transaction magic": b"XXXX" + good[4:],
        "header checksum mismatch": good[:12] + b"\x09" + good[13:],
        "is truncated": good[:-5],
        "bytes after the last part": good + b"\0",
        "data does not match its digest": bytes(bad_record),
        "past the end of the volume": b"".join(too_big),
    }
    for detail, payload in cases.items():
        response = call(server, "POST", "/v1/groups/g/records", data=payload)
        assert_problem(response, 400, detail)
    for name in ("a", "b"):
        info = client.volume_info(name)
        assert info["applied_seq"] == 0 and info["journal"]["records"] == 0
    assert client.group_info("g")["committed_txn"] == 0
    assert_problem(call(server, "POST", "/v1/groups/g/records", data=good, token=False), 401)
    assert_problem(call(server, "POST", "/v1/groups/g/records", data=good,
                        headers={"Authorization": "Bearer wrong"}, token=False), 401)
    with pytest.raises(PeerAuthError):
        server.client(token="wrong").send_group_txn("g", 1, txn_parts(1))
    assert_problem(call(server, "POST", "/v1/groups/nope/records", data=good), 404, "group nope")
    assert_problem(call(server, "PUT", "/v1/groups/g", json={"group_id": GROUP_ID, "members": []}), 400)


def test_a_failed_commit_leaves_no_member_with_the_transaction(tmp_path: Path, monkeypatch) -> None:
    root = make_root(tmp_path)
    root.groups.apply_txn("g", body(1), 65536)
    before = state(root)
    ends = {n: root.get(n).journal.end() for n in ("a", "b")}

    def full_disk(*args, **kwargs):
        # Between the members' journal appends and the commit: both journals hold txn 2 now.
        assert all(root.get(n).journal.end() > ends[n] for n in ("a", "b"))
        raise DeviceError("cannot append to the group's commit log: No space left on device")

    monkeypatch.setattr(group_module.CommitLog, "append", full_disk)
    with pytest.raises(DeviceError, match="No space left"):
        root.groups.apply_txn("g", body(2), 65536)
    assert state(root) == before
    assert {n: root.get(n).journal.end() for n in ("a", "b")} == ends  # cut back: never acknowledged
    monkeypatch.undo()
    crash(root)
    root = ReplicaRoot(str(tmp_path), journal_limit=64 << 20)
    assert state(root) == before
    root.groups.apply_txn("g", body(2), 65536)  # and the group goes on
    assert state(root)["a"] == state(root)["b"] == (2, [0, 1, 2, 0, 0, 0, 0, 0])
    root.close()


def test_a_crash_between_the_journal_appends_and_the_commit_is_cut_at_open(tmp_path: Path, monkeypatch) -> None:
    root = make_root(tmp_path)
    root.groups.apply_txn("g", body(1), 65536)
    before = state(root)

    def die(*args, **kwargs):
        raise DeviceError("I/O error")

    monkeypatch.setattr(group_module.CommitLog, "append", die)
    monkeypatch.setattr("drtool.replica.journal.Journal.cut_to", die)  # the undo fails too
    with pytest.raises(DeviceError):
        root.groups.apply_txn("g", body(2), 65536)
    with pytest.raises(Exception, match="restart the replica server"):
        root.groups.apply_txn("g", body(3), 65536)
    monkeypatch.undo()
    assert root.get("a").journal.records == 2  # txn 2's records are in both journals, uncommitted
    crash(root)
    # Read-only (status --replica-root): the uncommitted records do not count as applied.
    from drtool.replica.store import describe_root
    assert {v["name"]: v["applied_seq"] for v in describe_root(str(tmp_path))} == {"a": 1, "b": 1}
    root = ReplicaRoot(str(tmp_path), journal_limit=64 << 20)
    assert state(root) == before
    assert root.get("a").journal.records == root.get("b").journal.records == 1
    root.close()


def test_a_torn_commit_log_tail_is_cut_and_damage_before_an_intact_entry_is_refused(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    for n in (1, 2):
        root.groups.apply_txn("g", body(n), 65536)
    root.close()
    log = tmp_path / "@groups" / "g" / "commits.log"
    intact = log.read_bytes()
    log.write_bytes(intact + intact[-300:-100])  # a torn append: part of an entry
    root = ReplicaRoot(str(tmp_path), journal_limit=64 << 20)
    assert log.read_bytes() == intact and root.groups.get("g").committed_txn == 2
    assert state(root)["a"] == state(root)["b"] == (2, [0, 1, 2, 0, 0, 0, 0, 0])
    root.close()
    # The first entry damaged while the last is intact: not a torn append, refused.
    damaged = bytearray(intact)
    damaged[group_module.COMMITS_HEADER_SIZE + 10] ^= 0xFF
    log.write_bytes(bytes(damaged))
    with pytest.raises(CorruptStateFile, match="followed by intact ones"):
        ReplicaRoot(str(tmp_path), journal_limit=64 << 20)
    # Another group's commit log in this group's place: refused.
    other = tmp_path / "other"
    other_root = ReplicaRoot(str(other), journal_limit=64 << 20)
    for name in ("a", "b"):
        other_root.ensure(name, SIZE, RS, VOLUME_ID)
    other_root.groups.ensure("g", OTHER_ID, ["a", "b"])
    other_root.close()
    log.write_bytes((other / "@groups" / "g" / "commits.log").read_bytes())
    with pytest.raises(CorruptStateFile, match="belongs to group id"):
        ReplicaRoot(str(tmp_path), journal_limit=64 << 20)
    log.write_bytes(b"garbage" * 10)
    with pytest.raises(CorruptStateFile, match="not a drtool group commit log"):
        ReplicaRoot(str(tmp_path), journal_limit=64 << 20)


def test_a_group_needs_journals(tmp_path: Path) -> None:
    root = ReplicaRoot(str(tmp_path), journal_limit=0)
    for name in ("a", "b"):
        root.ensure(name, SIZE, RS, VOLUME_ID)
    with pytest.raises(Conflict, match="journal limit of 0"):
        root.groups.ensure("g", GROUP_ID, ["a", "b"])
    root.close()


def test_a_group_snapshot_is_one_point_for_every_member(server, client) -> None:
    for name in ("a", "b"):
        client.ensure_volume(name, SIZE, RS, VOLUME_ID)
    client.ensure_group("g", GROUP_ID, ["a", "b"])
    for n in (1, 2, 3):
        client.send_group_txn("g", n, txn_parts(n))
    snap = client.group_snapshot("g", "s1")
    assert {m: s["applied_seq"] for m, s in snap["members"].items()} == {"a": 3, "b": 3}
    for n in (4, 9, 10):
        client.send_group_txn("g", n, txn_parts(n))
    for name in ("a", "b"):
        assert numbers(client.read_range(name, 0, SIZE, snapshot="s1")) == [0, 1, 2, 3, 0, 0, 0, 0]
        assert numbers(client.read_range(name, 0, SIZE)) == [0, 9, 10, 3, 4, 0, 0, 0]
    with pytest.raises(Conflict, match="already has a snapshot s1"):
        client.group_snapshot("g", "s1")


def test_kill_9_at_random_points_leaves_every_member_at_one_transaction_boundary(start_server, tmp_path) -> None:
    """A client sends transactions as fast as the server takes them; the server is killed (-9) at
    random moments.  Each time, the root opened again holds, in both members, exactly the
    transactions up to one boundary: the same watermark, and the same number in every region."""
    rng = random.Random(14)
    server = start_server(root=tmp_path / "replicas")
    with server.client() as client:
        for name in ("a", "b"):
            client.ensure_volume(name, SIZE, RS, VOLUME_ID)
        client.ensure_group("g", GROUP_ID, ["a", "b"])
    acknowledged = 0
    for round_ in range(6):
        stop = threading.Event()
        sent: list[int] = []

        def pump(start: int) -> None:
            with server.client(retries=0) as c:
                n = start
                while not stop.is_set():
                    try:
                        c.send_group_txn("g", n, txn_parts(n))
                    except PeerError:
                        return
                    sent.append(n)
                    n += 1

        thread = threading.Thread(target=pump, args=(acknowledged + 1,))
        thread.start()
        deadline = time.monotonic() + 10
        while len(sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        server.kill()
        stop.set()
        thread.join(10)
        acked = sent[-1] if sent else acknowledged
        root = ReplicaRoot(str(server.root), journal_limit=64 << 20)
        held = state(root)
        root.close()
        (wa, na), (wb, nb) = held["a"], held["b"]
        assert wa == wb and na == nb, f"round {round_}: members at different points: {held}"
        assert wa >= acked, f"round {round_}: acknowledged txn {acked} lost (holds {wa})"
        expect = [0] * REGIONS
        for n in range(1, wa + 1):
            expect[n % REGIONS] = n
        assert na == expect
        acknowledged = wa
        server.start()
    server.stop()
