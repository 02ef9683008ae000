"""Fetching the requested portion from the replica (drtool/fetch.py), against a real server.

A small TCP relay sits between the primary and the replica server: it records every HTTP
request line that passes (so a test knows exactly which endpoints were used, and how often)
and can flip one payload byte of the next batched-read response (a transient corruption on
the wire: the first answer is bad, the second good).
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from pathlib import Path

import pytest

from drtool import api, wire
from drtool.engine import Engine
from drtool.errors import ExitCode, VerificationFailed
from tests.conftest import corrupt

RS = 65536
REGIONS = 32
SIZE = REGIONS * RS
BAD = [3, 5, 7]

_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|HEAD) (/\S*) HTTP/1\.1\r\n")  # bodies need not end in a newline
_FRAMES = wire.FRAMES_CONTENT_TYPE.encode()


class _Link:
    """One relayed connection: its two sockets and whether its next read response is tampered with."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.armed = False
        self.read_request = bytearray()  # the bytes of the batched read being sent, from its request line


class Relay:
    """A TCP relay in front of the replica server (see the module docstring)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sent = bytearray()  # everything clients sent, in order (requests are small here)
        self.corrupt_next = 0  # batched-read responses still to tamper with
        self.corrupt_only = b""  # ... only those whose request carries these bytes (b"": any)
        self.tampered = 0
        self.links: list[_Link] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, path_part: str) -> list[str]:
        """The request lines ("METHOD PATH") whose path contains ``path_part``."""
        with self.lock:
            lines = [(m.decode(), p.decode()) for m, p in _REQUEST_LINE.findall(bytes(self.sent))]
        return [f"{m} {p}" for m, p in lines if path_part in p]

    def close(self) -> None:
        self.listener.close()
        for link in self.links:
            for sock in (link.client, link.upstream):
                try:
                    sock.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            link = _Link(client, upstream)
            self.links.append(link)
            threading.Thread(target=self._up, args=(link,), daemon=True).start()
            threading.Thread(target=self._down, args=(link,), daemon=True).start()

    def _up(self, link: _Link) -> None:
        try:
            while chunk := link.client.recv(1 << 16):
                with self.lock:
                    before = len(_REQUEST_LINE.findall(bytes(self.sent)))
                    self.sent += chunk
                    lines = _REQUEST_LINE.findall(bytes(self.sent))[before:]
                    if lines:
                        reading = any(p.endswith(b"/read") for m, p in lines if m == b"POST")
                        link.read_request = bytearray(chunk) if reading else bytearray()
                    elif link.read_request:
                        link.read_request += chunk  # the request's body may come in a later chunk
                    # Armed before the request goes on: its answer cannot overtake the flag.  Only
                    # a read whose body names corrupt_only (its runs), when given, is tampered with.
                    if (self.corrupt_next and link.read_request and not link.armed
                            and self.corrupt_only in link.read_request):
                        self.corrupt_next -= 1
                        link.armed = True
                        link.read_request = bytearray()
                link.upstream.sendall(chunk)
        except OSError:
            pass
        finally:
            _shut(link.upstream)

    def _down(self, link: _Link) -> None:
        held = bytearray()
        try:
            while chunk := link.upstream.recv(1 << 16):
                if not link.armed:
                    link.client.sendall(chunk)
                    continue
                held += chunk
                at = self._payload_byte(held)
                if at is None:
                    continue  # the first frame's payload has not arrived yet
                held[at] ^= 0xFF
                link.armed = False
                with self.lock:
                    self.tampered += 1
                link.client.sendall(held)
                held.clear()
        except OSError:
            pass
        finally:
            _shut(link.client)

    @staticmethod
    def _payload_byte(held: bytearray) -> int | None:
        """Where the first byte of the first region's bytes is (in a DATA frame or after a RUN
        frame's run table), once it has been received."""
        kind = held.find(_FRAMES)
        if kind < 0:
            return None
        body = held.find(b"\r\n\r\n", kind)
        if body < 0:
            return None
        at = body + 4 + wire.FRAME_HEADER_SIZE
        if len(held) < at:
            return None
        if wire.decode_frame_header(held[at - wire.FRAME_HEADER_SIZE:at]).kind == wire.FRAME_RUN:
            if len(held) < at + wire.RUN_HEAD.size:
                return None
            count, _ = wire.RUN_HEAD.unpack_from(held, at)
            at += wire.RUN_HEAD.size + 32 * count  # past the run table: the first region's bytes
        return at if len(held) > at else None


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@pytest.fixture
def protected(protect_volume):
    """A protected volume of random data (no zero regions: every frame carries a payload)."""
    return protect_volume(SIZE, seed=31)


@pytest.fixture
def relay(replica_server):
    """A Relay in front of the replica server; the volume's peer is pointed at it."""
    relay = Relay(replica_server.port)
    with Engine.open(None, "vol") as engine:
        engine.record.peer["url"] = relay.url
    yield relay
    relay.close()


