"""Applying a batch of records to a replica: verify all, then apply idempotently.

A mirror batch is durable once (the journal is the mirror's write-ahead log,
as a database's WAL): verify every record -> copy-on-write into the snapshots
-> append the records, exactly as received, to the journal and fdatasync it,
while the same bytes go to the mirror's image, not flushed (block-aligned runs
through O_DIRECT on a disk's file system, the rest through the page cache with
its writeback started) -> set the digests in memory -> respond.
The image, the digests and the applied state are made durable together by a
checkpoint (ReplicaVolume.checkpoint) once a journal segment's worth was
appended, and at close; after a crash, opening the replica replays every
record past the last checkpoint into the image (replay_journal), so what was
acknowledged survives, and a torn tail (never acknowledged) is cut.

Without a journal (limit 0), and for the overlay replica, the image itself is
written and flushed, then the digests and the applied state are saved, before
the answer.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import blake3

from drtool.errors import Conflict, UsageError
from drtool.replica.journal import JournalDamage, iter_segment
from drtool.replica.volume import ReplicaVolume, Target
from drtool.storage.device import Device
from drtool.storage.direct import BLOCK, aligned
from drtool.wire import (KIND_BASE, KIND_FROM_OVERLAY, KIND_WRITE, RecordHeader, WireError, encode_record_header, iter_records,
                         zero_digest)

PROMOTED_REFUSES_RECORDS = "it accepts no records (its image is a primary volume now)"
_IOV_MAX = 1024
_IMAGE_WRITERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="drtool-apply")


@dataclass(frozen=True)
class Record:
    header: RecordHeader
    data: memoryview
    position: int  # of the record (header and data, exactly as received) in the body
    region: int
    encoded: bytes | None = None  # the header as applied, when it is not the one received


@dataclass(frozen=True)
class Batch:
    body: memoryview
    records: list[Record]

    def raw(self, records: list[Record]) -> list[memoryview]:
        """The bytes of ``records`` as applied (as received, adjacent records joined: one write
        for a whole batch; an overlay copy as the WRITE record it became)."""
        chunks: list[memoryview] = []
        start = end = -1
        for record in records:
            if record.encoded is not None:
                if end > start:
                    chunks.append(self.body[start:end])
                start = end = -1
                chunks += [memoryview(record.encoded), record.data]
                continue
            if record.position != end:
                if end > start:
                    chunks.append(self.body[start:end])
                start = record.position
            end = record.position + record.header.total_size
        if end > start:
            chunks.append(self.body[start:end])
        return chunks


def parse_batch(volume: ReplicaVolume, body: memoryview, overlay: bool, max_records: int) -> Batch:
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
            if header.kind == KIND_BASE and not (overlay and geometry.is_whole_region(header.offset, header.length)):
                raise UsageError(f"record {index} (seq {header.seq}) names a region's base: it must cover a "
                                 "whole region, sent to the overlay replica")
            if header.kind == KIND_FROM_OVERLAY and (overlay or not geometry.is_whole_region(header.offset,
                                                                                             header.length)):
                raise UsageError(f"record {index} (seq {header.seq}) copies from the overlay replica: it must be "
                                 "a whole region, sent to the mirror")
            records.append(Record(header, data, position, region))
            position += header.total_size
    except WireError as exc:
        raise UsageError(f"malformed record body: {exc}") from None
    return Batch(body, records)


@dataclass
class Plan:
    """What applying a batch will do, decided and checked before anything is written."""

    volume: ReplicaVolume
    batch: Batch
    overlay: bool
    complete_through: int | None
    todo: list[Record]  # the records not applied yet, overlay copies resolved
    # KIND_BASE records' regions the overlay replica lacks: {region: (digest, the mirror's bytes,
    # checked against it; None: zeros)}, filled by prepare(), whose digest they keep unless a
    # record of the batch changes them (finish())
    bases: dict[int, tuple[bytes, bytes | None]] = field(default_factory=dict)

    @property
    def target(self) -> Target:
        return self.volume.overlay if self.overlay else self.volume.mirror

    @property
    def behind(self) -> bool:
        """The journal makes it durable and the image is written behind (mirror with a journal)."""
        return not self.overlay and not self.volume.journal.disabled


def plan_batch(volume: ReplicaVolume, batch: Batch, complete_through: int | None, overlay: bool) -> Plan:
    """Check the batch against the replica and pick the records to apply; nothing is written, so
    a refusal here leaves everything as it was.  Call with the exclusive lock held."""
    records = batch.records
    target = volume.overlay if overlay else volume.mirror
    volume.refuse_if_promoted(PROMOTED_REFUSES_RECORDS)
    if complete_through is not None:
        _check_complete_through(volume, records, complete_through)
    todo: list[Record] = []
    seen: set[int] = set()
    for record in records:
        if not target.applied.has(record.header.seq) and record.header.seq not in seen:
            seen.add(record.header.seq)
            todo.append(record)
    if todo or (complete_through or 0) > target.applied.watermark:
        volume.check_accepts_records()  # a resent, already applied batch is still acknowledged
    if todo:
        todo = _resolve_overlay_copies(volume, todo)  # before anything is written: all or nothing
    return Plan(volume, batch, overlay, complete_through, todo, _check_bases(volume, todo) if overlay else {})


def _check_bases(volume: ReplicaVolume, todo: list[Record]) -> dict[int, tuple[bytes, bytes | None]]:
    """The KIND_BASE records of regions the overlay replica lacks, each checked against the
    mirror's bytes before anything is written: the primary's block writes go over exactly those
    bytes, so a mirror that is behind it or damaged refuses the batch (Conflict) instead of
    filling the overlay replica with stale bytes.  A region's first record decides (a base
    record after another record of its region in the batch is moot)."""
    overlay, mirror, geometry = volume.overlay, volume.mirror, volume.geometry
    assert mirror.image is not None
    bases: dict[int, tuple[bytes, bytes | None]] = {}
    seen: set[int] = set()
    for record in todo:
        region, header = record.region, record.header
        if region in seen:
            continue
        seen.add(region)
        if header.kind != KIND_BASE or overlay.table.present(region):
            continue
        offset, length = geometry.region_bounds(region)
        data = None if mirror.table.is_zero(region) else mirror.image.pread(length, offset)
        held = zero_digest(length) if data is None else blake3.blake3(data).digest()
        if held != header.digest:
            raise Conflict(f"record seq {header.seq}: the mirror's region {region} is not the base the "
                           "primary's block writes go over (its digest differs); send the region whole")
        bases[region] = (held, data)
    return bases


def prepare(plan: Plan) -> None:
    """What must precede any write of the image: the snapshots' copy-on-write (mirror), the
    mirror's bytes under a partial overlay record (overlay)."""
    if plan.overlay:
        _fill_overlay(plan.volume, plan.todo, plan.bases)
    else:
        plan.volume.snapshots.preserve({r.region for r in plan.todo}, plan.volume.mirror.image,
                                       plan.volume.mirror.table)


