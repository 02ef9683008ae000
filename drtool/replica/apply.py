"""Applying a batch of records to a replica: verify all, then apply idempotently.

Order of a batch, chosen so a crash at any point loses nothing acknowledged
and a resent batch converges: verify every record -> copy-on-write into the
snapshots -> write the image -> fsync it -> journal -> save the digests ->
save the applied state (the acknowledgement's truth) -> respond.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import blake3

from drtool.errors import UsageError
from drtool.replica.volume import ReplicaVolume, Target
from drtool.wire import KIND_WRITE, RecordHeader, WireError, iter_records, zero_digest


PROMOTED_REFUSES_RECORDS = "it accepts no records (its image is a primary volume now)"


@dataclass(frozen=True)
class Record:
    header: RecordHeader
    data: memoryview
    raw: memoryview  # header and data exactly as received (what the journal stores)
    region: int


def parse_batch(volume: ReplicaVolume, body: memoryview, overlay: bool, max_records: int) -> list[Record]:
    """Every record of the body, each checked; UsageError names the first bad one."""
    geometry = volume.geometry
    records: list[Record] = []
    position = 0
    try:
        for header, data in iter_records(body):
            index = len(records)
            if index >= max_records:
                raise UsageError(f"batch has more than {max_records} records")
            if header.overlay != overlay:
                where = "the overlay replica" if overlay else "the mirror"
                raise UsageError(f"record {index} (seq {header.seq}) is "
                                 f"{'not ' if overlay else ''}flagged OVERLAY but was sent to {where}")
            end = header.offset + header.length
            if end > geometry.size:
                raise UsageError(f"record {index} (seq {header.seq}) covers {header.offset}+{header.length}, "
                                 f"past the end of the volume ({geometry.size} bytes)")
            region = geometry.region_of(header.offset)
            if geometry.region_of(end - 1) != region:
                raise UsageError(f"record {index} (seq {header.seq}) at {header.offset}+{header.length} "
                                 f"crosses a region boundary (region size {geometry.region_size})")
            raw = body[position:position + header.total_size]
            records.append(Record(header, data, raw, region))
            position += header.total_size
    except WireError as exc:
        raise UsageError(f"malformed record body: {exc}") from None
    return records


def apply_batch(volume: ReplicaVolume, records: list[Record], complete_through: int | None,
                overlay: bool) -> dict[str, Any]:
    target = volume.overlay if overlay else volume.mirror
    with volume.lock.exclusive():
        volume.refuse_if_promoted(PROMOTED_REFUSES_RECORDS)
        todo: list[Record] = []
        seen: set[int] = set()
        for record in records:
            if not target.applied.has(record.header.seq) and record.header.seq not in seen:
                seen.add(record.header.seq)
                todo.append(record)
        if todo or (complete_through or 0) > target.applied.watermark:
            volume.check_accepts_records()  # a resent, already applied batch is still acknowledged
        if todo:
            touched = {r.region for r in todo}
            if overlay:
                _fill_overlay(volume, todo)
            else:
                volume.snapshots.preserve(touched, volume.mirror.image, volume.mirror.table)
            final = _write(volume, target, todo)
            assert target.image is not None
            target.image.sync()
            if not overlay:
                volume.journal.append((r.header.seq, r.region, [r.raw]) for r in todo)
            for region in touched:
                digest = final.get(region)
                if digest is None:  # a partial record: the region's digest is whatever it now holds
                    offset, length = volume.geometry.region_bounds(region)
                    digest = blake3.blake3(target.image.pread(length, offset)).digest()
                target.table.set(region, digest)
            target.table.save(target.applied.watermark)
        before = (target.applied.watermark, frozenset(target.applied.ahead))
        if todo:
            target.applied.note_batch(len(todo), max(r.header.era for r in todo), time.time())
        target.applied.mark([r.header.seq for r in todo])
        if complete_through is not None:
            target.applied.complete_through(complete_through)
        if todo or (target.applied.watermark, frozenset(target.applied.ahead)) != before:
            target.applied.save()
        return {"applied_seq": target.applied.watermark, "applied": len(todo),
                "skipped": len(records) - len(todo)}


def _write(volume: ReplicaVolume, target: Target, todo: list[Record]) -> dict[int, bytes | None]:
    """Write the records in order; return each touched region's new digest, None = hash it."""
    geometry = volume.geometry
    image = target.image
    assert image is not None
    final: dict[int, bytes | None] = {}
    for record in todo:
        header = record.header
        whole = geometry.is_whole_region(header.offset, header.length)
        is_zero = header.kind != KIND_WRITE or (whole and header.digest == zero_digest(header.length))
        if is_zero:
            # A hole keeps the replica sparse; where punching is unsupported, write zeros.
            if not (whole and image.punch_hole(header.offset, header.length)):
                image.pwrite(bytes(header.length), header.offset)
        else:
            image.pwrite(record.data, header.offset)
        if whole:
            final[record.region] = zero_digest(header.length) if is_zero else header.digest
        else:
            final[record.region] = None
    return final


def _fill_overlay(volume: ReplicaVolume, todo: list[Record]) -> None:
    """A partial record into a region the overlay lacks starts from the mirror's bytes.

    The primary fills a partial overlay region from its merged read before
    writing it; the mirror holds that content, so the overlay replica does the same.
    """
    overlay = volume.overlay
    assert overlay.image is not None and volume.mirror.image is not None
    filled: set[int] = set()
    for record in todo:
        region = record.region
        if region in filled or overlay.table.present(region):
            continue
        filled.add(region)
        if volume.geometry.is_whole_region(record.header.offset, record.header.length):
            continue
        offset, length = volume.geometry.region_bounds(region)
        if volume.mirror.table.is_zero(region):
            overlay.image.punch_hole(offset, length)
        else:
            overlay.image.pwrite(volume.mirror.image.pread(length, offset), offset)
