"""Incident recovery at the engine level: merged verified reads, overlay writes, failback."""

import os
import random

import pytest

from drtool import api
from drtool.engine import Engine
from drtool.errors import DataUnavailable, NotPermitted, RegionsLost
from drtool.replication import Replicator
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 40
SIZE = REGIONS * RS - 1000  # partial last region


@pytest.fixture
def protected(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=7, sparse_every=5))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    return path, data


def damage(path, regions):
    for region in regions:
        corrupt(path, region * RS + 11, b"\xde\xad")


def test_recover_serves_exact_data_over_corrupted_regions(protected, replica_server):
    path, data = protected
    bad = random.Random(3).sample(range(REGIONS), 4)
    damage(path, bad)
    runs = api.scrub_volume("vol")["bad_regions"]
    assert sorted(r for first, n in runs for r in range(first, first + n)) == sorted(bad)
    result = api.recover("vol")
    assert result["changed"] and result["mode"] == "degraded" and result["requested_count"] == 4
    assert api.recover("vol")["changed"] is False  # idempotent
    assert api.read("vol", 0, SIZE) == bytes(data)
    status = api.status("vol")[0]
    assert status["recovery"]["fetched_regions"] == 4
    assert status["overlay"]["regions"] == 4  # copy-on-read kept them


def test_self_healing_read_marks_newly_corrupted_region(protected):
    path, data = protected
    api.recover("vol")
    damage(path, [9])
    assert api.read("vol", 9 * RS, RS) == bytes(data[9 * RS:10 * RS])
    assert api.status("vol")[0]["bad_regions"] == [[9, 1]]


def test_auto_degrade_on_a_bad_read_in_normal_mode(protected):
    path, data = protected
    damage(path, [3])
    assert api.read("vol", 3 * RS, 100) == bytes(data[3 * RS:3 * RS + 100])
    status = api.status("vol")[0]
    assert status["mode"] == "degraded" and status["recovery"]["auto"] is True


def test_auto_degrade_off_gives_eio(protected, state_root):
    path, _ = protected
    with Engine.open(None, "vol") as engine:
        engine.record.settings["auto_degrade"] = False
    damage(path, [3])
    with pytest.raises(DataUnavailable, match="not in recovery"):
        api.read("vol", 3 * RS, 100)


def test_degraded_writes_go_to_the_overlay_and_its_replica(protected, replica_server):
    path, data = protected
    damage(path, [2])
    api.scrub_volume("vol")
    api.recover("vol")
    device_before = path.read_bytes()
    writes = [(2 * RS + 5, b"partial into a bad region"), (6 * RS, b"W" * RS), (SIZE - 10, b"tail!")]
    for offset, chunk in writes:
        api.write("vol", offset, chunk)
        data[offset:offset + len(chunk)] = chunk
    assert path.read_bytes() == device_before  # the device is not touched in degraded mode
    assert api.read("vol", 0, SIZE) == bytes(data)
    api.replicate("vol")
    overlay = replica_server.client().read_range("vol", 0, SIZE, overlay=True)
    for region in (2, 6, REGIONS - 1):
        lo, hi = region * RS, min((region + 1) * RS, SIZE)
        assert overlay[lo:hi] == bytes(data[lo:hi])


def test_bad_and_lagging_region_is_force_replicated_first(protected, replica_server):
    path, data = protected
    api.write("vol", 12 * RS, b"latest" * 100)  # not replicated yet
    data[12 * RS:12 * RS + 600] = b"latest" * 100
    damage(path, [12])
    api.scrub_volume("vol")
    api.recover("vol")
    assert api.read("vol", 12 * RS, 600) == b"latest" * 100


def test_lost_region_fails_alone(protected, replica_server):
    path, data = protected
    with Engine.open(None, "vol") as engine:
        Replicator(engine)
        engine.record.settings["log_limit"] = RS
        for region in (20, 21, 22):
            engine.write(region * RS, bytes([region]) * RS)  # overflow: records dropped
            data[region * RS:(region + 1) * RS] = bytes([region]) * RS
        assert engine.volume.norecord.test(20)
    damage(path, [21])
    api.scrub_volume("vol")
    api.recover("vol")
    status = api.status("vol")[0]
    assert status["lost_regions"] == [[21, 1]]
    with pytest.raises(RegionsLost, match="regions 21 are lost"):
        api.read("vol", 21 * RS + 100, 10)
    assert api.read("vol", 19 * RS, RS) == bytes(data[19 * RS:20 * RS])
    assert api.read("vol", 22 * RS, RS) == bytes(data[22 * RS:23 * RS])
    with pytest.raises(NotPermitted, match="lost"):
        api.failback("vol")


