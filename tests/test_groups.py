"""Consistency groups on the primary: create/add/remove/delete, protect and replicate a group
name (whole group transactions to the replica server), a member alone refused there."""

from __future__ import annotations

import pytest

from drtool import api
from drtool.errors import Conflict, GroupNotFound, NotPermitted, VolumeNotFound
from drtool.peer import make_client
from tests.conftest import make_image

RS = 65536
SIZE = 16 * RS


@pytest.fixture
def volumes(tmp_path, state_root):
    data = {}
    for seed, name in enumerate(("a", "b", "c"), start=1):
        path = tmp_path / f"{name}.img"
        data[name] = bytearray(make_image(path, SIZE, seed=seed))
        api.init_volume(name, str(path), "64K")
    return data


def replica(server, name: str) -> bytes:
    return server.client().read_range(name, 0, SIZE)


def test_a_protected_group_replicates_in_whole_transactions(volumes, replica_server, cli) -> None:
    created = api.group_create("g", ["a", "b"])
    assert created["members"] == ["a", "b"] and created["changed"] and not created["protected"]
    result = api.protect("g", replica_server.url, str(replica_server.token_file))
    assert result["group"] == "g" and set(result["members"]) == {"a", "b"}
    with make_client({"url": replica_server.url, "token_file": str(replica_server.token_file)}) as client:
        info = client.group_info("g")
        assert info["members"] == ["a", "b"] and info["group_id"] == created["group_id"]
        for n in range(1, 6):
            api.write("a", n * RS, bytes([n]) * 100)
            api.write("b", n * RS, bytes([n]) * 100)
            volumes["a"][n * RS:n * RS + 100] = bytes([n]) * 100
            volumes["b"][n * RS:n * RS + 100] = bytes([n]) * 100
        shipped = api.replicate("g", wait=True)
        assert shipped["transactions"] >= 1 and shipped["consistent"]
        assert {m: r["lag"]["records"] for m, r in shipped["members"].items()} == {"a": 0, "b": 0}
        assert replica(replica_server, "a") == bytes(volumes["a"])
        assert replica(replica_server, "b") == bytes(volumes["b"])
        assert client.group_info("g")["committed_txn"] >= 1
        # A member's replicate ships through its group; the server refuses its records alone.
        api.write("a", 0, b"first")
        volumes["a"][:5] = b"first"
        member = api.replicate("a", wait=True)
        assert member["group"] == "g" and member["lag"]["records"] == 0
        assert replica(replica_server, "a") == bytes(volumes["a"])
        with pytest.raises(NotPermitted, match="volume a is in group g"):
            client.send_records("a", [b""])
        # Protecting again is a no-op for members in sync.
        again = api.protect("g", replica_server.url, str(replica_server.token_file))
        assert not again["changed"]
        # c joins protected and in sync: nothing extra ships; then it leaves and replicates alone.
        api.protect("c", replica_server.url, str(replica_server.token_file))
        added = api.group_add("g", ["c"])
        assert added["added"] == ["c"] and client.group_info("g")["members"] == ["a", "b", "c"]
        assert api.group_add("g", ["c"])["changed"] is False
        api.write("c", 0, b"c" * 10)
        volumes["c"][:10] = b"c" * 10
        api.replicate("g", wait=True)
        assert replica(replica_server, "c") == bytes(volumes["c"])
        removed = api.group_remove("g", ["c"])
        assert removed["removed"] == ["c"] and client.group_info("g")["members"] == ["a", "b"]
        api.write("c", RS, b"alone")
        assert api.replicate("c", wait=True)["lag"]["records"] == 0
        assert api.group_delete("g")["changed"]
        with pytest.raises(GroupNotFound):
            client.group_info("g")
        assert api.group_delete("g")["changed"] is False
        assert api.replicate("a", wait=True)["lag"]["records"] == 0  # alone again


def test_groups_and_volumes_share_one_namespace(volumes, cli) -> None:
    with pytest.raises(Conflict, match="name of a volume"):
        api.group_create("a", ["b"])
    with pytest.raises(VolumeNotFound):
        api.group_create("g", ["a", "nope"])
    api.group_create("g", ["a"])
    with pytest.raises(Conflict, match="already in group g"):
        api.group_create("h", ["a", "b"])
    with pytest.raises(Conflict, match="name of a group"):
        api.init_volume("g", "/dev/null")
    result = cli("group", "add", "g", "b")
    assert result.code == 0 and "added b" in result.out
    result = cli("group", "remove", "g", "a", "--json")
    assert result.code == 0 and result.json()["removed"] == ["a"]
    result = cli("group", "delete", "g")
    assert result.code == 0 and "group g deleted" in result.out
    assert cli("group", "add", "g", "a").code != 0


