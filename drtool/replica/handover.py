"""The secondary's side of a role swap: release, promote (merge and fence), rebase.

Planned failover: the primary drains replication and *releases* the volume at
its last sequence number; the secondary checks it holds exactly that much and
records it.  *Promote* then turns the replica into the primary's device: the
overlay replica (incident-time writes the mirror lacks) is merged into the
mirror and the volume is fenced, so this server never writes the image again.
Without a release, promote needs ``force`` (a takeover: the loss is the lag).

*Rebase* is for the other direction: a replica adopted on a former primary's
device gets records from the new primary, whose sequence numbers start over
after a point of its own.
"""

from __future__ import annotations

import time
from typing import Any

from drtool.errors import Conflict, NotPermitted
from drtool.regions import to_runs
from drtool.replica.applied import combined_watermark, latest
from drtool.replica.problems import RoleRefused
from drtool.replica.volume import ReplicaVolume

# What promote answers (and keeps in replica.json, with "at" and "merged").
PROMOTE_FIELDS = ("image", "size", "region_size", "volume_id", "applied_seq", "max_era", "released", "forced",
                  "last_record_at", "overlay_regions_merged", "at")
_COPY_CHUNK = 8 << 20


def release(volume: ReplicaVolume, era: int, seq: int) -> dict[str, Any]:
    """The primary hands the role over at ``seq``: every record up to it must be applied, none after."""
    with volume.lock.exclusive():
        volume.refuse_if_promoted("it can no longer be released (it is a primary volume now)")
        current = volume.meta.get("primary")
        if volume.state == "released":
            if (current["era"], current["seq"]) != (era, seq):
                raise Conflict(f"volume {volume.name} was already released at seq {current['seq']} "
                               f"(era {current['era']}), not at seq {seq} (era {era})")
        else:
            watermark, ahead = combined_watermark(volume.mirror.applied, volume.overlay.applied)
            if watermark < seq:
                raise Conflict(f"replica is at {watermark}, primary released at {seq}: records "
                               f"{watermark + 1}-{seq} were not applied here (drain replication first)")
            if watermark > seq or ahead:
                raise Conflict(f"replica is at {max(ahead, default=watermark)}, beyond the release point {seq}: "
                               "it applied records the primary does not count as sent")
            volume.meta["primary"] = {"state": "released", "era": era, "seq": seq, "at": time.time()}
            volume.save_meta()
    return volume.describe()


def cancel_release(volume: ReplicaVolume) -> dict[str, Any]:
    """The primary takes the role back (a failover abandoned before promote)."""
    with volume.lock.exclusive():
        volume.refuse_if_promoted("its release can no longer be cancelled")
        if volume.meta.get("primary") is not None:
            volume.meta["primary"] = None
            volume.save_meta()
    return volume.describe()


def promote(volume: ReplicaVolume, force: bool) -> dict[str, Any]:
    """Make the replica a primary volume: fence, merge the overlay replica, flush.  Idempotent.

    The fence is saved first, so no record can land between the merge and the
    fence, and a promote interrupted by a crash is finished by the next one.
    """
    with volume.lock.exclusive():
        info = volume.meta.get("promoted")
        if info is None:
            released = volume.meta.get("primary") if volume.state == "released" else None
            if released is None and not force:
                raise _still_claimed(volume)
            info = {"image": volume.image_path, "size": volume.geometry.size,
                    "region_size": volume.geometry.region_size, "volume_id": volume.volume_id,
                    "released": released, "forced": released is None, "at": time.time(), "merged": False}
            volume.meta["promoted"] = info
            volume.save_meta()
        if not info["merged"]:
            merged = _merge_overlay(volume)
            applied = volume.mirror.applied
            info.update(applied_seq=applied.watermark, max_era=applied.max_era,
                        last_record_at=applied.last_record_at, overlay_regions_merged=merged, merged=True)
            volume.save_meta()
        return {key: info[key] for key in PROMOTE_FIELDS}


def _still_claimed(volume: ReplicaVolume) -> RoleRefused:
    applied = volume.mirror.applied
    last = latest(applied, volume.overlay.applied)
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(last)) if last is not None else "never"
    watermark, _ = combined_watermark(applied, volume.overlay.applied)
    return RoleRefused(f"the primary still claims volume {volume.name}: last record applied at seq {watermark} "
                       f"({when}); use force for a takeover",
                       f"the primary still claims volume {volume.name}", "not-released")


def _merge_overlay(volume: ReplicaVolume) -> int:
    """Copy the overlay replica's regions and digests over the mirror's, durably; the overlay empties.

    Snapshots preserve the mirror's old bytes first, as for any record.  Every
    step can be redone: a crash before the overlay is emptied merges it again.
    """
    mirror, overlay = volume.mirror, volume.overlay
    assert mirror.image is not None and overlay.image is not None
    volume.checkpoint()  # no journal replay may ever write older records over the merged regions
    regions = overlay.table.present_regions()
    if regions:
        volume.snapshots.preserve(set(regions), mirror.image, mirror.table)
        for first, count in to_runs(regions):
            for start in range(first, first + count, _COPY_CHUNK // volume.geometry.region_size):
                end = min(first + count, start + _COPY_CHUNK // volume.geometry.region_size)
                offset, length = volume.geometry.run_bounds(start, end - start)
                mirror.image.pwrite(overlay.image.pread(length, offset), offset)
        for region in regions:
            if overlay.table.is_zero(region):  # keep the mirror sparse where the overlay holds zeros
                mirror.image.punch_hole(*volume.geometry.region_bounds(region))
        mirror.image.sync()  # before the digests: a large merge may write table pages before its save
        for region in regions:
            mirror.table.set(region, overlay.table.digest(region))
    mirror.applied.absorb(overlay.applied)
    mirror.table.save(mirror.applied.watermark)
    mirror.applied.save()
    volume.reset_overlay()
    return len(regions)


def rebase(volume: ReplicaVolume, seq: int) -> dict[str, Any]:
    """A new primary's sequence space starts after ``seq``: move the watermark there.  Idempotent.

    Only for an adopted replica (or a fresh, empty one) that has applied no
    record since; afterwards records up to ``seq`` are skipped, later ones applied.
    """
    with volume.lock.exclusive():
        volume.refuse_if_promoted("a primary volume has no sequence space to rebase")
        rebased = volume.meta.get("rebased")
        if rebased is None or rebased["seq"] != seq:
            _rebase(volume, seq)
    return volume.describe()


def _rebase(volume: ReplicaVolume, seq: int) -> None:
    mirror, overlay = volume.mirror.applied, volume.overlay.applied
    untouched = mirror.records == 0 and overlay.records == 0 and not volume.journal.records
    adopted = volume.meta.get("adopted")
    if adopted is None and not (untouched and mirror.watermark == 0 and not mirror.ahead):
        raise NotPermitted(f"replica {volume.name} was neither adopted nor is it empty: rebase is only for "
                           "an adopted replica before the new primary ships to it")
    if not untouched:
        raise Conflict(f"replica {volume.name} has applied records since it was adopted or rebased "
                       f"(watermark {mirror.watermark}); a rebase to {seq} would mix two sequence spaces")
    for applied in (mirror, overlay):
        applied.rebase(seq)
        applied.save()
    volume.journal.rebase(seq)
    if adopted is not None:
        adopted["divergent"] = []
    volume.meta["rebased"] = {"seq": seq, "at": time.time()}
    volume.save_meta()
