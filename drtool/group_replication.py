"""Replicating a consistency group: whole group transactions, in order, to one replica server.

The members keep their own replication logs and sequence numbers.  A **cut** is the tail of
every member's log read at one instant (drtool.storage.replog.consistent_cut); because a
write is logged before it is acknowledged, a cut holding a write holds every write
acknowledged before it was issued.  The records between two cuts are one **group
transaction**, shipped in one request (``POST /v1/groups/{group}/records``) that the
secondary applies to every member or to none (drtool.replica.group).  So the secondary's
copy of the group is always the primary's group after a prefix of its acknowledged writes.

Cuts are recorded as the members' logs grow (every CUT_BYTES of appends across the group)
and at every shipping round, kept in memory and saved lazily (storage.groups.save_cuts:
checked against the logs when loaded; one lost only makes a later transaction bigger).

The members' own Replicators stay: they check their replicas' identity, re-log bitmap-mode
regions and account for acknowledgements (Replicator.wire_batch / acknowledged / failed);
while they belong to a GroupReplicator, their ship_batch and force go through it.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from itertools import islice
from typing import Any

from drtool.errors import Conflict, DrtoolError, PeerError, UsageError
from drtool.replication import RECHECK_SECONDS, Replicator, WireBatch, shipping_loop
from drtool.storage import groups as group_store
from drtool.storage.groups import GroupRecord
from drtool.storage.replog import consistent_cut

log = logging.getLogger("drtool.replication")

CUT_BYTES = 4 << 20  # a cut every this many bytes appended across the group: transactions of ~4-16 MiB
# A transaction larger than this (no cut inside: they were lost with a restart) is cut by time
# instead (see _bounded); well below the server's default --max-body of 256 MiB.
TXN_BYTES = 64 << 20
MAX_CUTS = 4096  # beyond this many unshipped cuts, the oldest are merged (bigger transactions)
SAVE_CUTS_SECONDS = 1.0
MERGE_BYTES = 16 << 20  # consecutive cuts are joined into one transaction up to this size
MERGE_CUTS = 64  # (at most this many cuts are looked at for it)


class GroupReplicator:
    """Ships a consistency group's records as whole transactions.  ``engines``: every member's
    open engine, each with its Replicator (same peer)."""

    def __init__(self, group: GroupRecord, engines: dict[str, Any], client: Any = None,
                 root: str | None = None) -> None:
        missing = [m for m in group.members if m not in engines]
        if missing:
            raise UsageError(f"group {group.name}: members {', '.join(missing)} are not open here: a group "
                             "replicates only with all its members")
        self.name = group.name
        self.group_id = group.group_id
        self.members = sorted(group.members)
        self.engines = {m: engines[m] for m in self.members}
        self.replicators: dict[str, Replicator] = {}
        for member, engine in self.engines.items():
            if engine.replicator is None:
                raise UsageError(f"group {group.name}: member {member} is not protected (drtool protect "
                                 f"{group.name} --peer URL)")
            self.replicators[member] = engine.replicator
        urls = {engine.record.peer["url"] for engine in self.engines.values()}
        if len(urls) != 1:
            raise UsageError(f"group {group.name}: its members replicate to different servers ({', '.join(sorted(urls))});"
                             " a group replicates to one")
        self.client = client or self.replicators[self.members[0]].client
        self.root = root
        self.lock = threading.Lock()  # one transaction at a time
        self._cuts_lock = threading.Lock()
        self.cuts: deque[dict[str, int]] = deque()
        self._since_cut = 0
        self._saved_at = 0.0
        self.next_txn: int | None = None  # learnt from the server (its committed_txn + 1)
        self.shipped_txns = 0
        self.last_error: str | None = None
        if root is not None:
            self.cuts.extend(self._valid(group_store.load_cuts(root, self.name, self.group_id)))
        for member in self.members:
            self.replicators[member].group = self
            self.engines[member].log.on_append = self._appended

    def detach(self) -> None:
        """The members replicate on their own again (the group was dissolved or left this agent)."""
        self.save_cuts(force=True)
        for member in self.members:
            if self.replicators[member].group is self:
                self.replicators[member].group = None
            if self.engines[member].log.on_append == self._appended:
                self.engines[member].log.on_append = None

    # -- cuts -------------------------------------------------------------------------

    def _appended(self, size: int) -> None:
        with self._cuts_lock:
            self._since_cut += size
            if self._since_cut < CUT_BYTES:
                return
            self._since_cut = 0
        self.record_cut()

    def record_cut(self) -> dict[str, int]:
        """Take a consistent cut of the members' logs now and queue it (unless nothing moved)."""
        tails = consistent_cut([self.engines[m].log for m in self.members])
        cut = dict(zip(self.members, tails))
        with self._cuts_lock:
            if not self.cuts or self.cuts[-1] != cut:
                self.cuts.append(cut)
            while len(self.cuts) > MAX_CUTS:
                del self.cuts[0]  # its records go with the next cut: one bigger transaction
        return cut

    def _valid(self, cuts: list[dict[str, int]]) -> list[dict[str, int]]:
        """Saved cuts that still describe these logs: every member named, none beyond a log's
        tail, in order.  (Only cuts of records durable when saved are saved: see save_cuts.)"""
        tails = {m: self.engines[m].log.next_seq - 1 for m in self.members}
        kept: list[dict[str, int]] = []
        for cut in cuts:
            if sorted(cut) != self.members or any(cut[m] > tails[m] for m in self.members):
                break
            if kept and any(cut[m] < kept[-1][m] for m in self.members):
                break
            kept.append(cut)
        return kept

    def save_cuts(self, force: bool = False) -> None:
        """Save the queued cuts whose records are all durable (a cut naming records a crash could
        still take would name other writes after the restart), lazily."""
        if self.root is None or (not force and time.monotonic() - self._saved_at < SAVE_CUTS_SECONDS):
            return
        self._saved_at = time.monotonic()
        durable = {m: self.engines[m].log.synced_mark for m in self.members}
        with self._cuts_lock:
            cuts = [dict(c) for c in self.cuts if all(c[m] <= durable[m] for m in self.members)]
        group_store.save_cuts(self.root, self.name, self.group_id, cuts)

    def _next_cut(self) -> dict[str, int] | None:
        """The cut the next transaction ships up to: the oldest queued cut that still has a
        pending record (older ones are shipped), or a later one while the records up to it stay
        within MERGE_BYTES (any recorded cut is a consistent boundary: skipping one only joins two
        transactions; a backlog written with cuts every 4 MiB ships in fewer, larger requests)."""
        oldest = {m: self.engines[m].log.oldest_seq() for m in self.members}
        with self._cuts_lock:
            while self.cuts:
                cut = self.cuts[0]
                if any(oldest[m] is not None and oldest[m] <= cut[m] for m in self.members):
                    break
                self.cuts.popleft()
            else:
                return None
            candidates = list(islice(self.cuts, MERGE_CUTS))
        furthest = candidates[-1]
        prefix: dict[str, tuple[list[int], list[int]]] = {}
        for member in self.members:
            seqs, sizes, total = [], [], 0
            for entry in self.engines[member].log.pending_through(furthest[member]):
                total += entry.size
                seqs.append(entry.seq)
                sizes.append(total)
            prefix[member] = (seqs, sizes)

        def size_through(cut: dict[str, int]) -> int:
            total = 0
            for member, (seqs, sizes) in prefix.items():
                at = bisect_right(seqs, cut[member])
                total += sizes[at - 1] if at else 0
            return total

        chosen = candidates[0]
        for cut in candidates[1:]:
            if size_through(cut) > MERGE_BYTES:
                break
            chosen = cut
        return chosen

    # -- shipping ---------------------------------------------------------------------

    def ship_txn(self) -> int:
        """Ship the next transaction (up to the oldest queued cut); the volume bytes it covered
        (0: nothing was pending)."""
        with self.lock, ExitStack() as stack:
            for member in self.members:
                stack.enter_context(self.replicators[member].lock)
            for member in self.members:
                replicator = self.replicators[member]
                if not replicator.verified:
                    replicator.check_replica()
                replicator._relog(replicator.batch_bytes)
            self.record_cut()  # every shipping round
            cut = self._next_cut()
            if cut is None:
                for member in self.members:
                    self.replicators[member]._resync_done()
                return 0
            return self._send(cut)

    def _send(self, cut: dict[str, int]) -> int:
        batches: list[tuple[str, WireBatch]] = []
        pending = _bounded({m: self.engines[m].log.pending_through(cut[m]) for m in self.members})
        for member in self.members:
            entries = pending[member]
            if not entries:
                continue
            # A member's mirror and overlay records go as two parts, in the order its first
            # record of each kind was logged (the server applies parts in order).
            kinds: dict[bool, list[Any]] = {}
            for entry in entries:
                kinds.setdefault(entry.header.overlay, []).append(entry)
            for part in kinds.values():
                batches.append((member, self.replicators[member].wire_batch(part, complete=True)))
        try:
            if self.next_txn is None:
                self.next_txn = self._ensure_group()["committed_txn"] + 1
            txn = self.next_txn
            try:
                self.client.send_group_txn(self.name, txn, self._parts(batches))
            except (Conflict, UsageError) as exc:
                if not any(b.has_copies for _, b in batches):
                    raise
                log.info("group %s: overlay copies refused (%s); sending the bytes", self.name, exc)
                batches = [(m, b.without_copies(self.replicators[m])) for m, b in batches]
                self.client.send_group_txn(self.name, txn, self._parts(batches))
        except PeerError as exc:
            self.last_error = str(exc)
            self.next_txn = None  # ask the server again: it may be another one now
            for member in self.members:
                self.replicators[member].failed(exc)
            raise
        except DrtoolError as exc:
            # Refused (a member the server's group lacks: a membership change that did not reach
            # it): the next round sets the server's group to these members again (idempotent).
            self.last_error = str(exc)
            self.next_txn = None
            raise
        self.last_error = None
        self.next_txn = txn + 1
        self.shipped_txns += 1
        covered = sum(self.replicators[m].acknowledged(b) for m, b in batches)
        self.save_cuts()  # (a cut fully shipped is dropped by the next _next_cut)
        return covered

    @staticmethod
    def _parts(batches: list[tuple[str, WireBatch]]) -> list[tuple[str, bool, int, list[bytes]]]:
        return [(m, b.overlay, b.complete_through or 0, b.chunks) for m, b in batches]

    def _ensure_group(self) -> dict[str, Any]:
        """The server's group, created or given these members (idempotent)."""
        return self.client.ensure_group(self.name, self.group_id, self.members)

    def force(self, member: str, regions: list[int]) -> None:
        """Make these regions' pending records of ``member`` reach the secondary now: whole
        transactions, up to a cut taken after their records (and the region re-logged first
        when bitmap mode dropped its records)."""
        replicator = self.replicators[member]
        engine = self.engines[member]
        with replicator.lock:
            for region in sorted(set(regions)):
                if engine.volume.norecord.test(region):
                    engine.relog_region(region)
        target = self.record_cut()
        while any(self.engines[m].log.pending_through(target[m]) for m in self.members):
            if not self.ship_txn():
                break
        log.info("group %s: force-replicated %s's regions through cut %s", self.name, member, target)

    def ship(self, deadline: float | None = None) -> int:
        """Ship until nothing is pending (through the last cut taken)."""
        total = 0
        while True:
            sent = self.ship_txn()
            if not sent:
                return total
            total += sent
            if deadline is not None and time.monotonic() > deadline:
                return total

    def wait_caught_up(self, timeout: float) -> None:
        """Every member caught up (each member's own checks: lost regions, timeouts)."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            self.replicators[member].wait_caught_up(max(deadline - time.monotonic(), 0.001))

    def run(self, stop: threading.Event, interval: float = 0.2,
            on_error: Callable[[Exception], None] | None = None, recheck: float = RECHECK_SECONDS) -> None:
        """Background loop for the agent (replication.shipping_loop, for the whole group)."""

        def idle() -> None:
            for replicator in self.replicators.values():
                replicator.idle(recheck)

        try:
            shipping_loop(stop, self.ship_txn, idle, f"group {self.name}", interval, on_error)
        finally:
            self.save_cuts(force=True)

    # -- what the group's replica is ---------------------------------------------------

    def consistency(self) -> tuple[bool, str | None]:
        return group_consistency(self.engines)


def _bounded(pending: dict[str, list[Any]], limit: int | None = None) -> dict[str, list[Any]]:
    """The members' records up to a cut, or, when they outgrow ``limit`` (TXN_BYTES), a prefix of
    them that is a cut too: every record appended up to one instant T (each record carries the
    time it was appended, under its log's lock).  A write acknowledged before another was issued
    was appended before it, so it is at or before the other's time: a time cut holding the later
    one holds the earlier.  (It relies on the clock not stepping back; it is the fallback for
    records pending from before a restart that lost the recorded cuts.)"""
    limit = TXN_BYTES if limit is None else limit
    if sum(e.size for entries in pending.values() for e in entries) <= limit:
        return pending
    used, until = 0, None
    for stamp, size in sorted((e.stamp, e.size) for entries in pending.values() for e in entries):
        if used and used + size > limit and stamp != until:
            break
        used, until = used + size, stamp
    bounded: dict[str, list[Any]] = {}
    for member, entries in pending.items():
        taken = []
        for entry in entries:
            if entry.stamp > until:
                break
            taken.append(entry)
        bounded[member] = taken
    return bounded


def group_consistency(engines: dict[str, Any]) -> tuple[bool, str | None]:
    """Is the group's replica write-order consistent, and if not, why?  Not while any member is
    unprotected, in its initial or a full resync, or in bitmap mode (regions ship whole from the
    volume, in no write order: VVR's DCM): until those regions have all shipped."""
    for member in sorted(engines):
        engine = engines[member]
        record = engine.record
        if record.peer is None:
            return False, f"member {member} is not protected"
        if record.replication.initial_sync != "done":
            return False, f"member {member}'s initial sync (or resync) is running"
        if engine.volume.norecord.any():
            return False, (f"member {member} is in bitmap mode: {engine.volume.norecord.popcount()} regions "
                           "ship whole, in no write order, until they have all shipped")
    return True, None
