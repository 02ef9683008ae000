"""The byte formats shared by the primary and the secondary: records, frames, group transactions.

This is the one place that defines them.  The replication log on the primary,
the replication stream, the secondary's journal and the change-log replica all
carry **records**; batched region reads are answered with **frames**.

Record (76-byte header, then ``length`` bytes of data unless the kind is ZERO)::

    magic    4s  b"DRTR"
    kind     H   WRITE=1 (data follows), ZERO=2 (the range reads as zeros), BASE=4 (overlay, header
                 only: the digest of the region beneath the partial records that follow)
    flags    H   OVERLAY=1: belongs to the overlay replica, not the mirror
    seq      Q   replication-log sequence number, from 1, strictly increasing
    offset   Q   byte offset in the volume
    length   I   bytes covered; a record never crosses a region boundary
    era      I   the primary's era when it was written
    written  Q   when the primary logged it, microseconds since the epoch (0: unknown);
                 the age of the oldest unacknowledged write is measured from it
    digest   32s blake3 of the data (all zeros for ZERO records)
    hcrc     I   crc32 of the 72 bytes above

Frame (56-byte header, then ``length`` bytes for DATA, ERROR and RUN)::

    magic    4s  b"DRTF"
    kind     H   DATA=1, ZERO=2 (region is all zeros, no bytes follow),
                 ERROR=3 (utf-8 message follows), END=4 (region = regions answered),
                 RUN=5 (several adjacent regions, see below)
    flags    H   reserved
    region   Q   region number (RUN: its first region)
    length   I   bytes of the region (DATA, ZERO), of the message (ERROR), of the payload (RUN)
    digest   32s blake3 of the region's bytes as the server holds them
                 (RUN: crc32 of the run table in the first 4 bytes, then zeros)
    hcrc     I   crc32 of the 52 bytes above

A RUN frame answers ``count`` requested regions that follow each other in the
request and in the volume, all of one length; its payload is the run table
(``count`` u32, ``region_length`` u32, then ``count`` digests of 32 bytes: what the
server stored for each region) followed by the regions' bytes back to back.  One
header for many regions lets the server send their bytes in one ``sendfile`` and
the client parse one header per run, not per region.  A client asks for RUN frames
(``"frames": "runs"`` in the read request); to any other it answers one DATA frame a
region, so an older client keeps working.

A batched read answers the requested regions in request order (a frame each, or
RUN frames covering several), then END.  An ERROR frame that replaces a DATA frame
the server had announced keeps its length (the region's) and carries the message
NUL-padded, so the response length the server declared up front stays true; an
ERROR frame with an empty message means the region changed while it was being read
(read it again).  A region the server fails to read while its bytes are already on
their way (inside a RUN, or a DATA frame sent with ``sendfile``) is sent as zeros,
which its digest check refuses; the server remembers the failure, so the retry gets
an ERROR frame that says why.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import blake3

RECORD_MAGIC = b"DRTR"
RECORD_HEAD = struct.Struct("<4sHHQQIIQ32s")
RECORD_HEADER_SIZE = RECORD_HEAD.size + 4  # 76

KIND_WRITE = 1
KIND_ZERO = 2
# On the wire only, to the mirror: a whole region whose bytes the overlay replica holds already
# (its digest is the record's); the server copies them from there.  Header only, no data.
KIND_FROM_OVERLAY = 3
# Overlay only, header-only, covering a whole region: the records of this region that follow
# (partial records, issue 12's sub-region tracking) are written over the region's bytes whose
# blake3 is ``digest`` (the mirror's, when every earlier mirror record is applied).  A receiver
# that does not hold the region in its overlay replica fills it from the mirror and checks it
# against this digest first: never a fill from stale bytes.  Logged (it is a real record).
KIND_BASE = 4
FLAG_OVERLAY = 1
# In the primary's log only: a mirror record of a region the overlay replica was sent during the
# incident (failback copies it back); it may go on the wire as KIND_FROM_OVERLAY.
FLAG_OVERLAY_HELD = 2

FRAME_MAGIC = b"DRTF"
FRAME_HEAD = struct.Struct("<4sHHQI32s")
FRAME_HEADER_SIZE = FRAME_HEAD.size + 4  # 56

FRAME_DATA = 1
FRAME_ZERO = 2
FRAME_ERROR = 3
FRAME_END = 4
FRAME_RUN = 5
RUN_HEAD = struct.Struct("<II")  # count, region_length: the start of a RUN frame's run table

NO_DIGEST = b"\0" * 32
RECORDS_CONTENT_TYPE = "application/x-drtool-records"
# A manifest as entries: (region u64, blake3 32s) for every region that is not all zeros,
# ascending; a region without an entry is all zeros.  It costs what the volume holds, not
# its size (a sparse 15 TiB volume's manifest is a few entries, not 8 GB).
MANIFEST_CONTENT_TYPE = "application/x-drtool-manifest"
MANIFEST_ENTRY = struct.Struct("<Q32s")
FRAMES_CONTENT_TYPE = "application/x-drtool-frames"

_CRC = struct.Struct("<I")


class WireError(ValueError):
    """Bytes that are not a valid record or frame (the message says which check failed)."""


@dataclass(frozen=True)
class RecordHeader:
    kind: int
    flags: int
    seq: int
    offset: int
    length: int
    era: int
    digest: bytes
    written: float = 0.0  # epoch seconds when the primary logged it; 0.0 when unknown

    @property
    def data_length(self) -> int:
        return self.length if self.kind == KIND_WRITE else 0

    @property
    def total_size(self) -> int:
        return RECORD_HEADER_SIZE + self.data_length

    @property
    def overlay(self) -> bool:
        return bool(self.flags & FLAG_OVERLAY)


def encode_record_header(
    kind: int, seq: int, offset: int, length: int, era: int, digest: bytes, flags: int = 0,
    written: float = 0.0,
) -> bytes:
    head = RECORD_HEAD.pack(RECORD_MAGIC, kind, flags, seq, offset, length, era, int(written * 1e6), digest)
    return head + _CRC.pack(zlib.crc32(head))


def encode_record(kind: int, seq: int, offset: int, data: bytes | None = None, length: int = 0,
                  era: int = 0, flags: int = 0) -> list[bytes]:
    """A record as chunks (header, data): WRITE when ``data`` is given, else ZERO of ``length``."""
    if data is None:
        return [encode_record_header(KIND_ZERO, seq, offset, length, era, NO_DIGEST, flags)]
    digest = blake3.blake3(data).digest()
    return [encode_record_header(KIND_WRITE, seq, offset, len(data), era, digest, flags), data]


def from_overlay_header(header: RecordHeader) -> bytes:
    """``header`` (a whole-region WRITE) as a header-only KIND_FROM_OVERLAY record."""
    return encode_record_header(KIND_FROM_OVERLAY, header.seq, header.offset, header.length, header.era,
                                header.digest, header.flags & ~FLAG_OVERLAY_HELD, header.written)


def decode_record_header(buf: bytes | bytearray | memoryview) -> RecordHeader:
    if len(buf) < RECORD_HEADER_SIZE:
        raise WireError(f"record header needs {RECORD_HEADER_SIZE} bytes, got {len(buf)}")
    head = bytes(buf[:RECORD_HEAD.size])
    (crc,) = _CRC.unpack_from(buf, RECORD_HEAD.size)
    magic, kind, flags, seq, offset, length, era, written, digest = RECORD_HEAD.unpack(head)
    if magic != RECORD_MAGIC:
        raise WireError(f"bad record magic {magic!r}")
    if zlib.crc32(head) != crc:
        raise WireError("record header checksum mismatch")
    if kind not in (KIND_WRITE, KIND_ZERO, KIND_FROM_OVERLAY, KIND_BASE):
        raise WireError(f"unknown record kind {kind}")
    if seq == 0 or length == 0:
        raise WireError("record with sequence 0 or length 0")
    return RecordHeader(kind, flags, seq, offset, length, era, digest, written / 1e6)


class FrameHeader(NamedTuple):
    # A tuple, not a dataclass: a batched read parses one per region, and this is cheaper.
    kind: int
    region: int
    length: int
    digest: bytes

    @property
    def payload_length(self) -> int:
        return self.length if self.kind in (FRAME_DATA, FRAME_ERROR, FRAME_RUN) else 0


def encode_frame_header(kind: int, region: int, length: int, digest: bytes = NO_DIGEST) -> bytes:
    head = FRAME_HEAD.pack(FRAME_MAGIC, kind, 0, region, length, digest)
    return head + _CRC.pack(zlib.crc32(head))


def decode_frame_header(buf: bytes | bytearray | memoryview) -> FrameHeader:
    if len(buf) < FRAME_HEADER_SIZE:
        raise WireError(f"frame header needs {FRAME_HEADER_SIZE} bytes, got {len(buf)}")
    magic, kind, _flags, region, length, digest = FRAME_HEAD.unpack_from(buf)
    (crc,) = _CRC.unpack_from(buf, FRAME_HEAD.size)
    if magic != FRAME_MAGIC:
        raise WireError(f"bad frame magic {magic!r}")
    if zlib.crc32(memoryview(buf)[:FRAME_HEAD.size]) != crc:
        raise WireError("frame header checksum mismatch")
    if kind not in (FRAME_DATA, FRAME_ZERO, FRAME_ERROR, FRAME_END, FRAME_RUN):
        raise WireError(f"unknown frame kind {kind}")
    return FrameHeader(kind, region, length, digest)


def run_payload_length(count: int, region_length: int) -> int:
    """Bytes of a RUN frame's payload: the run table, then ``count`` regions."""
    return RUN_HEAD.size + count * (32 + region_length)


