"""Reading a replica for a client: batched frames and plain byte ranges.

Sources: the mirror, a snapshot (preserved regions, else the mirror) or the
overlay replica merged over the mirror.

The server does not hash what it sends: the client verifies every region end to
end against the digest the primary expects (drtool.client), and the server's own
scrub and ``drtool verify`` cover its disk.  So the regions' bytes go from the
image to the socket with ``sendfile`` on a plain connection (no copy through this
process), or are read into one buffer and written in large writes under TLS.  The
volume's shared lock is held only while a batch's digests are looked up, never
while a client is being written to, so a slow client never stalls applies; a
region rewritten between the two fails the client's check and is read again.

What the server knows is wrong it does not send: a region its scrub (or an earlier
failed read) marked bad is read and hashed before it goes out, and becomes an
ERROR frame when it still does not match.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
from collections.abc import Callable
from typing import NamedTuple

import blake3

from drtool.buffers import aligned_bytes
from drtool.errors import DeviceError, DrtoolError
from drtool.regions import Geometry
from drtool.replica import scrub
from drtool.replica.snapshots import Snapshot
from drtool.replica.volume import ReplicaVolume
from drtool.replica.tables import DigestTable
from drtool.storage.device import Device
from drtool.wire import (FRAME_DATA, FRAME_END, FRAME_ERROR, FRAME_HEADER_SIZE, FRAME_ZERO,
                         encode_frame_header, encode_run_head, run_payload_length, zero_digest)

log = logging.getLogger("drtool.replica")

Resolver = Callable[[int], tuple[Device, DigestTable]]
BATCH_BYTES = 4 << 20  # region bytes looked up under the lock at once; also the most a RUN frame carries
_IOV_MAX = 1024
_TLS_JOIN = 64 << 10  # under TLS, pieces smaller than this are joined into one write
# errno values of os.sendfile that are the image's fault (the rest are the socket's)
_READ_ERRNOS = frozenset({errno.EIO, errno.ENXIO, errno.ENODATA, errno.EBADMSG, errno.EUCLEAN})


def resolver(volume: ReplicaVolume, snapshot: Snapshot | None, overlay: bool) -> Resolver:
    """Where each region's bytes and digest come from."""
    mirror = (volume.mirror.image, volume.mirror.table)
    if snapshot is not None:
        preserved = (snapshot.data, snapshot.table)
        return lambda r: preserved if snapshot.table.present(r) else mirror  # type: ignore[return-value]
    if overlay:
        top = (volume.overlay.image, volume.overlay.table)
        return lambda r: top if volume.overlay.table.present(r) else mirror  # type: ignore[return-value]
    return lambda r: mirror  # type: ignore[return-value]


def _target(volume: ReplicaVolume, device: Device) -> str | None:
    """The scrub's name for the image ``device`` is ("mirror", "overlay"; None: a snapshot's)."""
    if device is volume.mirror.image:
        return "mirror"
    if device is volume.overlay.image:
        return "overlay"
    return None


# What a unit of the response is: one region as ZERO, DATA or CHECK (read and hashed here
# first: marked bad), or a RUN of adjacent full regions.
ZERO, DATA, CHECK, RUN = range(4)


class Unit(NamedTuple):
    kind: int
    first: int
    count: int
    length: int  # of each region


class Plan(NamedTuple):
    units: list[Unit]
    regions: int
    length: int  # the response's exact Content-Length


