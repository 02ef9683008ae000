"""DigestTable format 2: pages exist once written, an index says which, and nothing else is trusted.

A page never written reads as absent and all zeros; a page (or group) the index lists
but whose file is missing, torn or of another generation is refused with
CorruptStateFile naming the file.  A save a crash interrupted before its index is
settled at the next open, with exact counts.  Format-1 tables are converted by a
writable open and refused, with the command to run, by a read-only one.
"""

from __future__ import annotations

import os
from pathlib import Path

import blake3
import pytest

from drtool.errors import CorruptStateFile, StateError
from drtool.regions import Geometry
from drtool.replica import tables
from drtool.replica.journal import Journal
from drtool.replica.tables import GROUP_PAGES, PAGE_REGIONS, DigestTable
from drtool.storage import mapfile
from drtool.wire import NO_DIGEST, zero_digest

RS = 65536
MAGIC = b"DRTRMAN\0"
VID = bytes.fromhex("0123456789abcdef0123456789abcdef")
HUGE = Geometry(15 << 40, RS)


def digest(n: int) -> bytes:
    return blake3.blake3(n.to_bytes(8, "little")).digest()


def table(path: Path, geometry: Geometry = HUGE, lazy: bool = False) -> DigestTable:
    return DigestTable(str(path), MAGIC, "manifest", geometry, VID, lazy=lazy)


def reopen(path: Path, geometry: Geometry = HUGE, writable: bool = True, lazy: bool = False) -> DigestTable:
    opened = table(path, geometry, lazy)
    opened.check(writable)
    return opened