def append_journal(plan: Plan) -> None:
    """Append the plan's records, exactly as received, to the mirror's journal, durably."""
    plan.volume.journal.append([(r.header.seq, r.region, r.header.total_size) for r in plan.todo],
                               plan.batch.raw(plan.todo))


def write_behind(plan: Plan) -> dict[int, bytes | None]:
    return _write_behind(plan.volume, plan.target, plan.todo)


def write_durably(plan: Plan) -> dict[int, bytes | None]:
    return _write_durably(plan.volume, plan.target, plan.todo)


def finish(plan: Plan, final: dict[int, bytes | None]) -> dict[str, Any]:
    """After the records are durable and in the image: digests, the applied state, a checkpoint
    when the journal has grown a segment's worth; the answer for the primary."""
    volume, target, todo, overlay = plan.volume, plan.target, plan.todo, plan.overlay
    complete_through = plan.complete_through
    for region, (digest, _data) in plan.bases.items():
        final.setdefault(region, digest)  # filled from the mirror, and no record of the batch changed it
    if todo:
        _set_digests(volume, target, final)
        if not plan.behind:
            target.table.save(target.applied.watermark)
        if not overlay:
            _supersede_overlay(volume, {r.region for r in todo})
    applied = target.applied
    before = (applied.watermark, frozenset(applied.ahead))
    if todo:
        applied.note_batch(len(todo), max(r.header.era for r in todo), time.time())
    applied.mark([r.header.seq for r in todo])  # (base records too: applied, nothing of theirs written)
    marked = applied.watermark
    if complete_through is not None:
        applied.complete_through(complete_through)
    changed = (applied.watermark, frozenset(applied.ahead)) != before
    if overlay or volume.journal.disabled:
        if todo or changed:
            applied.save()
    elif applied.watermark > marked:
        # Complete-Through moved the watermark over seqs no record carries: the journal cannot
        # say so after a crash, the applied state does (the records are in the journal).
        applied.save()
    if not overlay and volume.journal.since_checkpoint() >= volume.journal.segment_limit:
        volume.checkpoint()
    return {"applied_seq": target.applied.watermark, "applied": len(todo),
            "skipped": len(plan.batch.records) - len(todo)}


