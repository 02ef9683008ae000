"""HTTP client of the replica server (the secondary), used by the primary.

One ``requests.Session`` per client, so connections are kept alive.  Every
failure becomes a drtool error naming the server's URL: PeerUnreachable
(refused, timed out, vanished mid-stream), PeerAuthError (401/403, TLS
verification), PeerProtocolError (bad frames, unexpected answers).  Only
idempotent calls are retried; sending records is idempotent by sequence number.

Batched reads verify every region before it is handed out: the bytes are
hashed (blake3, in worker threads, while the next bytes arrive) and compared
with the digest the caller expects, or else with the digest the server sent.
"""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, urlsplit

import blake3
import requests
import urllib3

from drtool import wire
from drtool.buffers import aligned_bytes
from drtool.errors import (Conflict, DataUnavailable, DrtoolError, GroupNotFound, NotPermitted, PeerAuthError,
                           PeerError, PeerProtocolError, PeerUnreachable, UsageError, VolumeNotFound)
from drtool.regions import Run

Chunk = bytes | bytearray | memoryview
MAX_REGIONS_PER_READ = 65536  # the server's default limit
_SLICE = 1 << 20  # read the response in slices of this size (one huge read is slow in urllib3)
_BLOCK = (8 << 20) + (64 << 10)  # frames are parsed and hashed a block at a time (two of the server's RUNs)
_SEND_COALESCE = 1 << 20  # small record chunks are joined up to this size before sending
_RETRY_STATUSES = (502, 503, 504)


class RegionResult(NamedTuple):
    """One region of a batched read.  ``data`` is valid until the next iteration."""

    region: int
    data: memoryview | None
    digest: bytes  # blake3 of ``data`` as received (NO_DIGEST when there is no data)
    ok: bool
    reason: str | None


class _Body:
    """A request body made of chunks: known length (so no chunked encoding), re-iterable (retries)."""

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self.chunks = chunks
        self.length = sum(len(memoryview(c).cast("B")) for c in chunks)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Chunk]:
        pending: list[Chunk] = []
        pending_bytes = 0
        for chunk in self.chunks:
            size = len(memoryview(chunk).cast("B"))
            if size >= _SEND_COALESCE:
                if pending:
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
                yield chunk
                continue
            pending.append(chunk)
            pending_bytes += size
            if pending_bytes >= _SEND_COALESCE:
                yield b"".join(pending)
                pending, pending_bytes = [], 0
        if pending:
            yield b"".join(pending)


