"""Traffic no real client sends: every case gets a correct error reply or a clean
close, and the server goes on serving another client afterwards."""

from __future__ import annotations

import socket
import struct

import pytest

from drtool.nbd import protocol as p
from tests.nbd.conftest import EXPORT, IMAGE_SIZE, Image, Served
from tests.nbd.rawclient import RawClient

CHUNK = 65536


@pytest.fixture
def check_still_serving(served: Served, image: Image):
    """After the test body, a fresh client must still read correct data."""
    yield
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        for offset in (0, IMAGE_SIZE - CHUNK):
            error, data = client.read(offset, CHUNK)
            assert error == 0
            assert data == image.current()[offset:offset + CHUNK]


pytestmark = pytest.mark.usefixtures("check_still_serving")


# -- handshake ------------------------------------------------------------------


def test_unknown_client_flags_close_the_connection(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.greeting(client_flags=0x80)
        assert client.server_closed()


def test_bad_option_magic_closes_the_connection(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.greeting()
        client.option(p.Option.LIST, magic=0x1234567890ABCDEF)
        assert client.server_closed()


def test_unknown_option_is_unsupported_and_haggling_goes_on(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.greeting()
        for option in (p.Option.STRUCTURED_REPLY, p.Option.STARTTLS, 0x7FFF):
            client.option(option, b"ignored data")
            assert client.option_reply()[:2] == (option, p.Reply.ERR_UNSUP)
        reply, infos = client.info(p.Option.GO, EXPORT)
        assert reply == p.Reply.ACK
        assert client.read(0, 512)[0] == 0


def test_unknown_export(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.greeting()
        for option in (p.Option.INFO, p.Option.GO):
            reply, infos = client.info(option, "nope")
            assert reply == p.Reply.ERR_UNKNOWN and not infos
        client.option(p.Option.EXPORT_NAME, b"nope")  # cannot be answered with an error
        assert client.server_closed()


def test_info_reports_what_was_asked(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.greeting()
        requests = (p.Info.NAME, p.Info.DESCRIPTION, p.Info.BLOCK_SIZE, 0x4242)
        reply, infos = client.info(p.Option.INFO, EXPORT, requests)
        assert reply == p.Reply.ACK
        assert p.INFO_EXPORT.unpack(infos[p.Info.EXPORT])[1] == IMAGE_SIZE
        assert infos[p.Info.NAME][2:] == EXPORT.encode()
        assert infos[p.Info.DESCRIPTION][2:] == b"test disk"
        assert p.INFO_BLOCK_SIZE.unpack(infos[p.Info.BLOCK_SIZE])[1:] == (1, 4096, 32 << 20)
        assert set(infos) == {p.Info.EXPORT, p.Info.NAME, p.Info.DESCRIPTION, p.Info.BLOCK_SIZE}
        client.option(p.Option.ABORT)
        assert client.option_reply()[:2] == (p.Option.ABORT, p.Reply.ACK)


@pytest.mark.parametrize("data", [
    b"",                                                  # no name length
    struct.pack(">I", 100) + b"disk" + struct.pack(">H", 0),  # name runs past the data
    struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2) + struct.pack(">H", 1),  # short list
    struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
], ids=["empty", "long-name", "short-list", "not-utf8"])
def test_malformed_go_is_invalid(served: Served, data: bytes) -> None:
    with RawClient(served.unix_path) as client:
        client.greeting()
        client.option(p.Option.GO, data)
        assert client.option_reply()[:2] == (p.Option.GO, p.Reply.ERR_INVALID)
        client.option(p.Option.LIST, b"junk")
        assert client.option_reply()[:2] == (p.Option.LIST, p.Reply.ERR_INVALID)


def test_huge_option_closes_the_connection(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.greeting()
        client.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Option.GO, 1 << 30))
        assert client.server_closed()


def test_export_name_without_no_zeroes_gets_the_padding(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.greeting(client_flags=p.ClientFlag.FIXED_NEWSTYLE)
        client.option(p.Option.EXPORT_NAME, EXPORT.encode())
        size, flags = p.EXPORT_NAME_REPLY.unpack(client.recv_exact(p.EXPORT_NAME_REPLY.size))
        assert size == IMAGE_SIZE and flags & p.TransmissionFlag.HAS_FLAGS
        assert client.recv_exact(124) == bytes(124)
        assert client.read(0, 4096)[0] == 0


# -- transmission -----------------------------------------------------------------


def test_out_of_range_and_bad_requests_get_errors(served: Served, image: Image) -> None:
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        assert client.read(IMAGE_SIZE - 512, 1024)[0] == p.NbdErrno.EINVAL
        assert client.read(2**63, 512)[0] == p.NbdErrno.EINVAL
        assert client.write(IMAGE_SIZE - 512, bytes(1024)) == p.NbdErrno.ENOSPC
        assert client.command(p.Command.TRIM, IMAGE_SIZE, 512) == p.NbdErrno.EINVAL
        assert client.command(p.Command.WRITE_ZEROES, IMAGE_SIZE - 1, 2) == p.NbdErrno.ENOSPC
        assert client.command(p.Command.CACHE, 0, 512) == p.NbdErrno.EINVAL
        assert client.command(p.Command.BLOCK_STATUS, 0, 512) == p.NbdErrno.EINVAL
        assert client.command(0x4242, 0, 512) == p.NbdErrno.EINVAL
        assert client.read(0, 512, flags=p.CommandFlag.NO_HOLE)[0] == p.NbdErrno.EINVAL
        assert client.read(0, 512, flags=p.CommandFlag.DF)[0] == p.NbdErrno.EINVAL
        assert client.command(p.Command.WRITE_ZEROES, 0, 512, flags=p.CommandFlag.FAST_ZERO) \
            == p.NbdErrno.EINVAL
        assert client.read(0, 0) == (0, b"")
        assert client.write(0, b"") == 0
        assert client.command(p.Command.TRIM, 0, 0) == 0
        assert client.command(p.Command.WRITE_ZEROES, 0, 0) == 0
        assert client.read(IMAGE_SIZE, 0) == (0, b"")
        error, data = client.read(IMAGE_SIZE - 512, 512)
        assert error == 0 and data == image.data[-512:]
    assert image.current() == image.data


def test_oversized_requests(served: Served, image: Image) -> None:
    too_big = (32 << 20) + 1
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        assert client.read(0, too_big)[0] == p.NbdErrno.EINVAL
        # The refused payload is read and dropped: the stream stays in step.
        assert client.write(0, b"\x5a" * too_big) == p.NbdErrno.EINVAL
        error, data = client.read(0, CHUNK)
        assert error == 0 and data == image.data[:CHUNK]
        # TRIM and WRITE_ZEROES carry no payload: only the export's size limits them.
        assert client.command(p.Command.WRITE_ZEROES, 0, IMAGE_SIZE) == 0
    assert image.current() == bytes(IMAGE_SIZE)


def test_bad_request_magic_closes_the_connection(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        client.request(p.Command.READ, 0, 512, magic=0x12560953)
        assert client.server_closed()


def test_truncated_request_closes_cleanly(served: Served) -> None:
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        client.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Command.READ, 1, 0, 512)[:13])
        client.sock.shutdown(socket.SHUT_WR)  # the request will never be completed
        assert client.server_closed()


def test_disconnect_in_the_middle_of_a_write_payload(served: Served, image: Image) -> None:
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        header = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Command.WRITE, 1, 0, CHUNK)
        client.send(header + b"\x77" * (CHUNK // 2))
    with RawClient(served.unix_path) as other:  # the server noticed and carries on
        other.connect(EXPORT)
        assert other.read(0, CHUNK) == (0, image.data[:CHUNK])
    assert image.current() == image.data  # a write never received in full is not applied


def test_disc_answers_requests_in_flight_first(served: Served, image: Image) -> None:
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        handles = [client.request(p.Command.READ, index * CHUNK, CHUNK) for index in range(16)]
        handles.append(client.request(p.Command.WRITE, 16 * CHUNK, 4, payload=b"abcd"))
        client.request(p.Command.DISC)
        seen = set()
        for _ in handles:
            error, handle = client.reply()
            assert error == 0
            if handle != handles[-1]:
                index = handle - handles[0]
                assert client.recv_exact(CHUNK) == image.data[index * CHUNK:(index + 1) * CHUNK]
            seen.add(handle)
        assert seen == set(handles)
        assert client.server_closed()
    assert image.current()[16 * CHUNK:16 * CHUNK + 4] == b"abcd"


def test_many_requests_in_flight_are_matched_by_handle(served: Served, image: Image) -> None:
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        wanted = {}
        for index in range(200):
            offset = (index * 7919 * 512) % (IMAGE_SIZE - 4096)
            wanted[client.request(p.Command.READ, offset, 4096)] = offset
        for _ in range(len(wanted)):
            error, handle = client.reply()
            assert error == 0
            offset = wanted.pop(handle)
            assert client.recv_exact(4096) == image.data[offset:offset + 4096]
