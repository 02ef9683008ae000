"""``drtool verify``: proof, not belief (DRBD's online verify, VVR's verifydata).

The secondary re-reads and re-hashes its copy of each region (its own scrub,
``POST /v1/volumes/{name}/verify``, a bounded batch at a time); here those digests are
compared with the primary's manifest and with what the primary believes acknowledged.
Each region that differs gets a reason:

- ``replica-rot``: the replica's bytes fail the replica's own stored digest (or cannot be
  read): its disk rotted;
- ``divergent``: the replica's bytes are what it stored, but not what the primary's manifest
  says, while the primary believes the region shipped and acknowledged;
- ``pending``: the region differs but is still unreplicated here (a write on its way, a
  bitmap-mode region): not a divergence, replication will ship it.

Only regions that can differ are compared: those whose manifest is not all zeros here
(``Manifest.nonzero_between``) and those the server lists (a digest that is not the zeros'
slot, or allocated bytes in its image).  Every other region is zeros on both sides, verified
without a read, so a sparse 15 TiB volume verifies in what its data costs.

The replica compared with depends on the mode: in normal mode the mirror; in degraded or
resync mode the overlay replica merged over the mirror (``overlay: true``), since the
primary's manifest then describes the overlay's writes for the regions the overlay holds.

The walk is throttled (``rate``: bytes per second the server reads), resumable (a cursor in
``verify.json`` in the volume's state directory, written atomically with a checksum; the next
verify of the same regions continues where an interrupted one stopped), and reports
progress.  A region that differs while the primary is busy with it (written, shipped and
acknowledged between the server's read and the comparison) is checked once more at the end
before it is called divergent.

``repair`` re-logs every rotten or divergent region from the volume (``relog_region``: a
whole-region record of its current, verified bytes), ships those records and waits for
their acknowledgement (``force``), ships whatever else is pending (``replicate --wait``),
then verifies the repaired and pending regions again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import blake3

from drtool.engine import modes
from drtool.errors import CorruptStateFile, PeerError, UsageError, VolumeNotFound
from drtool.peer import make_client
from drtool.ports import VolumeView
from drtool.regions import Run, parse_runs, to_runs
from drtool.storage.atomic import write_atomic
from drtool.storage.maps import zero_digest

CURSOR_FILE = "verify.json"
CURSOR_KIND = "drtool.verify/1"
MAX_BATCH_BYTES = 64 << 20  # the server's limit per request
SAVE_EVERY = 1.0  # seconds between cursor writes
REASONS = ("replica-rot", "divergent", "pending")


class VerifyPort(VolumeView, Protocol):
    """What verify asks of the engine: the maps (read), and a re-log for a repair."""

    def relog_region(self, region: int) -> int | None: ...

    def partial_matches(self, region: int, digest: bytes) -> bool: ...


# -- the cursor --------------------------------------------------------------------------------


def _checksum(body: dict[str, Any]) -> str:
    return blake3.blake3(json.dumps(body, sort_keys=True).encode()).hexdigest()


def cursor_path(engine: VerifyPort) -> str:
    return engine.volume.paths.file(CURSOR_FILE)


def load_cursor(path: str) -> dict[str, Any] | None:
    """The saved cursor, or None when there is none; a torn or edited one is refused."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptStateFile(path, f"cannot read the verify cursor: {exc.strerror}") from None
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = None
    if not isinstance(body, dict) or body.get("kind") != CURSOR_KIND or body.pop("checksum", None) != _checksum(body):
        raise CorruptStateFile(path, "the verify cursor is torn or damaged (run drtool verify --restart)")
    return body


def save_cursor(path: str, body: dict[str, Any]) -> None:
    body = {**body, "kind": CURSOR_KIND}
    write_atomic(path, json.dumps({**body, "checksum": _checksum(body)}, sort_keys=True).encode() + b"\n")


# -- the walk ----------------------------------------------------------------------------------


