"""The replication log: append-only segments of records not yet acknowledged by the secondary.

It is also the primary's write-ahead log: a write is logged before the volume
(or overlay) is touched, and the maps on disk are checkpoints that say up to
which sequence they are current.  Segment files are ``log/seg-<first seq>.log``:

    segment header (48 bytes): magic b"DRTLOG\\0\\0", version H, flags H,
                               volume_id 16s, first_seq Q, reserved 8s, crc32 I
    then records (drtool.wire), back to back.

Opening the log checks every record (header crc and data digest).  A torn tail
of the last segment (a crash mid-append) is cut; damage anywhere else is
refused, never skipped over.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import blake3

from drtool.errors import CorruptStateFile, StateError
from drtool.regions import Geometry
from drtool.storage.atomic import fsync_dir
from drtool.wire import (
    KIND_WRITE, NO_DIGEST, RECORD_HEADER_SIZE, RecordHeader, WireError, decode_record_header,
    encode_record_header,
)

SEGMENT_MAGIC = b"DRTLOG\0\0"
SEGMENT_HEAD = struct.Struct("<8sHH16sQ8s")
SEGMENT_HEADER_SIZE = SEGMENT_HEAD.size + 4
SEGMENT_BYTES = 64 << 20
SEGMENT_VERSION = 2  # 2: records carry the time they were written (drtool.wire)
_CRC = struct.Struct("<I")


@dataclass(slots=True)
class LogEntry:
    """A pending record: where it is, and what it says."""

    seq: int
    segment: int  # first_seq of its segment
    position: int  # byte offset of the record in the segment file
    header: RecordHeader
    region: int
    stamp: float  # when it was appended (the record's own ``written`` time)

    @property
    def size(self) -> int:
        return self.header.total_size


class Segment:
    def __init__(self, path: str, first_seq: int, fd: int, size: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.fd = fd
        self.size = size
        self.last_seq = first_seq - 1
        self.pending = 0


class ReplicationLog:
    """Thread-safe: appends, reads and acknowledgements may come from different threads."""

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

    # -- opening ------------------------------------------------------------------

    @classmethod
    def open(cls, directory: str, volume_id: bytes, geometry: Geometry, last_seq: int = 0) -> ReplicationLog:
        """Open (creating the directory if needed); ``last_seq``: highest sequence known elsewhere."""
        os.makedirs(directory, mode=0o700, exist_ok=True)
        log = cls(directory, volume_id, geometry)
        names = sorted(n for n in os.listdir(directory) if n.startswith("seg-") and n.endswith(".log"))
        for index, name in enumerate(names):
            log._load_segment(os.path.join(directory, name), is_last=index == len(names) - 1)
        highest = max([last_seq] + [s.last_seq for s in log.segments.values()])
        log.next_seq = highest + 1
        return log

    def _load_segment(self, path: str, is_last: bool) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        size = os.fstat(fd).st_size
        head = os.pread(fd, SEGMENT_HEADER_SIZE, 0)
        first_seq = self._check_segment_header(path, head)
        segment = Segment(path, first_seq, fd, size)
        mtime = os.fstat(fd).st_mtime
        position = SEGMENT_HEADER_SIZE
        expected = first_seq
        while position < size:
            try:
                header, data = self._read_at(fd, position, size)
                if header.seq != expected:
                    raise WireError(f"sequence {header.seq} where {expected} was expected")
            except WireError as exc:
                if not is_last or self._valid_record_after(fd, position + 1, size):
                    os.close(fd)
                    raise CorruptStateFile(path, f"damaged record at byte {position}: {exc}") from None
                # A crash tore the last append: cut it, it was never acknowledged to anyone.
                os.ftruncate(fd, position)
                os.fsync(fd)
                self.cut_bytes += size - position
                size = position
                break
            self._index(LogEntry(header.seq, first_seq, position, header,
                                 self.geometry.region_of(header.offset), header.written or mtime))
            segment.last_seq = header.seq
            segment.pending += 1
            position += header.total_size
            expected += 1
        segment.size = size
        self.segments[first_seq] = segment

    def _check_segment_header(self, path: str, head: bytes) -> int:
        if len(head) < SEGMENT_HEADER_SIZE:
            raise CorruptStateFile(path, "log segment header is truncated")
        magic, version, _flags, volume_id, first_seq, _ = SEGMENT_HEAD.unpack_from(head)
        (crc,) = _CRC.unpack_from(head, SEGMENT_HEAD.size)
        if magic != SEGMENT_MAGIC:
            raise CorruptStateFile(path, "not a drtool log segment")
        if zlib.crc32(head[:SEGMENT_HEAD.size]) != crc:
            raise CorruptStateFile(path, "log segment header checksum mismatch")
        if version != SEGMENT_VERSION:
            raise CorruptStateFile(path, f"log segment version {version} is not supported")
        if volume_id != self.volume_id:
            raise CorruptStateFile(path, "log segment belongs to another volume")
        return first_seq

    def _read_at(self, fd: int, position: int, size: int) -> tuple[RecordHeader, bytes]:
        raw = os.pread(fd, RECORD_HEADER_SIZE, position)
        header = decode_record_header(raw)
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

    def _valid_record_after(self, fd: int, start: int, size: int) -> bool:
        """Is there an intact record header anywhere after a damaged one?  (Then it is not a torn tail.)"""
        chunk = os.pread(fd, size - start, start) if size > start else b""
        index = chunk.find(b"DRTR")
        while index >= 0:
            try:
                decode_record_header(chunk[index:index + RECORD_HEADER_SIZE])
                return True
            except WireError:
                index = chunk.find(b"DRTR", index + 1)
        return False

    def _index(self, entry: LogEntry) -> None:
        self.entries[entry.seq] = entry
        self.by_region.setdefault(entry.region, []).append(entry.seq)
        self.pending_bytes += entry.size

    # -- appending ----------------------------------------------------------------

    def _new_segment(self, first_seq: int) -> Segment:
        path = os.path.join(self.directory, f"seg-{first_seq:016x}.log")
        head = SEGMENT_HEAD.pack(SEGMENT_MAGIC, SEGMENT_VERSION, 0, self.volume_id, first_seq, b"\0" * 8)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.write(fd, head + _CRC.pack(zlib.crc32(head)))
        segment = Segment(path, first_seq, fd, SEGMENT_HEADER_SIZE)
        self.segments[first_seq] = segment
        self.unsynced.add(first_seq)
        self.new_files = True
        return segment

    def append(self, kind: int, offset: int, length: int, era: int, data: memoryview | bytes | None = None,
               digest: bytes | None = None, flags: int = 0) -> LogEntry:
        """Append one record (inside one region); returns its entry.  Not durable until sync()."""
        region = self.geometry.region_of(offset)
        start, region_length = self.geometry.region_bounds(region)
        if offset + length > start + region_length:
            raise ValueError("a log record must not cross a region boundary")
        if kind == KIND_WRITE:
            assert data is not None and len(data) == length
            digest = digest or blake3.blake3(data).digest()
        else:
            digest = NO_DIGEST
        with self.lock:
            seq = self.next_seq
            segment = next(reversed(self.segments.values()), None) if self.segments else None
            if segment is None or segment.size >= SEGMENT_BYTES:
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
            segment.last_seq = seq
            segment.pending += 1
            self.next_seq = seq + 1
            header = RecordHeader(kind, flags, seq, offset, length, era, digest, now)
            entry = LogEntry(seq, segment.first_seq, position, header, region, now)
            self._index(entry)
            return entry

    def sync(self) -> None:
        """Make every appended record durable (segments written since the last sync, and new files)."""
        with self.lock:
            dirty = [self.segments[first] for first in self.unsynced if first in self.segments]
            self.unsynced = set()
            new_files, self.new_files = self.new_files, False
        for segment in dirty:
            if segment.fd >= 0:
                os.fsync(segment.fd)
        if new_files:
            fsync_dir(self.directory)

    # -- reading for shipment ------------------------------------------------------

    def pending(self, limit_bytes: int | None = None, regions: set[int] | None = None) -> list[LogEntry]:
        """Pending entries in sequence order (only those of ``regions`` when given)."""
        out: list[LogEntry] = []
        total = 0
        with self.lock:
            if regions is not None:
                seqs = sorted(s for r in regions for s in self.by_region.get(r, ()))
                candidates = [self.entries[s] for s in seqs]
            else:
                candidates = list(self.entries.values())
        for entry in candidates:
            if limit_bytes is not None and out and total + entry.size > limit_bytes:
                break
            out.append(entry)
            total += entry.size
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

    def read_data(self, entry: LogEntry) -> bytes:
        """The data bytes of one record (empty for ZERO records)."""
        if entry.header.kind != KIND_WRITE:
            return b""
        segment = self.segments[entry.segment]
        return os.pread(segment.fd, entry.header.length, entry.position + RECORD_HEADER_SIZE)

    def has_pending(self, region: int) -> bool:
        with self.lock:
            return bool(self.by_region.get(region))

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
        """Delete segments with nothing pending whose records the saved maps cover."""
        removed = 0
        with self.lock:
            current = next(reversed(self.segments), None)
            for first, segment in list(self.segments.items()):
                if segment.pending or segment.last_seq > covered_seq:
                    continue
                if first == current and segment.size < SEGMENT_BYTES:
                    continue  # still being appended to
                os.close(segment.fd)
                os.unlink(segment.path)
                del self.segments[first]
                removed += 1
        if removed:
            fsync_dir(self.directory)
        return removed

    def drop_through(self, seq: int) -> set[int]:
        """Bitmap mode: forget every pending record up to ``seq``; return their regions."""
        with self.lock:
            dropped = [s for s in self.entries if s <= seq]
            regions = {self.entries[s].region for s in dropped}
        self.acknowledge(dropped)
        self.trim(seq)
        return regions

    def records_after(self, seq: int) -> list[LogEntry]:
        with self.lock:
            return [e for s, e in self.entries.items() if s > seq]

    def disk_bytes(self) -> int:
        with self.lock:
            return sum(s.size for s in self.segments.values())

    def close(self) -> None:
        with self.lock:
            for segment in self.segments.values():
                if segment.fd >= 0:
                    os.close(segment.fd)
                    segment.fd = -1


def summarize(directory: str, after: int = 0, acked: frozenset[int] = frozenset()) -> dict[str, float | int]:
    """Pending records and bytes after sequence ``after`` (less those in ``acked``, acknowledged
    out of order), and when the oldest of them was written: from headers only (for status)."""
    records = 0
    total = 0
    oldest: float | None = None
    try:
        names = sorted(n for n in os.listdir(directory) if n.startswith("seg-") and n.endswith(".log"))
    except FileNotFoundError:
        names = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                mtime = os.fstat(handle.fileno()).st_mtime
                position = SEGMENT_HEADER_SIZE
                while position + RECORD_HEADER_SIZE <= size:
                    handle.seek(position)
                    try:
                        header = decode_record_header(handle.read(RECORD_HEADER_SIZE))
                    except WireError:
                        break
                    if header.seq > after and header.seq not in acked:
                        records += 1
                        total += header.total_size
                        stamp = header.written or mtime
                        oldest = stamp if oldest is None else min(oldest, stamp)
                    position += header.total_size
        except OSError:
            continue
    return {"records": records, "bytes": total, "oldest": oldest or 0.0}
