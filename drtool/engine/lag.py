"""The replication lag of a volume: the one place it is computed.

Two sources tell what the log holds: a running engine's log (in memory) and the log files
(status with no agent).  Both give a :class:`Pending`; :func:`lag` turns it and the volume's
maps into the ``lag`` object of ``status --json`` (docs/status.md), so an agent's status, a
status read from disk and ``replicate --json`` report the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from drtool.regions import Geometry
from drtool.storage.maps import RegionBitmap
from drtool.storage.replog import ReplicationLog, summarize
from drtool.storage.volume import Volume


@dataclass(frozen=True)
class Pending:
    """What the log holds that the secondary has not acknowledged."""

    records: int
    bytes: int  # of log records (headers included)
    oldest: float | None  # when the oldest of them was written (epoch seconds)
    damage: tuple[str, ...] = ()  # what the log lost and nobody has accounted for yet

    @classmethod
    def of_log(cls, log: ReplicationLog) -> Pending:
        oldest = log.oldest_entry()
        return cls(len(log.entries), log.pending_bytes, oldest.stamp if oldest else None, tuple(log.damage))

    @classmethod
    def on_disk(cls, volume: Volume) -> Pending:
        replication = volume.record.replication
        found = summarize(volume.paths.log_dir, after=replication.done_through(),
                          acked=frozenset(replication.acked_ahead))
        return cls(int(found["records"]), int(found["bytes"]), found["oldest"] or None,
                   tuple(found.get("damage") or ()))


NOT_APPLICABLE = "not applicable: this host is the secondary"


def lag(volume: Volume, pending: Pending, now: float | None = None) -> dict[str, Any]:
    """Pending records, bytes, regions, the oldest write's age and bitmap mode, with a summary."""
    if volume.record.role == "secondary":
        # A demoted volume ships nothing: what its old log holds was drained, or counted as lost.
        return {"records": 0, "bytes": 0, "regions": 0, "oldest_seconds": 0.0, "bitmap_mode": False,
                "bitmap_regions": 0, "summary": NOT_APPLICABLE}
    norecord = volume.norecord.popcount()
    since = volume.record.replication.bitmap_mode_since if norecord else None
    stamps = [t for t in (pending.oldest, since) if t]
    now = time.time() if now is None else now
    out = {
        "records": pending.records,
        "bytes": pending.bytes + bitmap_bytes(volume.geometry, volume.norecord),
        "regions": volume.unreplicated.popcount(),
        "oldest_seconds": round(now - min(stamps), 3) if stamps else 0.0,
        "bitmap_mode": norecord > 0,
        "bitmap_regions": norecord,
    }
    if pending.damage:
        out["log_damage"] = list(pending.damage)
    out["summary"] = summary(out)
    return out


def bitmap_bytes(geometry: Geometry, regions: RegionBitmap) -> int:
    """The bytes of the regions set in a bitmap, without a walk over them (every region is
    whole but perhaps the last)."""
    total = regions.popcount() * geometry.region_size
    last = geometry.count - 1
    if total and regions.test(last):
        total -= geometry.region_size - geometry.region_length(last)
    return total


def summary(lag: dict[str, Any]) -> str:
    if lag.get("log_damage"):
        return ("REPLICATION LOG DAMAGED: " + "; ".join(lag["log_damage"][:3])
                + " (opening the volume marks the affected regions to ship whole)")
    if not lag["regions"] and not lag["records"]:
        return "in sync"
    text = (f"{lag['records']} records, {lag['regions']} regions, {lag['bytes']} bytes pending, "
            f"oldest {lag['oldest_seconds']:.1f}s")
    if lag.get("bitmap_mode"):
        text += f"; BITMAP MODE (log overflowed): {lag['bitmap_regions']} regions to ship from the volume"
    return text


def group_lag(members: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A consistency group's lag, composed from its members' ``lag`` objects (as :func:`lag`
    made them): what waits is the sum of what waits on each member, and the group's recovery
    point is its oldest unacknowledged write, on whichever member it is.  Members that ship
    nothing (a secondary) add nothing."""
    shipping = {name: each for name, each in members.items()
                if each and each.get("summary") != NOT_APPLICABLE}
    out: dict[str, Any] = {
        "records": sum(int(each.get("records", 0)) for each in shipping.values()),
        "bytes": sum(int(each.get("bytes", 0)) for each in shipping.values()),
        "regions": sum(int(each.get("regions", 0)) for each in shipping.values()),
        "oldest_seconds": max((float(each.get("oldest_seconds") or 0.0) for each in shipping.values()),
                              default=0.0),
        "bitmap_mode": any(each.get("bitmap_mode") for each in shipping.values()),
        "bitmap_regions": sum(int(each.get("bitmap_regions", 0)) for each in shipping.values()),
    }
    oldest = max(shipping, key=lambda n: float(shipping[n].get("oldest_seconds") or 0.0), default=None)
    out["oldest_member"] = oldest if oldest is not None and out["oldest_seconds"] > 0 else None
    damage = [f"{name}: {text}" for name, each in shipping.items() for text in each.get("log_damage") or ()]
    if damage:
        out["log_damage"] = damage
    out["summary"] = summary(out) if shipping or not members else NOT_APPLICABLE
    return out
