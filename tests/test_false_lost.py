"""A region is lost only when no copy matching the manifest exists anywhere (issue 11, item 4).

After a log overflow (bitmap mode) a region's bits say "no log record holds it"; when its local
copy then goes bad, the replica may still hold exactly the bytes the manifest describes (they
were shipped before, and the write the overflow dropped did not change them).  Reads, failback
and replicate --wait must ask the replica before calling such a region lost."""

from __future__ import annotations

import pytest

from drtool import api
from drtool.errors import RegionsLost
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 32
SIZE = REGIONS * RS
WRITE = 65_000
VICTIM = 3


@pytest.fixture
def overflowed(tmp_path, state_root, replica_server, cli):
    """--log-limit 1M; region 3's first 65,000 bytes were written and replicated, then 18 writes of
    65,000 bytes (region 3's the same bytes again) overflowed the log: bitmap mode for them all;
    then region 3 is corrupted locally.  The replica holds region 3's current bytes."""
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=9))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    assert cli("configure", "vol", "--log-limit", "1M").code == 0
    pattern = {region: bytes([region + 1]) * WRITE for region in range(18)}
    api.write("vol", VICTIM * RS, pattern[VICTIM])
    assert api.replicate("vol", wait=True)["lag"]["regions"] == 0
    for region in range(18):
        api.write("vol", region * RS, pattern[region])
        data[region * RS:region * RS + WRITE] = pattern[region]
    status = api.status("vol", probe_peer=False)[0]
    assert status["lag"]["bitmap_mode"] and status["replication"]["overflows"] == 1
    corrupt(path, VICTIM * RS + 100)
    # The replica's copy of region 3 matches the manifest: it is not lost.
    assert replica_server.client().read_range("vol", VICTIM * RS, RS) == bytes(data[VICTIM * RS:(VICTIM + 1) * RS])
    return path, data


def test_a_region_the_replica_holds_is_read_not_lost(overflowed, cli):
    path, data = overflowed
    assert api.read("vol", VICTIM * RS, RS) == bytes(data[VICTIM * RS:(VICTIM + 1) * RS])
    status = cli("status", "vol", "--json").json()
    assert status["mode"] == "degraded" and status["lost_regions"] == []
    result = cli("replicate", "vol", "--wait", "--timeout", "20", "--json")
    assert result.code == 0, result.err
    assert result.json()["lag"]["regions"] == 0
    result = cli("failback", "vol", "--json")
    assert result.code == 0, result.err
    assert path.read_bytes() == bytes(data)


def test_replicate_wait_and_failback_settle_it_without_a_read(overflowed, cli, replica_server):
    path, data = overflowed
    api.scrub_volume("vol")  # region 3 is bad now; nobody has read it
    result = cli("replicate", "vol", "--wait", "--timeout", "20", "--json")
    assert result.code == 0, result.err
    assert replica_server.client().read_range("vol", 0, SIZE) == bytes(data)
    assert cli("recover", "vol").code == 0
    result = cli("failback", "vol", "--json")
    assert result.code == 0, result.err
    assert result.json()["mode"] == "normal"
    assert path.read_bytes() == bytes(data)


def test_failback_settles_a_region_the_replica_holds(overflowed, cli):
    path, data = overflowed
    api.scrub_volume("vol")
    result = cli("recover", "vol", "--json")
    assert result.code == 0 and result.json()["lost_regions"] == []
    result = cli("failback", "vol", "--json")
    assert result.code == 0, result.err
    assert path.read_bytes() == bytes(data)


def test_a_region_the_replica_lacks_is_still_lost(tmp_path, state_root, replica_server, cli):
    """The write the overflow dropped changed the region: the replica's copy is older, so the
    region is lost (EIO and exit 8), and it stays refused."""
    path = tmp_path / "dev.img"
    make_image(path, SIZE, seed=9)
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    assert cli("configure", "vol", "--log-limit", "1M").code == 0
    for region in range(18):
        api.write("vol", region * RS, bytes([region + 1]) * WRITE)
    corrupt(path, VICTIM * RS + 100)
    with pytest.raises(RegionsLost, match=f"regions {VICTIM} are lost"):
        api.read("vol", VICTIM * RS, RS)
    result = cli("read", "vol", "--offset", str(VICTIM * RS), "--length", str(RS))
    assert result.code == 8 and f"regions {VICTIM} are lost" in result.err
    status = cli("status", "vol", "--json").json()
    assert status["lost_regions"] == [[VICTIM, 1]]
    result = cli("failback", "vol")
    assert result.code != 0 and f"regions [({VICTIM}, 1)] are lost" in result.err
    # replicate --wait ships everything else and says what it cannot ship, without waiting it out.
    result = cli("replicate", "vol", "--wait", "--timeout", "60")
    assert result.code == 8 and f"regions {VICTIM} are lost" in result.err
    status = cli("status", "vol", "--json").json()
    assert status["maps"]["unreplicated"] == [[VICTIM, 1]]