def test_failback_restores_the_device_and_returns_to_normal(protected, replica_server):
    path, data = protected
    damage(path, [1, 7, 30])
    api.scrub_volume("vol")
    api.recover("vol")
    api.write("vol", 15 * RS + 3, b"during the incident")
    data[15 * RS + 3:15 * RS + 22] = b"during the incident"
    result = api.failback("vol", rate="1G")
    assert result["regions_copied"] == 4 and result["mode"] == "normal"
    assert path.read_bytes() == bytes(data)
    assert not os.path.exists(os.path.join(os.environ["DRTOOL_STATE_ROOT"], "vol", "overlay.img"))
    assert api.scrub_volume("vol")["bad_regions"] == []
    status = api.status("vol")[0]
    assert status["health"] == "ONLINE" and status["mode"] == "normal"
    api.replicate("vol")
    assert replica_server.client().read_range("vol", 0, SIZE) == bytes(data)
    assert api.failback("vol")["changed"] is False


def test_deleted_device_serves_from_replica_then_fails_back_to_new_device(protected, replica_server, tmp_path):
    path, data = protected
    os.unlink(path)
    assert api.scrub_volume("vol")["health"] == "FAULTED"
    api.recover("vol")
    assert api.read("vol", RS, 3 * RS) == bytes(data[RS:4 * RS])
    blank = tmp_path / "new.img"
    with open(blank, "wb") as handle:
        handle.truncate(SIZE)
    result = api.failback("vol", device=str(blank))
    assert result["mode"] == "normal"
    assert blank.read_bytes() == bytes(data)
    # Only what differs was copied: the new device's zero regions already matched.
    assert result["regions_copied"] == REGIONS - len(range(0, REGIONS, 5))
    assert api.scrub_volume("vol")["bad_regions"] == []


def test_interrupted_failback_resumes(protected, replica_server, monkeypatch):
    from drtool import failback as failback_mod

    path, data = protected
    damage(path, list(range(0, 30)))
    api.scrub_volume("vol")
    api.recover("vol")
    monkeypatch.setattr(failback_mod, "BATCH_BYTES", 4 * RS)
    calls = []
    real = failback_mod._copy_region

    def crash_after_some(engine, region, fetched):
        calls.append(region)
        if len(calls) == 10:
            raise KeyboardInterrupt("operator pressed ^C")
        return real(engine, region, fetched)

    monkeypatch.setattr(failback_mod, "_copy_region", crash_after_some)
    with pytest.raises(KeyboardInterrupt):
        api.failback("vol")
    status = api.status("vol")[0]
    remaining = sum(n for _, n in status["maps"]["resync"])
    assert remaining == 21  # two whole batches and one region of the third were copied
    # Progress is the maps': the region of the interrupted batch counts, exactly once.
    assert status["mode"] == "resync" and status["failback"]["done_regions"] == 9
    assert status["failback"]["total_regions"] == 30
    monkeypatch.setattr(failback_mod, "_copy_region", real)
    result = api.failback("vol")
    assert result["regions_copied"] == remaining
    assert path.read_bytes() == bytes(data)


def test_local_era_fetches_the_changed_set(protected, replica_server, tmp_path):
    path, data = protected
    backup = path.read_bytes()  # a local backup taken now ...
    era = api.checkpoint("vol")["era"]  # ... at the start of this era
    for region in (4, 9):
        api.write("vol", region * RS, b"new" * 10)
        data[region * RS:region * RS + 30] = b"new" * 10
    api.replicate("vol")
    path.write_bytes(backup)  # the device is restored from the older backup
    api.recover("vol", local_era=era)
    assert api.read("vol", 0, SIZE) == bytes(data)
    assert api.status("vol")[0]["recovery"]["fetched_regions"] == 2


def test_journal_source_applies_changes_over_local_data(protected, replica_server):
    path, data = protected
    backup = path.read_bytes()
    era = api.checkpoint("vol")["era"]
    api.write("vol", 4 * RS + 100, b"journal!")
    data[4 * RS + 100:4 * RS + 108] = b"journal!"
    api.replicate("vol")
    path.write_bytes(backup)
    api.recover("vol", local_era=era, source="journal")
    assert api.read("vol", 4 * RS, RS) == bytes(data[4 * RS:5 * RS])


