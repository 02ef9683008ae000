"""Tokens, TLS, limits and bad input: every refusal is a 4xx problem and the server keeps serving."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from drtool import wire
from drtool.client import ReplicaClient
from drtool.errors import PeerAuthError
from tests.conftest import require_tool
from tests.replica.conftest import VOLUME_ID, ServerProcess, assert_problem, call, write

RS = 4096


@pytest.fixture
def vol(client: ReplicaClient) -> str:
    client.ensure_volume("vol", 16 * RS, RS, VOLUME_ID)
    return "vol"


def raw_request(server: ServerProcess, data: bytes) -> bytes:
    """Send bytes as they are (no client library to tidy them up); return the whole answer."""
    with socket.create_connection(server.address.rsplit(":", 1)) as sock:  # type: ignore[arg-type]
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_token_is_required(server: ServerProcess, vol: str) -> None:
    assert_problem(call(server, "GET", "/v1/volumes/vol", token=False), 401, "Authorization")
    assert_problem(call(server, "GET", "/v1/volumes/vol", token=False,
                        headers={"Authorization": "Bearer " + "0" * 32}), 401, "wrong")
    assert call(server, "GET", "/v1/health", token=False).json()["status"] == "ok"
    with server.client(token="wrong-token-0000"), pytest.raises(PeerAuthError, match="401"):
        server.client(token="wrong-token-0000").volume_info("vol")


def test_token_file_readable_by_others_refuses_to_start(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    token.chmod(0o644)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "drtool", "serve", "--root", str(tmp_path / "r"),
                             "--listen", "127.0.0.1:0", "--token-file", str(token)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and time.monotonic() - started < 30
    assert "mode 0644" in result.stderr and "chmod 600" in result.stderr


def test_tls_round_trip(tmp_path: Path, start_server) -> None:  # type: ignore[no-untyped-def]
    require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    server = start_server(tls=(cert, key))
    assert server.url.startswith("https://")
    with server.client(ca=str(cert)) as c:
        c.ensure_volume("vol", 8 * RS, RS, VOLUME_ID)
        c.send_records("vol", write(1, RS, b"s" * RS))
        assert [r.ok for r in c.read_regions("vol", [(0, 8)])] == [True] * 8
        assert c.read_range("vol", RS, 10) == b"s" * 10
    with server.client() as untrusting, pytest.raises(PeerAuthError, match="TLS"):
        untrusting.health()


def test_bad_record_bodies_are_refused(server: ServerProcess, vol: str) -> None:
    good = b"".join(write(1, 0, b"g" * 100))
    headers = {"Content-Type": wire.RECORDS_CONTENT_TYPE}
    cases = {
        "truncated": good[:-1],
        "not a record": b"hello world, this is not a record at all; " * 3,
        "checksum": good[:20] + bytes([good[20] ^ 1]) + good[21:],  # seq byte flipped, crc unchanged
        "digest": good[:-1] + bytes([good[-1] ^ 1]),
        "crosses a region": b"".join(write(2, RS - 10, b"x" * 20)),
        "past the end": b"".join(write(3, 16 * RS - 5, b"x" * 10)),
    }
    for expect, body in cases.items():
        response = call(server, "POST", "/v1/volumes/vol/records", data=body, headers=dict(headers))
        assert_problem(response, 400)
        assert expect.split()[-1] in response.json()["detail"], (expect, response.json())
    # The bad batch was refused as a whole: a good record in front of a bad one is not applied.
    response = call(server, "POST", "/v1/volumes/vol/records", data=good + cases["digest"], headers=headers)
    assert_problem(response, 400)
    assert call(server, "GET", "/v1/volumes/vol").json()["applied_seq"] == 0
    assert call(server, "POST", "/v1/volumes/vol/records", data=good).json()["applied"] == 1


def test_oversized_and_unframed_bodies(server: ServerProcess, vol: str) -> None:
    auth = f"Authorization: Bearer {server.token}\r\n".encode()
    huge = raw_request(server, b"POST /v1/volumes/vol/records HTTP/1.1\r\nHost: x\r\n" + auth
                       + b"Content-Length: 999999999999\r\n\r\nabc")
    assert huge.startswith(b"HTTP/1.1 413") and b"application/problem+json" in huge
    chunked = raw_request(server, b"POST /v1/volumes/vol/records HTTP/1.1\r\nHost: x\r\n" + auth
                          + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 411")
    garbage = raw_request(server, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400") and b"problem+json" in garbage
    assert call(server, "GET", "/v1/volumes/vol").status_code == 200


def test_bad_names_and_paths(server: ServerProcess, vol: str) -> None:
    for path in ("/v1/volumes/%2e%2e", "/v1/volumes/..", "/v1/volumes/a%2fb", "/v1/volumes/%2e%2e%2fetc",
                 "/v1/volumes/vol/snapshots/%2e%2e", "/v1/volumes/" + "x" * 65, "/v1/volumes/a%ffb"):
        method = b"DELETE" if "snapshots" in path else b"GET"
        # Raw bytes: client libraries would resolve the dot segments before sending.
        answer = raw_request(server, method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                             + f"Authorization: Bearer {server.token}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 400") and b"not valid" in answer, (path, answer)
    assert_problem(call(server, "GET", "/v1/volumes/nope"), 404, "nope")
    assert_problem(call(server, "GET", "/v1/nothing"), 404)
    assert_problem(call(server, "PATCH", "/v1/volumes/vol"), 501)
    assert_problem(call(server, "POST", "/v1/volumes/vol"), 405)
    assert_problem(call(server, "PUT", "/v1/volumes/x", json={"size": 1}), 400)
    assert_problem(call(server, "PUT", "/v1/volumes/x", json={"size": RS, "region_size": 3, "volume_id": VOLUME_ID}), 400)
    assert_problem(call(server, "POST", "/v1/volumes/vol/read", data=b"{not json"), 400)
    assert_problem(call(server, "POST", "/v1/volumes/vol/read", json={"runs": [[15, 2]]}), 400, "outside")
    assert_problem(call(server, "POST", "/v1/volumes/vol/read", json={"runs": [["a", 1]]}), 400)
    assert_problem(call(server, "GET", "/v1/volumes/vol/data", headers={"Range": "bytes=999999-"}), 416)
    assert_problem(call(server, "GET", "/v1/volumes/vol/changes?after=x"), 400)
    assert_problem(call(server, "GET", "/v1/volumes/vol/data?snapshot=none"), 404)
    assert call(server, "GET", "/v1/volumes/vol").status_code == 200


def test_too_many_regions_per_read(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(limits={"max_read_regions": 4, "max_records": 2, "max_body": 10000})
    with server.client() as c:
        c.ensure_volume("vol", 16 * RS, RS, VOLUME_ID)
    assert_problem(call(server, "POST", "/v1/volumes/vol/read", json={"runs": [[0, 5]]}), 400, "at most 4")
    body = b"".join(write(1, 0, b"a") + write(2, 0, b"b") + write(3, 0, b"c"))
    assert_problem(call(server, "POST", "/v1/volumes/vol/records", data=body), 400, "more than 2")
    assert_problem(call(server, "POST", "/v1/volumes/vol/records", data=b"".join(write(1, 0, bytes(RS)))
                        + b"".join(write(2, RS, bytes(RS))) * 2), 413)


def test_slow_clients_are_cut_off(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(limits={"request_timeout": 1.0, "idle_timeout": 5.0})
    with socket.create_connection(server.address.rsplit(":", 1)) as sock:  # type: ignore[arg-type]
        started = time.monotonic()
        sock.sendall(b"GET /v1/health HTTP/1.1\r\n")
        closed = False
        # Dribble header bytes, each well inside the idle timeout, until the server hangs up.
        while not closed and time.monotonic() - started < 8:
            try:
                sock.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([sock], [], [], 0.2)[0]:
                closed = sock.recv(1) == b""
        assert time.monotonic() - started < 5
    assert call(server, "GET", "/v1/health").status_code == 200


def test_limits_are_checked_before_the_server_starts(tmp_path: Path) -> None:
    from drtool.errors import UsageError
    from drtool.replica.server import Limits, serve

    for bad in ({"max_connections": 0}, {"request_timeout": 0}, {"max_body": -1}):
        with pytest.raises(UsageError, match=next(iter(bad)).replace("_", "-")):
            Limits(**bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="journal-limit"):
        serve(str(tmp_path), "127.0.0.1:0", journal_limit=-1)
