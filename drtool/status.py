"""The status of a volume as plain data: the stable JSON schema behind ``drtool status``.

Schema ``drtool.status/1`` (documented in docs/status.md).  Renderers
(report.py, the Ansible status playbook) read only this dict.
"""

from __future__ import annotations

import json

import os
import time
from typing import Any

from drtool.engine.core import effective_settings
from drtool.engine.lag import Pending, group_lag, lag as lag_of
from drtool.errors import ExitCode, UsageError
from drtool.regions import format_runs, runs_total
from drtool.storage.device import probe as probe_device
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
    faulted = _json(record.faulted)
    if faulted is None:
        # Health is current: a cheap look at the device (there, the right size, readable
        # somewhere), not only what the last scrub recorded.
        found = probe_device(record.device, expected_size=geometry.size)
        if not found.ok:
            faulted = {"reason": f"{found.state}: {found.reason}", "since": None, "probe": found.state}
    # After a recovery from an older local copy (--local-era), the regions written since that
    # era are stale on the device: served from the replica, not healthy here.
    stale = volume.requested_regions().difference(volume.bad).runs() if record.recovery else []
    health = "FAULTED" if faulted else ("DEGRADED" if bad or stale else "ONLINE")
    rolled_back = (record.recovery.rolled_back if record.recovery else None) or []
    out = {
        "schema": SCHEMA,
        "volume": record.name,
        "group": _group_of(volume),
        "device": record.device,
        "size": record.size,
        "region_size": record.region_size,
        "regions_total": geometry.count,
        "health": health,
        "mode": record.mode,
        "role": record.role,
        "faulted": faulted,
        "bad_regions": [list(run) for run in bad],
        "bad_count": runs_total(bad),
        "bad_bytes": bad_bytes,
        "lost_regions": [list(run) for run in lost],
        "lost_count": runs_total(lost),
        "stale_regions": [list(run) for run in stale],
        "stale_count": runs_total(stale),
        # a recovery from a snapshot: the regions it took back to the snapshot's time
        "rolled_back_regions": [list(run) for run in rolled_back],
        "rolled_back_count": runs_total(rolled_back),
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
    return finish(out)


def _group_of(volume: Volume) -> str | None:
    """The consistency group the volume is in (storage.groups owns membership), or None; a
    damaged group file does not stop a volume's status (the group's own status reports it)."""
    from drtool.errors import DrtoolError
    from drtool.storage.groups import group_of

    try:
        return group_of(volume.paths.root, volume.record.name)
    except DrtoolError:
        return None


def finish(status: dict[str, Any]) -> dict[str, Any]:
    """Add what is derived from the rest: ``protection``, ``status``, ``action``, ``problems``
    and ``attention``.  Called again once a running agent filled in what it knows (peer)."""
    status["protection"], status["protection_reason"] = protection(status)
    problems = diagnose(status)
    status["problems"] = problems
    status["status"] = problems[0]["status"] if problems else None
    status["action"] = problems[0]["action"] if problems else None
    status["attention"] = any(p["attention"] for p in problems)
    return status


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


# -- what the operator needs to know, derived from the status object alone ----------------------

PROTECTION_STATES = ("PROTECTED", "LAGGING", "UNPROTECTED")
HEALTH_STATES = ("ONLINE", "DEGRADED", "FAULTED")


def protection(status: dict[str, Any]) -> tuple[str | None, str]:
    """``PROTECTED`` (the replica holds every acknowledged write), ``LAGGING`` (writes wait to
    be shipped, the peer is reachable or not probed), ``UNPROTECTED`` (no peer, the initial
    sync never finished, the peer is unreachable, the log overflowed into bitmap mode or is
    damaged); None on a secondary (a demoted volume protects nothing).  With the reason."""
    if status.get("role") == "secondary":
        return None, "this host holds the secondary copy"
    peer = status.get("peer")
    lag = status.get("lag") or {}
    replication = status.get("replication") or {}
    if not peer:
        return "UNPROTECTED", "no replica peer, never protected"
    if replication.get("initial_sync") != "done":
        return "UNPROTECTED", "the initial sync to the replica has not finished"
    if peer.get("reachable") is False:
        return "UNPROTECTED", f"the replica server is unreachable: {peer.get('error') or peer['url']}"
    if lag.get("log_damage"):
        return "UNPROTECTED", "the replication log is damaged"
    if lag.get("bitmap_mode"):
        return "UNPROTECTED", (f"bitmap mode: the replication log overflowed, {lag.get('bitmap_regions', 0)} "
                               "regions must ship whole from the volume")
    if lag.get("records") or lag.get("regions"):
        return "LAGGING", _lag_words(lag)
    return "PROTECTED", "the replica holds every acknowledged write"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _size(n: float) -> str:
    from drtool.units import format_bytes

    return format_bytes(n)


def _lag_words(lag: dict[str, Any]) -> str:
    text = (f"{_plural(lag.get('regions', 0), 'region')} ({_size(lag.get('bytes', 0))}) wait to be replicated")
    if lag.get("oldest_seconds"):
        text += f", the oldest write {lag['oldest_seconds']:.0f}s ago"
    return text


def _problem(status_line: str, action: str | None, attention: bool = True) -> dict[str, Any]:
    return {"status": status_line, "action": action, "attention": attention}


def diagnose(status: dict[str, Any]) -> list[dict[str, Any]]:
    """zpool-style: what is wrong, worst first, each in one sentence with the exact next command
    (``action``).  Empty when nothing needs doing."""
    name = status.get("volume", "NAME")
    problems: list[dict[str, Any]] = []
    mode = status.get("mode")
    peer = status.get("peer") or {}
    peer_url = peer.get("url")
    faulted = status.get("faulted")
    bad, lost, stale = status.get("bad_count", 0), status.get("lost_count", 0), status.get("stale_count", 0)
    if status.get("role") == "secondary":
        direction = status.get("direction") or ""
        if "not serving yet" in direction:
            problems.append(_problem("this host holds the demoted copy, which no replica server serves yet",
                                     f"drtool adopt {name} --replica-url URL"))
        return problems
    if faulted:
        device = status.get("device")
        what = f"the device {device} cannot be used ({faulted.get('reason')})"
        if mode == "degraded":
            problems.append(_problem(f"{what}; every region is served from the replica",
                                     f"replace the device, then drtool failback {name} --device NEW"))
        elif peer_url:
            problems.append(_problem(f"{what}; reads fail until the replica serves them",
                                     f"drtool recover {name}, then replace the device and "
                                     f"drtool failback {name} --device NEW"))
        else:
            problems.append(_problem(f"{what} and there is no replica",
                                     f"reattach or restore {device}, then drtool scrub {name}"))
    if lost:
        problems.append(_problem(f"{_plural(lost, 'region')} {'is' if lost == 1 else 'are'} lost (bad, never "
                                 "replicated): reads of them fail with EIO",
                                 f"restore them from a backup (drtool write {name} --offset N), "
                                 f"then drtool scrub {name}"))
    if not faulted and mode == "normal" and bad:
        if peer_url:
            problems.append(_problem(f"{_plural(bad, 'region')} {'is' if bad == 1 else 'are'} bad on the device",
                                     f"drtool recover {name}"))
        else:
            problems.append(_problem(f"{_plural(bad, 'region')} {'is' if bad == 1 else 'are'} bad on the device "
                                     "and there is no replica", f"restore them, then drtool scan {name}"))
    if not faulted and mode == "degraded":
        served = bad + stale
        if served:
            problems.append(_problem(f"{_plural(served, 'region')} {'is' if served == 1 else 'are'} served from "
                                     "the replica" + (f" ({stale} stale on the older local copy)" if stale else ""),
                                     f"repair or replace the device, then drtool failback {name} "
                                     f"(or --device NEW)"))
        else:
            problems.append(_problem("degraded mode: writes go to the overlay",
                                     f"drtool failback {name}"))
    rolled_back = status.get("rolled_back_count", 0)
    if rolled_back and mode in ("degraded", "resync"):
        source = (status.get("recovery") or {}).get("source", "a snapshot")
        problems.append(_problem(f"{_plural(rolled_back, 'region')} {'was' if rolled_back == 1 else 'were'} taken "
                                 f"back in time by the recovery from {source} "
                                 f"({format_runs(status.get('rolled_back_regions') or [], limit=20)}): data spanning them "
                                 "may be half old and half new", None))
    if mode == "resync":
        failback = status.get("failback") or {}
        done, total = failback.get("done_regions", 0), failback.get("total_regions", 0)
        running = (status.get("agent") or {}).get("running")
        problems.append(_problem(f"failback copies regions back onto the device: {done} of {total} done",
                                 None if running else f"drtool failback {name} (resumes it)", attention=not running))
    state, reason = status.get("protection"), status.get("protection_reason", "")
    # A member of a consistency group is protected and replicated with its group.
    replicated = status.get("group") or name
    if state == "UNPROTECTED":
        replication = status.get("replication") or {}
        lag = status.get("lag") or {}
        if not peer_url:
            action = f"drtool protect {replicated} --peer URL --token-file FILE"
        elif replication.get("initial_sync") != "done":
            action = f"drtool protect {replicated} --peer {peer_url} (resumes the sync)"
        elif peer.get("reachable") is False:
            action = f"start the replica server at {peer_url} (drtool serve) or fix the network, then drtool status {name}"
        elif lag.get("bitmap_mode") or lag.get("log_damage"):
            action = f"drtool replicate {replicated} --wait"
        else:
            action = None
        problems.append(_problem(f"the volume is not protected: {reason}", action))
    elif state == "LAGGING":
        running = (status.get("agent") or {}).get("running")
        problems.append(_problem(f"replication lags: {reason}",
                                 None if running else f"drtool replicate {replicated} --wait", attention=not running))
    if peer.get("insecure"):
        problems.append(_problem("the replica link is not encrypted (paired with --insecure)",
                                 f"drtool protect {replicated} --peer https://HOST:PORT --ca CA"))
    return problems


def needs_attention(status: dict[str, Any]) -> bool:
    """What ``drtool status -x`` shows: anything not ONLINE, PROTECTED and in normal mode
    with no problem (a lag an agent is shipping does not count)."""
    if "attention" not in status:
        finish(status)
    return bool(status.get("attention")) or status.get("health") != "ONLINE"


# -- a fleet's statuses, gathered elsewhere (playbooks/status.yml) ----------------------------


def check_gathered(where: str, status: Any) -> None:
    """A gathered status object must carry what the report reads (older drtool versions'
    objects lack only the derived fields, which :func:`fleet` adds)."""
    if not isinstance(status, dict):
        raise UsageError(f"{where} is not a drtool status object (a JSON object)")
    wanted: dict[str, Any] = {"volume": str, "health": str, "mode": str, "bad_count": int, "device": str,
                              "size": int, "era": int}
    missing = [key for key in wanted if key not in status]
    if missing:
        raise UsageError(f"{where} is not a drtool status object: no {', '.join(missing)}")
    for key, kind in wanted.items():
        if not isinstance(status[key], kind) or isinstance(status[key], bool):
            raise UsageError(f"{where}: {key} must be a {'string' if kind is str else 'whole number'}, "
                             f"not {json.dumps(status[key])}")
    if status["health"] not in HEALTH_STATES:
        raise UsageError(f"{where}: health {status['health']!r} is not one of {', '.join(HEALTH_STATES)}")


def fleet(gathered: Any, source: str) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Validate statuses gathered from many hosts ({host: [status, ...]} or a bare list), derive
    what older drtool versions did not report, and the exit code of the worst volume."""
    hosts = gathered if isinstance(gathered, dict) else {"": gathered}
    for host, statuses in hosts.items():
        if not isinstance(statuses, list):
            raise UsageError(f"{source}: host {host!r} must map to a list of drtool status objects")
        for index, status in enumerate(statuses):
            check_gathered(f"{source}: host {host!r}, entry {index}", status)
            if "protection" not in status or "attention" not in status:
                finish(status)  # gathered from an older drtool: derive what it lacks
    return hosts, fleet_exit_code([s for v in hosts.values() for s in v])


def fleet_exit_code(statuses: list[dict[str, Any]]) -> int:
    """By the worst volume: 4 FAULTED, 3 DEGRADED (or lost regions), 7 replication broken (a
    paired volume UNPROTECTED), else 0 (README's exit codes)."""
    if any(s["health"] == "FAULTED" for s in statuses):
        return ExitCode.FAULTED
    if any(s["health"] == "DEGRADED" or s.get("lost_count") for s in statuses):
        return ExitCode.BAD_REGIONS
    if any(s.get("protection") == "UNPROTECTED" and s.get("peer") for s in statuses):
        return ExitCode.PEER
    return ExitCode.OK


# -- consistency groups: composed from their members' status objects -----------------------------

GROUP_SCHEMA = "drtool.group-status/1"

#: the keys of a member's status a group status repeats (the rest: drtool status MEMBER)
MEMBER_KEYS = ("volume", "health", "mode", "role", "protection", "protection_reason", "status", "action",
               "attention", "read_only", "era", "last_swap")


def group_status(group: dict[str, Any], members: dict[str, dict[str, Any] | None],
                 errors: dict[str, str] | None = None, server: dict[str, Any] | None = None,
                 server_error: str | None = None, server_probed: bool = False) -> dict[str, Any]:
    """The status of a consistency group (schema ``drtool.group-status/1``, docs/status.md), from
    its definition (``name``, ``group_id``, ``members``) and its members' status objects (None
    with a reason in ``errors`` when one could not be read).  ``server``: what the replica server
    said of the group (``group_info``; None with ``server_probed``: it keeps no such group), when
    it was asked; ``server_error`` when it could not be.

    The group's lag is its recovery point: the oldest write not acknowledged on any member
    (engine.lag.group_lag composes it).  ``consistent`` says whether the replica, where it
    stands now, is the group after a prefix of the writes acknowledged across the members."""
    errors = errors or {}
    names = list(group["members"])
    present = {n: s for n, s in members.items() if s is not None}
    roles = sorted({s.get("role") or "primary" for s in present.values()})
    role = roles[0] if len(roles) == 1 else ("mixed" if roles else None)
    peers = sorted({(s.get("peer") or {}).get("url") for s in present.values() if s.get("peer")})
    lag = group_lag({n: s.get("lag") or {} for n, s in present.items()})
    health = next((h for h in ("FAULTED", "DEGRADED") if any(s["health"] == h for s in present.values())),
                  "ONLINE" if present else None)
    out: dict[str, Any] = {
        "schema": GROUP_SCHEMA,
        "group": group["name"],
        "group_id": group.get("group_id"),
        "members": names,
        "role": role,
        "peer": peers[0] if len(peers) == 1 else None,
        "health": health,
        "lag": lag,
        # the group's recovery point objective as it stands: its oldest unacknowledged write
        "rpo_seconds": lag["oldest_seconds"] if role == "primary" else None,
        "member_status": [
            {**{k: members[n].get(k) for k in MEMBER_KEYS}, "lag": members[n].get("lag"),
             "peer": ((members[n].get("peer") or {}).get("url")),
             "initial_sync": (members[n].get("replication") or {}).get("initial_sync")}
            if members.get(n) is not None else {"volume": n, "error": errors.get(n, "no status")}
            for n in names
        ],
        "server": server,
        "generated": time.time(),
    }
    out["consistent"], out["consistent_reason"], consistency_action = _consistency(
        out, present, errors, peers, server, server_error, server_probed)
    out["protection"], out["protection_reason"] = _group_protection(out, present)
    problems: list[dict[str, Any]] = []
    if out["consistent"] is False:
        problems.append(_problem(f"the group's replica is not write-order consistent: {out['consistent_reason']}",
                                 consistency_action))
    for n in names:
        member = members.get(n)
        if member is None:
            continue
        for each in member.get("problems") or []:
            problems.append({**each, "status": f"{n}: {each['status']}"})
    out["problems"] = problems
    out["status"] = problems[0]["status"] if problems else None
    out["action"] = problems[0]["action"] if problems else None
    out["attention"] = any(p["attention"] for p in problems) or health != "ONLINE"
    return out


def _consistency(group: dict[str, Any], present: dict[str, dict[str, Any]], errors: dict[str, str],
                 peers: list[str], server: dict[str, Any] | None, server_error: str | None,
                 server_probed: bool) -> tuple[bool | None, str, str | None]:
    """(consistent, why, what to do).  None on a secondary: the copy here is not replicated to."""
    name = group["group"]
    missing = [n for n in group["members"] if n not in present]
    if missing:
        why = "; ".join(f"{n}: {errors.get(n, 'no status')}" for n in missing)
        return False, f"no status for {', '.join(missing)} ({why})", f"drtool status {missing[0]}"
    role = group["role"]
    if role == "secondary":
        return None, "this host holds the secondary copy of the group", None
    if role == "mixed":
        by_role = {r: sorted(n for n, s in present.items() if (s.get("role") or "primary") == r)
                   for r in ("primary", "secondary")}
        return False, (f"a role swap did not finish: primary here {', '.join(by_role['primary'])}, secondary "
                       f"{', '.join(by_role['secondary'])}"), f"drtool demote {name} (or drtool promote {name}) again"
    unpaired = [n for n, s in present.items() if not s.get("peer")]
    if unpaired:
        return False, f"{', '.join(sorted(unpaired))} not replicated", f"drtool protect {name} --peer URL --token-file FILE"
    if len(peers) > 1:
        return False, f"members replicate to different servers ({', '.join(peers)})", \
            f"drtool protect {name} --peer URL (one replica server for the whole group)"
    peer = peers[0]
    syncing = sorted(n for n, s in present.items() if (s.get("replication") or {}).get("initial_sync") != "done")
    if syncing:
        return False, (f"the initial sync of {', '.join(syncing)} has not finished: its regions are copied whole, "
                       "not in write order"), f"drtool protect {name} --peer {peer} (resumes the sync)"
    damaged = sorted(n for n, s in present.items() if (s.get("lag") or {}).get("log_damage"))
    if damaged:
        return False, f"the replication log of {', '.join(damaged)} is damaged", f"drtool replicate {name} --wait"
    bitmap = sorted(n for n, s in present.items() if (s.get("lag") or {}).get("bitmap_mode"))
    if bitmap:
        regions = sum((present[n].get("lag") or {}).get("bitmap_regions", 0) for n in bitmap)
        return False, (f"bitmap mode on {', '.join(bitmap)} (the log overflowed): {_plural(regions, 'region')} "
                       f"{'ships' if regions == 1 else 'ship'} whole from the volume, out of write order, until they are replicated"), \
            f"drtool replicate {name} --wait"
    if server is None and server_error:
        return False, f"the replica server cannot say whether it keeps the group: {server_error}", \
            f"drtool status {name} once the replica server at {peer} answers"
    if server is None and server_probed:
        return False, (f"the replica server at {peer} keeps no group {name}: the members replicate one by one, "
                       "not in one write order"), f"drtool protect {name} --peer {peer}"
    if server is not None and sorted(server.get("members") or []) != sorted(group["members"]):
        return False, (f"the replica server keeps the group with members {', '.join(server.get('members') or [])}"
                       f", not {', '.join(group['members'])}"), f"drtool protect {name} --peer {peer}"
    return True, "the replica is the group after a prefix of its acknowledged writes", None


def _group_protection(group: dict[str, Any], present: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """The worst of the members' protections; a group whose replica is not consistent is not
    protected whatever its members say (its replica could not be used as a whole)."""
    if group["role"] == "secondary":
        return None, "this host holds the secondary copy"
    states = {n: s.get("protection") for n, s in present.items()}
    if group["consistent"] is False:
        return "UNPROTECTED", f"not write-order consistent: {group['consistent_reason']}"
    for state in ("UNPROTECTED", "LAGGING"):
        hit = sorted(n for n, s in states.items() if s == state)
        if hit:
            if state == "LAGGING":
                return state, (f"{_lag_words(group['lag'])}"
                               + (f", on {group['lag']['oldest_member']}"
                                  if group["lag"].get("oldest_member") else ""))
            return state, "; ".join(f"{n}: {present[n].get('protection_reason')}" for n in hit)
    return "PROTECTED", "the replica holds every acknowledged write of every member"