def test_snapshot_source_rolls_bad_regions_back(protected, replica_server):
    path, data = protected
    old = bytes(data[5 * RS:6 * RS])
    replica_server.client().create_snapshot("vol", "before")
    api.write("vol", 5 * RS, b"N" * RS)
    api.replicate("vol")
    damage(path, [5])
    api.scrub_volume("vol")
    api.recover("vol", source="snapshot:before", accept_rollback=True)
    assert api.read("vol", 5 * RS, RS) == old


def test_after_failback_the_overlay_replica_never_outlives_newer_writes(protected, replica_server):
    """Incident writes reach the overlay replica; after failback they are shipped to the mirror and
    later writes change the same regions: a takeover must then serve the later bytes, not merge the
    incident's overlay copy over them."""
    path, data = protected
    damage(path, [3])
    api.scrub_volume("vol")
    api.recover("vol")
    for region in (3, 15):
        api.write("vol", region * RS + 9, b"incident")
        data[region * RS + 9:region * RS + 17] = b"incident"
    api.replicate("vol")
    client = replica_server.client()
    assert client.volume_info("vol")["overlay"]["regions"] == 2
    api.failback("vol")
    api.write("vol", 15 * RS + 9, b"after!!!")
    data[15 * RS + 9:15 * RS + 17] = b"after!!!"
    api.replicate("vol")
    assert client.volume_info("vol")["overlay"]["regions"] == 0  # superseded by the mirror's records
    info = client.promote("vol", force=True)
    assert info["overlay_regions_merged"] == 0
    assert client.read_range("vol", 0, SIZE) == bytes(data)


def test_forced_replication_keeps_each_regions_order_across_endpoints(protected, replica_server):
    """A region's overlay record followed by its mirror record (failback re-logs incident writes)
    is forced in sequence order, so the mirror's newer copy supersedes the overlay's."""
    path, data = protected
    damage(path, [6])
    api.scrub_volume("vol")
    api.recover("vol")
    api.write("vol", 6 * RS, b"O" * RS)  # an overlay record, not shipped
    data[6 * RS:7 * RS] = b"O" * RS
    with Engine.open(None, "vol") as engine:
        from drtool import failback as failback_mod

        failback_mod.failback(engine)  # re-logs region 6 as a mirror record; nothing shipped yet
        assert [e.header.overlay for e in engine.log.pending(regions={6})] == [True, False]
        Replicator(engine).force([6])
    client = replica_server.client()
    assert client.volume_info("vol")["overlay"]["regions"] == 0
    client.promote("vol", force=True)
    assert client.read_range("vol", 6 * RS, RS) == bytes(data[6 * RS:7 * RS])


class OrderedStripes:
    """Lock stripes that record every breach of the engine's lock order: a thread that holds
    a stripe may take only higher ones (or the same again), and never forces replication."""

    def __init__(self, count: int) -> None:
        import threading

        self.locks = [threading.RLock() for _ in range(count)]
        self.held = threading.local()
        self.breaches: list[str] = []

    def __len__(self) -> int:
        return len(self.locks)

    def __getitem__(self, index: int) -> "_OrderedStripe":
        return _OrderedStripe(self, index)

    def holding(self) -> list[int]:
        if not hasattr(self.held, "stack"):
            self.held.stack = []
        return self.held.stack


