"""The endpoints of the replica server (documented in docs/api.md)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from drtool import __version__
from drtool.errors import Conflict, DrtoolError, UsageError
from drtool.regions import Run, from_runs, parse_runs, runs_from_json
from drtool.replica import handover, reading, scrub
from drtool.replica.adopt import AdoptRequest
from drtool.replica.apply import PROMOTED_REFUSES_RECORDS, apply_batch, parse_batch
from drtool.replica.numbers import parse_count
from drtool.replica.problems import Problem
from drtool.replica.snapshots import Snapshot
from drtool.replica.volume import ReplicaVolume
from drtool.storage.paths import validate_name
from drtool.wire import (
    FRAMES_CONTENT_TYPE, MANIFEST_CONTENT_TYPE, MANIFEST_ENTRY, RECORDS_CONTENT_TYPE, encode_manifest_entries,
)

if TYPE_CHECKING:
    from drtool.replica.handler import ReplicaHandler

Handler = Callable[["ReplicaHandler", str], None]


def route(req: ReplicaHandler, method: str, segments: list[str]) -> None:
    if segments == ["v1", "health"]:
        _allow(method, "GET")
        req.send_json(200, {"status": "ok", "service": "drtool-replica", "version": __version__})
        return
    if segments[:2] == ["v1", "groups"] and len(segments) in (2, 3, 4):
        req.authorize()
        _group_route(req, method, segments[2:])
        return
    if segments[:2] != ["v1", "volumes"] or len(segments) > 5:
        raise Problem(404, "Not found", f"no such endpoint: /{'/'.join(segments)}")
    req.authorize()
    rest = segments[2:]
    if not rest:
        _allow(method, "GET")
        req.send_json(200, {"volumes": [_describe(req, n) for n in req.server.replicas.names()]})
        return
    name = validate_name(rest[0])
    if len(rest) == 3 and rest[1] == "snapshots":
        _allow(method, "DELETE")
        _delete_snapshot(req, name, validate_name(rest[2], "snapshot name"))
        return
    handlers = _ROUTES.get(tuple(rest[1:]))
    if handlers is None:
        raise Problem(404, "Not found", f"no such endpoint: /{'/'.join(segments)}")
    _allow(method, *handlers)
    handlers[method](req, name)


def _describe(req: ReplicaHandler, name: str) -> dict[str, object]:
    """One replica for the listing; a broken one is listed with its error, not fatal to the list."""
    try:
        return req.server.replicas.get(name).describe()
    except DrtoolError as exc:
        return {"name": name, "error": str(exc)}


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise Problem(405, "Method not allowed", f"{method} is not allowed here (use {', '.join(allowed)})",
                      {"Allow": ", ".join(allowed)})


# -- volumes ------------------------------------------------------------------------------


def _put_volume(req: ReplicaHandler, name: str) -> None:
    body = req.read_json()
    try:
        size, region_size, volume_id = int(body["size"]), int(body["region_size"]), body["volume_id"]
    except (KeyError, TypeError, ValueError):
        raise Problem(400, "Bad request", 'body must be {"size": N, "region_size": N, "volume_id": "32 hex"}') from None
    created, volume = req.server.replicas.ensure(name, size, region_size, volume_id)
    req.send_json(201 if created else 200, volume.describe())


def _get_volume(req: ReplicaHandler, name: str) -> None:
    req.send_json(200, req.server.replicas.get(name).describe())


def _delete_volume(req: ReplicaHandler, name: str) -> None:
    req.server.replicas.delete(name)
    req.send_json(200, {"deleted": name})


# -- reads --------------------------------------------------------------------------------


def _source(volume: ReplicaVolume, snapshot_name: str | None, overlay: bool) -> Snapshot | None:
    if snapshot_name is None:
        return None
    if overlay:
        raise UsageError("read either a snapshot or the overlay, not both")
    volume.refuse_if_promoted("its snapshots read unpreserved regions from an image the server no longer "
                              "follows")
    snapshot = volume.snapshots.get(validate_name(snapshot_name, "snapshot name"))
    if snapshot is None:
        raise Problem(404, "No such snapshot", f"replica {volume.name} has no snapshot {snapshot_name}")
    return snapshot


def _flag(text: str | None) -> bool:
    if text in (None, "", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise UsageError(f"flag value {text!r} is not 0/1/true/false")


_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def _get_data(req: ReplicaHandler, name: str) -> None:
    volume = req.server.replicas.get(name)
    overlay = _flag(req.query.get("overlay"))
    snapshot = _source(volume, req.query.get("snapshot"), overlay)
    size = volume.geometry.size
    header = req.headers.get("Range")
    if header is None:
        start, length, status, extra = 0, size, 200, {}
    else:
        match = _RANGE.fullmatch(header.strip(" \t"))
        first, last = (match.group(1), match.group(2)) if match else ("", "")
        if not match or (not first and not last):
            raise Problem(416, "Range not satisfiable", f"unsupported Range {header!r} (one bytes=A-B range)",
                          {"Content-Range": f"bytes */{size}"})
        if first:
            start = parse_count(first, "Range start")
            end = min(parse_count(last, "Range end"), size - 1) if last else size - 1
        else:  # bytes=-N: the last N bytes
            start, end = max(size - parse_count(last, "Range length"), 0), size - 1
        if start >= size or end < start:
            raise Problem(416, "Range not satisfiable", f"range {header!r} is outside the volume ({size} bytes)",
                          {"Content-Range": f"bytes */{size}"})
        start, length, status = start, end - start + 1, 206
        extra = {"Content-Range": f"bytes {start}-{end}/{size}"}
    extra["Accept-Ranges"] = "bytes"
    req.send_head(status, "application/octet-stream", length, extra)
    if req.command != "HEAD":
        resolve = None if snapshot is None and not overlay else reading.resolver(volume, snapshot, overlay)
        reading.stream_range(volume, start, length, resolve, req.connection)


def _body_runs(body: dict, volume: ReplicaVolume, limit: int) -> list[Run]:
    """A request's ``runs`` (drtool.regions.runs_from_json), at most ``limit`` regions in all."""
    runs = runs_from_json(body.get("runs"), volume.geometry)
    if sum(count for _, count in runs) > limit:
        raise UsageError(f"a request may name at most {limit} regions")
    return runs