def encode_run_head(first: int, region_length: int, digests: list[bytes]) -> bytes:
    """A RUN frame's header and run table; the ``len(digests)`` regions' bytes follow it."""
    table = RUN_HEAD.pack(len(digests), region_length) + b"".join(digests)
    return encode_frame_header(FRAME_RUN, first, run_payload_length(len(digests), region_length),
                               _CRC.pack(zlib.crc32(table)) + bytes(28)) + table


def decode_run(header: FrameHeader, payload: memoryview) -> tuple[int, memoryview, memoryview]:
    """A RUN frame's (region_length, digests, data): the table checked against the header."""
    if len(payload) < RUN_HEAD.size:
        raise WireError(f"run frame for region {header.region} is too short for its table")
    count, region_length = RUN_HEAD.unpack_from(payload)
    table_end = RUN_HEAD.size + 32 * count
    if count == 0 or region_length == 0 or run_payload_length(count, region_length) != len(payload):
        raise WireError(f"run frame for region {header.region}: {count} regions of {region_length} bytes "
                        f"do not fill its {len(payload)} bytes")
    if _CRC.pack(zlib.crc32(payload[:table_end])) != header.digest[:4]:
        raise WireError(f"run frame for region {header.region}: run table checksum mismatch")
    return region_length, payload[RUN_HEAD.size:table_end], payload[table_end:]


