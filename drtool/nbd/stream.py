"""Socket I/O shared by the handshake and the transmission phase.

Requests are parsed straight out of one reusable receive buffer (no object
per header), WRITE payloads are received into the caller's buffer, and
replies leave in as few ``sendmsg`` calls as possible.
"""

from __future__ import annotations

import os
import socket
from typing import Sequence

from drtool.nbd.export import Buffer

_RECEIVE_BUFFER = 256 * 1024
#: most buffers one sendmsg takes (Linux UIO_MAXIOV)
IOV_MAX = os.sysconf("SC_IOV_MAX")


class ClientGone(Exception):
    """The client closed or reset the connection, or went silent too long."""


class ProtocolViolation(Exception):
    """The client broke a MUST of the protocol; the connection is dropped."""


class SocketReader:
    """Buffered reads from a socket.

    ``buffer`` and ``start`` expose the unread bytes (``start`` to ``end``) so
    the transmission loop can unpack headers in place; it advances ``start``.
    """

    def __init__(self, sock: socket.socket, size: int = _RECEIVE_BUFFER) -> None:
        self._sock = sock
        self.buffer = bytearray(size)
        self._view = memoryview(self.buffer)
        self.start = 0
        self.end = 0

    def fill(self, wanted: int) -> bool:
        """Buffer at least ``wanted`` bytes (wanted <= buffer size).

        Returns False when the client closed the connection cleanly with
        nothing buffered; raises ClientGone when it closed in the middle.
        """
        if self.end - self.start >= wanted:
            return True
        if self.start == self.end:
            self.start = self.end = 0  # empty: receive into the whole buffer
        elif self.start + wanted > len(self.buffer):
            # Move the partial message to the front to make room after it.
            pending = self.end - self.start
            self._view[:pending] = self._view[self.start:self.end]
            self.start, self.end = 0, pending
        while self.end - self.start < wanted:
            try:
                received = self._sock.recv_into(self._view[self.end:])
            except OSError as error:  # includes socket timeouts
                raise ClientGone(str(error)) from error
            if not received:
                if self.end == self.start:
                    return False
                raise ClientGone(f"connection closed {self.end - self.start} bytes into a message")
            self.end += received
        return True

    def read_exact(self, length: int) -> bytes:
        """The next ``length`` bytes (at most the buffer size: handshake messages)."""
        if not self.fill(length):
            raise ClientGone("connection closed")
        data = bytes(self._view[self.start:self.start + length])
        self.start += length
        return data

    def readinto(self, target: memoryview) -> None:
        """Fill ``target`` completely: buffered bytes first, then straight from the socket."""
        buffered = min(self.end - self.start, len(target))
        target[:buffered] = self._view[self.start:self.start + buffered]
        self.start += buffered
        filled = buffered
        while filled < len(target):
            try:
                received = self._sock.recv_into(target[filled:])
            except OSError as error:
                raise ClientGone(str(error)) from error
            if not received:
                raise ClientGone(f"connection closed after {filled} of {len(target)} bytes")
            filled += received

    def discard(self, length: int) -> None:
        """Drop ``length`` bytes of the stream (the payload of a refused WRITE)."""
        while length:
            if not self.fill(1):
                raise ClientGone("connection closed in the middle of a payload")
            step = min(length, self.end - self.start)
            self.start += step
            length -= step


def send_buffers(sock: socket.socket, buffers: Sequence[Buffer], total: int) -> None:
    """Send ``buffers`` (``total`` bytes in all) with as few syscalls as possible.

    One sendmsg usually takes everything; a signal, a full send buffer or more
    than IOV_MAX buffers can cut it short, and the rest follows from there.
    """
    if len(buffers) <= IOV_MAX:
        sent = sock.sendmsg(buffers)
        if sent == total:
            return
    else:
        sent = 0
    views = [memoryview(buffer).cast("B") for buffer in buffers]
    index = 0
    while True:
        while index < len(views) and sent >= len(views[index]):
            sent -= len(views[index])
            index += 1
        if index == len(views):
            return
        views[index] = views[index][sent:]
        sent = sock.sendmsg(views[index:index + IOV_MAX])
