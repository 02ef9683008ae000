"""A damaged replication log is never accepted silently (issue 11, item 3).

Ten records of 100 bytes, one per region (region i holds record i + 1), in segments of two
records each (SEGMENT_BYTES is small here): seg-1 holds 1-2, seg-3 3-4, ... seg-9 9-10.
Every record is synced, and close() makes the sync mark (10) durable.
"""

from __future__ import annotations

import errno
import os
import re

import pytest

from drtool.errors import CorruptStateFile
from drtool.regions import Geometry
from drtool.storage import replog
from drtool.storage.replog import SEGMENT_HEADER_SIZE, ReplicationLog, summarize
from drtool.wire import KIND_WRITE, RECORD_HEADER_SIZE

RS = 4096
GEOMETRY = Geometry(64 * RS, RS)
VOLUME_ID = bytes(range(16))
DATA = 100
RECORD = RECORD_HEADER_SIZE + DATA


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(replog, "SEGMENT_BYTES", SEGMENT_HEADER_SIZE + 2 * RECORD)


@pytest.fixture
def logdir(tmp_path):
    directory = tmp_path / "vol" / "log"
    log = ReplicationLog.open(str(directory), VOLUME_ID, GEOMETRY)
    for i in range(10):
        log.append(KIND_WRITE, i * RS, DATA, 1, bytes([i + 1]) * DATA)
        log.sync()
    assert [int(n[4:-4], 16) for n in sorted(os.listdir(directory)) if n.startswith("seg-")] == [1, 3, 5, 7, 9]
    log.close()
    return directory


def seg(directory, first: int) -> str:
    return str(directory / f"seg-{first:016x}.log")


def reopen(directory, **known) -> ReplicationLog:
    return ReplicationLog.open(str(directory), VOLUME_ID, GEOMETRY, **known)


def flip(path: str, position: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0x40]))


def refused(directory, **known) -> CorruptStateFile:
    with pytest.raises(CorruptStateFile) as caught:
        reopen(directory, **known)
    return caught.value


def test_an_intact_log_reopens_with_its_sync_mark(logdir):
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    try:
        assert list(log.entries) == list(range(1, 11))
        assert log.synced_mark == 10 and log.next_seq == 11
        assert (log.damage, log.damaged_regions, log.rescan_regions, log.lost_ranges) == ([], set(), set(), [])
    finally:
        log.close()
    assert summarize(str(logdir))["damage"] == []
    assert summarize(str(logdir))["records"] == 10


def test_a_middle_segment_truncated_at_a_record_boundary(logdir):
    """(a) seg-3 loses record 4, its last: the next segment begins at 5, a gap."""
    os.truncate(seg(logdir, 3), SEGMENT_HEADER_SIZE + RECORD)
    error = refused(logdir)
    assert error.path == seg(logdir, 5)
    assert re.search(r"records missing between seg-0+3\.log and seg-0+5\.log: replication log records 4 "
                     r"are lost; .*drtool init vol --device DEVICE --force", str(error))
    # The maps know record 4 (it was pending): its region is unknown, every unreplicated region ships whole.
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    try:
        assert log.lost_ranges == [(4, 4)] and log.damaged_regions == set() and not log.regions_unknown
        assert log.damage == [f"{seg(logdir, 5)}: records missing between seg-{3:016x}.log and "
                              f"seg-{5:016x}.log: records 4 lost; records 4 were pending, regions unknown"]
        assert 4 not in log.entries and list(log.entries) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    finally:
        log.close()
    # The maps never saw record 4: nobody knows which region it wrote.
    error = refused(logdir, covered_through=3, done_through=0, report_damage=True)
    assert "records 4 cannot be accounted for" in str(error)
    # Acknowledged and in the maps: nothing is needed from it.
    log = reopen(logdir, covered_through=10, done_through=4, report_damage=True)
    assert log.damage == [] and log.lost_ranges == []
    log.close()
    assert summarize(str(logdir))["damage"] == [
        f"{logdir}: between seg-{3:016x}.log and seg-{5:016x}.log: records 4 missing"]
    assert summarize(str(logdir), after=4)["damage"] == []


