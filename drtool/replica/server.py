"""``drtool serve``: the threaded HTTP/1.1 replica server of the secondary.

Start-up refuses what would be unsafe (a token file others can read, half a
TLS configuration, no token on a non-loopback address).  A watchdog hangs up
on connections that take too long to deliver a request (slowloris) or sit idle,
so threads are never pinned forever; responses are bounded by the socket's
idle timeout on every send.
"""

from __future__ import annotations

import ipaddress
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

from drtool.errors import UsageError
from drtool.replica.handler import ReplicaHandler
from drtool.replica.journal import DEFAULT_JOURNAL_LIMIT
from drtool.replica.store import ReplicaRoot


@dataclass(frozen=True)
class Limits:
    """What one client may ask of the server; ``drtool serve`` flags map onto these fields."""

    max_body: int = 256 << 20  # bytes of one records batch (--max-body)
    max_records: int = 65536  # records in one batch
    max_read_regions: int = 65536  # regions in one batched read
    request_timeout: float = 60.0  # from waiting for a request to having read all of it (--request-timeout)
    idle_timeout: float = 30.0  # any single send or receive
    max_connections: int = 64  # (--max-connections)

    def __post_init__(self) -> None:
        for name in ("max_body", "max_records", "max_read_regions", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{name.replace('_', '-')} must be a whole number of at least 1, not {value!r}")
        for name in ("request_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86400:
                raise UsageError(f"{name.replace('_', '-')} must be seconds in (0, 86400], not {value!r}")



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
        self._open: set[socket.socket] = set()
        self._watch_lock = threading.Lock()
        self._stopping = threading.Event()
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
        with self._watch_lock:
            busy = len(self._open) >= self.limits.max_connections
            if not busy:
                self._open.add(request)
        if busy:
            sys.stderr.write(f"drtool-replica: {client_address[0]}: refused, {self.limits.max_connections} "
                             "connections already open\n")
            super().shutdown_request(request)
            return
        self.watch(request, client_address)
        super().process_request(request, client_address)

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
            self._open.discard(request)
        super().shutdown_request(request)

    # -- watchdog -----------------------------------------------------------------------

    def watch(self, sock: socket.socket, client_address: Any) -> None:
        """The request on ``sock`` must be fully received by request_timeout from now."""
        with self._watch_lock:
            self._deadlines[sock] = (time.monotonic() + self.limits.request_timeout, client_address)

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
                sys.stderr.write(f"drtool-replica: {address[0]}:{address[1]}: no complete request within "
                                 f"{self.limits.request_timeout:g}s, closing\n")
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self) -> None:
        self._stopping.set()
        super().server_close()


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
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load TLS certificate {cert} / key {key}: {exc}") from None
    return context


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {listen!r} must be HOST:PORT (port 0 picks a free one)")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(root: str, listen: str, token_file: str | None = None, tls_cert: str | None = None,
          tls_key: str | None = None, announce: Callable[[str], None] | None = None, *,
          limits: Limits | None = None, journal_limit: int = DEFAULT_JOURNAL_LIMIT) -> int:
    """Serve replicas under ``root`` until SIGTERM or SIGINT; return 0 after a clean stop.

    ``journal_limit``: bytes of change log kept per replica (the newest records;
    it may exceed the limit by one segment, limit/4 clamped to 1-64 MiB); 0 keeps
    no journal at all, which halves what an apply writes to disk.
    """
    host, port = parse_listen(listen)
    if not isinstance(journal_limit, int) or journal_limit < 0:
        raise UsageError(f"journal-limit must be a size of 0 (no journal) or more bytes, not {journal_limit!r}")
    token = read_token(token_file) if token_file else None
    if token is None and not _is_loopback(host):
        raise UsageError(f"refusing to serve {host} without --token-file (only loopback may go without)")
    context = tls_context(tls_cert, tls_key)
    replicas = ReplicaRoot(root, journal_limit)
    try:
        server = ReplicaHTTPServer((host, port), replicas, token, context, limits or Limits())
    except OSError as exc:
        raise UsageError(f"cannot listen on {listen}: {exc.strerror}") from None
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    worker.start()
    try:
        if token is None:
            sys.stderr.write("drtool-replica: no --token-file: accepting unauthenticated requests on loopback\n")
        bound = server.server_address
        if announce is not None:
            announce(f"{bound[0]}:{bound[1]}" if server.address_family == socket.AF_INET
                     else f"[{bound[0]}]:{bound[1]}")
        while not stop.wait(1.0):
            pass
    finally:
        server.shutdown()
        server.server_close()
        replicas.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    sys.stderr.write("drtool-replica: stopped\n")
    return 0