class _OrderedStripe:
    def __init__(self, owner: OrderedStripes, index: int) -> None:
        self.owner, self.index = owner, index

    def acquire(self) -> None:
        stack = self.owner.holding()
        if stack and self.index not in stack and self.index < max(stack):
            self.owner.breaches.append(f"took stripe {self.index} while holding {max(stack)}")
        self.owner.locks[self.index].acquire()
        stack.append(self.index)

    def release(self) -> None:
        self.owner.holding().remove(self.index)
        self.owner.locks[self.index].release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_partial_writes_and_remote_reads_keep_the_lock_order(tmp_path, state_root, replica_server):
    """Partial degraded writes fetch their region's base from the replica while readers fetch
    runs with readahead that wraps around the lock stripes: every thread keeps the lock order
    (so none can wait for a lock held by one waiting for its own), and every byte ends up right."""
    import threading

    rs, count = 4096, 700  # more regions than lock stripes: readahead wraps around them
    size = rs * count
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, size, seed=11))
    api.init_volume("vol", str(path), "4K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    api.write("vol", 300 * rs + 9, b"not shipped")  # its latest bytes exist only in the log
    data[300 * rs + 9:300 * rs + 20] = b"not shipped"
    for region in range(count):
        corrupt(path, region * rs + 1, b"\x00\xff")
    api.scrub_volume("vol")
    expected_lock = threading.Lock()
    failures: list[BaseException] = []
    with Engine.open(None, "vol") as engine:
        stripes = OrderedStripes(len(engine.stripes))
        engine.stripes = stripes
        replicator = Replicator(engine)
        real_force = replicator.force

        forced = []

        def force(regions):
            forced.append(list(regions))
            if stripes.holding():
                stripes.breaches.append(f"forced replication of {regions} while holding stripes")
            return real_force(regions)

        replicator.force = force
        # Normal mode: a partial write into a bad region degrades the volume and fetches the
        # region's base while the next 256 regions, whose stripes wrap around, are still remote.
        engine.write(250 * rs + 7, b"first")
        data[250 * rs + 7:250 * rs + 12] = b"first"
        assert engine.record.mode == "degraded"
        engine.write(100 * rs + 7, b"lagging")  # in the log, not shipped yet
        data[100 * rs + 7:100 * rs + 14] = b"lagging"
        engine.write(300 * rs + 2, b"on top")  # its base must be force-replicated, then fetched
        data[300 * rs + 2:300 * rs + 8] = b"on top"
        assert [300] in forced

        def writer(regions):
            try:
                for region in regions:
                    offset = region * rs + 100
                    chunk = bytes([region % 251]) * 50
                    with expected_lock:
                        data[offset:offset + len(chunk)] = chunk
                        engine.write(offset, chunk)  # under the lock: the expected bytes stay in step
            except BaseException as exc:
                failures.append(exc)

        def reader(starts):
            try:
                for start in starts:
                    engine.read(start * rs, 8 * rs)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=writer, args=(range(count - 1, 0, -3),)),
                   threading.Thread(target=writer, args=(range(1, count, 3),)),
                   threading.Thread(target=reader, args=(range(0, count - 8, 5),)),
                   threading.Thread(target=reader, args=(range(count - 9, 0, -7),))]
        for thread in threads:
            thread.daemon = True
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads), "deadlock: threads still waiting"
        assert not failures, failures
        assert stripes.breaches == []
        assert bytes(engine.read(0, size)) == bytes(data)


def test_later_degraded_writes_into_an_overlay_region_log_and_ship_only_their_bytes(protected, replica_server):
    """The first write of a region in degraded mode puts it whole into the overlay and its log
    record, and ships only the bytes written (the overlay replica fills the rest from its
    mirror); later ones log and ship the bytes written.  A copy-on-read region (kept in the
    overlay, never shipped) gets partial records too, filled from the mirror the same way.
    What the overlay replica holds and what a client reads are the volume's bytes."""
    path, data = protected
    damage(path, [2])
    api.scrub_volume("vol")
    api.recover("vol")
    assert api.read("vol", 2 * RS, 10) == bytes(data[2 * RS:2 * RS + 10])  # region 2 kept by copy-on-read
    writes = [(6 * RS + 100, b"a" * 4096), (6 * RS + 9000, b"b" * 4096), (2 * RS + 77, b"c" * 4096),
              (6 * RS + 100, b"d" * 10)]
    with Engine.open(None, "vol") as engine:
        lengths = []
        for offset, chunk in writes:
            engine.write(offset, chunk)
            data[offset:offset + len(chunk)] = chunk
            lengths.append(engine.log.pending()[-1].header.length)
        # Region 6 is not in the overlay: its writes go in as whole 4 KiB blocks (a write that
        # covers part of a block reads that block), its base stays on the device (issue 12's
        # sub-region tracking).  Region 2 is held whole (copy-on-read): the bytes written.
        assert lengths == [2 * 4096, 2 * 4096, 4096, 4096]
        assert engine.volume.overlay_blocks.held(6) == [0, 1, 2, 3]
        assert engine.volume.overlay_blocks.held(2) == []
        assert bytes(engine.read(0, SIZE)) == bytes(data)
        replicator = Replicator(engine)
        replicator.ship()
        shipped = replicator.shipped_bytes
    # the blocks written and the record headers (one more: region 6's base digest), nothing else
    assert shipped == 6 * 4096 + 5 * 76
    overlay = replica_server.client().read_range("vol", 0, SIZE, overlay=True)
    for region in (2, 6):
        assert overlay[region * RS:(region + 1) * RS] == bytes(data[region * RS:(region + 1) * RS])
    assert api.read("vol", 0, SIZE) == bytes(data)


