"""The status of a volume as plain data: the stable JSON schema behind ``drtool status``.

Schema ``drtool.status/1`` (documented in docs/status.md).  Renderers
(report.py, the Ansible status playbook) read only this dict.
"""

from __future__ import annotations

import os
import time
from typing import Any

from drtool.engine.core import effective_settings
from drtool.engine.lag import Pending, lag as lag_of
from drtool.regions import runs_total
from drtool.storage.lock import is_locked
from drtool.storage.records import SubRecord
from drtool.storage.volume import Volume

SCHEMA = "drtool.status/1"


def peer_status(peer: dict[str, Any] | None, probe: bool = True) -> dict[str, Any] | None:
    if not peer:
        return None
    out: dict[str, Any] = {"url": peer["url"], "reachable": None, "error": None,
                           "token_file": peer.get("token_file"), "ca": peer.get("ca")}
    if peer.get("insecure"):
        # Paired with --insecure: the token and the volume's bytes cross the network in clear.
        out["insecure"] = True
        out["warning"] = "the replica link is not encrypted (paired with --insecure): use https"
    if probe:
        from drtool.client import ReplicaClient
        from drtool.errors import DrtoolError

        try:
            ReplicaClient(peer["url"], token_file=peer.get("token_file"), ca=peer.get("ca"),
                          insecure=bool(peer.get("insecure")),
                          timeout=(1.0, 2.0), retries=0).health()
            out["reachable"] = True
        except DrtoolError as exc:
            out["reachable"] = False
            out["error"] = str(exc)
    return out


def volume_status(volume: Volume, lag: dict[str, Any] | None = None, probe_peer: bool = True) -> dict[str, Any]:
    """The status object; ``lag`` (drtool.engine.lag) from a running engine, else read from disk."""
    record = volume.record
    geometry = volume.geometry
    bad = volume.bad.runs()
    lost = volume.lost_regions().runs()
    overlay = volume.overlay.runs()
    bad_bytes = sum(geometry.run_bounds(a, n)[1] for a, n in bad)
    holder = is_locked(volume.paths.dir)
    if lag is None:
        lag = lag_of(volume, Pending.on_disk(volume))
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
        "faulted": _json(record.faulted),
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
        "peer": peer_status(volume.record.peer, probe_peer),
        "lag": lag,
        "replication": record.replication.to_json(),
        "direction": direction(volume.record),
        "last_swap": last_swap(volume.record),
        "promoted": _json(record.promoted),
        "demoted": _json(record.demoted),
        "recovery": _json(record.recovery),
        "failback": _json(record.failback),
        "settings": effective_settings(volume.record.settings),
    }


def direction(record: Any) -> str:
    peer = (record.peer or {}).get("url")
    if record.role == "secondary":
        adopted = record.demoted.adopted if record.demoted else None
        source = record.demoted.peer if record.demoted else "the primary"
        return f"{source} -> this host" + (f" (replica served by {adopted.url})" if adopted else
                                            " (not serving yet: run drtool adopt)")
    return f"this host -> {peer}" if peer else "not replicated"


def last_swap(record: Any) -> dict[str, Any] | None:
    events = []
    promoted, demoted = record.promoted, record.demoted
    if promoted:
        events.append({"event": "takeover" if promoted.takeover else "promoted", "time": promoted.time,
                       "seq": promoted.applied_seq, "lost": _json(promoted.lost)})
    if demoted:
        events.append({"event": "demoted (forced)" if demoted.forced else "demoted", "time": demoted.time,
                       "seq": demoted.seq, "lost": demoted.lost.to_json()})
    return max(events, key=lambda e: e["time"]) if events else None


def _json(sub: SubRecord | None) -> dict[str, Any] | None:
    return sub.to_json() if sub is not None else None


def summary_row(status: dict[str, Any]) -> dict[str, Any]:
    keys = ("volume", "health", "mode", "role", "size", "bad_count", "lost_count", "era", "device")
    return {key: status.get(key) for key in keys}
