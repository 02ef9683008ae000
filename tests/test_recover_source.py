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
