"""How drtool's long-running commands (``drtool agent``, ``drtool serve``) live as services.

drtool's own daemon mode (for hosts without systemd): detach, pid file, log file.
The parent returns only when the daemon says it is ready (its sockets are bound)
or failed, so `drtool agent --daemon` and `drtool serve --daemon` are safe to
follow with a client in a script or an Ansible task.  It exits with exactly the
code the daemon failed with (drtool's exit codes go past 9: 10 is NotPermitted,
11 Conflict), and prints the daemon's error.

Under systemd (``Type=notify``): :func:`sd_notify` sends ``READY=1`` to
``$NOTIFY_SOCKET`` once the listeners are bound, so units ordered after the agent
start only when it serves.  The protocol is one datagram on a Unix socket (a name
starting with ``@`` is in the abstract namespace); no library needed.

Log files (``--log-file``, with or without ``--daemon``) are reopened on SIGHUP, so
logrotate can rename them without ``copytruncate`` (docs/operations.md); without a
log file SIGHUP is ignored rather than fatal (``systemctl reload`` is harmless).
"""

from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import signal
import socket
import sys
from typing import Protocol

from drtool.errors import StateError
from drtool.storage.atomic import write_atomic

log = logging.getLogger("drtool.daemon")


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
    os.close(devnull)
    reopen_on_sighup(LogFile(log_file, (1, 2)))
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


class LogFile:
    """A log file behind file descriptors (2: stderr, where logging writes; 1 too in daemon
    mode), opened for appending; :meth:`reopen` points them at a new file of the same name."""

    def __init__(self, path: str, fds: tuple[int, ...] = (2,)) -> None:
        self.path = os.path.abspath(path)
        self.fds = fds
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.reopen()

    def reopen(self) -> None:
        """Open the path anew and move the descriptors onto it (dup2 swaps each at once: no
        line is lost or split).  If it cannot be opened the old file stays in use."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            for target in self.fds:
                os.dup2(fd, target)
        finally:
            os.close(fd)


def reopen_on_sighup(log_file: LogFile | None) -> None:
    """SIGHUP reopens ``log_file`` (logrotate renamed it), or is only logged when there is
    none: its default action would kill the process.  SIGUSR1 writes every thread's stack to
    standard error (the log file): what a daemon that does not stop is waiting for."""
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)

    def on_hup(signum: int, frame: object) -> None:
        if log_file is None:
            log.info("SIGHUP: no log file to reopen (logging to standard error)")
            return
        try:
            log_file.reopen()
        except OSError as exc:
            log.error("SIGHUP: cannot reopen %s: %s; still writing to the old file", log_file.path, exc.strerror)
            return
        log.info("SIGHUP: reopened %s", log_file.path)

    signal.signal(signal.SIGHUP, on_hup)


def sd_notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager at ``$NOTIFY_SOCKET``, as
    sd_notify(3) does.  Returns whether it was sent (False: not started by systemd with
    Type=notify, or the socket is gone; neither is an error for the daemon)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), target)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc.strerror or exc)
        return False
    return True


def start_service(detach: bool, pid_file: str | None, log_file: str | None) -> Notify | None:
    """Start a long-running command as a service: with ``detach`` (--daemon) fork into the
    background and return the function that tells the waiting parent it is ready; in the
    foreground, ``log_file`` takes standard error.  Either way SIGHUP reopens the log file
    (logrotate), and is harmless without one."""
    if not detach:
        reopen_on_sighup(LogFile(log_file) if log_file else None)
        return None
    if not pid_file or not log_file:
        from drtool.errors import UsageError

        raise UsageError("--daemon needs --pid-file and --log-file")
    return daemonize(os.path.abspath(pid_file), os.path.abspath(log_file))


def ready(notify: Notify | None, text: str) -> None:
    """The listeners are up: tell whoever waits (the daemon's parent, systemd)."""
    if notify:
        notify(True, text)
    sd_notify("READY=1\nSTATUS=" + text.splitlines()[0])
