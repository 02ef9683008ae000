"""ReplicaClient against scripted peers: real sockets that answer with exactly the bytes a
test needs (early ends, bad frames, wrong regions, retries), where a real server never would."""

from __future__ import annotations

import socket
import threading

import blake3
import pytest

from drtool import wire
from drtool.client import ReplicaClient
from drtool.errors import Conflict, NotPermitted, PeerAuthError, PeerError, PeerProtocolError, PeerUnreachable


class ScriptedPeer:
    """Answers the n-th request with the n-th canned response, then hangs up."""

    def __init__(self, responses: list[bytes]) -> None:
        self.responses = responses
        self.requests: list[bytes] = []
        self.bodies: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for response in self.responses:
            conn, _ = self.listener.accept()
            with conn:
                head, body = _read_request(conn)
                self.requests.append(head)
                self.bodies.append(body)
                conn.sendall(response)
        self.listener.close()


def _read_request(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


def http(status: str, body: bytes, content_type: str = wire.FRAMES_CONTENT_TYPE, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {size}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def data_frame(region: int, data: bytes, digest: bytes | None = None) -> bytes:
    return wire.encode_frame_header(wire.FRAME_DATA, region, len(data), digest or blake3.blake3(data).digest()) + data


def end(count: int) -> bytes:
    return wire.encode_frame_header(wire.FRAME_END, count, 0)


@pytest.fixture
def regions() -> list[bytes]:
    return [bytes([i]) * 4096 for i in range(1, 4)]


def client_for(peer: ScriptedPeer) -> ReplicaClient:
    return ReplicaClient(peer.url, token="t" * 16, timeout=(2, 5))


def test_frames_verified_zero_frames_and_mismatches(regions: list[bytes]) -> None:
    body = (data_frame(0, regions[0]) + wire.encode_frame_header(wire.FRAME_ZERO, 1, 4096, wire.zero_digest(4096))
            + data_frame(2, regions[2], digest=b"\7" * 32) + end(3))
    peer = ScriptedPeer([http("200 OK", body)])
    with client_for(peer) as client:
        results = list(client.read_regions("v", [(0, 3)], expected=lambda r: None))
    assert [r.ok for r in results] == [True, True, False]
    assert bytes(results[1].data) == bytes(4096)
    assert results[2].data is None and "damaged" in (results[2].reason or "")
    assert b"Authorization: Bearer tttt" in peer.requests[0]


def test_stream_ending_early_raises(regions: list[bytes]) -> None:
    full = data_frame(0, regions[0]) + data_frame(1, regions[1]) + end(2)
    peer = ScriptedPeer([http("200 OK", full[:5000], length=len(full))])
    got = []
    with client_for(peer) as client, pytest.raises(PeerError, match="127.0.0.1"):
        for result in client.read_regions("v", [(0, 2)]):
            got.append(result)
    assert all(r.ok for r in got) and len(got) < 2


def test_stream_without_end_frame_raises(regions: list[bytes]) -> None:
    peer = ScriptedPeer([http("200 OK", data_frame(0, regions[0]))])
    with client_for(peer) as client, pytest.raises(PeerProtocolError, match="ended the stream"):
        list(client.read_regions("v", [(0, 1)]))


@pytest.mark.parametrize("damage", ["crc", "region", "end"])
def test_bad_frames_raise(regions: list[bytes], damage: str) -> None:
    frame = bytearray(data_frame(0, regions[0]))
    if damage == "crc":
        frame[10] ^= 1
    elif damage == "region":
        frame = bytearray(data_frame(5, regions[0]))
    body = bytes(frame) + end(7 if damage == "end" else 1)
    peer = ScriptedPeer([http("200 OK", body)])
    with client_for(peer) as client, pytest.raises(PeerProtocolError):
        list(client.read_regions("v", [(0, 1)]))


def test_region_larger_than_a_receive_block() -> None:
    big = bytes(range(256)) * (16 << 12)  # 16 MiB
    peer = ScriptedPeer([http("200 OK", data_frame(0, big) + data_frame(1, big[:100]) + end(2))])
    with client_for(peer) as client:
        digests = {0: blake3.blake3(big).digest(), 1: blake3.blake3(big[:100]).digest()}
        results = list(client.read_regions("v", [(0, 2)], expected=digests.get))
    assert [r.ok for r in results] == [True, True] and len(results[0].data) == len(big)


def test_error_frames_are_not_ok(regions: list[bytes]) -> None:
    message = b"I/O error at offset 4096".ljust(4096, b"\0")
    body = (data_frame(0, regions[0]) + wire.encode_frame_header(wire.FRAME_ERROR, 1, len(message)) + message
            + wire.encode_frame_header(wire.FRAME_ERROR, 2, 0) + end(3))
    peer = ScriptedPeer([http("200 OK", body)])
    with client_for(peer) as client:
        results = list(client.read_regions("v", [(0, 3)]))
    assert [(r.ok, r.reason) for r in results] == [
        (True, None), (False, "I/O error at offset 4096"),
        (False, "the region changed while it was read; read it again")]


def run_frame(first: int, regions: list[bytes], digests: list[bytes] | None = None) -> bytes:
    digests = digests or [blake3.blake3(r).digest() for r in regions]
    return wire.encode_run_head(first, len(regions[0]), digests) + b"".join(regions)


def test_run_frames_are_asked_for_and_verified_region_by_region(regions: list[bytes]) -> None:
    digests = [blake3.blake3(r).digest() for r in regions]
    body = run_frame(4, regions, [digests[0], b"\7" * 32, digests[2]]) + data_frame(9, regions[0]) + end(4)
    peer = ScriptedPeer([http("200 OK", body)])
    with client_for(peer) as client:
        results = [(r.region, r.ok, bytes(r.data) if r.ok else r.reason)
                   for r in client.read_regions("v", [(4, 3), (9, 1)], expected={6: b"\1" * 32}.get)]
    assert results[0] == (4, True, regions[0]) and results[3] == (9, True, regions[0])
    assert results[1][:2] == (5, False) and "damaged on the secondary" in results[1][2]
    assert results[2][:2] == (6, False) and "other data than expected" in results[2][2]
    assert b'"frames": "runs"' in peer.bodies[0]


@pytest.mark.parametrize("damage", ["table crc", "count", "regions", "torn", "vanished"])
def test_bad_or_torn_run_frames_raise(regions: list[bytes], damage: str) -> None:
    frame = bytearray(run_frame(0, regions))
    length = None
    if damage == "table crc":
        frame[wire.FRAME_HEADER_SIZE + wire.RUN_HEAD.size + 3] ^= 1  # a digest of the table
    elif damage == "count":
        frame = bytearray(wire.encode_run_head(0, 4096, [blake3.blake3(r).digest() for r in regions])[:-64]
                          + b"".join(regions))  # the header says 3 regions, the table 1 (its crc then fails too)
    elif damage == "regions":
        frame = bytearray(run_frame(1, regions))  # regions 1-3, not the 0-2 asked for
    body = bytes(frame) + end(3)
    if damage == "torn":  # the declared length is longer than what comes: the peer hung up
        body, length = body[:len(body) - 5000], len(body)
    elif damage == "vanished":  # a frame's worth missing, then the connection closes
        body, length = body[:wire.FRAME_HEADER_SIZE + 100], len(body)
    peer = ScriptedPeer([http("200 OK", body, length=length)])
    got = []
    with client_for(peer) as client, pytest.raises(PeerError, match="127.0.0.1"):
        got.extend(client.read_regions("v", [(0, 3)]))
    assert got == []  # nothing of a run is handed out before the whole run is in and checked


def test_retries_idempotent_calls_on_503() -> None:
    busy = http("503 Service Unavailable", b"{}", "application/problem+json")
    peer = ScriptedPeer([busy, http("200 OK", b'{"status": "ok"}', "application/json")])
    with client_for(peer) as client:
        assert client.health() == {"status": "ok"}
    assert len(peer.requests) == 2


def test_problem_details_become_errors() -> None:
    problem = b'{"type": "x", "title": "Unauthorized", "status": 401, "detail": "the bearer token is wrong"}'
    peer = ScriptedPeer([http("401 Unauthorized", problem, "application/problem+json"),
                         http("500 Internal Server Error", b"oops", "text/plain")])
    with client_for(peer) as client:
        with pytest.raises(PeerAuthError, match="bearer token is wrong"):
            client.volume_info("v")
        with pytest.raises(PeerProtocolError, match="500"):
            client.delete_volume("v")


@pytest.mark.parametrize(("kind", "error"), [("conflict", Conflict), ("not-permitted", NotPermitted),
                                           ("promoted", NotPermitted), ("not-released", NotPermitted)])
def test_a_409_is_a_conflict_or_a_refusal_by_its_problem_type(kind: str, error: type) -> None:
    problem = (f'{{"type": "urn:drtool:problem:{kind}", "title": "t", "status": 409, '
               f'"detail": "said {kind}"}}').encode()
    peer = ScriptedPeer([http("409 Conflict", problem, "application/problem+json")])
    with client_for(peer) as client:
        with pytest.raises(error, match=f"said {kind}"):
            client.promote("v")
    assert peer.requests[0].startswith(b"POST /v1/volumes/v/promote ")


def test_unreachable_peer_names_the_url() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    with ReplicaClient(f"http://127.0.0.1:{port}", retries=1, timeout=(1, 1)) as client:
        with pytest.raises(PeerUnreachable, match=f"127.0.0.1:{port}"):
            client.health()
