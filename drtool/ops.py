"""Operations on an open engine.  One implementation, two callers: drtool.api opens the
engine itself when no agent runs; the agent calls the same functions on the engine it
already holds, on behalf of its control socket.  Every function returns JSON-able data.

:data:`OPERATIONS` is the one registry both callers use: an operation's name, how it runs
from the arguments api sends (the same dict crosses the control socket), and whether it only
looks.  A new operation is registered there, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from drtool import detect, replication, roles
from drtool import failback as failback_mod
from drtool.engine import Engine
from drtool.errors import UsageError
from drtool.progress import NoProgress, Progress
from drtool.regions import from_runs, parse_runs
from drtool.status import finish as finish_status
from drtool.status import volume_status
from drtool.units import parse_rate
from drtool.storage.paths import validate_name


def parse_source(source: str | None) -> str:
    source = source or "mirror"
    if source in ("mirror", "journal"):
        return source
    if source.startswith("snapshot:"):
        validate_name(source.split(":", 1)[1], "snapshot name")
        return source
    raise UsageError(f"--source {source!r} is not mirror, journal or snapshot:NAME")


def status(engine: Engine, probe_peer: bool = True) -> dict[str, Any]:
    lag = replication.lag_of(engine)
    result = volume_status(engine.volume, lag=lag, probe_peer=probe_peer)
    replicator = engine.replicator
    if replicator is not None and result.get("peer"):
        if replicator.reachable is not None:
            result["peer"]["reachable"] = replicator.reachable
            result["peer"]["error"] = replicator.last_error
        result["peer"]["last_ack"] = replicator.last_ack
    result["read_only"] = engine.read_only_reason
    return finish_status(result)  # protection and action again, now that the agent said what it knows


def scrub(engine: Engine, progress: Progress | None = None, record: bool = True) -> dict[str, Any]:
    progress = progress or NoProgress()
    progress.start(engine.geometry.size, f"scrubbing {engine.name}")
    try:
        return engine.scrub(progress.advance, record=record).to_json()
    finally:
        progress.finish()


def scan(engine: Engine, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or NoProgress()
    progress.start(engine.geometry.size, f"scanning {engine.name}")
    try:
        return detect.scan(engine.volume, progress.advance).to_json()
    finally:
        progress.finish()


def configure(engine: Engine, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    changed = engine.configure(changes or {})
    return {"volume": engine.name, "changed": changed, "settings": engine.settings}


def checkpoint(engine: Engine) -> dict[str, Any]:
    return {"volume": engine.name, "era": engine.checkpoint()}


def write(engine: Engine, offset: int, data: bytes, sync: bool = False) -> dict[str, Any]:
    engine.write(offset, data, fua=sync)
    return {"volume": engine.name, "offset": offset, "length": len(data), "synced": sync,
            "last_seq": engine.log.next_seq - 1, "mode": engine.mode}


def read(engine: Engine, offset: int, length: int) -> bytes:
    return bytes(engine.read(offset, length))


def replicate(engine: Engine, wait: bool = False, regions: str | None = None,
              timeout: float = 300.0, group: bool = False) -> dict[str, Any]:
    """``group``: the whole consistency group of this volume (its group replicator ships)."""
    replicator = engine.replicator
    if replicator is None:
        raise UsageError(f"volume {engine.name} has no peer: run drtool protect first")
    if group:
        if replicator.group is None:
            raise UsageError(f"volume {engine.name} does not replicate with a group here (is every member "
                             "protected, with one peer, and served by this agent?)")
        return replicate_group(replicator.group, wait, timeout)
    before = (replicator.shipped_records, replicator.shipped_bytes)
    forced: list[list[int]] = []
    if regions:
        runs = parse_runs(regions, engine.geometry)
        replicator.force(list(from_runs(runs)))
        forced = [list(run) for run in runs]
    elif wait:
        replicator.wait_caught_up(timeout)
    else:
        replicator.ship()
    return {"volume": engine.name, "records_shipped": replicator.shipped_records - before[0],
            "bytes_shipped": replicator.shipped_bytes - before[1], "forced_regions": forced,
            "lag": replication.lag_of(engine)}


def replicate_group(group: Any, wait: bool = False, timeout: float = 300.0) -> dict[str, Any]:
    """Ship a group's pending records in whole transactions (drtool.group_replication)."""
    before = {m: (r.shipped_records, r.shipped_bytes) for m, r in group.replicators.items()}
    txns = group.shipped_txns
    if wait:
        group.wait_caught_up(timeout)
    else:
        group.ship()
    consistent, reason = group.consistency()
    return {"members": {m: {"records_shipped": r.shipped_records - before[m][0],
                            "bytes_shipped": r.shipped_bytes - before[m][1],
                            "lag": replication.lag_of(group.engines[m])} for m, r in group.replicators.items()},
            "transactions": group.shipped_txns - txns, "consistent": consistent, "reason": reason}