def mirror_of(replica_server) -> Path:
    return replica_server.root / "vol" / "mirror.img"


def damage(path: Path, regions: list[int]) -> None:
    for region in regions:
        corrupt(path, region * RS + 11, b"\xde\xad")


def region_bytes(data: bytes, region: int) -> bytes:
    return data[region * RS:(region + 1) * RS]


@pytest.fixture
def degraded(protected, replica_server):
    """Regions BAD are damaged on the primary and found by a scrub; the volume is in recovery."""
    path, data = protected
    damage(path, BAD)
    assert api.scrub_volume("vol")["bad_regions"] == [[3, 1], [5, 1], [7, 1]]
    api.recover("vol")
    return path, data


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "drtool.fetch" and r.levelno == logging.WARNING]


def test_a_region_damaged_on_the_replica_is_fetched_twice_then_refused(degraded, replica_server, relay, cli,
                                                                         caplog):
    _, data = degraded
    corrupt(mirror_of(replica_server), 5 * RS + 100, b"\x00\x11\x22")  # damaged at rest on the secondary
    caplog.set_level(logging.WARNING, logger="drtool.fetch")
    with pytest.raises(VerificationFailed, match=r"regions \[\(5, 1\)\] from the replica fail verification twice"):
        api.read("vol", 5 * RS, RS)
    reads = relay.requests("/read")
    assert reads == ["POST /v1/volumes/vol/read"] * 2  # one fetch, one retry, nothing more
    assert [("attempt 1" in m, "attempt 2" in m) for m in warnings_of(caplog)] == [(True, False), (False, True)]
    assert all("damaged on the secondary" in m for m in warnings_of(caplog))
    status = api.status("vol")[0]
    assert status["recovery"]["fetched_regions"] == 0 and status["overlay"]["regions"] == 0
    assert status["bad_regions"] == [[3, 1], [5, 1], [7, 1]] and status["lost_regions"] == []

    # Through the CLI: exit 8 and one line saying why.
    result = cli("read", "vol", "--offset", str(5 * RS + 10), "--length", "100")
    assert result.code == ExitCode.DATA_UNAVAILABLE == 8
    assert result.err.startswith("drtool: volume vol: regions [(5, 1)] from the replica fail verification twice")
    assert result.err.count("\n") == 1 and result.out == ""

    # The neighbours: healthy local regions, and a bad region whose replica copy is sound.
    assert api.read("vol", 4 * RS, RS) == region_bytes(data, 4)
    assert api.read("vol", 6 * RS, RS) == region_bytes(data, 6)
    assert api.read("vol", 7 * RS, RS) == region_bytes(data, 7)
    assert api.read("vol", 5 * RS - 100, 100) == data[5 * RS - 100:5 * RS]  # up to the damaged region
    assert api.read("vol", 6 * RS, 100) == data[6 * RS:6 * RS + 100]  # right after it


def test_a_damaged_readahead_region_does_not_fail_the_read_of_its_neighbour(degraded, replica_server, relay):
    _, data = degraded
    corrupt(mirror_of(replica_server), 5 * RS + 100, b"\x00\x11\x22")
    # Region 3 is sound on the replica; the read of it also fetches the requested regions after it.
    assert api.read("vol", 3 * RS, RS) == region_bytes(data, 3)


def test_a_transient_mismatch_is_retried_and_served(degraded, relay, caplog):
    _, data = degraded
    relay.corrupt_next = 1  # the first answer for region 5 carries one flipped byte in its payload
    relay.corrupt_only = b'"runs": [[5, 1]'  # the read that starts with region 5, no other
    caplog.set_level(logging.WARNING, logger="drtool.fetch")
    assert api.read("vol", 5 * RS, RS) == region_bytes(data, 5)
    assert relay.tampered == 1
    assert relay.requests("/read") == ["POST /v1/volumes/vol/read"] * 2
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "regions [(5, 1)]" in messages[0] and "attempt 1" in messages[0]
    # Copy-on-read kept the verified bytes, never the tampered ones: a whole read fetches only
    # region 3 (the readahead after region 5 brought region 7 along), the next one nothing.
    assert api.read("vol", 0, SIZE) == data
    assert len(relay.requests("/read")) == 3
    assert api.read("vol", 0, SIZE) == data
    assert len(relay.requests("/read")) == 3
    assert api.status("vol")[0]["overlay"]["regions"] == 3


