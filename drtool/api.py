"""drtool's public Python API: what the CLI and the Ansible modules call.

Each function names a volume and a state root (None: ``$DRTOOL_STATE_ROOT`` or
/var/lib/drtool).  When an agent is running for the volume, the request goes to
it over its control socket (it holds the volume); otherwise the volume is opened
here.  Either way the same code in :mod:`drtool.ops` does the work, so the
answer is the same.  Results are JSON-able dicts; errors are drtool.errors.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from drtool import control, detect, ops, roles
from drtool.engine import Engine
from drtool.errors import ExportBusy
from drtool.progress import NoProgress, Progress
from drtool.regions import DEFAULT_REGION_SIZE
from drtool.replication import Replicator, absolute_path
from drtool.status import volume_status
from drtool.storage.paths import StatePaths, list_volumes, state_root, validate_name
from drtool.storage.volume import Volume


def agent_socket(name: str, root: str | None = None) -> str | None:
    """The control socket of the agent serving ``name``, if one is running."""
    path = StatePaths(state_root(root), validate_name(name)).control_socket
    return path if control.is_listening(path) else None


def _open(root: str | None, name: str, look_only: bool = False) -> Engine:
    """Open a volume's engine here, with a replicator attached when it has a peer."""
    engine = Engine.open(root, name, look_only=look_only)
    if engine.protected:
        Replicator(engine)
    return engine


def _run(name: str, root: str | None, op: str, args: dict[str, Any], progress: Progress | None = None) -> Any:
    """Run the registered operation ``op`` (drtool.ops.OPERATIONS) with ``args``: in the agent
    serving the volume (the same registry answers its control socket), or here on the volume
    opened for it (saving nothing on close when the operation only looks)."""
    operation = ops.operation(op)
    socket_path = agent_socket(name, root)
    if socket_path:
        return control.call(socket_path, op, args, progress)
    with _open(root, name, look_only=operation.look_only(args)) as engine:
        return ops.run(engine, op, args, progress)


def init_volume(
    name: str, device: str, region_size: int | str = DEFAULT_REGION_SIZE,
    force: bool = False, root: str | None = None, progress: Progress | None = None,
) -> dict[str, Any]:
    """Register a volume and digest every region of its device."""
    progress = progress or NoProgress()
    root = state_root(root)
    if _group_named(name, root) is not None:
        from drtool.errors import Conflict

        raise Conflict(f"{name} is the name of a group: volumes and groups share one namespace")
    if force and agent_socket(name, root):
        from drtool.errors import VolumeBusy
        raise VolumeBusy(name, None)
    volume = Volume.create(root, name, device, region_size, force=force)
    try:
        progress.start(volume.geometry.size, f"digesting {name}")
        try:
            detect.digest_new_volume(volume, progress.advance)
        except BaseException:
            shutil.rmtree(volume.paths.dir, ignore_errors=True)  # half-registered must not look registered
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


def scrub_volume(name: str, root: str | None = None, progress: Progress | None = None,
                 record: bool = True) -> dict[str, Any]:
    """Verify every region.  ``record=False`` reports what it finds and changes nothing."""
    return _run(name, root, "scrub", {"record": record}, progress)


