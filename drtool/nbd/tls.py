"""TLS for NBD: NBD_OPT_STARTTLS upgrades a connection in the middle of the handshake.

The server side only (proto.md "TLS support", FORCEDTLS mode: see handshake.py).
``server_context`` builds the ssl.SSLContext from PEM files; ``start_tls`` runs
the TLS handshake on an accepted socket once the server has sent NBD_REP_ACK
to NBD_OPT_STARTTLS, and returns a ``TlsSocket`` that the rest of the
connection uses in place of the plain socket.

Why not ``ssl.SSLSocket``: a connection reads on one thread while another
sends replies (see connection.py), and OpenSSL does not allow two threads to
use one SSL object at once; SSLSocket has no ``sendmsg`` either.  TlsSocket
keeps the TLS state in an ``ssl.SSLObject`` over memory BIOs, touched only
under a lock, and does the socket I/O itself outside that lock, so a reader
waiting for the client never holds up a sender.  Plain connections never see
any of this: their socket is used as it is.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from collections.abc import Sequence

from drtool.errors import UsageError
from drtool.nbd.export import Buffer
from drtool.tls import server_context as tls_server_context

#: bytes handed to the TLS layer at once when sending (a few TLS records)
_SEND_CHUNK = 256 * 1024
#: bytes received from the socket at once
_RECV_CHUNK = 256 * 1024


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """An SSLContext for a TLS-required NBD listener (TLS 1.2 or later).

    With ``ca``, clients must present a certificate that this CA signed
    (qemu-nbd's ``verify-peer=on``); without, any client that completes the
    TLS handshake may connect, and the certificate only proves the server.
    The key must not be readable by group or others.
    """
    if not cert or not key:
        raise UsageError("NBD TLS needs both --tls-cert and --tls-key")
    for path, what in ((cert, "--tls-cert"), (key, "--tls-key")) + (((ca, "--tls-ca"),) if ca else ()):
        try:
            info = os.stat(path)
        except OSError as error:
            raise UsageError(f"cannot read {what} {path}: {error.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{what} {path} is not a regular file")
    return tls_server_context(cert, key, ca)


class TlsSocket:
    """The parts of a socket a Connection uses, over TLS.

    ``recv_into`` may run on one thread while ``sendmsg`` runs on another
    (and sends from several threads are already serialized by the Outbox).
    ``shutdown`` and ``settimeout`` act on the underlying socket, so they can
    wake a thread blocked in either.
    """

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self._sock = sock
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self._tls_lock = threading.Lock()  # the SSLObject and both BIOs
        self._send_lock = threading.Lock()  # keeps TLS records in order on the wire
        self.family = sock.family

    # -- what Connection, SocketReader and Outbox call ---------------------------

    def recv_into(self, buffer: memoryview, nbytes: int = 0) -> int:
        """Decrypted bytes into ``buffer``; 0 at the end of the stream."""
        wanted = nbytes or len(buffer)
        while True:
            with self._tls_lock:
                try:
                    received: int | None = self._tls.read(wanted, buffer)
                except ssl.SSLWantReadError:
                    received = None
                except ssl.SSLZeroReturnError:  # the client's close_notify
                    received = 0
                replies = self._outgoing.pending  # a TLS 1.3 key update answers itself
            if replies:
                self._send_pending()
            if received is not None:
                return received
            data = self._sock.recv(_RECV_CHUNK)  # OSError and timeouts propagate
            if not data:
                return 0  # a hang-up without close_notify ends the stream too
            with self._tls_lock:
                self._incoming.write(data)

    def sendmsg(self, buffers: Sequence[Buffer]) -> int:
        """Send every byte of ``buffers`` (in TLS records of up to _SEND_CHUNK bytes)."""
        total = 0
        pending = bytearray()
        with self._send_lock:
            for buffer in buffers:
                view = memoryview(buffer).cast("B")
                total += len(view)
                while view:
                    take = min(len(view), _SEND_CHUNK - len(pending))
                    pending += view[:take]
                    view = view[take:]
                    if len(pending) == _SEND_CHUNK:
                        self._seal_and_send(pending)
                        pending = bytearray()
            if pending:
                self._seal_and_send(pending)
        return total

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        """Send close_notify if the socket takes it at once, then close."""
        try:
            with self._tls_lock:
                try:
                    self._tls.unwrap()
                except ssl.SSLError:  # SSLWantReadError: the client's close_notify is not awaited
                    pass
                alert = self._outgoing.read()
            if alert:
                self._sock.send(alert, socket.MSG_DONTWAIT)
        except OSError:
            pass
        self._sock.close()

    # -- internals ----------------------------------------------------------------

    def _seal_and_send(self, data: bytes | bytearray) -> None:
        """Encrypt and send (the caller holds _send_lock)."""
        with self._tls_lock:
            self._tls.write(data)
            records = self._outgoing.read()
        self._sock.sendall(records)

    def _send_pending(self) -> None:
        with self._send_lock:
            with self._tls_lock:
                records = self._outgoing.read()
            if records:
                self._sock.sendall(records)


def start_tls(sock: socket.socket, context: ssl.SSLContext) -> TlsSocket:
    """Run the server side of the TLS handshake on ``sock``; return the TLS stream.

    Raises ssl.SSLError when the handshake fails (after sending the alert
    that tells the client why), OSError (a timeout, a reset) or
    ConnectionError when the client hangs up.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError:
            alert = outgoing.read()
            if alert:
                try:
                    sock.sendall(alert)
                except OSError:
                    pass
            raise
        records = outgoing.read()
        if records:
            sock.sendall(records)
        data = sock.recv(_RECV_CHUNK)
        if not data:
            raise ConnectionError("the client hung up during the TLS handshake")
        incoming.write(data)
    records = outgoing.read()  # the last flight (and TLS 1.3 session tickets)
    if records:
        sock.sendall(records)
    return TlsSocket(sock, tls, incoming, outgoing)


def peer_subject(tls_sock: TlsSocket) -> str | None:
    """The client certificate's subject CN, when it sent one (for the log)."""
    cert = tls_sock._tls.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None
