"""NBD over TLS (proto.md "TLS support", FORCEDTLS): real clients, raw option haggling, listeners.

A TCP listener with a TLS context refuses every option but STARTTLS and ABORT
with NBD_REP_ERR_TLS_REQD until the client upgrades, then serves as usual over
TLS.  libnbd's nbdinfo and nbdcopy (``nbds://`` URIs with
``tls-certificates=DIR``) and qemu-img (``tls-creds-x509``) are the clients.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from drtool.errors import UsageError
from drtool.nbd import FileExport, NbdServer
from drtool.nbd import protocol as p
from drtool.nbd.tls import server_context
from tests.conftest import require_tool
from tests.nbd.conftest import EXPORT, IMAGE_SIZE, GatedExport, Image, Served
from tests.nbd.rawclient import RawClient, ServerClosed
from tests.nbd.tlscerts import Pki, make_pki

TIMEOUT = 60


def run(*argv: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def serve_tls(tmp_path: Path, image: Image, pki: Pki) -> Iterator[Callable[..., Served]]:
    """serve_tls(ca=False, workers=4) -> the image served on a Unix socket and on TLS-only TCP."""
    servers: list[NbdServer] = []

    with FileExport(image.path, EXPORT, "test disk") as export:
        def start(ca: bool = False, **options) -> Served:
            context = server_context(str(pki.cert), str(pki.key), str(pki.ca) if ca else None)
            path = str(tmp_path / f"tls{len(servers)}.sock")
            server = NbdServer(lambda: {EXPORT: export}, unix_path=path, tcp=("127.0.0.1", 0),
                               tcp_tls=context, **options)
            servers.append(server)
            return Served(server, path, server.start())

        yield start
        for server in servers:
            server.stop()


def nbds(served: Served, certificates: Path, name: str = EXPORT) -> str:
    return f"nbds://127.0.0.1:{served.port}/{name}?tls-certificates={certificates}"


def client_context(pki: Pki, certificate: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if certificate:
        context.load_cert_chain(str(pki.client / "client-cert.pem"), str(pki.client / "client-key.pem"))
    return context


# -- real clients ----------------------------------------------------------------------


def test_plain_client_is_refused_with_tls_required(serve_tls, pki: Pki) -> None:
    require_tool("nbdinfo", "qemu-img")
    served = serve_tls()
    result = run("nbdinfo", "--json", served.uri(tcp=True))
    assert result.returncode != 0 and "export-size" not in result.stdout
    # The listing is refused too: no export name leaks before TLS.
    listed = run("nbdinfo", "--list", served.uri("", tcp=True))
    assert listed.returncode != 0 and EXPORT not in listed.stdout
    # qemu shows the server's message: TLS is what is missing.
    result = run("qemu-img", "info", "-f", "raw", served.uri(tcp=True))
    assert result.returncode != 0
    assert "TLS is required" in result.stderr, result.stderr


def test_tls_client_reads_and_writes_correct_bytes(serve_tls, pki: Pki, image: Image, tmp_path: Path,
                                                   workers: int) -> None:
    require_tool("nbdinfo", "nbdcopy")
    served = serve_tls(workers=workers)
    info = json.loads(run("nbdinfo", "--json", nbds(served, pki.anon)).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == IMAGE_SIZE
    copy = tmp_path / "copy.img"
    result = run("nbdcopy", "--connections=4", "--requests=16", nbds(served, pki.anon), copy)
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes() == image.data
    # And back: the export is written over TLS (several connections, large requests).
    new = os.urandom(IMAGE_SIZE)
    source = tmp_path / "new.img"
    source.write_bytes(new)
    result = run("nbdcopy", "--connections=4", "--request-size=1048576", source, nbds(served, pki.anon))
    assert result.returncode == 0, result.stderr
    assert image.current() == new


def test_qemu_img_converts_over_tls(serve_tls, pki: Pki, image: Image, tmp_path: Path) -> None:
    require_tool("qemu-img")
    served = serve_tls()
    converted = tmp_path / "converted.img"
    result = run("qemu-img", "convert", "--object", f"tls-creds-x509,id=tls0,dir={pki.anon},endpoint=client",
                 "--image-opts",
                 f"driver=nbd,host=127.0.0.1,port={served.port},export={EXPORT},tls-creds=tls0",
                 "-O", "raw", converted)
    assert result.returncode == 0, result.stdout + result.stderr
    assert converted.read_bytes() == image.data


def test_client_trusting_another_ca_fails(serve_tls, pki: Pki) -> None:
    require_tool("nbdinfo")
    served = serve_tls()
    result = run("nbdinfo", nbds(served, pki.wrong_ca))
    assert result.returncode != 0
    assert "certificate" in result.stderr.lower(), result.stderr


def test_client_certificates_required_with_a_ca(serve_tls, pki: Pki, image: Image, tmp_path: Path) -> None:
    require_tool("nbdinfo", "nbdcopy")
    served = serve_tls(ca=True)
    # No certificate: the server ends the TLS handshake.
    assert run("nbdinfo", nbds(served, pki.anon)).returncode != 0
    # A certificate another CA signed (and a CA that does not know the server): refused.
    assert run("nbdinfo", nbds(served, pki.wrong_ca)).returncode != 0
    # The right one: served.
    copy = tmp_path / "copy.img"
    result = run("nbdcopy", nbds(served, pki.client), copy)
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes() == image.data


def test_unix_socket_of_a_tls_server_stays_plain(serve_tls, image: Image) -> None:
    served = serve_tls()
    with RawClient(served.unix_path) as client:
        client.connect(EXPORT)
        assert client.read(0, 4096) == (0, image.data[:4096])


# -- option haggling, byte by byte ------------------------------------------------------------


def test_every_option_before_starttls_gets_tls_reqd(serve_tls) -> None:
    served = serve_tls()
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        client.option(p.Option.LIST)
        option, reply, message = client.option_reply()
        assert (option, reply) == (p.Option.LIST, p.Reply.ERR_TLS_REQD)
        assert b"TLS is required" in message
        for option in (p.Option.INFO, p.Option.GO):
            assert client.info(option, EXPORT)[0] == p.Reply.ERR_TLS_REQD
        for option in (p.Option.STRUCTURED_REPLY, 0x7FFF):
            client.option(option)
            assert client.option_reply()[:2] == (option, p.Reply.ERR_TLS_REQD)
        client.option(p.Option.ABORT)
        assert client.option_reply()[:2] == (p.Option.ABORT, p.Reply.ACK)


def test_export_name_before_starttls_hangs_up(serve_tls) -> None:
    served = serve_tls()
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        client.option(p.Option.EXPORT_NAME, EXPORT.encode())
        assert client.server_closed()


def test_starttls_then_the_usual_handshake(serve_tls, pki: Pki, image: Image) -> None:
    served = serve_tls()
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        client.starttls(client_context(pki))
        client.option(p.Option.STARTTLS)  # once only
        assert client.option_reply()[:2] == (p.Option.STARTTLS, p.Reply.ERR_INVALID)
        client.option(p.Option.LIST)
        option, reply, data = client.option_reply()
        assert reply == p.Reply.SERVER and EXPORT.encode() in data
        assert client.option_reply()[:2] == (p.Option.LIST, p.Reply.ACK)
        reply, infos = client.info(p.Option.GO, EXPORT)
        assert reply == p.Reply.ACK
        assert client.read(4096, 65536) == (0, image.data[4096:4096 + 65536])
        assert client.write(0, b"\xab" * 512) == 0
        assert client.command(p.Command.FLUSH) == 0
    assert image.current()[:512] == b"\xab" * 512


def test_stalled_call_over_tls_lets_others_pass(pki: Pki, image: Image, tmp_path: Path) -> None:
    """A call that waits hands the reader role over: one thread reads the TLS stream while others
    send replies through it, and the bytes stay right."""
    chunk = 65536
    context = server_context(str(pki.cert), str(pki.key))
    with GatedExport(image.path, chunk, name=EXPORT) as export, \
            NbdServer(lambda: {EXPORT: export}, unix_path=tmp_path / "nbd.sock", tcp=("127.0.0.1", 0),
                      tcp_tls=context, workers=4) as server, \
            RawClient(("127.0.0.1", server.tcp_port)) as client:
        client.greeting()
        client.starttls(client_context(pki))
        assert client.info(p.Option.GO, EXPORT)[0] == p.Reply.ACK
        stuck = client.request(p.Command.READ, chunk, chunk)
        assert export.waiting.wait(10)
        payload = os.urandom(chunk)
        handles = {client.request(p.Command.READ, 4 * chunk + index * 4096, 4096): index for index in range(8)}
        written = client.request(p.Command.WRITE, 16 * chunk, chunk, payload=payload)
        for _ in range(9):
            error, handle = client.reply()
            assert error == 0 and handle != stuck
            if handle != written:
                offset = 4 * chunk + handles[handle] * 4096
                assert client.recv_exact(4096) == image.data[offset:offset + 4096]
        export.gate.set()
        assert client.reply() == (0, stuck)
        assert client.recv_exact(chunk) == image.data[chunk:2 * chunk]
        assert client.read(16 * chunk, chunk) == (0, payload)


def test_starttls_with_data_is_invalid(serve_tls) -> None:
    served = serve_tls()
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        client.option(p.Option.STARTTLS, b"x")
        assert client.option_reply()[:2] == (p.Option.STARTTLS, p.Reply.ERR_INVALID)


def test_bytes_after_starttls_before_the_ack_end_the_connection(serve_tls) -> None:
    """Nothing sent in the clear may be taken as sent over TLS (STARTTLS injection)."""
    served = serve_tls()
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        client.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Option.STARTTLS, 0)
                    + p.OPTION_HEADER.pack(p.IHAVEOPT, p.Option.LIST, 0))
        assert client.option_reply()[:2] == (p.Option.STARTTLS, p.Reply.ACK)
        assert client.server_closed()


def test_client_without_fixed_newstyle_is_refused(serve_tls) -> None:
    served = serve_tls()
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting(client_flags=p.ClientFlag.NO_ZEROES)
        assert client.server_closed()


def test_a_failed_tls_handshake_leaves_the_server_serving(serve_tls, pki: Pki) -> None:
    served = serve_tls(ca=True)
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        with pytest.raises((ssl.SSLError, ServerClosed, ConnectionError)):
            client.starttls(client_context(pki))  # no client certificate
            client.option(p.Option.LIST)  # TLS 1.3: the refusal arrives after the handshake
            client.option_reply()
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        client.starttls(client_context(pki, certificate=True))
        assert client.info(p.Option.INFO, EXPORT)[0] == p.Reply.ACK


def test_garbage_instead_of_a_client_hello(serve_tls) -> None:
    served = serve_tls()
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        client.option(p.Option.STARTTLS)
        assert client.option_reply()[:2] == (p.Option.STARTTLS, p.Reply.ACK)
        client.send(b"GET / HTTP/1.0\r\n\r\n" + bytes(64))
        assert client.server_closed()
    with RawClient(served.unix_path) as client:  # still serving
        client.connect(EXPORT)


def test_server_without_tls_answers_starttls_unsupported(served: Served) -> None:
    with RawClient(("127.0.0.1", served.port)) as client:
        client.greeting()
        client.option(p.Option.STARTTLS)
        assert client.option_reply()[:2] == (p.Option.STARTTLS, p.Reply.ERR_UNSUP)
        client.option(p.Option.INFO, struct.pack(">IH", len(EXPORT), 0)[:4] + EXPORT.encode()
                      + struct.pack(">H", 0))
        assert client.option_reply()[1] == p.Reply.INFO


# -- certificates and keys ---------------------------------------------------------------------


def test_tls_key_readable_by_others_is_refused(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(pki.key.read_bytes())
    key.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        server_context(str(pki.cert), str(key))


def test_missing_or_bad_certificate_files_are_usage_errors(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--tls-cert"):
        server_context(str(tmp_path / "nope.pem"), str(pki.key))
    with pytest.raises(UsageError, match="cannot load"):
        server_context(str(pki.ca), str(pki.key))  # the key does not match the certificate
    with pytest.raises(UsageError, match="--tls-key"):
        server_context(str(pki.cert), "")


# -- the Unix socket's directory ------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_socket_directory_writable_by_others_is_refused(tmp_path: Path, image: Image, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with FileExport(image.path, EXPORT) as export:
        server = NbdServer(lambda: {EXPORT: export}, unix_path=shared / "nbd.sock")
        with pytest.raises(UsageError, match="writable by other users"):
            server.start()
    assert not (shared / "nbd.sock").exists()


def test_socket_directory_of_another_user_is_refused(tmp_path: Path, image: Image) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory away")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with FileExport(image.path, EXPORT) as export:
        server = NbdServer(lambda: {EXPORT: export}, unix_path=theirs / "nbd.sock")
        with pytest.raises(UsageError, match="belongs to"):
            server.start()


def test_long_socket_path_works(tmp_path: Path, image: Image) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "nbd.sock"
    assert len(str(path)) > 108
    with FileExport(image.path, EXPORT) as export, NbdServer(lambda: {EXPORT: export}, unix_path=path):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
        try:
            with RawClient(f"/proc/self/fd/{fd}/nbd.sock") as client:
                client.connect(EXPORT)
        finally:
            os.close(fd)
    assert not path.exists()


def test_no_tcp_listener_without_an_address(tmp_path: Path, image: Image) -> None:
    with FileExport(image.path, EXPORT) as export:
        server = NbdServer(lambda: {EXPORT: export}, unix_path=tmp_path / "nbd.sock")
        assert server.start() is None
        try:
            kinds = {(s.family, s.type) for s in server._listeners}
            assert kinds == {(socket.AF_UNIX, socket.SOCK_STREAM)}
        finally:
            server.stop()
