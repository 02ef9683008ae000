"""drtool's own daemon mode (for hosts without systemd): detach, pid file, log file.

The parent returns only when the daemon says it is ready (its sockets are bound)
or failed, so `drtool agent --daemon` and `drtool serve --daemon` are safe to
follow with a client in a script or an Ansible task.  It exits with exactly the
code the daemon failed with (drtool's exit codes go past 9: 10 is NotPermitted,
11 Conflict), and prints the daemon's error.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Protocol

from drtool.errors import StateError
from drtool.storage.atomic import write_atomic


class Notify(Protocol):
    """Tell the waiting parent: ready (``ok``, the announcement to print), or failed
    (the error's message and the exit code the parent should exit with).  Once only."""

    def __call__(self, ok: bool, message: str, exit_code: int = 1) -> None: ...


def read_pid(pid_file: str) -> int | None:
    try:
        with open(pid_file) as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return pid


def daemonize(pid_file: str, log_file: str) -> Notify:
    """Fork into the background.  Returns (in the daemon) a function to report readiness."""
    running = read_pid(pid_file)
    if running:
        raise StateError(f"already running as pid {running} (pid file {pid_file})")
    for path in (pid_file, log_file):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ready_r, ready_w = os.pipe()
    if os.fork() > 0:
        os.close(ready_w)
        message = b""
        while chunk := os.read(ready_r, 4096):
            message += chunk
        code, text = parse_readiness(message, log_file)
        if code == 0:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            sys.stderr.write(f"drtool: {text}\n")
            sys.stderr.flush()
        os._exit(code)
    os.close(ready_r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    write_atomic(pid_file, f"{os.getpid()}\n".encode(), mode=0o644)
    atexit.register(_remove_pid_file, pid_file, os.getpid())

    sent = False

    def notify(ok: bool, message: str, exit_code: int = 1) -> None:
        nonlocal sent
        if sent:  # once only: the pipe's descriptor number may belong to another file by now
            return
        sent = True
        try:
            os.write(ready_w, readiness_message(ok, message, exit_code))
            os.close(ready_w)
        except OSError:
            pass

    return notify


def readiness_message(ok: bool, message: str, exit_code: int = 1) -> bytes:
    """What the daemon sends its waiting parent: ``ok`` or ``error CODE`` (the whole exit code,
    in decimal) on the first line, then the message (the announcement, or the error)."""
    head = "ok" if ok else f"error {int(exit_code)}"
    return f"{head}\n{message}".encode()


def parse_readiness(payload: bytes, log_file: str) -> tuple[int, str]:
    """The parent's reading of :func:`readiness_message`: (its exit code, what to print).

    ``ok`` exits 0 and prints the announcement; ``error CODE`` exits with exactly CODE
    (an error never exits 0: a code outside 1..255 becomes 1); nothing at all (the daemon
    died before it could say) exits 1 and points at the log file."""
    text = payload.decode(errors="replace")
    head, _, rest = text.partition("\n")
    if head == "ok":
        return 0, rest
    if head.startswith("error "):
        number = head[len("error "):]
        code = int(number) if number.isascii() and number.isdigit() and len(number) <= 3 else 1
        return (code if 1 <= code <= 255 else 1), rest or "the daemon failed before it was ready"
    return 1, f"the daemon exited before it was ready (see {log_file})"


def _remove_pid_file(pid_file: str, pid: int) -> None:
    if read_pid(pid_file) == pid:
        try:
            os.unlink(pid_file)
        except OSError:
            pass
