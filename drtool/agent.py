"""The agent: the long-running primary process.

It holds each volume it serves (the volume's lock), exports it over NBD, ships
its log to the secondary in the background, checkpoints its maps every few
seconds, and answers the CLI and the Ansible modules on a control socket in each
volume's state directory (``agent.sock``, mode 0600), so nobody has to stop it to
run status, scrub, recover, failback, replicate or read.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from drtool import control, ops
from drtool.engine import Engine
from drtool.errors import DrtoolError, UsageError
from drtool.export import EngineExport
from drtool.nbd.server import NbdServer
from drtool.progress import Progress
from drtool.replication import Replicator
from drtool.storage.paths import state_root, validate_name

log = logging.getLogger("drtool.agent")

DEFAULT_NBD_PORT = 10809
SAVE_INTERVAL = 2.0


def parse_listen(text: str | None, default_port: int = DEFAULT_NBD_PORT) -> tuple[str, int] | None:
    if not text or text == "none":
        return None
    host, _, port = text.rpartition(":")
    if not host:
        host, port = text, str(default_port)
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise UsageError(f"--listen {text!r} is not HOST:PORT") from None


class Agent:
    def __init__(self, root: str | None, names: list[str], nbd_socket: str | None = None,
                 listen: tuple[str, int] | None = ("127.0.0.1", DEFAULT_NBD_PORT)) -> None:
        if not names:
            raise UsageError("name at least one volume to serve")
        self.root = state_root(root)
        self.names = [validate_name(n) for n in names]
        if len(set(self.names)) != len(self.names):
            raise UsageError("a volume is named twice")
        self.nbd_socket = nbd_socket
        self.listen = listen
        self.engines: dict[str, Engine] = {}
        self.exports: dict[str, EngineExport] = {}
        self.controls: list[control.ControlServer] = []
        self.threads: list[threading.Thread] = []
        self.stop_event = threading.Event()
        self.nbd: NbdServer | None = None
        self.started = time.time()

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
            self.nbd = NbdServer(lambda: exports, unix_path=self.nbd_socket, tcp=self.listen)
            self.nbd.start()
            for name, engine in self.engines.items():
                server = control.ControlServer(engine.volume.paths.control_socket, self._handlers(engine))
                server.start()
                self.controls.append(server)
                if engine.replicator is not None:
                    self._thread(f"replicate:{name}", engine.replicator.run, self.stop_event,
                                 on_error=lambda exc, n=name: log.warning("volume %s: replication: %s", n, exc))
            self._thread("checkpoint", self._checkpoint_loop)
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
                marker = (engine.log.next_seq, engine.log.pending_bytes, engine.record.mode)
                if marker != seen[name]:
                    try:
                        engine.save()
                        seen[name] = marker
                    except DrtoolError as exc:
                        log.error("volume %s: checkpoint failed: %s", name, exc)

    def addresses(self) -> dict[str, Any]:
        port = self.nbd.tcp_port if self.nbd else None
        host = self.listen[0] if self.listen else None
        return {
            "pid": os.getpid(),
            "nbd_socket": self.nbd_socket,
            "tcp": f"{host}:{port}" if port else None,
            "uris": {name: ([f"nbd+unix:///{name}?socket={self.nbd_socket}"] if self.nbd_socket else [])
                     + ([f"nbd://{host}:{port}/{name}"] if port else []) for name in self.names},
        }

    def wait(self) -> None:
        self.stop_event.wait()

    def shutdown(self) -> None:
        self.stop_event.set()
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
        def status(args: dict[str, Any], _: Progress) -> dict[str, Any]:
            result = ops.status(engine, probe_peer=bool(args.get("probe_peer", True)))
            result["agent"] = {"running": True, "socket": engine.volume.paths.control_socket,
                               "started": self.started, **self.addresses()}
            return result

        def read(args: dict[str, Any], _: Progress) -> control.RawResult:
            return control.RawResult({"volume": engine.name}, ops.read(engine, int(args["offset"]),
                                                                      int(args["length"])))

        def write(args: dict[str, Any], _: Progress) -> dict[str, Any]:
            return ops.write(engine, int(args["offset"]), bytes.fromhex(args["data"]), bool(args.get("sync")))

        return {
            "status": status,
            "read": read,
            "write": write,
            "scrub": lambda a, p: ops.scrub(engine, p),
            "scan": lambda a, p: ops.scan(engine, p),
            "checkpoint": lambda a, p: ops.checkpoint(engine),
            "configure": lambda a, p: ops.configure(engine, **a),
            "replicate": lambda a, p: ops.replicate(engine, **a),
            "recover": lambda a, p: ops.recover(engine, **a),
            "failback": lambda a, p: ops.failback(engine, progress=p, **a),
            "protect": lambda a, p: self._protect(engine, a, p),
            "demote": lambda a, p: ops.demote(engine, **a),
        }

    def _protect(self, engine: Engine, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
        result = ops.protect(engine, progress=progress, **args)
        # A plan pairs nothing: there may be no replicator to run yet.
        if engine.replicator is not None and not any(t.name == f"replicate:{engine.name}" for t in self.threads):
            self._thread(f"replicate:{engine.name}", engine.replicator.run, self.stop_event)
        return result


def run(root: str | None, names: list[str], nbd_socket: str | None, listen: tuple[str, int] | None,
        announce: Callable[[dict[str, Any]], None]) -> int:
    """Serve until SIGTERM/SIGINT; returns 0 after a clean shutdown."""
    agent = Agent(root, names, nbd_socket, listen)
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
