"""The agent: the long-running primary process.

It holds each volume it serves (the volume's lock), exports it over NBD, ships
its log to the secondary in the background, checkpoints its maps every few
seconds, and answers the CLI and the Ansible modules on a control socket in each
volume's state directory (``agent.sock``, mode 0600), so nobody has to stop it to
run status, scrub, recover, failback, replicate or read.

Who can reach the volumes over NBD.  By default only the Unix socket
(``--nbd-socket``, default ``nbd.sock`` in the state root): mode 0600, owned by
the user the agent runs as, in a directory no other user can write.  TCP only
with ``--listen HOST:PORT``: off loopback it requires TLS (``--tls-cert`` and
``--tls-key``, plus ``--tls-ca`` to require client certificates), as nbdkit's
``--tls=require`` does; on loopback without TLS it starts with a warning,
since every local user can then read and write the volumes.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from drtool import control, metrics, ops
from drtool.engine import Engine
from drtool.errors import DrtoolError, UsageError
from drtool.export import EngineExport
from drtool.nbd.server import NbdServer
from drtool.nbd.tls import server_context
from drtool.progress import Progress
from drtool.replication import Replicator
from drtool.storage.paths import state_root, validate_name

log = logging.getLogger("drtool.agent")

DEFAULT_NBD_PORT = 10809
#: the NBD Unix socket without --nbd-socket, in the state root
DEFAULT_NBD_SOCKET = "nbd.sock"
SAVE_INTERVAL = 2.0
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


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (a wildcard is not)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False  # binding will say what is wrong with it
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


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


class Agent:
    def __init__(self, root: str | None, names: list[str], nbd_socket: str | None = None,
                 listen: NbdTcp | tuple[str, int] | None = None,
                 metrics_listen: metrics.MetricsListen | None = None) -> None:
        if not names:
            raise UsageError("name at least one volume to serve")
        self.root = state_root(root)
        self.names = [validate_name(n) for n in names]
        if len(set(self.names)) != len(self.names):
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
        self.engines: dict[str, Engine] = {}
        self.exports: dict[str, EngineExport] = {}
        self.controls: list[control.ControlServer] = []
        self.threads: list[threading.Thread] = []
        self.stop_event = threading.Event()
        self.nbd: NbdServer | None = None
        self.started = time.time()
        self.metrics_listen, self.metrics = metrics_listen, None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        try:
            for name in self.names:
                engine = Engine.open(self.root, name)
                self.engines[name] = engine
                if engine.protected:
                    Replicator(engine)
                self.exports[name] = EngineExport(engine)
            exports = dict(self.exports)
            tcp = self.listen
            self.nbd = NbdServer(lambda: exports, unix_path=self.nbd_socket,
                                 tcp=(tcp.host, tcp.port) if tcp else None, tcp_tls=tcp.tls if tcp else None)
            self.nbd.start()
            if tcp is not None and tcp.tls is None:
                where = f"{tcp.host}:{self.nbd.tcp_port}"
                log.warning("NBD on TCP %s WITHOUT TLS: any local user can read and write these volumes "
                            "(%s). Give --tls-cert and --tls-key, or drop --listen and use the Unix "
                            "socket%s.", where, ", ".join(self.names),
                            f" {self.nbd_socket}" if self.nbd_socket else "")
            for name, engine in self.engines.items():
                server = control.ControlServer(engine.volume.paths.control_socket, self._handlers(engine))
                server.start()
                self.controls.append(server)
                if engine.replicator is not None:
                    self._thread(f"replicate:{name}", engine.replicator.run, self.stop_event,
                                 on_error=lambda exc, n=name: log.warning("volume %s: replication: %s", n, exc))
            self._thread("checkpoint", self._checkpoint_loop)
            if self.metrics_listen is not None:
                self.metrics = metrics.MetricsServer(self.metrics_listen, metrics.AgentCollector(
                    self._metric_facts, self.started)).start()
        except BaseException:
            self.shutdown()
            raise

    def _thread(self, name: str, target: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        thread = threading.Thread(target=target, args=args, kwargs=kwargs, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def _checkpoint_loop(self) -> None:
        seen = {name: -1 for name in self.engines}
        while not self.stop_event.wait(SAVE_INTERVAL):
            for name, engine in self.engines.items():
                # Reads change map pages too (the block digests they remember): those count.
                marker = (engine.log.next_seq, engine.log.pending_bytes, engine.record.mode,
                          engine.volume.dirty_bytes)
                if marker != seen[name]:
                    try:
                        engine.save()
                        seen[name] = (*marker[:3], engine.volume.dirty_bytes)
                    except DrtoolError as exc:
                        log.error("volume %s: checkpoint failed: %s", name, exc)

    def _metric_facts(self) -> list[metrics.VolumeFacts]:
        """What a scrape reads of each volume served now: the status ``status --json`` shows."""
        return [metrics.VolumeFacts(name, lambda e=engine: ops.status(e, probe_peer=False), engine.replicator,
                                    metrics.of(engine)) for name, engine in list(self.engines.items())]

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
        for server in self.controls:
            server.stop()
        for thread in self.threads:
            thread.join(timeout=30)
        for name, engine in self.engines.items():
            try:
                engine.close()
            except DrtoolError as exc:
                log.error("volume %s: closing: %s", name, exc)
        self.engines.clear()

    # -- control handlers ------------------------------------------------------------

    def _handlers(self, engine: Engine) -> dict[str, control.Handler]:
        """One handler per operation of drtool.ops.OPERATIONS (the registry api uses too), run
        with the arguments as sent; what only an agent adds comes after (``_after``)."""

        def handler(op: str) -> control.Handler:
            def handle(args: dict[str, Any], progress: Progress) -> Any:
                result = ops.run(engine, op, args, progress)
                after = self._after.get(op)
                return after(self, engine, result) if after else result
            return handle

        return {op: handler(op) for op in ops.OPERATIONS}

    def _status(self, engine: Engine, result: dict[str, Any]) -> dict[str, Any]:
        result["agent"] = {"running": True, "socket": engine.volume.paths.control_socket,
                           "started": self.started, **self.addresses()}
        return result

    def _read(self, engine: Engine, result: bytes) -> control.RawResult:
        return control.RawResult({"volume": engine.name}, result)

    def _protect(self, engine: Engine, result: dict[str, Any]) -> dict[str, Any]:
        # A plan pairs nothing: there may be no replicator to run yet.
        if engine.replicator is not None and not any(t.name == f"replicate:{engine.name}" for t in self.threads):
            self._thread(f"replicate:{engine.name}", engine.replicator.run, self.stop_event)
        return result

    #: What the agent adds to an operation's result (ops.OPERATIONS runs the operation itself).
    _after: dict[str, Callable[[Agent, Engine, Any], Any]] = {
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
