"""`--daemon`: the waiting parent exits with exactly the daemon's exit code (issue 11).

The readiness pipe used to carry ``exit_code % 10``: a daemon that failed with
NotPermitted (10) made its parent exit 0, as if it were serving.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from drtool import api
from drtool.daemon import parse_readiness, readiness_message
from drtool.errors import ExitCode
from tests.conftest import make_image, run_drtool

SIZE = 8 * 65536

#: ``python -c INJECT ERRORCLASS agent ...``: drtool's own CLI, whose agent fails at start
#: (after detaching) with the named drtool error.  No volume state yields a code above 9 at
#: start, so the failure is injected; everything else (fork, pipe, exit) is the real path.
INJECT = """
import sys
from drtool import agent, errors
error = getattr(errors, sys.argv.pop(1))
def refuse(self):
    raise error("refused at start (injected by the test)")
agent.Agent.start = refuse
from drtool.cli import main_entry
main_entry()
"""


@pytest.fixture
def volume(tmp_path: Path, state_root: Path) -> Path:
    make_image(tmp_path / "dev.img", SIZE, seed=3)
    api.init_volume("vol", str(tmp_path / "dev.img"), "64K")
    return tmp_path / "dev.img"


def daemon_flags(tmp_path: Path) -> list[str]:
    return ["--daemon", "--pid-file", str(tmp_path / "d.pid"), "--log-file", str(tmp_path / "d.log")]


def run_injected(error: str, *argv: str):
    import subprocess

    return subprocess.run([sys.executable, "-c", INJECT, error, *argv], capture_output=True, timeout=120,
                          env=dict(os.environ))


def wait_gone(pid_file: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_file.exists(), "the daemon's pid file outlived it"


@pytest.mark.slow
@pytest.mark.parametrize("error, code", [("NotPermitted", ExitCode.NOT_PERMITTED), ("Conflict", ExitCode.CONFLICT),
                                         ("DeviceError", ExitCode.FAULTED)])
def test_agent_daemon_exits_with_the_whole_code(volume: Path, tmp_path: Path, error: str, code: int) -> None:
    result = run_injected(error, "agent", "vol", "--nbd-socket", str(tmp_path / "nbd.sock"), *daemon_flags(tmp_path))
    assert result.returncode == code, result.stderr
    assert result.stderr.decode() == "drtool: refused at start (injected by the test)\n"
    assert result.stdout == b""
    wait_gone(tmp_path / "d.pid")
    assert "refused at start" in (tmp_path / "d.log").read_text()  # the daemon said it too


@pytest.mark.slow
def test_agent_daemon_usage_error_after_detaching(volume: Path, tmp_path: Path) -> None:
    """A volume named twice is refused by the detached agent (not before): exit 2, its message."""
    result = run_drtool("agent", "vol", "vol", *daemon_flags(tmp_path))
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.decode() == "drtool: a volume is named twice\n"
    wait_gone(tmp_path / "d.pid")


@pytest.mark.slow
def test_agent_daemon_missing_volume_exits_state(state_root: Path, tmp_path: Path) -> None:
    result = run_drtool("agent", "nosuch", "--nbd-socket", str(tmp_path / "nbd.sock"), *daemon_flags(tmp_path))
    assert result.returncode == ExitCode.STATE
    assert b"nosuch is not registered" in result.stderr


@pytest.mark.slow
def test_serve_daemon_failing_at_start(tmp_path: Path) -> None:
    """The replica server refuses a non-loopback address without a token after detaching."""
    result = run_drtool("serve", "--root", str(tmp_path / "replicas"), "--listen", "0.0.0.0:0",
                        *daemon_flags(tmp_path))
    assert result.returncode == ExitCode.USAGE
    assert b"without --token-file" in result.stderr
    wait_gone(tmp_path / "d.pid")


@pytest.mark.slow
def test_agent_daemon_ready_exits_zero_and_announces(volume: Path, tmp_path: Path) -> None:
    result = run_drtool("agent", "vol", "--nbd-socket", str(tmp_path / "nbd.sock"), *daemon_flags(tmp_path))
    assert result.returncode == 0, result.stderr
    pid = int((tmp_path / "d.pid").read_text())
    try:
        assert result.stdout.decode().startswith(f"drtool agent (pid {pid}) serving\n")
        assert f"nbd+unix:///vol?socket={tmp_path / 'nbd.sock'}" in result.stdout.decode()
        assert (tmp_path / "nbd.sock").exists()
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_gone(tmp_path / "d.pid", timeout=60)


@pytest.mark.parametrize("code", [1, 2, 4, 9, 10, 11, 20, 100, 255])
def test_readiness_carries_every_code(code: int) -> None:
    assert parse_readiness(readiness_message(False, "it failed", code), "LOG") == (code, "it failed")


def test_readiness_messages() -> None:
    announced = "drtool agent (pid 1) serving\n  vol: nbd://x\n"
    assert parse_readiness(readiness_message(True, announced), "LOG") == (0, announced)
    assert parse_readiness(readiness_message(False, "two\nlines", 10), "LOG") == (10, "two\nlines")
    # An error never exits 0, whatever it carries; a silent death points at the log.
    assert parse_readiness(readiness_message(False, "zero?", 0), "LOG")[0] == 1
    assert parse_readiness(readiness_message(False, "big", 1000), "LOG")[0] == 1
    assert parse_readiness(b"error x\nnot a number", "LOG")[0] == 1
    assert parse_readiness(b"", "/var/log/d.log") == (1, "the daemon exited before it was ready (see /var/log/d.log)")


# -- systemd readiness (Type=notify) and log files reopened on SIGHUP ------------------------


def _notify_socket(tmp_path: Path, abstract: bool):
    """A datagram socket standing in for systemd's; returns (socket, $NOTIFY_SOCKET value)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"drtool-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(60)
    return sock, address


