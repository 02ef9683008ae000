"""The fixed newstyle handshake: greeting, option haggling, choice of an export.

Options served: EXPORT_NAME, ABORT, LIST, INFO and GO (with the EXPORT,
NAME, DESCRIPTION and BLOCK_SIZE information types), and STARTTLS when the
listener has a TLS context.  Every other option (STRUCTURED_REPLY, the
meta-context options...) is answered with NBD_REP_ERR_UNSUP, so clients fall
back to simple replies.

TLS (proto.md "TLS support").  A listener without a TLS context is in NOTLS
mode: STARTTLS gets NBD_REP_ERR_UNSUP, as before.  A listener with one is in
FORCEDTLS mode: until the client upgrades, every option but STARTTLS and
ABORT is answered NBD_REP_ERR_TLS_REQD (so nothing is listed, described or
served in the clear) and EXPORT_NAME, which cannot be answered with an
error, ends the connection; a client that did not negotiate fixed newstyle
cannot upgrade and is disconnected.  STARTTLS is acknowledged in the clear,
then the TLS handshake runs and the haggling goes on over TLS, where STARTTLS
again is NBD_REP_ERR_INVALID.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Callable, Mapping

from drtool.nbd import protocol as p
from drtool.nbd.export import ExportFlags, NbdExport
from drtool.nbd.stream import ClientGone, ProtocolViolation, SocketReader, send_buffers
from drtool.nbd.tls import TlsSocket, peer_subject, start_tls

log = logging.getLogger("drtool.nbd")

ExportRegistry = Callable[[], Mapping[str, NbdExport]]

# Option data is a name and a few small fields; anything much larger is not a
# client talking NBD, and reading it would only let it make us buffer it.
_MAX_OPTION_DATA = 64 * 1024


@dataclass(frozen=True)
class Session:
    """What a client chose at the handshake; fixed for the whole connection."""

    name: str
    description: str
    size: int
    flags: ExportFlags
    transmission_flags: p.TransmissionFlag


class _Unavailable(Exception):
    """The export asked for is unknown, or failed to say its size or flags."""


class Negotiation:
    """Runs the handshake on one connection and returns the chosen Session.

    ``run()`` returns None when the client ends the handshake without
    choosing an export (ABORT, or an unknown name with EXPORT_NAME).  With
    ``tls`` (a server SSLContext), TLS is required; after the upgrade,
    ``sock`` and ``reader`` are the TLS stream's, for the transmission phase.
    """

    def __init__(self, sock: socket.socket, reader: SocketReader, exports: ExportRegistry,
                 max_request: int, tls: ssl.SSLContext | None = None, peer: str = "") -> None:
        self.sock: socket.socket | TlsSocket = sock
        self.reader = reader
        self._exports = exports
        self._max_request = max_request
        self._no_zeroes = False
        self._tls = tls
        self._peer = peer
        #: TLS is required and not yet running
        self._tls_pending = tls is not None

    def run(self) -> Session | None:
        greeting = p.GREETING.pack(p.NBDMAGIC, p.IHAVEOPT,
                                   p.HandshakeFlag.FIXED_NEWSTYLE | p.HandshakeFlag.NO_ZEROES)
        self._send(greeting)
        (client_flags,) = p.CLIENT_FLAGS.unpack(self.reader.read_exact(p.CLIENT_FLAGS.size))
        if client_flags & ~int(p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES):
            raise ProtocolViolation(f"unknown client flags {client_flags:#x}")
        self._no_zeroes = bool(client_flags & p.ClientFlag.NO_ZEROES)
        if self._tls_pending and not client_flags & p.ClientFlag.FIXED_NEWSTYLE:
            # TLS needs fixed newstyle, and this listener serves nothing without TLS.
            log.warning("nbd %s: refusing a client without fixed newstyle: TLS is required", self._peer)
            return None
        while True:
            magic, option, length = p.OPTION_HEADER.unpack(
                self.reader.read_exact(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise ProtocolViolation(f"bad option magic {magic:#x}")
            if length > _MAX_OPTION_DATA:
                raise ProtocolViolation(f"option {option} carries {length} bytes")
            data = self.reader.read_exact(length)
            answered = self._tls_option(option, data) if self._tls is not None else None
            finished, session = answered or self._option(option, data)
            if finished:
                return session

    def _tls_option(self, option: int, data: bytes) -> tuple[bool, Session | None] | None:
        """FORCEDTLS: answer ``option`` as _option does when TLS decides it, else return None."""
        if option == p.Option.STARTTLS:
            if not self._tls_pending:
                self._reply(option, p.Reply.ERR_INVALID, b"TLS is already running")
            elif data:
                self._reply(option, p.Reply.ERR_INVALID, b"NBD_OPT_STARTTLS takes no data")
            else:
                self._reply(option, p.Reply.ACK)
                self._start_tls()
            return False, None
        if not self._tls_pending or option == p.Option.ABORT:
            return None
        if option == p.Option.EXPORT_NAME:
            # It cannot be answered with an error: hang up (proto.md FORCEDTLS).
            log.warning("nbd %s: NBD_OPT_EXPORT_NAME without TLS on a TLS-only listener: disconnecting",
                        self._peer)
            return True, None
        self._reply(option, p.Reply.ERR_TLS_REQD,
                    b"TLS is required: this server serves only clients that use NBD_OPT_STARTTLS")
        return False, None

    def _start_tls(self) -> None:
        if self.reader.end != self.reader.start:
            # The client must wait for the ACK; bytes sent in the clear before it
            # must never count as sent over TLS.
            raise ProtocolViolation("data sent after NBD_OPT_STARTTLS before its reply")
        try:
            self.sock = start_tls(self.sock, self._tls)
        except ssl.SSLError as error:
            log.warning("nbd %s: TLS handshake failed: %s", self._peer, error.reason or error)
            raise ClientGone(f"TLS handshake failed: {error}") from error
        except OSError as error:
            raise ClientGone(f"TLS handshake: {error}") from error
        self.reader = SocketReader(self.sock)
        self._tls_pending = False
        subject = peer_subject(self.sock)
        log.debug("nbd %s: TLS started%s", self._peer, f" (client {subject})" if subject else "")

    def _option(self, option: int, data: bytes) -> tuple[bool, Session | None]:
        """Answer one option; say whether the handshake is over, and with what."""
        if option == p.Option.EXPORT_NAME:
            return True, self._export_name(data)
        if option == p.Option.ABORT:
            try:
                self._reply(option, p.Reply.ACK)
            except ClientGone:  # the client may hang up without waiting for the ACK
                pass
            return True, None
        if option == p.Option.LIST:
            self._list(data)
        elif option in (p.Option.INFO, p.Option.GO):
            session = self._info(option, data)
            if session is not None and option == p.Option.GO:
                return True, session
        else:
            self._reply(option, p.Reply.ERR_UNSUP,
                        f"option {_option_name(option)} is not supported".encode())
        return False, None

    # -- options ------------------------------------------------------------

    def _export_name(self, data: bytes) -> Session | None:
        try:
            session = self._select(_decode_name(data))
        except (_Unavailable, ValueError) as error:
            # NBD_OPT_EXPORT_NAME cannot be answered with an error: hang up.
            log.info("nbd: refusing NBD_OPT_EXPORT_NAME: %s", error)
            return None
        reply = p.EXPORT_NAME_REPLY.pack(session.size, session.transmission_flags)
        self._send(reply if self._no_zeroes else reply + p.EXPORT_NAME_PADDING)
        return session

    def _list(self, data: bytes) -> None:
        if data:
            self._reply(p.Option.LIST, p.Reply.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return
        for name, export in self._exports().items():
            encoded = name.encode()
            self._reply(p.Option.LIST, p.Reply.SERVER,
                        p.NAME_LENGTH.pack(len(encoded)) + encoded + _string(export.description))
        self._reply(p.Option.LIST, p.Reply.ACK)

    def _info(self, option: int, data: bytes) -> Session | None:
        try:
            name, requests = _parse_info_request(data)
        except ValueError as error:
            self._reply(option, p.Reply.ERR_INVALID, str(error).encode())
            return None
        try:
            session = self._select(name)
        except _Unavailable as error:
            self._reply(option, p.Reply.ERR_UNKNOWN, str(error).encode())
            return None
        self._reply(option, p.Reply.INFO,
                    p.INFO_EXPORT.pack(p.Info.EXPORT, session.size, session.transmission_flags))
        # Sent unasked too: a client that ignores it loses nothing, and the
        # requests above max_request that it might send get EINVAL anyway.
        self._reply(option, p.Reply.INFO,
                    p.INFO_BLOCK_SIZE.pack(p.Info.BLOCK_SIZE, 1, p.PREFERRED_BLOCK_SIZE,
                                           self._max_request))
        if p.Info.NAME in requests:
            self._reply(option, p.Reply.INFO,
                        p.INFO_STRING.pack(p.Info.NAME) + session.name.encode())
        if p.Info.DESCRIPTION in requests:
            self._reply(option, p.Reply.INFO,
                        p.INFO_STRING.pack(p.Info.DESCRIPTION) + _string(session.description))
        self._reply(option, p.Reply.ACK)
        return session

    def _select(self, name: str) -> Session:
        exports = self._exports()
        export = exports.get(name)
        if export is None and name == "" and len(exports) == 1:
            # The empty name asks for the default export: the only one there is.
            name, export = next(iter(exports.items()))
        if export is None:
            raise _Unavailable(f"no export named {name!r}")
        try:
            size, flags, description = export.size(), export.flags(), export.description
        except Exception as error:
            log.warning("nbd: export %r unavailable: %s", name, error)
            raise _Unavailable(f"export {name!r} is not available: {error}") from error
        return Session(name, description, size, flags, flags.transmission_flags())

    # -- output -------------------------------------------------------------

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        header = p.OPTION_REPLY.pack(p.OPTION_REPLY_MAGIC, option, reply, len(data))
        self._send(header + data)

    def _send(self, data: bytes) -> None:
        try:
            send_buffers(self.sock, [data], len(data))
        except OSError as error:
            raise ClientGone(str(error)) from error


def _option_name(option: int) -> str:
    try:
        return f"NBD_OPT_{p.Option(option).name}"
    except ValueError:
        return str(option)


def _string(text: str) -> bytes:
    """``text`` as a protocol string: UTF-8, cut to MAX_STRING bytes at a character boundary."""
    return text.encode()[:p.MAX_STRING].decode(errors="ignore").encode()


def _decode_name(data: bytes) -> str:
    if len(data) > p.MAX_STRING:
        raise ValueError(f"export name of {len(data)} bytes is too long")
    return data.decode()  # UnicodeDecodeError is a ValueError


def _parse_info_request(data: bytes) -> tuple[str, set[int]]:
    """Split NBD_OPT_INFO / GO data into the export name and the info types asked."""
    if len(data) < p.NAME_LENGTH.size + p.INFO_COUNT.size:
        raise ValueError("option data too short")
    (name_length,) = p.NAME_LENGTH.unpack_from(data)
    count_at = p.NAME_LENGTH.size + name_length
    if count_at + p.INFO_COUNT.size > len(data):
        raise ValueError("export name runs past the option data")
    name = _decode_name(data[p.NAME_LENGTH.size:count_at])
    (count,) = p.INFO_COUNT.unpack_from(data, count_at)
    first = count_at + p.INFO_COUNT.size
    if first + count * p.INFO_REQUEST.size != len(data):
        raise ValueError("information request count does not match the option length")
    requests = {value for (value,) in p.INFO_REQUEST.iter_unpack(data[first:])}
    return name, requests