def scan_volume(name: str, root: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    return _run(name, root, "scan", {}, progress)


def configure(name: str, changes: dict[str, Any] | None = None, root: str | None = None) -> dict[str, Any]:
    """Show the volume's settings, changing ``changes`` first (live when an agent serves it):
    ``copy_on_read`` and ``auto_degrade`` (booleans), ``log_limit`` (bytes), ``fetch_timeout``
    (seconds)."""
    args = {"changes": changes or {}}
    return _run(name, root, "configure", args)


def settings_with(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """drtool's default volume settings with ``changes`` (validated) applied: what a volume
    registered now and configured with them would have."""
    from drtool.engine.core import check_settings, effective_settings

    return effective_settings(check_settings(changes or {}))


def upgrade(name: str, root: str | None = None) -> dict[str, Any]:
    """Convert a volume's state directory to the current format (storage.volume.upgrade).
    It takes the volume's lock: a running agent makes it fail with VolumeBusy."""
    from drtool.storage.volume import upgrade as upgrade_state

    return upgrade_state(state_root(root), name)


def checkpoint(name: str, root: str | None = None) -> dict[str, Any]:
    return _run(name, root, "checkpoint", {})


def protect(name: str, peer: str, token_file: str | None = None, ca: str | None = None,
            root: str | None = None, progress: Progress | None = None, plan_only: bool = False,
            insecure: bool = False) -> dict[str, Any]:
    """Pair a volume with its replica and run (or resume) the initial sync.

    After a role swap the sync is incremental (fast failback); ``plan_only`` reports what
    would be copied and copies nothing."""
    # Paths are the caller's: absolute before they reach an agent running in another directory.
    args = {"peer": peer, "token_file": absolute_path(token_file), "ca": absolute_path(ca),
            "plan_only": plan_only, "insecure": insecure}
    group = _group_named(name, root)
    if group is not None:
        return _protect_group(group, args, root, progress)
    return _run(name, root, "protect", args, progress)


def write(name: str, offset: int, data: bytes, sync: bool = False, root: str | None = None) -> dict[str, Any]:
    """Write through drtool: logged, applied, digested, marked for replication."""
    return _run(name, root, "write", {"offset": offset, "data": data.hex(), "sync": sync})


def read(name: str, offset: int, length: int, root: str | None = None) -> bytes:
    """A merged, verified read (the bytes a block client would get)."""
    return _run(name, root, "read", {"offset": offset, "length": length})


def replicate(name: str, wait: bool = False, regions: str | None = None, timeout: float = 300.0,
              root: str | None = None) -> dict[str, Any]:
    """Ship pending records (all, or force exactly the given regions' records).  A group name:
    every member's, in whole group transactions."""
    args = {"wait": wait, "regions": regions, "timeout": timeout}
    group = _group_named(name, root)
    if group is not None:
        if regions:
            from drtool.errors import UsageError

            raise UsageError(f"{name} is a group: force regions of one of its volumes ({', '.join(group.members)})")
        return _replicate_group(group, wait, timeout, root)
    group = _shipping_group(name, root)
    if group is not None:  # a member ships only in its group's transactions: open the whole group here
        return {**_run_member(group, name, "replicate", args, root), "group": group.name}
    return _run(name, root, "replicate", args)


def verify_volume(name: str, regions: str | None = None, repair: bool = False, rate: int | str | None = None,
                  restart: bool = False, timeout: float = 300.0, root: str | None = None,
                  progress: Progress | None = None, cursor: bool = True) -> dict[str, Any]:
    """Prove the replica: it re-reads and re-hashes its regions, compared with the manifest and
    with what this side believes acknowledged (drtool.verify).  ``repair``: ship the regions
    that differ again, then verify them once more.  Resumable unless ``restart``; ``cursor``
    False neither resumes nor saves a cursor (writes nothing: check mode)."""
    args = {"regions": regions, "repair": repair, "rate": rate, "restart": restart, "timeout": timeout,
            "cursor": cursor}
    group = _group_named(name, root)
    if group is not None:
        if regions is not None:
            from drtool.errors import UsageError
            raise UsageError(f"{name} is a group: verify its members' regions one volume at a time "
                             f"(drtool verify MEMBER --regions ...)")
        return _verify_group(group.name, {member: _verify_one(member, args, root, progress)
                                          for member in group.members})
    return _verify_one(name, args, root, progress)


def _verify_one(name: str, args: dict[str, Any], root: str | None, progress: Progress | None) -> dict[str, Any]:
    group = _shipping_group(name, root) if args["repair"] else None
    if group is not None:  # the repair ships: through the member's group, opened here
        return _run_member(group, name, "verify", args, root, progress)
    return _run(name, root, "verify", args, progress)


def recover(name: str, local_era: int | None = None, source: str | None = None,
            accept_rollback: bool = False, root: str | None = None) -> dict[str, Any]:
    """Enter degraded mode: create the overlay, redirect writes, merge reads.  Idempotent.

    From a snapshot (``source="snapshot:S"``), the regions it would take back in time are
    listed first and ConfirmationNeeded is raised unless ``accept_rollback``."""
    args = {"local_era": local_era, "source": source, "accept_rollback": accept_rollback}
    return _run(name, root, "recover", args)


def failback(name: str, device: str | None = None, rate: int | str | None = None,
             root: str | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Copy bad and overlay regions back into the (repaired or new) device; back to normal."""
    args = {"device": absolute_path(device), "rate": rate}
    return _run(name, root, "failback", args, progress)


def demote(name: str, timeout: float = 60.0, force: bool = False, root: str | None = None) -> dict[str, Any]:
    """Hand the primary role over: refuse writes, drain replication, release.  A group name
    demotes every member at one consistent point (drtool.roles.demote_group); a member of a
    group alone is refused (NotPermitted)."""
    group = _group_named(name, root)
    if group is not None:
        return _demote_group(group, timeout, force, root)
    _refuse_member(name, root, "demote")
    args = {"timeout": timeout, "force": force}
    return _run(name, root, "demote", args)


def adopt(name: str, replica_url: str, token_file: str | None = None, ca: str | None = None,
          root: str | None = None, insecure: bool = False, force: bool = False) -> dict[str, Any]:
    """Serve a demoted volume from this host's replica server.  An agent serving it hands it
    over and stops serving it (the others it serves are not disturbed); NBD clients still
    connected to it make that fail (ExportBusy) unless ``force``, which disconnects them."""
    token_file, ca = absolute_path(token_file), absolute_path(ca)
    group = _group_named(name, root)
    if group is not None:
        results = {member: _adopt(member, replica_url, token_file, ca, root, insecure, force)
                   for member in group.members}
        return {"group": group.name, "changed": any(r["changed"] for r in results.values()),
                "members": results}
    _refuse_member(name, root, "adopt")
    return _adopt(name, replica_url, token_file, ca, root, insecure, force)


def _adopt(name: str, replica_url: str, token_file: str | None, ca: str | None, root: str | None,
           insecure: bool, force: bool) -> dict[str, Any]:
    socket_path = agent_socket(name, root)
    if socket_path:
        return control.call(socket_path, "adopt", {"replica_url": replica_url, "token_file": token_file,
                                                   "ca": ca, "insecure": insecure, "force": force})
    return {**roles.adopt(root, name, replica_url, token_file, ca, insecure=insecure), "left_agent": False}


# -- the running agent's set of volumes ----------------------------------------------------


def _agent(root: str | None) -> str:
    """The control socket of the agent serving the state root (StateError when none runs)."""
    from drtool.errors import StateError
    from drtool.storage.paths import agent_control_socket

    root = state_root(root)
    path = agent_control_socket(root)
    if not control.is_listening(path):
        raise StateError(f"no agent is running for the state root {root}: start one with "
                         "`drtool agent NAME...` (or its service)")
    return path


def agent_info(root: str | None = None) -> dict[str, Any]:
    """The running agent of the state root: ``running``, and when it runs its ``pid``,
    ``volumes`` (the names it serves), ``uris`` and its listeners (as status's ``agent``)."""
    from drtool.errors import StateError

    try:
        path = _agent(root)
    except StateError:
        return {"running": False, "volumes": []}
    return {"running": True, **control.call(path, "volumes")}


def attach(name: str, root: str | None = None) -> dict[str, Any]:
    """Have the running agent serve the registered volume ``name`` too; its other volumes'
    NBD clients are not disturbed.  Idempotent (``changed``); returns the volume's ``uris``."""
    return control.call(_agent(root), "attach", {"name": validate_name(name)})


def detach(name: str, force: bool = False, root: str | None = None) -> dict[str, Any]:
    """Have the running agent stop serving ``name`` and release it (saved and unlocked); its
    other volumes' NBD clients are not disturbed.  Refused (ExportBusy, exit 6) while NBD clients
    are connected to it, unless ``force``: they are disconnected (``disconnected`` lists them)
    after their requests in flight are answered.  Idempotent (``changed``)."""
    return control.call(_agent(root), "detach", {"name": validate_name(name), "force": force})


def agent_serve(names: list[str], force: bool = False, check: bool = False,
                root: str | None = None) -> dict[str, Any]:
    """Make the running agent serve exactly ``names``: attach the missing ones, detach the
    others (``force`` as for :func:`detach`), nothing restarted.  ``check``: only say what
    would change.  Returns ``changed``, ``attached``, ``detached``, ``volumes`` (served after)."""
    wanted = sorted({validate_name(n) for n in names})
    served = control.call(_agent(root), "volumes")["volumes"]
    attached = [n for n in wanted if n not in served]
    detached = sorted(n for n in served if n not in wanted)
    if not check:
        for each in detached:
            detach(each, force=force, root=root)
        for each in attached:
            attach(each, root=root)
    return {"changed": bool(attached or detached), "attached": attached, "detached": detached,
            "volumes": wanted}


def promote(name: str, replica_url: str, token_file: str | None = None, ca: str | None = None,
            force: bool = False, root: str | None = None, insecure: bool = False) -> dict[str, Any]:
    """Turn this host's replica into the primary volume (``force``: takeover).  A group name
    (defined here, or kept by the replica server) promotes every member and defines the group
    here with the same id (drtool.roles.promote_group); a member of a group alone is refused."""
    token_file, ca = absolute_path(token_file), absolute_path(ca)
    if _group_named(name, root) is not None or _server_group(name, replica_url, token_file, ca, insecure):
        return roles.promote_group(root, name, replica_url, token_file, ca, force=force, insecure=insecure)
    _refuse_member(name, root, "promote", replica_url=replica_url, token_file=token_file, ca=ca,
                   insecure=insecure)
    return roles.promote(root, name, replica_url, token_file, ca, force=force, insecure=insecure)


def remove_volume(name: str, root: str | None = None) -> dict[str, Any]:
    """Unregister a volume: its state directory goes; its device is not touched."""
    from drtool.errors import VolumeBusy

    root = state_root(root)
    if agent_socket(name, root):
        raise VolumeBusy(name, None)
    volume = Volume.open(root, name)
    try:
        shutil.rmtree(volume.paths.dir)
    finally:
        volume.close()
    return {"volume": name, "changed": True, "device": volume.record.device}


def probe_volume(name: str, root: str | None = None) -> dict[str, Any]:
    """A quick look at the device: there, the right size, readable at both ends (no scrub)."""
    volume = Volume.inspect(state_root(root), name)
    found = detect.quick_probe(volume)
    return {"volume": name, "path": found.path, "state": found.state, "ok": found.ok, "size": found.size,
            "reason": found.reason}


def replica_info(name: str, replica_url: str, token_file: str | None = None,
                 ca: str | None = None, insecure: bool = False) -> dict[str, Any]:
    """What a replica server says about its replica of ``name`` (state, applied sequence, ...)."""
    from drtool.replication import make_client

    with make_client({"url": replica_url, "token_file": token_file, "ca": ca, "insecure": insecure}) as client:
        return client.volume_info(name)


def replica_status(replica_root: str) -> list[dict[str, Any]]:
    """The replicas a secondary host keeps, read from disk (no server needed)."""
    from drtool.replica.store import describe_root

    return [{**info, "role": "secondary"} for info in describe_root(replica_root)]


def fleet_report(gathered: Any, source: str = "-") -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Statuses gathered from many hosts (playbooks/status.yml), checked and completed, and the
    exit code of the worst volume (drtool.status.fleet)."""
    from drtool.status import fleet

    return fleet(gathered, source)


def status(name: str | None = None, root: str | None = None, probe_peer: bool = True,
           attention_only: bool = False) -> list[dict[str, Any]]:
    """Status of one volume, or of every volume under the state root; ``attention_only``: only
    those that need attention (``drtool status -x``)."""
    root = state_root(root)
    names = [validate_name(name)] if name else list_volumes(root)
    out = []
    for each in names:
        socket_path = agent_socket(each, root)
        try:
            if socket_path:
                out.append(control.call(socket_path, "status", {"probe_peer": probe_peer}))
                continue
        except ExportBusy:
            pass  # leaving the agent this instant: read from its state, as without an agent
        out.append(volume_status(Volume.inspect(root, each), probe_peer=probe_peer))
    if attention_only:
        from drtool.status import needs_attention

        out = [each for each in out if needs_attention(each)]
    return out


def _replica_peer(volume: str, replica_url: str | None, token_file: str | None, ca: str | None,
                  insecure: bool, root: str | None, hint: str) -> dict[str, Any]:
    """The replica server to ask: the one named, else the peer of the volume registered here."""
    from drtool.errors import UsageError

    if replica_url:
        return {"url": replica_url, "token_file": token_file, "ca": ca, "insecure": insecure}
    with Volume.inspect(state_root(root), volume) as registered:
        peer = dict(registered.record.peer or {})
    if not peer:
        raise UsageError(f"volume {volume} has no peer here: {hint}")
    return peer


def snapshot(action: str, volume: str, snap: str | None = None, replica_url: str | None = None,
             token_file: str | None = None, ca: str | None = None, insecure: bool = False,
             root: str | None = None) -> dict[str, Any]:
    """``create``, ``list`` or ``delete`` snapshots of a replica on a replica server (docs/api.md,
    Snapshots).  Without ``replica_url``, the server is the peer of the volume registered here."""
    from drtool.errors import UsageError
    from drtool.peer import make_client

    if action not in ("create", "list", "delete"):
        raise UsageError(f"snapshot action {action!r} is not create, list or delete")
    validate_name(volume)
    if action != "list":
        if not snap:
            raise UsageError(f"snapshot {action} needs the snapshot's name")
        validate_name(snap, "snapshot name")
    group = _group_named(volume, root)
    if group is not None and not replica_url:
        peer = _protected_peer(group, state_root(root))
        if peer is None:
            raise UsageError(f"group {volume} is not protected here: drtool protect {volume} --peer URL, "
                             "or give --replica-url")
    else:
        peer = _replica_peer(volume, replica_url, token_file, ca, insecure, root, "give --replica-url")
    with make_client(peer) as client:
        members = list(group.members) if group is not None else None
        if members is None and replica_url:
            # On the secondary there may be no definition: the replica server keeps the group.
            served = roles.server_group(client, volume)
            members = list(served["members"]) if served is not None else None
        if members is not None:
            return _group_snapshot(client, action, volume, members, snap or "", peer["url"])
        if action == "create":
            return {"volume": volume, "replica_url": peer["url"], "changed": True,
                    "snapshot": client.create_snapshot(volume, snap or "")}
        if action == "delete":
            client.delete_snapshot(volume, snap or "")
            return {"volume": volume, "replica_url": peer["url"], "changed": True, "deleted": snap}
        return {"volume": volume, "replica_url": peer["url"], "snapshots": client.list_snapshots(volume)}


def replica_scrub(volume: str, rate: int | str | None = None, restart: bool = False, wait: bool = False,
                  timeout: float = 3600.0, replica_url: str | None = None, token_file: str | None = None,
                  ca: str | None = None, insecure: bool = False, root: str | None = None) -> dict[str, Any]:
    """Have the replica server scrub its whole copy of ``volume`` (mirror, then overlay replica) in
    the background (docs/api.md, Verify and scrub); ``wait``: until it finished.  Returns what
    the server's scrubs found.  Without ``replica_url``, the peer of the volume registered here."""
    import time

    from drtool.errors import OperationTimeout
    from drtool.peer import make_client
    from drtool.units import parse_rate

    validate_name(volume)
    peer = _replica_peer(volume, replica_url, token_file, ca, insecure, root, "give the replica server's URL")
    with make_client(peer) as client:
        found = client.scrub(volume, parse_rate(rate), restart)
        deadline = time.monotonic() + timeout
        while wait and (found.get("last") or {}).get("state") == "running":
            if time.monotonic() > deadline:
                raise OperationTimeout(f"the replica server's scrub of {volume} did not finish in {timeout:g}s")
            time.sleep(0.2)
            found = client.scrub_status(volume)
    return {"volume": volume, "replica_url": peer["url"], **found}


# -- consistency groups: the operations that take a group's name ------------------------------
# (membership: drtool.storage.groups; replication of a group: drtool.replication)


def is_group(name: str, root: str | None = None) -> bool:
    """Whether ``name`` is a consistency group defined under the state root."""
    return _group_named(name, root) is not None


def _group_named(name: str, root: str | None) -> Any:
    """The group called ``name`` under the state root (storage.groups.GroupRecord), or None:
    a name is looked up as a group first (volume and group names share one namespace)."""
    import os

    from drtool.storage.groups import group_path, load_group

    root = state_root(root)
    validate_name(name)
    return load_group(root, name) if os.path.exists(group_path(root, name)) else None


def _refuse_member(name: str, root: str | None, command: str, replica_url: str | None = None,
                   token_file: str | None = None, ca: str | None = None, insecure: bool = False) -> None:
    """A member of a consistency group changes roles only with its group (a swap of one member
    alone would split the group's write order between two sites)."""
    from drtool.errors import NotPermitted
    from drtool.storage.groups import group_of

    group = group_of(state_root(root), validate_name(name))
    if group is None and replica_url:
        from drtool.errors import DrtoolError
        from drtool.peer import make_client

        try:
            with make_client({"url": replica_url, "token_file": token_file, "ca": ca,
                              "insecure": insecure}) as client:
                group = next((g["name"] for g in client.list_groups() if name in (g.get("members") or [])),
                             None)
        except DrtoolError:
            group = None  # the command itself reports what is wrong with the server
    if group:
        raise NotPermitted(f"volume {name} is in consistency group {group}: its members change roles together "
                           f"(drtool {command} {group})")


def _server_group(name: str, replica_url: str, token_file: str | None, ca: str | None,
                  insecure: bool) -> dict[str, Any] | None:
    """What the replica server at ``replica_url`` keeps of a group called ``name`` (None: none)."""
    from drtool.peer import make_client

    with make_client({"url": replica_url, "token_file": token_file, "ca": ca, "insecure": insecure}) as client:
        return roles.server_group(client, name)


def _demote_group(group: Any, timeout: float, force: bool, root: str | None) -> dict[str, Any]:
    """Demote every member together: in the agent serving them (it holds their engines), or
    here on the members opened for it."""
    from contextlib import ExitStack

    from drtool.errors import StateError

    root = state_root(root)
    served = [m for m in group.members if agent_socket(m, root)]
    args = {"group": group.name, "members": list(group.members), "timeout": timeout, "force": force}
    if served:
        if len(served) != len(group.members):
            others = [m for m in group.members if m not in served]
            raise StateError(f"group {group.name}: the agent serves {', '.join(served)} but not "
                             f"{', '.join(others)}; one agent serves a whole group (drtool attach "
                             f"{others[0]})")
        return control.call(_agent(root), "demote_group", args)
    with ExitStack() as stack:
        engines = [stack.enter_context(_open(root, member)) for member in group.members]
        _ship_as_group(stack, group, {e.name: e for e in engines}, root)
        return roles.demote_group(group.name, engines, timeout=timeout, force=force)


def _ship_as_group(stack: Any, group: Any, engines: dict[str, Engine], root: str) -> None:
    """Members opened here ship through a GroupReplicator (whole group transactions) when the
    group is protected; it is detached when ``stack`` closes, before the engines."""
    if _protected_peer(group, root) is None:
        return
    from drtool.group_replication import GroupReplicator

    replicator = GroupReplicator(group, engines, root=root)
    stack.callback(replicator.detach)


def _group_snapshot(client: Any, action: str, group: str, members: list[str], snap: str,
                    url: str) -> dict[str, Any]:
    """A group's snapshots: created by the replica server at one point between two group
    transactions (every member at once); listed and deleted member by member."""
    from drtool.errors import DrtoolError

    if action == "create":
        return {"group": group, "replica_url": url, "changed": True, "members": members,
                "snapshot": client.group_snapshot(group, snap)}
    listed = {member: client.list_snapshots(member) for member in members}
    if action == "list":
        names = [{m: {s["name"] for s in listed[m]} for m in members}]
        common = sorted(set.intersection(*names[0].values())) if members else []
        return {"group": group, "replica_url": url, "members": listed, "snapshots": common}
    deleted = []
    for member in members:
        if any(s["name"] == snap for s in listed[member]):
            client.delete_snapshot(member, snap)
            deleted.append(member)
    if not deleted:
        raise DrtoolError(f"group {group} has no snapshot {snap} on {url}")
    return {"group": group, "replica_url": url, "changed": True, "deleted": snap, "members": deleted}


def _verify_group(group: str, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every member's verify, and the group's verdict: the worst member's."""
    order = ("differ", "pending", "equal")
    worst = min((r["result"] for r in results.values()), key=order.index, default="equal")
    return {"group": group, "members": results, "result": worst, "in_sync": worst == "equal",
            "regions_compared": sum(r["regions_compared"] for r in results.values()),
            "bytes_read": sum(r["bytes_read"] for r in results.values()),
            "differ": sorted(m for m, r in results.items() if r["result"] == "differ"),
            "pending": sorted(m for m, r in results.items() if r["result"] == "pending")}


def group_status(name: str | None = None, root: str | None = None,
                 probe_peer: bool = True) -> dict[str, Any] | list[dict[str, Any]]:
    """The status of one consistency group (a dict), or of every group under the state root (a
    list): its members' status summaries, the group's lag (its recovery point: the oldest write
    not acknowledged on any member), whether its replica is write-order consistent and why not,
    and what to do (schema ``drtool.group-status/1``, docs/status.md)."""
    from drtool.storage.groups import load_group, load_groups

    root = state_root(root)
    groups = [load_group(root, validate_name(name, "group name"))] if name else load_groups(root)
    out = [_one_group_status(group, root, probe_peer) for group in groups]
    return out[0] if name else out


def _one_group_status(group: Any, root: str, probe_peer: bool) -> dict[str, Any]:
    from drtool.errors import DrtoolError
    from drtool.peer import make_client
    from drtool.status import group_status as compose

    members: dict[str, dict[str, Any] | None] = {}
    errors: dict[str, str] = {}
    for member in group.members:
        try:
            members[member] = status(member, root=root, probe_peer=probe_peer)[0]
        except DrtoolError as exc:
            members[member], errors[member] = None, str(exc)
    server = server_error = None
    probed = False
    present = [s for s in members.values() if s is not None]
    peers = {(s.get("peer") or {}).get("url"): s["peer"] for s in present if s.get("peer")}
    if (probe_peer and len(peers) == 1 and present and all(s.get("role") == "primary" for s in present)
            and all(s["peer"].get("reachable") is not False for s in present)):
        peer = next(iter(peers.values()))
        try:
            with make_client(peer, timeout=5.0) as client:
                server = roles.server_group(client, group.name)
            probed = True
        except DrtoolError as exc:
            server_error = str(exc)
    return compose(group.to_json(), members, errors, server=server, server_error=server_error,
                   server_probed=probed)


# -- consistency groups (docs/internals.md "Consistency groups") ----------------------------


def _protected_peer(group: Any, root: str) -> dict[str, Any] | None:
    """The replica server the group replicates to: its members' common peer, or None when any
    member is unprotected (the group is not protected yet).  UsageError when they differ."""
    from drtool.errors import UsageError

    peers = {}
    for member in group.members:
        with Volume.inspect(root, member) as volume:
            peers[member] = dict(volume.record.peer or {}) or None
    if any(p is None for p in peers.values()):
        return None
    urls = {p["url"] for p in peers.values() if p}
    if len(urls) != 1:
        raise UsageError(f"group {group.name}: its members replicate to different servers "
                         f"({', '.join(sorted(urls))}): protect the group with one --peer")
    return peers[group.members[0]]


def _set_server_group(group: Any, peer: dict[str, Any], members: list[str]) -> None:
    """Make the replica server's group hold exactly ``members`` (deleted when none)."""
    from drtool.errors import GroupNotFound
    from drtool.peer import make_client

    with make_client(peer) as client:
        if members:
            client.ensure_group(group.name, group.group_id, members)
        else:
            try:
                client.delete_group(group.name)
            except GroupNotFound:
                pass


def _notify_agent(root: str) -> None:
    """A running agent of this state root re-reads the groups (one group replicator per group
    whose members it serves, the others' volumes replicate alone)."""
    from drtool.storage.paths import agent_control_socket

    path = agent_control_socket(root)
    if control.is_listening(path):
        control.call(path, "groups", {})


def _check_members(root: str, name: str, members: list[str]) -> list[str]:
    from drtool.errors import Conflict, UsageError, VolumeNotFound

    validate_name(name, "group name")
    if not isinstance(members, list) or not members:
        raise UsageError(f"group {name}: name at least one volume")
    registered = set(list_volumes(root))
    if name in registered:
        raise Conflict(f"{name} is the name of a volume: volumes and groups share one namespace")
    for member in members:
        if validate_name(member) not in registered:
            raise VolumeNotFound(member, root)
    return list(members)


def group_create(name: str, members: list[str], root: str | None = None) -> dict[str, Any]:
    """Create a consistency group of registered volumes (one group per volume).  When every member
    is protected, with one peer, the replica server's group is created too and the group
    replicates as one from now on; otherwise ``drtool protect NAME --peer URL`` does that."""
    from drtool.storage import groups

    root = state_root(root)
    members = _check_members(root, name, members)
    # Members replicating to different servers are refused before anything is written.
    peer = _protected_peer(groups.GroupRecord(name, "", list(members)), root)
    record = groups.create_group(root, name, members)
    if peer is not None:
        _set_server_group(record, peer, record.members)
    _notify_agent(root)
    return {"group": name, "group_id": record.group_id, "members": record.members, "changed": True,
            "protected": peer is not None}


def group_add(name: str, volumes: list[str], root: str | None = None) -> dict[str, Any]:
    """Add volumes to a group (idempotent).  In a protected group, a new member that is not
    protected is paired with the group's peer first (its initial sync); one that is, in sync with
    the same peer, ships nothing extra: its replica is already in sync."""
    from drtool.errors import GroupNotFound, UsageError
    from drtool.storage import groups

    root = state_root(root)
    group = _group_named(name, root)
    if group is None:
        raise GroupNotFound(name, root)
    _check_members(root, name, volumes)
    peer = _protected_peer(group, root)
    if peer is not None:
        for volume in volumes:
            if volume in group.members:
                continue
            with Volume.inspect(root, volume) as inspected:
                own = inspected.record.peer
            if own is None:
                protect(volume, peer["url"], peer.get("token_file"), peer.get("ca"), root=root,
                        insecure=bool(peer.get("insecure")))
            elif own["url"] != peer["url"]:
                raise UsageError(f"volume {volume} replicates to {own['url']}, group {name} to {peer['url']}: "
                                 "a group replicates to one server")
    record, new = groups.add_members(root, name, volumes)
    if peer is not None and new:
        _set_server_group(record, peer, record.members)
    if new:
        _notify_agent(root)
    return {"group": name, "members": record.members, "added": new, "changed": bool(new)}


def group_remove(name: str, volumes: list[str], root: str | None = None) -> dict[str, Any]:
    """Remove volumes from a group (idempotent): each replicates alone again, and leaves the
    replica server's group."""
    from drtool.errors import GroupNotFound
    from drtool.storage import groups

    root = state_root(root)
    group = _group_named(name, root)
    if group is None:
        raise GroupNotFound(name, root)
    peer = _protected_peer(group, root)
    record, gone = groups.remove_members(root, name, [validate_name(v) for v in volumes])
    if peer is not None and gone:
        _set_server_group(record, peer, record.members)
    if gone:
        _notify_agent(root)
    return {"group": name, "members": record.members, "removed": gone, "changed": bool(gone)}


def group_delete(name: str, root: str | None = None) -> dict[str, Any]:
    """Delete a group (its volumes stay, each replicating alone again); idempotent."""
    from drtool.storage import groups

    root = state_root(root)
    group = _group_named(name, root)
    if group is None:
        return {"group": name, "changed": False}
    peer = _protected_peer(group, root)
    groups.delete_group(root, name)
    if peer is not None:
        _set_server_group(group, peer, [])
    _notify_agent(root)
    return {"group": name, "members": group.members, "changed": True}


def _protect_group(group: Any, args: dict[str, Any], root: str | None, progress: Progress | None) -> dict[str, Any]:
    """Pair every member with the same peer (each member's initial sync or resume, as protect of
    a volume), then create the replica server's group: from then on the members replicate as
    one.  A member that needs a sync leaves the server's group while it runs (its records come
    on their own until it is in sync: the group is not write-order consistent meanwhile)."""
    from drtool.errors import Conflict, GroupNotFound
    from drtool.peer import make_client

    root = state_root(root)
    peer = {"url": args["peer"].rstrip("/"), "token_file": args["token_file"], "ca": args["ca"],
            "insecure": args["insecure"]}
    with make_client(peer) as client:
        try:
            info: dict[str, Any] | None = client.group_info(group.name)
        except GroupNotFound:
            info = None
    if info is not None and info.get("group_id") != group.group_id:
        raise Conflict(f"the replica server {peer['url']} has another group called {group.name} "
                       f"(group id {info.get('group_id')}, this one is {group.group_id})")
    in_sync = []
    for member in group.members:
        with Volume.inspect(root, member) as volume:
            record = volume.record
            if (record.peer and record.peer.get("url") == peer["url"]
                    and record.replication.initial_sync == "done" and not volume.norecord.any()):
                in_sync.append(member)
    needing = [m for m in group.members if m not in in_sync]
    results: dict[str, Any] = {}
    if info is not None and needing and not args["plan_only"]:
        _set_server_group(group, peer, [m for m in info.get("members", []) if m in in_sync])
    for member in group.members:
        if member in needing or args["plan_only"]:
            results[member] = _run(member, root, "protect", dict(args), progress)
        else:
            results[member] = {"volume": member, "peer": peer["url"], "changed": False, "plan": {"mode": "in sync"}}
    changed = any(r.get("changed") for r in results.values())
    if not args["plan_only"]:
        if info is None or sorted(info.get("members", [])) != sorted(group.members) or needing:
            _set_server_group(group, peer, group.members)
            changed = True
        _notify_agent(root)
    return {"group": group.name, "peer": peer["url"], "changed": changed, "members": results}


def _run_member(group: Any, name: str, op: str, args: dict[str, Any], root: str | None,
                progress: Progress | None = None) -> Any:
    """An operation that ships (replicate, verify's repair) on one member without an agent: its
    group's members opened here, its own replicator shipping through the group (forced regions:
    whole transactions up to a cut), never alone (the server refuses a member's own records)."""
    from contextlib import ExitStack

    from drtool.group_replication import GroupReplicator

    with ExitStack() as stack:
        engines = {m: stack.enter_context(_open(root, m)) for m in group.members}
        replicator = GroupReplicator(group, engines, root=state_root(root))
        try:
            return ops.run(engines[name], op, args, progress)
        finally:
            replicator.detach()


def _shipping_group(name: str, root: str | None) -> Any:
    """The protected group of member ``name`` when no agent serves it (its shipping must then go
    through the group opened here), else None."""
    from drtool.storage.groups import group_of

    owner = group_of(state_root(root), validate_name(name))
    if owner is None or agent_socket(name, root):
        return None
    group = _group_named(owner, root)
    return group if _protected_peer(group, state_root(root)) is not None else None


def _replicate_group(group: Any, wait: bool, timeout: float, root: str | None) -> dict[str, Any]:
    """Ship the group's pending records in whole transactions (through the agent when it serves
    the group, else with the members opened here)."""
    root = state_root(root)
    socket_path = agent_socket(group.members[0], root)
    if socket_path:
        result = control.call(socket_path, "replicate", {"wait": wait, "timeout": timeout, "group": True})
        return {"group": group.name, **result}
    from contextlib import ExitStack

    from drtool.group_replication import GroupReplicator

    with ExitStack() as stack:
        engines = {m: stack.enter_context(_open(root, m)) for m in group.members}
        replicator = GroupReplicator(group, engines, root=root)
        try:
            return {"group": group.name, **ops.replicate_group(replicator, wait, timeout)}
        finally:
            replicator.detach()


# -- the long-running services (drtool agent, drtool serve) -------------------------------------


def run_agent(names: list[str], root: str | None, nbd_socket: str | None, listen: str | None,
              tls: dict[str, str | None], metrics: dict[str, Any], service: dict[str, Any],
              render: Callable[[dict[str, Any]], str], out: Callable[[str], None],
              setup_logging: Callable[[], None] = lambda: None) -> int:
    """Serve ``names`` over NBD until SIGTERM/SIGINT (drtool.agent).  Everything is checked (TLS
    keys loaded, metrics flags) before a daemon detaches (``service``: detach, pid_file,
    log_file), so a mistake fails at once; once the listeners are bound the announcement
    (``render`` of the addresses) goes to the waiting parent or systemd, then to ``out``."""
    from drtool import agent, daemon
    from drtool.errors import DrtoolError
    from drtool.metrics import metrics_listen

    nbd_tcp = agent.nbd_tcp(listen, tls.get("cert"), tls.get("key"), tls.get("ca"))
    metrics_at = metrics_listen(**metrics)
    if nbd_socket and nbd_socket != "none":
        nbd_socket = os.path.abspath(nbd_socket)
    notify = daemon.start_service(service.get("detach", False), service.get("pid_file"), service.get("log_file"))
    setup_logging()

    def announce(addresses: dict[str, Any]) -> None:
        text = render(addresses)
        daemon.ready(notify, text)
        out(text)

    try:
        return agent.run(root, names, nbd_socket, nbd_tcp, announce, metrics_at)
    except DrtoolError as exc:
        if notify:
            notify(False, str(exc), int(exc.exit_code))
        raise


def run_replica_server(root: str, listen: str, token_file: str | None, tls: dict[str, str | None],
                       limits: dict[str, Any], journal_limit: int | None, insecure: bool,
                       metrics: dict[str, Any], service: dict[str, Any],
                       render: Callable[[dict[str, Any]], str], out: Callable[[str], None],
                       setup_logging: Callable[[], None] = lambda: None) -> int:
    """Serve replicas under ``root`` until SIGTERM/SIGINT (drtool.replica.server), as a service
    like :func:`run_agent`; ``render`` gets ``{"address", "metrics"}``.  ``journal_limit``: None
    for the default."""
    from drtool import daemon
    from drtool.errors import DrtoolError
    from drtool.metrics import metrics_listen
    from drtool.replica.journal import DEFAULT_JOURNAL_LIMIT
    from drtool.replica.server import Limits, serve

    metrics_at = metrics_listen(**metrics)
    notify = daemon.start_service(service.get("detach", False), service.get("pid_file"), service.get("log_file"))
    setup_logging()

    def announce(address: str, metrics_url: str | None = None) -> None:
        text = render({"address": address, "metrics": metrics_url})
        daemon.ready(notify, text)
        out(text)

    try:
        return serve(root=root, listen=listen, token_file=token_file, tls_cert=tls.get("cert"),
                     tls_key=tls.get("key"), announce=announce, limits=Limits(**limits),
                     journal_limit=DEFAULT_JOURNAL_LIMIT if journal_limit is None else journal_limit,
                     insecure=insecure, metrics_listen=metrics_at)
    except DrtoolError as exc:
        if notify:
            notify(False, str(exc), int(exc.exit_code))
        raise
