"""Role changes: planned failover, takeover, and the old primary becoming the secondary.

Planned failover of volume V from host A to host B::

    A: demote V          writes refused, replication drained to zero, role handed over (release)
    A: stop the agent;   adopt V --replica-url (A's own replica server now serves V from A's device)
    B: promote V         B's replica becomes a primary volume (same identity, a new era); agent
    B: protect V --peer A   fast failback: only regions written on B since the swap (and, after a
                            takeover, the regions A wrote but never shipped) travel back

Takeover is ``promote --force`` while A is unreachable; when A returns, ``demote --force``
counts exactly what A wrote that B never applied (the loss) and marks those regions divergent,
so the reverse sync overwrites them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from drtool.engine.lag import bitmap_bytes
from drtool.errors import Conflict, DrtoolError, NotPermitted, PeerError
from drtool.peer import make_client
from drtool.ports import RolePort
from drtool.storage.atomic import write_atomic
from drtool.storage.maps import RegionBitmap
from drtool.storage.paths import state_root
from drtool.storage.records import Adopted, Demoted, Loss, Promoted
from drtool.storage.volume import Volume
from drtool.wire import encode_manifest_entries

log = logging.getLogger("drtool.roles")


# -- the old primary ------------------------------------------------------------------


def demote(engine: RolePort, timeout: float = 60.0, force: bool = False) -> dict[str, Any]:
    """Stop writes, drain replication, hand the role to the secondary.  Idempotent.

    ``force``: the secondary has already taken over (it is fenced); nothing is drained,
    and what this host wrote beyond the secondary's last applied record is reported lost.
    """
    record = engine.record
    if record.role == "secondary":
        return {"volume": engine.name, "changed": False, "role": "secondary", "demoted": record.demoted.to_json() if record.demoted else None}
    if not engine.protected:
        raise NotPermitted(f"volume {engine.name} has no secondary to hand over to")
    previous = engine.refuse_writes("being demoted: writes are refused")
    client = make_client(record.peer)
    try:
        if force:
            lost, divergent = _takeover_loss(engine, client)
        else:
            try:
                engine.replicator.wait_caught_up(timeout)
            except DrtoolError as exc:
                # Whatever stopped the drain, nothing changed: say so in the same breath.
                exc.message = f"{exc.message}; volume {engine.name} was not demoted and accepts writes again"
                exc.args = (exc.message,)
                raise
            engine.sync_all()
            acked = record.replication.acked_through
            if acked is None:
                acked = engine.log.next_seq - 1
            _release(client, engine.name, record.era, acked)
            lost = Loss(records=0, bytes=0, regions=0)
            divergent = _stale_on_device(engine)
    except BaseException:
        engine.refuse_writes(previous)
        raise
    engine.become_secondary(Demoted(time=time.time(), era=record.era, seq=engine.log.next_seq - 1,
                                    peer=record.peer["url"], forced=force, lost=lost,
                                    divergent=[list(r) for r in divergent.runs()]))
    log.warning("volume %s: demoted (%s); lost %s", engine.name, "forced" if force else "planned", lost)
    return {"volume": engine.name, "changed": True, "role": "secondary", "demoted": record.demoted.to_json()}


def _release(client: Any, name: str, era: int, seq: int) -> None:
    """Hand over at ``seq``.  Forced batches (sent out of order) do not move the secondary's
    watermark; an empty in-order batch that declares everything through ``seq`` complete does."""
    try:
        client.release(name, era, seq)
    except Conflict:
        client.send_records(name, [], complete_through=seq)
        client.release(name, era, seq)


def _stale_on_device(engine: RolePort) -> RegionBitmap:
    """Regions whose device bytes are not the volume's (bad, or living in the overlay)."""
    stale = engine.volume.bad.copy()
    stale.set_runs(engine.volume.overlay.runs())
    return stale


def _takeover_loss(engine: RolePort, client: Any) -> tuple[Loss, RegionBitmap]:
    """What this host wrote that the new primary never applied: records, bytes, regions."""
    applied = None
    try:
        info = client.volume_info(engine.name)
        applied = (info.get("promoted") or {}).get("applied_seq", info.get("applied_seq"))
    except PeerError as exc:
        log.warning("volume %s: peer unreachable (%s); counting every pending write as lost", engine.name, exc)
    entries = [e for e in engine.log.pending() if applied is None or e.seq > applied]
    norecord = engine.volume.norecord
    regions = norecord.copy()
    regions.update(e.region for e in entries)
    lost_bytes = sum(e.header.length for e in entries) + bitmap_bytes(engine.geometry, norecord)
    lost = Loss(records=len(entries), bytes=lost_bytes, regions=regions.popcount(),
                exact=applied is not None, after_seq=applied)
    divergent = _stale_on_device(engine)
    divergent.set_runs(regions.runs())
    return lost, divergent