def test_the_agent_runs_one_group_replicator_and_serves_the_group_whole(volumes, replica_server, start_agent) -> None:
    api.group_create("g", ["a", "b"])
    api.protect("g", replica_server.url, str(replica_server.token_file))
    agent = start_agent("a", "b")
    for n in range(1, 4):
        api.write("a", n * RS, bytes([n]) * 50)
        api.write("b", n * RS, bytes([n]) * 50)
        volumes["a"][n * RS:n * RS + 50] = bytes([n]) * 50
        volumes["b"][n * RS:n * RS + 50] = bytes([n]) * 50
    result = api.replicate("g", wait=True)
    assert result["group"] == "g" and result["consistent"]
    assert replica(replica_server, "a") == bytes(volumes["a"])
    assert replica(replica_server, "b") == bytes(volumes["b"])
    assert "group g: replicating a, b as one" in agent.log.read_text()
    # Leaving the group: b replicates alone through the agent again.
    api.group_remove("g", ["b"])
    api.write("b", 0, b"alone")
    volumes["b"][:5] = b"alone"
    assert api.replicate("b", wait=True)["lag"]["records"] == 0
    assert replica(replica_server, "b") == bytes(volumes["b"])
    # Detaching a member stops its group's replication; attaching it serves it again, with the group.
    api.detach("a")
    assert api.attach("a")["changed"]
    api.write("a", 0, b"back")
    volumes["a"][:4] = b"back"
    assert api.replicate("g", wait=True)["members"]["a"]["lag"]["records"] == 0
    assert replica(replica_server, "a") == bytes(volumes["a"])


def test_bitmap_mode_makes_the_group_inconsistent_until_its_regions_have_shipped(volumes, replica_server) -> None:
    from drtool.engine import Engine
    from drtool.replication import Replicator

    api.group_create("g", ["a", "b"])
    api.protect("g", replica_server.url, str(replica_server.token_file))
    assert api.group_status("g")["consistent"] is True
    for n in range(3):
        api.write("a", n * RS, b"w" * 100)
        volumes["a"][n * RS:n * RS + 100] = b"w" * 100
    with Engine.open(None, "a") as engine:
        Replicator(engine).overflow()  # the log's records dropped: their regions ship whole, in no order
    status = api.group_status("g")
    assert status["consistent"] is False and "bitmap mode on a" in status["consistent_reason"]
    shipped = api.replicate("g", wait=True)
    assert shipped["consistent"] is True and shipped["members"]["a"]["lag"]["regions"] == 0
    assert api.group_status("g")["consistent"] is True
    assert replica(replica_server, "a") == bytes(volumes["a"])


def test_records_without_a_cut_between_them_ship_in_time_cuts_of_a_bounded_size(volumes, replica_server,
                                                                                monkeypatch) -> None:
    """A restart that lost the recorded cuts leaves one cut over everything pending; more than a
    transaction may carry goes as time cuts: each a prefix of every member's records by the time
    they were appended, so B's record n goes with or after A's record n."""
    from drtool import group_replication
    from drtool.engine import Engine
    from drtool.group_replication import GroupReplicator
    from drtool.replication import Replicator
    from drtool.storage.groups import load_group

    api.group_create("g", ["a", "b"])
    api.protect("g", replica_server.url, str(replica_server.token_file))
    for n in range(1, 9):
        api.write("a", n * RS, bytes([n]) * RS)
        api.write("b", n * RS, bytes([n]) * RS)
    monkeypatch.setattr(group_replication, "TXN_BYTES", 3 * RS)
    engines = {n: Engine.open(None, n) for n in ("a", "b")}
    try:
        for engine in engines.values():
            Replicator(engine)
        group = GroupReplicator(load_group(api.state_root(None), "g"), engines)
        seen: list[dict[str, int]] = []
        real = group.client.send_group_txn

        def spy(name, txn, parts):
            seen.append({m: len(chunks) for m, _, _, chunks in parts})
            return real(name, txn, parts)

        group.client.send_group_txn = spy
        group.ship()
        group.detach()
    finally:
        for engine in engines.values():
            engine.close()
    assert len(seen) >= 5  # 16 records of 64 KiB, at most 3 regions' worth (and ties) a transaction
    for n in range(1, 9):
        volumes["a"][n * RS:(n + 1) * RS] = bytes([n]) * RS
        volumes["b"][n * RS:(n + 1) * RS] = bytes([n]) * RS
    assert replica(replica_server, "a") == bytes(volumes["a"])
    assert replica(replica_server, "b") == bytes(volumes["b"])


def test_a_time_cut_takes_a_prefix_of_every_member_up_to_one_instant() -> None:
    from types import SimpleNamespace

    from drtool.group_replication import _bounded

    def entry(stamp: float) -> SimpleNamespace:
        return SimpleNamespace(stamp=stamp, size=10)

    pending = {"a": [entry(t) for t in (1, 3, 5, 7)], "b": [entry(t) for t in (2, 4, 6, 8)]}
    assert _bounded(pending, 100) is pending
    cut = _bounded(pending, 35)
    assert {m: [e.stamp for e in es] for m, es in cut.items()} == {"a": [1, 3], "b": [2]}
    tie = _bounded({"a": [entry(1), entry(2)], "b": [entry(2), entry(3)]}, 15)
    assert {m: [e.stamp for e in es] for m, es in tie.items()} == {"a": [1], "b": []}


