"""The header every binary state file carries, and reading/writing such files.

Layout (little endian), followed by the body::

    magic        8s   identifies the kind of file (b"DRTBAD\\0\\0", ...)
    version      H    format version of that kind
    flags        H    reserved, zero
    region_size  I
    region_count Q
    generation   Q    incremented by every save
    seq          Q    replication-log sequence the file's content covers
    volume_id    16s  the volume's UUID: a file from another volume is foreign
    checksum     32s  blake3 of the header (checksum zeroed) and the body

A file that is short, has another magic or volume id, another geometry, or a
checksum that does not match is refused with :class:`CorruptStateFile`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import blake3

from drtool.errors import CorruptStateFile
from drtool.storage.atomic import write_atomic

HEADER = struct.Struct("<8sHHIQQQ16s32s")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MapHeader:
    magic: bytes
    version: int
    region_size: int
    region_count: int
    generation: int
    seq: int
    volume_id: bytes


def _checksum(header_without_sum: bytes, body: bytes | memoryview) -> bytes:
    hasher = blake3.blake3(header_without_sum)
    hasher.update(body)
    return hasher.digest()


def encode(header: MapHeader, body: bytes | bytearray | memoryview) -> list[bytes]:
    raw = HEADER.pack(
        header.magic, header.version, 0, header.region_size, header.region_count,
        header.generation, header.seq, header.volume_id, b"\0" * 32,
    )
    packed = HEADER.pack(
        header.magic, header.version, 0, header.region_size, header.region_count,
        header.generation, header.seq, header.volume_id, _checksum(raw, body),
    )
    return [packed, bytes(body)]


def save(path: str, header: MapHeader, body: bytes | bytearray | memoryview) -> None:
    write_atomic(path, encode(header, body))


def load(
    path: str,
    magic: bytes,
    what: str,
    region_size: int,
    region_count: int,
    volume_id: bytes,
    body_size: int,
) -> tuple[MapHeader, bytearray]:
    """Read and check a state file; return its header and body."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CorruptStateFile(path, f"the {what} is missing") from None
    except OSError as exc:
        raise CorruptStateFile(path, f"cannot read the {what}: {exc.strerror}") from None
    if len(data) < HEADER.size:
        raise CorruptStateFile(path, f"truncated {what} ({len(data)} bytes, header needs {HEADER.size})")
    fields = HEADER.unpack_from(data)
    got_magic, version, _flags, rsize, rcount, generation, seq, vid, checksum = fields
    if got_magic != magic:
        raise CorruptStateFile(path, f"not a drtool {what} (magic {got_magic!r}, expected {magic!r})")
    if version != FORMAT_VERSION:
        raise CorruptStateFile(path, f"{what} format version {version} is not supported (expected {FORMAT_VERSION})")
    if vid != volume_id:
        raise CorruptStateFile(path, f"{what} belongs to another volume")
    if rsize != region_size or rcount != region_count:
        raise CorruptStateFile(
            path,
            f"{what} is for {rcount} regions of {rsize} bytes, volume has {region_count} of {region_size}",
        )
    body = memoryview(data)[HEADER.size:]
    if len(body) != body_size:
        raise CorruptStateFile(path, f"{what} body is {len(body)} bytes, expected {body_size} (torn or truncated)")
    raw = HEADER.pack(got_magic, version, 0, rsize, rcount, generation, seq, vid, b"\0" * 32)
    if _checksum(raw, body) != checksum:
        raise CorruptStateFile(path, f"{what} checksum mismatch (torn write or damage)")
    return MapHeader(got_magic, version, rsize, rcount, generation, seq, vid), bytearray(body)


def exists(path: str) -> bool:
    return os.path.exists(path)
