"""drtool's public Python API: what the CLI and the Ansible modules call.

Every function takes the state root (None: ``$DRTOOL_STATE_ROOT`` or
/var/lib/drtool), does one operation, and returns plain data or a report
object with ``to_json()``.  Errors are raised from :mod:`drtool.errors`.
"""

from __future__ import annotations

from typing import Any

from drtool import detect, replication
from drtool import failback as failback_mod
from drtool.errors import UsageError
from drtool.engine import Engine
from drtool.progress import NoProgress, Progress
from drtool.regions import DEFAULT_REGION_SIZE, from_runs, parse_runs, to_runs
from drtool.units import parse_rate
from drtool.status import volume_status
from drtool.storage.paths import list_volumes, state_root, validate_name
from drtool.storage.volume import Volume


def init_volume(
    name: str, device: str, region_size: int | str = DEFAULT_REGION_SIZE,
    force: bool = False, root: str | None = None, progress: Progress | None = None,
) -> dict[str, Any]:
    """Register a volume and digest every region of its device."""
    progress = progress or NoProgress()
    root = state_root(root)
    volume = Volume.create(root, name, device, region_size, force=force)
    try:
        progress.start(volume.geometry.size, f"digesting {name}")
        try:
            detect.digest_new_volume(volume, progress.advance)
        except BaseException:
            # A half-registered volume must not look registered.
            import shutil
            shutil.rmtree(volume.paths.dir, ignore_errors=True)
            raise
        finally:
            progress.finish()
        return {
            "volume": name, "device": volume.record.device, "size": volume.record.size,
            "region_size": volume.record.region_size, "regions_total": volume.geometry.count,
            "era": volume.record.era, "state_dir": volume.paths.dir, "changed": True,
        }
    finally:
        volume.close()


def scrub_volume(name: str, root: str | None = None, progress: Progress | None = None) -> detect.ScrubReport:
    progress = progress or NoProgress()
    with Engine.open(root, name) as engine:
        progress.start(engine.geometry.size, f"scrubbing {name}")
        try:
            return detect.scrub(engine.volume, progress.advance)
        finally:
            progress.finish()


def scan_volume(name: str, root: str | None = None, progress: Progress | None = None) -> detect.ScanReport:
    progress = progress or NoProgress()
    with Engine.open(root, name) as engine:
        progress.start(engine.geometry.size, f"scanning {name}")
        try:
            return detect.scan(engine.volume, progress.advance)
        finally:
            progress.finish()


def checkpoint(name: str, root: str | None = None) -> dict[str, Any]:
    with Engine.open(root, name) as engine:
        return {"volume": name, "era": engine.checkpoint()}


def protect(name: str, peer: str, token_file: str | None = None, ca: str | None = None,
            root: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Pair a volume with its replica and run (or resume) the initial full sync."""
    progress = progress or NoProgress()
    with Engine.open(root, name) as engine:
        progress.start(engine.volume.norecord.popcount() * engine.geometry.region_size or engine.geometry.size,
                       f"initial sync of {name}")
        try:
            return replication.protect(engine, peer, token_file, ca, progress=progress.advance)
        finally:
            progress.finish()


def write(name: str, offset: int, data: bytes, sync: bool = False, root: str | None = None) -> dict[str, Any]:
    """Write through drtool: logged, applied, digested, marked for replication."""
    with Engine.open(root, name) as engine:
        engine.write(offset, data, fua=sync)
        return {"volume": name, "offset": offset, "length": len(data), "synced": sync,
                "last_seq": engine.log.next_seq - 1, "mode": engine.mode}


def _engine(root: str | None, name: str) -> Engine:
    """Open a volume's engine, with a replicator attached when it has a peer."""
    engine = Engine.open(root, name)
    if engine.protected:
        replication.Replicator(engine)
    return engine


def parse_source(source: str | None) -> str:
    source = source or "mirror"
    if source in ("mirror", "journal"):
        return source
    if source.startswith("snapshot:"):
        validate_name(source.split(":", 1)[1], "snapshot name")
        return source
    raise UsageError(f"--source {source!r} is not mirror, journal or snapshot:NAME")


def recover(name: str, local_era: int | None = None, source: str | None = None,
            root: str | None = None) -> dict[str, Any]:
    """Enter degraded mode: create the overlay, redirect writes, merge reads.  Idempotent."""
    source = parse_source(source)
    with _engine(root, name) as engine:
        changed = engine.enter_degraded("operator ran recover", local_era=local_era, source=source)
        return {"volume": name, "changed": changed, "mode": engine.mode,
                "recovery": engine.record.recovery, "bad_count": engine.volume.bad.popcount(),
                "requested_count": engine.requested_regions().popcount(),
                "lost_regions": [list(r) for r in to_runs(engine.lost_regions())]}


def read(name: str, offset: int, length: int, root: str | None = None) -> bytes:
    """A merged, verified read (the bytes a block client would get)."""
    with _engine(root, name) as engine:
        return bytes(engine.read(offset, length))


def failback(name: str, device: str | None = None, rate: int | str | None = None,
             root: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Copy bad and overlay regions back into the (repaired or new) device; back to normal."""
    progress = progress or NoProgress()
    with _engine(root, name) as engine:
        started = False

        def start(total: int) -> None:
            nonlocal started
            started = True
            progress.start(total, f"failback of {name}")

        try:
            return failback_mod.failback(engine, device=device, rate=parse_rate(rate),
                                         progress_start=start, progress=progress.advance)
        finally:
            if started:
                progress.finish()


def replicate(name: str, wait: bool = False, regions: str | None = None, timeout: float = 300.0,
              root: str | None = None) -> dict[str, Any]:
    """Ship pending records (all, or force exactly the given regions' records)."""
    with _engine(root, name) as engine:
        replicator = engine.replicator
        if replicator is None:
            raise UsageError(f"volume {name} has no peer: run drtool protect first")
        forced: list[list[int]] = []
        if regions:
            runs = parse_runs(regions, engine.geometry)
            replicator.force(list(from_runs(runs)))
            forced = [list(run) for run in runs]
        elif wait:
            replicator.wait_caught_up(timeout)
        else:
            replicator.ship()
        return {"volume": name, "records_shipped": replicator.shipped_records,
                "bytes_shipped": replicator.shipped_bytes, "forced_regions": forced,
                "lag": replication.lag_of(engine)}


def status(name: str | None = None, root: str | None = None) -> list[dict[str, Any]]:
    """Status of one volume, or of every volume under the state root."""
    root = state_root(root)
    names = [validate_name(name)] if name else list_volumes(root)
    out = []
    for each in names:
        volume = Volume.inspect(root, each)
        out.append(volume_status(volume))
    return out