def test_the_first_and_a_middle_segment_deleted(logdir):
    """(b) log/start says the log holds every record from 1: seg-1 and seg-5 are missed."""
    os.unlink(seg(logdir, 1))
    os.unlink(seg(logdir, 5))
    error = refused(logdir)
    assert error.path == seg(logdir, 3)
    assert (f"records missing before the first segment seg-{3:016x}.log (log/start says the log holds every "
            "record from 1): replication log records 1-2 are lost") in str(error)
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    try:
        assert log.lost_ranges == [(1, 2), (5, 6)] and log.damaged_regions == set()
        assert len(log.damage) == 2 and list(log.entries) == [3, 4, 7, 8, 9, 10]
    finally:
        log.close()
    # Without log/start, what the caller knows still finds the first segment missing.
    os.unlink(logdir / "start")
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    assert log.lost_ranges == [(1, 2), (5, 6)]
    log.close()
    damage = summarize(str(logdir))["damage"]
    assert damage == [f"{logdir}: before seg-{3:016x}.log: records 1-2 missing",
                      f"{logdir}: between seg-{3:016x}.log and seg-{7:016x}.log: records 5-6 missing"]


def test_a_flipped_byte_in_a_synced_record_near_the_end(logdir):
    """(c) record 10, the last and synced, fails its digest: damage, never cut as a torn tail."""
    path = seg(logdir, 9)
    size = os.path.getsize(path)
    flip(path, size - 3)
    error = refused(logdir)
    assert error.path == path
    assert (f"damaged record at byte {SEGMENT_HEADER_SIZE + RECORD} of seg-{9:016x}.log: record data does not "
            "match its digest: replication log records 10 are lost (regions 9)") in str(error)
    log = reopen(logdir, covered_through=8, done_through=0, report_damage=True)
    try:
        assert log.damaged_regions == {9} and log.rescan_regions == {9} and log.lost_ranges == []
        assert list(log.entries) == list(range(1, 10)) and log.next_seq == 11 and log.cut_bytes == 0
        assert os.path.getsize(path) == size  # the damaged segment is kept as found ...
        entry = log.append(KIND_WRITE, 20 * RS, DATA, 1, b"n" * DATA)
        assert entry.seq == 11 and entry.segment == 11  # ... and sealed: appends go to a new segment
        log.sync()
    finally:
        log.close()
    assert os.path.getsize(path) == size


def test_a_flipped_byte_in_the_middle_keeps_the_records_after_it(logdir):
    flip(seg(logdir, 5), SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE + 7)  # record 5's data
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    try:
        assert log.damaged_regions == {4} and log.rescan_regions == set() and log.lost_ranges == []
        assert list(log.entries) == [1, 2, 3, 4, 6, 7, 8, 9, 10]
    finally:
        log.close()
    flip(seg(logdir, 5), SEGMENT_HEADER_SIZE + 9)  # and now its header: the region is unknown
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    assert log.damaged_regions == set() and log.lost_ranges == [(5, 5)]
    log.close()
    assert summarize(str(logdir))["damage"] == [
        f"{seg(logdir, 5)}: damaged record at byte {SEGMENT_HEADER_SIZE} (sequence 5): record header checksum mismatch"]


def test_a_flipped_byte_in_the_header_of_the_last_unsynced_record_is_a_torn_tail(logdir):
    """(d) record 11 was never synced (never acknowledged): cut, as before."""
    log = reopen(logdir)
    log.append(KIND_WRITE, 11 * RS, DATA, 1, b"u" * DATA)
    log.close()
    path = seg(logdir, 11)
    flip(path, SEGMENT_HEADER_SIZE + 20)
    assert summarize(str(logdir))["damage"] == []
    log = reopen(logdir, covered_through=10, done_through=0)
    try:
        assert log.cut_bytes == RECORD and os.path.getsize(path) == SEGMENT_HEADER_SIZE
        assert list(log.entries) == list(range(1, 11)) and log.next_seq == 11
        assert log.damage == [] and log.damaged_regions == set()
    finally:
        log.close()


def test_a_torn_tail_whose_header_still_decodes_names_its_region_for_a_rescan(logdir):
    log = reopen(logdir)
    log.append(KIND_WRITE, 11 * RS, DATA, 1, b"u" * DATA)
    log.close()
    os.truncate(seg(logdir, 11), SEGMENT_HEADER_SIZE + RECORD - 10)
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    assert log.cut_bytes == RECORD - 10 and log.rescan_regions == {11} and log.damage == []
    log.close()