def plan_frames(volume: ReplicaVolume, regions: list[int], resolve: Resolver, runs: bool = False) -> Plan:
    """The response's frames and its exact length, decided before its head is sent.

    ``runs``: the client reads RUN frames; requested regions that follow each other (in the
    request and in the volume) go out as one, up to BATCH_BYTES."""
    geometry = volume.geometry
    full = geometry.region_size
    cap = max(1, BATCH_BYTES // full)
    marked = scrub.state_of(volume).marked()
    units: list[Unit] = []
    with volume.lock.shared():
        for region in regions:
            device, table = resolve(region)
            length = geometry.region_length(region)
            if table.is_zero(region):
                units.append(Unit(ZERO, region, 1, length))
            elif marked and region in marked.get(_target(volume, device) or "", ()):
                units.append(Unit(CHECK, region, 1, length))
            elif runs and length == full:
                last = units[-1] if units else None
                if last and last.kind == RUN and last.first + last.count == region and last.count < cap:
                    units[-1] = last._replace(count=last.count + 1)
                else:
                    units.append(Unit(RUN, region, 1, length))
            else:
                units.append(Unit(DATA, region, 1, length))
    # A run of one region is a DATA frame: the same bytes, without a run table.
    units = [u._replace(kind=DATA) if u.kind == RUN and u.count == 1 else u for u in units]
    size = FRAME_HEADER_SIZE  # END
    for unit in units:
        if unit.kind == RUN:
            size += FRAME_HEADER_SIZE + run_payload_length(unit.count, unit.length)
        else:
            size += FRAME_HEADER_SIZE + (0 if unit.kind == ZERO else unit.length)
    return Plan(units, len(regions), size)


class _Segment(NamedTuple):
    """Bytes to send from an image (``device`` None: ``data`` is already in memory)."""
    device: Device | None
    offset: int
    length: int
    data: bytes | memoryview = b""


class _Batch(NamedTuple):
    pieces: list[bytes | _Segment]  # headers (bytes) and the segments after them, in order
    targets: dict[int, str | None]  # region -> scrub target, for regions sent from an image


def stream_frames(volume: ReplicaVolume, plan: Plan, resolve: Resolver, sock: socket.socket,
                  copy: bool | None = None) -> None:
    """Send the planned frames, then END.

    A batch of up to BATCH_BYTES of regions is looked up under the shared lock (digests,
    which image); its bytes are then sent outside it.  ``copy``: read them into a buffer
    instead of ``sendfile`` (default: only under TLS, which must encrypt them)."""
    sender = _Sender(volume, sock, isinstance(sock, ssl.SSLSocket) if copy is None else copy)
    units = plan.units
    index = 0
    while index < len(units):
        batch = _Batch([], {})
        used = 0
        with volume.lock.shared():
            while index < len(units) and (used == 0 or used + _bytes(units[index]) <= BATCH_BYTES):
                unit = units[index]
                used += _bytes(unit)
                _lookup(volume, unit, resolve, batch)
                index += 1
        sender.send(batch)
    sender.pending.append(encode_frame_header(FRAME_END, plan.regions, 0))
    sender.flush()


def _bytes(unit: Unit) -> int:
    return 0 if unit.kind == ZERO else unit.count * unit.length


def _lookup(volume: ReplicaVolume, unit: Unit, resolve: Resolver, batch: _Batch) -> None:
    """The frames of one unit, under the volume's shared lock."""
    geometry = volume.geometry
    region, length = unit.first, unit.length
    if unit.kind == ZERO:
        device, table = resolve(region)
        if table.is_zero(region):
            batch.pieces.append(encode_frame_header(FRAME_ZERO, region, length, zero_digest(length)))
        else:  # written since the plan: no room for its bytes, ask for a re-read
            batch.pieces.append(encode_frame_header(FRAME_ERROR, region, 0))
        return
    if unit.kind == CHECK:
        device, table = resolve(region)
        batch.pieces.extend(_checked_frame(device, table, region, geometry.region_start(region), length))
        return
    digests = []
    segments: list[_Segment] = []
    for member in range(region, region + unit.count):
        device, table = resolve(member)
        digests.append(table.digest(member))
        batch.targets[member] = _target(volume, device)
        offset = geometry.region_start(member)
        last = segments[-1] if segments else None
        if last and last.device is device and last.offset + last.length == offset:
            segments[-1] = last._replace(length=last.length + length)
        else:
            segments.append(_Segment(device, offset, length))
    if unit.kind == RUN:
        batch.pieces.append(encode_run_head(region, length, digests))
    else:
        batch.pieces.append(encode_frame_header(FRAME_DATA, region, length, digests[0]))
    batch.pieces.extend(segments)


def _checked_frame(device: Device, table: DigestTable, region: int, offset: int,
                   length: int) -> list[bytes | _Segment]:
    """A region marked bad, read and hashed here: a DATA frame if it matches its digest now
    (rewritten since), else an ERROR frame of the same length saying why."""
    data = bytearray(length)
    try:
        device.readinto(data, offset)
    except DeviceError as exc:
        message = str(exc)
    else:
        digest = table.digest(region)
        if blake3.blake3(data).digest() == digest:
            return [encode_frame_header(FRAME_DATA, region, length, digest), _Segment(None, 0, length, data)]
        message = (f"region {region} is damaged on the secondary: its bytes do not match the digest "
                   "stored for them (found by the replica's scrub or an earlier read)")
    encoded = message.encode()[:length]
    return [encode_frame_header(FRAME_ERROR, region, length),
            _Segment(None, 0, length, encoded + bytes(length - len(encoded)))]


class _Sender:
    """Writes batches: headers gathered into one sendmsg, region bytes by sendfile (plain
    socket) or read into one buffer and written in large writes (TLS)."""

    def __init__(self, volume: ReplicaVolume, sock: socket.socket, copy: bool) -> None:
        self.volume = volume
        self.sock = sock
        self.tls = copy
        self.buffer = aligned_bytes(BATCH_BYTES) if self.tls else memoryview(b"")
        self.pending: list[bytes | memoryview] = []  # to send, in order
        self.used = 0  # bytes of the buffer the pending views hold
        self.failed: dict[str | None, list[int]] = {}

    def send(self, batch: _Batch) -> None:
        for piece in batch.pieces:
            if isinstance(piece, bytes):
                self.pending.append(piece)
            elif piece.device is None:
                self.pending.append(piece.data)
            elif self.tls:
                self._read(piece, batch.targets)
            else:
                self.flush(more=True)
                self._sendfile(piece, batch.targets)
        self.flush(more=True)
        self._remember()

    def flush(self, more: bool = False) -> None:
        if self.pending:
            send_views(self.sock, self.pending, socket.MSG_MORE if more and not self.tls else 0)
        self.pending, self.used = [], 0

    def _read(self, segment: _Segment, targets: dict[int, str | None]) -> None:
        """A segment's bytes into the TLS buffer, sent whenever it is full."""
        assert segment.device is not None
        position, end = segment.offset, segment.offset + segment.length
        while position < end:
            if self.used == len(self.buffer):
                self.flush(more=True)
            step = min(end - position, len(self.buffer) - self.used)
            part = self.buffer[self.used:self.used + step]
            try:
                segment.device.readinto(part, position)
            except DeviceError:
                self._read_regions(segment.device, part, position, targets)
            self.pending.append(part)
            self.used += step
            position += step

    def _read_regions(self, device: Device, part: memoryview, offset: int, targets: dict[int, str | None]) -> None:
        """``part`` region by region after a failed read: what cannot be read is zeros (the
        client's digest check refuses them) and is remembered."""
        geometry = self.volume.geometry
        done = 0
        while done < len(part):
            region = geometry.region_of(offset + done)
            step = min(len(part) - done, geometry.region_start(region) + geometry.region_length(region)
                       - (offset + done))
            try:
                device.readinto(part[done:done + step], offset + done)
            except DeviceError as exc:
                part[done:done + step] = bytes(step)
                self._failed(region, targets, str(exc))
            done += step

    def _sendfile(self, segment: _Segment, targets: dict[int, str | None]) -> None:
        assert segment.device is not None
        geometry = self.volume.geometry
        out = self.sock.fileno()
        position, end = segment.offset, segment.offset + segment.length
        while position < end:
            try:
                sent = os.sendfile(out, segment.device.fd, position, end - position)
            except BlockingIOError:
                _wait_writable(self.sock)
                continue
            except OSError as exc:
                if exc.errno not in _READ_ERRNOS:
                    raise
                sent, reason = 0, f"{segment.device.path}: I/O error ({errno.errorcode.get(exc.errno)}) " \
                                  f"at offset {position}"
            else:
                reason = f"{segment.device.path}: short read (image ends early) at offset {position}"
            if sent:
                position += sent
                continue
            # The image could not give these bytes: the rest of the region goes as zeros.
            region = geometry.region_of(position)
            region_end = min(geometry.region_start(region) + geometry.region_length(region), end)
            send_views(self.sock, [bytes(region_end - position)], socket.MSG_MORE)
            self._failed(region, targets, reason)
            position = region_end

    def _failed(self, region: int, targets: dict[int, str | None], reason: str) -> None:
        target = targets.get(region)
        log.warning("replica %s: region %s (%s) could not be read for a client: %s", self.volume.name, region,
                    target or "snapshot", reason)
        self.failed.setdefault(target, []).append(region)

    def _remember(self) -> None:
        """Regions that failed to read go in the scrub's bad marks: a retry gets an ERROR frame."""
        for target, regions in self.failed.items():
            if target is not None:
                try:
                    scrub.state_of(self.volume).found_unreadable(target, regions)
                except DrtoolError as exc:  # scrub.json cannot be written: the marks stay in memory
                    log.warning("replica %s: %s", self.volume.name, exc)
        self.failed.clear()


def stream_range(volume: ReplicaVolume, start: int, length: int, resolve: Resolver | None,
                 sock: socket.socket) -> None:
    """Send bytes [start, start+length) of the source; ``resolve`` None = the mirror by sendfile."""
    if resolve is None and not isinstance(sock, ssl.SSLSocket):
        assert volume.mirror.image is not None
        _sendfile_range(sock, volume.mirror.image.fd, start, length)
        return
    resolve = resolve or resolver(volume, None, False)
    geometry = volume.geometry
    buffer = aligned_bytes(BATCH_BYTES)
    position, end = start, start + length
    while position < end:
        step = min(end - position, len(buffer))
        with volume.lock.shared():
            for region, in_region, count in geometry.split(position, step):
                device, _ = resolve(region)
                at = geometry.region_start(region) + in_region
                device.readinto(buffer[at - position:at - position + count], at)
        send_views(sock, [buffer[:step]])
        position += step


def _sendfile_range(sock: socket.socket, fd: int, offset: int, count: int) -> None:
    out = sock.fileno()
    while count:
        try:
            sent = os.sendfile(out, fd, offset, min(count, 1 << 30))
        except BlockingIOError:
            _wait_writable(sock)
            continue
        if sent == 0:
            raise ConnectionError("the replica image ended early")
        offset += sent
        count -= sent


def _wait_writable(sock: socket.socket) -> None:
    _, ready, _ = select.select([], [sock], [], sock.gettimeout())
    if not ready:
        raise TimeoutError("client stopped reading")


def send_views(sock: socket.socket, views: list[bytes | memoryview], flags: int = 0) -> None:
    """Send buffers in as few syscalls as possible (sendmsg gathers them; TLS cannot).
    ``flags``: MSG_MORE when more bytes follow at once (the kernel then holds a small header
    back to go out with them)."""
    if isinstance(sock, ssl.SSLSocket):
        # TLS encrypts (copies) anyway: small pieces (headers, run tables) are joined, which
        # saves a TLS record each; a large one (a region's bytes) is written as it is.
        small: list[bytes | memoryview] = []
        for view in views:
            if len(view) < _TLS_JOIN:
                small.append(view)
                continue
            if small:
                sock.sendall(b"".join(small))
                small = []
            sock.sendall(view)
        if small:
            sock.sendall(b"".join(small))
        return
    pending = [memoryview(v).cast("B") for v in views]
    first = 0
    while first < len(pending):
        sent = sock.sendmsg(pending[first:first + _IOV_MAX], [], flags)
        while first < len(pending) and sent >= len(pending[first]):
            sent -= len(pending[first])
            first += 1
        if sent:
            pending[first] = pending[first][sent:]