def test_a_15_tib_table_is_one_small_file_until_written(tmp_path: Path) -> None:
    t = table(tmp_path / "m")
    t.create()
    assert os.listdir(tmp_path / "m") == ["index.bin"]
    t = reopen(tmp_path / "m")
    assert t.zero_count() == HUGE.count and t.present_count() == 0 and not t.present(HUGE.count - 1)
    assert t.digest(12345) == zero_digest(RS) and t.digests_of_page(777) == zero_digest(RS) * PAGE_REGIONS
    far = [0, 3, HUGE.count // 2, HUGE.count - 1]
    for region in far:
        t.set(region, digest(region))
    t.set(4, zero_digest(RS))  # present, all zeros
    t.save(9)
    names = sorted(os.listdir(tmp_path / "m"))
    assert len(names) == 1 + 3 + 3  # the index, three groups, three pages
    assert sum(os.path.getsize(tmp_path / "m" / n) for n in names) < 20_000
    t = reopen(tmp_path / "m")
    assert [t.digest(r) for r in far] == [digest(r) for r in far]
    assert t.present(4) and t.is_zero(4) and not t.present(5)
    assert t.present_count() == 5 and t.zero_count() == HUGE.count - 4
    assert list(t.iter_present()) == [0, 3, 4, HUGE.count // 2, HUGE.count - 1]
    assert t.discard(HUGE.count // 2) and not t.discard(HUGE.count // 2 + 1)
    t.save(10)
    assert not (tmp_path / "m" / f"pg-{HUGE.count // 2 // PAGE_REGIONS:08d}.bin").exists()  # emptied: gone
    t = reopen(tmp_path / "m")
    assert t.present_count() == 4 and t.is_zero(HUGE.count // 2)


@pytest.mark.parametrize("damage", ["missing", "torn", "stale"])
def test_a_listed_page_that_is_lost_torn_or_stale_is_refused_naming_it(tmp_path: Path, damage: str) -> None:
    t = table(tmp_path / "m")
    t.create()
    t.set(7, digest(1))
    t.save(1)
    page = tmp_path / "m" / "pg-00000000.bin"
    old = page.read_bytes()
    t.set(8, digest(2))
    t.save(2)
    if damage == "missing":
        page.unlink()
    elif damage == "torn":
        page.write_bytes(page.read_bytes()[:-5])
    else:
        page.write_bytes(old)  # a copy from an earlier generation
    t = reopen(tmp_path / "m")
    with pytest.raises(CorruptStateFile, match=str(page)):
        t.digest(7)


def test_a_lost_group_or_index_is_refused(tmp_path: Path) -> None:
    t = table(tmp_path / "m")
    t.create()
    t.set(GROUP_PAGES * PAGE_REGIONS + 1, digest(1))
    t.save(1)
    (tmp_path / "m" / "group-000001.bin").unlink()
    with pytest.raises(CorruptStateFile, match="group-000001.bin.*missing"):
        reopen(tmp_path / "m")
    (tmp_path / "m" / "index.bin").unlink()
    with pytest.raises(CorruptStateFile, match="index is missing"):
        reopen(tmp_path / "m")


@pytest.mark.parametrize("writes_before_crash", [1, 2, 3, 4])
def test_a_save_interrupted_before_its_index_is_settled_with_exact_counts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes_before_crash: int) -> None:
    t = table(tmp_path / "m")
    t.create()
    t.set(1, digest(1))
    t.set(PAGE_REGIONS * 5, digest(2))
    t.save(1)
    # The next save changes one existing page, empties another and creates one in a new group:
    # files group-000000, group-000002, pg-00000000, pg-<new> then index.bin.
    t.set(2, digest(3))
    t.discard(PAGE_REGIONS * 5)
    t.set(GROUP_PAGES * PAGE_REGIONS * 2, digest(4))
    real, done = tables._rename, []

    def crashing(tmp: str, path: str) -> None:  # the files that became visible before the crash
        if len(done) == writes_before_crash:
            raise OSError("crash")
        done.append(path)
        real(tmp, path)

    monkeypatch.setattr(tables, "_rename", crashing)
    with pytest.raises(StateError):
        t.save(2)
    monkeypatch.setattr(tables, "_rename", real)
    # Whatever reached the disk is taken, and the counts say exactly what the pages hold; a
    # read-only look (describe_root) sees the same and writes nothing.
    before = sorted(os.listdir(tmp_path / "m"))
    looked = reopen(tmp_path / "m", writable=False)
    assert sorted(os.listdir(tmp_path / "m")) == before
    t = reopen(tmp_path / "m")
    present = list(t.iter_present())
    assert 1 in present and list(looked.iter_present()) == present
    assert t.present_count() == looked.present_count() == len(present)
    assert t.zero_count() == looked.zero_count() == HUGE.count - len(present)
    # The next saves and opens agree (no generation is mistaken for a stale copy).
    t.set(3, digest(5))
    t.save(3)
    t = reopen(tmp_path / "m")
    assert t.digest(3) == digest(5) and t.present_count() == len(present) + 1
    t.set(GROUP_PAGES * PAGE_REGIONS * 2 + 1, digest(6))
    t.save(4)
    t = reopen(tmp_path / "m")
    assert t.digest(GROUP_PAGES * PAGE_REGIONS * 2 + 1) == digest(6)


def test_memory_is_bounded_when_many_pages_are_touched(tmp_path: Path) -> None:
    t = table(tmp_path / "m")
    t.create()
    regions = [page * PAGE_REGIONS + 17 for page in range(0, HUGE.count // PAGE_REGIONS, 97)]
    for region in regions:
        t.set(region, digest(region))
        assert len(t._dirty) < tables.MAX_DIRTY_PAGES and len(t._clean) <= tables.CACHE_PAGES
    t.save(1)
    t = reopen(tmp_path / "m")
    assert all(t.digest(r) == digest(r) for r in regions)
    assert len(t._clean) <= tables.CACHE_PAGES
    assert t.present_count() == len(regions)


def test_fill_from_writes_only_pages_holding_data(tmp_path: Path) -> None:
    geometry = Geometry(3 * PAGE_REGIONS * RS + 1000, RS)  # a partial last region
    manifest = bytearray(zero_digest(RS) * (geometry.count - 1) + zero_digest(1000))
    data = {5: digest(5), 2 * PAGE_REGIONS + 1: digest(9), geometry.count - 1: digest(10)}
    for region, value in data.items():
        manifest[32 * region:32 * region + 32] = value
    position = 0

    def read(n: int) -> bytes:
        nonlocal position
        position += n
        return bytes(manifest[position - n:position])

    t = table(tmp_path / "m", geometry)
    t.fill_from(read)
    assert sorted(n for n in os.listdir(tmp_path / "m") if n.startswith("pg-")) == \
        ["pg-00000000.bin", "pg-00000002.bin", "pg-00000003.bin"]
    t = reopen(tmp_path / "m", geometry)
    assert b"".join(t.digests_of_page(p) for p in range(t.page_count)) == manifest
    assert t.zero_count() == geometry.count - 3 and list(t.iter_present()) == sorted(data)


def write_format_1(directory: Path, geometry: Geometry, lazy: bool, slots: dict[int, bytes],
                   magic: bytes = MAGIC) -> None:
    """A table as drtool wrote it before format 2 (eager: every page written at creation)."""
    directory.mkdir()
    pages = range((geometry.count + PAGE_REGIONS - 1) // PAGE_REGIONS)
    for page in pages:
        regions = min(PAGE_REGIONS, geometry.count - page * PAGE_REGIONS)
        body = bytearray(PAGE_REGIONS // 8 + 32 * regions)
        mine = {r - page * PAGE_REGIONS: d for r, d in slots.items() if r // PAGE_REGIONS == page}
        if lazy and not mine:
            continue
        for index, value in mine.items():
            body[index >> 3] |= 1 << (index & 7)
            body[PAGE_REGIONS // 8 + 32 * index:PAGE_REGIONS // 8 + 32 * index + 32] = value
        header = mapfile.MapHeader(magic, 1, RS, regions, 0, 0, VID)
        mapfile.save(str(directory / f"page-{page:08d}.bin"), header, body)


@pytest.mark.parametrize("lazy", [False, True])
def test_format_1_is_converted_by_the_server_and_refused_read_only(tmp_path: Path, lazy: bool) -> None:
    geometry = Geometry(3 * PAGE_REGIONS * RS, RS)
    slots = {1: digest(1), 2: NO_DIGEST, 2 * PAGE_REGIONS + 9: digest(2)}
    directory = tmp_path / "root" / "vol" / "manifest"
    directory.parent.mkdir(parents=True)
    write_format_1(directory, geometry, lazy, slots)
    with pytest.raises(StateError, match=f"format 1.*drtool serve --root {tmp_path / 'root'}"):
        reopen(directory, geometry, writable=False, lazy=lazy)
    t = reopen(directory, geometry, lazy=lazy)
    assert not [n for n in os.listdir(directory) if n.startswith("page-")]
    for t in (t, reopen(directory, geometry, writable=False, lazy=lazy)):
        assert t.digest(1) == digest(1) and t.present(2) and t.is_zero(2)
        assert t.digest(2 * PAGE_REGIONS + 9) == digest(2)
        assert t.present_count() == 3 and t.zero_count() == geometry.count - 2
        assert sorted(n for n in os.listdir(directory) if n.startswith("pg-")) == \
            ["pg-00000000.bin", "pg-00000002.bin"]


def test_format_1_eager_table_with_a_lost_page_is_refused(tmp_path: Path) -> None:
    geometry = Geometry(3 * PAGE_REGIONS * RS, RS)
    write_format_1(tmp_path / "m", geometry, False, {1: digest(1)})
    (tmp_path / "m" / "page-00000001.bin").unlink()
    with pytest.raises(CorruptStateFile, match="page-00000001.bin"):
        reopen(tmp_path / "m", geometry)


def test_journal_changes_take_runs_of_the_whole_volume_without_expanding_them(tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "j"), HUGE, VID.hex())
    journal.create()
    journal.open()
    for seq, region in enumerate([5, HUGE.count - 1, 77], 1):
        journal._add(1, seq, region, 100 * seq, 100)
    assert [e.seq for e in journal.changes(0, [(0, HUGE.count)])] == [1, 2, 3]
    assert [e.seq for e in journal.changes(1, [(70, 10), (HUGE.count - 1, 1)])] == [2, 3]
    assert journal.changes(0, [(6, 70)]) == []


def test_a_format_1_replica_is_served_after_the_server_converts_it(start_server, tmp_path: Path) -> None:
    from drtool.replica.store import describe_root
    from tests.replica.conftest import VOLUME_ID, write

    geometry = Geometry(3 * PAGE_REGIONS * RS, RS)
    far = 2 * PAGE_REGIONS + 9
    old, new, other = b"o" * RS, b"n" * RS, b"x" * RS
    server = start_server(root=tmp_path / "root")
    with server.client() as c:
        c.ensure_volume("vol", geometry.size, RS, VOLUME_ID)
        c.send_records("vol", write(1, RS, old) + write(2, far * RS, other))
        c.create_snapshot("vol", "s")
        c.send_records("vol", write(3, RS, new))
    server.stop()
    # Rewrite its tables as drtool wrote them before format 2.
    hashed = {data: blake3.blake3(data).digest() for data in (old, new, other)}
    replica = tmp_path / "root" / "vol"
    for directory, magic, slots in ((replica / "manifest", MAGIC, {1: hashed[new], far: hashed[other]}),
                                    (replica / "snapshots" / "s" / "preserved", b"DRTRSNP\0", {1: hashed[old]}),
                                    (replica / "overlay", b"DRTROVL\0", {})):
        for name in os.listdir(directory):
            os.unlink(directory / name)
        directory.rmdir()
        write_format_1(directory, geometry, magic != MAGIC, slots, magic)
    with pytest.raises(StateError, match=f"drtool serve --root {tmp_path / 'root'}"):
        describe_root(str(tmp_path / "root"))

    server.start()
    with server.client() as c:
        info = c.volume_info("vol")
        assert info["zero_regions"] == geometry.count - 2 and info["applied_seq"] == 3
        expected = {1: hashed[new], far: hashed[other], 2: zero_digest(RS)}
        results = list(c.read_regions("vol", [(1, 2), (far, 1)], expected=expected.get))
        assert all(r.ok for r in results) and bytes(results[0].data) == new
        [snapshot] = c.list_snapshots("vol")
        assert snapshot["preserved_regions"] == 1
        assert c.read_range("vol", RS, RS, snapshot="s") == old
        c.send_records("vol", write(4, 5 * RS, other))
    server.stop()
    assert [d["zero_regions"] for d in describe_root(str(tmp_path / "root"))] == [geometry.count - 3]
    for directory in (replica / "manifest", replica / "overlay", replica / "snapshots" / "s" / "preserved"):
        assert "index.bin" in os.listdir(directory)
        assert not [n for n in os.listdir(directory) if n.startswith("page-")]


def test_journal_index_keeps_each_seq_once_and_follows_trims_and_reopens(tmp_path: Path) -> None:
    from drtool import wire

    geometry = Geometry(1 << 30, RS)
    journal = Journal(str(tmp_path / "j"), geometry, VID.hex(), limit=3 << 20)
    journal.create()
    journal.open()

    def batch(seqs: list[int]) -> None:
        chunks = [b"".join(wire.encode_record(wire.KIND_WRITE, s, (s % 50) * RS, bytes([s % 256]) * RS))
                  for s in seqs]
        journal.append([(s, s % 50, len(c)) for s, c in zip(seqs, chunks)], [memoryview(c) for c in chunks])

    for first in range(1, 81, 8):
        batch(list(range(first, first + 8)))
    batch([80, 79])  # a batch resent after a crash: already there, indexed once
    batch([85, 81])  # out of order
    assert journal.base_seq > 0
    kept = [s for s in [*range(1, 82), 85] if s > journal.base_seq]
    for opened in (journal, Journal(str(tmp_path / "j"), geometry, VID.hex(), limit=3 << 20)):
        if opened is not journal:
            opened.open()
        assert opened.records == len(kept) and opened.range() == (kept[0], 85)
        assert [e.seq for e in opened.changes(journal.base_seq, [(0, geometry.count)])] == kept
        assert [e.seq for e in opened.changes(80, [(30, 2)])] == [81]
        entry = opened.changes(84, [(35, 1)])[0]
        assert wire.decode_record_header(opened.read(entry)[:wire.RECORD_HEADER_SIZE]).seq == 85


def test_a_manifest_stores_no_page_for_regions_of_zeros(tmp_path: Path) -> None:
    t = DigestTable(str(tmp_path / "m"), MAGIC, "manifest", HUGE, VID, lazy=False, presence=False)
    t.create()
    for region in range(0, HUGE.count, HUGE.count // 1000):  # an initial sync's ZERO records
        t.set(region, zero_digest(RS))
    t.save(1)
    assert os.listdir(tmp_path / "m") == ["index.bin"]
    t.set(5, digest(5))
    t.set(6, digest(6))
    t.save(2)
    t.set(5, zero_digest(RS))
    t.save(3)
    t = DigestTable(str(tmp_path / "m"), MAGIC, "manifest", HUGE, VID, lazy=False, presence=False)
    t.check(writable=True)
    assert t.is_zero(5) and t.digest(6) == digest(6) and t.zero_count() == HUGE.count - 1
    t.set(6, zero_digest(RS))
    t.save(4)
    assert not (tmp_path / "m" / "pg-00000000.bin").exists() and t.zero_count() == HUGE.count
