"""``drtool serve``: the threaded HTTP/1.1 replica server of the secondary.

Start-up refuses what would be unsafe (a token file others can read, half a
TLS configuration, no token on a non-loopback address).  A watchdog hangs up
on connections that take too long to deliver a request (slowloris) or sit idle,
so threads are never pinned forever; responses are bounded by the socket's
idle timeout on every send.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from drtool import metrics
from drtool.errors import UsageError
from drtool.replica.handler import ReplicaHandler
from drtool.replica.journal import DEFAULT_JOURNAL_LIMIT
from drtool.replica.store import ReplicaRoot
from drtool.tls import is_loopback, server_context


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the server; ``drtool serve`` flags map onto these fields."""

    max_body: int = 256 << 20  # bytes of one records batch (--max-body)
    max_records: int = 65536  # records in one batch
    max_read_regions: int = 65536  # regions in one batched read
    request_timeout: float = 60.0  # from waiting for a request to having read all of it (--request-timeout)
    idle_timeout: float = 30.0  # any single send or receive
    max_connections: int = 64  # (--max-connections)
    # A connection is unauthenticated until one of its requests carried the token.  Until then it
    # must deliver each request's headers within header_timeout (--header-timeout), and such
    # connections may hold only some of the slots, so the primary always finds one free.
    header_timeout: float = 5.0
    max_unauthenticated: int = 32  # in total, and never more than half of max_connections
    max_unauthenticated_per_address: int = 8

    def __post_init__(self) -> None:
        for name in ("max_body", "max_records", "max_read_regions", "max_connections", "max_unauthenticated",
                     "max_unauthenticated_per_address"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name.replace('_', '-')} must be a whole number of at least 1, not {value!r}")
        for name in ("request_timeout", "idle_timeout", "header_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86400:
                raise UsageError(f"{name.replace('_', '-')} must be seconds in (0, 86400], not {value!r}")

    @property
    def unauthenticated_slots(self) -> int:
        """Connections without a token at once: the other slots stay free for clients that have one."""
        return max(1, min(self.max_unauthenticated, self.max_connections // 2))


@dataclass
class _Connection:
    address: str
    accepted: float
    authenticated: bool = False


class ReplicaHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], replicas: ReplicaRoot, token: str | None,
                 tls: ssl.SSLContext | None, limits: Limits) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.replicas = replicas
        self.token = token
        self.tls = tls
        self.limits = limits
        self._deadlines: dict[socket.socket, tuple[float, Any]] = {}
        self._open: dict[socket.socket, _Connection] = {}
        self._watch_lock = threading.Lock()
        self._stopping = threading.Event()
        self.http_counts = metrics.HttpCounts()  # the handler counts each answered request
        super().__init__(address, ReplicaHandler)
        self._watchdog = threading.Thread(target=self._watch_loop, name="watchdog", daemon=True)
        self._watchdog.start()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            # The handshake runs in the connection's thread (see finish_request), not in the accept loop.
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request(self, request: Any, client_address: Any) -> None:
        refused, evicted = self._admit(request, client_address[0])
        if evicted is not None:
            sock, who = evicted
            sys.stderr.write(f"drtool-replica: {who}: unauthenticated connection closed to make room\n")
            _hang_up(sock)
        if refused:
            sys.stderr.write(f"drtool-replica: {client_address[0]}: refused, {refused}\n")
            super().shutdown_request(request)
            return
        self.watch(request, client_address)
        super().process_request(request, client_address)

    def _admit(self, request: socket.socket, address: str) -> tuple[str | None, tuple[socket.socket, str] | None]:
        """Take a slot for a new connection: (why it is refused, or None; a connection evicted for it).

        Every new connection is unauthenticated.  One address may hold only so many of those
        (more are refused); all together they may hold only unauthenticated_slots, and when
        those (or all slots) are taken, the oldest unauthenticated connection makes room:
        a client that sends its request at once gets in even while others dribble theirs.
        """
        limits = self.limits
        with self._watch_lock:
            unauthenticated = [(c.accepted, s) for s, c in self._open.items() if not c.authenticated]
            mine = sum(1 for _, s in unauthenticated if self._open[s].address == address)
            if mine >= limits.max_unauthenticated_per_address:
                return (f"{mine} connections from this address have not authenticated yet", None)
            evicted = None
            if len(self._open) >= limits.max_connections or len(unauthenticated) >= limits.unauthenticated_slots:
                if not unauthenticated:
                    return (f"{limits.max_connections} connections already open", None)
                _, victim = min(unauthenticated, key=lambda item: item[0])
                evicted = (victim, self._open.pop(victim).address)
                self._deadlines.pop(victim, None)
            self._open[request] = _Connection(address, time.monotonic())
            return None, evicted

    def authenticated(self, sock: socket.socket) -> None:
        """A request on ``sock`` carried the token: it keeps its slot and the long timeouts."""
        with self._watch_lock:
            state = self._open.get(sock)
            if state is None or state.authenticated:
                return
            state.authenticated = True
            if sock in self._deadlines:
                self._deadlines[sock] = (time.monotonic() + self.limits.request_timeout, self._deadlines[sock][1])

    def is_authenticated(self, sock: socket.socket) -> bool:
        with self._watch_lock:
            state = self._open.get(sock)
            return state is not None and state.authenticated

    def finish_request(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.settimeout(self.limits.idle_timeout)
                request.do_handshake()
            except (OSError, ssl.SSLError) as exc:
                sys.stderr.write(f"drtool-replica: {client_address[0]}: TLS handshake failed: {exc}\n")
                return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        sys.stderr.write(f"drtool-replica: {client_address[0]}: connection error: {exc!r}\n")

    def shutdown_request(self, request: Any) -> None:
        with self._watch_lock:
            self._deadlines.pop(request, None)
            self._open.pop(request, None)
        super().shutdown_request(request)

    # -- watchdog -----------------------------------------------------------------------

    def watch(self, sock: socket.socket, client_address: Any) -> None:
        """The request on ``sock`` must be fully received by request_timeout from now (its
        headers by header_timeout while the connection has not authenticated)."""
        limits = self.limits
        with self._watch_lock:
            state = self._open.get(sock)
            if state is None:
                return  # evicted meanwhile: it is being hung up on
            timeout = (limits.request_timeout if state.authenticated
                       else min(limits.header_timeout, limits.request_timeout))
            self._deadlines[sock] = (time.monotonic() + timeout, client_address)

    def unwatch(self, sock: socket.socket) -> None:
        with self._watch_lock:
            self._deadlines.pop(sock, None)

    def _watch_loop(self) -> None:
        while not self._stopping.wait(0.5):
            now = time.monotonic()
            with self._watch_lock:
                late = [(s, a) for s, (deadline, a) in self._deadlines.items() if deadline < now]
                for sock, _ in late:
                    del self._deadlines[sock]
            for sock, address in late:
                sys.stderr.write(f"drtool-replica: {address[0]}:{address[1]}: no complete request in time, "
                                 "closing\n")
                _hang_up(sock)

    def server_close(self) -> None:
        self._stopping.set()
        super().server_close()


def _hang_up(sock: socket.socket) -> None:
    """Cut a connection another thread is serving: its blocked read or write fails at once."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def read_token(path: str) -> str:
    """The bearer token; refuses a file that group or others can read."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"token file {path} is not a regular file")
    if info.st_mode & 0o077:
        raise UsageError(f"token file {path} is mode {stat.S_IMODE(info.st_mode):04o}; it must be readable "
                         f"by its owner only (chmod 600 {path})")
    with open(path, encoding="utf-8") as handle:
        token = handle.read().strip()
    if len(token) < 16:
        raise UsageError(f"token file {path} holds {'no' if not token else 'a too short'} token "
                         "(use at least 16 characters, e.g. `openssl rand -hex 32`)")
    return token


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise UsageError("TLS needs both --tls-cert and --tls-key")
    return server_context(cert, key)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {listen!r} must be HOST:PORT (port 0 picks a free one)")
    return host, int(port)


def serve(root: str, listen: str, token_file: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, announce: Callable[..., None] | None = None, *,
          limits: Limits | None = None, journal_limit: int = DEFAULT_JOURNAL_LIMIT, insecure: bool = False,
          metrics_listen: metrics.MetricsListen | None = None) -> int:
    """Serve replicas under ``root`` until SIGTERM or SIGINT; return 0 after a clean stop.

    ``journal_limit``: bytes of change log kept per replica (the newest records;
    it may exceed the limit by one segment, limit/4 clamped to 1-64 MiB); 0 keeps
    no journal at all, which halves what an apply writes to disk.
    Beyond loopback the server needs a token and TLS; ``insecure`` (``--insecure``)
    lets it serve plain HTTP there anyway, with a warning.  ``metrics_listen``: serve Prometheus
    metrics there too (drtool.metrics); ``announce`` then gets their URL after the address.
    """
    host, port = parse_listen(listen)
    if not isinstance(journal_limit, int) or journal_limit < 0:
        raise UsageError(f"journal-limit must be a size of 0 (no journal) or more bytes, not {journal_limit!r}")
    token = read_token(token_file) if token_file else None
    loopback = is_loopback(host)
    if token is None and not loopback:
        raise UsageError(f"refusing to serve {host} without --token-file (only loopback may go without)")
    context = tls_context(tls_cert, tls_key)
    if context is None and not loopback and not insecure:
        raise UsageError(f"refusing to serve {host} without TLS: the bearer token and every byte of the "
                         "volumes would cross the network in cleartext; give --tls-cert and --tls-key "
                         "(or --insecure to accept that)")
    replicas = ReplicaRoot(root, journal_limit)
    try:
        server = ReplicaHTTPServer((host, port), replicas, token, context, limits or Limits())
    except OSError as exc:
        raise UsageError(f"cannot listen on {listen}: {exc.strerror}") from None
    try:
        exporter = metrics.MetricsServer(metrics_listen, metrics.ReplicaCollector(
            replicas.names, lambda name: replicas.get(name).describe(), server.http_counts,
            time.time())).start() if metrics_listen else None
    except BaseException:
        server.server_close()
        raise
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    worker.start()
    try:
        if token is None:
            sys.stderr.write("drtool-replica: no --token-file: accepting unauthenticated requests on loopback\n")
        if context is None and not loopback:
            sys.stderr.write(f"drtool-replica: WARNING: --insecure: serving plain HTTP on {host}: the bearer "
                             "token (which lets its holder overwrite every replica) and the volumes' bytes "
                             "cross the network in cleartext; use --tls-cert and --tls-key\n")
        bound = server.server_address
        if announce is not None:
            where = f"{bound[0]}:{bound[1]}" if server.address_family == socket.AF_INET else f"[{bound[0]}]:{bound[1]}"
            announce(*([where, exporter.url] if exporter else [where]))
        while not stop.wait(1.0):
            pass
    finally:
        if exporter is not None:
            exporter.stop()
        server.shutdown()
        server.server_close()
        replicas.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stderr.write("drtool-replica: stopped\n")
    return 0
