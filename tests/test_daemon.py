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