def iter_records(body: bytes | bytearray | memoryview) -> Iterator[tuple[RecordHeader, memoryview]]:
    """Split concatenated records; check each header and each WRITE's data digest.

    Raises WireError naming the record's position on the first bad one.
    """
    view = memoryview(body)
    pos = 0
    index = 0
    while pos < len(view):
        try:
            header = decode_record_header(view[pos:pos + RECORD_HEADER_SIZE])
        except WireError as exc:
            raise WireError(f"record {index} at byte {pos}: {exc}") from None
        end = pos + header.total_size
        if end > len(view):
            raise WireError(f"record {index} (seq {header.seq}) is truncated: needs {header.total_size} "
                            f"bytes, {len(view) - pos} left")
        data = view[pos + RECORD_HEADER_SIZE:end]
        if header.kind == KIND_WRITE and blake3.blake3(data).digest() != header.digest:
            raise WireError(f"record {index} (seq {header.seq}): data does not match its digest")
        yield header, data
        pos = end
        index += 1


@lru_cache(maxsize=64)
def zero_digest(length: int) -> bytes:
    """blake3 of ``length`` zero bytes: the digest a ZERO frame or an all-zero region carries."""
    hasher = blake3.blake3()
    chunk = bytes(min(length, 1 << 20))
    left = length
    while left:
        step = min(left, len(chunk))
        hasher.update(memoryview(chunk)[:step])
        left -= step
    return hasher.digest()