def apply_batch(volume: ReplicaVolume, batch: Batch, complete_through: int | None,
                overlay: bool) -> dict[str, Any]:
    with volume.lock.exclusive():
        plan = plan_batch(volume, batch, complete_through, overlay)
        final: dict[int, bytes | None] = {}
        if plan.todo:
            prepare(plan)
            if plan.behind:
                # The journal is the durable copy; the image is written beside it (one wait).
                written = _IMAGE_WRITERS.submit(write_behind, plan)
                try:
                    append_journal(plan)
                finally:
                    final = written.result()
            else:
                final = write_durably(plan)
        return finish(plan, final)


def _resolve_overlay_copies(volume: ReplicaVolume, todo: list[Record]) -> list[Record]:
    """Each KIND_FROM_OVERLAY record as the WRITE record it stands for, its bytes read from the
    overlay replica and checked against the digest it names; Conflict when the overlay replica
    does not hold them (the primary then sends the bytes)."""
    if not any(r.header.kind == KIND_FROM_OVERLAY for r in todo):
        return todo
    overlay = volume.overlay
    assert overlay.image is not None
    resolved: list[Record] = []
    for record in todo:
        header = record.header
        if header.kind != KIND_FROM_OVERLAY:
            resolved.append(record)
            continue
        data = None
        if overlay.table.present(record.region) and overlay.table.digest(record.region) == header.digest:
            data = overlay.image.pread(header.length, header.offset)
            if blake3.blake3(data).digest() != header.digest:
                data = None
        if data is None:
            raise Conflict(f"record seq {header.seq}: the overlay replica does not hold region {record.region} "
                           "with the digest the record names; send the region's bytes")
        write = replace(header, kind=KIND_WRITE)
        encoded = encode_record_header(KIND_WRITE, header.seq, header.offset, header.length, header.era,
                                       header.digest, header.flags, header.written)
        resolved.append(Record(write, memoryview(data), record.position, record.region, encoded))
    return resolved


def _check_complete_through(volume: ReplicaVolume, records: list[Record], through: int) -> None:
    """Refuse a Complete-Through beyond every sequence number this replica has seen.

    It vouches that nothing up to ``through`` is missing; a record the primary really
    sent or dropped is below a record it sent since (in this batch, or applied before:
    mirror and overlay share one sequence space).  One beyond them all would make the
    watermark skip records not yet written, each acknowledged and never applied.
    """
    reach = max(max((r.header.seq for r in records), default=0),
                volume.mirror.applied.highest, volume.overlay.applied.highest)
    if through > reach:
        raise UsageError(f"X-Drtool-Complete-Through {through} is beyond the highest sequence number "
                         f"sent in this batch or applied here ({reach}): it would skip records never received")


