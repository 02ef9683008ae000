"""A tiny NBD client over a raw socket, for sending what real clients never would."""

from __future__ import annotations

import itertools
import socket
import ssl
import struct

from drtool.nbd import protocol as p

TIMEOUT = 10.0


class ServerClosed(Exception):
    """The server closed the connection."""


class RawClient:
    """Connects to a Unix socket path, or to a TCP (host, port)."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=TIMEOUT)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(address)
        self._handles = itertools.count(1)

    def starttls(self, context: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> None:
        """NBD_OPT_STARTTLS, then the client side of the TLS handshake (raises on a refusal)."""
        self.option(p.Option.STARTTLS)
        option, reply, data = self.option_reply()
        assert (option, reply) == (p.Option.STARTTLS, p.Reply.ACK), (hex(reply), data)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bytes ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, length: int) -> bytes:
        data = bytearray()
        while len(data) < length:
            chunk = self.sock.recv(length - len(data))
            if not chunk:
                raise ServerClosed(f"closed after {len(data)} of {length} bytes")
            data += chunk
        return bytes(data)

    def server_closed(self) -> bool:
        """Wait (up to TIMEOUT) for the server to hang up; True if it did."""
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    # -- handshake ----------------------------------------------------------------

    def greeting(self, client_flags: int = p.ClientFlag.FIXED_NEWSTYLE | p.ClientFlag.NO_ZEROES) -> int:
        magic, newstyle, flags = p.GREETING.unpack(self.recv_exact(p.GREETING.size))
        assert (magic, newstyle) == (p.NBDMAGIC, p.IHAVEOPT)
        self.send(p.CLIENT_FLAGS.pack(client_flags))
        return flags

    def option(self, option: int, data: bytes = b"", magic: int = p.IHAVEOPT) -> None:
        self.send(p.OPTION_HEADER.pack(magic, option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply, length = p.OPTION_REPLY.unpack(self.recv_exact(p.OPTION_REPLY.size))
        assert magic == p.OPTION_REPLY_MAGIC
        return option, reply, self.recv_exact(length)

    def info(self, option: int, name: str, requests: tuple[int, ...] = ()) -> tuple[int, dict[int, bytes]]:
        """Send NBD_OPT_INFO or GO; return the final reply type and the infos by type."""
        encoded = name.encode()
        self.option(option, struct.pack(">I", len(encoded)) + encoded
                    + struct.pack(f">H{len(requests)}H", len(requests), *requests))
        infos: dict[int, bytes] = {}
        while True:
            replied_to, reply, data = self.option_reply()
            assert replied_to == option
            if reply != p.Reply.INFO:
                return reply, infos
            (kind,) = struct.unpack_from(">H", data)
            infos[kind] = data

    def connect(self, name: str) -> tuple[int, int]:
        """Whole handshake with NBD_OPT_GO; return (size, transmission flags)."""
        self.greeting()
        reply, infos = self.info(p.Option.GO, name)
        assert reply == p.Reply.ACK, hex(reply)
        _, size, flags = p.INFO_EXPORT.unpack(infos[p.Info.EXPORT])
        return size, flags

    # -- transmission ---------------------------------------------------------------

    def request(self, command: int, offset: int = 0, length: int = 0, flags: int = 0,
                payload: bytes = b"", magic: int = p.REQUEST_MAGIC) -> int:
        handle = next(self._handles)
        self.send(p.REQUEST.pack(magic, flags, command, handle, offset, length) + payload)
        return handle

    def reply(self) -> tuple[int, int]:
        """The next simple reply header: (error, handle)."""
        magic, error, handle = p.SIMPLE_REPLY.unpack(self.recv_exact(p.SIMPLE_REPLY.size))
        assert magic == p.SIMPLE_REPLY_MAGIC
        return error, handle

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[int, bytes]:
        handle = self.request(p.Command.READ, offset, length, flags)
        error, replied = self.reply()
        assert replied == handle
        return error, (self.recv_exact(length) if error == 0 else b"")

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        handle = self.request(p.Command.WRITE, offset, len(data), flags, payload=data)
        error, replied = self.reply()
        assert replied == handle
        return error

    def command(self, command: int, offset: int = 0, length: int = 0, flags: int = 0) -> int:
        """A request without payload or reply data (FLUSH, TRIM, WRITE_ZEROES, unknown)."""
        handle = self.request(command, offset, length, flags)
        error, replied = self.reply()
        assert replied == handle
        return error
