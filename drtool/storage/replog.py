"""The replication log: append-only segments of records not yet acknowledged by the secondary.

It is also the primary's write-ahead log: a write is logged before the volume
(or overlay) is touched, and the maps on disk are checkpoints that say up to
which sequence they are current.  Segment files are ``log/seg-<first seq>.log``:

    segment header (48 bytes): magic b"DRTLOG\\0\\0", version H, flags H,
                               volume_id 16s, first_seq Q, synced Q, crc32 I
    then records (drtool.wire), back to back, with consecutive sequences.

``synced`` (the former reserved field: 0 in segments written before it) is the sync mark:
every record up to that sequence, in every segment, was made durable by ``sync()``.  Each
``sync()`` rewrites the newest segment's header after its fsync returned and leaves that
header write to ride on the next fsync of the segment (or on ``close()``, which syncs it):
no extra write barrier per flush, at the price that after a crash the mark on disk may lag
by the last sync.  The file ``log/start`` (rewritten atomically, only when the first
segment is created, when ``trim()`` deletes segments and by ``settle_damage()``) says from
which sequence the log holds every record, and which damaged ranges the caller has
already accounted for.

Opening the log checks every record (header crc, data digest, sequence), the continuity
of sequences across segments, ``log/start`` and what the caller knows (see
:meth:`ReplicationLog.open`).  A torn tail of the last segment beyond the sync mark (a
crash mid-append: never acknowledged to anyone) is cut.  Anything else that is missing or
damaged is damage: refused with :class:`CorruptStateFile`, or, when the caller asks for
it, reported (``damage``, ``damaged_regions``, ``rescan_regions``, ``lost_ranges``) so
the affected regions are shipped whole from the volume.  A damaged segment is never
truncated or deleted by opening; the newest one, if damaged, is sealed (appends go to a
new segment).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import blake3

from drtool.errors import CorruptStateFile, StateError
from drtool.regions import Geometry
from drtool.storage.atomic import fsync_dir, write_atomic
from drtool.wire import (
    KIND_BASE, KIND_FROM_OVERLAY, KIND_WRITE, NO_DIGEST, RECORD_HEADER_SIZE, RECORD_MAGIC, RecordHeader, WireError, decode_record_header,
    encode_record_header,
)

logger = logging.getLogger(__name__)

SEGMENT_MAGIC = b"DRTLOG\0\0"
SEGMENT_HEAD = struct.Struct("<8sHH16sQQ")
SEGMENT_HEADER_SIZE = SEGMENT_HEAD.size + 4
SEGMENT_BYTES = 64 << 20
SEGMENT_VERSION = 2  # 2: records carry the time they were written (drtool.wire)
_CRC = struct.Struct("<I")

START_FILE = "start"
START_MAGIC = b"DRTLOGS\0"
START_HEAD = struct.Struct("<8sHH16sQ")  # magic, version, count of settled ranges, volume_id, start
START_RANGE = struct.Struct("<QQ")
START_VERSION = 1

# What an operator can run when writes the log lost cannot be accounted for: take the
# device's bytes as the truth for every region, and resynchronise the secondary in full.
REMEDY = ("to accept the loss, run `drtool init {name} --device DEVICE --force` (a new digest of every "
          "region, from the device) and then `drtool protect {name} --peer URL` (a full resync)")


@dataclass(slots=True)
class LogEntry:
    """A pending record: where it is, and what it says."""

    seq: int
    segment: int  # first_seq of its segment
    position: int  # byte offset of the record in the segment file
    header: RecordHeader
    region: int
    stamp: float  # when it was appended (the record's own ``written`` time)
    # (offset, length): the bytes of this whole-region record that the write changed, when
    # the receiver may take the rest from what it holds already (see :meth:`ReplicationLog.
    # read_for_shipping`).  In memory only: after a restart the record ships whole.
    patch: tuple[int, int] | None = None

    @property
    def size(self) -> int:
        return self.header.total_size


class Segment:
    def __init__(self, path: str, first_seq: int, fd: int, size: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.fd = fd
        self.size = size
        self.last_seq = first_seq - 1  # the last intact record
        self.reach = first_seq - 1  # the last sequence it accounts for (intact, or lost in damage)
        self.pending = 0
        self.synced = 0  # the sync mark in its header
        self.sealed = False  # damaged: never appended to again
        self.damaged = False  # holds damage not yet settled: trim() keeps it


@dataclass
class Lost:
    """Records that are missing, or fail their checks, found when the log was opened."""

    path: str  # the segment holding (or following) them
    where: str  # what was found, e.g. "damaged record at byte 1234: record header checksum mismatch"
    low: int  # the sequences lost, inclusive (low > high: damaged bytes, no sequence lost)
    high: int
    known: dict[int, int] = field(default_factory=dict)  # seq -> region, for headers that still say so


@dataclass
class _Span:
    """Damaged bytes in a segment, from ``position`` to the next intact record (``resume``)."""

    position: int
    expected: int  # the sequence the damaged bytes should have held first
    reason: str
    resume: int | None = None  # byte offset of the next intact record, if any
    resume_seq: int = 0
    known: dict[int, int] = field(default_factory=dict)
    later_headers: bool = False  # a valid record header follows the damaged one


def _subtract(low: int, high: int, holes: Iterable[int]) -> list[tuple[int, int]]:
    """The runs of [low, high] left once the sequences ``holes`` are taken out."""
    out: list[tuple[int, int]] = []
    at = low
    for seq in sorted(s for s in set(holes) if low <= s <= high):
        if seq > at:
            out.append((at, seq - 1))
        at = seq + 1
    if at <= high:
        out.append((at, high))
    return out


def _without(runs: list[tuple[int, int]], ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``runs`` less every sequence inside ``ranges``."""
    for a, b in ranges:
        cut: list[tuple[int, int]] = []
        for low, high in runs:
            if b < low or a > high:
                cut.append((low, high))
                continue
            if low < a:
                cut.append((low, a - 1))
            if high > b:
                cut.append((b + 1, high))
        runs = cut
    return runs