def _post_preserved(req: ReplicaHandler, name: str) -> None:
    """The regions a snapshot preserved (the mirror changed them after it was taken), with the
    digest it keeps for each, as manifest entries (drtool.wire): what a recovery from that
    snapshot could take back in time; every other region reads as the mirror.  ``runs``
    (optional) narrows it to those regions.  The work follows what the snapshot preserved,
    not the volume's size."""
    volume = req.server.replicas.get(name)
    body = req.read_json()
    if not isinstance(body.get("snapshot"), str):
        raise UsageError('"snapshot" must name a snapshot')
    snapshot = _source(volume, body["snapshot"], False)
    assert snapshot is not None
    table = snapshot.table
    with volume.lock.shared():
        if "runs" in body:
            runs = _body_runs(body, volume, req.server.limits.max_read_regions)
            entries = [(region, table.digest(region)) for first, count in runs
                       for region in table.iter_present(first, first + count)]
        else:
            entries = [(region, table.digest(region)) for region in table.iter_present()]
    req.send_head(200, MANIFEST_CONTENT_TYPE, MANIFEST_ENTRY.size * len(entries))
    for chunk in encode_manifest_entries(iter(entries)):
        req.wfile.write(chunk)


def _post_read(req: ReplicaHandler, name: str) -> None:
    volume = req.server.replicas.get(name)
    volume.refuse_if_promoted("its stored digests no longer describe its image, so no read can be verified "
                              "here; read it through its agent")
    body = req.read_json()
    overlay = bool(body.get("overlay", False))
    snapshot = _source(volume, body.get("snapshot"), overlay)
    runs = _body_runs(body, volume, req.server.limits.max_read_regions)
    framing = body.get("frames", "regions")
    if framing not in ("regions", "runs"):
        raise UsageError(f'"frames" must be "regions" (a frame per region) or "runs" (RUN frames), not {framing!r}')
    regions = list(from_runs(runs))
    resolve = reading.resolver(volume, snapshot, overlay)
    plan = reading.plan_frames(volume, regions, resolve, runs=framing == "runs")
    req.send_head(200, FRAMES_CONTENT_TYPE, plan.length)
    reading.stream_frames(volume, plan, resolve, req.connection)


def _get_changes(req: ReplicaHandler, name: str) -> None:
    volume = req.server.replicas.get(name)
    if "after" not in req.query or "runs" not in req.query:
        raise UsageError("changes needs ?after=SEQ&runs=FIRST+COUNT,...")
    after = parse_count(req.query["after"], "after")
    text = req.query["runs"]
    runs = parse_runs(text, volume.geometry)
    with volume.lock.shared():
        entries = volume.journal.changes(after, runs)
    req.send_head(200, RECORDS_CONTENT_TYPE, sum(e.size for e in entries),
                  {"X-Drtool-Journal-Base": str(volume.journal.base_seq)})
    for entry in entries:
        with volume.lock.shared():
            data = volume.journal.read(entry)
        req.wfile.write(data)


