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
from drtool.storage.replog import ReplicationLog
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


def demote_group(group: str, engines: list[RolePort], timeout: float = 60.0,
                 force: bool = False) -> dict[str, Any]:
    """:func:`demote` for every member of a consistency group at once.  Idempotent.

    Writes are refused on every member before any is drained, so the point the secondary is
    drained to is one point of the whole group (no member takes a write after another stopped);
    then every member is drained, and only then is any released.  ``force``: each member's loss
    is counted as :func:`demote` counts it, and summed for the group.
    """
    active = [e for e in engines if e.record.role != "secondary"]
    unpaired = [e.name for e in active if not e.protected]
    if unpaired:
        raise NotPermitted(f"group {group}: {', '.join(unpaired)} has no secondary to hand over to")
    previous: list[tuple[RolePort, str | None]] = []
    handed: dict[str, tuple[Loss, RegionBitmap]] = {}
    released: list[str] = []
    clients: dict[str, Any] = {}
    try:
        for engine in active:
            previous.append((engine, engine.refuse_writes(f"being demoted with group {group}: writes are refused")))
        for engine in active:
            clients[engine.name] = make_client(engine.record.peer)
        if force:
            for engine in active:
                handed[engine.name] = _takeover_loss(engine, clients[engine.name])
        else:
            deadline = time.monotonic() + timeout
            for engine in active:
                engine.replicator.wait_caught_up(max(0.1, deadline - time.monotonic()))
            for engine in active:
                engine.sync_all()
            for engine in active:
                acked = engine.record.replication.acked_through
                _release(clients[engine.name], engine.name, engine.record.era,
                         engine.log.next_seq - 1 if acked is None else acked)
                released.append(engine.name)
                handed[engine.name] = (Loss(records=0, bytes=0, regions=0), _stale_on_device(engine))
    except DrtoolError as exc:
        if released:
            # Some members are released to the secondary already: taking writes again here
            # would split the group.  Writes stay refused until the demotion is run again.
            exc.message = (f"{exc.message}; group {group} was demoted only partly (released: "
                           f"{', '.join(released)}): writes stay refused, run drtool demote {group} again")
        else:
            for engine, reason in previous:
                engine.refuse_writes(reason)
            exc.message = f"{exc.message}; group {group} was not demoted and accepts writes again"
        exc.args = (exc.message,)
        raise
    except BaseException:
        if not released:
            for engine, reason in previous:
                engine.refuse_writes(reason)
        raise
    finally:
        for client in clients.values():
            client.close()
    members: dict[str, Any] = {}
    for engine in engines:
        record = engine.record
        if engine.name not in handed:
            members[engine.name] = {"volume": engine.name, "changed": False, "role": "secondary",
                                    "demoted": record.demoted.to_json() if record.demoted else None}
            continue
        lost, divergent = handed[engine.name]
        engine.become_secondary(Demoted(time=time.time(), era=record.era, seq=engine.log.next_seq - 1,
                                        peer=record.peer["url"], forced=force, lost=lost,
                                        divergent=[list(r) for r in divergent.runs()]))
        log.warning("volume %s: demoted with group %s (%s); lost %s", engine.name, group,
                    "forced" if force else "planned", lost)
        members[engine.name] = {"volume": engine.name, "changed": True, "role": "secondary",
                                "demoted": record.demoted.to_json()}
    return {"group": group, "changed": bool(handed), "role": "secondary", "members": members,
            "lost": group_loss(members)}


def group_loss(members: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A group's loss at a role swap: its members' losses summed (``exact`` only when every
    member's count is)."""
    losses = [((m.get("demoted") or {}).get("lost") or {}) for m in members.values()]
    out: dict[str, Any] = {key: sum(int(each.get(key) or 0) for each in losses)
                           for key in ("records", "bytes", "regions")}
    counted = [each.get("exact") for each in losses if "exact" in each]
    if counted:
        out["exact"] = all(counted)
    return out


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
        # The new primary's log continues after the last sequence it applied (log/start first:
        # maps that cover records the log never held would otherwise read as lost records).
        ReplicationLog.begin(volume.paths.log_dir, record.volume_id_bytes, volume.geometry, applied + 1)
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


# -- consistency groups ---------------------------------------------------------------------


def promote_group(root: str | None, group: str, replica_url: str, token_file: str | None,
                  ca: str | None = None, force: bool = False, insecure: bool = False) -> dict[str, Any]:
    """:func:`promote` every member of a consistency group, then define the group here (the
    same ``group_id`` and members), so that ``protect GROUP --peer`` replicates it as a group
    from this host.  Idempotent.

    The members come from the replica server (it keeps the group it applies transactions of),
    else from this host's own definition (a host that was the group's primary before).  Without
    ``force`` every member must have been released by the old primary before any is promoted,
    so a planned failover never leaves half the group promoted."""
    from drtool.storage.groups import GroupRecord, load_group, save_group
    from drtool.errors import GroupNotFound

    root = state_root(root)
    client = make_client({"url": replica_url, "token_file": token_file, "ca": ca, "insecure": insecure})
    try:
        local = None
        try:
            local = load_group(root, group)
        except GroupNotFound:
            pass
        served = server_group(client, group)
        if served is None and local is None:
            raise GroupNotFound(group, root)
        if served is not None and local is not None and served["group_id"] != local.group_id:
            raise Conflict(f"group {group} here (id {local.group_id}) is not the group the replica server "
                           f"keeps (id {served['group_id']}): drtool group delete {group} here first")
        group_id = served["group_id"] if served else local.group_id  # type: ignore[union-attr]
        members = list(served["members"]) if served else list(local.members)  # type: ignore[union-attr]
        if not force:
            claimed = []
            for member in members:
                if _is_primary_here(root, member):
                    continue
                state = client.volume_info(member).get("state")
                if state not in ("released", "promoted"):
                    claimed.append(member)
            if claimed:
                raise NotPermitted(f"the primary still claims {', '.join(claimed)} of group {group}: demote the "
                                   f"group there (drtool demote {group}), or take over with drtool promote "
                                   f"{group} --force if that site is lost")
    finally:
        client.close()
    results = {member: promote(root, member, replica_url, token_file, ca, force=force, insecure=insecure)
               for member in members}
    created = local.created if local is not None else time.time()
    if local is None or local.members != members:
        save_group(root, GroupRecord(group, group_id, members, created))
    promoted = [r.get("promoted") or {} for r in results.values()]
    return {"group": group, "group_id": group_id, "changed": any(r["changed"] for r in results.values()),
            "role": "primary", "members": results,
            "takeover": any(p.get("takeover") for p in promoted)}


def _is_primary_here(root: str, name: str) -> bool:
    try:
        with Volume.inspect(root, name) as volume:
            return volume.record.role == "primary" and volume.record.promoted is not None
    except DrtoolError:
        return False


def server_group(client: Any, group: str) -> dict[str, Any] | None:
    """What the replica server keeps of ``group`` (``GET /v1/groups/{group}``), None when it
    keeps no group of that name."""
    from drtool.errors import GroupNotFound, VolumeNotFound

    try:
        return client.group_info(group)
    except (GroupNotFound, VolumeNotFound):
        return None