def adopt(root: str | None, name: str, replica_url: str, token_file: str | None,
          ca: str | None = None, insecure: bool = False) -> dict[str, Any]:
    """Let this host's replica server serve the demoted volume from its own device.

    This takes the volume's lock: with an agent running, drtool.api asks the agent instead,
    which runs :func:`adopt_volume` on the volume it holds and then lets go of it.  From now
    on the replica server writes the device as the new primary ships records.
    """
    with Volume.open(state_root(root), name) as volume:
        return adopt_volume(volume, replica_url, token_file, ca, insecure)


def adopt_volume(volume: Volume, replica_url: str, token_file: str | None, ca: str | None = None,
                 insecure: bool = False) -> dict[str, Any]:
    """:func:`adopt` on a volume whose lock the caller holds (opened here, or by the agent)."""
    name = volume.name
    record = volume.record
    if record.role != "secondary" or not record.demoted:
        raise NotPermitted(f"volume {name} is a primary here: demote it first")
    adopted = record.demoted.adopted
    if adopted and adopted.url == replica_url:
        return {"volume": name, "changed": False, "adopted": adopted.to_json()}
    manifest = volume.paths.file("adopt-manifest.bin")
    write_atomic(manifest, encode_manifest_entries(_manifest_entries(volume)))  # streamed
    client = make_client({"url": replica_url, "token_file": token_file, "ca": ca, "insecure": insecure})
    demoted = record.demoted
    result = client.adopt(name, image=os.path.abspath(record.device), manifest=manifest,
                          size=record.size, region_size=record.region_size, volume_id=record.volume_id,
                          applied_seq=demoted.seq, era=demoted.era,
                          divergent=demoted.divergent, lost=demoted.lost.to_json())
    demoted.adopted = Adopted(url=replica_url, time=time.time())
    volume.save_record()
    return {"volume": name, "changed": True, "adopted": demoted.adopted.to_json(), "replica": result}


# -- the new primary ----------------------------------------------------------------------


def promote(root: str | None, name: str, replica_url: str, token_file: str | None,
            ca: str | None = None, force: bool = False, insecure: bool = False) -> dict[str, Any]:
    """Turn this host's replica of ``name`` into a primary volume.  Idempotent.

    Refused while the old primary still claims the role, unless ``force`` (takeover).
    """
    root = state_root(root)
    try:
        current = Volume.inspect(root, name)
    except Exception:
        current = None
    if current is not None and current.record.role == "primary":
        if current.record.promoted:
            return {"volume": name, "changed": False, "role": "primary",
                    "promoted": current.record.promoted.to_json()}
        raise NotPermitted(f"volume {name} is already a primary on this host")
    client = make_client({"url": replica_url, "token_file": token_file, "ca": ca, "insecure": insecure})
    info = client.promote(name, force=force)
    era = int(info.get("max_era") or 0) + 1
    volume = Volume.create(root, name, info["image"], info["region_size"], force=True,
                           size=info["size"], volume_id=info["volume_id"])
    try:
        _load_manifest(volume, client.manifest(name, volume.geometry.count))
        # Every region's era stays 0 ("before this host's first era"): only regions written
        # here from now on are "changed since" the promotion, and an older local copy cannot
        # predate the first era this host knows (drtool.engine refuses such a --local-era).
        record = volume.record
        applied = int(info["applied_seq"])
        record.era = era
        record.eras[0].era = era
        record.eras[0].seq = applied + 1
        takeover = not info.get("released")
        record.promoted = Promoted(
            time=time.time(), era=era, applied_seq=applied, forced=bool(force), takeover=takeover,
            released=info.get("released"), last_record_at=info.get("last_record_at"), lost=None,
            overlay_regions_merged=info.get("overlay_regions_merged", 0))
        record.history.append({"event": "promoted", "time": time.time(), "takeover": takeover})
        # The new primary's log continues after the last sequence it applied.
        volume.save_all(seq=applied)
        return {"volume": name, "changed": True, "role": "primary", "device": info["image"],
                "promoted": record.promoted.to_json()}
    finally:
        volume.close()


def _manifest_entries(volume: Volume) -> Iterator[tuple[int, bytes]]:
    """(region, digest) of every region that is not all zeros: what the replica server adopts."""
    manifest = volume.manifest
    for region in manifest.nonzero_between(0, volume.geometry.count):
        yield region, manifest.stored(region)


def _load_manifest(volume: Volume, entries: Iterator[tuple[int, bytes]]) -> None:
    """The replica's digests become the new volume's manifest (regions without an entry are
    all zeros: the default, nothing to write); committed as it grows, so memory stays bounded."""
    manifest = volume.manifest
    for region, digest in entries:
        manifest[region] = digest
        if volume.dirty_bytes > (64 << 20):
            volume.commit()