# -- writes -------------------------------------------------------------------------------


def _records(req: ReplicaHandler, name: str, overlay: bool) -> None:
    volume = req.server.replicas.get(name)
    raws = req.headers.get_all("X-Drtool-Complete-Through") or []
    if len(raws) > 1:
        raise UsageError(f"{len(raws)} X-Drtool-Complete-Through headers: send one")
    through = parse_count(raws[0], "X-Drtool-Complete-Through") if raws else None
    volume.refuse_if_promoted(PROMOTED_REFUSES_RECORDS)  # before reading a large body for nothing
    req.server.replicas.groups.refuse_member_records(name)
    limits = req.server.limits
    body = req.read_body(limits.max_body)
    batch = parse_batch(volume, body, overlay, limits.max_records)
    req.send_json(200, apply_batch(volume, batch, through, overlay))


def _post_records(req: ReplicaHandler, name: str) -> None:
    _records(req, name, overlay=False)


def _post_overlay_records(req: ReplicaHandler, name: str) -> None:
    _records(req, name, overlay=True)


def _delete_overlay(req: ReplicaHandler, name: str) -> None:
    req.server.replicas.get(name).drop_overlay()
    req.send_json(200, {"dropped": "overlay"})


# -- snapshots ----------------------------------------------------------------------------


def _post_snapshot(req: ReplicaHandler, name: str) -> None:
    volume = req.server.replicas.get(name)
    snap = validate_name(req.read_json().get("name"), "snapshot name")
    with volume.lock.exclusive():
        volume.refuse_if_promoted("a snapshot needs copy-on-write, and the server no longer sees its writes")
        if volume.snapshots.get(snap) is not None:
            raise Conflict(f"replica {name} already has a snapshot {snap}")
        snapshot = volume.snapshots.create(snap, volume.mirror.applied.watermark)
    req.send_json(201, snapshot.describe())


def _get_snapshots(req: ReplicaHandler, name: str) -> None:
    volume = req.server.replicas.get(name)
    with volume.lock.shared():
        listing = [s.describe() for s in volume.snapshots.by_name.values()]
    req.send_json(200, {"snapshots": sorted(listing, key=lambda s: s["name"])})


def _delete_snapshot(req: ReplicaHandler, name: str, snap: str) -> None:
    volume = req.server.replicas.get(name)
    with volume.lock.exclusive():
        if volume.snapshots.get(snap) is None:
            raise Problem(404, "No such snapshot", f"replica {name} has no snapshot {snap}")
        volume.snapshots.delete(snap)
    req.send_json(200, {"deleted": snap})


# -- role changes (docs/api.md "Role changes") -------------------------------------------


def _post_release(req: ReplicaHandler, name: str) -> None:
    volume = req.server.replicas.get(name)
    body = req.read_json()
    req.send_json(200, handover.release(volume, _number(body, "era"), _number(body, "seq")))


def _delete_release(req: ReplicaHandler, name: str) -> None:
    req.send_json(200, handover.cancel_release(req.server.replicas.get(name)))


def _post_promote(req: ReplicaHandler, name: str) -> None:
    volume = req.server.replicas.get(name)
    force = req.read_json().get("force", False)
    if not isinstance(force, bool):
        raise UsageError(f'"force" must be true or false, not {force!r}')
    req.send_json(200, handover.promote(volume, force))


def _post_rebase(req: ReplicaHandler, name: str) -> None:
    volume = req.server.replicas.get(name)
    req.send_json(200, handover.rebase(volume, _number(req.read_json(), "seq")))


def _post_adopt(req: ReplicaHandler, name: str) -> None:
    request = AdoptRequest.parse(name, req.read_json())
    req.send_json(200, req.server.replicas.adopt(request).describe())


def _get_manifest(req: ReplicaHandler, name: str) -> None:
    """The mirror's digests as manifest entries (drtool.wire): one per region that is not all
    zeros, in order.  Taken under the volume's shared lock, so it is one point in time."""
    volume = req.server.replicas.get(name)
    table = volume.mirror.table
    with volume.lock.shared():
        count = volume.geometry.count - table.zero_count()
        req.send_head(200, MANIFEST_CONTENT_TYPE, MANIFEST_ENTRY.size * count,
                      {"X-Drtool-Applied-Seq": str(volume.mirror.applied.watermark),
                       "X-Drtool-Regions": str(count)})
        for chunk in encode_manifest_entries(table.iter_nonzero()):
            req.wfile.write(chunk)


# -- the replica's own scrub (docs/api.md "Verify and scrub") ------------------------------


