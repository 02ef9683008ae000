# -*- coding: utf-8 -*-
# Copyright: drtool contributors
# Apache License 2.0 (see the project's pyproject.toml)
"""Plumbing shared by the drtool modules.

The modules are thin adapters over :mod:`drtool.api`: everything drtool knows
about volumes (what init, protect, scrub, recover and failback do, and whether
they changed anything) lives there.  This file holds only what an Ansible
adapter needs on top:

- importing drtool on the target, and ``missing_required_lib`` when it is not
  importable by the interpreter running the module;
- turning a :class:`drtool.errors.DrtoolError` into ``fail_json`` with drtool's
  own message and exit code;
- writing a secret file (a bearer token) with mode 0600;
- starting and stopping one of drtool's daemon-mode processes (``drtool serve``,
  ``drtool agent``) through its pid file, and telling whether the running one
  still matches what the task asks for.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import traceback

from ansible.module_utils.basic import missing_required_lib

try:
    from drtool import api as drtool_api
    from drtool.errors import DrtoolError, VolumeNotFound

    HAS_DRTOOL = True
    DRTOOL_IMPORT_ERROR = None
except ImportError:  # reported by require_drtool(), with the traceback
    drtool_api = None
    HAS_DRTOOL = False
    DRTOOL_IMPORT_ERROR = traceback.format_exc()

    class DrtoolError(Exception):  # placeholder so "except DrtoolError" stays valid
        exit_code = 1

    class VolumeNotFound(DrtoolError):
        pass


# Every module accepts the state root the same way drtool's CLI does.
STATE_ROOT_OPTION = dict(type="path")


def require_drtool(module):
    """Fail clearly when drtool is not importable by the interpreter running the module."""
    if not HAS_DRTOOL:
        module.fail_json(
            msg=missing_required_lib(
                "drtool",
                reason="drtool must be installed in the Python that runs this module; the drtool_install "
                       "role installs it into a venv and points ansible_python_interpreter at it"),
            exception=DRTOOL_IMPORT_ERROR)
    return drtool_api


def fail_drtool(module, exc, **extra):
    """fail_json with drtool's own message and exit code."""
    module.fail_json(msg=str(exc), exit_code=int(getattr(exc, "exit_code", 1)),
                     error=type(exc).__name__, **extra)


def call(module, func, *args, **kwargs):
    """Call a drtool.api function; a DrtoolError becomes fail_json."""
    try:
        return func(*args, **kwargs)
    except DrtoolError as exc:
        fail_drtool(module, exc)


def volume_status(module, name, root, probe_peer=False):
    """The volume's status dict, or None when it is not registered under the root."""
    try:
        return drtool_api.status(name, root=root, probe_peer=probe_peer)[0]
    except VolumeNotFound:
        return None
    except DrtoolError as exc:
        fail_drtool(module, exc)


def drtool_command():
    """drtool's CLI, run by the same interpreter that imports drtool here."""
    return [sys.executable, "-m", "drtool"]


# -- secret files ------------------------------------------------------------------------


def ensure_secret_file(module, path, content):
    """Make ``path`` hold ``content`` (plus a newline), mode 0600.  Returns True if it changed.

    In check mode nothing is written.  The content is never logged or diffed.
    """
    wanted = content.strip() + "\n"
    try:
        with open(path, encoding="utf-8") as handle:
            same = handle.read() == wanted
        mode_ok = (os.stat(path).st_mode & 0o777) == 0o600
        if same and mode_ok:
            return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        module.fail_json(msg="cannot read %s: %s" % (path, exc.strerror))
    if module.check_mode:
        return True
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".drtool-secret-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(wanted)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o600)
    except OSError as exc:
        module.fail_json(msg="cannot write %s: %s" % (path, exc.strerror))
    module.atomic_move(tmp, path)
    os.chmod(path, 0o600)
    return True


# -- daemon-mode processes ---------------------------------------------------------------


