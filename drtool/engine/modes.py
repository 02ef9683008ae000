"""The mode machine: the only place a volume's mode changes, and what each change does to its record.

::

    normal --(recover, or a bad region seen while serving)--> degraded
    degraded --(failback starts)--> resync
    resync --(failback copied everything)--> normal

| transition          | record                                                                |
|---------------------|-----------------------------------------------------------------------|
| normal -> degraded  | ``recovery`` set (reason, source, local era, the incident's era); history "degraded" |
| degraded -> resync  | ``failback`` set (device, regions to copy); history "failback"        |
| resync -> normal    | ``failback.finished`` stamped, ``recovery`` and ``faulted`` cleared; history "normal" |

Any other change is refused with :class:`NotPermitted` naming the two modes.  What the
engine does around a transition (create or drop the overlay, start an era, mark the regions
to copy, save) is in :mod:`drtool.engine.core`, which calls these functions; the rest of the
code asks the questions below instead of comparing mode strings.
"""

from __future__ import annotations

import time

from drtool.errors import NotPermitted
from drtool.storage.record import VolumeRecord
from drtool.storage.records import Failback, Recovery

NORMAL, DEGRADED, RESYNC = "normal", "degraded", "resync"

#: The allowed transitions, and why each one happens.
TRANSITIONS: dict[tuple[str, str], str] = {
    (NORMAL, DEGRADED): "recover, or a bad region seen while serving",
    (DEGRADED, RESYNC): "failback starts",
    (RESYNC, NORMAL): "failback copied every region back",
}


def check(record: VolumeRecord, target: str) -> None:
    """Refuse a transition the machine does not have."""
    if (record.mode, target) not in TRANSITIONS:
        allowed = [to for (frm, to) in TRANSITIONS if frm == record.mode]
        raise NotPermitted(f"volume {record.name} cannot go from {record.mode} to {target} mode "
                           f"(from {record.mode} only to {', '.join(allowed)})")


def degrade(record: VolumeRecord, recovery: Recovery) -> None:
    """normal -> degraded."""
    _move(record, DEGRADED, {"reason": recovery.reason})
    record.recovery = recovery


def start_resync(record: VolumeRecord, failback: Failback) -> None:
    """degraded -> resync."""
    _move(record, RESYNC, {"device": failback.device})
    record.failback = failback


def finish_resync(record: VolumeRecord) -> None:
    """resync -> normal: the device holds every region again."""
    _move(record, NORMAL, {})
    if record.failback is not None:
        record.failback.finished = time.time()
    record.recovery = None
    record.faulted = None


def _move(record: VolumeRecord, target: str, event: dict[str, object]) -> None:
    check(record, target)
    record.mode = target
    record.history.append({"event": target if target != RESYNC else "failback", "time": time.time(), **event})


# -- questions ------------------------------------------------------------------------------


def is_normal(record: VolumeRecord) -> bool:
    """Writes go to the device, reads come from it; no overlay."""
    return record.mode == NORMAL


def in_recovery(record: VolumeRecord) -> bool:
    """Degraded or resync: an overlay exists, writes go to it, reads are merged."""
    return record.mode != NORMAL


def resyncing(record: VolumeRecord) -> bool:
    """Failback is copying regions back into the device."""
    return record.mode == RESYNC
