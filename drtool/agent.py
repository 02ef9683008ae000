"""The agent: the long-running primary process.

It holds each volume it serves (the volume's lock), exports it over NBD, ships
its log to the secondary in the background, checkpoints its maps every few
seconds, and answers the CLI and the Ansible modules on a control socket in each
volume's state directory (``agent.sock``, mode 0600), so nobody has to stop it to
run status, scrub, recover, failback, replicate, read or adopt.

Volumes join and leave the running agent (``drtool attach NAME``, ``drtool detach
NAME``) through its own control socket, ``@agent.sock`` in the state root: one
agent per state root.  The NBD clients of the other volumes never notice; a
volume with clients connected is not detached unless forced (they are then
disconnected, their requests in flight answered first).

Who can reach the volumes over NBD.  By default only the Unix socket
(``--nbd-socket``, default ``nbd.sock`` in the state root): mode 0600, owned by
the user the agent runs as, in a directory no other user can write.  TCP only
with ``--listen HOST:PORT``: off loopback it requires TLS (``--tls-cert`` and
``--tls-key``, plus ``--tls-ca`` to require client certificates), as nbdkit's
``--tls=require`` does; on loopback without TLS it starts with a warning,
since every local user can then read and write the volumes.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from drtool import control, metrics, ops, roles, status
from drtool.engine import Engine
from drtool.errors import DrtoolError, ExportBusy, StateError, UsageError
from drtool.export import EngineExport
from drtool.nbd.server import NbdServer
from drtool.nbd.tls import server_context
from drtool.tls import is_loopback
from drtool.progress import Progress
from drtool.replication import Replicator
from drtool.storage.paths import agent_control_socket, state_root, validate_name

log = logging.getLogger("drtool.agent")

DEFAULT_NBD_PORT = 10809
#: the NBD Unix socket without --nbd-socket, in the state root
DEFAULT_NBD_SOCKET = "nbd.sock"
SAVE_INTERVAL = 2.0
#: how long removing a volume waits for operations running on it (a status, a read) to end
DRAIN_SECONDS = 5.0
CLOSING_CLIENT_GRACE = 1.0  # seconds a just-disconnected NBD client may take to be forgotten
TLS_FLAGS = "--tls-cert FILE and --tls-key FILE (and --tls-ca FILE to require client certificates)"


def parse_listen(text: str | None, default_port: int = DEFAULT_NBD_PORT) -> tuple[str, int] | None:
    """``--listen``: HOST:PORT ([V6]:PORT), HOST alone (port 10809), or none/empty: no TCP."""
    if not text or text == "none":
        return None
    host, _, port = text.rpartition(":")
    if not host or (text.startswith("[") and not host.endswith("]")):
        host, port = text, str(default_port)
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT")
    return host, int(port)


@dataclass(frozen=True)
class NbdTcp:
    """The agent's TCP listener: where, and its TLS context (None: plain, loopback only)."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    client_certificates: bool = False

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def nbd_tcp(listen: str | None, tls_cert: str | None = None, tls_key: str | None = None,
            tls_ca: str | None = None) -> NbdTcp | None:
    """Check ``--listen`` and the TLS flags together; load the certificate and key.

    No --listen: no TCP at all, and TLS flags are refused (they would protect
    nothing).  TLS is required beyond loopback.
    """
    address = parse_listen(listen)
    given = [flag for flag, value in (("--tls-cert", tls_cert), ("--tls-key", tls_key),
                                      ("--tls-ca", tls_ca)) if value]
    if address is None:
        if given:
            raise UsageError(f"{', '.join(given)} protect the TCP listener: give --listen HOST:PORT too "
                             "(without it the agent serves only its Unix socket)")
        return None
    host, port = address
    if given:
        if not (tls_cert and tls_key):
            raise UsageError(f"NBD over TLS needs {TLS_FLAGS}")
        return NbdTcp(host, port, server_context(tls_cert, tls_key, tls_ca), bool(tls_ca))
    if not is_loopback(host):
        raise UsageError(
            f"--listen {listen}: NBD on an address other hosts can reach requires TLS: give {TLS_FLAGS}, "
            "or listen on loopback (127.0.0.1), or serve only the Unix socket (no --listen)")
    return NbdTcp(host, port)