def encode_manifest_entries(entries: Iterator[tuple[int, bytes]]) -> Iterator[bytes]:
    """Manifest entries in chunks of up to 4096 (for a file or a response body)."""
    chunk = bytearray()
    for region, digest in entries:
        chunk += MANIFEST_ENTRY.pack(region, digest)
        if len(chunk) >= 4096 * MANIFEST_ENTRY.size:
            yield bytes(chunk)
            chunk.clear()
    if chunk:
        yield bytes(chunk)


def iter_manifest_entries(read: Callable[[int], bytes], region_count: int) -> Iterator[tuple[int, bytes]]:
    """Decode entries from ``read(n)`` (a file's or a response's read) until it ends; each is
    checked: ascending, inside the volume, not the all-zero slot."""
    last = -1
    while True:
        raw = read(MANIFEST_ENTRY.size * 4096)
        if not raw:
            return
        while len(raw) % MANIFEST_ENTRY.size:
            more = read(MANIFEST_ENTRY.size - len(raw) % MANIFEST_ENTRY.size)
            if not more:
                raise WireError(f"manifest entries end inside an entry ({len(raw)} bytes in the last block)")
            raw += more
        for region, digest in MANIFEST_ENTRY.iter_unpack(raw):
            if region <= last or region >= region_count:
                raise WireError(f"manifest entry for region {region} is out of order or outside the volume "
                                f"({region_count} regions, previous {last})")
            if digest == NO_DIGEST:
                raise WireError(f"manifest entry for region {region} has no digest")
            last = region
            yield region, digest

# -- group transactions --------------------------------------------------------------------
#
# ``POST /v1/groups/{group}/records`` carries one group transaction: the records of several
# volumes of a consistency group between two consistent cuts of the primary, applied on the
# secondary all or nothing (drtool.replica.group).
#
# Group transaction (24-byte header, then ``parts`` parts back to back, nothing after)::
#
#     magic    4s  b"DRTG"
#     version  H   1
#     flags    H   reserved (0)
#     txn      Q   the group transaction id, from 1, increasing
#     parts    I   number of parts (at least 1)
#     hcrc     I   crc32 of the 20 bytes above
#
# Part (20-byte head, the volume's name, a crc, then ``length`` bytes of records)::
#
#     name_len H   bytes of the name (1..255, utf-8)
#     flags    H   OVERLAY=1: the records go to the volume's overlay replica, not its mirror
#     complete Q   Complete-Through for this part (0: none), as X-Drtool-Complete-Through
#     length   Q   bytes of the records body
#     name     name_len bytes
#     pcrc     I   crc32 of the head and the name
#     records  ``length`` bytes: an ordinary records body (each record checked by iter_records)

GROUP_MAGIC = b"DRTG"
GROUP_VERSION = 1
GROUP_HEAD = struct.Struct("<4sHHQI")
GROUP_HEADER_SIZE = GROUP_HEAD.size + 4  # 24
GROUP_PART_HEAD = struct.Struct("<HHQQ")
GROUP_PART_OVERLAY = 1
GROUP_CONTENT_TYPE = "application/x-drtool-group-txn"
MAX_GROUP_NAME = 255


@dataclass(frozen=True)
class GroupPart:
    """One volume's records in a group transaction (``body``: records as the per-volume route takes them)."""

    volume: str
    overlay: bool
    complete_through: int  # 0: none
    body: memoryview


@dataclass(frozen=True)
class GroupTxn:
    txn: int
    parts: list[GroupPart]


