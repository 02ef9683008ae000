"""Where a connection's bytes wait: replies to be sent, and write buffers to reuse."""

from __future__ import annotations

import socket
import threading
from typing import Callable

from drtool.buffers import aligned_bytes

from drtool.nbd.export import Buffer
from drtool.nbd.stream import send_buffers


class Outbox:
    """Replies ready to go; the first thread to find nobody sending sends them all.

    Threads that finish requests add their replies and call ``flush``; if
    another thread is already sending, they return at once and that thread
    takes their replies along in its next ``sendmsg``.  So replies that are
    ready together leave together, and a thread never waits for another's
    send unless it asks to (``block=True``: bounded memory).
    """

    def __init__(self, sock: socket.socket, on_failure: Callable[[OSError], None]) -> None:
        self._sock = sock
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        self._buffers: list[Buffer] = []
        #: bytes waiting; read without the lock to decide when to flush
        self.pending_bytes = 0
        self._sending = False
        self._blocked = 0  # threads waiting in flush(block=True)
        self._broken = False

    def add(self, buffers: list[Buffer], nbytes: int) -> None:
        with self._lock:
            self._buffers += buffers
            self.pending_bytes += nbytes

    def flush(self, block: bool = False) -> None:
        while True:
            with self._lock:
                while self._sending:
                    if not block:
                        return
                    self._blocked += 1
                    self._sent.wait()
                    self._blocked -= 1
                if not self._buffers:
                    return
                buffers, nbytes = self._buffers, self.pending_bytes
                self._buffers, self.pending_bytes = [], 0
                self._sending = True
            try:
                if not self._broken:
                    send_buffers(self._sock, buffers, nbytes)
            except OSError as error:
                self._broken = True
                self._on_failure(error)
            finally:
                with self._lock:
                    self._sending = False
                    if self._blocked:
                        self._sent.notify_all()


class PayloadPool:
    """WRITE payload buffers, reused so that receiving a write allocates nothing.

    Buffers come in power-of-two sizes; at most ``max_cached`` bytes of idle
    buffers are kept.
    """

    _SMALLEST = 4096

    def __init__(self, max_cached: int) -> None:
        self._max_cached = max_cached
        self._cached = 0
        self._free: dict[int, list[bytearray]] = {}
        self._lock = threading.Lock()

    def take(self, length: int) -> bytearray:
        size = max(self._SMALLEST, 1 << (length - 1).bit_length())
        with self._lock:
            free = self._free.get(size)
            if free:
                self._cached -= size
                return free.pop()
        return aligned_bytes(size)  # type: ignore[return-value]  # a page-aligned memoryview

    def give(self, buffer: bytearray) -> None:
        size = len(buffer)
        with self._lock:
            if self._cached + size <= self._max_cached:
                self._free.setdefault(size, []).append(buffer)
                self._cached += size
