"""The journal as the mirror's write-ahead log: a batch is durable once (appended to the journal
and fdatasync'ed); the image, its digests and the applied state follow at a checkpoint.  A crash
before the checkpoint loses the image's writes (simulated here by taking them away from the
image), never an acknowledged record: opening the replica replays them.  A torn tail is cut."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import blake3
import pytest

from drtool.replica.apply import apply_batch, parse_batch
from drtool.replica.store import ReplicaRoot, describe_root
from tests.replica.conftest import VOLUME_ID, write, zero

RS = 65536
REGIONS = 16
SIZE = REGIONS * RS


def send(volume, chunks: list[bytes], complete_through: int | None = None) -> dict:
    body = memoryview(bytearray(b"".join(chunks)))
    return apply_batch(volume, parse_batch(volume, body, False, 65536), complete_through, False)


def crash(root: ReplicaRoot, name: str = "vol") -> None:
    """The process dies: no checkpoint at close, and the image's writes since the last
    checkpoint are lost (as after a power cut), while the journal's were fdatasync'ed."""
    volume = root.get(name)
    volume._opened = False  # close() does nothing a kill -9 would not
    root.close()


def on_disk(path: Path) -> dict:
    """The mirror's applied state as saved (what a checkpoint committed)."""
    return json.loads((path / "vol" / "applied.json").read_text())


def test_an_acknowledged_batch_is_replayed_into_an_image_that_lost_it(tmp_path: Path) -> None:
    root = ReplicaRoot(str(tmp_path), journal_limit=256 << 20)
    _, volume = root.ensure("vol", SIZE, RS, VOLUME_ID)
    rng = random.Random(3)
    expect = bytearray(SIZE)
    chunks: list[bytes] = []
    # Whole regions, a partial record and a zero record: each kind goes through the replay.
    pieces = [(seq, seq * RS, rng.randbytes(RS)) for seq in range(1, 9)]
    for seq, offset, data in pieces:
        expect[offset:offset + len(data)] = data
        chunks += write(seq, offset, data)
    chunks += write(9, 2 * RS + 100, b"x" * 300)
    expect[2 * RS + 100:2 * RS + 400] = b"x" * 300
    chunks += zero(10, 5 * RS, RS)
    expect[5 * RS:6 * RS] = bytes(RS)
    assert send(volume, chunks, complete_through=10)["applied_seq"] == 10
    image = tmp_path / "vol" / "mirror.img"
    assert image.read_bytes() == expect  # written behind the journal (through the page cache)
    assert on_disk(tmp_path)["watermark"] == 0  # not checkpointed: durable in the journal only
    crash(root)
    # Read from the files (drtool status --replica-root): what the journal holds is applied.
    assert describe_root(str(tmp_path))[0]["applied_seq"] == 10
    with open(image, "r+b") as handle:  # the image's writes never reached the disk
        handle.truncate(0)
        handle.truncate(SIZE)

    root = ReplicaRoot(str(tmp_path), journal_limit=256 << 20)
    volume = root.get("vol")
    assert image.read_bytes() == expect
    info = volume.describe()
    assert info["applied_seq"] == 10 and info["journal"]["records"] == 10
    for region in range(REGIONS):
        assert volume.mirror.table.digest(region) == blake3.blake3(expect[region * RS:(region + 1) * RS]).digest()
    # The open checkpointed: the state on disk says so, and a resent batch is skipped.
    assert on_disk(tmp_path)["watermark"] == 10
    assert send(volume, chunks, complete_through=10) == {"applied_seq": 10, "applied": 0, "skipped": 10}
    root.close()


def test_a_torn_journal_tail_is_cut_and_what_precedes_it_kept(tmp_path: Path) -> None:
    root = ReplicaRoot(str(tmp_path), journal_limit=256 << 20)
    _, volume = root.ensure("vol", SIZE, RS, VOLUME_ID)
    data = random.Random(5).randbytes(2 * RS)
    send(volume, write(1, 0, data[:RS]) + write(2, RS, data[RS:]), complete_through=2)
    crash(root)
    segment = tmp_path / "vol" / "journal" / "segment-00000001.log"
    torn = b"".join(write(3, 2 * RS, b"t" * RS))
    with open(segment, "ab") as handle:  # an append the kill cut short: header whole, data half
        handle.write(torn[:len(torn) // 2])
    root = ReplicaRoot(str(tmp_path), journal_limit=256 << 20)
    volume = root.get("vol")
    info = volume.describe()
    assert info["applied_seq"] == 2 and info["journal"]["last_seq"] == 2
    assert (tmp_path / "vol" / "mirror.img").read_bytes()[:3 * RS] == data + bytes(RS)
    assert os.path.getsize(segment) == info["journal"]["bytes"]
    assert send(volume, write(3, 2 * RS, b"t" * RS))["applied"] == 1  # the primary resends it
    root.close()


def test_checkpoints_bound_what_a_replay_redoes_and_let_the_journal_trim(tmp_path: Path) -> None:
    # A 1 MiB limit: 1 MiB segments; every segment's worth appended is checkpointed.
    root = ReplicaRoot(str(tmp_path), journal_limit=1 << 20)
    _, volume = root.ensure("vol", SIZE, RS, VOLUME_ID)
    seq = 0
    for _ in range(3):
        chunks = []
        for region in range(REGIONS):
            seq += 1
            chunks += write(seq, region * RS, bytes([seq % 251]) * RS)
        send(volume, chunks, complete_through=seq)
    assert on_disk(tmp_path)["watermark"] == seq  # each 1 MiB batch filled a segment: checkpointed
    assert volume.journal.since_checkpoint() == 0
    info = volume.describe()["journal"]
    assert info["base_seq"] > 0 and info["bytes"] <= 2 << 20  # trimmed behind the checkpoint
    root.close()


def test_complete_through_over_a_gap_survives_a_crash(tmp_path: Path) -> None:
    root = ReplicaRoot(str(tmp_path), journal_limit=256 << 20)
    _, volume = root.ensure("vol", SIZE, RS, VOLUME_ID)
    # Seqs 1-4 were dropped by the primary (bitmap mode): 5 arrives vouching for all before it.
    assert send(volume, write(5, 0, b"z" * RS), complete_through=5)["applied_seq"] == 5
    crash(root)
    volume = ReplicaRoot(str(tmp_path), journal_limit=256 << 20).get("vol")
    assert volume.describe()["applied_seq"] == 5 and volume.describe()["applied_ahead"] == []


def test_a_journal_turned_off_is_replayed_first(tmp_path: Path) -> None:
    root = ReplicaRoot(str(tmp_path), journal_limit=256 << 20)
    _, volume = root.ensure("vol", SIZE, RS, VOLUME_ID)
    send(volume, write(1, 0, b"q" * RS), complete_through=1)
    crash(root)
    image = tmp_path / "vol" / "mirror.img"
    with open(image, "r+b") as handle:
        handle.truncate(0)
        handle.truncate(SIZE)
    root = ReplicaRoot(str(tmp_path), journal_limit=0)  # restarted without a journal
    volume = root.get("vol")
    assert image.read_bytes()[:RS] == b"q" * RS and volume.describe()["applied_seq"] == 1
    assert volume.describe()["journal"]["enabled"] is False
    send(volume, write(2, RS, b"r" * RS), complete_through=2)  # applied and flushed by itself
    crash(root)
    volume = ReplicaRoot(str(tmp_path), journal_limit=256 << 20).get("vol")
    assert volume.describe()["applied_seq"] == 2
    assert image.read_bytes()[:2 * RS] == b"q" * RS + b"r" * RS