def _runs_text(runs: Iterable[tuple[int, int]]) -> str:
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def _merge(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for low, high in sorted(runs):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def _segment_head(volume_id: bytes, first_seq: int, synced: int) -> bytes:
    head = SEGMENT_HEAD.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, volume_id, first_seq, synced)
    return head + _CRC.pack(zlib.crc32(head))


def _decode_start(path: str, raw: bytes, volume_id: bytes | None) -> tuple[int, list[tuple[int, int]]]:
    if len(raw) < START_HEAD.size + 4:
        raise CorruptStateFile(path, "log start file is truncated")
    magic, version, count, owner, start = START_HEAD.unpack_from(raw)
    if magic != START_MAGIC:
        raise CorruptStateFile(path, "not a drtool log start file")
    body = START_HEAD.size + count * START_RANGE.size
    if len(raw) != body + 4 or zlib.crc32(raw[:body]) != _CRC.unpack_from(raw, body)[0]:
        raise CorruptStateFile(path, "log start file checksum mismatch")
    if version != START_VERSION:
        raise CorruptStateFile(path, f"log start file version {version} is not supported")
    if volume_id is not None and owner != volume_id:
        raise CorruptStateFile(path, "log start file belongs to another volume")
    ranges = [START_RANGE.unpack_from(raw, START_HEAD.size + i * START_RANGE.size) for i in range(count)]
    return start, ranges