def protect(engine: Engine, peer: str, token_file: str | None = None, ca: str | None = None,
            progress: Progress | None = None, plan_only: bool = False, insecure: bool = False) -> dict[str, Any]:
    progress = progress or NoProgress()
    started = False

    def on_plan(plan: dict[str, Any]) -> None:
        nonlocal started
        if not plan_only:
            label = {"incremental": "fast failback", "resume": "resumed sync"}.get(plan["mode"], "initial sync")
            progress.start(plan["bytes"], f"{label} of {engine.name}: {plan['regions']} regions")
            started = True

    try:
        return replication.protect(engine, peer, token_file, ca, progress=progress.advance,
                                   on_plan=on_plan, plan_only=plan_only, insecure=insecure)
    finally:
        if started:
            progress.finish()


def demote(engine: Engine, timeout: float = 60.0, force: bool = False) -> dict[str, Any]:
    return roles.demote(engine, timeout=timeout, force=force)


def recover(engine: Engine, local_era: int | None = None, source: str | None = None,
            accept_rollback: bool = False) -> dict[str, Any]:
    source = parse_source(source)
    changed = engine.enter_degraded("operator ran recover", local_era=local_era, source=source,
                                    accept_rollback=accept_rollback)
    return {"volume": engine.name, "changed": changed, "mode": engine.mode,
            "recovery": engine.record.recovery.to_json() if engine.record.recovery else None, "bad_count": engine.volume.bad.popcount(),
            "requested_count": engine.requested_regions().popcount(),
            "lost_regions": [list(r) for r in engine.settle_lost().runs()]}


@contextmanager
def _started_when_sized(progress: Progress, title: str) -> Iterator[Callable[[int], None]]:
    """A ``progress_start(total)`` for work that learns its size only once it begins; the bar
    is finished (cleared) when the block ends, whether the work succeeded or not."""
    started = False

    def start(total: int) -> None:
        nonlocal started
        started = True
        progress.start(total, title)

    try:
        yield start
    finally:
        if started:
            progress.finish()


def failback(engine: Engine, device: str | None = None, rate: int | str | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or NoProgress()
    with _started_when_sized(progress, f"failback of {engine.name}") as start:
        return failback_mod.failback(engine, device=device, rate=parse_rate(rate),
                                     progress_start=start, progress=progress.advance)


def verify(engine: Engine, regions: str | None = None, repair: bool = False, rate: int | str | None = None,
           restart: bool = False, timeout: float = 300.0, cursor: bool = True,
           progress: Progress | None = None) -> dict[str, Any]:
    """drtool verify: the replica re-reads and re-hashes its regions; compared here (drtool.verify)."""
    from drtool import verify as verify_mod

    progress = progress or NoProgress()
    with _started_when_sized(progress, f"verifying {engine.name}") as start:
        return verify_mod.verify(engine, regions=regions, repair=repair, rate=parse_rate(rate), restart=restart,
                                 timeout=timeout, cursor=cursor, progress_start=start, progress=progress.advance)


# -- the registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    """``run(engine, args, progress)``: the operation, from the arguments api sends (JSON, as
    they cross the agent's control socket).  ``look_only(args)``: it changes nothing, so a
    volume opened for it saves nothing when closed."""

    run: Callable[[Engine, dict[str, Any], Progress], Any]
    look_only: Callable[[dict[str, Any]], bool] = lambda args: False


def _bytes(value: Any) -> bytes:
    return bytes.fromhex(value) if isinstance(value, str) else bytes(value)


OPERATIONS: dict[str, Operation] = {
    "status": Operation(lambda e, a, p: status(e, probe_peer=bool(a.get("probe_peer", True))),
                        lambda a: True),
    "read": Operation(lambda e, a, p: read(e, int(a["offset"]), int(a["length"]))),
    "write": Operation(lambda e, a, p: write(e, int(a["offset"]), _bytes(a["data"]), bool(a.get("sync")))),
    "scrub": Operation(lambda e, a, p: scrub(e, p, record=bool(a.get("record", True))),
                       lambda a: not a.get("record", True)),
    "scan": Operation(lambda e, a, p: scan(e, p)),
    "checkpoint": Operation(lambda e, a, p: checkpoint(e)),
    "configure": Operation(lambda e, a, p: configure(e, a.get("changes")), lambda a: not a.get("changes")),
    "replicate": Operation(lambda e, a, p: replicate(e, **a)),
    "protect": Operation(lambda e, a, p: protect(e, progress=p, **a), lambda a: bool(a.get("plan_only"))),
    "recover": Operation(lambda e, a, p: recover(e, **a)),
    "failback": Operation(lambda e, a, p: failback(e, progress=p, **a)),
    "verify": Operation(lambda e, a, p: verify(e, progress=p, **a), lambda a: not a.get("repair")),
    "demote": Operation(lambda e, a, p: demote(e, **a)),
}


def operation(op: str) -> Operation:
    """The registered operation ``op`` (UsageError for any other name)."""
    found = OPERATIONS.get(op) if isinstance(op, str) else None
    if found is None:
        raise UsageError(f"unknown operation {op!r} (known: {', '.join(sorted(OPERATIONS))})")
    return found


def run(engine: Engine, op: str, args: dict[str, Any] | None = None, progress: Progress | None = None) -> Any:
    """Run the registered operation ``op`` on ``engine``: what api does without an agent and the
    agent does for its control socket."""
    return operation(op).run(engine, dict(args or {}), progress or NoProgress())