def test_an_agent_asked_for_one_member_serves_its_whole_group(volumes, start_agent) -> None:
    api.group_create("g", ["a", "b"])
    start_agent("a")
    assert sorted(api.agent_info()["volumes"]) == ["a", "b"]
    api.detach("a")
    api.detach("b")
    assert api.agent_info()["volumes"] == []
    assert api.attach("b")["changed"]
    assert sorted(api.agent_info()["volumes"]) == ["a", "b"]


def test_a_group_created_and_protected_under_a_running_agent_replicates_as_one(volumes, replica_server,
                                                                              start_agent) -> None:
    agent = start_agent("a", "b")
    api.protect("a", replica_server.url, str(replica_server.token_file))  # alone first: its own thread
    api.write("a", 0, b"alone")
    volumes["a"][:5] = b"alone"
    assert api.replicate("a", wait=True)["lag"]["records"] == 0
    created = api.group_create("g", ["a", "b"])
    assert not created["protected"]  # b has no peer yet
    result = api.protect("g", replica_server.url, str(replica_server.token_file))
    assert result["members"]["a"]["plan"]["mode"] == "in sync" and result["members"]["b"]["changed"]
    for n in range(1, 4):
        api.write("a", n * RS, bytes([n]) * 10)
        api.write("b", n * RS, bytes([n]) * 10)
        volumes["a"][n * RS:n * RS + 10] = bytes([n]) * 10
        volumes["b"][n * RS:n * RS + 10] = bytes([n]) * 10
    shipped = api.replicate("g", wait=True)
    assert shipped["consistent"]
    assert replica(replica_server, "a") == bytes(volumes["a"])
    assert replica(replica_server, "b") == bytes(volumes["b"])
    with make_client({"url": replica_server.url, "token_file": str(replica_server.token_file)}) as client:
        assert client.group_info("g")["committed_txn"] >= 1
    assert "group g: replicating a, b as one" in agent.log.read_text()


def test_members_replicating_to_different_servers_make_no_group(volumes, replica_server, tmp_path) -> None:
    from tests.conftest import ReplicaServer

    other = ReplicaServer(tmp_path / "other-root", replica_server.token_file).start()
    try:
        api.protect("a", replica_server.url, str(replica_server.token_file))
        api.protect("b", other.url, str(other.token_file))
        from drtool.errors import UsageError
        with pytest.raises(UsageError, match="different servers"):
            api.group_create("g", ["a", "b"])
        assert not api.is_group("g")
    finally:
        other.stop(kill=True)


def test_a_membership_change_that_missed_the_server_is_repaired_by_the_next_round(volumes, replica_server) -> None:
    from drtool.engine import Engine
    from drtool.errors import UsageError
    from drtool.group_replication import GroupReplicator
    from drtool.replication import Replicator
    from drtool.storage.groups import load_group

    api.group_create("g", ["a", "b", "c"])
    api.protect("g", replica_server.url, str(replica_server.token_file))
    engines = {n: Engine.open(None, n) for n in ("a", "b", "c")}
    try:
        for engine in engines.values():
            Replicator(engine)
        group = GroupReplicator(load_group(api.state_root(None), "g"), engines)
        engines["a"].write(0, b"a" * 10)
        assert group.ship_txn()  # the server's committed transaction learnt
        with make_client({"url": replica_server.url, "token_file": str(replica_server.token_file)}) as client:
            client.ensure_group("g", client.group_info("g")["group_id"], ["a", "b"])  # c's PUT lost
            engines["c"].write(0, b"c" * 10)
            with pytest.raises(UsageError, match="not a member of group g"):
                group.ship_txn()
            assert group.ship_txn()  # the next round puts c back into the server's group, then ships
            assert client.group_info("g")["members"] == ["a", "b", "c"]
        group.detach()
    finally:
        for engine in engines.values():
            engine.close()
    volumes["c"][:10] = b"c" * 10
    assert replica(replica_server, "c") == bytes(volumes["c"])


def test_verify_repair_of_a_member_ships_through_its_group(volumes, replica_server) -> None:
    """Without an agent, a member's repair re-logs the rotten region and ships it in a group
    transaction (the server refuses a member's records sent alone)."""
    api.group_create("g", ["a", "b"])
    api.protect("g", replica_server.url, str(replica_server.token_file))
    image = replica_server.root / "a" / "mirror.img"
    with open(image, "r+b") as handle:
        handle.seek(3 * RS + 10)
        handle.write(b"rotten")
    found = api.verify_volume("a")
    assert found["replica_rot"] == [[3, 1]] and found["result"] == "differ"
    repaired = api.verify_volume("a", repair=True)
    assert repaired["repair"]["relogged"] == [[3, 1]] and repaired["result"] == "equal"
    assert replica(replica_server, "a") == bytes(volumes["a"])
    whole = api.verify_volume("g", repair=True)
    assert whole["result"] == "equal"
