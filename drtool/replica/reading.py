"""Reading a replica for a client: batched frames and plain byte ranges.

Sources: the mirror, a snapshot (preserved regions, else the mirror) or the
overlay replica merged over the mirror.  The volume's shared lock is held only
while the bytes of one batch are copied into a buffer, together with their
digests, so each frame is consistent and a slow client never stalls applies.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
from collections.abc import Callable

from drtool.buffers import aligned_bytes
from drtool.errors import DeviceError
from drtool.regions import Geometry
from drtool.replica.snapshots import Snapshot
from drtool.replica.volume import ReplicaVolume
from drtool.replica.tables import DigestTable
from drtool.storage.device import Device
from drtool.wire import (FRAME_DATA, FRAME_END, FRAME_ERROR, FRAME_HEADER_SIZE, FRAME_ZERO,
                         encode_frame_header, zero_digest)

Resolver = Callable[[int], tuple[Device, DigestTable]]
BATCH_BYTES = 4 << 20
_IOV_MAX = 1024


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


def plan_frames(volume: ReplicaVolume, regions: list[int], resolve: Resolver) -> tuple[list[bool], int]:
    """Which regions go out as ZERO frames, and the exact response length."""
    geometry = volume.geometry
    with volume.lock.shared():
        zero = [resolve(r)[1].is_zero(r) for r in regions]
    data = sum(geometry.region_length(r) for r, z in zip(regions, zero) if not z)
    return zero, data + FRAME_HEADER_SIZE * (len(regions) + 1)


def stream_frames(volume: ReplicaVolume, regions: list[int], zero: list[bool], resolve: Resolver,
                  sock: socket.socket) -> None:
    """Send one frame per region (as planned), then END.

    Each batch is read with one preadv per run of adjacent regions and sent
    with one sendmsg; Python work per region is kept to a header.
    """
    geometry = volume.geometry
    buffer = aligned_bytes(max(BATCH_BYTES, geometry.region_size))
    index, total = 0, len(regions)
    while index < total:
        views: list[bytes | memoryview] = []
        runs: list[tuple[Device, int, int, list[tuple[int, DigestTable, int]]]] = []  # device, offset, at, regions
        used = 0
        with volume.lock.shared():
            while index < total and len(views) < _IOV_MAX - 2:
                region = regions[index]
                length = geometry.region_length(region)
                if not zero[index] and used + length > len(buffer):
                    break
                device, table = resolve(region)
                if zero[index]:
                    if table.is_zero(region):
                        views.append(encode_frame_header(FRAME_ZERO, region, length, zero_digest(length)))
                    else:  # written since the plan: no room for its bytes, ask for a re-read
                        views.append(encode_frame_header(FRAME_ERROR, region, 0))
                else:
                    offset = geometry.region_start(region)
                    last = runs[-1] if runs else None
                    if last and last[0] is device and last[1] + (used - last[2]) == offset:  # continues the run
                        last[3].append((region, table, len(views)))
                    else:
                        runs.append((device, offset, used, [(region, table, len(views))]))
                    views.append(b"")  # the header, filled in once the bytes are read
                    views.append(buffer[used:used + length])
                    used += length
                index += 1
            for device, offset, at, members in runs:
                _read_run(geometry, device, offset, buffer, at, members, views)
        send_views(sock, views)
    send_views(sock, [encode_frame_header(FRAME_END, total, 0)])


def _read_run(geometry: Geometry, device: Device, offset: int, buffer: memoryview, at: int,
              members: list[tuple[int, DigestTable, int]], views: list[bytes | memoryview]) -> None:
    """Read adjacent regions in one call; if that fails, region by region (ERROR frames for the bad)."""
    size = sum(len(views[slot + 1]) for _, _, slot in members)
    try:
        device.readinto(buffer[at:at + size], offset)
    except DeviceError:
        for region, table, slot in members:
            data = views[slot + 1]
            assert isinstance(data, memoryview)
            views[slot:slot + 2] = _data_frame(device, table, region, geometry.region_start(region), data)
        return
    for region, table, slot in members:
        views[slot] = encode_frame_header(FRAME_DATA, region, len(views[slot + 1]), table.digest(region))


def _data_frame(device: Device, table: DigestTable, region: int, offset: int,
                slot: memoryview) -> list[bytes | memoryview]:
    """One region read alone: a DATA frame, or an ERROR frame when the mirror cannot read it."""
    try:
        device.readinto(slot, offset)
    except DeviceError as exc:
        # Same length as the DATA frame it replaces, so the declared Content-Length holds.
        message = str(exc).encode()[:len(slot)]
        slot[:len(message)] = message
        slot[len(message):] = bytes(len(slot) - len(message))
        return [encode_frame_header(FRAME_ERROR, region, len(slot)), slot]
    return [encode_frame_header(FRAME_DATA, region, len(slot), table.digest(region)), slot]


def stream_range(volume: ReplicaVolume, start: int, length: int, resolve: Resolver | None,
                 sock: socket.socket) -> None:
    """Send bytes [start, start+length) of the source; ``resolve`` None = the mirror by sendfile."""
    if resolve is None and not isinstance(sock, ssl.SSLSocket):
        assert volume.mirror.image is not None
        _sendfile(sock, volume.mirror.image.fd, start, length)
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


def _sendfile(sock: socket.socket, fd: int, offset: int, count: int) -> None:
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


def send_views(sock: socket.socket, views: list[bytes | memoryview]) -> None:
    """Send buffers in as few syscalls as possible (sendmsg gathers them; TLS cannot)."""
    if isinstance(sock, ssl.SSLSocket):
        # TLS encrypts (copies) anyway; joining saves a TLS record per 56-byte header.
        for start in range(0, len(views), 64):
            sock.sendall(b"".join(views[start:start + 64]))
        return
    pending = [memoryview(v).cast("B") for v in views]
    first = 0
    while first < len(pending):
        sent = sock.sendmsg(pending[first:first + _IOV_MAX])
        while first < len(pending) and sent >= len(pending[first]):
            sent -= len(pending[first])
            first += 1
        if sent:
            pending[first] = pending[first][sent:]
