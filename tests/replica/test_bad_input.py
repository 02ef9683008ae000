"""The HTTP server on bad input (issue 11): ambiguous framing, numbers, HTTP/0.9, slow clients.

Raw sockets throughout: client libraries tidy up exactly what these tests must send.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable

import pytest

from drtool import wire
from drtool.client import ReplicaClient
from tests.replica.conftest import VOLUME_ID, ServerProcess, assert_problem, call, write

RS = 4096


@pytest.fixture
def vol(client: ReplicaClient) -> str:
    client.ensure_volume("vol", 16 * RS, RS, VOLUME_ID)
    return "vol"


def exchange(server: ServerProcess, data: bytes, source: str | None = None, timeout: float = 10.0) -> bytes:
    """Send ``data`` as it is, half-close, and return everything the server answers until it hangs up."""
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def statuses(answer: bytes) -> list[bytes]:
    """The status lines of every response in ``answer``."""
    return re.findall(rb"(?:^|\n)(HTTP/1\.[01] [0-9]{3})", answer)


def smuggled(headers: bytes, auth: bytes) -> bytes:
    """A POST whose body is a second request: served as one only if the framing was misread."""
    inner = b"DELETE /v1/volumes/vol HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 0\r\n\r\n"
    return (b"POST /v1/volumes/vol/records HTTP/1.1\r\nHost: x\r\n" + auth + headers
            + b"Content-Type: application/x-drtool-records\r\n\r\n" + inner)


def test_ambiguous_framing_is_refused_and_the_connection_closed(server: ServerProcess, vol: str) -> None:
    auth = f"Authorization: Bearer {server.token}\r\n".encode()
    inner_length = len(b"DELETE /v1/volumes/vol HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 0\r\n\r\n")
    n = str(inner_length).encode()
    cases = {
        "chunked": (b"Transfer-Encoding: chunked\r\n", b"411"),
        "chunked and length": (b"Transfer-Encoding: chunked\r\nContent-Length: " + n + b"\r\n", b"400"),
        "plus sign": (b"Content-Length: +" + n + b"\r\n", b"400"),
        "trailing space": (b"Content-Length: " + n + b" \r\n", b"400"),
        "two lengths": (b"Content-Length: 0\r\nContent-Length: " + n + b"\r\n", b"400"),
        "two equal lengths": (b"Content-Length: " + n + b"\r\nContent-Length: " + n + b"\r\n", b"400"),
    }
    for name, (headers, status) in cases.items():
        answer = exchange(server, smuggled(headers, auth))
        assert len(statuses(answer)) == 1 and statuses(answer)[0].startswith(b"HTTP/1.1 " + status), (name, answer)
        assert b"Connection: close" in answer and b"application/problem+json" in answer, (name, answer)
    # The duplicate-header case needs no token: the smuggled request's own token is what would act.
    answer = exchange(server, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: "
                      + n + b"\r\n\r\n" + b"DELETE /v1/volumes/vol HTTP/1.1\r\nHost: x\r\n" + auth
                      + b"Content-Length: 0\r\n\r\n")
    assert len(statuses(answer)) == 1 and statuses(answer)[0].startswith(b"HTTP/1.1 400"), answer
    assert call(server, "GET", "/v1/volumes/vol").status_code == 200  # never deleted


def test_an_unread_body_closes_the_connection(server: ServerProcess, vol: str) -> None:
    # No token: the server reads nothing of the body (it could be the next "request") and hangs up.
    body = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = exchange(server, b"POST /v1/volumes/vol/records HTTP/1.1\r\nHost: x\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert len(statuses(answer)) == 1 and statuses(answer)[0].startswith(b"HTTP/1.1 401"), answer
    assert b"Connection: close" in answer
    # With the token, a small body nobody needed is skipped and the connection stays in step.
    auth = f"Authorization: Bearer {server.token}\r\n".encode()
    answer = exchange(server, b"GET /v1/volumes/vol HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body + b"GET /v1/health HTTP/1.1\r\nHost: x\r\n"
                      + b"Connection: close\r\n\r\n")
    assert statuses(answer) == [b"HTTP/1.1 200", b"HTTP/1.1 200"], answer


def test_bad_numbers_are_400s_not_500s(server: ServerProcess, vol: str) -> None:
    auth = f"Authorization: Bearer {server.token}\r\n".encode()
    huge = b"9" * 5000
    for value in ("²".encode(), huge, b"1_0", b"0x10", b"-1", b""):
        answer = exchange(server, b"POST /v1/volumes/vol/records HTTP/1.1\r\nHost: x\r\n" + auth
                          + b"Content-Length: " + value + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400") and b"Content-Length" in answer, (value[:20], answer)
        assert b"Connection: close" in answer
    for value in (b"bytes=" + huge + b"-", b"bytes=0-" + huge, b"bytes=-" + huge):
        answer = exchange(server, b"GET /v1/volumes/vol/data HTTP/1.1\r\nHost: x\r\n" + auth
                          + b"Range: " + value + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400") and b"Range" in answer, (value[:20], answer)
    body = b"".join(write(1, 0, b"x" * 10))
    for value in (huge, "²".encode(), str(2**64).encode()):
        answer = exchange(server, b"POST /v1/volumes/vol/records HTTP/1.1\r\nHost: x\r\n" + auth
                          + b"Content-Type: " + wire.RECORDS_CONTENT_TYPE.encode() + b"\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\nX-Drtool-Complete-Through: " + value + b"\r\n\r\n" + body)
        assert answer.startswith(b"HTTP/1.1 400") and b"Complete-Through" in answer, (value[:20], answer)
    assert_problem(call(server, "GET", "/v1/volumes/vol/changes?after=" + "9" * 5000 + "&runs=0"), 400, "after")
    assert_problem(call(server, "GET", "/v1/volumes/vol/changes?after=%C2%B2&runs=0"), 400, "after")
    assert call(server, "GET", "/v1/volumes/vol").json()["applied_seq"] == 0
    assert "Traceback" not in server.log.read_text()


def test_http09_request_line_gets_a_status_line_or_nothing(server: ServerProcess) -> None:
    for line in (b"GET /v1/health\r\n\r\n", b"GET /v1/health\r\n", b"POST /v1/volumes\r\n\r\n"):
        answer = exchange(server, line)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), (line, answer)
    assert call(server, "GET", "/v1/health").status_code == 200


def _dribble(server: ServerProcess, source: str, stop: threading.Event, held: list[float]) -> None:
    """A slowloris that reconnects: one header byte every 0.2 s until the server hangs up, three
    times over; ``held`` gets how long each connection lasted (0: refused at once)."""
    host, port = server.address.rsplit(":", 1)
    for _ in range(3):
        if stop.is_set():
            return
        began = time.monotonic()
        try:
            sock = socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))
        except OSError:
            held.append(0.0)
            continue
        with sock:
            try:
                sock.sendall(b"GET /v1/volumes HTTP/1.1\r\n")
                sock.settimeout(0.2)
                while not stop.is_set():
                    sock.sendall(b"X")
                    try:
                        if sock.recv(1024) == b"":
                            break
                    except TimeoutError:
                        continue
            except OSError:
                pass
            held.append(time.monotonic() - began)


def test_slow_unauthenticated_clients_cannot_lock_out_the_primary(
        start_server: Callable[..., ServerProcess]) -> None:
    """60 slowloris connections from 6 addresses against 16 slots: the token holder still gets in."""
    server = start_server(limits={"max_connections": 16, "max_unauthenticated": 8,
                                  "max_unauthenticated_per_address": 4, "header_timeout": 1.0,
                                  "request_timeout": 30.0})
    stop = threading.Event()
    held: list[float] = []
    threads = [threading.Thread(target=_dribble, args=(server, f"127.0.0.{2 + i % 6}", stop, held), daemon=True)
               for i in range(60)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # let them take every slot they can
        began = time.monotonic()
        with server.client(timeout=(5.0, 10.0), retries=0) as client:
            client.ensure_volume("vol", 16 * RS, RS, VOLUME_ID)
            for seq in range(1, 21):
                client.send_records("vol", write(seq, (seq % 16) * RS, bytes([seq]) * RS))
                assert client.volume_info("vol")["applied_seq"] == seq
                time.sleep(0.05)  # the slow clients keep reconnecting meanwhile
        assert time.monotonic() - began < 20  # a generous bound: served, not starved until a timeout
        for thread in threads:
            thread.join(30)
        # Every slow connection was cut off (or refused) long before the 30 s request timeout.
        assert len(held) == 180 and max(held) < 10, sorted(held)[-5:]
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    log = server.log.read_text()
    assert "no complete request in time" in log and "closed to make room" in log
    # One address may hold only so many unauthenticated connections: the next one is refused.
    host, port = server.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5, source_address=("127.0.0.9", 0))
            for _ in range(5)]
    try:
        deadline = time.monotonic() + 10
        while "4 connections from this address have not authenticated yet" not in server.log.read_text():
            assert time.monotonic() < deadline, server.log.read_text()[-2000:]
            time.sleep(0.05)
    finally:
        for sock in idle:
            sock.close()
    assert call(server, "GET", "/v1/health").status_code == 200
