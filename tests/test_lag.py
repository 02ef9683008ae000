"""The replication lag is computed in one place: an open engine and the files on disk agree."""

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.engine.lag import Pending, lag
from drtool.replication import Replicator, lag_of
from drtool.status import volume_status
from drtool.storage.volume import Volume
from tests.conftest import make_image

RS = 65536
SIZE = 8 * RS + 100  # a partial last region: bitmap-mode bytes count its real length


@pytest.fixture
def protected(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    make_image(path, SIZE, sparse_every=3)
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    return state_root


def both(root):
    """(the lag an open engine reports, the lag status reads from disk with no engine), at one time."""
    with Engine.open(str(root), "vol") as engine:
        live = lag(engine.volume, Pending.of_log(engine.log), now=1e10)
        assert {k: v for k, v in lag_of(engine).items() if k != "oldest_seconds"} == \
               {k: v for k, v in live.items() if k not in ("oldest_seconds", "summary")} | {"summary": lag_of(engine)["summary"]}
        engine.save()
    volume = Volume.inspect(str(root), "vol")
    return live, lag(volume, Pending.on_disk(volume), now=1e10)


def test_in_sync(protected):
    live, disk = both(protected)
    assert live == disk and live["summary"] == "in sync" and live["records"] == 0


def test_pending_writes_and_bitmap_mode_agree(protected):
    api.write("vol", RS - 3, b"A" * 10)  # two records, regions 0 and 1
    api.write("vol", SIZE - 50, b"D" * 50)  # the partial last region
    live, disk = both(protected)
    assert live == disk
    assert live["records"] == 3 and live["regions"] == 3 and not live["bitmap_mode"]
    with Engine.open(str(protected), "vol") as engine:
        Replicator(engine).overflow()  # the log's records are dropped: their regions ship from the volume
    live, disk = both(protected)
    assert live == disk
    assert live["bitmap_mode"] and live["bitmap_regions"] == 3 and live["records"] == 0
    assert live["bytes"] == 2 * RS + 100  # regions 0, 1 and the 100-byte last region
    assert "BITMAP MODE" in live["summary"]


def test_status_with_and_without_an_engine_reports_the_same_lag(protected):
    api.write("vol", 3 * RS, b"x" * RS)
    with Engine.open(str(protected), "vol") as engine:
        engine.save()
        from_engine = volume_status(engine.volume, lag=lag_of(engine), probe_peer=False)["lag"]
    volume = Volume.inspect(str(protected), "vol")
    from_disk = volume_status(volume, probe_peer=False)["lag"]
    # The age of the oldest write moves between the two looks (the summary says it too).
    from_engine.pop("oldest_seconds"), from_disk.pop("oldest_seconds")
    for lag in (from_engine, from_disk):
        assert ", oldest " in lag["summary"]
        lag["summary"] = lag["summary"].rsplit(", oldest ", 1)[0]
    assert from_engine == from_disk and from_engine["records"] == 1
