"""Fetching the requested portion of a read from the replica, verified end to end.

The source is the volume's recovery source: the mirror (verified against the
primary's manifest), a snapshot (verified against the digests the replica kept
for it; the merged volume then *is* that point in time for these regions), or
the journal (its records after the local era applied over the stale local bytes,
verified against the manifest; the mirror is the fallback).

Before anything is requested, regions whose replication lags are
force-replicated, and regions nobody holds (never replicated, no log record)
are refused as lost.  A region that fails verification is fetched once more,
then refused with EIO.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import blake3

from drtool import metrics
from drtool.errors import DataUnavailable, PeerError, RegionsLost, UsageError, VerificationFailed
from drtool.peer import make_client
from drtool.ports import FetchPort
from drtool.regions import to_runs
from drtool.wire import KIND_WRITE

log = logging.getLogger("drtool.fetch")

SETTLE_BATCH = 256  # regions asked of the replica in one read when settling possibly lost regions
STREAMS = 4  # connections one large fetch is spread over, at most ...
STREAM_BYTES = 4 << 20  # ... one per this many bytes of regions


class RemoteFetcher:
    """Made by the engine, which it sees through :class:`drtool.ports.FetchPort`."""

    def __init__(self, engine: FetchPort) -> None:
        self.engine = engine
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None  # the extra streams of a large fetch

    def client(self) -> Any:
        """This thread's client (sessions are not shared between threads), made anew when the
        volume's ``fetch_timeout`` changed."""
        timeout = float(self.engine.settings["fetch_timeout"])
        client = getattr(self._local, "client", None)
        if client is None or getattr(self._local, "timeout", None) != timeout:
            if client is not None:
                client.close()
            client = make_client(self.engine.record.peer, timeout=timeout)
            self._local.client, self._local.timeout = client, timeout
        return client

    def fetch_into(self, regions: list[int], base: int, view: memoryview, prepared: bool = False,
                   extra: list[int] | None = None) -> None:
        """Fill the slices of ``view`` (region-aligned from region ``base``) for ``regions``;
        ``extra`` regions (readahead) come in the same request and only go to the overlay."""
        wanted = set(regions)
        optional = {r for r in extra or [] if r not in wanted}
        # A readahead region that cannot be verified is dropped: it must not fail this read.
        got = self.fetch(regions + sorted(optional), prepared=prepared, optional=optional)
        shift = self.engine.geometry.shift
        for region in regions:
            data = got[region][0]
            lo = (region - base) << shift
            view[lo:lo + len(data)] = data
        self.account(got)

    def source(self) -> str:
        recovery = self.engine.record.recovery
        return recovery.source if recovery is not None else "mirror"

    def check_snapshot(self, snapshot: str) -> None:
        """Refuse a snapshot the replica server does not have (UsageError, naming those it has)."""
        engine = self.engine
        if engine.record.peer is None:
            return  # not protected: recovering is refused for that reason
        try:
            names = [info["name"] for info in self.client().list_snapshots(engine.name)]
        except PeerError as exc:
            raise PeerError(f"volume {engine.name}: cannot check snapshot {snapshot} on the replica "
                            f"server: {exc}") from None
        if snapshot not in names:
            raise UsageError(f"volume {engine.name}: the replica server has no snapshot {snapshot} "
                             f"(it has: {', '.join(names) if names else 'none'})")

    def rolled_back(self, snapshot: str, served: Callable[[int], bool]) -> list[int]:
        """Of the regions to be served from ``snapshot`` (``served(region)``), those whose bytes
        there differ from the volume's now: the snapshot preserved them (the mirror changed them
        after it was taken) and its digest is not the manifest's.  The others read as the
        mirror, which forced replication brings to the manifest first.  The work follows what
        the snapshot preserved, not the volume's size (a faulted device requests every region)."""
        engine = self.engine
        manifest = engine.volume.manifest
        try:
            return [region for region, digest in self.client().preserved(engine.name, snapshot, engine.geometry.count)
                    if served(region) and not manifest.matches(region, digest)]
        except PeerError as exc:
            raise PeerError(f"volume {engine.name}: cannot ask the replica server which regions snapshot "
                            f"{snapshot} takes back in time: {exc}") from None

    def lagging(self, regions: list[int]) -> list[int]:
        """Refuse lost regions (nobody holds them); return those the replica lacks the latest bytes of."""
        volume = self.engine.volume
        unsure = [r for r in regions if volume.norecord.test(r)]
        if unsure:
            lost = self.settle(unsure)
            if lost:
                raise RegionsLost(self.engine.name, to_runs(lost))
        return [r for r in regions if volume.unreplicated.test(r)]

    def settle(self, regions: Iterable[int]) -> list[int]:
        """Of regions no log record holds (``norecord``: bitmap mode, a damaged log) whose local
        copy cannot be shipped, those really lost: a region is lost only when no copy matching
        the manifest exists anywhere.  The mirror is asked for each one, verified against the
        manifest; a region it holds is not lost and needs no shipping (the engine clears its
        marks, drtool.ports.FetchPort.replica_holds).  Returns the regions still lost.

        DataUnavailable when the replica cannot be asked."""
        engine = self.engine
        manifest = engine.volume.manifest
        lost: list[int] = []
        batch: list[int] = []

        def ask() -> None:
            held: dict[int, bytes] = {}
            try:
                for result in self.client().read_regions(engine.name, to_runs(batch),
                                                         expected=lambda region: manifest[region]):
                    if result.ok:
                        held[result.region] = result.digest
            except PeerError as exc:
                raise DataUnavailable(f"volume {engine.name}: cannot ask the replica whether it holds "
                                      f"regions {to_runs(batch)} (no log record holds them): {exc}") from None
            for region in batch:
                digest = held.get(region)
                if digest is None or not engine.replica_holds(region, digest):
                    lost.append(region)
            if held:
                log.info("volume %s: the replica holds regions %s as the manifest says: not lost",
                         engine.name, to_runs(sorted(r for r in held if r not in lost)))
            batch.clear()

        for region in regions:
            batch.append(region)
            if len(batch) >= SETTLE_BATCH:
                ask()
        if batch:
            ask()
        return lost

    def prepare(self, regions: list[int]) -> None:
        """Refuse lost regions; force-replicate lagging ones so the replica has their latest bytes."""
        engine = self.engine
        lagging = self.lagging(regions)
        if lagging:
            if engine.replicator is None:
                raise DataUnavailable(f"volume {engine.name}: regions {to_runs(lagging)} are not "
                                      "replicated yet and no replicator is running")
            try:
                engine.replicator.force(lagging)
            except PeerError as exc:
                # The replica could not be used (unreachable, refused): the regions are not lost,
                # the command may be run again once the server answers (exit 7, not 8).
                raise type(exc)(f"volume {engine.name}: cannot force-replicate regions "
                                f"{to_runs(lagging)} before fetching them: {exc}") from None

    @metrics.timed_fetch
    def fetch(self, regions: list[int], prepared: bool = False,
              optional: set[int] | None = None) -> dict[int, tuple[bytes, bytes]]:
        """Verified ``{region: (bytes, digest)}`` for every region, or an exception; ``optional``
        regions (readahead) that fail verification are left out instead."""
        engine = self.engine
        if not prepared:
            self.prepare(regions)
        source = self.source()
        try:
            # fetch_timeout bounds the whole fetch, retries and the second verification pass
            # included: a frozen replica answers a client's read with EIO after it, not 4x it.
            with self.client().time_limit(float(engine.settings["fetch_timeout"])):
                if source.startswith("snapshot:"):
                    return self._from_replica(regions, snapshot=source.split(":", 1)[1], optional=optional)
                if source == "journal":
                    return self._from_journal(regions, engine.record.recovery.local_era, optional=optional)
                return self._from_replica(regions, optional=optional)
        except PeerError as exc:
            # Unreachable, refused or a bad answer: the regions are not lost, only not reachable
            # now (exit 7, PEER; the errno stays EIO for a read).  Lost or unverifiable regions
            # are DataUnavailable (RegionsLost, VerificationFailed, a 410 from the server).
            raise type(exc)(f"volume {engine.name}: cannot fetch regions {to_runs(regions)} "
                            f"from the replica: {exc}") from None

    def _streams(self, count: int) -> int:
        """How many connections a fetch of ``count`` regions is spread over: one per
        STREAM_BYTES, at most STREAMS (each stream is received and hashed by its own thread, and
        served by its own server thread: the work of a large read is spread over the cores of
        both hosts, and over more than one TCP window on a long link)."""
        size = count << self.engine.geometry.shift
        return max(1, min(STREAMS, size // STREAM_BYTES))

    def _read_share(self, share: list[int], expected: Callable[[int], bytes] | None, snapshot: str | None,
                    deadline: float | None) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, str]]:
        """One stream's part of a fetch, on this thread's own client: (verified regions, the
        reasons of those that failed)."""
        client = self.client()
        got: dict[int, tuple[bytes, bytes]] = {}
        failed: dict[int, str] = {}
        left = None if deadline is None else deadline - time.monotonic()
        with client.time_limit(left) if left is not None else nullcontext():
            for result in client.read_regions(self.engine.name, to_runs(share), expected=expected,
                                              snapshot=snapshot):
                if result.ok:
                    got[result.region] = (bytes(result.data), result.digest)
                else:
                    failed[result.region] = result.reason or "verification failed"
        return got, failed

    def _read(self, wanted: list[int], expected: Callable[[int], bytes] | None,
              snapshot: str | None) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, str]]:
        """Every region of ``wanted`` asked for once, over one stream or several (each share a
        contiguous slice of the request); the first error of any stream is raised."""
        streams = self._streams(len(wanted))
        deadline = self.client().deadline
        if streams == 1:
            return self._read_share(wanted, expected, snapshot, None)
        size = -(-len(wanted) // streams)
        shares = [wanted[i:i + size] for i in range(0, len(wanted), size)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=STREAMS - 1, thread_name_prefix="drtool-fetch")
        others = [self._pool.submit(self._read_share, share, expected, snapshot, deadline) for share in shares[1:]]
        try:
            got, failed = self._read_share(shares[0], expected, snapshot, None)
        finally:
            done = [future.result() if not future.exception() else future for future in others]
        for item in done:
            if isinstance(item, Future):
                raise item.exception()  # type: ignore[misc]
            got.update(item[0])
            failed.update(item[1])
        return got, failed

    def _from_replica(self, regions: list[int], snapshot: str | None = None,
                      optional: set[int] | None = None) -> dict[int, tuple[bytes, bytes]]:
        engine = self.engine
        manifest = engine.volume.manifest
        expected = None if snapshot else (lambda region: manifest[region])
        got: dict[int, tuple[bytes, bytes]] = {}
        wanted = list(regions)
        for attempt in (1, 2):
            fetched, reasons = self._read(wanted, expected, snapshot)
            got.update(fetched)
            failed = list(reasons)
            metrics.of(engine).fetch.failed_verification(len(reasons))
            missing = [r for r in wanted if r not in got and r not in failed]
            failed.extend(missing)
            if optional:
                failed = [r for r in failed if r not in optional]
            if not failed:
                return got
            log.warning("volume %s: regions %s from the replica failed verification (attempt %d): %s",
                        engine.name, to_runs(failed), attempt, reasons.get(failed[0], "missing from reply"))
            wanted = failed
        raise VerificationFailed(f"volume {engine.name}: regions {to_runs(wanted)} from the replica fail "
                                 "verification twice; refusing to serve them")

    def _from_journal(self, regions: list[int], local_era: int,
                      optional: set[int] | None = None) -> dict[int, tuple[bytes, bytes]]:
        """Stale local bytes + the journal's later records, verified; the mirror for the rest."""
        engine = self.engine
        start = engine.record.era_start(local_era)
        after = (start.seq - 1) if start else 0
        contents: dict[int, bytearray] = {}
        for region in regions:
            if engine.volume.bad.test(region):
                continue
            local = engine.local_bytes(region)
            if local is None:  # no device: no stale local bytes to patch; the mirror has the regions
                contents = {}
                break
            contents[region] = bytearray(local)
        got: dict[int, tuple[bytes, bytes]] = {}
        if contents:
            try:
                for header, data in self.client().changes(engine.name, after, to_runs(list(contents))):
                    region = engine.geometry.region_of(header.offset)
                    inner = header.offset - engine.geometry.region_start(region)
                    patch = data if header.kind == KIND_WRITE else bytes(header.length)
                    contents[region][inner:inner + header.length] = patch
            except PeerError as exc:
                log.warning("volume %s: journal unavailable (%s); using the mirror", engine.name, exc)
                contents = {}
            for region, content in contents.items():
                digest = blake3.blake3(content).digest()
                if engine.volume.manifest.matches(region, digest):
                    got[region] = (bytes(content), digest)
        rest = [r for r in regions if r not in got]
        if rest:
            got.update(self._from_replica(rest, optional=optional))
        return got

    def account(self, got: dict[int, tuple[bytes, bytes]], store: bool = True) -> None:
        """Count fetched regions in the recovery's totals; with ``store``, copy them into the
        overlay when copy-on-read is on (always for a snapshot or journal source, whose bytes
        the mirror cannot give again)."""
        engine = self.engine
        source = self.source()
        engine.count_fetched(len(got), sum(len(d) for d, _ in got.values()))
        if store and (source != "mirror" or engine.settings["copy_on_read"]):
            rollback = source.startswith("snapshot:")
            for region, (data, digest) in got.items():
                engine.store_fetched(region, data, digest, rollback=rollback)
