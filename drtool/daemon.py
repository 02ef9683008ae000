"""drtool's own daemon mode (for hosts without systemd): detach, pid file, log file.

The parent returns only when the daemon says it is ready (its sockets are bound)
or failed, so `drtool agent --daemon` and `drtool serve --daemon` are safe to
follow with a client in a script or an Ansible task.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable

from drtool.errors import StateError
from drtool.storage.atomic import write_atomic

Notify = Callable[[bool, str], None]


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
        text = message.decode(errors="replace")
        if text.startswith("ok"):
            sys.stdout.write(text[3:])
            sys.stdout.flush()
            os._exit(0)
        sys.stderr.write(f"drtool: {text[6:] or 'the daemon exited before it was ready'}\n")
        os._exit(int(text[5:6]) if text[5:6].isdigit() else 1)
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

    def notify(ok: bool, message: str, exit_code: int = 1) -> None:
        payload = f"ok\n{message}" if ok else f"error{exit_code % 10}{message}"
        try:
            os.write(ready_w, payload.encode())
            os.close(ready_w)
        except OSError:
            pass

    return notify


def _remove_pid_file(pid_file: str, pid: int) -> None:
    if read_pid(pid_file) == pid:
        try:
            os.unlink(pid_file)
        except OSError:
            pass