def test_the_last_segment_truncated_inside_a_synced_record(logdir):
    """(e) record 10 is cut short below the sync mark: damage, its region known from its header."""
    path = seg(logdir, 9)
    os.truncate(path, SEGMENT_HEADER_SIZE + RECORD + RECORD_HEADER_SIZE + 40)
    error = refused(logdir)
    assert error.path == path
    assert (f"damaged record at byte {SEGMENT_HEADER_SIZE + RECORD} of seg-{9:016x}.log: record runs past the "
            "end of the segment: replication log records 10 are lost (regions 9)") in str(error)
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    assert log.damaged_regions == {9} and log.lost_ranges == [] and log.cut_bytes == 0
    assert os.path.getsize(path) == SEGMENT_HEADER_SIZE + RECORD + RECORD_HEADER_SIZE + 40
    log.close()
    assert summarize(str(logdir))["damage"] == [
        f"{path}: damaged record at byte {SEGMENT_HEADER_SIZE + RECORD} (sequence 10): record runs past the end "
        "of the segment"]


def test_the_last_segment_truncated_inside_a_header_below_the_mark(logdir):
    os.truncate(seg(logdir, 9), SEGMENT_HEADER_SIZE + 30)  # records 9 and 10: no header left
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    assert log.lost_ranges == [(9, 10)] and log.damaged_regions == set()
    log.close()
    error = refused(logdir, covered_through=8, done_through=0, report_damage=True)
    assert "records 9-10 cannot be accounted for" in str(error)
    log = reopen(logdir, covered_through=8, done_through=0, report_damage=True, accept_loss=True)
    assert log.regions_unknown and log.lost_ranges == [(9, 10)]
    log.close()


def test_the_last_segment_deleted_is_found_by_what_the_maps_cover(logdir):
    os.unlink(seg(logdir, 9))
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    assert log.lost_ranges == [(9, 10)] and log.next_seq == 11
    log.close()


def test_settled_damage_is_not_reported_again(logdir):
    os.truncate(seg(logdir, 3), SEGMENT_HEADER_SIZE + RECORD)
    log = reopen(logdir, covered_through=10, done_through=0, report_damage=True)
    assert log.lost_ranges == [(4, 4)]
    log.settle_damage()
    log.close()
    log = reopen(logdir, covered_through=10, done_through=0)
    assert log.damage == [] and list(log.entries) == [1, 2, 3, 5, 6, 7, 8, 9, 10]
    log.close()
    assert summarize(str(logdir))["damage"] == []


def test_trim_deletes_a_prefix_and_the_log_still_opens_clean(logdir):
    log = reopen(logdir, covered_through=10, done_through=0)
    log.acknowledge([1, 2, 5, 6])  # 5-6 acknowledged out of order: seg-5 must wait for seg-3
    assert log.trim(10) == 1 and sorted(log.segments) == [3, 5, 7, 9]
    log.close()
    log = reopen(logdir, covered_through=10, done_through=2, acked_ahead=[5, 6], report_damage=True)
    assert log.damage == [] and log.start_seq == 3 and list(log.entries) == [3, 4, 5, 6, 7, 8, 9, 10]
    log.close()


def test_drop_through_forgets_but_deletes_nothing_until_trim(logdir):
    log = reopen(logdir, covered_through=10, done_through=0)
    assert log.drop_through(6) == {0, 1, 2, 3, 4, 5}
    assert sorted(log.segments) == [1, 3, 5, 7, 9]  # a crash now loses neither records nor their marks
    assert log.trim(6) == 3 and sorted(log.segments) == [7, 9]
    log.close()
    log = reopen(logdir, covered_through=10, done_through=6, report_damage=True)
    assert log.damage == [] and list(log.entries) == [7, 8, 9, 10]
    log.close()


def test_the_sync_mark_lags_by_one_sync_without_close(logdir, tmp_path):
    """A sync's mark rides on the next fsync: after a crash it may lag by the last sync only."""
    log = reopen(logdir)
    log.append(KIND_WRITE, 11 * RS, DATA, 1, b"a" * DATA)
    log.sync()
    assert log.synced_mark == 11 and log.segments[11].synced == 11
    with open(seg(logdir, 11), "rb") as handle:
        head = handle.read(SEGMENT_HEADER_SIZE)
    assert int.from_bytes(head[36:44], "little") == 11
    log.close()