def test_copy_on_read_off_fetches_again_and_keeps_nothing(protected, replica_server, relay, cli):
    path, data = protected
    result = cli("configure", "vol", "--copy-on-read", "off", "--json")
    assert result.code == 0 and result.json()["settings"]["copy_on_read"] is False
    damage(path, [9])
    api.scrub_volume("vol")
    api.recover("vol")
    overlay = Path(api.status("vol")[0]["state_dir"]) / "overlay.img"
    for round_ in (1, 2, 3):
        assert api.read("vol", 9 * RS + 5, RS - 5) == data[9 * RS + 5:10 * RS]
        status = api.status("vol")[0]
        assert status["recovery"]["fetched_regions"] == round_
        assert status["recovery"]["fetched_bytes"] == round_ * RS
        assert status["overlay"]["regions"] == 0 and status["maps"]["overlay"] == []
        assert status["bad_regions"] == [[9, 1]]
        assert len(relay.requests("/read")) == round_
    assert overlay.read_bytes() == bytes(SIZE)  # not a byte was copied into the overlay
    assert overlay.stat().st_blocks == 0


def test_journal_source_is_the_only_way_to_these_bytes(protected, replica_server, relay, cli):
    """The mirror's copy of the changed region is damaged, so only the journal path (stale local
    bytes + the journal's records after the era) can produce what the primary expects."""
    path, data = protected
    data = bytearray(data)
    backup = path.read_bytes()
    era = api.checkpoint("vol")["era"]
    for offset, chunk in ((4 * RS + 100, b"journal!"), (4 * RS + 9000, b"second change"), (12 * RS, b"Z" * RS)):
        api.write("vol", offset, chunk)
        data[offset:offset + len(chunk)] = chunk
    api.replicate("vol")
    path.write_bytes(backup)  # the device is restored from the older backup
    corrupt(mirror_of(replica_server), 4 * RS + 30000, b"\x00\x01\x02")
    corrupt(mirror_of(replica_server), 12 * RS + 7, b"\x00\x01\x02")
    with replica_server.client() as client:  # prove the mirror cannot serve these regions
        with Engine.open(None, "vol") as engine:
            manifest = engine.volume.manifest
            results = list(client.read_regions("vol", [(4, 1), (12, 1)], expected=lambda r: manifest[r]))
        assert [(r.region, r.ok) for r in results] == [(4, False), (12, False)]
    assert cli("recover", "vol", "--local-era", str(era), "--source", "journal").code == 0
    assert api.read("vol", 0, SIZE) == bytes(data)
    changes = relay.requests("/changes")
    assert len(changes) == 1 and changes[0].startswith("GET /v1/volumes/vol/changes?after=")
    assert "runs=4%2B1%2C12%2B1" in changes[0] or "runs=4+1,12+1" in changes[0]
    assert relay.requests("/read") == []  # the mirror was never asked
    assert api.status("vol")[0]["recovery"]["fetched_regions"] == 2


def test_a_large_fetch_spread_over_several_streams_reads_what_one_stream_reads(protected, replica_server, relay,
                                                                               cli, monkeypatch):
    path, data = protected
    cli("configure", "vol", "--copy-on-read", "off")  # every read fetches again
    bad = list(range(4, 28))
    damage(path, bad)
    api.scrub_volume("vol")
    api.recover("vol")
    from drtool import fetch

    monkeypatch.setattr(fetch, "STREAM_BYTES", RS)  # 24 regions: as many streams as allowed
    reads = []
    for streams in (1, 4, 3):
        monkeypatch.setattr(fetch, "STREAMS", streams)
        before = len(relay.requests("/read"))
        reads.append(api.read("vol", 0, SIZE))
        assert len(relay.requests("/read")) - before == streams
    assert reads[0] == reads[1] == reads[2] == data
    status = api.status("vol")[0]
    assert status["recovery"]["fetched_regions"] == 3 * len(bad)
    assert status["recovery"]["fetched_bytes"] == 3 * len(bad) * RS


def test_a_stream_that_breaks_fails_the_whole_fetch(protected, replica_server, relay, cli, monkeypatch):
    """One of several streams losing its peer mid-response: the read fails (exit 7, the peer),
    nothing half-fetched is served or kept."""
    path, data = protected
    bad = list(range(4, 28))
    damage(path, bad)
    api.scrub_volume("vol")
    api.recover("vol")
    from drtool import fetch
    from drtool.errors import PeerError

    monkeypatch.setattr(fetch, "STREAM_BYTES", RS)
    monkeypatch.setattr(fetch, "STREAMS", 4)
    real = fetch.RemoteFetcher._read_share
    calls = []

    def read_share(self, share, *args):
        calls.append(share[0])
        if share[0] != 4:  # not the first share: its peer vanishes mid-stream
            raise PeerError("replica server vanished mid-stream after 2 of 6 regions")
        return real(self, share, *args)

    monkeypatch.setattr(fetch.RemoteFetcher, "_read_share", read_share)
    with pytest.raises(PeerError, match="vanished mid-stream"):
        api.read("vol", 0, SIZE)
    assert sorted(calls) == [4, 10, 16, 22]
    status = api.status("vol")[0]
    assert status["overlay"]["regions"] == 0 and status["recovery"]["fetched_regions"] == 0
