"""recover --source snapshot:NAME names a snapshot the replica server has (issue 11): an unknown
one is refused before anything changes, so the volume is never left degraded on a source that
cannot serve it."""

from __future__ import annotations

import pytest

from drtool import api
from tests.conftest import corrupt, make_image, state_files

RS = 65536
SIZE = 16 * RS


@pytest.fixture
def protected(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    data = make_image(path, SIZE, seed=4)
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    return path, data


def test_unknown_snapshot_is_refused_before_anything_changes(protected, replica_server, state_root, cli):
    path, data = protected
    replica_server.client().create_snapshot("vol", "before")
    corrupt(path, 2 * RS + 5)
    api.scrub_volume("vol")
    before = state_files(state_root)
    result = cli("recover", "vol", "--source", "snapshot:NOSUCH")
    assert result.code == 2
    assert "snapshot NOSUCH" in result.err and "before" in result.err  # what exists is named
    assert state_files(state_root) == before  # nothing changed: no overlay, no era, no mode
    status = cli("status", "vol", "--json").json()
    assert status["mode"] == "normal" and status["recovery"] is None
    # The volume is not stuck: a snapshot that exists works, and so does failback.
    assert cli("recover", "vol", "--source", "snapshot:before").code == 0
    assert api.read("vol", 2 * RS, RS) == data[2 * RS:3 * RS]
    assert cli("failback", "vol").code == 0
    assert path.read_bytes() == data


def test_unknown_snapshot_is_refused_through_the_agent(protected, replica_server, start_agent, cli):
    start_agent("vol")
    result = cli("recover", "vol", "--source", "snapshot:NOSUCH")
    assert result.code == 2 and "snapshot NOSUCH" in result.err
    assert cli("status", "vol", "--json").json()["mode"] == "normal"


def test_a_snapshot_recovery_lists_what_goes_back_in_time_and_needs_confirming(protected, replica_server,
                                                                                state_root, cli):
    """Issue 13: recover --source snapshot:S serves the bad regions as they were at S and the rest as
    they are now.  Before changing anything it names the regions that go back in time (bad ones
    the snapshot holds older bytes of: here 2, not 7, unchanged since S) and needs
    --accept-rollback; status shows them while the recovery lasts."""
    path, data = protected
    data = bytearray(data)
    replica_server.client().create_snapshot("vol", "before")
    old = bytes(data[2 * RS:3 * RS])
    api.write("vol", 2 * RS, b"N" * RS)
    data[2 * RS:3 * RS] = b"N" * RS
    api.replicate("vol")
    corrupt(path, 2 * RS + 5)
    corrupt(path, 7 * RS + 5)
    api.scrub_volume("vol")
    before = state_files(state_root)

    refused = cli("recover", "vol", "--source", "snapshot:before")
    assert refused.code == 10, refused.err
    assert "takes 1 region back to the snapshot's time (2)" in refused.err
    assert "--accept-rollback" in refused.err
    assert state_files(state_root) == before  # nothing changed
    assert cli("status", "vol", "--json").json()["mode"] == "normal"

    accepted = cli("recover", "vol", "--source", "snapshot:before", "--accept-rollback")
    assert accepted.code == 0, accepted.err
    assert "1 regions went back to the snapshot's time: 2" in accepted.out
    assert api.read("vol", 2 * RS, RS) == old  # as it was at the snapshot
    assert api.read("vol", 7 * RS, RS) == data[7 * RS:8 * RS]  # unchanged since: as it is now
    status = cli("status", "vol", "--json").json()
    assert status["rolled_back_regions"] == [[2, 1]] and status["rolled_back_count"] == 1
    assert any("taken back in time by the recovery from snapshot:before (2)" in p["status"]
               for p in status["problems"])
    # Running it again is idempotent, and needs no confirmation any more.
    assert cli("recover", "vol", "--source", "snapshot:before").code == 0


def test_a_snapshot_that_takes_nothing_back_needs_no_confirmation(protected, replica_server, cli):
    path, data = protected
    replica_server.client().create_snapshot("vol", "before")
    corrupt(path, 3 * RS + 1)
    api.scrub_volume("vol")
    result = cli("recover", "vol", "--source", "snapshot:before")
    assert result.code == 0, result.err
    assert api.read("vol", 3 * RS, RS) == data[3 * RS:4 * RS]
    assert cli("status", "vol", "--json").json()["rolled_back_count"] == 0


def test_the_confirmation_is_asked_through_the_agent_too(protected, replica_server, start_agent, cli):
    path, data = protected
    replica_server.client().create_snapshot("vol", "before")
    api.write("vol", 4 * RS, b"M" * RS)
    api.replicate("vol")
    corrupt(path, 4 * RS + 9)
    api.scrub_volume("vol")
    start_agent("vol")
    refused = cli("recover", "vol", "--source", "snapshot:before")
    assert refused.code == 10 and "(4)" in refused.err
    assert cli("status", "vol", "--json").json()["mode"] == "normal"
    assert cli("recover", "vol", "--source", "snapshot:before", "--accept-rollback").code == 0
    assert api.read("vol", 4 * RS, RS) == data[4 * RS:5 * RS]


def test_the_preserved_endpoint_refuses_bad_requests(protected, replica_server):
    import requests

    replica_server.client().create_snapshot("vol", "before")
    url = f"{replica_server.url}/v1/volumes/vol/preserved"
    headers = {"Authorization": f"Bearer {replica_server.token_file.read_text().strip()}"}
    for body, status in (({"runs": [[0, 1]]}, 400), ({"snapshot": "before", "runs": "x"}, 400),
                         ({"snapshot": "before", "runs": [[0, 10 ** 6]]}, 400),
                         ({"snapshot": "nosuch", "runs": [[0, 1]]}, 404)):
        response = requests.post(url, json=body, headers=headers, timeout=10)
        assert response.status_code == status, (body, response.text)


def test_the_preserved_endpoint_lists_what_the_snapshot_preserved_and_only_that(protected, replica_server):
    """The preview costs what the snapshot preserved, not the volume's size: the server lists its
    preserved regions (here the two rewritten since), with the digests it keeps."""
    import blake3

    path, data = protected
    client = replica_server.client()
    client.create_snapshot("vol", "before")
    api.write("vol", 3 * RS, b"A" * RS)
    api.write("vol", 9 * RS + 7, b"B")
    api.replicate("vol")
    entries = dict(client.preserved("vol", "before", SIZE // RS))
    assert sorted(entries) == [3, 9]
    assert entries[3] == blake3.blake3(data[3 * RS:4 * RS]).digest()
    assert entries[9] == blake3.blake3(data[9 * RS:10 * RS]).digest()