class ReplicationLog:
    """Thread-safe: appends, reads and acknowledgements may come from different threads.

    After :meth:`open` with ``report_damage=True``, these attributes describe what the log
    lost (all empty for an intact log).  **The caller must act on them** before it trusts
    the log, then save its maps and record, then call :meth:`settle_damage` (until then
    every open reports the same damage again):

    ``damage``: ``list[str]``
        One line per finding (segment, byte, sequence range, regions): for the operator.
    ``damaged_regions``: ``set[int]``
        Regions of lost records whose headers still say where they were.  Mark each
        unreplicated and norecord (bitmap mode: it ships whole from the volume), whatever
        records of it are still pending.
    ``rescan_regions``: ``set[int]``
        Regions the maps may not know the current bytes of: lost records above
        ``covered_through`` (the device may hold their write), and the regions of records
        cut as a torn tail (never acknowledged, but the device may hold them).  After the
        replay, digest each from where it lives (overlay or device) into the manifest.
    ``lost_ranges``: ``list[tuple[int, int]]``
        Sequence ranges lost with no trace of their regions.  Those at or below
        ``covered_through`` were pending writes the maps know: every region in the
        unreplicated map must then be marked norecord (ship whole).  Those above it are
        only here with ``accept_loss=True`` (otherwise the open is refused), and then
        ``regions_unknown`` is set.
    ``regions_unknown``: ``bool``
        Writes the maps never saw were lost and nobody knows where: every region must be
        digested from the device again and shipped whole (a full resync).
    """

    def __init__(self, directory: str, volume_id: bytes, geometry: Geometry) -> None:
        self.directory = directory
        self.volume_id = volume_id
        self.geometry = geometry
        self.segments: OrderedDict[int, Segment] = OrderedDict()
        self.entries: OrderedDict[int, LogEntry] = OrderedDict()
        self.by_region: dict[int, list[int]] = {}
        self.next_seq = 1
        self.pending_bytes = 0
        self.lock = threading.RLock()
        self.cut_bytes = 0  # torn tail removed when opened
        self.unsynced: set[int] = set()  # segments appended to since the last sync()
        self.new_files = False
        self.synced_mark = 0  # every record up to here is durable
        self.mark_dirty = False  # the newest header's mark is written but not fsynced yet
        self._sync_running = False  # a sync() is in flight (one at a time: group commit)
        self._sync_ended = threading.Condition(self.lock)  # notified when it ends
        self._completed = 0  # the highest sequence a finished sync made durable
        self._sync_error: OSError | None = None  # an fsync of the log failed: no sync succeeds again
        self.start_seq: int | None = None  # log/start: the log holds every record from here
        self.settled: list[tuple[int, int]] = []  # damaged ranges the caller accounted for
        self.damage: list[str] = []
        self.damaged_regions: set[int] = set()
        self.rescan_regions: set[int] = set()
        self.lost_ranges: list[tuple[int, int]] = []
        self.regions_unknown = False
        self.lost: list[Lost] = []  # every finding, as data
        # Called with the bytes of each appended record, after the log's lock is released (a
        # consistency group counts its members' appends to record cuts: drtool.group_replication).
        self.on_append: Callable[[int], None] | None = None

    @property
    def name(self) -> str:
        """The volume's name (its state directory's)."""
        return os.path.basename(os.path.dirname(os.path.abspath(self.directory)))

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, volume_id: bytes, geometry: Geometry, last_seq: int = 0, *,
             covered_through: int | None = None, done_through: int | None = None,
             acked_ahead: Iterable[int] = (), report_damage: bool = False,
             accept_loss: bool = False) -> ReplicationLog:
        """Open (creating the directory if needed) and check the whole log.

        What the caller knows, from its maps and record (give what you have):

        ``last_seq``
            The highest sequence used elsewhere: new records are numbered above it.
        ``covered_through``
            Every record up to here is reflected in every map on disk, **and was synced
            before those maps were committed** (the superblock's covered sequence; a commit
            must not claim records that ``sync()`` has not made durable: commit
            ``min(covered, log.synced_mark)`` when the log was not synced first).  Records
            above it are needed to redo writes; records up to it must exist, so a log that
            ends below it lost its tail.
        ``done_through``, ``acked_ahead``
            Every record up to ``done_through`` is no longer pending (acknowledged by the
            secondary, or dropped for bitmap mode): ``record.replication.done_through()``;
            ``acked_ahead``: records acknowledged out of order above it.  Other records are
            needed for shipping.

        A record that is missing or fails a check is *lost* unless it is neither needed
        to redo nor to ship (unless the caller gives both ``covered_through`` and
        ``done_through``, every lost record counts; when it gives neither, what precedes
        the first segment is only checked against ``log/start``).  Lost records are looked for: before the
        first segment (``log/start``), between segments (each begins where the previous
        one ends), inside segments (a record that fails its checks: the next intact record
        is searched for, and headers that still decode name their region), and after the
        last one, up to the sync mark and ``covered_through``.  A torn tail of the last
        segment beyond the sync mark, with no valid record after it, is cut as before.

        Without ``report_damage`` any lost record is refused with CorruptStateFile (the
        message names the segment, the byte, the sequences and what to run).  With it,
        lost records are reported in the attributes described on the class (the caller
        must act on them), except lost records whose regions cannot be known and that the
        maps never saw (above ``covered_through``): those are refused, unless
        ``accept_loss`` (then ``regions_unknown``: the caller rescans and ships every
        region).
        """
        os.makedirs(directory, mode=0o700, exist_ok=True)
        log = cls(directory, volume_id, geometry)
        try:
            log._open(last_seq, covered_through, done_through, frozenset(acked_ahead), report_damage,
                      accept_loss)
        except BaseException:
            log.close()
            raise
        return log

    @classmethod
    def begin(cls, directory: str, volume_id: bytes, geometry: Geometry, first_seq: int) -> None:
        """Make ``directory`` an empty log whose records begin at ``first_seq`` (``log/start``):
        a promoted replica continues the sequence it applied, and its maps cover everything
        before it.  Without this, the first open finds maps covering records the log never
        held and reports them lost.  Refused over a log that already holds segments."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if any(n.startswith("seg-") for n in os.listdir(directory)):
            raise StateError(f"the replication log {directory} is not empty: it cannot begin again at {first_seq}")
        cls(directory, volume_id, geometry)._write_start(first_seq, [])

    def _open(self, last_seq: int, covered: int | None, done: int | None, ahead: frozenset[int],
              report_damage: bool, accept_loss: bool) -> None:
        for entry in os.listdir(self.directory):
            if entry.startswith(f"{START_FILE}.tmp."):  # a rewrite of log/start a crash interrupted
                os.unlink(os.path.join(self.directory, entry))
        start = self._read_start()
        if start is not None:
            self.start_seq, self.settled = start
        names = sorted(n for n in os.listdir(self.directory) if n.startswith("seg-") and n.endswith(".log"))
        for name in names:
            self._open_segment(os.path.join(self.directory, name))
        self.synced_mark = max([0] + [s.synced for s in self.segments.values()])
        knows = covered is not None or done is not None
        reach: int | None = self.start_seq - 1 if self.start_seq is not None else (0 if knows else None)
        ordered = list(self.segments.values())
        previous: Segment | None = None
        for index, segment in enumerate(ordered):
            name = os.path.basename(segment.path)
            if reach is not None and segment.first_seq > reach + 1:
                where = (f"records missing between {os.path.basename(previous.path)} and {name}" if previous
                         else f"records missing before the first segment {name}"
                         + (f" (log/start says the log holds every record from {self.start_seq})"
                            if self.start_seq is not None else ""))
                self.lost.append(Lost(segment.path, where, reach + 1, segment.first_seq - 1))
            elif previous is not None and segment.first_seq <= previous.reach:
                raise CorruptStateFile(segment.path, f"log sequences overlap: {name} begins at "
                                       f"{segment.first_seq}, {os.path.basename(previous.path)} reaches "
                                       f"{previous.reach}")
            following = ordered[index + 1].first_seq if index + 1 < len(ordered) else None
            self._load_segment(segment, following)
            reach = segment.reach if reach is None else max(reach, segment.reach)
            previous = segment
        expected_high = max(self.synced_mark, covered or 0)
        if reach is not None and reach < expected_high:
            if previous is not None:
                where = f"records missing after the end of {os.path.basename(previous.path)}"
                path = previous.path
            else:
                where, path = "the log holds no segment", self.directory
            self.lost.append(Lost(path, where, reach + 1, expected_high))
            if previous is not None:
                previous.sealed = previous.damaged = True
        seen = [last_seq, self.synced_mark, reach or 0, covered or 0]
        seen += [max([lost.high] + list(lost.known)) for lost in self.lost]
        self.next_seq = max(seen) + 1
        # Records above the mark may sit only in the page cache (a killed process, no reboot):
        # the first sync makes their segments durable before the mark covers them.
        self.unsynced = {s.first_seq for s in self.segments.values() if s.last_seq > self.synced_mark}
        self._completed = self.synced_mark
        self._judge(covered, done, ahead, report_damage, accept_loss)

    def _open_segment(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            first_seq, synced = self._check_segment_header(path, os.pread(fd, SEGMENT_HEADER_SIZE, 0))
        except BaseException:
            os.close(fd)
            raise
        segment = Segment(path, first_seq, fd, size)
        segment.synced = synced
        self.segments[first_seq] = segment

    def _load_segment(self, segment: Segment, following: int | None) -> None:
        """Index the intact records; record what is lost; cut a torn tail (the last segment only)."""
        fd, size = segment.fd, segment.size
        mtime = os.fstat(fd).st_mtime
        name = os.path.basename(segment.path)
        position = SEGMENT_HEADER_SIZE
        expected = segment.first_seq
        while position < size:
            try:
                header, _ = self._read_at(fd, position, size)
                if header.seq != expected:
                    raise WireError(f"sequence {header.seq} where {expected} was expected")
            except WireError as exc:
                span = self._damaged_span(fd, position, size, expected, str(exc))
                if span.resume is None:
                    if (following is None and not span.later_headers and expected > self.synced_mark
                            and not self._is_settled(expected)):
                        # A crash tore the last append: cut it, it was never acknowledged to anyone.
                        os.ftruncate(fd, position)
                        os.fsync(fd)
                        self.cut_bytes += size - position
                        self.rescan_regions.update(span.known.values())
                        size = position
                        break
                    high = (following - 1 if following is not None
                            else max([self.synced_mark, expected] + list(span.known)))
                else:
                    high = span.resume_seq - 1
                where = f"damaged record at byte {position} of {name}: {span.reason}"
                self.lost.append(Lost(segment.path, where, expected, high, span.known))
                segment.reach = max(segment.reach, high)
                segment.damaged = True
                if following is None:
                    segment.sealed = True  # appends go to a new segment: the damage stays as found
                if span.resume is None:
                    break
                position, expected = span.resume, span.resume_seq
                continue
            self._index(LogEntry(header.seq, segment.first_seq, position, header,
                                 self.geometry.region_of(header.offset), header.written or mtime))
            segment.last_seq = header.seq
            segment.reach = max(segment.reach, header.seq)
            segment.pending += 1
            position += header.total_size
            expected += 1
        segment.size = size

    def _damaged_span(self, fd: int, position: int, size: int, expected: int, reason: str) -> _Span:
        """Look past damaged bytes: headers that still decode (their regions), the next intact record."""
        span = _Span(position, expected, reason)
        chunk = os.pread(fd, size - position, position)
        most = expected + len(chunk) // RECORD_HEADER_SIZE  # no more records than fit in the bytes
        index = chunk.find(RECORD_MAGIC)
        while index >= 0:
            try:
                header = decode_record_header(chunk[index:index + RECORD_HEADER_SIZE])
            except WireError:
                index = chunk.find(RECORD_MAGIC, index + 1)
                continue
            if index > 0:
                span.later_headers = True
            floor = max([expected - 1] + list(span.known))
            region = self.geometry.region_of(header.offset) if header.offset < self.geometry.size else -1
            if floor < header.seq <= most and region >= 0 and self._inside_region(header, region):
                end = index + header.total_size
                intact = end <= len(chunk) and (header.kind != KIND_WRITE or blake3.blake3(
                    chunk[index + RECORD_HEADER_SIZE:end]).digest() == header.digest)
                if intact and index > 0 or intact and header.seq != expected:
                    span.resume, span.resume_seq = position + index, header.seq
                    return span
                span.known[header.seq] = region
            index = chunk.find(RECORD_MAGIC, index + 1)
        return span

    def _inside_region(self, header: RecordHeader, region: int) -> bool:
        start, length = self.geometry.region_bounds(region)
        return header.offset + header.length <= start + length

    def _is_settled(self, seq: int) -> bool:
        return any(a <= seq <= b for a, b in self.settled)

    def _judge(self, covered: int | None, done: int | None, ahead: frozenset[int], report_damage: bool,
               accept_loss: bool) -> None:
        """Sort what was lost into what the caller must do, or refuse."""
        refusal: tuple[Lost, str] | None = None
        for lost in self.lost:
            runs = _without(_subtract(lost.low, lost.high, lost.known), self.settled)
            known = {s: r for s, r in lost.known.items() if lost.low <= s <= lost.high and not self._is_settled(s)}
            needed_known = {s: r for s, r in known.items() if self._needed(s, covered, done, ahead)}
            # Unknown regions: above covered the maps never saw them; at or below, they are pending
            # writes whose regions the unreplicated map holds (if they are needed for shipping).
            blind = [(max(a, covered + 1 if covered is not None else a), b) for a, b in runs
                     if covered is None or b > covered]
            shipping: list[tuple[int, int]] = []
            if covered is not None:
                for a, b in runs:
                    if a > covered:
                        continue
                    low = a if done is None else max(a, done + 1)
                    shipping += _subtract(low, min(b, covered), ahead)
            if lost.low > lost.high and not known:
                self.damage.append(f"{lost.path}: {lost.where} (no record lost)")
                continue
            if not (needed_known or blind or shipping):
                if runs or known:
                    logger.warning("replication log %s: %s: sequences %d-%d are gone, but no longer needed",
                                   self.directory, lost.where, lost.low, lost.high)
                continue
            regions = sorted(set(needed_known.values()))
            text = f"{lost.path}: {lost.where}: records {_runs_text([(lost.low, lost.high)])} lost"
            if regions:
                text += f" (regions {_runs_text(_merge((r, r) for r in regions))} known)"
            if blind:
                text += f"; records {_runs_text(blind)} carried writes to unknown regions the maps never saw"
            if shipping:
                text += f"; records {_runs_text(shipping)} were pending, regions unknown"
            self.damage.append(text)
            self.damaged_regions.update(regions)
            self.rescan_regions.update(r for s, r in needed_known.items() if covered is None or s > covered)
            self.lost_ranges += shipping
            if blind:
                if accept_loss:
                    self.lost_ranges += blind
                    self.regions_unknown = True
                elif refusal is None:
                    refusal = (lost, f"the writes of records {_runs_text(blind)} cannot be accounted for")
            if not report_damage and refusal is None:
                refusal = (lost, "the regions they wrote would be believed shipped")
        self.lost_ranges = _merge(self.lost_ranges)
        if refusal is not None:
            lost, consequence = refusal
            regions = sorted(set(lost.known.values()))
            known = f" (regions {_runs_text(_merge((r, r) for r in regions))})" if regions else ""
            raise CorruptStateFile(lost.path, f"{lost.where}: replication log records "
                                   f"{_runs_text([(lost.low, lost.high)])} are lost{known}; {consequence}; "
                                   + REMEDY.format(name=self.name))

    @staticmethod
    def _needed(seq: int, covered: int | None, done: int | None, ahead: frozenset[int]) -> bool:
        if covered is None or done is None:
            return True
        return seq > covered or (seq > done and seq not in ahead)

    def _check_segment_header(self, path: str, head: bytes) -> tuple[int, int]:
        if len(head) < SEGMENT_HEADER_SIZE:
            raise CorruptStateFile(path, "log segment header is truncated")
        magic, version, _flags, volume_id, first_seq, synced = SEGMENT_HEAD.unpack_from(head)
        (crc,) = _CRC.unpack_from(head, SEGMENT_HEAD.size)
        if magic != SEGMENT_MAGIC:
            raise CorruptStateFile(path, "not a drtool log segment")
        if zlib.crc32(head[:SEGMENT_HEAD.size]) != crc:
            raise CorruptStateFile(path, "log segment header checksum mismatch")
        if version != SEGMENT_VERSION:
            raise CorruptStateFile(path, f"log segment version {version} is not supported")
        if volume_id != self.volume_id:
            raise CorruptStateFile(path, "log segment belongs to another volume")
        return first_seq, synced

    def _read_at(self, fd: int, position: int, size: int) -> tuple[RecordHeader, bytes]:
        raw = os.pread(fd, RECORD_HEADER_SIZE, position)
        header = decode_record_header(raw)
        if header.kind == KIND_FROM_OVERLAY:
            raise WireError("a header-only overlay copy (a wire record) in the log")
        if position + header.total_size > size:
            raise WireError("record runs past the end of the segment")
        region = self.geometry.region_of(header.offset)
        start, length = self.geometry.region_bounds(region) if region < self.geometry.count else (0, 0)
        if header.offset + header.length > start + length:
            raise WireError("record crosses a region boundary or the end of the volume")
        data = b""
        if header.kind == KIND_WRITE:
            data = os.pread(fd, header.length, position + RECORD_HEADER_SIZE)
            if len(data) != header.length or blake3.blake3(data).digest() != header.digest:
                raise WireError("record data does not match its digest")
        return header, data

    def _index(self, entry: LogEntry) -> None:
        self.entries[entry.seq] = entry
        self.by_region.setdefault(entry.region, []).append(entry.seq)
        self.pending_bytes += entry.size

    # -- log/start ------------------------------------------------------------------

    @property
    def _start_path(self) -> str:
        return os.path.join(self.directory, START_FILE)

    def _read_start(self) -> tuple[int, list[tuple[int, int]]] | None:
        try:
            with open(self._start_path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return None
        return _decode_start(self._start_path, raw, self.volume_id)

    def _write_start(self, start: int, settled: list[tuple[int, int]]) -> None:
        settled = _merge(r for r in settled if r[1] >= start)
        body = START_HEAD.pack(START_MAGIC, START_VERSION, len(settled), self.volume_id, start)
        body += b"".join(START_RANGE.pack(a, b) for a, b in settled)
        write_atomic(self._start_path, body + _CRC.pack(zlib.crc32(body)))
        self.start_seq, self.settled = start, settled

    def settle_damage(self) -> None:
        """The caller has durably acted on the damage reported at open (maps and record saved):
        remember it in ``log/start`` so later opens do not report it again."""
        with self.lock:
            if not self.lost:
                return
            ranges = self.settled + [(lost.low, max([lost.high] + list(lost.known))) for lost in self.lost
                                     if lost.low <= max([lost.high] + list(lost.known))]
            start = self.start_seq if self.start_seq is not None else min(
                [lost.low for lost in self.lost] + [s.first_seq for s in self.segments.values()])
            self._write_start(start, ranges)
            self.lost = []
            self.damage = []
            self.damaged_regions = set()
            self.rescan_regions = set()
            self.lost_ranges = []
            self.regions_unknown = False
            for segment in self.segments.values():
                segment.damaged = False

    # -- appending ----------------------------------------------------------------

    def _new_segment(self, first_seq: int) -> Segment:
        path = os.path.join(self.directory, f"seg-{first_seq:016x}.log")
        if not self.segments and self.start_seq != first_seq and not self.lost:
            # An empty log: it holds every record from here on (what came before was trimmed).
            self._write_start(first_seq, self.settled)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.write(fd, _segment_head(self.volume_id, first_seq, self.synced_mark))
        segment = Segment(path, first_seq, fd, SEGMENT_HEADER_SIZE)
        segment.synced = self.synced_mark
        self.segments[first_seq] = segment
        self.unsynced.add(first_seq)
        self.new_files = True
        return segment

    def append(self, kind: int, offset: int, length: int, era: int, data: memoryview | bytes | None = None,
               digest: bytes | None = None, flags: int = 0, patch: tuple[int, int] | None = None) -> LogEntry:
        """Append one record (inside one region); returns its entry.  Not durable until sync().
        ``patch``: see :attr:`LogEntry.patch`."""
        region = self.geometry.region_of(offset)
        start, region_length = self.geometry.region_bounds(region)
        if offset + length > start + region_length:
            raise ValueError("a log record must not cross a region boundary")
        if kind == KIND_WRITE:
            assert data is not None and len(data) == length
            digest = digest or blake3.blake3(data).digest()
        elif kind == KIND_BASE:
            assert digest is not None and offset == start and length == region_length
        else:
            digest = NO_DIGEST
        with self.lock:
            seq = self.next_seq
            segment = next(reversed(self.segments.values()), None) if self.segments else None
            if segment is None or segment.size >= SEGMENT_BYTES or segment.sealed:
                segment = self._new_segment(seq)
            now = time.time()
            head = encode_record_header(kind, seq, offset, length, era, digest, flags, written=now)
            buffers = [head, data] if kind == KIND_WRITE else [head]
            position = segment.size
            total = len(head) + (length if kind == KIND_WRITE else 0)
            try:
                written = os.pwritev(segment.fd, buffers, position)
                if written != total:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a short write: the disk is full
            except OSError as exc:
                os.ftruncate(segment.fd, position)
                raise StateError(
                    f"cannot append to the replication log {segment.path}: {exc.strerror}; nothing was written"
                ) from None
            segment.size += total
            self.unsynced.add(segment.first_seq)
            segment.last_seq = segment.reach = seq
            segment.pending += 1
            self.next_seq = seq + 1
            header = RecordHeader(kind, flags, seq, offset, length, era, digest, now)
            entry = LogEntry(seq, segment.first_seq, position, header, region, now, patch)
            self._index(entry)
        hook = self.on_append
        if hook is not None:
            hook(total)  # outside the lock: a consistency group's hook takes every member's lock
        return entry

    def sync(self) -> None:
        """Make every record appended so far durable (segments written since the last sync, and
        new files).

        Group commit: one sync runs at a time.  A caller that finds one running waits for it,
        and returns if it covered the caller's records; otherwise the first waiter starts the
        next one, which covers every record appended meanwhile, by every thread (a database's
        WAL flush does the same): concurrent flushes cost one fsync, not one each.

        Then the newest segment's header records the sync mark; that header write is made
        durable by the next fsync of the segment (or by close()), not by a barrier of its own.

        Once an fsync of the log failed, every later sync fails too: the kernel may have
        dropped those pages and a retried fsync would then report success for records that are
        not on disk.  The volume must be opened again (which checks the log).
        """
        with self.lock:
            wanted = self.next_seq - 1
            while self._sync_running:
                self._sync_ended.wait()
            if self._sync_error is not None:
                raise StateError(f"the replication log {self.directory} could not be made durable earlier "
                                 f"({self._sync_error}); restart the agent (opening the volume checks the log)"
                                 ) from self._sync_error
            if self._completed >= wanted and not self.new_files:
                return  # a sync that ran meanwhile covered every record this caller appended
            dirty = [self.segments[first] for first in self.unsynced if first in self.segments]
            self.unsynced = set()
            new_files, self.new_files = self.new_files, False
            through = self.next_seq - 1
            self._sync_running = True
        try:
            for segment in dirty:
                if segment.fd >= 0:
                    os.fdatasync(segment.fd)  # data and the size that grew: what replay reads
            if new_files:
                fsync_dir(self.directory)
        except BaseException as exc:
            with self.lock:
                self._sync_error = exc if isinstance(exc, OSError) else OSError(str(exc))
                self._sync_running = False
                self._sync_ended.notify_all()
            raise
        with self.lock:
            self._sync_running = False
            self._sync_ended.notify_all()
            self._completed = max(self._completed, through)
            if through <= self.synced_mark:
                return
            self.synced_mark = through
            newest = next(reversed(self.segments.values()), None) if self.segments else None
            if newest is not None and newest.fd >= 0:
                os.pwrite(newest.fd, _segment_head(self.volume_id, newest.first_seq, through), 0)
                newest.synced = through
                self.mark_dirty = True

    # -- reading for shipment ------------------------------------------------------

    def pending(self, limit_bytes: int | None = None, regions: set[int] | None = None) -> list[LogEntry]:
        """Pending entries in sequence order (only those of ``regions`` when given)."""
        out: list[LogEntry] = []
        total = 0
        with self.lock:  # (a batch's worth is looked at, not every pending record)
            if regions is not None:
                seqs = sorted(s for r in regions for s in self.by_region.get(r, ()))
                candidates: Iterable[LogEntry] = [self.entries[s] for s in seqs]
            else:
                candidates = self.entries.values()
            for entry in candidates:
                if limit_bytes is not None and out and total + entry.size > limit_bytes:
                    break
                out.append(entry)
                total += entry.size
        return out

    def pending_through(self, seq: int) -> list[LogEntry]:
        """Pending entries up to sequence ``seq``, in sequence order (what a group transaction
        up to a cut takes of this log)."""
        out: list[LogEntry] = []
        with self.lock:
            for entry in self.entries.values():
                if entry.seq > seq:
                    break
                out.append(entry)
        return out

    def read(self, entries: list[LogEntry]) -> list[bytes]:
        """The raw bytes of ``entries`` (record header + data), coalescing adjacent ones."""
        chunks: list[bytes] = []
        index = 0
        while index < len(entries):
            first = entries[index]
            end = first.position + first.size
            last = index
            while (last + 1 < len(entries) and entries[last + 1].segment == first.segment
                   and entries[last + 1].position == end):
                last += 1
                end += entries[last].size
            segment = self.segments[first.segment]
            data = os.pread(segment.fd, end - first.position, first.position)
            if len(data) != end - first.position:
                raise CorruptStateFile(segment.path, "log segment is shorter than its index")
            chunks.append(data)
            index = last + 1
        return chunks

    def read_for_shipping(self, entries: list[LogEntry]) -> list[bytes]:
        """The records of ``entries`` as they go on the wire: their bytes as logged (as
        :meth:`read`), except that an entry with a ``patch`` goes as a record of the patch's
        bytes alone (same sequence, era, flags and time; the digest of those bytes), which the
        receiver applies over the region it holds."""
        chunks: list[bytes] = []
        run: list[LogEntry] = []
        for entry in entries:
            if entry.patch is None:
                run.append(entry)
                continue
            if run:
                chunks += self.read(run)
                run = []
            offset, length = entry.patch
            header = entry.header
            segment = self.segments[entry.segment]
            at = entry.position + RECORD_HEADER_SIZE + offset - header.offset
            data = os.pread(segment.fd, length, at)
            if len(data) != length:
                raise CorruptStateFile(segment.path, "log segment is shorter than its index")
            chunks.append(encode_record_header(KIND_WRITE, header.seq, offset, length, header.era,
                                               blake3.blake3(data).digest(), header.flags, header.written))
            chunks.append(data)
        if run:
            chunks += self.read(run)
        return chunks

    def read_data(self, entry: LogEntry) -> bytes:
        """The data bytes of one record (empty for ZERO records)."""
        if entry.header.kind != KIND_WRITE:
            return b""
        segment = self.segments[entry.segment]
        return os.pread(segment.fd, entry.header.length, entry.position + RECORD_HEADER_SIZE)

    def has_pending(self, region: int) -> bool:
        with self.lock:
            return bool(self.by_region.get(region))

    def has_pending_mirror(self, region: int) -> bool:
        """Is a record of this region for the mirror (not the overlay replica) pending?"""
        with self.lock:
            entries = self.entries
            return any(not entries[seq].header.overlay for seq in self.by_region.get(region, ()))

    def oldest_seq(self) -> int | None:
        with self.lock:
            return next(iter(self.entries), None)

    def oldest_entry(self) -> LogEntry | None:
        with self.lock:
            return next(iter(self.entries.values()), None)

    # -- acknowledgement and trimming ----------------------------------------------

    def acknowledge(self, seqs: list[int]) -> set[int]:
        """Forget acknowledged records; return the regions left with no pending record."""
        emptied: set[int] = set()
        with self.lock:
            for seq in seqs:
                entry = self.entries.pop(seq, None)
                if entry is None:
                    continue
                self.pending_bytes -= entry.size
                self.segments[entry.segment].pending -= 1
                waiting = self.by_region.get(entry.region)
                if waiting is not None:
                    try:
                        waiting.remove(seq)
                    except ValueError:
                        pass
                    if not waiting:
                        del self.by_region[entry.region]
                        emptied.add(entry.region)
        return emptied

    def trim(self, covered_seq: int) -> int:
        """Delete the oldest segments while they have nothing pending and the saved maps cover
        them: a prefix only, so the log always holds one unbroken run of sequences, from the
        one ``log/start`` names (rewritten first).  A segment with unsettled damage is kept."""
        with self.lock:
            current = next(reversed(self.segments), None)
            doomed: list[Segment] = []
            for first, segment in self.segments.items():
                if segment.pending or segment.reach > covered_seq or segment.damaged:
                    break
                if first == current and segment.size < SEGMENT_BYTES and not segment.sealed:
                    break  # still being appended to
                doomed.append(segment)
            if not doomed:
                return 0
            rest = [s for s in self.segments.values() if s not in doomed]
            start = rest[0].first_seq if rest else max(self.next_seq, doomed[-1].reach + 1)
            self._write_start(start, self.settled)  # before the files go: a crash leaves both true
            for segment in doomed:
                if segment.fd >= 0:
                    os.close(segment.fd)
                os.unlink(segment.path)
                del self.segments[segment.first_seq]
        fsync_dir(self.directory)
        return len(doomed)

    def drop_through(self, seq: int) -> set[int]:
        """Bitmap mode: forget every pending record up to ``seq``; return their regions.

        Nothing is deleted here: the segments go at the next ``trim()``, which the caller
        runs after saving what replaces the records (the regions' norecord bits and
        ``dropped_through``), so a crash in between never loses both.
        """
        with self.lock:
            dropped = [s for s in self.entries if s <= seq]
            regions = {self.entries[s].region for s in dropped}
        self.acknowledge(dropped)
        return regions

    def records_after(self, seq: int) -> list[LogEntry]:
        with self.lock:
            return [e for s, e in self.entries.items() if s > seq]

    def disk_bytes(self) -> int:
        with self.lock:
            return sum(s.size for s in self.segments.values())

    def close(self) -> None:
        """Close the files; make the last sync mark durable first (one fsync, if it moved)."""
        with self.lock:
            if self.mark_dirty:
                self.mark_dirty = False
                newest = next(reversed(self.segments.values()), None) if self.segments else None
                if newest is not None and newest.fd >= 0:
                    try:
                        os.fsync(newest.fd)
                    except OSError as exc:
                        logger.warning("replication log %s: cannot sync its mark: %s", self.directory, exc)
            for segment in self.segments.values():
                if segment.fd >= 0:
                    os.close(segment.fd)
                    segment.fd = -1


def consistent_cut(logs: list[ReplicationLog]) -> list[int]:
    """The last appended sequence of each log (in the order given), read while holding every
    log's lock at once (taken in the logs' name order, so two cuts never deadlock).

    A write is appended to its log before it is acknowledged; so if write B was issued after
    write A was acknowledged (B depends on A), a cut that contains B contains A: the records up
    to a cut, in every log, are the members' state after a prefix of the acknowledged writes
    (plus writes in flight, which nothing depends on yet).  The records between two cuts are
    one group transaction (docs/internals.md, "Consistency groups")."""
    ordered = sorted(range(len(logs)), key=lambda i: (logs[i].name, i))
    with ExitStack() as stack:
        for index in ordered:
            stack.enter_context(logs[index].lock)
        return [log.next_seq - 1 for log in logs]


def summarize(directory: str, after: int = 0, acked: frozenset[int] = frozenset()) -> dict[str, Any]:
    """Pending records and bytes after sequence ``after`` (less those in ``acked``, acknowledged
    out of order), and when the oldest of them was written: from headers only (for status,
    without the lock, while an agent may append).

    ``damage``: a list of findings (empty when the log looks intact) from the same cheap
    reading: a segment header that fails its checks, records missing between segments,
    before the first (``log/start``, and records above ``after`` that are not in
    ``acked``) or after the last up to the sync mark, a record header that fails its
    checks before the end of a segment, or a torn record at or below the sync mark.
    Data digests are not checked (opening the log does that).  A log with damage is not
    fine: status must show it (and opening the volume will refuse it or report it).
    """
    result: dict[str, Any] = {}
    for _attempt in range(3):
        result, raced = _summarize_once(directory, after, acked)
        if not raced:
            break
    return result


def _summarize_once(directory: str, after: int, acked: frozenset[int]) -> tuple[dict[str, Any], bool]:
    records = 0
    total = 0
    oldest: float | None = None
    damage: list[str] = []
    raced = False
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith("seg-") and n.endswith(".log"))
    except FileNotFoundError:
        names = []
    # (name, first_seq, reach, problem: (position, expected seq, reason) or None)
    found: list[tuple[str, int, int, tuple[int, int, str] | None]] = []
    mark = 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                mtime = os.fstat(handle.fileno()).st_mtime
                head = handle.read(SEGMENT_HEADER_SIZE)
                if len(head) < SEGMENT_HEADER_SIZE and name == names[-1]:
                    raced = True  # being created
                    continue
                if (len(head) < SEGMENT_HEADER_SIZE or head[:8] != SEGMENT_MAGIC
                        or zlib.crc32(head[:SEGMENT_HEAD.size]) != _CRC.unpack_from(head, SEGMENT_HEAD.size)[0]):
                    raced = True  # perhaps read while its sync mark was rewritten: read again
                    damage.append(f"{path}: log segment header fails its checks")
                    continue
                _magic, _version, _flags, _owner, first_seq, synced = SEGMENT_HEAD.unpack_from(head)
                mark = max(mark, synced)
                position = SEGMENT_HEADER_SIZE
                expected = first_seq
                problem: tuple[int, int, str] | None = None
                while position < size:
                    handle.seek(position)
                    try:
                        header = decode_record_header(handle.read(RECORD_HEADER_SIZE))
                        if header.seq != expected:
                            raise WireError(f"sequence {header.seq} where {expected} was expected")
                        if position + header.total_size > size:
                            raise WireError("record runs past the end of the segment")
                    except WireError as exc:
                        problem = (position, expected, str(exc))
                        break
                    if header.seq > after and header.seq not in acked:
                        records += 1
                        total += header.total_size
                        stamp = header.written or mtime
                        oldest = stamp if oldest is None else min(oldest, stamp)
                    position += header.total_size
                    expected += 1
                found.append((name, first_seq, expected - 1, problem))
        except FileNotFoundError:
            raced = True  # trimmed while we read: read again
        except OSError as exc:
            damage.append(f"{path}: {exc.strerror}")
    start: int | None = None
    settled: list[tuple[int, int]] = []
    try:
        with open(os.path.join(directory, START_FILE), "rb") as handle:
            start, settled = _decode_start(os.path.join(directory, START_FILE), handle.read(), None)
    except FileNotFoundError:
        pass
    except CorruptStateFile as exc:
        damage.append(str(exc))

    def missing(low: int, high: int, where: str) -> None:
        runs = _without(_subtract(max(low, after + 1), high, acked), settled)
        if runs:
            damage.append(f"{where}: records {_runs_text(runs)} missing")

    reach = start - 1 if start is not None else after
    for index, (name, first_seq, last, problem) in enumerate(found):
        if first_seq > reach + 1:
            missing(reach + 1, first_seq - 1, f"{directory}: before {name}" if index == 0
                    else f"{directory}: between {found[index - 1][0]} and {name}")
        if problem is not None:
            position, expected, reason = problem
            is_last = index == len(found) - 1
            if not (is_last and expected > mark) and not any(a <= expected <= b for a, b in settled):
                damage.append(f"{os.path.join(directory, name)}: damaged record at byte {position} "
                              f"(sequence {expected}): {reason}")
            # The damaged bytes account for the sequences up to the next segment (or the mark).
            last = max(last, found[index + 1][1] - 1 if not is_last else mark)
        reach = max(reach, last)
    if found and reach < mark:
        missing(reach + 1, mark, f"{directory}: after {found[-1][0]} (synced through {mark})")
    return {"records": records, "bytes": total, "oldest": oldest or 0.0, "damage": damage}, raced