class Findings:
    """What a walk found so far (JSON-able through :meth:`to_json`, restored by :meth:`of`)."""

    def __init__(self) -> None:
        self.rot: set[int] = set()
        self.divergent: set[int] = set()
        self.pending: set[int] = set()
        self.suspect: set[int] = set()  # differs though acknowledged: checked again at the end
        self.errors: dict[int, str] = {}
        self.compared = 0
        self.equal = 0
        self.bytes_read = 0
        self.regions_read = 0

    def to_json(self) -> dict[str, Any]:
        return {"rot": _runs(self.rot), "divergent": _runs(self.divergent), "pending": _runs(self.pending),
                "suspect": _runs(self.suspect), "errors": {str(k): v for k, v in self.errors.items()},
                "compared": self.compared, "equal": self.equal, "bytes_read": self.bytes_read,
                "regions_read": self.regions_read}

    @classmethod
    def of(cls, data: dict[str, Any]) -> Findings:
        found = cls()
        for attr in ("rot", "divergent", "pending", "suspect"):
            setattr(found, attr, {r for first, count in data.get(attr, []) for r in range(first, first + count)})
        found.errors = {int(k): str(v) for k, v in (data.get("errors") or {}).items()}
        for attr in ("compared", "equal", "bytes_read", "regions_read"):
            setattr(found, attr, int(data.get(attr, 0)))
        return found


def _runs(regions: Iterable[int]) -> list[list[int]]:
    return [list(run) for run in to_runs(regions)]


def _clip(runs: list[Run], start: int, end: int | None) -> Iterator[tuple[int, int]]:
    """[lo, hi) pieces of ``runs`` between region ``start`` and ``end`` (None: the end)."""
    for first, count in runs:
        lo, hi = max(first, start), first + count if end is None else min(first + count, end)
        if lo < hi:
            yield lo, hi


