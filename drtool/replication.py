"""Replication: shipping the log to the secondary, acknowledgements, lag, forced replication.

Records go out in sequence order, in batches; the secondary's acknowledgement
removes them from the log and clears the regions' unreplicated bits.  Mirror
records and overlay records (degraded mode) go to separate endpoints but keep
one sequence space.

Bitmap mode (VVR's DCM): when the pending log outgrows its limit, its records
are dropped and their regions marked ``norecord``; such regions are later
*re-logged* from the volume itself (their current bytes, one whole-region record
each) a batch at a time, and shipped like any record.  The initial full sync of
``protect`` is the same mechanism with every region marked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any

from drtool.engine import modes
from drtool.engine.lag import Pending, lag
from drtool.errors import (Conflict, DrtoolError, OperationTimeout, PeerError, PeerUnreachable, RegionsLost,
                           StateError, UsageError, VolumeNotFound)
from drtool.client import needs_insecure
from drtool.peer import make_client
from drtool.ports import ReplicationPort
from drtool.regions import to_runs
from drtool.storage.maps import RegionBitmap
from drtool.storage.records import Loss, Replication
from drtool.storage.replog import LogEntry
from drtool.wire import FLAG_OVERLAY_HELD, KIND_BASE, KIND_WRITE, from_overlay_header

log = logging.getLogger("drtool.replication")

BATCH_BYTES = 16 << 20
# After a batch smaller than this, the loop waits GATHER_SECONDS before the next: under a
# stream of small writes it would otherwise post a batch of a record or two at a time, each an
# HTTP request and an acknowledgement taking the GIL from the writers (measured with
# bench/writes.py); 10 ms more lag gathers the records of 10 ms into one batch.
SMALL_BATCH_BYTES = 1 << 20
GATHER_SECONDS = 0.01
RECHECK_SECONDS = 30.0  # an idle replicator asks the server this often whether its replica is the same


class Replicator:
    """Ships one engine's log.  Safe to call from several threads (one batch at a time)."""

    def __init__(self, engine: ReplicationPort, client: Any = None, batch_bytes: int | None = None) -> None:
        self.engine = engine
        self.client = client or make_client(engine.record.peer)
        self.batch_bytes = batch_bytes or BATCH_BYTES
        self.lock = threading.Lock()
        self.reachable: bool | None = None
        self.last_error: str | None = None
        self.last_ack: float | None = None
        self.shipped_records = 0
        self.shipped_bytes = 0  # on the wire (records as sent)
        self.logged_bytes = 0  # what the acknowledged records held in the log
        self._relog_from = 0  # where the next re-log of bitmap-mode regions starts looking
        # The server's replica was checked to be the one this volume filled (identity_problem)
        # since this replicator started or the server last failed it; and the highest sequence
        # number it acknowledged as complete since (a replica rolled back under us shows lower).
        self.verified = False
        self.checked_at = 0.0  # time.monotonic() of the last check that found the replica right
        self.confirmed = 0
        # The consistency group this volume ships with (drtool.group_replication): its records
        # then go only in whole group transactions, never on their own.
        self.group: Any = None
        engine.replicator = self

    # -- shipping ---------------------------------------------------------------------

    def ship_batch(self) -> int:
        """Ship one batch of pending records (re-logging bitmap-mode regions first).

        Returns the volume bytes the batch covered (0: nothing was pending).  The first batch
        (and the first after the server failed one) checks that the server's replica is still the
        one this volume filled (:meth:`check_replica`): a lost or replaced replica is resynced.
        In a consistency group, the group ships its next transaction instead."""
        if self.group is not None:
            return self.group.ship_txn()
        with self.lock:
            for attempt in (1, 2):
                if not self.verified:
                    self.check_replica()
                self._relog(self.batch_bytes)
                entries = self.engine.log.pending(limit_bytes=self.batch_bytes)
                if not entries:
                    self._resync_done()
                    return 0
                # A batch goes to one endpoint: cut it where the flag changes.
                overlay = entries[0].header.overlay
                batch = []
                for entry in entries:
                    if entry.header.overlay != overlay:
                        break
                    batch.append(entry)
                try:
                    return self._send(batch, complete=True)
                except VolumeNotFound:
                    self.verified = False  # the replica went away: check (and resync) once, now
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    def check_replica(self) -> None:
        """Is the server's replica the one this volume filled?  Same volume id and generation, and
        it applied at least what this volume believes acknowledged.  If not (deleted, a wiped root,
        a replaced disk, a copy restored from an older backup), it is not believed in sync: every
        region it lacks is marked to ship again (a full resync, only the non-zero regions into a
        new empty replica) and the volume's status says why.  Call with ``self.lock`` held."""
        engine = self.engine
        record = engine.record
        if record.peer is None:
            return
        believed = max(believed_acked(record), self.confirmed if sequence_checked(record) else 0)
        try:
            info: dict[str, Any] | None = self.client.volume_info(engine.name)
        except VolumeNotFound:
            info = None
        except PeerError as exc:
            self.reachable = False
            self.last_error = str(exc)
            raise
        # It answered: an idle volume's status (and metrics) must not keep saying unreachable.
        self.reachable, self.last_error = True, None
        problem = identity_problem(record, info, record.peer["url"], believed)
        if problem is None:
            if info and info.get("generation") and record.peer.get("generation") != info["generation"]:
                engine.update_peer(generation=info["generation"])  # paired before generations: learnt
            self.verified = True
            self.checked_at = time.monotonic()
            return
        if not modes.is_normal(record):
            # Degraded or failing back: the volume cannot give every region; the replica it relied
            # on is gone.  Nothing here can repair that: say so on every batch.
            raise StateError(f"volume {engine.name}: {problem}, while the volume is {record.mode}: "
                             "nothing was shipped; finish or cancel the recovery, then run drtool protect "
                             "again (a full resync)")
        log.warning("volume %s: %s; the replica is not in sync: a full resync starts", engine.name, problem)
        self._resync(problem)

    def _resync_done(self) -> None:
        """A resync this replicator started (its Replication has a reason; protect finishes its
        own) is done once every region has shipped: the replica is in sync again."""
        engine = self.engine
        replication = engine.record.replication
        if (replication.initial_sync == "running" and replication.reason and engine.record.peer is not None
                and not engine.volume.norecord.any()):
            if engine.initial_sync_done():
                log.warning("volume %s: the resync into the new replica is done (%s)", engine.name,
                            replication.reason)

    def _resync(self, reason: str) -> None:
        """Pair again with the server's replica (created empty if it is gone): a full sync."""
        engine = self.engine
        geometry = engine.geometry
        replica = self.client.ensure_volume(engine.name, geometry.size, geometry.region_size,
                                            engine.record.volume_id)
        count = geometry.count
        lacking: Iterable[int] | None = None
        regions = count
        if known_all_zero(replica):
            regions = _count(engine.volume.manifest.nonzero_between(0, count))
            lacking = engine.volume.manifest.nonzero_between(0, count)
        peer = {k: v for k, v in engine.record.peer.items() if k != "paired"}
        peer["generation"] = replica.get("generation")
        engine.pair(peer, Replication(initial_sync="running", started=time.time(), mode="full", regions=regions,
                                      reason=reason), lacking)
        self.confirmed = 0
        self._relog_from = 0
        self.verified = True

    def ship(self, progress: Callable[[int], None] | None = None, deadline: float | None = None) -> int:
        """Ship until nothing is pending (or the deadline passes); return the volume bytes covered."""
        total = 0
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise OperationTimeout(f"volume {self.engine.name}: replication did not catch up in time "
                                       f"({self.pending_summary()})")
            sent = self.ship_batch()
            if not sent:
                return total
            total += sent
            if progress:
                progress(sent)
            self._checkpoint_if_large()

    def _checkpoint_if_large(self) -> None:
        """Shipped and acknowledged records leave the state directory as the maps are saved past
        them (a checkpoint trims the log): a long sync (protect's full copy, a bitmap-mode
        catch-up) then needs room for a segment and a batch, not for the whole volume."""
        if self.engine.log.disk_bytes() > 2 * self.batch_bytes:
            self.engine.save()

    def force(self, regions: list[int]) -> None:
        """Ship exactly these regions' pending records now and wait for the acknowledgement (in
        a consistency group: every whole transaction up to a cut that covers them)."""
        if self.group is not None:
            self.group.force(self.engine.name, regions)
            return
        wanted = set(regions)
        with self.lock:
            for region in sorted(wanted):
                if self.engine.volume.norecord.test(region):
                    self.engine.relog_region(region)
            entries = self.engine.log.pending(regions=wanted)
            # In sequence order, cut where the endpoint changes: a region's mirror record that
            # follows its overlay record (failback re-logs incident writes) must arrive after it.
            batch: list[LogEntry] = []
            for entry in entries:
                if batch and (entry.header.overlay != batch[0].header.overlay or len(batch) >= 4096):
                    self._send(batch, complete=False)
                    batch = []
                batch.append(entry)
            if batch:
                self._send(batch, complete=False)
        log.info("volume %s: force-replicated regions %s", self.engine.name, to_runs(wanted))

    def _send(self, batch: list[LogEntry], complete: bool) -> int:
        """Ship ``batch`` (one endpoint, sequence order) and acknowledge it.

        Each byte crosses the wire once: a record that a later whole-region record of the same
        region in this batch overwrites is not sent (it is acknowledged with the batch, which
        vouches for it as deliberately dropped: the later record lands in the same apply), and a
        failback's copy of an incident write goes as a header naming the bytes the overlay
        replica holds already (the server copies them; if it cannot, the bytes are sent)."""
        engine = self.engine
        wire_batch = self.wire_batch(batch, complete)
        try:
            try:
                self.client.send_records(engine.name, wire_batch.chunks, complete_through=wire_batch.complete_through,
                                         overlay=wire_batch.overlay)
            except (Conflict, UsageError) as exc:
                if not wire_batch.has_copies:
                    raise
                # The overlay replica lacks a region (or the server does not know the kind):
                # nothing of the batch was applied; send the bytes.
                log.info("volume %s: overlay copies refused (%s); sending the bytes", engine.name, exc)
                wire_batch = wire_batch.without_copies(self)
                self.client.send_records(engine.name, wire_batch.chunks, complete_through=wire_batch.complete_through,
                                         overlay=wire_batch.overlay)
        except PeerError as exc:
            self.failed(exc)
            raise
        return self.acknowledged(wire_batch)

    def wire_batch(self, batch: list[LogEntry], complete: bool) -> WireBatch:
        """``batch`` (one endpoint, sequence order) as it goes on the wire: superseded records
        left out, overlay copies as headers, and its Complete-Through (``complete``: when the
        batch starts at the oldest pending record, every record before it is acknowledged, so
        the secondary may advance its watermark past sequence numbers sent elsewhere)."""
        engine = self.engine
        overlay = batch[0].header.overlay
        complete_through = None
        if complete and engine.log.oldest_seq() == batch[0].seq:
            complete_through = batch[-1].seq
        sent = _unsuperseded(batch, engine.geometry.region_length)
        return WireBatch(batch, sent, self._wire_chunks(sent, copies=not overlay), overlay, complete_through)

    def failed(self, exc: PeerError) -> None:
        """A batch (or a group transaction) was not acknowledged."""
        self.reachable = False
        self.last_error = str(exc)
        self.verified = False  # the server may come back as another one (a replaced disk)

    def acknowledged(self, wire_batch: WireBatch) -> int:
        """The secondary applied ``wire_batch``: forget its records here; the volume bytes covered."""
        batch = wire_batch.batch
        self.reachable = True
        self.last_error = None
        self.last_ack = time.time()
        if wire_batch.complete_through is not None:
            self.confirmed = max(self.confirmed, wire_batch.complete_through)
        self.shipped_records += len(wire_batch.sent)
        self.shipped_bytes += sum(len(c) for c in wire_batch.chunks)
        self.logged_bytes += sum(e.size for e in batch)
        self.engine.acknowledge([e.seq for e in batch])
        return sum(e.header.length for e in batch if e.header.kind != KIND_BASE)  # (a base record names bytes)

    def _wire_chunks(self, entries: list[LogEntry], copies: bool) -> list[bytes]:
        """The records as they go on the wire: as logged, or (``copies``) a failback's copy of an
        incident write as a header-only copy from the overlay replica."""
        chunks: list[bytes] = []
        run: list[LogEntry] = []
        for entry in entries:
            header = entry.header
            if copies and header.flags & FLAG_OVERLAY_HELD and header.kind == KIND_WRITE:
                if run:
                    chunks += self.engine.log.read_for_shipping(run)
                    run = []
                chunks.append(_OverlayCopy(from_overlay_header(header)))
            else:
                run.append(entry)
        if run:
            chunks += self.engine.log.read_for_shipping(run)
        return chunks

    def _relog(self, budget: int) -> None:
        """Turn up to ``budget`` bytes of bitmap-mode regions into log records."""
        engine = self.engine
        if engine.log.pending_bytes >= budget or not engine.volume.norecord.any():
            return
        used = engine.log.pending_bytes
        # Only as many marked regions as the budget can take are looked at, from where the last
        # batch stopped (a region that cannot be re-logged now must not stall the ones after it).
        norecord, count = engine.volume.norecord, engine.geometry.count
        want = max(1, (budget - used) // engine.geometry.region_size + 1)
        candidates = list(islice(norecord.set_between(self._relog_from, count), want))
        if len(candidates) < want:
            candidates += islice(norecord.set_between(0, self._relog_from), want - len(candidates))
        for region in candidates:
            if used >= budget:
                break
            try:
                relogged = engine.relog_region(region)
            except StateError as exc:
                if not engine.log.pending_bytes:
                    raise  # nothing logged to ship first: the state directory is full
                # No room for more records now: ship those logged (a checkpoint then frees
                # their space) and come back to this region.
                log.warning("volume %s: %s; shipping the %d bytes already logged first",
                            engine.name, exc, engine.log.pending_bytes)
                return
            self._relog_from = region + 1
            if relogged is not None:
                used += engine.geometry.region_length(region)

    def overflow(self) -> None:
        """The log outgrew its limit: drop its records, keep their regions marked (bitmap mode)."""
        engine = self.engine
        with self.lock:
            regions = engine.enter_bitmap_mode(time.time())
        log.warning("volume %s: replication log over its limit; bitmap mode for %d regions", engine.name, regions)

    # -- lag ----------------------------------------------------------------------------

    def pending_summary(self) -> str:
        lag = lag_of(self.engine)
        return f"{lag['records']} records, {lag['regions']} regions pending"

    def wait_caught_up(self, timeout: float) -> None:
        """Ship until the lag is zero, retrying an unreachable peer until ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        pause = 0.2
        settled = False
        self.verified = False  # "in sync" is said of the replica the server holds now: ask it
        while True:
            try:
                self.ship(deadline=deadline)
            except PeerUnreachable as exc:
                if time.monotonic() + pause > deadline:
                    raise OperationTimeout(f"volume {self.engine.name}: the peer stayed unreachable for "
                                           f"{timeout:g}s ({exc}); {self.pending_summary()}") from None
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            if not self.engine.volume.unreplicated.any():
                return
            if not settled:
                # What is left may be regions the volume cannot give (bad, no log record): the
                # replica may hold them already, as the manifest says (then nothing is pending).
                settled = True
                lost = self.engine.settle_lost()
                if lost.any() and not self.engine.volume.unreplicated.difference(lost).any():
                    raise RegionsLost(self.engine.name, lost.runs())  # no wait can ship them
                continue
            if time.monotonic() > deadline:
                raise OperationTimeout(f"volume {self.engine.name}: {self.pending_summary()} after shipping")

    def run(self, stop: threading.Event, interval: float = 0.2, on_error: Callable[[Exception], None] | None = None,
            recheck: float = RECHECK_SECONDS) -> None:
        """Background loop for the agent: ship whenever something is pending; when idle, check
        every ``recheck`` seconds that the server still holds the replica this volume filled."""
        shipping_loop(stop, self.ship_batch, lambda: self.idle(recheck), f"volume {self.engine.name}",
                      interval, on_error)

    def idle(self, recheck: float) -> None:
        """Nothing was pending: after ``recheck`` seconds, the next turn asks the server again
        whether its replica is the one this volume filled."""
        if self.verified and time.monotonic() - self.checked_at > recheck:
            self.verified = False


def shipping_loop(stop: threading.Event, ship: Callable[[], int], idle: Callable[[], None], what: str,
                  interval: float = 0.2, on_error: Callable[[Exception], None] | None = None) -> None:
    """The agent's background replication (a volume's Replicator, a group's GroupReplicator):
    ``ship`` one batch whenever something is pending (the volume bytes it covered, 0 when
    nothing was); after a small batch wait GATHER_SECONDS so the next gathers more; ``idle`` when
    nothing was pending; after an error back off, doubling up to 5 s, and keep going."""
    backoff = interval
    while not stop.is_set():
        try:
            sent = ship()
            backoff = interval
            if sent:
                if sent < SMALL_BATCH_BYTES:
                    stop.wait(GATHER_SECONDS)
                continue
            idle()
        except DrtoolError as exc:  # unreachable, refused (released or promoted peer), ...
            if on_error:
                on_error(exc)
            backoff = min(backoff * 2, 5.0)
        except Exception as exc:  # a bug: keep replicating, log it with its traceback
            log.exception("%s: replication error", what)
            if on_error:
                on_error(exc)
            backoff = min(backoff * 2, 5.0)
        stop.wait(backoff)


class _OverlayCopy(bytes):
    """A header-only KIND_FROM_OVERLAY record among a batch's chunks."""


@dataclass(frozen=True)
class WireBatch:
    """A batch of one volume's log entries as shipped: ``sent`` (the entries not superseded
    within it) as ``chunks``, to the mirror or the ``overlay`` endpoint."""

    batch: list[LogEntry]
    sent: list[LogEntry]
    chunks: list[bytes]
    overlay: bool
    complete_through: int | None

    @property
    def has_copies(self) -> bool:
        return any(isinstance(c, _OverlayCopy) for c in self.chunks)

    def without_copies(self, replicator: Replicator) -> WireBatch:
        """The same batch with every overlay copy sent as its bytes."""
        return replace(self, chunks=replicator._wire_chunks(self.sent, copies=False))


def _unsuperseded(batch: list[LogEntry], region_length: Callable[[int], int]) -> list[LogEntry]:
    """The entries of ``batch`` that no later whole-region record of the same region in the
    batch overwrites (bitmap mode re-logs a region whole behind its older records).  An entry
    that ships as a patch (its bytes alone, storage.replog LogEntry.patch) covers only them."""
    covered: set[int] = set()
    kept: list[LogEntry] = []
    for entry in reversed(batch):
        if entry.region in covered:
            continue
        if (entry.header.length == region_length(entry.region) and entry.patch is None
                and entry.header.kind != KIND_BASE):  # (a base record names bytes, it writes none)
            covered.add(entry.region)  # a whole region goes on the wire: older records are moot
        kept.append(entry)
    kept.reverse()
    return kept


def lag_of(engine: ReplicationPort) -> dict[str, Any]:
    """The lag of an open engine (drtool.engine.lag computes it)."""
    return lag(engine.volume, Pending.of_log(engine.log))


def fast_sync_plan(engine: ReplicationPort, peer_info: dict[str, Any]) -> RegionBitmap | None:
    """After a role swap: the regions the returning peer lacks, or None when it needs everything.

    The peer adopted this volume (same identity) when it stepped down; it lacks the regions
    written here since the promotion (their era is the promotion's or later) and holds stale
    bytes in the regions it marked divergent (written there, never shipped here).  Only the
    era map's pages that hold such regions are read.
    """
    promoted = engine.record.promoted
    adopted = peer_info.get("adopted")
    if not promoted or not adopted or peer_info.get("volume_id") != engine.record.volume_id:
        return None
    wanted = RegionBitmap(engine.geometry.count)
    for region in engine.volume.eras.changed_since(promoted.era):
        wanted.set(region)
    for first, count in adopted.get("divergent") or []:
        wanted.set_run(first, count)
    return wanted


def sequence_checked(record: Any) -> bool:
    """Can the replica's applied sequence be compared with what this volume acknowledged?  Not
    after a failback: the overlay replica's records (acknowledged here) are forgotten with it on
    the server until the next mirror batch moves the mirror's watermark past them."""
    return record.failback is None and modes.is_normal(record)


def believed_acked(record: Any) -> int:
    """The highest sequence number this volume believes the replica applied (0: no claim).  The
    watermark counts only above what bitmap mode dropped (dropped records were never shipped)."""
    replication = record.replication
    through = replication.acked_through or 0
    if not sequence_checked(record) or through <= (replication.dropped_through or 0):
        return 0
    return through


def replica_applied(info: dict[str, Any]) -> int:
    """The highest sequence number the replica says it applied (mirror, forced, overlay)."""
    ahead = info.get("applied_ahead") or []
    overlay = (info.get("overlay") or {}).get("applied_seq") or 0
    return max(info.get("applied_seq") or 0, max(ahead, default=0), overlay)


def identity_problem(record: Any, info: dict[str, Any] | None, url: str, believed: int) -> str | None:
    """None when ``info`` (GET of the replica) describes the replica this volume is paired with,
    else why it does not.  A pairing is by identity: the volume id and the generation the server
    gave the replica when it created it, not the server's URL (the same server reached by another
    name is the same replica).  A pairing made before generations existed is known by its URL."""
    if info is None:
        return "the replica was lost (the server holds none)"
    if info.get("volume_id") != record.volume_id:
        return f"the server's replica belongs to volume id {info.get('volume_id')}"
    known = (record.peer or {}).get("generation")
    if known:
        if info.get("generation") != known:
            return (f"the replica was replaced (its generation {info.get('generation')} is not the one "
                    f"this volume filled, {known})")
    elif (record.peer or {}).get("url") != url.rstrip("/"):
        return "the volume was paired with another server"
    applied = replica_applied(info)
    if applied < believed:
        return (f"the replica applied records up to sequence {applied} only, while this volume had "
                f"them acknowledged through {believed}")
    return None


def known_all_zero(replica: dict[str, Any] | None) -> bool:
    """Does this description (GET or PUT of the replica) prove it holds only zeros?  A replica
    that does not exist yet will (the server creates it empty); an existing one must never have
    applied a record and have every region's slot say zeros."""
    if replica is None:
        return True
    return (replica.get("applied_seq") == 0 and not replica.get("applied_ahead")
            and replica.get("region_count") is not None
            and replica.get("zero_regions") == replica.get("region_count"))


def protect(engine: ReplicationPort, url: str, token_file: str | None, ca: str | None = None,
            progress: Callable[[int], None] | None = None, client: Any = None,
            on_plan: Callable[[dict[str, Any]], None] | None = None, plan_only: bool = False,
            insecure: bool = False) -> dict[str, Any]:
    """Pair the volume with its replica on ``url`` and run (or resume) the initial sync.

    The sync is incremental when the peer is this volume's former primary coming back (fast
    failback), full otherwise.  A full sync ships only the regions whose manifest says they are
    not all zeros, and only into a replica known to hold only zeros (:func:`known_all_zero`:
    the server creates it so, and says so again when asked); a replica that already existed
    with content of unknown age gets every region, zeros included (zero records are cheap on
    the wire).  The replica is never called in sync without that evidence.  ``on_plan`` hears
    what will be copied before it starts.
    """
    # Kept absolute: later commands (and the agent) run from other directories.
    token_file, ca = absolute_path(token_file), absolute_path(ca)
    peer = {"url": url.rstrip("/"), "token_file": token_file, "ca": ca}
    # --insecure only matters for plain http:// beyond loopback: kept with the peer only then
    # (status warns of an insecure link; an https:// or loopback pairing is not one).
    insecure = bool(insecure) and needs_insecure(peer["url"])
    if insecure:
        peer["insecure"] = True
    client = client or make_client(peer)
    record = engine.record
    volume = engine.volume
    count = engine.geometry.count
    # Paired already: is the server's replica the one this volume filled (identity_problem)?
    # What this volume believes acknowledged is read before the server is asked (a batch the
    # agent ships meanwhile only raises both).
    believed = believed_acked(record) if record.peer is not None else 0
    peer_info = _peer_info(client, engine.name)
    problem = identity_problem(record, peer_info, peer["url"], believed) if record.peer is not None else None
    same_peer = record.peer is not None and problem is None
    if problem is not None:
        log.warning("volume %s: %s; the replica is not in sync: a full resync", engine.name, problem)
    wanted: RegionBitmap | None = None
    zero_replica = False
    plan: dict[str, Any]
    if same_peer:
        plan = {"mode": "resume", "regions": volume.norecord.popcount()}
    else:
        wanted = fast_sync_plan(engine, peer_info) if peer_info else None
        if wanted is None:
            zero_replica = known_all_zero(peer_info)
            regions = _count(volume.manifest.nonzero_between(0, count)) if zero_replica else count
            plan = {"mode": "full", "regions": regions}
            if problem is not None:
                plan["reason"] = problem
        else:
            divergent = sum(n for _, n in (peer_info["adopted"].get("divergent") or []))
            plan = {"mode": "incremental", "regions": wanted.popcount(), "divergent": divergent,
                    "lost": peer_info["adopted"].get("lost")}
    plan["bytes"] = plan["regions"] * engine.geometry.region_size
    if on_plan:
        on_plan(plan)
    if plan_only:
        return {"volume": engine.name, "peer": peer["url"], "changed": False, "plan": plan}
    replica = client.ensure_volume(engine.name, engine.geometry.size, engine.geometry.region_size,
                                   record.volume_id)
    if same_peer and peer_info is not None and replica.get("generation") != peer_info.get("generation"):
        # Replaced between the two requests: not the replica just checked after all.
        same_peer, zero_replica = False, True
        problem = "the replica was replaced while protect ran"
        plan = {"mode": "full", "regions": _count(volume.manifest.nonzero_between(0, count)), "reason": problem}
        plan["bytes"] = plan["regions"] * engine.geometry.region_size
    peer["generation"] = replica.get("generation")
    changed = not same_peer or record.peer.get("url") != peer["url"]
    if same_peer:
        engine.update_peer(url=peer["url"], token_file=token_file, ca=ca, insecure=insecure,
                           generation=peer["generation"])
    else:
        lacking: Iterable[int] | None = None  # every region
        lost = None
        if plan["mode"] == "incremental":
            # The returning peer's sequence numbers end where ours begin again.
            client.rebase(engine.name, engine.log.next_seq - 1)
            lacking = wanted
            lost = Loss.from_json(plan["lost"], "promoted.lost") if plan.get("lost") else None
        elif zero_replica and known_all_zero(replica):
            lacking = volume.manifest.nonzero_between(0, count)  # zeros need no shipping
        elif zero_replica:  # it was written meanwhile: its content is unknown after all
            plan.update(regions=count, bytes=count * engine.geometry.region_size)
        engine.pair(peer, Replication(initial_sync="running", started=time.time(), mode=plan["mode"],
                                      regions=plan["regions"], reason=problem), lacking, lost)
    replicator = Replicator(engine, client)
    replicator.verified = True  # just checked (or paired)
    before = volume.norecord.popcount()
    replicator.ship(progress=progress)
    changed = engine.initial_sync_done() or changed
    return {"volume": engine.name, "peer": peer["url"], "changed": changed, "plan": plan,
            "regions_synced": before - volume.norecord.popcount(),
            "records_shipped": replicator.shipped_records, "bytes_shipped": replicator.shipped_bytes}


def absolute_path(path: str | None) -> str | None:
    """A file named on the command line, absolute (relative to the caller's directory)."""
    return os.path.abspath(path) if path else path


def _count(regions: Iterable[int]) -> int:
    return sum(1 for _ in regions)


def _peer_info(client: Any, name: str) -> dict[str, Any] | None:
    from drtool.errors import VolumeNotFound

    try:
        return client.volume_info(name)
    except VolumeNotFound:
        return None