def _supersede_overlay(volume: ReplicaVolume, regions: set[int]) -> None:
    """A mirror record is newer than any overlay record of its region (the primary ships each
    region's records in sequence order, and once back in normal mode, after failback, it logs
    every incident-time region again as an ordinary record), so the overlay replica's copy of
    that region is stale from now on: forget it, or a later promote would merge it over newer bytes."""
    table = volume.overlay.table
    dropped = [region for region in regions if table.present(region)]
    if dropped:
        image = volume.overlay.image
        for region in dropped:
            table.discard(region)
            if image is not None:  # give the space back; the bytes are never read again
                image.punch_hole(*volume.geometry.region_bounds(region))
        table.save(volume.overlay.applied.watermark)


def _set_digests(volume: ReplicaVolume, target: Target, final: dict[int, bytes | None]) -> None:
    """Each touched region's digest: the whole record's, or (None) a hash of what it now holds."""
    for region, digest in final.items():
        if digest is None:  # a partial record: the region's digest is whatever it now holds
            offset, length = volume.geometry.region_bounds(region)
            assert target.image is not None
            digest = blake3.blake3(target.image.pread(length, offset)).digest()
        target.table.set(region, digest)


def replay_journal(volume: ReplicaVolume) -> int:
    """Write every journal record past the mirror's checkpoint into the mirror (in journal
    order, the order they were applied); return how many.  A record that fails its checks at
    the end of the last segment is a torn append (never acknowledged): the segment is cut
    there.  The caller checkpoints afterwards."""
    journal, mirror, geometry = volume.journal, volume.mirror, volume.geometry
    journal.checkpoint = mirror.applied.journal_at
    if journal.disabled or journal.checkpoint is None:
        return 0
    replayed = 0
    for segment, start, raw in list(journal.after_checkpoint()):
        records: list[Record] = []
        torn: int | None = None
        try:
            for position, header, data in iter_segment(raw, start):
                end = header.offset + header.length
                region = geometry.region_of(header.offset)
                if end > geometry.size or geometry.region_of(end - 1) != region or header.overlay:
                    raise JournalDamage(f"record seq {header.seq} at {header.offset}+{header.length} does not "
                                        "fit the mirror", position)
                records.append(Record(header, data, position, region))
        except JournalDamage as exc:
            torn = exc.position
        if records:
            _set_digests(volume, mirror, _write(volume, mirror, records))
            fresh = [r for r in records if not mirror.applied.has(r.header.seq)]
            if fresh:
                mirror.applied.note_batch(len(fresh), max(r.header.era for r in fresh),
                                          mirror.applied.last_record_at or time.time())
            mirror.applied.mark([r.header.seq for r in records])
            replayed += len(records)
        if torn is not None:
            journal.cut(segment, start + torn)  # refuses anything but the journal's tail
            break
    if replayed:
        print(f"drtool-replica: {volume.name}: replayed {replayed} journal records into the mirror "
              "(written after its last checkpoint)", file=sys.stderr)
    return replayed


def _write_behind(volume: ReplicaVolume, target: Target, todo: list[Record]) -> dict[int, bytes | None]:
    """Write the image behind the journal, which is what makes the batch durable: block-aligned
    runs bypass the page cache where that saves work (drtool.storage.direct), the rest goes
    through it with its writeback started; the checkpoint's flush then waits for little."""
    final = _write(volume, target, todo, target.direct())
    assert target.image is not None
    start = min(r.header.offset for r in todo)
    target.image.start_writeback(start, max(r.header.offset + r.header.length for r in todo) - start)
    return final


def _write_durably(volume: ReplicaVolume, target: Target, todo: list[Record]) -> dict[int, bytes | None]:
    """Write the image (block-aligned runs through O_DIRECT where that saves work) and flush it."""
    final = _write(volume, target, todo, target.direct())
    assert target.image is not None
    target.image.sync()
    return final


