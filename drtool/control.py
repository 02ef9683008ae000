"""The agent's local control socket: JSON lines over a Unix socket (mode 0600).

Request:  {"op": "status", "args": {...}}\\n
Replies:  zero or more {"progress": {"start": TOTAL, "label": L} | {"advance": N}}\\n lines, then
          {"ok": true, "result": ...}\\n                      (and, for "read", exactly
          result["length"] raw bytes after that line)
          {"ok": false, "error": {"type", "message", "exit_code"}}\\n

Socket paths longer than the kernel's 107-byte limit are reached through
/proc/self/fd, so deep state directories work too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator

from drtool.errors import DrtoolError, StateError, rebuild
from drtool.progress import NoProgress, Progress

log = logging.getLogger("drtool.control")

MAX_REQUEST = 1 << 20
Handler = Callable[[dict[str, Any], Progress], Any]


class RawResult:
    """A handler result followed by raw bytes (a read)."""

    def __init__(self, meta: dict[str, Any], data: bytes | memoryview) -> None:
        self.meta = {**meta, "length": len(data)}
        self.data = data


@contextmanager
def _short_path(path: str) -> Iterator[str]:
    """A path the kernel accepts for AF_UNIX (<108 bytes), valid inside the block."""
    if len(path.encode()) < 100:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


class _StreamProgress:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def _send(self, event: dict[str, Any]) -> None:
        try:
            self.stream.write(json.dumps({"progress": event}).encode() + b"\n")
            self.stream.flush()
        except OSError:
            pass  # the client went away; the operation itself goes on

    def start(self, total: int, label: str) -> None:
        self._send({"start": total, "label": label})

    def advance(self, amount: int) -> None:
        self._send({"advance": amount})

    def finish(self) -> None:
        self._send({"finish": True})


class ControlServer:
    """Serves one socket; each connection carries one request."""

    def __init__(self, path: str, handlers: dict[str, Handler], busy_hint: str | None = None) -> None:
        self.path = path
        self.handlers = handlers
        self.busy_hint = busy_hint  # said when another process listens on the path
        self.sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if os.path.exists(self.path):
            if is_listening(self.path):
                raise StateError(f"another agent is listening on {self.path}"
                                 + (f": {self.busy_hint}" if self.busy_hint else ""))
            os.unlink(self.path)  # stale socket of an agent that died: we hold the lock now
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            with _short_path(self.path) as short:
                sock.bind(short)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)
        sock.listen(16)
        self.sock = sock
        self._thread = threading.Thread(target=self._accept, name=f"control:{os.path.basename(self.path)}",
                                        daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rwb") as stream:
                self._answer(stream)
        except OSError:
            pass  # the client went away (is_listening() probes do exactly that)

    def _answer(self, stream: BinaryIO) -> None:
        try:
            line = stream.readline(MAX_REQUEST + 1)
            if not line:
                return
            if not line.endswith(b"\n"):
                raise DrtoolError("control request is truncated or larger than 1 MiB")
            request = json.loads(line)
            op = request.get("op")
            handler = self.handlers.get(op)
            if handler is None:
                raise DrtoolError(f"unknown control operation {op!r}")
            result = handler(request.get("args") or {}, _StreamProgress(stream))
            if isinstance(result, RawResult):
                stream.write(json.dumps({"ok": True, "result": result.meta}, default=str).encode() + b"\n")
                stream.write(result.data)
            else:
                stream.write(json.dumps({"ok": True, "result": result}, default=str).encode() + b"\n")
            stream.flush()
        except (ValueError, AttributeError, TypeError) as exc:
            self._error(stream, DrtoolError(f"malformed control request: {exc}"))
        except DrtoolError as exc:
            self._error(stream, exc)
        except OSError:
            raise
        except Exception as exc:  # keep the agent alive; report the bug to the caller
            log.exception("control operation failed")
            self._error(stream, DrtoolError(f"internal error in the agent: {exc}"))

    @staticmethod
    def _error(stream: BinaryIO, exc: DrtoolError) -> None:
        error = {"type": type(exc).__name__, "message": str(exc), "exit_code": int(exc.exit_code)}
        try:
            stream.write(json.dumps({"ok": False, "error": error}).encode() + b"\n")
            stream.flush()
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def is_listening(path: str) -> bool:
    try:
        with _short_path(path) as short, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(short)
            return True
    except OSError:
        return False


def call(path: str, op: str, args: dict[str, Any] | None = None, progress: Progress | None = None,
         timeout: float | None = None) -> Any:
    """Ask the agent behind ``path``; returns the result (bytes for raw results)."""
    progress = progress or NoProgress()
    started = False
    with _short_path(path) as short, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(short)
        except OSError as exc:
            raise StateError(f"cannot reach the agent at {path}: {exc.strerror}") from None
        with sock.makefile("rwb") as stream:
            stream.write(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            stream.flush()
            try:
                while True:
                    line = stream.readline()
                    if not line:
                        raise StateError(f"the agent at {path} closed the connection without an answer")
                    reply = json.loads(line)
                    event = reply.get("progress")
                    if event is None:
                        break
                    if "start" in event:
                        progress.start(event["start"], event.get("label", op))
                        started = True
                    elif "advance" in event:
                        progress.advance(event["advance"])
            finally:
                if started:
                    progress.finish()
            if not reply.get("ok"):
                error = reply.get("error") or {}
                raise rebuild(error.get("type", "DrtoolError"), error.get("message", "agent error"))
            result = reply.get("result")
            if isinstance(result, dict) and "length" in result and op == "read":
                data = stream.read(result["length"])
                if len(data) != result["length"]:
                    raise StateError(f"the agent at {path} sent {len(data)} of {result['length']} bytes")
                return data
            return result