def _post_verify(req: ReplicaHandler, name: str) -> None:
    """Re-read and re-hash the given regions (a bounded batch): stored and computed digests."""
    volume = req.server.replicas.get(name)
    volume.refuse_if_promoted("its stored digests no longer describe its image, so there is nothing to "
                              "verify it against; verify it through its agent")
    body = req.read_json()
    runs = scrub.check_runs(volume, body.get("runs"))
    start = body.get("from", 0)
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise UsageError(f'"from" must be a region number >= 0, not {start!r}')
    overlay = body.get("overlay", False)
    if not isinstance(overlay, bool):
        raise UsageError(f'"overlay" must be true or false, not {overlay!r}')
    max_bytes = body.get("max_bytes", scrub.MAX_BATCH_BYTES)
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise UsageError(f'"max_bytes" must be a positive integer, not {max_bytes!r}')
    req.send_json(200, scrub.verify_batch(volume, runs, start, "merged" if overlay else "mirror",
                                          min(max_bytes, scrub.MAX_BATCH_BYTES)))


def _post_scrub(req: ReplicaHandler, name: str) -> None:
    """Start (or resume) a scrub of the whole replica in the background: 202, or 200 when one runs."""
    volume = req.server.replicas.get(name)
    body = req.read_json() if req.headers.get("Content-Length") not in (None, "0") else {}
    rate = body.get("rate")
    if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or rate < 1):
        raise UsageError(f'"rate" must be bytes per second (an integer >= 1) or null, not {rate!r}')
    restart = body.get("restart", False)
    if not isinstance(restart, bool):
        raise UsageError(f'"restart" must be true or false, not {restart!r}')
    started, described = scrub.start_scrub(volume, rate, restart)
    req.send_json(202 if started else 200, described)


def _get_scrub(req: ReplicaHandler, name: str) -> None:
    req.send_json(200, scrub.describe(req.server.replicas.get(name)))


# -- consistency groups (docs/api.md "Consistency groups") --------------------------------


def _group_route(req: ReplicaHandler, method: str, rest: list[str]) -> None:
    groups = req.server.replicas.groups
    if not rest:
        _allow(method, "GET")
        req.send_json(200, {"groups": [_describe_group(req, n) for n in groups.names()]})
        return
    name = validate_name(rest[0], "group name")
    if len(rest) == 1:
        _allow(method, "GET", "PUT", "DELETE")
        if method == "GET":
            req.send_json(200, groups.describe(name))
        elif method == "PUT":
            body = req.read_json()
            created, described = groups.ensure(name, body.get("group_id"), body.get("members"))
            req.send_json(201 if created else 200, described)
        else:
            groups.delete(name)
            req.send_json(200, {"deleted": name})
    elif len(rest) == 2 and rest[1] == "records":
        _allow(method, "POST")
        limits = req.server.limits
        groups.get(name)  # 404 before reading a large body for nothing
        body = req.read_body(limits.max_body)
        req.send_json(200, groups.apply_txn(name, body, limits.max_records))
    elif len(rest) == 2 and rest[1] == "snapshots":
        _allow(method, "POST")
        req.send_json(201, groups.snapshot(name, req.read_json().get("name")))
    else:
        raise Problem(404, "Not found", f"no such endpoint: /v1/groups/{'/'.join(rest)}")


def _describe_group(req: ReplicaHandler, name: str) -> dict[str, object]:
    try:
        return req.server.replicas.groups.describe(name)
    except DrtoolError as exc:
        return {"name": name, "error": str(exc)}


def _number(body: dict[str, object], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(f'"{key}" must be an integer >= 0, not {value!r}')
    return value


_ROUTES: dict[tuple[str, ...], dict[str, Handler]] = {
    (): {"GET": _get_volume, "PUT": _put_volume, "DELETE": _delete_volume},
    ("data",): {"GET": _get_data, "HEAD": _get_data},
    ("read",): {"POST": _post_read},
    ("preserved",): {"POST": _post_preserved},
    ("changes",): {"GET": _get_changes},
    ("records",): {"POST": _post_records},
    ("overlay", "records"): {"POST": _post_overlay_records},
    ("overlay",): {"DELETE": _delete_overlay},
    ("snapshots",): {"GET": _get_snapshots, "POST": _post_snapshot},
    ("release",): {"POST": _post_release, "DELETE": _delete_release},
    ("promote",): {"POST": _post_promote},
    ("rebase",): {"POST": _post_rebase},
    ("adopt",): {"POST": _post_adopt},
    ("manifest",): {"GET": _get_manifest},
    ("verify",): {"POST": _post_verify},
    ("scrub",): {"GET": _get_scrub, "POST": _post_scrub},
}