def encode_group_txn(txn: int, parts: list[tuple[str, bool, int, list[bytes]]]) -> list[bytes]:
    """A group transaction as chunks (headers, then each part's record chunks as given, not
    copied).  ``parts``: (volume, overlay, complete_through or 0, chunks of its records)."""
    if txn < 1:
        raise ValueError(f"group transaction id must be at least 1, not {txn}")
    if not parts:
        raise ValueError("a group transaction needs at least one part")
    head = GROUP_HEAD.pack(GROUP_MAGIC, GROUP_VERSION, 0, txn, len(parts))
    chunks: list[bytes] = [head + _CRC.pack(zlib.crc32(head))]
    for volume, overlay, complete_through, records in parts:
        name = volume.encode()
        if not 1 <= len(name) <= MAX_GROUP_NAME:
            raise ValueError(f"volume name {volume!r} must be 1 to {MAX_GROUP_NAME} bytes")
        part = GROUP_PART_HEAD.pack(len(name), GROUP_PART_OVERLAY if overlay else 0, complete_through or 0,
                                    sum(len(c) for c in records)) + name
        chunks.append(part + _CRC.pack(zlib.crc32(part)))
        chunks += records
    return chunks


def decode_group_txn(body: bytes | bytearray | memoryview, max_parts: int = 1024) -> GroupTxn:
    """Split a group transaction into its parts; every length is checked against the body
    (WireError says which check failed).  The records inside a part are not decoded here
    (iter_records does that, part by part)."""
    view = memoryview(body)
    if len(view) < GROUP_HEADER_SIZE:
        raise WireError(f"group transaction header needs {GROUP_HEADER_SIZE} bytes, got {len(view)}")
    magic, version, _flags, txn, count = GROUP_HEAD.unpack_from(view)
    if magic != GROUP_MAGIC:
        raise WireError(f"bad group transaction magic {bytes(magic)!r}")
    if zlib.crc32(view[:GROUP_HEAD.size]) != _CRC.unpack_from(view, GROUP_HEAD.size)[0]:
        raise WireError("group transaction header checksum mismatch")
    if version != GROUP_VERSION:
        raise WireError(f"group transaction version {version} is not supported (this side knows {GROUP_VERSION})")
    if txn == 0:
        raise WireError("group transaction id 0")
    if not 1 <= count <= max_parts:
        raise WireError(f"group transaction has {count} parts (1 to {max_parts} allowed)")
    pos = GROUP_HEADER_SIZE
    parts: list[GroupPart] = []
    seen: set[tuple[str, bool]] = set()
    for index in range(count):
        if len(view) - pos < GROUP_PART_HEAD.size:
            raise WireError(f"part {index} at byte {pos}: truncated part header")
        name_len, flags, complete, length = GROUP_PART_HEAD.unpack_from(view, pos)
        if not 1 <= name_len <= MAX_GROUP_NAME:
            raise WireError(f"part {index} at byte {pos}: volume name of {name_len} bytes")
        if flags & ~GROUP_PART_OVERLAY:
            raise WireError(f"part {index} at byte {pos}: unknown flags {flags:#x}")
        name_end = pos + GROUP_PART_HEAD.size + name_len
        if name_end + 4 > len(view):
            raise WireError(f"part {index} at byte {pos}: truncated part header")
        if zlib.crc32(view[pos:name_end]) != _CRC.unpack_from(view, name_end)[0]:
            raise WireError(f"part {index} at byte {pos}: part header checksum mismatch")
        try:
            volume = bytes(view[pos + GROUP_PART_HEAD.size:name_end]).decode()
        except UnicodeDecodeError:
            raise WireError(f"part {index} at byte {pos}: volume name is not utf-8") from None
        start = name_end + 4
        if length > len(view) - start:
            raise WireError(f"part {index} ({volume}) is truncated: its records need {length} bytes, "
                            f"{len(view) - start} left")
        overlay = bool(flags & GROUP_PART_OVERLAY)
        if (volume, overlay) in seen:
            raise WireError(f"part {index}: volume {volume} has two {'overlay' if overlay else 'mirror'} parts")
        seen.add((volume, overlay))
        parts.append(GroupPart(volume, overlay, complete, view[start:start + length]))
        pos = start + length
    if pos != len(view):
        raise WireError(f"{len(view) - pos} bytes after the last part of the group transaction")
    return GroupTxn(txn, parts)