def _proc_state(pid):
    """The process state letter from /proc (None when it is gone)."""
    try:
        with open("/proc/%d/stat" % pid, encoding="utf-8", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    return [part.decode("utf-8", "surrogateescape") for part in raw.split(b"\0") if part]


def drtool_args(argv):
    """The arguments after ``drtool`` in a command line (``python -m drtool ...`` or ``.../drtool ...``)."""
    if not argv:
        return None
    for index, part in enumerate(argv):
        if part == "-m" and index + 1 < len(argv) and argv[index + 1] == "drtool":
            return argv[index + 2:]
        if os.path.basename(part) == "drtool":
            return argv[index + 1:]
    return None


class Daemon(object):
    """One daemon-mode drtool process, known by its pid file.

    ``args`` are the drtool arguments (after ``drtool``) the task wants it to run
    with, ``--pid-file`` included; ``inputs`` are files it reads only at start (a
    token, a TLS key): when one is newer than the pid file, it must restart.
    """

    def __init__(self, module, pid_file, args, inputs=(), compare=None):
        self.module = module
        self.pid_file = pid_file
        self.args = list(args)
        self.inputs = [path for path in inputs if path]
        # What of its arguments must match (the agent's volumes change live, not by a restart).
        self.compare = compare or (lambda args: args)

    def pid(self):
        """The pid of the running daemon, or None (no pid file, stale pid, not drtool)."""
        try:
            with open(self.pid_file, encoding="utf-8") as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            return None
        if _proc_state(pid) in (None, "Z"):
            return None
        if drtool_args(_cmdline(pid)) is None:
            return None  # the pid was reused by something else
        return pid

    def running_args(self, pid):
        """The drtool arguments the running daemon was started with."""
        return drtool_args(_cmdline(pid)) if pid else None

    def restart_reason(self, pid):
        """Why the running daemon does not match the task (None: it does)."""
        running = self.running_args(pid)
        if self.compare(running) != self.compare(self.args):
            return "its arguments differ: running %s, wanted %s" % (" ".join(running or []), " ".join(self.args))
        try:
            started = os.stat(self.pid_file).st_mtime
        except OSError:
            return None
        for path in self.inputs:
            try:
                if os.stat(path).st_mtime > started:
                    return "%s changed since it started" % path
            except OSError:
                continue  # a missing input is for the daemon to report when it starts
        return None

    def start(self):
        """Start it; drtool's daemon mode returns once its sockets are bound.  Returns its output."""
        rc, out, err = self.module.run_command(drtool_command() + self.args)
        if rc != 0:
            message = (err or out).strip() or "exit code %d" % rc
            self.module.fail_json(msg="could not start %s: %s" % (" ".join(["drtool"] + self.args[:1]), message),
                                  rc=rc, stdout=out, stderr=err, cmd=drtool_command() + self.args)
        return out

    def stop(self, pid, timeout):
        """SIGTERM, then wait until it exited (it saves its state on the way out)."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        except PermissionError as exc:
            self.module.fail_json(msg="cannot stop pid %d: %s" % (pid, exc.strerror))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _proc_state(pid) in (None, "Z"):
                return
            time.sleep(0.05)
        self.module.fail_json(msg="pid %d (pid file %s) did not stop within %s seconds of SIGTERM; it is "
                                  "left running" % (pid, self.pid_file, timeout))


def manage_daemon(module, daemon, state, timeout, label, pending_input=False):
    """Bring ``daemon`` to ``state`` (started, stopped, restarted); returns the module's result.

    The result has changed, pid, action (none, started, restarted, stopped), the
    reason of a restart, the drtool arguments (cmd) and, with --diff, a diff.
    ``pending_input``: in check mode, a file it reads at start would have been
    rewritten, so a running daemon would restart.
    """
    pid = daemon.pid()
    before = {"running": pid is not None, "args": daemon.running_args(pid)}
    result = dict(changed=False, action="none", reason=None, pid=pid)
    if state == "stopped":
        if pid is not None:
            result.update(changed=True, action="stopped", pid=None)
            if not module.check_mode:
                daemon.stop(pid, timeout)
    else:
        result["cmd"] = ["drtool"] + daemon.args
        reason = None
        if pid is not None:
            if state == "restarted":
                reason = "a restart was asked for"
            elif pending_input and module.check_mode:
                reason = "a file it reads at start would change"
            else:
                reason = daemon.restart_reason(pid)
        if pid is None or reason is not None:
            result.update(changed=True, action="restarted" if pid else "started", reason=reason)
            if not module.check_mode:
                if pid is not None:
                    daemon.stop(pid, timeout)
                daemon.start()
                result["pid"] = daemon.pid()
    if module._diff:
        after = {"running": state != "stopped", "args": daemon.args if state != "stopped" else None}
        header = "%s (%s)" % (label, daemon.pid_file)
        result["diff"] = dict(before=before, after=after, before_header=header, after_header=header)
    return result
