"""One client connection: the handshake, then the transmission phase.

Threading model.  One thread at a time holds the connection's *reader*
role: it parses the next request straight out of the receive buffer (WRITE
payloads go into reused buffers), answers malformed ones itself, and runs
valid ones itself, in order.  While the export answers quickly that is all
there is: no hand-off, no thread switch, no GIL ping-pong.

When an export call lasts watch.STUCK_AFTER (a region fetched from the
replica, a cold disk, an fsync), the server's StallWatch gives the reader
role to another of the connection's threads (started on demand, at most
``workers`` besides the first), which goes on with the requests behind it.
The stuck thread finishes its call, sends its reply, and then either takes
the role back at once (if the reader is itself inside a call: no thread to
wake) or waits to be given it.  Stalls come in runs (a degraded volume
fetches region after region), so after one the reader hands the role on
*before* each of the next few calls: _FIRST_HAND_OFFS, doubled (up to
_MOST_HAND_OFFS) each time another stall follows within _RECURRENCE calls.
(Not "until calls are fast again": hand-offs slow calls down by moving the
GIL, which would keep them going by themselves.)  A slow call thus holds up
the others for about STUCK_AFTER at most, and up to 1 + ``workers`` calls
run at once.  ``workers=0`` never hands off (for exports that never wait).

Why not the classic reader feeding a worker pool: measured on 2 cores with
bench/nbd_read.py, handing every request to a worker wakes a thread and
moves the GIL at each syscall; for 4 KiB reads from the page cache that
cost ~3 times the CPU per request and half the IOPS, for nothing: the work
itself (a copy, drtool's blake3 check) holds the GIL or is a syscall the
reader makes just as fast.  Threads pay off only when calls wait, and that
is when they are used here; then passing the role keeps 1 + ``workers``
calls going where a pool keeps ``workers``.  A false alarm (a call slowed by
the scheduler on a busy machine) costs 1 + _FIRST_HAND_OFFS hand-offs.

Replies.  A finished reply joins the connection's Outbox; whoever finds
nobody sending sends everything there with one ``sendmsg`` (headers and data
buffers, no copy).  The reader holds its replies back while more requests
are already buffered and sends before it waits for the client; with
2 * max_request bytes unsent it waits for the client to read: a client that
sends requests but never reads replies is pushed back on, not buffered for.

Nothing a client sends can kill more than its own connection: malformed
requests get an error reply, a broken stream (bad magic, truncation, a
hang-up) ends the connection, and requests already received are completed
first.  A write is acknowledged only after the export's ``write`` returned.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from queue import SimpleQueue
from typing import Callable

from drtool.nbd import protocol as p
from drtool.nbd.buffers import Outbox, PayloadPool
from drtool.nbd.handshake import ExportRegistry, Negotiation, Session
from drtool.nbd.requests import DISC, EINVAL, WRITE, RequestRules, execute
from drtool.nbd.stream import ClientGone, ProtocolViolation, SocketReader
from drtool.nbd.watch import StallWatch

log = logging.getLogger("drtool.nbd")

#: the reader sends its held-back replies once they reach this size
_HOLD_BACK_BYTES = 256 * 1024
#: calls before which the reader hands its role on after a first stall ...
_FIRST_HAND_OFFS = 8
#: ... and at most, when stalls keep following within _RECURRENCE calls
_MOST_HAND_OFFS = 512
_RECURRENCE = 64

_REPLY_MAGIC = p.SIMPLE_REPLY_MAGIC
_REPLY_SIZE = p.SIMPLE_REPLY.size
_pack_reply = p.SIMPLE_REPLY.pack


class Connection:
    """Serves one accepted socket until the client leaves or the server stops."""

    def __init__(self, sock: socket.socket, peer: str, exports: ExportRegistry, *,
                 max_request: int, workers: int, handshake_timeout: float,
                 watch: StallWatch | None, on_close: Callable[[Connection], None]) -> None:
        self.peer = peer
        self._sock = sock
        self._reader = SocketReader(sock)
        self._exports = exports
        self._max_request = max_request
        self._max_unsent = 2 * max_request
        self._handshake_timeout = handshake_timeout
        self._watch = watch if workers else None
        self._max_threads = 1 + workers
        self._on_close = on_close
        self._socket_lock = threading.Lock()  # orders shutdown() against close()
        self._closed = False
        self._outbox = Outbox(sock, self._on_send_failure)
        self._payloads = PayloadPool(2 * max_request)
        self._session: Session | None = None
        self._rules: RequestRules | None = None
        self._finished = threading.Event()
        #: perf_counter() when the reader began its current export call, else None
        self.busy_since: float | None = None
        # The threads (see the module docstring); _lock guards what follows.
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"nbd {peer}", daemon=True)]
        self._epoch = 0  # which turn of the reader role is current
        self._turns: SimpleQueue[int | None] = SimpleQueue()  # the role for an idle thread; None: exit
        self._idle = 0  # threads waiting for a turn
        self._hand_offs = 0  # calls left before which to pass the role on
        self._hand_off_run = _FIRST_HAND_OFFS  # hand-offs the last stall earned
        self._calls_since_hand_offs = _RECURRENCE  # inline calls since the last hand-off
        self._closing = False

    def start(self) -> None:
        self._threads[0].start()

    def join(self, timeout: float | None) -> bool:
        """Wait for the connection to end; say whether it did."""
        return self._finished.wait(timeout)

    def stop_reading(self) -> None:
        """Take no new requests; finish those in flight, then close."""
        self._shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        """Hard disconnect: also unblocks a reply stuck on a client that does not read."""
        self._shutdown(socket.SHUT_RDWR)

    def promote(self, since: float) -> None:
        """StallWatch: the reader's call that began at ``since`` is stuck; move the role on."""
        with self._lock:
            if self.busy_since != since or self._closing:
                return  # that call ended meanwhile
            if self._calls_since_hand_offs < _RECURRENCE:
                self._hand_off_run = min(2 * self._hand_off_run, _MOST_HAND_OFFS)
            else:
                self._hand_off_run = _FIRST_HAND_OFFS
            self._hand_offs = self._hand_off_run
            self._calls_since_hand_offs = 0
            self._pass_role()

    def _pass_role(self) -> None:
        """Give the reader role to an idle or a new thread, if there is one (_lock held)."""
        if not self._idle and len(self._threads) >= self._max_threads:
            return  # every thread is in a call already
        self._epoch += 1
        self.busy_since = None
        if self._idle:
            self._idle -= 1
            self._turns.put(self._epoch)
        else:
            thread = threading.Thread(target=self._take_turns, args=(self._epoch,), daemon=True,
                                      name=f"nbd-{len(self._threads)} {self.peer}")
            self._threads.append(thread)
            thread.start()

    # -- lifecycle ------------------------------------------------------------

    def _run(self) -> None:
        """The first thread: the handshake, then its turns."""
        try:
            self._sock.settimeout(self._handshake_timeout)
            session = Negotiation(self._sock, self._reader, self._exports, self._max_request).run()
        except ClientGone as gone:
            log.debug("nbd %s: client gone during the handshake: %s", self.peer, gone)
            session = None
        except ProtocolViolation as violation:
            log.warning("nbd %s: protocol violation, disconnecting: %s", self.peer, violation)
            session = None
        except Exception:
            log.exception("nbd %s: handshake failed", self.peer)
            session = None
        if session is None:
            self._finish()
            return
        self._sock.settimeout(None)
        self._session = session
        self._rules = RequestRules(session, self._max_request)
        if self._watch is not None:
            self._watch.add(self)
        log.debug("nbd %s: serving %r (%d bytes, flags %s)", self.peer, session.name, session.size,
                  session.transmission_flags)
        self._take_turns(0)

    def _take_turns(self, epoch: int | None) -> None:
        """Read while holding the role (turn ``epoch``); between turns, wait for the next."""
        while epoch is not None:
            if self._read(epoch):
                self._finish()  # reading has ended: this thread closes the connection
                return
            with self._lock:
                if self._closing:
                    return
                self._idle += 1
            epoch = self._turns.get()

    def _finish(self) -> None:
        """End the connection once the other threads have finished their calls."""
        with self._lock:
            self._closing = True
            self.busy_since = None
            others = [thread for thread in self._threads if thread is not threading.current_thread()]
            for _ in range(self._idle):
                self._turns.put(None)
            self._idle = 0
        if self._watch is not None:
            self._watch.remove(self)
        for thread in others:
            thread.join()
        self._outbox.flush(block=True)
        with self._socket_lock:
            self._closed = True
            self._sock.close()
        self._on_close(self)
        self._finished.set()

    def _shutdown(self, how: int) -> None:
        with self._socket_lock:
            if not self._closed:
                try:
                    self._sock.shutdown(how)
                except OSError:  # already disconnected
                    pass

    def _on_send_failure(self, error: OSError) -> None:
        log.debug("nbd %s: cannot reply: %s", self.peer, error)
        self.abort()  # wakes the reader so the connection winds down

    # -- the reader role ----------------------------------------------------------

    def _read(self, epoch: int) -> bool:
        """Hold the reader role: True when reading has ended, False when the role moved on."""
        try:
            return self._read_requests(epoch)
        except ClientGone as gone:
            log.debug("nbd %s: client gone: %s", self.peer, gone)
        except ProtocolViolation as violation:
            log.warning("nbd %s: protocol violation, disconnecting: %s", self.peer, violation)
        except Exception:
            log.exception("nbd %s: connection failed", self.peer)
        return True

    def _read_requests(self, epoch: int) -> bool:
        reader = self._reader
        outbox = self._outbox
        watch = self._watch
        check = self._rules.check
        unpack_from = p.REQUEST.unpack_from
        header_size = p.REQUEST.size
        while True:
            if reader.end - reader.start < header_size:
                outbox.flush()  # about to wait for the client: send what is ready
                try:
                    if not reader.fill(header_size):
                        return True
                except ClientGone:
                    log.info("nbd %s: truncated request, disconnecting", self.peer)
                    return True
            magic, flags, command, handle, offset, length = unpack_from(reader.buffer, reader.start)
            reader.start += header_size
            if magic != p.REQUEST_MAGIC:
                raise ProtocolViolation(f"bad request magic {magic:#x}")
            payload = None
            if command == WRITE:
                if length > self._max_request:
                    reader.discard(length)  # keeps the stream in step
                    outbox.add([_pack_reply(_REPLY_MAGIC, EINVAL, handle)], _REPLY_SIZE)
                    continue
                payload = self._payloads.take(length)
                try:
                    reader.readinto(memoryview(payload)[:length])
                except ClientGone:
                    log.info("nbd %s: disconnected in the middle of a write payload", self.peer)
                    raise
            elif command == DISC:
                return True
            error = check(command, flags, offset, length)
            if error:
                if payload is not None:
                    self._payloads.give(payload)
                outbox.add([_pack_reply(_REPLY_MAGIC, error, handle)], _REPLY_SIZE)
                continue
            if watch is None:
                self._run_request(command, flags, handle, offset, length, payload)
            else:
                epoch = self._run_watched(epoch, command, flags, handle, offset, length, payload)
                if epoch is None:  # another thread reads now: wait for a turn
                    outbox.flush()
                    return False
            if outbox.pending_bytes >= _HOLD_BACK_BYTES:
                outbox.flush(block=outbox.pending_bytes >= self._max_unsent)

    # -- running requests -----------------------------------------------------------

    def _run_watched(self, epoch: int, command: int, flags: int, handle: int, offset: int,
                     length: int, payload: bytearray | None) -> int | None:
        """Run a request as the reader of turn ``epoch``, in view of the StallWatch.

        Returns the turn this thread reads in afterwards, or None when
        another thread holds the role.
        """
        self.busy_since = time.perf_counter()
        if self._watch.asleep:
            self._watch.wake()
        if self._hand_offs:
            with self._lock:
                if self._epoch == epoch and not self._closing and self._hand_offs:
                    self._hand_offs -= 1
                    self._pass_role()
        else:
            self._calls_since_hand_offs += 1
        self._run_request(command, flags, handle, offset, length, payload)
        with self._lock:
            if self._epoch == epoch:
                self.busy_since = None
                return epoch
            if self.busy_since is not None and not self._closing:
                # The reader is inside a call of its own: take the role over at
                # once rather than wait for a turn (no thread to wake).
                self._epoch += 1
                self.busy_since = None
                return self._epoch
            return None

    def _run_request(self, command: int, flags: int, handle: int, offset: int, length: int,
                     payload: bytearray | None) -> None:
        """Run a checked request against the export and queue its reply."""
        try:
            view = memoryview(payload)[:length] if payload is not None else None
            error, buffers, nbytes = execute(self._exports, self._session.name, command, flags,
                                             offset, length, view, self.peer)
        finally:
            if payload is not None:
                self._payloads.give(payload)
        self._outbox.add([_pack_reply(_REPLY_MAGIC, error, handle), *buffers], _REPLY_SIZE + nbytes)
