"""The status of a volume as plain data: the stable JSON schema behind ``drtool status``.

Schema ``drtool.status/1`` (documented in docs/status.md).  Renderers
(report.py, the Ansible status playbook) read only this dict.
"""

from __future__ import annotations

import os
import time
from typing import Any

from drtool.regions import runs_total
from drtool.storage.lock import is_locked
from drtool.storage.volume import Volume

SCHEMA = "drtool.status/1"


def volume_status(volume: Volume) -> dict[str, Any]:
    record = volume.record
    geometry = volume.geometry
    bad = volume.bad.runs()
    lost = volume.lost_regions().runs()
    overlay = volume.overlay.runs()
    bad_bytes = sum(geometry.run_bounds(a, n)[1] for a, n in bad)
    holder = is_locked(volume.paths.dir)
    agent_socket = volume.paths.control_socket
    return {
        "schema": SCHEMA,
        "volume": record.name,
        "device": record.device,
        "size": record.size,
        "region_size": record.region_size,
        "regions_total": geometry.count,
        "health": volume.health,
        "mode": record.mode,
        "role": record.role,
        "faulted": record.faulted,
        "bad_regions": [list(run) for run in bad],
        "bad_count": runs_total(bad),
        "bad_bytes": bad_bytes,
        "lost_regions": [list(run) for run in lost],
        "lost_count": runs_total(lost),
        "era": record.era,
        "era_started": record.eras[-1].started if record.eras else None,
        "last_scrub": record.last_scrub,
        "maps": {
            "bad": [list(run) for run in bad],
            "lost": [list(run) for run in lost],
            "overlay": [list(run) for run in overlay],
            "unreplicated": [list(run) for run in volume.unreplicated.runs()],
            "resync": [list(run) for run in volume.resync.runs()],
        },
        "overlay": {
            "regions": runs_total(overlay),
            "bytes": sum(geometry.run_bounds(a, n)[1] for a, n in overlay),
        },
        "state_dir": volume.paths.dir,
        "locked_by": holder,
        "agent": {"running": os.path.exists(agent_socket) and holder is not None, "socket": agent_socket},
        "generated": time.time(),
    }


def summary_row(status: dict[str, Any]) -> dict[str, Any]:
    keys = ("volume", "health", "mode", "role", "size", "bad_count", "lost_count", "era", "device")
    return {key: status.get(key) for key in keys}