class _Walker:
    def __init__(self, engine: VerifyPort, client: Any, overlay: bool, rate: int | None,
                 progress: Callable[[int], None] | None) -> None:
        self.engine = engine
        self.client = client
        self.overlay = overlay
        self.rate = rate
        self.progress = progress
        self.clock = time.monotonic()
        self.read_here = 0

    @property
    def batch_bytes(self) -> int:
        if not self.rate:
            return MAX_BATCH_BYTES
        return max(self.engine.geometry.region_size, min(MAX_BATCH_BYTES, self.rate // 4))

    def batch(self, runs: list[Run], start: int) -> tuple[dict[str, Any], int | None]:
        try:
            answer = self.client.verify_regions(self.engine.name, runs, start, self.overlay, self.batch_bytes)
        except VolumeNotFound:
            raise PeerError(f"the replica server {self.client.url} holds no replica of {self.engine.name} "
                            "(run drtool protect again)") from None
        except UsageError as exc:
            if "no such endpoint" in str(exc):  # a drtool serve from before verify
                raise PeerError(f"the replica server {self.client.url} cannot verify (its drtool predates "
                                "POST .../verify: upgrade it)") from None
            raise
        following = answer["next"]
        if following is not None and (not isinstance(following, int) or following < start):
            raise PeerError(f"the replica server {self.client.url} answered a verify that goes backwards")
        return answer, following

    def throttle(self, nbytes: int) -> None:
        self.read_here += nbytes
        if self.rate:
            ahead = self.read_here / self.rate - (time.monotonic() - self.clock)
            if ahead > 0:
                time.sleep(ahead)

    def walk(self, runs: list[Run], start: int, found: Findings,
             on_batch: Callable[[int | None], None] | None = None) -> None:
        """Compare ``runs`` from region ``start`` to their end, batch by batch."""
        geometry = self.engine.geometry
        position: int | None = start
        while position is not None:
            answer, following = self.batch(runs, position)
            self.compare(runs, position, following, answer, found)
            self.throttle(int(answer.get("bytes_read", 0)))
            if self.progress:
                done = sum(geometry.run_bounds(lo, hi - lo)[1] for lo, hi in _clip(runs, position, following))
                if done:
                    self.progress(done)
            position = following
            if on_batch:
                on_batch(position)

    def compare(self, runs: list[Run], start: int, end: int | None, answer: dict[str, Any], found: Findings) -> None:
        volume, geometry = self.engine.volume, self.engine.geometry
        entries: dict[int, dict[str, Any]] = {}
        for entry in answer["entries"]:
            region = entry.get("region") if isinstance(entry, dict) else None
            if not isinstance(region, int) or not 0 <= region < geometry.count:
                raise PeerError(f"the replica server {self.client.url} answered a verify entry {entry!r}")
            entries[region] = entry
        found.bytes_read += int(answer.get("bytes_read", 0))
        found.regions_read += int(answer.get("regions_read", 0))
        mine: set[int] = set()
        for lo, hi in _clip(runs, start, end):
            mine.update(volume.manifest.nonzero_between(lo, hi))
        for region in sorted(mine | set(entries)):
            found.compared += 1
            zero = zero_digest(geometry.region_length(region))
            entry = entries.get(region)
            try:
                stored = bytes.fromhex(entry["stored"]) if entry else zero
                computed = (bytes.fromhex(entry["computed"]) if entry["computed"] is not None else None) if entry else zero
            except (KeyError, TypeError, ValueError):
                raise PeerError(f"the replica server {self.client.url} answered a verify entry {entry!r}") from None
            found.suspect.discard(region)
            if computed is None or computed != stored:
                found.rot.add(region)
                found.errors[region] = (entry or {}).get("error") or "the replica's bytes fail its own digest"
            elif volume.manifest.matches(region, computed) or self.engine.partial_matches(region, computed):
                # (a region the overlay holds in part has its base's digest in the manifest: its
                # content's digest is that of its base with the overlay's blocks over it)
                found.equal += 1
            elif volume.unreplicated.test(region):
                found.pending.add(region)
            else:
                found.suspect.add(region)

    def settle(self, found: Findings) -> None:
        """Check the suspects once more: still different and acknowledged is divergent."""
        if not found.suspect:
            return
        # Acknowledged before the server reads them again, and unchanged until compared: then
        # the replica must hold them.  Anything else was changing while we looked: pending.
        volume = self.engine.volume
        before = {r: (volume.manifest.stored(r), volume.unreplicated.test(r)) for r in found.suspect}
        again = Findings()
        progress, self.progress = self.progress, None  # these regions were counted already
        try:
            self.walk(to_runs(found.suspect), 0, again)
        finally:
            self.progress = progress
        found.compared -= len(found.suspect)
        for region in found.suspect:
            if region in again.rot:
                found.rot.add(region)
                found.errors[region] = again.errors.get(region, "the replica's bytes fail its own digest")
            elif region in again.pending:
                found.pending.add(region)
            elif region in again.suspect:
                digest, pending = before[region]
                if pending or volume.manifest.stored(region) != digest:
                    found.pending.add(region)
                else:
                    found.divergent.add(region)
            else:
                found.equal += 1
            found.compared += 1
        found.bytes_read += again.bytes_read
        found.regions_read += again.regions_read
        found.suspect.clear()


def _report(found: Findings) -> dict[str, Any]:
    differ = ([{"first": a, "count": n, "reason": "replica-rot"} for a, n in to_runs(found.rot)]
              + [{"first": a, "count": n, "reason": "divergent"} for a, n in to_runs(found.divergent)])
    differ.sort(key=lambda d: d["first"])
    return {"replica_rot": _runs(found.rot), "divergent": _runs(found.divergent), "pending": _runs(found.pending),
            "differ": differ, "differ_count": len(found.rot) + len(found.divergent),
            "pending_count": len(found.pending),
            "errors": {str(k): v for k, v in sorted(found.errors.items()) if k in found.rot}}


def _result(found: Findings) -> str:
    if found.rot or found.divergent:
        return "differ"
    return "pending" if found.pending else "equal"


# -- the operation -----------------------------------------------------------------------------


def verify(engine: VerifyPort, regions: str | None = None, repair: bool = False, rate: int | None = None,
           restart: bool = False, timeout: float = 300.0, client: Any = None, cursor: bool = True,
           progress_start: Callable[[int], None] | None = None,
           progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Verify the replica of ``engine``'s volume (``regions``: a run list such as ``3,10-12``;
    default every region); ``repair``: ship what differs again and verify it once more;
    ``cursor`` False: neither resume nor save a cursor (nothing is written: check mode)."""
    record, geometry = engine.record, engine.geometry
    if record.peer is None:
        raise UsageError(f"volume {engine.name} has no peer: run drtool protect first")
    target = parse_runs(regions, geometry) if regions is not None else [(0, geometry.count)]
    overlay = modes.in_recovery(record)
    path = cursor_path(engine)
    saved = None if restart or not cursor else load_cursor(path)
    wanted = [list(run) for run in target]
    resumed = bool(saved and not saved.get("finished") and saved.get("target") == wanted
                   and saved.get("overlay") == overlay and saved.get("next") is not None)
    started = time.time()
    if resumed:
        assert saved is not None
        found, position, started = Findings.of(saved["found"]), int(saved["next"]), float(saved["started"])
    else:
        found, position = Findings(), 0
    own_client = client is None
    client = client or make_client(record.peer)
    clock = time.monotonic()
    try:
        walker = _Walker(engine, client, overlay, rate, progress)
        if progress_start:
            progress_start(sum(geometry.run_bounds(a, n)[1] for a, n in target))
            if progress and position:
                done = sum(geometry.run_bounds(lo, hi - lo)[1] for lo, hi in _clip(target, 0, position))
                if done:
                    progress(done)
        last_save = 0.0
        reached: int | None = position

        def checkpoint(following: int | None, finished: bool = False, now: bool = False) -> None:
            nonlocal last_save, reached
            reached = following
            if not cursor:
                return
            if finished or now or time.monotonic() - last_save >= SAVE_EVERY:
                save_cursor(path, {"target": wanted, "overlay": overlay, "next": following, "started": started,
                                   "finished": finished, "found": found.to_json(), "saved": time.time()})
                last_save = time.monotonic()

        try:
            walker.walk(target, position, found, on_batch=checkpoint)
        except BaseException:
            if reached is not None:
                checkpoint(reached, now=True)  # the next verify resumes here
            raise
        walker.settle(found)
        result: dict[str, Any] = {
            "volume": engine.name, "peer": record.peer.get("url"), "source": "overlay" if overlay else "mirror",
            "region_size": geometry.region_size, "regions": wanted, "regions_total": sum(n for _, n in target),
            "resumed": resumed,
            "regions_compared": found.compared, "regions_equal": found.equal, "bytes_read": found.bytes_read,
            "regions_read": found.regions_read, "rate": rate, **_report(found), "repair": None,
        }
        checkpoint(None, finished=True)
        final = found
        if repair:
            result["repair"], final = _repair(engine, walker, found, timeout)
        result["result"] = _result(final)
        result["in_sync"] = result["result"] == "equal"
        result["seconds"] = round(time.monotonic() - clock, 3)
        return result
    finally:
        if own_client:
            client.close()


def _repair(engine: VerifyPort, walker: _Walker, found: Findings, timeout: float) -> tuple[dict[str, Any], Findings]:
    todo = sorted(found.rot | found.divergent)
    relogged, unrepairable = [], []
    for region in todo:
        (relogged if engine.relog_region(region) is not None else unrepairable).append(region)
    replicator = engine.replicator
    if replicator is None:
        raise UsageError(f"volume {engine.name} has no replicator: run drtool protect first")
    if relogged:
        replicator.force(relogged)
    if found.pending or engine.volume.unreplicated.any():
        replicator.wait_caught_up(timeout)
    again = Findings()
    checked = to_runs(set(todo) | found.pending)
    if checked:
        walker.progress = None
        walker.walk(checked, 0, again)
        walker.settle(again)
    return {"relogged": _runs(relogged), "unrepairable": _runs(unrepairable),
            "regions_checked": sum(n for _, n in checked), "after": _report(again),
            "result": _result(again)}, again
