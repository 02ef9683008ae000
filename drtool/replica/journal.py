"""The journal of applied mirror records: the change-log replica.

Records are appended, exactly as received, to segment files.  The journal
keeps everything applied since its retention point ``base_seq``: when the
segments outgrow the size limit the oldest are deleted and ``base_seq`` rises
to the highest seq they held, so "changes after S" can be answered exactly
when S >= base_seq.  The in-memory index is rebuilt by scanning the segments
on start; a torn record at the very end (a crash during an unacknowledged
append) is cut off, anything else damaged is refused.

The index costs 28 bytes a retained record (arrays per segment) plus a bit per
sequence number in its span (which seqs it holds: a record appended again after
a crash is indexed once); nothing in it depends on the volume's size.

The journal is also the mirror's write-ahead log: a batch is durable once its
records are appended and fdatasync'ed here; the mirror's image, its digests and
its applied state are written behind it and made durable by a checkpoint
(drtool.replica.volume), which records the journal position ``checkpoint``
the mirror holds everything before.  Segments past that position are never
trimmed: after a crash they are replayed into the mirror when it is opened.

A limit of 0 turns the journal off (it doubles what an apply writes to disk;
the mirror is then written and flushed by every batch itself):
its segments are deleted, journal.json says ``disabled``, and every changes
request is answered 410.  Turned on again, it answers changes after the
highest sequence applied by then.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import blake3

from drtool.errors import CorruptStateFile, DataUnavailable, DeviceError
from drtool.regions import Geometry, Run, coalesce
from drtool.replica.jsonstate import load_json, save_json
from drtool.storage.atomic import fsync_dir
from drtool.storage.direct import BLOCK, aligned, direct_io_pays
from drtool.wire import KIND_WRITE, RECORD_HEADER_SIZE, RecordHeader, WireError, decode_record_header

DEFAULT_JOURNAL_LIMIT = 256 << 20


@dataclass(frozen=True, slots=True)
class Entry:
    seq: int
    region: int
    segment: int
    position: int
    size: int


class Journal:
    def __init__(self, directory: str, geometry: Geometry, volume_id: str,
                 limit: int = DEFAULT_JOURNAL_LIMIT) -> None:
        self.directory = directory
        self.geometry = geometry
        self.volume_id = volume_id
        self.limit = limit
        self.segment_limit = max(1 << 20, min(64 << 20, limit // 4))
        self.base_seq = 0
        self.disabled = False
        self._segment_sizes: dict[int, int] = {}
        self._index: dict[int, _SegmentIndex] = {}
        self._seen = bytearray()  # bit i: seq _seen_base + i is indexed
        self._seen_base = 0
        self.records = 0  # indexed (distinct) records
        self._first: int | None = None
        self._last: int | None = None
        # The position (segment, byte) before which the mirror holds every record: None when
        # it holds them all (a replica written before the journal was its write-ahead log).
        self.checkpoint: tuple[int, int] | None = None
        self._use_direct: bool | None = None  # appends bypass the page cache (decided at the first)

    @property
    def _base_path(self) -> str:
        return os.path.join(self.directory, "journal.json")

    def _segment_path(self, segment: int) -> str:
        return os.path.join(self.directory, f"segment-{segment:08d}.log")

    def create(self, base_seq: int = 0) -> None:
        """An empty journal that answers changes after ``base_seq`` (an adopted replica starts later)."""
        os.makedirs(self.directory, exist_ok=True)
        self._save(base_seq, disabled=self.limit == 0)

    def open(self, applied_through: int = 0, writable: bool = True) -> None:
        """Load the retention point and index the segments; turn the journal off or on per the limit.

        ``applied_through``: the highest sequence the mirror applied (where a journal
        turned on again starts).  ``writable`` False (a read-only look, e.g.
        ``describe_root``) changes nothing: a torn tail is only left out of the index.
        """
        self.scan(writable)
        if writable:
            self.settle_limit(applied_through)

    def scan(self, writable: bool = True) -> None:
        """Load the retention point and index the segments (a torn tail is cut when ``writable``)."""
        state = load_json(self._base_path, "journal", self.volume_id)
        self.base_seq, self.disabled = int(state["base_seq"]), bool(state.get("disabled", False))
        self._segment_sizes.clear()
        self._index.clear()
        self._seen, self._seen_base, self.records = bytearray(), 0, 0
        self._first = self._last = None
        segments = self._segments()
        for segment in segments:
            self._scan(segment, last=segment == segments[-1], repair=writable)

    def settle_limit(self, applied_through: int) -> None:
        """Turn the journal off (deleting its segments) or on again, as the limit says.  Call once
        the mirror holds every record (after a replay and a checkpoint)."""
        if self.limit == 0 and not self.disabled:
            self._save(max(self.base_seq, applied_through), disabled=True)  # before the records go
            for segment in self._segments():
                os.unlink(self._segment_path(segment))
            self._segment_sizes.clear()
            self._index.clear()
            self._seen, self._seen_base, self.records = bytearray(), 0, 0
            self._first = self._last = None
            return
        if self.limit > 0 and self.disabled:
            self._save(max(self.base_seq, applied_through), disabled=False)

    def _segments(self) -> list[int]:
        return sorted(int(n[8:16]) for n in os.listdir(self.directory)
                      if n.startswith("segment-") and n.endswith(".log"))

    def end(self) -> tuple[int, int]:
        """The position after the last record: a checkpoint taken now covers everything."""
        segment = max(self._segment_sizes, default=0)
        return segment, self._segment_sizes.get(segment, 0)

    def since_checkpoint(self) -> int:
        """Bytes appended after the checkpoint (what a crash now would replay)."""
        if self.checkpoint is None:
            return 0
        first, position = self.checkpoint
        return sum(size - (position if segment == first else 0)
                   for segment, size in self._segment_sizes.items() if segment >= first)

    def after_checkpoint(self) -> Iterator[tuple[int, int, bytes]]:
        """(segment, position, bytes to the segment's end) of every segment part past the
        checkpoint, in order: what a replay applies.  One segment in memory at a time."""
        if self.checkpoint is None:
            return
        first, position = self.checkpoint
        for segment in sorted(self._segment_sizes):
            if segment < first:
                continue
            start = position if segment == first else 0
            size = self._segment_sizes[segment]
            if size > start:
                with open(self._segment_path(segment), "rb") as handle:
                    yield segment, start, os.pread(handle.fileno(), size - start, start)

    def seqs_after_checkpoint(self, until: tuple[int, int] | None = None) -> list[int]:
        """The seqs indexed past the checkpoint (durable here, perhaps not yet in the mirror);
        ``until``: only those before that position (a group's last commit names it)."""
        if self.checkpoint is None:
            return []
        first, position = self.checkpoint
        return [seq for segment, index in self._index.items() if segment >= first
                for seq, at in zip(index.seqs, index.positions) if (segment > first or at >= position)
                and (until is None or (segment, at) < until)]

    def cut(self, segment: int, position: int) -> None:
        """Cut the last segment at ``position`` (a record there is torn: never acknowledged), and
        index again."""
        if segment != max(self._segment_sizes, default=0):
            raise CorruptStateFile(self._segment_path(segment), f"damaged journal record at byte {position} "
                                   "(not at the end of the journal)")
        print(f"drtool: journal {self._segment_path(segment)}: cutting a torn record at byte {position}; "
              "it was never acknowledged", file=sys.stderr)
        os.truncate(self._segment_path(segment), position)
        self.scan()

    def cut_to(self, at: tuple[int, int]) -> int:
        """Remove every record after position ``at`` (a ``end()`` taken earlier): appended but not
        committed by their consistency group (drtool.replica.group), so never acknowledged.
        Returns the bytes removed.  Refuses a position before the mirror's checkpoint."""
        segment, position = at
        if self.checkpoint is not None and at < self.checkpoint:
            raise CorruptStateFile(self._segment_path(segment), f"cannot cut the journal at {at}: the mirror's "
                                   f"checkpoint {self.checkpoint} is past it")
        removed = 0
        try:
            for later in self._segments():
                path = self._segment_path(later)
                if later > segment:
                    removed += os.path.getsize(path)
                    os.unlink(path)
                elif later == segment and os.path.getsize(path) > position:
                    removed += os.path.getsize(path) - position
                    os.truncate(path, position)
            if removed:
                fsync_dir(self.directory)
        except OSError as exc:
            raise DeviceError(f"cannot cut the journal {self.directory} back to {at}: {exc.strerror}") from None
        if removed:
            self.scan()
        return removed

    def _save(self, base_seq: int, disabled: bool | None = None) -> None:
        self.disabled = self.disabled if disabled is None else disabled
        save_json(self._base_path, "journal", self.volume_id, {"base_seq": base_seq, "disabled": self.disabled})
        self.base_seq = base_seq

    def rebase(self, seq: int) -> None:
        """A new sequence space starts after ``seq``; only an empty journal can follow it."""
        assert not self.records, "rebase of a journal that holds records"
        self._save(seq)

    def _scan(self, segment: int, last: bool, repair: bool) -> None:
        path = self._segment_path(segment)
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            position = 0
            while position < size:
                raw = handle.read(RECORD_HEADER_SIZE)
                try:
                    padding = _padding(raw, position, handle.read, size)
                    if padding:
                        position += padding
                        handle.seek(position)
                        continue
                    header = decode_record_header(raw)
                    if position + header.total_size > size:
                        raise WireError("record runs past the end of the segment")
                except WireError as exc:
                    if not last:
                        raise CorruptStateFile(path, f"damaged journal record at byte {position}: {exc}") from None
                    if not repair:
                        size = position
                        break
                    print(f"drtool: journal {path}: cutting a torn record at byte {position} ({exc}); "
                          "it was never acknowledged", file=sys.stderr)
                    os.truncate(path, position)
                    size = position
                    break
                self._add(segment, header.seq, self.geometry.region_of(header.offset), position,
                          header.total_size)
                position += header.total_size
                handle.seek(position)
        self._segment_sizes[segment] = size

    def append(self, records: list[tuple[int, int, int]], chunks: list[memoryview]) -> None:
        """Append records durably, then trim to the size limit.

        ``records``: (seq, region, size) of each record, in order; ``chunks``: their
        bytes, concatenated in the same order (adjacent records as one chunk).

        Where the file system takes it (not tmpfs), the append bypasses the page cache
        (O_DIRECT: the records are read back only for the change log and after a crash,
        and filling the page cache with a fresh file's pages costs this machine's CPU
        several times what the copy into an aligned buffer does): the batch is
        zero-padded to the next block, which a scan skips.
        """
        if self.disabled:
            return
        direct = self._direct()
        segment = max(self._segment_sizes, default=0)
        if (segment == 0 or self._segment_sizes[segment] >= self.segment_limit
                or (direct and self._segment_sizes[segment] % BLOCK)):
            segment += 1
            self._segment_sizes[segment] = 0
        path = self._segment_path(segment)
        position = self._segment_sizes[segment]
        end = position
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_DIRECT if direct else os.O_APPEND)
            fd = os.open(path, flags, 0o600)
            try:
                if direct:
                    end = position + _write_direct(fd, chunks, position)
                else:
                    _write_all(fd, chunks)
                first = position == 0
                for seq, region, size in records:
                    self._add(segment, seq, region, position, size)
                    position += size
                os.fdatasync(fd)
            finally:
                os.close(fd)
            if first:  # a new segment: its name must be durable too before the batch is acknowledged
                fsync_dir(self.directory)
        except OSError as exc:
            raise DeviceError(f"cannot append to the journal {path}: {exc.strerror}") from None
        self._segment_sizes[segment] = max(end, position)
        self.trim()

    def _direct(self) -> bool:
        if self._use_direct is None:
            self._use_direct = direct_io_pays(self.directory)
        return self._use_direct

    def _add(self, segment: int, seq: int, region: int, position: int, size: int) -> None:
        """Index a record unless its seq is indexed already (the first copy is the one kept)."""
        if not self._seen:
            self._seen_base = seq & ~7
        elif seq < self._seen_base:
            grow = (self._seen_base - seq + 7) // 8
            self._seen[0:0] = bytes(grow)
            self._seen_base -= 8 * grow
        offset = seq - self._seen_base
        byte, bit = offset >> 3, 1 << (offset & 7)
        if byte >= len(self._seen):
            self._seen.extend(bytes(byte + 1 - len(self._seen)))
        elif self._seen[byte] & bit:
            return
        self._seen[byte] |= bit
        index = self._index.get(segment)
        if index is None:
            index = self._index[segment] = _SegmentIndex()
        index.add(seq, region, position, size)
        self.records += 1
        self._first = seq if self._first is None else min(self._first, seq)
        self._last = seq if self._last is None else max(self._last, seq)

    def trim(self) -> None:
        """Delete the oldest segments while over the limit, never one the mirror may still need
        (at or past the checkpoint)."""
        if self.disabled:
            return
        while sum(self._segment_sizes.values()) > self.limit and len(self._segment_sizes) > 1:
            oldest = min(self._segment_sizes)
            if self.checkpoint is not None and oldest >= self.checkpoint[0]:
                return
            dropped = self._index.pop(oldest, None) or _SegmentIndex()
            new_base = max(self.base_seq, max(dropped.seqs, default=0))
            # The retention point is durable before the records go, so a crash can
            # only make the journal claim less than it holds, never more.
            self._save(new_base)
            os.unlink(self._segment_path(oldest))
            del self._segment_sizes[oldest]
            for seq in dropped.seqs:
                offset = seq - self._seen_base
                self._seen[offset >> 3] &= ~(1 << (offset & 7)) & 0xFF
            self.records -= len(dropped.seqs)
            unused = len(self._seen) - len(self._seen.lstrip(b"\0"))
            del self._seen[:unused]
            self._seen_base += 8 * unused
            held = [index.seqs for index in self._index.values() if index.seqs]
            self._first = min((min(seqs) for seqs in held), default=None)
            self._last = max((max(seqs) for seqs in held), default=None)

    def range(self) -> tuple[int | None, int | None]:
        """The lowest and the highest seq indexed (None, None when empty)."""
        return self._first, self._last

    def changes(self, after: int, runs: list[Run]) -> list[Entry]:
        """Entries after seq ``after`` touching the regions of ``runs``, in seq order.

        The runs are never expanded into regions: a request may name the whole volume.
        """
        if self.disabled:
            raise DataUnavailable("this replica server keeps no journal (its journal limit is 0)")
        if after < self.base_seq:
            raise DataUnavailable(f"the journal no longer reaches back to seq {after}: it keeps "
                                  f"records after seq {self.base_seq} only")
        merged = coalesce(runs)
        starts = [first for first, _ in merged]

        def wanted(region: int) -> bool:
            at = bisect_right(starts, region) - 1
            return at >= 0 and region < merged[at][0] + merged[at][1]

        found = []
        for segment, index in self._index.items():
            for seq, region, position, size in zip(index.seqs, index.regions, index.positions, index.sizes):
                if seq > after and wanted(region):
                    found.append(Entry(seq, region, segment, position, size))
        return sorted(found, key=lambda e: e.seq)

    def read(self, entry: Entry) -> bytes:
        with open(self._segment_path(entry.segment), "rb") as handle:
            return os.pread(handle.fileno(), entry.size, entry.position)

    def total_bytes(self) -> int:
        return sum(self._segment_sizes.values())


class _SegmentIndex:
    """The indexed records of one segment, in file order."""

    def __init__(self) -> None:
        self.seqs = array("Q")
        self.regions = array("Q")
        self.positions = array("Q")
        self.sizes = array("I")

    def add(self, seq: int, region: int, position: int, size: int) -> None:
        self.seqs.append(seq)
        self.regions.append(region)
        self.positions.append(position)
        self.sizes.append(size)





def _padding(raw: bytes, position: int, read: Callable[[int], bytes], size: int) -> int:
    """Bytes of zero padding at ``position`` (0: a record starts there): an O_DIRECT append is
    padded with zeros to the next block.  ``raw``: the bytes read at ``position`` so far;
    ``read(n)``: the next n.  WireError when zeros start there but do not reach the block."""
    if position % BLOCK == 0 or raw[:4] != bytes(4):
        return 0
    pad = BLOCK - position % BLOCK
    rest = raw[:pad] + (read(pad - len(raw)) if pad > len(raw) else b"")
    if position + pad > size or rest.count(0) != pad:
        raise WireError("neither a record nor padding to the next block")
    return pad


def iter_segment(raw: bytes | memoryview, start: int) -> Iterator[tuple[int, RecordHeader, memoryview]]:
    """(offset in ``raw``, header, data) of each record in a segment's bytes read from byte
    ``start`` of it, padding skipped, each WRITE's data checked against its digest.  A bad
    record raises JournalDamage carrying its offset in ``raw``."""
    view = memoryview(raw)
    position = 0
    while position < len(view):
        try:
            head = bytes(view[position:position + RECORD_HEADER_SIZE])
            after = position + len(head)
            pad = _padding(head, start + position, lambda n: bytes(view[after:after + n]), start + len(view))
            if pad:
                position += pad
                continue
            header = decode_record_header(head)
            end = position + header.total_size
            if end > len(view):
                raise WireError("record runs past the end of the segment")
            data = view[position + RECORD_HEADER_SIZE:end]
            if header.kind == KIND_WRITE and blake3.blake3(data).digest() != header.digest:
                raise WireError(f"record seq {header.seq}: data does not match its digest")
        except WireError as exc:
            raise JournalDamage(str(exc), position) from None
        yield position, header, data
        position = end


class JournalDamage(WireError):
    """A record that fails its checks, at ``position`` in the bytes scanned."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.position = position


def _write_direct(fd: int, chunks: list[memoryview], position: int) -> int:
    """Write ``chunks`` at ``position`` (block-aligned) through O_DIRECT, zero-padded to a block;
    returns the bytes written, padding included."""
    length = sum(len(c) for c in chunks)
    padded = -(-length // BLOCK) * BLOCK
    in_place = _aligned_in_place(chunks, padded)
    if in_place is not None:  # the batch as received, in page-aligned memory: no copy
        in_place[length:padded] = bytes(padded - length)
        done = 0
        while done < padded:
            done += os.pwrite(fd, in_place[done:padded], position + done)
        return padded
    with aligned(padded) as view:
        at = 0
        for chunk in chunks:
            view[at:at + len(chunk)] = memoryview(chunk).cast("B")
            at += len(chunk)
        view[length:padded] = bytes(padded - length)
        done = 0
        while done < padded:
            done += os.pwrite(fd, view[done:padded], position + done)
    return padded


def _aligned_in_place(chunks: list[memoryview], padded: int) -> memoryview | None:
    """The one chunk, widened to ``padded`` bytes, when it starts on a block of page-aligned
    memory (an mmap: the replica server's request buffer) that has room for the padding after
    it; else None (the caller copies into an aligned buffer)."""
    if len(chunks) != 1 or not isinstance(chunks[0], memoryview) or not isinstance(chunks[0].obj, mmap.mmap):
        return None
    chunk, whole = chunks[0], chunks[0].obj
    if chunk.readonly or not chunk.c_contiguous:
        return None
    base = ctypes.addressof(ctypes.c_char.from_buffer(whole))
    offset = ctypes.addressof(ctypes.c_char.from_buffer(chunk)) - base
    if offset % BLOCK or offset + padded > len(whole):
        return None
    return memoryview(whole)[offset:offset + padded]


def _write_all(fd: int, chunks: list[memoryview]) -> None:
    pending = [memoryview(c).cast("B") for c in chunks if len(c)]
    first = 0
    while first < len(pending):
        done = os.writev(fd, pending[first:first + _IOV_MAX])
        while first < len(pending) and done >= len(pending[first]):
            done -= len(pending[first])
            first += 1
        if done:
            pending[first] = pending[first][done:]


_IOV_MAX = 1024