def test_the_engine_refuses_a_log_with_a_gap(tmp_path, state_root):
    """End to end: pending writes, a middle segment cut at a record boundary: opening refuses (exit 5)."""
    from drtool import api
    from drtool.engine import Engine
    from drtool.errors import StateError
    from tests.conftest import make_image

    path = tmp_path / "dev.img"
    make_image(path, 16 * 65536)
    api.init_volume("vol", str(path), "64K")
    with Engine.open(None, "vol") as engine:
        for i in range(6):
            engine.write(i * 65536, bytes([i + 1]) * DATA)
        engine.flush()
        segments = [s.path for s in engine.log.segments.values()]
        engine.volume.lock.release()  # keep the records: no save(), as after a crash
        engine.volume.lock = None
        engine.log.close()
    assert len(segments) == 3
    os.truncate(segments[1], SEGMENT_HEADER_SIZE + RECORD)
    with pytest.raises(CorruptStateFile, match=r"records missing between .* records 4 are lost") as caught:
        Engine.open(None, "vol")
    assert isinstance(caught.value, StateError) and caught.value.path == segments[2]


def test_concurrent_appends_and_syncs_leave_a_consistent_mark(tmp_path):
    import threading

    directory = tmp_path / "vol" / "log"
    log = ReplicationLog.open(str(directory), VOLUME_ID, GEOMETRY)

    def writer(index: int) -> None:
        for i in range(40):
            log.append(KIND_WRITE, (index * 8 + i % 8) * RS, DATA, 1, bytes([index + 1]) * DATA)
            log.sync()

    threads = [threading.Thread(target=writer, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log.synced_mark == 160 and not log._sync_running
    log.close()
    log = reopen(directory, covered_through=160, done_through=0, report_damage=True)
    assert log.damage == [] and list(log.entries) == list(range(1, 161)) and log.synced_mark == 160
    log.close()
    assert summarize(str(directory))["damage"] == []


def test_concurrent_syncs_share_one_fdatasync(tmp_path, monkeypatch):
    """Group commit: while one sync waits for the disk, the others queue behind it and the next
    one covers all their records: far fewer fdatasyncs than callers, every record durable."""
    import threading
    import time

    from drtool.storage import replog as module

    log = ReplicationLog.open(str(tmp_path / "vol" / "log"), VOLUME_ID, GEOMETRY)
    log.append(KIND_WRITE, 0, DATA, 1, b"\1" * DATA)
    calls = []
    release = threading.Event()
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            assert release.wait(10)  # the first sync is on the disk while the others arrive
        real(fd)

    monkeypatch.setattr(module.os, "fdatasync", slow_fdatasync)
    first = threading.Thread(target=log.sync)
    first.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.001)
    writers = []
    for index in range(8):
        log.append(KIND_WRITE, (index + 1) * RS, DATA, 1, bytes([index + 2]) * DATA)
        writers.append(threading.Thread(target=log.sync))
        writers[-1].start()
    for writer in writers:  # none may return before a sync that began after its append ends
        writer.join(0.02)
        assert writer.is_alive()
    release.set()
    for thread in [first, *writers]:
        thread.join(10)
        assert not thread.is_alive()
    # The first caller's, then one sync for the eight that waited: one fdatasync per segment
    # holding records 2-9 (seg-1, seg-3, seg-5, seg-7, seg-9: two records a segment here).
    assert len(calls) == 1 + 5 and len(set(calls[1:])) == 5
    assert log.synced_mark == 9 and log.next_seq == 10
    log.close()


def test_after_a_failed_fsync_no_sync_claims_success(tmp_path, monkeypatch):
    from drtool.errors import StateError
    from drtool.storage import replog as module

    log = ReplicationLog.open(str(tmp_path / "vol" / "log"), VOLUME_ID, GEOMETRY)
    log.append(KIND_WRITE, 0, DATA, 1, b"\1" * DATA)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(module.os, "fdatasync", failing)
    with pytest.raises(OSError):
        log.sync()
    monkeypatch.undo()  # the disk answers again; the pages it dropped are gone all the same
    log.append(KIND_WRITE, RS, DATA, 1, b"\2" * DATA)
    with pytest.raises(StateError, match="could not be made durable"):
        log.sync()
    assert log.synced_mark == 0
    log.close()