@dataclass(eq=False)
class Served:
    """One volume the agent serves: its engine, its NBD export, its control socket, and the
    replicator thread (stopped by ``stop``)."""

    engine: Engine
    export: EngineExport
    control: control.ControlServer | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    #: stops its own replicator thread only (it joins a group replicator, or leaves the agent)
    rep_stop: threading.Event = field(default_factory=threading.Event)
    #: operations running on its control socket now (``remove`` waits for them)
    busy: list[str] = field(default_factory=list)
    #: being removed: its control socket takes no new operation
    leaving: bool = False
    closed: bool = False


class Agent:
    """Serves a set of volumes of one state root; volumes join and leave it while it runs
    (:meth:`add`, :meth:`remove`, through its own control socket ``@agent.sock`` in the state
    root), and the clients of the others never notice."""

    def __init__(self, root: str | None, names: list[str], nbd_socket: str | None = None,
                 listen: NbdTcp | tuple[str, int] | None = None,
                 metrics_listen: metrics.MetricsListen | None = None) -> None:
        if not names:
            raise UsageError("name at least one volume to serve")
        self.root = state_root(root)
        self.initial = [validate_name(n) for n in names]
        if len(set(self.initial)) != len(self.initial):
            raise UsageError("a volume is named twice")
        if isinstance(listen, tuple):
            listen = nbd_tcp(f"[{listen[0]}]:{listen[1]}")
        if nbd_socket == "none":
            if listen is None:
                raise UsageError("--nbd-socket none without --listen: the volumes would not be served")
            nbd_socket = None
        else:
            nbd_socket = os.path.abspath(nbd_socket or os.path.join(self.root, DEFAULT_NBD_SOCKET))
        self.nbd_socket = nbd_socket
        self.listen = listen
        self.served: dict[str, Served] = {}
        #: what NBD serves: replaced, never mutated (the server reads it at every request)
        self.exports: dict[str, EngineExport] = {}
        self.control: control.ControlServer | None = None
        self.threads: list[threading.Thread] = []
        self.stop_event = threading.Event()
        self.nbd: NbdServer | None = None
        self.started = time.time()
        self.metrics_listen, self.metrics = metrics_listen, None
        # _cond guards served, exports and each Served's busy/leaving; _changing lets one
        # add or remove run at a time; _saving keeps a checkpoint off an engine being closed.
        self._cond = threading.Condition(threading.RLock())
        self._changing = threading.RLock()
        self._saving = threading.Lock()
        #: one group replicator per consistency group whose members this agent serves, protected
        #: with one peer: (replicator, its stop event, its thread)
        self.group_replicators: dict[str, tuple[Any, threading.Event, threading.Thread]] = {}

    @property
    def names(self) -> list[str]:
        with self._cond:
            return list(self.served)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        try:
            self.initial = self._with_groups(self.initial)
            for name in self.initial:
                served = self._open(name)
                with self._cond:  # at once: a failure below closes what is open
                    self.served[name] = served
            opened = list(self.served.values())
            self.exports = {name: served.export for name, served in self.served.items()}
            tcp = self.listen
            self.nbd = NbdServer(lambda: self.exports, unix_path=self.nbd_socket,
                                 tcp=(tcp.host, tcp.port) if tcp else None, tcp_tls=tcp.tls if tcp else None)
            self.nbd.start()
            if tcp is not None and tcp.tls is None:
                where = f"{tcp.host}:{self.nbd.tcp_port}"
                log.warning("NBD on TCP %s WITHOUT TLS: any local user can read and write these volumes "
                            "(%s). Give --tls-cert and --tls-key, or drop --listen and use the Unix "
                            "socket%s.", where, ", ".join(self.initial),
                            f" {self.nbd_socket}" if self.nbd_socket else "")
            self.control = control.ControlServer(agent_control_socket(self.root), self._agent_handlers(),
                                                 busy_hint="another agent serves this state root: have it "
                                                 "serve more volumes with `drtool attach NAME`")
            self.control.start()
            self.refresh_groups()
            for served in opened:
                self._start_serving(served)
            self._thread("checkpoint", self._checkpoint_loop)
            if self.metrics_listen is not None:
                self.metrics = metrics.MetricsServer(self.metrics_listen, metrics.AgentCollector(
                    self._metric_facts, self.started, self._metric_groups, status.group_status)).start()
        except BaseException:
            self.shutdown()
            raise

    def _thread(self, name: str, target: Callable[..., Any], *args: Any, **kwargs: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, kwargs=kwargs, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def _open(self, name: str) -> Served:
        engine = Engine.open(self.root, name)
        try:
            if engine.protected:
                Replicator(engine)
            return Served(engine, EngineExport(engine))
        except BaseException:
            engine.close()
            raise

    def _start_serving(self, served: Served) -> None:
        """Its control socket and, when it has a peer, its replicator thread."""
        served.control = control.ControlServer(served.engine.volume.paths.control_socket, self._handlers(served))
        served.control.start()
        self._start_replicator(served)

    def _start_replicator(self, served: Served) -> None:
        from drtool.storage.groups import group_of

        engine = served.engine
        if (engine.replicator is None or engine.replicator.group is not None or served.stop.is_set()
                or served.closed or any(t.is_alive() for t in served.threads)):
            return
        if group_of(self.root, engine.name) is not None:
            return  # a member's records go only in its group's transactions (refresh_groups)
        served.rep_stop = threading.Event()
        thread = threading.Thread(
            target=engine.replicator.run, args=(served.rep_stop,), name=f"replicate:{engine.name}", daemon=True,
            kwargs={"on_error": lambda exc, n=engine.name: log.warning("volume %s: replication: %s", n, exc)})
        thread.start()
        served.threads.append(thread)

    def _stop_replicator(self, served: Served) -> None:
        served.rep_stop.set()
        for thread in served.threads:
            thread.join(timeout=30)
        served.threads = [t for t in served.threads if t.is_alive()]

    # -- consistency groups ------------------------------------------------------------

    def _with_groups(self, names: list[str]) -> list[str]:
        """``names`` and every other member of their groups: a group is served whole (its
        transactions need every member's log), so serving one member attaches the rest."""
        from drtool.storage.groups import load_groups

        out = list(names)
        for group in load_groups(self.root):
            if any(n in group.members for n in names):
                added = [m for m in group.members if m not in out]
                if added:
                    log.info("group %s: serving its members %s too (a group is served whole)", group.name,
                             ", ".join(added))
                out += added
        return out

    def refresh_groups(self) -> dict[str, Any]:
        """One group replicator per group whose members are all served and protected with one peer;
        every other served volume replicates alone.  Run at start, after attach/detach and when
        the groups change (api.group_*, protect of a group: the ``groups`` control request)."""
        from drtool.group_replication import GroupReplicator
        from drtool.storage.groups import load_groups

        with self._changing:
            with self._cond:
                served = dict(self.served)
            wanted: dict[str, Any] = {}
            for group in load_groups(self.root):
                members = [served.get(m) for m in group.members]
                if all(s is not None and s.engine.replicator is not None for s in members):
                    urls = {s.engine.record.peer["url"] for s in members if s is not None}
                    if len(urls) == 1:
                        wanted[group.name] = group
                    else:
                        log.warning("group %s: members replicate to different servers; not replicated as a group",
                                    group.name)
            for name, (replicator, stop, thread) in list(self.group_replicators.items()):
                group = wanted.get(name)
                stale = (group is None or sorted(group.members) != replicator.members
                         or any(served[m].engine.replicator is not replicator.replicators[m] for m in replicator.members))
                if stale:
                    stop.set()
                    thread.join(timeout=30)
                    replicator.detach()
                    del self.group_replicators[name]
            for name, group in wanted.items():
                if name in self.group_replicators:
                    continue
                for member in group.members:
                    self._stop_replicator(served[member])
                replicator = GroupReplicator(group, {m: served[m].engine for m in group.members}, root=self.root)
                stop = threading.Event()
                thread = threading.Thread(
                    target=replicator.run, args=(stop,), name=f"replicate-group:{name}", daemon=True,
                    kwargs={"on_error": lambda exc, n=name: log.warning("group %s: replication: %s", n, exc)})
                thread.start()
                self.group_replicators[name] = (replicator, stop, thread)
                log.info("group %s: replicating %s as one (group transactions)", name, ", ".join(group.members))
            grouped = {m for group in load_groups(self.root) for m in group.members}
            for name, each in served.items():
                if name in grouped:
                    if not any(name in r.members for r, _, _ in self.group_replicators.values()):
                        self._stop_replicator(each)  # a member's records go only with its group's
                elif not each.closed and not each.leaving and each.control is not None:
                    self._start_replicator(each)  # those no group replicator took
            return {"groups": sorted(self.group_replicators)}

    def _leave_group(self, name: str) -> None:
        """``name`` leaves the agent: its group's replicator stops first (it needs every member)."""
        for group, (replicator, stop, thread) in list(self.group_replicators.items()):
            if name in replicator.members:
                stop.set()
                thread.join(timeout=30)
                replicator.detach()
                del self.group_replicators[group]
                log.warning("group %s: not replicated while %s is not served here", group, name)

    def _close(self, served: Served) -> None:
        """Stop its replicator and control socket, then save and close its engine."""
        served.stop.set()
        served.rep_stop.set()
        if served.control is not None:
            served.control.stop()
        for thread in served.threads:
            thread.join(timeout=30)
        with self._saving:
            served.closed = True
            try:
                served.engine.close()
            except DrtoolError as exc:
                log.error("volume %s: closing: %s", served.engine.name, exc)

    def _checkpoint_loop(self) -> None:
        seen: dict[str, Any] = {}
        while not self.stop_event.wait(SAVE_INTERVAL):
            with self._cond:
                serving = list(self.served.values())
            for served in serving:
                engine = served.engine
                with self._saving:
                    if served.closed or served.leaving:
                        continue
                    # Reads change map pages too (the block digests they remember): those count.
                    marker = (id(served), engine.log.next_seq, engine.log.pending_bytes, engine.record.mode,
                              engine.volume.dirty_bytes)
                    if marker != seen.get(engine.name):
                        try:
                            engine.save()
                            seen[engine.name] = (*marker[:4], engine.volume.dirty_bytes)
                        except DrtoolError as exc:
                            log.error("volume %s: checkpoint failed: %s", engine.name, exc)

    def _metric_groups(self) -> list[dict[str, Any]]:
        """The consistency groups of the state root (a scrape composes their states)."""
        from drtool.storage.groups import load_groups

        return [group.to_json() for group in load_groups(self.root)]

    def _metric_facts(self) -> list[metrics.VolumeFacts]:
        """What a scrape reads of each volume served now: the status ``status --json`` shows."""
        with self._cond:
            serving = [served.engine for served in self.served.values()]
        return [metrics.VolumeFacts(engine.name, lambda e=engine: ops.status(e, probe_peer=False), engine.replicator,
                                    metrics.of(engine)) for engine in serving]

    def addresses(self) -> dict[str, Any]:
        port = self.nbd.tcp_port if self.nbd else None
        tcp = NbdTcp(self.listen.host, port) if self.listen and port else None
        scheme = "nbds" if self.listen and self.listen.tls else "nbd"
        return {
            "pid": os.getpid(),
            "nbd_socket": self.nbd_socket,
            "tcp": tcp.where if tcp else None,
            "tls": bool(tcp and self.listen.tls),
            "tls_client_certificates": bool(tcp and self.listen.client_certificates),
            "metrics": self.metrics.url if self.metrics else None,
            "uris": {name: ([f"nbd+unix:///{name}?socket={self.nbd_socket}"] if self.nbd_socket else [])
                     + ([f"{scheme}://{tcp.where}/{name}"] if tcp else []) for name in self.names},
        }

    def wait(self) -> None:
        self.stop_event.wait()

    def shutdown(self) -> None:
        self.stop_event.set()
        if self.metrics is not None:
            self.metrics.stop()
        if self.nbd is not None:
            self.nbd.stop()
        if self.control is not None:
            self.control.stop()
        for thread in self.threads:
            thread.join(timeout=30)
        for replicator, stop, thread in list(self.group_replicators.values()):
            stop.set()
            thread.join(timeout=30)
            replicator.detach()
        self.group_replicators.clear()
        with self._cond:
            serving = list(self.served.values())
            self.served.clear()
            self.exports = {}
        for served in serving:
            self._close(served)

    # -- volumes joining and leaving -------------------------------------------------

    def add(self, name: str) -> dict[str, Any]:
        """Serve one more registered volume (and the rest of its group); the others' clients are
        not disturbed."""
        name = validate_name(name)
        with self._changing:
            if name in self.served:
                return {"volume": name, "changed": False, "uris": self.addresses()["uris"][name]}
            for other in self._with_groups([name])[1:]:
                if other not in self.served:
                    self._add_one(other)
            result = self._add_one(name)
            self.refresh_groups()
            return result

    def _add_one(self, name: str) -> dict[str, Any]:
        with self._changing:
            served = self._open(name)
            try:
                self._start_serving(served)
            except BaseException:
                self._close(served)
                raise
            with self._cond:
                self.served[name] = served
                self.exports = {**self.exports, name: served.export}
        log.info("volume %s: now served", name)
        return {"volume": name, "changed": True, "uris": self.addresses()["uris"][name]}

    def remove(self, name: str, force: bool = False, then: Callable[[Served], Any] | None = None,
               drain: float = DRAIN_SECONDS) -> dict[str, Any]:
        """Stop serving ``name`` and release it (saved, unlocked); the others' clients are not
        disturbed.

        Refused (ExportBusy) while NBD clients are connected to it, unless ``force``: they are
        then disconnected (their requests in flight finish first).  Refused too while an
        operation runs on it (a failback, a verify) after waiting ``drain`` seconds for it.
        ``then(served)`` runs once nobody uses the volume, before it is closed; if it fails,
        the volume stays served as it was."""
        name = validate_name(name)
        with self._changing:
            served = self.served.get(name)
            if served is None:
                return {"volume": name, "changed": False, "disconnected": []}
            with self._cond:
                served.leaving = True
                if not self._cond.wait_for(lambda: not served.busy, timeout=drain):
                    running = ", ".join(served.busy)
                    served.leaving = False
                    raise ExportBusy(f"volume {name} is busy: {running} runs on it; remove it once that "
                                     "finished")
                self.exports = {n: e for n, e in self.exports.items() if n != name}
            clients = self.nbd.clients(name) if self.nbd else []
            # A client that has just closed its socket is still counted until its connection's
            # thread sees the end (milliseconds): give those a moment (no new one can connect,
            # the export is gone) before refusing, so "disconnect, then detach" works.
            deadline = time.monotonic() + CLOSING_CLIENT_GRACE
            while clients and not force and time.monotonic() < deadline:
                time.sleep(0.02)
                clients = self.nbd.clients(name)
            if clients and not force:
                self._keep(served)
                raise ExportBusy(
                    f"volume {name} has {len(clients)} NBD client{'s' if len(clients) != 1 else ''} connected "
                    f"({', '.join(clients)}): disconnect {'them' if len(clients) != 1 else 'it'} first (e.g. "
                    "nbd-client -d /dev/nbdX), or force it to cut them off")
            dropped = self.nbd.disconnect(name) if self.nbd else []
            self._leave_group(name)
            result: Any = None
            if then is not None:
                with self._saving:
                    pass  # a checkpoint of it that began before it was leaving has ended
                try:
                    result = then(served)
                except BaseException:
                    self._keep(served)
                    raise
            with self._cond:
                del self.served[name]
            self._close(served)
        if dropped:
            log.warning("volume %s: no longer served; disconnected %s", name, ", ".join(dropped))
        else:
            log.info("volume %s: no longer served", name)
        return {"volume": name, "changed": True, "disconnected": dropped,
                **({"result": result} if then is not None else {})}

    def _keep(self, served: Served) -> None:
        """A removal that did not happen: serve it again as before."""
        with self._cond:
            self.exports = {**self.exports, served.engine.name: served.export}
            served.leaving = False
        self.refresh_groups()

    # -- control handlers ------------------------------------------------------------

    def _agent_handlers(self) -> dict[str, control.Handler]:
        """The agent's own control socket: which volumes it serves, add and remove them."""

        def volumes(args: dict[str, Any], progress: Progress) -> dict[str, Any]:
            return {"volumes": self.names, "started": self.started, "state_root": self.root,
                    **self.addresses()}

        return {
            "volumes": volumes,
            "attach": lambda args, progress: self.add(args.get("name")),
            "detach": lambda args, progress: self.remove(args.get("name"), force=bool(args.get("force"))),
            "demote_group": lambda args, progress: self._demote_group(args),
            "groups": lambda args, progress: self.refresh_groups(),
        }

    def _demote_group(self, args: dict[str, Any]) -> dict[str, Any]:
        """Demote a consistency group's members together (drtool.roles.demote_group): they are
        all served here, each marked busy meanwhile so none leaves the agent mid-swap."""
        names = [validate_name(n) for n in args.get("members") or []]
        with self._cond:
            missing = [n for n in names if n not in self.served or self.served[n].leaving or self.served[n].closed]
            if missing:
                raise StateError(f"group {args.get('group')}: this agent does not serve {', '.join(missing)}")
            members = [self.served[n] for n in names]
            for served in members:
                served.busy.append("demote")
        try:
            return roles.demote_group(str(args.get("group")), [s.engine for s in members],
                                      timeout=float(args.get("timeout", 60.0)), force=bool(args.get("force")))
        finally:
            with self._cond:
                for served in members:
                    served.busy.remove("demote")
                self._cond.notify_all()

    def _handlers(self, served: Served) -> dict[str, control.Handler]:
        """One handler per operation of drtool.ops.OPERATIONS (the registry api uses too), run
        with the arguments as sent; what only an agent adds comes after (``_after``).  And
        ``adopt``, which hands the volume to this host's replica server and so leaves the agent."""
        engine = served.engine

        def handler(op: str) -> control.Handler:
            def handle(args: dict[str, Any], progress: Progress) -> Any:
                with self._cond:
                    if served.leaving or served.closed:
                        raise ExportBusy(f"volume {engine.name} is leaving the agent")
                    served.busy.append(op)
                try:
                    result = ops.run(engine, op, args, progress)
                    after = self._after.get(op)
                    return after(self, served, result) if after else result
                finally:
                    with self._cond:
                        served.busy.remove(op)
                        self._cond.notify_all()
            return handle

        def adopt(args: dict[str, Any], progress: Progress) -> dict[str, Any]:
            force = bool(args.pop("force", False))
            released = self.remove(engine.name, force=force,
                                   then=lambda s: roles.adopt_volume(s.engine.volume, **args))
            return {**released["result"], "left_agent": True, "disconnected": released["disconnected"]}

        return {**{op: handler(op) for op in ops.OPERATIONS}, "adopt": adopt}

    def _status(self, served: Served, result: dict[str, Any]) -> dict[str, Any]:
        result["agent"] = {"running": True, "socket": served.engine.volume.paths.control_socket,
                           "started": self.started, **self.addresses()}
        return result

    def _read(self, served: Served, result: bytes) -> control.RawResult:
        return control.RawResult({"volume": served.engine.name}, result)

    def _protect(self, served: Served, result: dict[str, Any]) -> dict[str, Any]:
        # A plan pairs nothing: there may be no replicator to run yet.
        self._start_replicator(served)
        return result

    #: What the agent adds to an operation's result (ops.OPERATIONS runs the operation itself).
    _after: dict[str, Callable[[Agent, Served, Any], Any]] = {
        "status": _status, "read": _read, "protect": _protect}


def run(root: str | None, names: list[str], nbd_socket: str | None, listen: NbdTcp | None,
        announce: Callable[[dict[str, Any]], None], metrics_listen: metrics.MetricsListen | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a clean shutdown."""
    agent = Agent(root, names, nbd_socket, listen, metrics_listen)
    previous = {sig: signal.signal(sig, lambda *_: agent.stop_event.set())
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        agent.start()
        announce(agent.addresses())
        agent.wait()
    finally:
        agent.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