def _write(volume: ReplicaVolume, target: Target, todo: list[Record],
           direct: int | None = None) -> dict[int, bytes | None]:
    """Write the records in order; return each touched region's new digest, None = hash it.

    A whole-region record's digest was verified against its data: it is the
    region's digest, nothing is hashed again.  Records that follow each other on
    the volume go out in one pwritev.
    """
    geometry = volume.geometry
    image = target.image
    assert image is not None
    final: dict[int, bytes | None] = {}
    run: list[memoryview] = []
    run_start = run_end = -1
    for record in todo:
        header = record.header
        if header.kind == KIND_BASE:
            continue  # (its region was filled from the mirror before: _fill_overlay)
        whole = geometry.is_whole_region(header.offset, header.length)
        is_zero = header.kind != KIND_WRITE or (whole and header.digest == zero_digest(header.length))
        if is_zero or header.offset != run_end:
            _write_run(image, run, run_start, direct)
            run, run_start, run_end = [], header.offset, header.offset
        if is_zero:
            # A hole keeps the replica sparse; where punching is unsupported, write zeros.
            if not (whole and image.punch_hole(header.offset, header.length)):
                image.pwrite(bytes(header.length), header.offset)
            run_end = -1
        else:
            run.append(record.data)
            run_end += header.length
        if whole:
            final[record.region] = zero_digest(header.length) if is_zero else header.digest
        else:
            final[record.region] = None
    _write_run(image, run, run_start, direct)
    return final


def _write_run(image: Device, views: list[memoryview], offset: int, direct: int | None = None) -> None:
    """Write adjacent pieces at ``offset`` with as few pwritev calls as IOV_MAX allows (through
    the O_DIRECT descriptor ``direct``, copied into an aligned buffer, when the run is
    block-aligned)."""
    size = sum(len(v) for v in views)
    if direct is not None and size and not offset % BLOCK and not size % BLOCK:
        with aligned(size) as buffer:
            at = 0
            for view in views:
                buffer[at:at + len(view)] = view
                at += len(view)
            try:
                done = 0
                while done < size:
                    done += os.pwrite(direct, buffer[done:size], offset + done)
                return
            except OSError:
                pass  # the buffered path below writes it again, and names an error with its range
    for first in range(0, len(views), _IOV_MAX):
        group = views[first:first + _IOV_MAX]
        size = sum(len(v) for v in group)
        try:
            done = os.pwritev(image.fd, group, offset)
        except OSError:
            done = 0  # let pwrite below report the error with its range
        if done < size:  # short or failed: finish piece by piece (Device.pwrite retries and names errors)
            position = offset
            for view in group:
                skip = min(max(done - (position - offset), 0), len(view))
                if skip < len(view):
                    image.pwrite(view[skip:], position + skip)
                position += len(view)
        offset += size


def _fill_overlay(volume: ReplicaVolume, todo: list[Record],
                  bases: dict[int, tuple[bytes, bytes | None]] | None = None) -> None:
    """A partial record into a region the overlay lacks starts from the mirror's bytes.

    The primary fills a partial overlay region from its merged read before
    writing it; the mirror holds that content, so the overlay replica does the same.
    A region a KIND_BASE record names is filled with the mirror's bytes checked against it
    (``bases``, _check_bases).
    """
    overlay = volume.overlay
    assert overlay.image is not None and volume.mirror.image is not None
    filled: set[int] = set()
    for record in todo:
        region = record.region
        if region in filled or overlay.table.present(region):
            continue
        filled.add(region)
        offset, length = volume.geometry.region_bounds(region)
        if bases and region in bases:
            data = bases[region][1]
            if data is None:
                overlay.image.punch_hole(offset, length)
            else:
                overlay.image.pwrite(data, offset)
            continue
        if volume.geometry.is_whole_region(record.header.offset, record.header.length):
            continue
        if volume.mirror.table.is_zero(region):
            overlay.image.punch_hole(offset, length)
        else:
            overlay.image.pwrite(volume.mirror.image.pread(length, offset), offset)