def test_a_partial_overlay_record_is_replayed_over_the_overlays_region(protected, state_root):
    """A crash after partial overlay records: replay writes their bytes into the overlay and
    puts their blocks back in the overlay's block map (the region's base is on the device)."""
    path, data = protected
    api.recover("vol")
    with Engine.open(None, "vol") as engine:
        engine.write(5 * RS + 1, b"first")  # the region goes into the overlay whole
        engine.save()  # ... and a checkpoint covers that record
        engine.write(5 * RS + 30000, b"second" * 100)
        engine.write(5 * RS + 3, b"third")
        engine.flush()
        assert [e.header.length for e in engine.log.pending()][-2:] == [4096, 4096]  # whole blocks
        overlay_path = engine.volume.paths.overlay
        engine.volume.lock.release()  # a crash: no save
        engine.volume.lock = None
        engine.log.close()
    for offset, chunk in ((5 * RS + 1, b"first"), (5 * RS + 30000, b"second" * 100), (5 * RS + 3, b"third")):
        data[offset:offset + len(chunk)] = chunk
    with open(overlay_path, "r+b") as handle:  # the overlay lost the bytes it was not told to keep
        handle.seek(5 * RS + 30000)
        handle.write(bytes(600))
    assert api.read("vol", 0, SIZE) == bytes(data)
    assert api.scrub_volume("vol")["bad_regions"] == []


def test_first_overlay_writes_ship_whole_when_the_mirror_cannot_fill_them(protected, replica_server):
    """The overlay replica fills a partial record's region from its mirror: not when the base came
    from a snapshot (another version than the mirror's), nor for a region in bitmap mode (the
    mirror lacks its latest bytes).  Those first writes ship whole, and the overlay replica holds
    the volume's bytes either way."""
    path, data = protected
    replica_server.client().create_snapshot("vol", "before")
    api.write("vol", 8 * RS, b"N" * 100)
    data[8 * RS:8 * RS + 100] = b"N" * 100
    with Engine.open(None, "vol") as engine:
        engine.write(9 * RS + 5, b"M" * 100)  # region 9: logged, then dropped into bitmap mode
        engine.enter_bitmap_mode(0.0)
        assert engine.volume.norecord.test(9)
    data[9 * RS + 5:9 * RS + 105] = b"M" * 100
    api.recover("vol")
    with Engine.open(None, "vol") as engine:
        engine.write(9 * RS + 500, b"x" * 4096)
        engine.write(10 * RS + 500, b"y" * 4096)
        entries = {entry.region: entry for entry in engine.log.pending() if entry.header.overlay}
        # region 9 whole; region 10 (sub-region tracking) its two blocks after a base record
        assert entries[9].patch is None and entries[9].header.length == RS
        assert entries[10].patch is None and entries[10].header.length == 2 * 4096
        shipping = [e for e in engine.log.pending() if e.header.overlay]
        assert sum(len(chunk) for chunk in engine.log.read_for_shipping(shipping)) == 76 + RS + 76 + 76 + 2 * 4096
        Replicator(engine).ship()
    for region, chunk in ((9, b"x"), (10, b"y")):
        data[region * RS + 500:region * RS + 4596] = chunk * 4096
    overlay = replica_server.client().read_range("vol", 0, SIZE, overlay=True)
    for region in (9, 10):
        assert overlay[region * RS:(region + 1) * RS] == bytes(data[region * RS:(region + 1) * RS])


def test_first_overlay_writes_over_a_snapshot_source_ship_whole(protected, replica_server):
    path, data = protected
    replica_server.client().create_snapshot("vol", "before")
    api.write("vol", 5 * RS, b"N" * RS)
    api.replicate("vol")
    damage(path, [5])
    api.scrub_volume("vol")
    api.recover("vol", source="snapshot:before", accept_rollback=True)
    with Engine.open(None, "vol") as engine:
        replicator = Replicator(engine)
        replicator.ship()
        engine.write(12 * RS + 500, b"z" * 4096)
        before = replicator.shipped_bytes
        replicator.ship()
        assert replicator.shipped_bytes - before == RS + 76
