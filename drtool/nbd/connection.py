"""One client connection: the handshake, then the transmission phase.

Threading model.  One thread at a time holds the connection's *reader*
role: it parses the next request straight out of the receive buffer (WRITE
payloads go into reused buffers), answers malformed ones itself, and runs
valid ones itself, in order.  While the export answers quickly that is all
there is: no hand-off, no thread switch, no GIL ping-pong.

When an export call has waited watch.STUCK_AFTER (a region fetched from the
replica, a cold disk, an fsync), the server's StallWatch gives the reader
role to a *helper*, another of the connection's threads (started on demand,
at most ``workers``), which goes on reading; the stuck thread finishes its
call, sends its reply and becomes a helper itself.  And the connection
*spills*: for the next requests the reader only reads and queues them for
the helpers, the classic reader + worker pool, so calls that wait run side
by side and fast ones are not held up behind them.  Stalls come in runs (a
degraded volume fetches region after region), so a spill lasts
_FIRST_SPILL requests, twice as many as the last one (up to _LONGEST_SPILL)
when the stall came within _RECURRENCE requests after it.  (Spills are not
extended by timing the helpers' calls: hand-offs themselves slow calls down
by moving the GIL, and would keep the spill going on a busy machine.)
``workers=0`` never hands off (for exports that never wait).  A FLUSH is
always handed to a helper: it waits for the disk, and the requests behind it
need not wait for it (a flush covers only requests answered before it came).

Why not always the pool: measured on 2 cores with bench/nbd_read.py,
handing every request to a worker wakes a thread and moves the GIL at each
syscall; for 4 KiB reads from the page cache that cost ~3 times the CPU per
request and half the IOPS, for nothing: the work itself (a copy, drtool's
blake3 check) holds the GIL or is a syscall the reader makes just as fast.
Threads pay off only when calls wait, and that is when they are used here.
A false alarm (a call slowed by the scheduler on a busy machine) costs
_FIRST_SPILL hand-offs.

Replies.  A finished reply joins the connection's Outbox; whoever finds
nobody sending sends everything there with one ``sendmsg`` (headers and data
buffers, no copy).  The reader holds its replies back while more requests
are already buffered and sends before it waits for the client.  With
2 * max_request bytes unsent, or _MAX_QUEUED requests (2 * max_request
bytes) queued for helpers, the reader waits: a client that sends requests
but never reads replies is pushed back on, not buffered for.

TLS.  On a TLS listener the socket becomes a ``tls.TlsSocket`` once the
handshake upgraded it (before any export is chosen); the reader and the
Outbox then go through it.  Plain connections keep their socket as it is.

Nothing a client sends can kill more than its own connection: malformed
requests get an error reply, a broken stream (bad magic, truncation, a
hang-up) ends the connection, and requests already received are completed
first.  A write is acknowledged only after the export's ``write`` returned.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from queue import SimpleQueue
from typing import Callable

from drtool.nbd import protocol as p
from drtool.nbd.buffers import Outbox, PayloadPool
from drtool.nbd.handshake import ExportRegistry, Negotiation, Session
from drtool.nbd.requests import DISC, EINVAL, FLUSH, READ, WRITE, RequestRules, execute
from drtool.nbd.stream import ClientGone, ProtocolViolation, SocketReader
from drtool.nbd.tls import TlsSocket
from drtool.nbd.watch import StallWatch

log = logging.getLogger("drtool.nbd")

#: the reader sends its held-back replies once they reach this size
_HOLD_BACK_BYTES = 256 * 1024
#: requests queued for helpers after a stall ...
_FIRST_SPILL = 16
#: ... and at most, when stalls keep coming within _RECURRENCE requests of a spill
_LONGEST_SPILL = 4096
_RECURRENCE = 64
#: requests queued for helpers at most (the reader waits beyond)
_MAX_QUEUED = 128

_REPLY_MAGIC = p.SIMPLE_REPLY_MAGIC
_REPLY_SIZE = p.SIMPLE_REPLY.size
_pack_reply = p.SIMPLE_REPLY.pack


class Connection:
    """Serves one accepted socket until the client leaves or the server stops."""

    def __init__(self, sock: socket.socket, peer: str, exports: ExportRegistry, *,
                 max_request: int, workers: int, handshake_timeout: float,
                 watch: StallWatch | None, on_close: Callable[[Connection], None],
                 tls: ssl.SSLContext | None = None) -> None:
        self.peer = peer
        self._sock: socket.socket | TlsSocket = sock
        self._tls = tls
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
        #: native id of the thread holding the reader role (the StallWatch checks it)
        self.reader_thread = 0
        # The threads (see the module docstring); _lock guards what follows.
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"nbd {peer}", daemon=True)]
        self._epoch = 0  # which turn of the reader role is current
        self._jobs: SimpleQueue[tuple | int | None] = SimpleQueue()  # requests, reader turns, exit
        self._idle = 0  # threads waiting for a job
        self._unclaimed = 0  # jobs queued that no thread took yet
        self._queued = 0  # requests queued or running on helpers
        self._queued_bytes = 0
        self._drained = threading.Condition(self._lock)  # the reader waits here when full
        self._reader_waiting = False
        self._spill = 0  # requests left to queue for helpers rather than run
        self._last_spill = _FIRST_SPILL
        self._since_spill = _RECURRENCE  # requests the reader ran since the last spill
        self._closing = False

    def start(self) -> None:
        self._threads[0].start()

    @property
    def export_name(self) -> str | None:
        """The export this connection chose at its handshake (None while negotiating)."""
        session = self._session
        return session.name if session is not None else None

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
        """StallWatch: the reader's call that began at ``since`` is stuck; a helper reads on."""
        with self._lock:
            if self.busy_since != since or self._closing:
                return  # that call ended meanwhile
            if self._since_spill < _RECURRENCE:
                self._last_spill = min(2 * self._last_spill, _LONGEST_SPILL)
            else:
                self._last_spill = _FIRST_SPILL
            self._spill = self._last_spill
            self._since_spill = 0
            self._epoch += 1
            self.busy_since = None
            self._add_job(self._epoch)

    def _add_job(self, job: tuple | int) -> None:
        """Queue a request or a reader turn; start a helper if none is free (_lock held)."""
        self._unclaimed += 1
        self._jobs.put(job)
        if self._unclaimed > self._idle and len(self._threads) < self._max_threads:
            helper = threading.Thread(target=self._take_turns, args=(None,), daemon=True,
                                      name=f"nbd-{len(self._threads)} {self.peer}")
            self._threads.append(helper)
            helper.start()

    # -- lifecycle ------------------------------------------------------------

    def _run(self) -> None:
        """The first thread: the handshake, then its turns."""
        try:
            self._sock.settimeout(self._handshake_timeout)
            negotiation = Negotiation(self._sock, self._reader, self._exports, self._max_request,
                                      self._tls, self.peer)
            try:
                session = negotiation.run()
            finally:
                if negotiation.sock is not self._sock:  # upgraded to TLS: the TLS stream from now on
                    self._use_tls(negotiation)
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

    def _use_tls(self, negotiation: Negotiation) -> None:
        with self._socket_lock:
            self._sock = negotiation.sock
        self._reader = negotiation.reader
        self._outbox = Outbox(self._sock, self._on_send_failure)

    def _take_turns(self, epoch: int | None) -> None:
        """Read while holding the reader role (turn ``epoch``); otherwise run queued jobs."""
        while True:
            if epoch is not None and self._read(epoch):
                self._finish()  # reading has ended: this thread closes the connection
                return
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
                self._unclaimed -= 1
            if job is None:
                return
            if isinstance(job, int):
                epoch = job
                continue
            epoch = None
            try:
                self._run_queued(*job)
            except Exception:  # a helper that died would leave its jobs unanswered
                log.exception("nbd %s: request failed", self.peer)

    def _finish(self) -> None:
        """End the connection once the other threads ran what was queued and left."""
        with self._lock:
            self._closing = True
            self.busy_since = None
            others = [thread for thread in self._threads if thread is not threading.current_thread()]
            for _ in others:
                self._jobs.put(None)  # behind the queued requests: those run first
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
        self.reader_thread = threading.get_native_id()
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
            elif self._spill or command == FLUSH:
                # A FLUSH waits for the disk (an fdatasync) without the GIL, and need not cover
                # requests that follow it: a helper runs it while this thread reads and runs them.
                self._queue_request(command, flags, handle, offset, length, payload)
            elif not self._run_watched(epoch, command, flags, handle, offset, length, payload):
                outbox.flush()  # a helper reads now: this thread becomes one
                return False
            if outbox.pending_bytes >= _HOLD_BACK_BYTES:
                outbox.flush(block=outbox.pending_bytes >= self._max_unsent)

    # -- running requests -----------------------------------------------------------

    def _run_watched(self, epoch: int, command: int, flags: int, handle: int, offset: int,
                     length: int, payload: bytearray | None) -> bool:
        """Run a request as the reader of turn ``epoch``, in view of the StallWatch.

        Returns whether this thread still holds the reader role.
        """
        self.busy_since = time.perf_counter()
        if self._watch.asleep:
            self._watch.wake()
        self._since_spill += 1
        self._run_request(command, flags, handle, offset, length, payload)
        with self._lock:
            if self._epoch != epoch:
                return False
            self.busy_since = None
            return True

    def _queue_request(self, command: int, flags: int, handle: int, offset: int, length: int,
                       payload: bytearray | None) -> None:
        """Spilling: leave the request to a helper, waiting while too much is queued."""
        cost = length if command == READ or command == WRITE else 0
        with self._lock:
            while self._queued >= _MAX_QUEUED or (
                    self._queued and self._queued_bytes + cost > self._max_unsent):
                self._reader_waiting = True
                self._drained.wait()
            if self._spill:
                self._spill -= 1
            self._queued += 1
            self._queued_bytes += cost
            self._add_job((command, flags, handle, offset, length, payload, cost))

    def _run_queued(self, command: int, flags: int, handle: int, offset: int, length: int,
                    payload: bytearray | None, cost: int) -> None:
        """A helper runs a spilled request."""
        try:
            self._run_request(command, flags, handle, offset, length, payload)
        finally:
            with self._lock:
                self._queued -= 1
                self._queued_bytes -= cost
                if self._reader_waiting:
                    self._reader_waiting = False
                    self._drained.notify()
        self._outbox.flush()

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