def check_peer_url(url: str, insecure: bool = False) -> None:
    """Refuse a peer URL that would carry the token and the volume's bytes in cleartext across
    the network: ``http://`` is for loopback only unless the peer was configured ``insecure``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"replica server URL {url!r} must be https://HOST:PORT (or http:// on loopback)")
    if parts.scheme == "http" and not insecure and not is_loopback_host(parts.hostname):
        raise UsageError(f"refusing plain HTTP to the replica server {url}: the bearer token and the volume's "
                         "bytes would cross the network in cleartext; use https:// (drtool serve --tls-cert "
                         "--tls-key on the peer), or configure the peer as insecure (--insecure) to accept that")


def needs_insecure(url: str) -> bool:
    """Would this peer URL carry the token in cleartext across the network (http:// off loopback)?"""
    parts = urlsplit(url)
    return parts.scheme == "http" and not is_loopback_host(parts.hostname or "")


def is_loopback_host(host: str) -> bool:
    """localhost or a loopback address (127.0.0.0/8, ::1): traffic that never leaves the host."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ReplicaClient:
    def __init__(self, url: str, token: str | None = None, token_file: str | None = None,
                 ca: str | None = None, timeout: tuple[float, float] = (5.0, 60.0), retries: int = 3,
                 insecure: bool = False) -> None:
        """``insecure``: the peer was configured to be reached over plain HTTP beyond loopback
        (``--insecure``); without it such a URL is refused here, before anything is sent."""
        check_peer_url(url, insecure)
        self.url = url.rstrip("/")
        self.insecure = insecure
        if token is None and token_file is not None:
            try:
                with open(token_file, encoding="utf-8") as handle:
                    token = handle.read().strip()
            except OSError as exc:
                raise UsageError(f"cannot read token file {token_file}: {exc.strerror}") from None
        self.timeout = timeout
        self.retries = retries
        self.deadline: float | None = None  # time.monotonic() bound of the current operation
        self.session = requests.Session()
        # Passed with every request: a session-wide setting loses to $REQUESTS_CA_BUNDLE.
        self.verify: str | bool = ca if ca else True
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self._hashers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="drtool-verify")

    def close(self) -> None:
        self.session.close()
        self._hashers.shutdown(wait=False)

    def __enter__(self) -> ReplicaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------

    def _path(self, name: str, *rest: str) -> str:
        return "/v1/volumes/" + "/".join(quote(p, safe="") for p in (name, *rest))

    def _request(self, method: str, path: str, *, retry: bool = True, stream: bool = False,
                 **kwargs: Any) -> requests.Response:
        url = self.url + path
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            try:
                response = self.session.request(method, url, timeout=self._timeout_now(), stream=stream,
                                                verify=self.verify, **kwargs)
            except requests.exceptions.SSLError as exc:
                raise PeerAuthError(f"TLS with the replica server {url} failed: {_reason(exc)}") from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                error: PeerError = PeerUnreachable(connect_failure(exc, self.url))
            else:
                if response.status_code not in _RETRY_STATUSES or attempt == attempts - 1:
                    if response.status_code >= 400:
                        raise _http_error(method, url, response)
                    return response
                response.close()
                error = PeerError(f"replica server {url} answered {response.status_code}")
            if attempt < attempts - 1:
                pause = min(0.2 * 2 ** attempt, 2.0)
                if self.deadline is not None and time.monotonic() + pause >= self.deadline:
                    break  # no time left for another try within the caller's bound
                time.sleep(pause)
        raise error

    def _timeout_now(self) -> tuple[float, float] | float:
        """The socket timeouts of the next request: the client's, cut to what is left before
        ``deadline`` (a bound on a whole operation, retries included)."""
        if self.deadline is None:
            return self.timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise PeerUnreachable(f"replica server {self.url} did not answer in time (the operation's "
                                  "time limit passed)")
        connect, read = self.timeout if isinstance(self.timeout, tuple) else (self.timeout, self.timeout)
        return (min(connect, left), min(read, left))

    @contextmanager
    def time_limit(self, seconds: float) -> Iterator[None]:
        """Bound everything this client does inside the block, retries included, by ``seconds``."""
        previous = self.deadline
        self.deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self.deadline = previous

    def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        response = self._request(method, path, **kwargs)
        try:
            data = response.json()
        except ValueError:
            raise PeerProtocolError(f"replica server {response.url} answered {response.status_code} "
                                    "with a body that is not JSON") from None
        if not isinstance(data, dict):
            raise PeerProtocolError(f"replica server {response.url} answered JSON that is not an object")
        return data

    # -- volumes ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/v1/health")

    def ensure_volume(self, name: str, size: int, region_size: int, volume_id: str) -> dict[str, Any]:
        """Create the replica, or accept an identical one; Conflict if it differs."""
        body = {"size": size, "region_size": region_size, "volume_id": volume_id}
        return self._json("PUT", self._path(name), json=body)

    def volume_info(self, name: str) -> dict[str, Any]:
        return self._json("GET", self._path(name))

    def list_volumes(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/volumes")["volumes"]

    def delete_volume(self, name: str) -> None:
        self._json("DELETE", self._path(name), retry=False)

    def drop_overlay(self, name: str) -> None:
        """Forget the overlay replica (after failback)."""
        self._json("DELETE", self._path(name, "overlay"))

    # -- role changes (docs/api.md "Role changes") --------------------------------------

    def release(self, name: str, era: int, seq: int) -> dict[str, Any]:
        """Hand the role over at ``seq`` (replication drained); the replica's description.

        Conflict when the replica did not apply exactly the records up to ``seq``.
        """
        return self._json("POST", self._path(name, "release"), json={"era": era, "seq": seq})

    def cancel_release(self, name: str) -> dict[str, Any]:
        """Take the role back after a release (a failover abandoned before promote)."""
        return self._json("DELETE", self._path(name, "release"))

    def promote(self, name: str, force: bool = False) -> dict[str, Any]:
        """Turn the replica into a primary volume (merge the overlay replica, fence); idempotent.

        Returns {"image", "size", "region_size", "volume_id", "applied_seq", "max_era",
        "released", "forced", "last_record_at", "overlay_regions_merged", "at"}.
        NotPermitted unless the primary released it or ``force`` (a takeover).
        """
        return self._json("POST", self._path(name, "promote"), json={"force": bool(force)})

    def manifest(self, name: str, region_count: int) -> Iterator[tuple[int, bytes]]:
        """The replica's digests as (region, blake3) for every region that is not all zeros, in
        order (drtool.wire manifest entries), streamed: memory follows a chunk, not the volume."""
        response = self._request("GET", self._path(name, "manifest"), stream=True)
        yield from self._manifest_entries(response, region_count, "manifest")

    def preserved(self, name: str, snapshot: str, region_count: int) -> Iterator[tuple[int, bytes]]:
        """The regions ``snapshot`` preserved (the mirror changed them after it was taken), each
        with the digest the snapshot keeps, in order: what reading them from the snapshot can
        take back in time.  As many as the snapshot preserved, whatever the volume's size."""
        response = self._request("POST", self._path(name, "preserved"), stream=True, json={"snapshot": snapshot})
        yield from self._manifest_entries(response, region_count, "list of preserved regions")

    def _manifest_entries(self, response: requests.Response, region_count: int,
                          what: str) -> Iterator[tuple[int, bytes]]:
        """Decode a response of manifest entries (drtool.wire) as they arrive; a response read to
        its end leaves the connection reusable, anything else closes it."""
        complete = False
        try:
            _expect_type(response, wire.MANIFEST_CONTENT_TYPE)
            try:
                yield from wire.iter_manifest_entries(response.raw.read, region_count)
            except wire.WireError as exc:
                raise PeerProtocolError(f"replica server {response.url} sent a bad {what}: {exc}") from None
            except OSError as exc:
                raise PeerUnreachable(f"replica server {self.url} vanished while sending the {what}: {exc}") from None
            complete = True
        finally:
            if complete:
                response.raw.release_conn()
            else:
                response.close()

    def adopt(self, name: str, image: str, manifest: str, size: int, region_size: int, volume_id: str,
              applied_seq: int, era: int, divergent: Iterable[Run] = (),
              lost: dict[str, Any] | None = None) -> dict[str, Any]:
        """Make the server hold ``name`` in place on ``image`` (a file or device on the server's host).

        ``manifest``: a file of manifest entries (drtool.wire), also on the server's host.
        Returns the replica's description.  Conflict if the server holds another
        volume under ``name``; NotPermitted if it was promoted there with another image.
        """
        body = {"image": image, "manifest": manifest, "size": size, "region_size": region_size,
                "volume_id": volume_id, "applied_seq": applied_seq, "era": era,
                "divergent": [[int(a), int(n)] for a, n in divergent], "lost": lost}
        return self._json("POST", self._path(name, "adopt"), json=body)

    def rebase(self, name: str, seq: int) -> dict[str, Any]:
        """A new primary's sequence numbers start after ``seq``; the replica's description."""
        return self._json("POST", self._path(name, "rebase"), json={"seq": seq})

    # -- the replica's own scrub (docs/api.md "Verify and scrub") -------------------------

    def verify_regions(self, name: str, runs: Iterable[Run], start: int = 0, overlay: bool = False,
               max_bytes: int | None = None) -> dict[str, Any]:
        """Have the server re-read and re-hash a batch of ``runs`` from region ``start`` on.

        Returns {"entries": [{"region", "source", "stored", "computed", "error"?}], "next",
        "bytes_read", "regions_read", "bad", "applied_seq"}; regions of the runs before ``next``
        without an entry are all zeros on the replica (table and image).  Idempotent (retried)."""
        body: dict[str, Any] = {"runs": [[int(a), int(n)] for a, n in runs], "from": int(start),
                                "overlay": bool(overlay)}
        if max_bytes is not None:
            body["max_bytes"] = int(max_bytes)
        answer = self._json("POST", self._path(name, "verify"), json=body)
        if not isinstance(answer.get("entries"), list) or "next" not in answer:
            raise PeerProtocolError(f"replica server {self.url} answered a verify without entries or next")
        return answer

    def scrub(self, name: str, rate: int | None = None, restart: bool = False) -> dict[str, Any]:
        """Start (or resume) the server's background scrub of the whole replica; its description."""
        return self._json("POST", self._path(name, "scrub"), json={"rate": rate, "restart": bool(restart)})

    def scrub_status(self, name: str) -> dict[str, Any]:
        """What the server's scrubs found (bad regions per target) and the last whole scrub."""
        return self._json("GET", self._path(name, "scrub"))

    # -- records ------------------------------------------------------------------------

    def send_records(self, name: str, chunks: Sequence[Chunk], complete_through: int | None = None,
                     overlay: bool = False) -> dict[str, Any]:
        """Ship concatenated records; returns {"applied_seq", "applied", "skipped"}."""
        headers = {"Content-Type": wire.RECORDS_CONTENT_TYPE}
        if complete_through is not None:
            headers["X-Drtool-Complete-Through"] = str(int(complete_through))
        path = self._path(name, "overlay", "records") if overlay else self._path(name, "records")
        return self._json("POST", path, data=_Body(chunks), headers=headers)

    def changes(self, name: str, after_seq: int, runs: Iterable[Run]) -> Iterator[tuple[wire.RecordHeader, bytes]]:
        """The journal's records after ``after_seq`` touching ``runs``, in seq order, each verified.

        DataUnavailable when the journal no longer reaches back that far.
        """
        text = ",".join(f"{a}+{n}" for a, n in runs)
        response = self._request("GET", self._path(name, "changes"), params={"after": after_seq, "runs": text})
        _expect_type(response, wire.RECORDS_CONTENT_TYPE)
        try:
            records = [(header, bytes(data)) for header, data in wire.iter_records(response.content)]
        except wire.WireError as exc:
            raise PeerProtocolError(f"replica server {response.url} sent a bad record: {exc}") from None
        yield from records

    # -- consistency groups (docs/api.md "Consistency groups") ---------------------------

    def _group_path(self, group: str, *rest: str) -> str:
        return "/v1/groups/" + "/".join(quote(p, safe="") for p in (group, *rest))

    def ensure_group(self, group: str, group_id: str, members: list[str]) -> dict[str, Any]:
        """Create the server's group of these (existing) replicas, or set its members; Conflict
        when the name is another group's or a member is in another group."""
        return self._json("PUT", self._group_path(group), json={"group_id": group_id, "members": list(members)})

    def group_info(self, group: str) -> dict[str, Any]:
        """{name, group_id, members, committed_txn, members_applied: {volume: seq}}; GroupNotFound."""
        return self._json("GET", self._group_path(group))

    def delete_group(self, group: str) -> None:
        """Forget the group on the server (its members stay, and take per-volume records again)."""
        self._json("DELETE", self._group_path(group), retry=False)

    def send_group_txn(self, group: str, txn: int, parts: list[tuple[str, bool, int, list[bytes]]]) -> dict[str, Any]:
        """Ship one group transaction, applied all or nothing (drtool.wire: ``parts`` are (volume,
        overlay, complete_through or 0, record chunks)); returns {"txn", "committed_txn",
        "members_applied": {volume: applied_seq}, "parts": [...]}.  A resend is harmless (the
        server skips records it applied), so a lost answer is retried."""
        chunks = wire.encode_group_txn(txn, parts)
        return self._json("POST", self._group_path(group, "records"), data=_Body(chunks),
                          headers={"Content-Type": wire.GROUP_CONTENT_TYPE})

    def group_snapshot(self, group: str, name: str) -> dict[str, Any]:
        """Snapshot every member at one point between two group transactions."""
        return self._json("POST", self._group_path(group, "snapshots"), json={"name": name}, retry=False)

    def list_groups(self) -> list[dict[str, Any]]:
        """Every group the server keeps (``GET /v1/groups``), each as :meth:`group_info` says it."""
        return list(self._json("GET", "/v1/groups").get("groups") or [])

    # -- snapshots ----------------------------------------------------------------------

    def create_snapshot(self, name: str, snap: str) -> dict[str, Any]:
        return self._json("POST", self._path(name, "snapshots"), json={"name": snap}, retry=False)

    def list_snapshots(self, name: str) -> list[dict[str, Any]]:
        return self._json("GET", self._path(name, "snapshots"))["snapshots"]

    def delete_snapshot(self, name: str, snap: str) -> None:
        self._json("DELETE", self._path(name, "snapshots", snap), retry=False)

    # -- reads --------------------------------------------------------------------------

    def read_range(self, name: str, offset: int, length: int, snapshot: str | None = None,
                   overlay: bool = False) -> bytes:
        """Bytes ``[offset, offset+length)`` as the server holds them (not verified: use read_regions)."""
        if offset < 0 or length <= 0:
            raise UsageError(f"bad range {offset}+{length}")
        params: dict[str, str] = {}
        if snapshot is not None:
            params["snapshot"] = snapshot
        if overlay:
            params["overlay"] = "1"
        response = self._request("GET", self._path(name, "data"), params=params,
                                 headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        if response.status_code != 206 or len(response.content) != length:
            raise PeerProtocolError(f"replica server {response.url} answered {response.status_code} with "
                                    f"{len(response.content)} bytes for a range of {length}")
        return response.content

    def read_regions(self, name: str, runs: Iterable[Run], expected: Callable[[int], bytes | None] | None = None,
                     snapshot: str | None = None, overlay: bool = False) -> Iterator[RegionResult]:
        """Each region of ``runs`` in order, verified; see RegionResult.

        ``expected(region)`` gives the digest the caller trusts (None: trust the
        server's).  Raises PeerError when the stream breaks; never yields
        unverified data as ok.
        """
        for batch in _split_runs(list(runs), MAX_REGIONS_PER_READ):
            body = {"runs": [list(r) for r in batch], "snapshot": snapshot, "overlay": overlay, "frames": "runs"}
            response = self._request("POST", self._path(name, "read"), stream=True, json=body)
            complete = False
            try:
                _expect_type(response, wire.FRAMES_CONTENT_TYPE)
                yield from _FrameReader(self, response, batch, expected).results()
                complete = True
            finally:
                # A fully read response leaves the connection reusable; anything else closes it.
                if complete:
                    response.raw.release_conn()
                else:
                    response.close()


def _split_runs(runs: list[Run], limit: int) -> Iterator[list[Run]]:
    batch: list[Run] = []
    total = 0
    for first, count in runs:
        while count:
            step = min(count, limit - total)
            batch.append((first, step))
            first, count, total = first + step, count - step, total + step
            if total == limit:
                yield batch
                batch, total = [], 0
    if batch:
        yield batch


# (header, payload, expected digest) for DATA, ZERO and ERROR frames;
# (header, (region_length, digests, data), [expected digest per region]) for a RUN frame.
Frame = tuple[wire.FrameHeader, Any, Any]


class _FrameReader:
    """Parses one frames response a block at a time; each block is hashed in a worker
    thread while the next one is received, and its regions are yielded once verified."""

    def __init__(self, client: ReplicaClient, response: requests.Response, runs: list[Run],
                 expected: Callable[[int], bytes | None] | None) -> None:
        self.client = client
        self.response = response
        self.url = response.url
        self.expected = expected
        self.regions = (r for first, count in runs for r in range(first, first + count))
        self.total = sum(count for _, count in runs)
        self.seen = 0
        self.pending: wire.FrameHeader | None = None  # parsed header whose payload is incomplete
        self.free: list[bytearray] = []
        self.zeros = memoryview(b"")
        # urllib3's readinto reads into a temporary bytes and copies; http.client's
        # response under it (bounded by Content-Length, no content coding here) reads
        # straight into our buffer, which doubles the throughput measured here.
        raw = response.raw
        fp = getattr(raw, "_fp", None)
        plain = not response.headers.get("Content-Encoding") and hasattr(fp, "readinto")
        self._readinto: Callable[[memoryview], int] = fp.readinto if plain else raw.readinto

    def results(self) -> Iterator[RegionResult]:
        inflight: deque[tuple[bytearray, Future[list[RegionResult]]]] = deque()
        # A small response (a reader's few regions) gets a block its size: a fresh 8 MiB block
        # is a memset and 2048 page faults, more than the regions cost to receive.
        declared = self.response.headers.get("Content-Length", "")
        first = min(_BLOCK, int(declared) + _SLICE) if declared.isdigit() else _BLOCK
        block, filled, ended = aligned_bytes(first), 0, False
        while not ended:
            block, filled, ended, frames, leftover, need = self._fill(block, filled)
            inflight.append((block, self.client._hashers.submit(self._verify, frames)))
            if not ended:
                nxt = self._take_block(max(_BLOCK, len(leftover) + need + _SLICE))
                nxt[:len(leftover)] = leftover
                block, filled = nxt, len(leftover)
            # Keep up to two blocks hashing (one per worker) while the next is received.
            while len(inflight) > (0 if ended else 2):
                done_block, future = inflight.popleft()
                yield from future.result()
                self.free.append(done_block)

    def _take_block(self, size: int) -> bytearray:
        while self.free:
            block = self.free.pop()
            if len(block) >= size:
                return block
        return aligned_bytes(size)

    def _read(self, view: memoryview) -> int:
        try:
            return self._readinto(view)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise PeerUnreachable(f"replica server {self.url} vanished mid-stream after {self.seen} of "
                                  f"{self.total} regions: {_reason(exc)}") from None

    def _fill(self, block: bytearray, filled: int) -> tuple[bytearray, int, bool, list[Frame], bytes, int]:
        """Receive into ``block`` until it holds a block's worth of complete frames.

        Returns (block, filled, ended, frames, partial tail, bytes the pending frame needs).
        """
        view = memoryview(block)
        frames: list[Frame] = []
        parsed = 0
        while True:
            while True:
                if self.pending is None:
                    if filled - parsed < wire.FRAME_HEADER_SIZE:
                        break
                    self.pending = self._header(view[parsed:parsed + wire.FRAME_HEADER_SIZE])
                    if self.pending.kind == wire.FRAME_END:
                        self._check_end(filled - parsed)
                        return block, filled, True, frames, b"", 0
                end = parsed + wire.FRAME_HEADER_SIZE + self.pending.payload_length
                if end > filled:
                    break
                payload = view[end - self.pending.payload_length:end]
                if self.pending.kind == wire.FRAME_RUN:
                    frames.append(self._run(self.pending, payload))
                else:
                    frames.append((self.pending, payload, self._expect(self.pending.region)))
                self.pending, parsed = None, end
            need = wire.FRAME_HEADER_SIZE + (self.pending.payload_length if self.pending else 0)
            room = len(block) - filled
            # Hand the block over once the frame in progress does not fit in it (or, between
            # frames, once it is nearly full); a frame that fits is read to its end first, so
            # what moves to the next block is a partial frame's head, not megabytes.
            if frames and (parsed + need > len(block) or (self.pending is None and room < _SLICE)):
                return block, filled, False, frames, bytes(view[parsed:filled]), need
            if parsed + need > len(block):  # a frame larger than the block: grow it
                bigger = aligned_bytes(need + _SLICE)
                bigger[:filled - parsed] = view[parsed:filled]
                block, view, filled, parsed = bigger, memoryview(bigger), filled - parsed, 0
                room = len(block) - filled
            want = min(room, 4 * _SLICE)
            if self.pending is not None and self.pending.payload_length >= _SLICE:
                # A large frame (a RUN): read to its end and the next header, not into the frame
                # after it, so a frame that does not fit the block moves to the next one as a
                # header, not as megabytes copied.
                want = min(want, parsed + need + wire.FRAME_HEADER_SIZE - filled)
            got = self._read(view[filled:filled + want])
            if not got:
                raise PeerProtocolError(f"replica server {self.url} ended the stream after {self.seen} of "
                                        f"{self.total} regions (peer vanished?)")
            filled += got

    def _check_end(self, left: int) -> None:
        assert self.pending is not None
        if self.pending.region != self.total or self.seen != self.total or left != wire.FRAME_HEADER_SIZE:
            raise PeerProtocolError(f"replica server {self.url} ended the stream badly (END after "
                                    f"{self.pending.region} frames, expected {self.total})")

    def _header(self, raw: memoryview) -> wire.FrameHeader:
        try:
            header = wire.decode_frame_header(raw)
        except wire.WireError as exc:
            raise PeerProtocolError(f"replica server {self.url} sent a bad frame: {exc}") from None
        if header.kind != wire.FRAME_END:
            want = next(self.regions, None)
            if header.region != want:
                raise PeerProtocolError(f"replica server {self.url} sent region {header.region}, "
                                        f"expected {want}")
            self.seen += 1
        return header

    def _run(self, header: wire.FrameHeader, payload: memoryview) -> Frame:
        """A complete RUN frame: its table checked, its regions checked against the request
        (the first was, with its header)."""
        try:
            region_length, digests, data = wire.decode_run(header, payload)
        except wire.WireError as exc:
            raise PeerProtocolError(f"replica server {self.url} sent a bad frame: {exc}") from None
        count = len(digests) // 32
        for region in range(header.region + 1, header.region + count):
            want = next(self.regions, None)
            if region != want:
                raise PeerProtocolError(f"replica server {self.url} sent region {region}, expected {want}")
        self.seen += count - 1
        expected = [self._expect(r) for r in range(header.region, header.region + count)]
        return header, (region_length, digests, data), expected

    def _expect(self, region: int) -> bytes | None:
        return self.expected(region) if self.expected is not None else None

    def _zeros(self, length: int) -> memoryview:
        if len(self.zeros) < length:
            self.zeros = memoryview(bytes(length))
        return self.zeros[:length]

    def _verify(self, frames: list[Frame]) -> list[RegionResult]:
        results: list[RegionResult] = []
        for header, payload, expected in frames:
            region = header.region
            if header.kind == wire.FRAME_RUN:
                self._verify_run(region, payload, expected, results)
                continue
            if header.kind == wire.FRAME_ERROR:
                message = bytes(payload).rstrip(b"\0").decode("utf-8", "replace")
                results.append(RegionResult(region, None, wire.NO_DIGEST, False,
                                            message or "the region changed while it was read; read it again"))
                continue
            if header.kind == wire.FRAME_ZERO:
                data, actual = self._zeros(header.length), wire.zero_digest(header.length)
            else:
                data, actual = payload, blake3.blake3(payload).digest()
            reason = None
            if actual != header.digest:
                reason = _DAMAGED
            elif expected is not None and actual != expected:
                reason = _OTHER
            results.append(RegionResult(region, data if reason is None else None, actual, reason is None, reason))
        return results


    @staticmethod
    def _verify_run(first: int, run: tuple[int, memoryview, memoryview], expected: list[bytes | None],
                    results: list[RegionResult]) -> None:
        length, digests, data = run
        hasher = blake3.blake3
        for index, want in enumerate(expected):
            part = data[index * length:(index + 1) * length]
            actual = hasher(part).digest()
            reason = None
            if actual != digests[32 * index:32 * index + 32]:
                reason = _DAMAGED
            elif want is not None and actual != want:
                reason = _OTHER
            results.append(RegionResult(first + index, part if reason is None else None, actual, reason is None,
                                        reason))


_DAMAGED = ("the replica's bytes do not match the digest it holds for them (damaged on the secondary, "
            "unreadable there, or rewritten while they were sent)")
_OTHER = "the replica holds other data than expected (stale or newer than the manifest)"


def _expect_type(response: requests.Response, content_type: str) -> None:
    got = response.headers.get("Content-Type", "")
    if response.status_code != 200 or got.split(";")[0].strip() != content_type:
        response.close()
        raise PeerProtocolError(f"replica server {response.url} answered {response.status_code} "
                                f"{got or 'without a content type'}, expected {content_type}")


def connect_failure(exc: BaseException, url: str) -> str:
    """One plain sentence for a connection that failed: "connection refused to http://h:p",
    not the library's repr of its exception chain."""
    import errno
    import socket

    seen: set[int] = set()
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        chain.append(item)
        todo.extend([item.__cause__, item.__context__, getattr(item, "reason", None)])
        todo.extend(arg for arg in getattr(item, "args", ()) if isinstance(arg, BaseException))
    for item in chain:
        if isinstance(item, ConnectionRefusedError) or getattr(item, "errno", None) == errno.ECONNREFUSED:
            return f"connection refused to {url}"
    for item in chain:
        if isinstance(item, socket.gaierror):
            return f"cannot resolve the host of {url}: {item.strerror or item}"
    if isinstance(exc, requests.Timeout) or any(isinstance(i, (TimeoutError, socket.timeout)) for i in chain):
        return f"no answer from {url} in time (timed out)"
    for item in chain:
        if isinstance(item, OSError) and item.strerror:
            return f"cannot connect to {url}: {item.strerror.lower()}"
    if "Connection refused" in str(exc):
        return f"connection refused to {url}"
    return f"cannot connect to {url}: {_reason(exc)}"


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for noise in ("HTTPConnectionPool", "HTTPSConnectionPool"):
        if noise in text and "(Caused by" in text:
            text = text[text.index("(Caused by") + 11:].rstrip(")")
    return text or type(exc).__name__


def _http_error(method: str, url: str, response: requests.Response) -> DrtoolError:
    status = response.status_code
    try:
        problem = response.json()
        detail = problem.get("detail") or problem.get("title") or ""
        title = problem.get("title", "")
        kind = str(problem.get("type", ""))
    except (ValueError, AttributeError):
        detail, title, kind = response.text[:200], "", ""
    # The problem's detail often begins with its title: say it once.
    said = detail if title and detail.startswith(title) else ": ".join(p for p in (title, detail) if p)
    message = f"replica server {url}: {method} answered {status}" + (f" {said}" if said else "")
    if status in (401, 403):
        return PeerAuthError(message)
    if status == 404 and title == "No such replica":
        return VolumeNotFound(url.rsplit("/v1/volumes/", 1)[-1].split("/")[0], url)
    if status == 404 and title == "No such group":
        return GroupNotFound(unquote(url.rsplit("/v1/groups/", 1)[-1].split("/")[0]), url)
    if status == 409:
        # "conflict": the request contradicts what the server holds; any other 409
        # (not-permitted, promoted, released, not-released) is forbidden in the replica's role.
        return Conflict(message) if kind == "urn:drtool:problem:conflict" else NotPermitted(message)
    if status == 410:
        return DataUnavailable(message)
    if status in (400, 404, 405, 411, 413, 416):
        return UsageError(message)
    return PeerProtocolError(message)