def _connects(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
            return True
        except OSError:
            return False


def _stop(proc, stderr: Path | None = None) -> int:
    """SIGTERM and wait; a daemon still running after 60 s is asked for its threads' stacks
    (SIGUSR1, drtool.daemon), which the failure then shows, and killed."""
    import subprocess

    proc.terminate()
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        try:
            proc.wait(timeout=5)  # the dump is written at once; this only bounds the wait
        except subprocess.TimeoutExpired:
            pass
        proc.kill()
        proc.wait()
        dump = stderr.read_text(errors="replace")[-20000:] if stderr is not None else "(not captured)"
        raise AssertionError(f"the daemon did not stop within 60 s of SIGTERM; its threads:\n{dump}") from None


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_agent_notifies_ready_once_it_serves(volume: Path, tmp_path: Path, state_root: Path, abstract: bool) -> None:
    import subprocess

    from drtool import api as drtool_api

    listener, address = _notify_socket(tmp_path, abstract)
    nbd = tmp_path / "nbd.sock"
    errors = tmp_path / "agent.err"
    with open(errors, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "drtool", "agent", "vol", "--nbd-socket", str(nbd)],
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "NOTIFY_SOCKET": address})
    try:
        message = listener.recv(4096).decode()
        # Ready means serving: the NBD socket and the control sockets answer now.
        assert _connects(nbd) and drtool_api.agent_info()["volumes"] == ["vol"]
        assert message.splitlines()[0] == "READY=1"
        assert message.splitlines()[1].startswith(f"STATUS=drtool agent (pid {proc.pid}) serving")
    finally:
        assert _stop(proc, errors) == 0
        listener.close()


