"""NbdServer: listens on a Unix socket and/or TCP and serves NbdExports.

    server = NbdServer(lambda: {"vol": FileExport("vol.img", "vol")},
                       unix_path="/run/drtool/vol.sock", tcp=("127.0.0.1", 0))
    port = server.start()        # binds; connections are served in threads
    ...
    server.stop()                # finishes requests in flight, then closes

The export registry is a callable, asked at every handshake and again for
every request, so the caller can swap the object behind a name (normal <->
degraded mode) without dropping clients; it must be cheap and thread-safe
(returning a dict that is replaced, never mutated, is enough).  A name that
disappears makes its connections' requests fail with ESHUTDOWN, which tells
clients to disconnect.  Size and flags are those seen at each handshake.

With ``tcp_tls`` (an ``ssl.SSLContext``, see ``tls.server_context``) the
TCP listener requires TLS: clients must upgrade with NBD_OPT_STARTTLS before
anything is listed or served (``handshake.py``).  The Unix socket never uses
TLS: its file mode (0600 by default) decides who connects, and the server
refuses a directory that other users can write (they could swap the socket).

See ``connection.py`` for the threading model of one connection.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import selectors
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

from drtool.errors import UsageError
from drtool.nbd import protocol as p
from drtool.nbd.connection import Connection
from drtool.nbd.handshake import ExportRegistry
from drtool.nbd.watch import StallWatch

log = logging.getLogger("drtool.nbd")

#: threads a connection may start besides its first, for export calls that
#: wait (started only when calls do; see connection.py)
DEFAULT_WORKERS = 8
#: socket buffers: a 256 KiB reply should fit at once, so one sendmsg
#: completes it without waiting for the client to drain the socket
_SOCKET_BUFFER = 4 * 1024 * 1024
_LISTEN_BACKLOG = 64
_ACCEPT_RETRY_DELAY = 0.1


class NbdServer:
    """Serve the exports that ``exports()`` names over NBD (fixed newstyle)."""

    def __init__(self, exports: ExportRegistry, unix_path: str | os.PathLike[str] | None = None,
                 tcp: tuple[str, int] | None = None, *,
                 max_request: int = p.DEFAULT_MAX_REQUEST, workers: int = DEFAULT_WORKERS,
                 unix_mode: int = 0o600, handshake_timeout: float = 30.0,
                 tcp_tls: ssl.SSLContext | None = None) -> None:
        if unix_path is None and tcp is None:
            raise UsageError("the NBD server needs a Unix socket path or a TCP address")
        if not p.PREFERRED_BLOCK_SIZE <= max_request <= 0xFFFFFFFF:
            raise UsageError(f"NBD max_request {max_request} is outside 4096..2^32-1")
        if workers < 0:
            raise UsageError(f"NBD workers must be 0 or more, not {workers}")
        self._exports = exports
        self.unix_path = os.fspath(unix_path) if unix_path is not None else None
        self._tcp = tcp
        self._tcp_tls = tcp_tls
        self._max_request = max_request
        self._workers = workers
        self._unix_mode = unix_mode
        self._handshake_timeout = handshake_timeout
        self._listeners: list[socket.socket] = []
        self._tls_listeners: set[socket.socket] = set()
        self._unix_identity: tuple[int, int] | None = None
        self._tcp_port: int | None = None
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._peer_numbers = itertools.count(1)
        self._wakeup: tuple[socket.socket, socket.socket] | None = None  # stops the acceptor
        self._watch = StallWatch() if workers else None
        self._acceptor: threading.Thread | None = None
        self._stopping = False
        self._stopped = threading.Event()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> int | None:
        """Bind the listeners and start accepting; return the TCP port (None without TCP).

        A stopped server cannot be started again: make a new one.
        """
        if self._acceptor is not None or self._stopping:
            return self._tcp_port
        try:
            if self.unix_path is not None:
                self._listeners.append(self._listen_unix(self.unix_path))
            if self._tcp is not None:
                listener = self._listen_tcp(*self._tcp)
                self._listeners.append(listener)
                if self._tcp_tls is not None:
                    self._tls_listeners.add(listener)
                self._tcp_port = listener.getsockname()[1]
        except BaseException:
            self._close_listeners()
            raise
        self._wakeup = socket.socketpair()
        if self._watch is not None:
            self._watch.start()
        self._acceptor = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._acceptor.start()
        return self._tcp_port

    @property
    def tcp_port(self) -> int | None:
        return self._tcp_port

    @property
    def tcp_tls(self) -> bool:
        """Whether the TCP listener requires TLS."""
        return self._tcp_tls is not None

    def serve_forever(self) -> None:
        """Start if needed, then block until stop() is called (from another thread)."""
        self.start()
        self._stopped.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening, let requests in flight finish, close every connection.

        Clients still connected after ``timeout`` seconds (a reply stuck on a
        client that does not read) are disconnected hard.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        if self._acceptor is not None:
            self._wakeup[1].send(b"x")
            self._acceptor.join()
            for end in self._wakeup:
                end.close()
        self._close_listeners()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.stop_reading()
        deadline = time.monotonic() + timeout
        for connection in connections:
            if not connection.join(max(0.0, deadline - time.monotonic())):
                log.warning("nbd %s: still busy at shutdown, disconnecting", connection.peer)
                connection.abort()
        for connection in connections:
            if not connection.join(timeout):
                log.error("nbd %s: an export call did not return; leaving it", connection.peer)
        if self._watch is not None and self._acceptor is not None:
            self._watch.stop()
        self._stopped.set()

    def clients(self, name: str) -> list[str]:
        """The peers connected to export ``name`` (handshake done)."""
        with self._lock:
            return sorted(c.peer for c in self._connections if c.export_name == name)

    def disconnect(self, name: str, timeout: float = 10.0) -> list[str]:
        """Close every connection to export ``name``: requests in flight finish first (up to
        ``timeout``), then the socket is shut; returns their peers.  Other exports' clients
        are not touched."""
        with self._lock:
            connections = [c for c in self._connections if c.export_name == name]
        for connection in connections:
            connection.stop_reading()
        deadline = time.monotonic() + timeout
        for connection in connections:
            if not connection.join(max(0.0, deadline - time.monotonic())):
                log.warning("nbd %s: still busy, disconnecting", connection.peer)
                connection.abort()
                connection.join(timeout)
        return sorted(c.peer for c in connections)

    def __enter__(self) -> NbdServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- listeners --------------------------------------------------------------

    def _listen_unix(self, path: str) -> socket.socket:
        check_socket_directory(path)
        _remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def bind() -> None:
            # bind() creates the file with the socket inode's mode (less the
            # umask): set it first so there is no moment others could connect.
            os.fchmod(listener.fileno(), self._unix_mode)
            with _short_path(path) as short:
                listener.bind(short)
            os.chmod(path, self._unix_mode)
            status = os.stat(path)
            self._unix_identity = (status.st_dev, status.st_ino)

        return _listening(listener, bind, path)

    def _listen_tcp(self, host: str, port: int) -> socket.socket:
        where = f"{host}:{port}"
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            listener = socket.socket(family, kind, proto)
        except OSError as error:
            raise UsageError(f"cannot listen on {where}: {error}") from error

        def bind() -> None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)

        return _listening(listener, bind, where)

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        self._tls_listeners.clear()
        if self._unix_identity is not None:
            try:
                status = os.stat(self.unix_path)
                # Remove our socket only, not one another server put there since.
                if (status.st_dev, status.st_ino) == self._unix_identity:
                    os.unlink(self.unix_path)
            except FileNotFoundError:
                pass
            self._unix_identity = None

    # -- connections ------------------------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            for listener in self._listeners:
                selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wakeup[0], selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wakeup[0]:
                        return
                    self._accept(key.fileobj)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, address = listener.accept()
        except BlockingIOError:  # the client gave up before we got to it
            return
        except OSError as error:
            log.error("nbd: accept failed: %s", error)
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The listener stays readable; do not spin while out of resources.
                time.sleep(_ACCEPT_RETRY_DELAY)
            return
        sock.setblocking(True)
        if sock.family == socket.AF_UNIX:
            peer = f"unix#{next(self._peer_numbers)}"
        else:
            peer = f"{address[0]}:{address[1]}"
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # A client host that vanished (power, network) is noticed in ~2 minutes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        connection = Connection(sock, peer, self._exports, max_request=self._max_request,
                                workers=self._workers, handshake_timeout=self._handshake_timeout,
                                watch=self._watch, on_close=self._forget,
                                tls=self._tcp_tls if listener in self._tls_listeners else None)
        with self._lock:
            self._connections.add(connection)
        log.debug("nbd %s: connected", peer)
        connection.start()

    def _forget(self, connection: Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
        log.debug("nbd %s: closed", connection.peer)


def _listening(listener: socket.socket, bind: Callable[[], None], where: str) -> socket.socket:
    """Bind (with ``bind``) and listen, or close the socket and say why not."""
    try:
        bind()
        listener.listen(_LISTEN_BACKLOG)
    except OSError as error:
        listener.close()
        raise UsageError(f"cannot listen on {where}: {error.strerror or error}") from error
    listener.setblocking(False)  # the acceptor must not block on a client that gave up
    return listener


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a server that died; refuse anything else."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(status.st_mode):
        raise UsageError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short_path(path) as short:
            probe.connect(short)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise UsageError(f"cannot listen on {path}: another server is listening there")


def check_socket_directory(path: str) -> None:
    """Refuse a socket directory that users other than us (or root) can write.

    Whoever can write the directory can remove the socket and put their own
    in its place, and clients would then talk to them: sticky or not, a
    directory writable by group or others is refused.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        status = os.stat(directory)
    except OSError as error:
        raise UsageError(f"cannot listen on {path}: {directory}: {error.strerror}") from error
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o022:
        raise UsageError(
            f"cannot listen on {path}: its directory {directory} is writable by other users "
            f"(mode {mode:04o}), who could replace the socket; put the socket in a directory only "
            f"{_user_name(os.geteuid())} can write (e.g. /run/drtool, mode 0755)")
    if status.st_uid not in (0, os.geteuid()):
        raise UsageError(
            f"cannot listen on {path}: its directory {directory} belongs to "
            f"{_user_name(status.st_uid)}, who could replace the socket; put the socket in a "
            f"directory of {_user_name(os.geteuid())} or root")


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


@contextmanager
def _short_path(path: str) -> Iterator[str]:
    """A path the kernel accepts for AF_UNIX (<108 bytes), valid inside the block."""
    if len(os.fsencode(path)) < 100:
        yield path
        return
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)