def test_replica_server_notifies_ready_once_it_listens(tmp_path: Path) -> None:
    import subprocess
    import urllib.request

    listener, address = _notify_socket(tmp_path, abstract=True)
    proc = subprocess.Popen([sys.executable, "-m", "drtool", "serve", "--root", str(tmp_path / "replicas"),
                             "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env={**os.environ, "NOTIFY_SOCKET": address})
    try:
        message = listener.recv(4096).decode()
        assert message.startswith("READY=1\nSTATUS=drtool replica server listening on 127.0.0.1:")
        port = message.rsplit(":", 1)[1].strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=10) as reply:
            assert reply.status == 200
    finally:
        assert _stop(proc) == 0
        proc.stdout.close()
        listener.close()


def _wait_for(path: Path, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        assert time.monotonic() < deadline, f"{text!r} never reached {path}: {content[-2000:]!r}"
        time.sleep(0.05)


@pytest.mark.parametrize("daemon", [False, True], ids=["foreground", "daemon"])
def test_sighup_reopens_the_log_file(volume: Path, tmp_path: Path, state_root: Path, daemon: bool) -> None:
    import subprocess

    log = tmp_path / "logs" / "agent.log"
    make_image(tmp_path / "second.img", SIZE, seed=4)
    api.init_volume("second", str(tmp_path / "second.img"), "64K")
    argv = ["agent", "vol", "--nbd-socket", str(tmp_path / "nbd.sock"), "--log-file", str(log)]
    if daemon:
        result = run_drtool(*argv, "--daemon", "--pid-file", str(tmp_path / "agent.pid"))
        assert result.returncode == 0, result.stderr
        pid = int((tmp_path / "agent.pid").read_text())
    else:
        proc = subprocess.Popen([sys.executable, "-m", "drtool", *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().startswith("drtool agent")  # serving
        pid = proc.pid
    try:
        api.attach("second")
        _wait_for(log, "volume second: now served")
        log.rename(log.with_name("agent.log.1"))  # what logrotate does without copytruncate
        os.kill(pid, signal.SIGHUP)
        _wait_for(log, f"SIGHUP: reopened {log}")
        api.detach("second")
        fresh = _wait_for(log, "volume second: no longer served")
        rotated = log.with_name("agent.log.1").read_text()
        assert "volume second: now served" in rotated and "no longer served" not in rotated
        assert "now served" not in fresh
        assert api.agent_info()["pid"] == pid  # SIGHUP did not stop it
    finally:
        os.kill(pid, signal.SIGTERM)
        if daemon:
            wait_gone(tmp_path / "agent.pid")
        else:
            assert proc.wait(timeout=60) == 0
            proc.stdout.close()


def test_sighup_without_a_log_file_is_harmless(volume: Path, tmp_path: Path, state_root: Path) -> None:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "drtool", "agent", "vol", "--nbd-socket", str(tmp_path / "n.sock")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("drtool agent")
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    line = ""
    while "SIGHUP" not in line:
        assert time.monotonic() < deadline
        line = proc.stderr.readline()
    assert "no log file to reopen" in line
    assert api.agent_info()["pid"] == proc.pid
    assert _stop(proc) == 0
    proc.stdout.close()
    proc.stderr.close()


def test_sigusr1_dumps_every_threads_stack_and_the_daemon_keeps_serving(volume: Path, tmp_path: Path,
                                                                        state_root: Path) -> None:
    import subprocess

    from drtool import api as drtool_api

    listener, address = _notify_socket(tmp_path, abstract=False)
    errors = tmp_path / "agent.err"
    with open(errors, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "drtool", "agent", "vol", "--nbd-socket",
                                 str(tmp_path / "nbd.sock")], stdout=subprocess.DEVNULL, stderr=stderr,
                                env={**os.environ, "NOTIFY_SOCKET": address})
    try:
        assert listener.recv(4096).decode().startswith("READY=1")
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while "Current thread" not in errors.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.05)
        dump = errors.read_text(errors="replace")
        assert "Current thread" in dump and "Thread 0x" in dump  # every thread, not only the main one
        assert drtool_api.agent_info()["volumes"] == ["vol"]  # still serving
    finally:
        assert _stop(proc, errors) == 0
        listener.close()
