"""Who can reach the agent's volumes over NBD (issue 11, "Local security").

By default the agent serves only its Unix socket (mode 0600, in a directory no
other user can write), with no TCP listener at all; TCP only with --listen:
refused beyond loopback without TLS, a loud warning on loopback without it,
and with --tls-cert/--tls-key (--tls-ca) a TLS-only listener (nbds://).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from drtool import api
from drtool.errors import ExitCode
from tests.conftest import DRTOOL, make_image, require_root, require_tool, run_drtool
from tests.nbd.tlscerts import Pki, make_pki

pytestmark = pytest.mark.slow

SIZE = 64 * 65536
TIMEOUT = 60


@pytest.fixture
def volume(tmp_path: Path, state_root: Path) -> bytes:
    data = make_image(tmp_path / "dev.img", SIZE, seed=5)
    api.init_volume("vol", str(tmp_path / "dev.img"), "64K")
    return data


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Agent:
    def __init__(self, state_root: Path, log: Path, *args: str) -> None:
        self.log = log
        env = {**os.environ, "DRTOOL_STATE_ROOT": str(state_root)}
        self.proc = subprocess.Popen([*DRTOOL, "agent", "vol", *args], stdout=subprocess.PIPE,
                                     stderr=open(log, "wb"), text=True, env=env)
        self.lines = [self.proc.stdout.readline() for _ in range(2)]
        if "serving" not in self.lines[0]:
            self.stop()
            raise AssertionError(f"agent did not start: {self.lines!r}: {log.read_text()}")

    @property
    def uris(self) -> list[str]:
        return self.lines[1].split(":", 1)[1].split()

    def stderr(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()


@pytest.fixture
def agent(state_root: Path, tmp_path: Path):
    started: list[Agent] = []

    def start(*args: str) -> Agent:
        started.append(Agent(state_root, tmp_path / f"agent{len(started)}.log", *args))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def tcp_listeners(pid: int) -> list[str]:
    """The TCP (v4 and v6) sockets in LISTEN state that process ``pid`` holds: local addresses
    as /proc/net/tcp shows them (hex ADDRESS:PORT)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as handle:
            next(handle)
            for line in handle:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.append(fields[1])
    return found


def run(*argv: str | Path, user: int | None = None) -> subprocess.CompletedProcess:
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run([*prefix, *map(str, argv)], capture_output=True, text=True, timeout=TIMEOUT)


# -- the default: the Unix socket only ---------------------------------------------------------


def test_default_agent_has_no_tcp_listener_and_a_private_socket(volume: bytes, agent, state_root: Path,
                                                                tmp_path: Path) -> None:
    require_tool("nbdcopy")
    served = agent()
    default = state_root / "nbd.sock"
    assert served.uris == [f"nbd+unix:///vol?socket={default}"]
    assert tcp_listeners(served.proc.pid) == []
    info = os.stat(default)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    # Nothing answers on the old default port on the agent's behalf.
    assert "WITHOUT TLS" not in served.stderr()
    copy = tmp_path / "copy.img"
    assert run("nbdcopy", served.uris[0], copy).returncode == 0
    assert copy.read_bytes() == volume
    status = api.status("vol")[0]["agent"]
    assert status["tcp"] is None and status["tls"] is False


def test_unprivileged_user_cannot_reach_the_volume(volume: bytes, agent) -> None:
    """The report: uid 65534 connected to 127.0.0.1:10809 and wrote the volume.  Not any more."""
    require_root()
    require_tool("nbdinfo", "setpriv")
    # A directory everyone may enter: the socket's own mode is all that keeps nobody out.
    directory = Path(tempfile.mkdtemp(prefix="drtool-nbd-"))
    try:
        directory.chmod(0o755)
        served = agent("--nbd-socket", str(directory / "nbd.sock"))
        assert tcp_listeners(served.proc.pid) == []
        assert run("nbdinfo", served.uris[0]).returncode == 0  # the service user (root here) can
        denied = run("nbdinfo", served.uris[0], user=65534)
        assert denied.returncode != 0
        assert "Permission denied" in denied.stderr, denied.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_socket_in_a_directory_others_can_write_is_refused(volume: bytes, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    result = run_drtool("agent", "vol", "--nbd-socket", str(shared / "nbd.sock"))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert b"writable by other users" in result.stderr


# -- TCP on request -------------------------------------------------------------------------------


def test_loopback_without_tls_warns_loudly(volume: bytes, agent, tmp_path: Path) -> None:
    require_tool("qemu-img")
    served = agent("--nbd-socket", str(tmp_path / "nbd.sock"), "--listen", "127.0.0.1:0")
    (address,) = tcp_listeners(served.proc.pid)
    host, port = address.split(":")
    assert host == "0100007F"  # 127.0.0.1, little-endian hex
    assert f"nbd://127.0.0.1:{int(port, 16)}/vol" in served.uris
    warning = served.stderr()
    assert "WITHOUT TLS" in warning and "any local user can read and write these volumes" in warning
    assert "--tls-cert" in warning


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0", "192.0.2.1:10809"])
def test_beyond_loopback_without_tls_is_refused(volume: bytes, address: str) -> None:
    result = run_drtool("agent", "vol", "--listen", address)
    assert result.returncode == ExitCode.USAGE
    message = result.stderr.decode()
    assert "requires TLS" in message and "--tls-cert" in message and "--tls-key" in message


def test_tls_flags_without_listen_are_refused(volume: bytes, pki: Pki) -> None:
    result = run_drtool("agent", "vol", "--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    assert result.returncode == ExitCode.USAGE
    assert b"--listen" in result.stderr


def test_tls_cert_without_key_is_refused(volume: bytes, pki: Pki) -> None:
    result = run_drtool("agent", "vol", "--listen", "0.0.0.0:0", "--tls-cert", str(pki.cert))
    assert result.returncode == ExitCode.USAGE
    assert b"--tls-key" in result.stderr


def test_daemon_refuses_before_detaching(volume: bytes, tmp_path: Path) -> None:
    result = run_drtool("agent", "vol", "--listen", "0.0.0.0:0", "--daemon",
                        "--pid-file", str(tmp_path / "agent.pid"), "--log-file", str(tmp_path / "agent.log"))
    assert result.returncode == ExitCode.USAGE
    assert b"requires TLS" in result.stderr
    assert not (tmp_path / "agent.pid").exists()


def test_tls_listener_serves_tls_clients_only(volume: bytes, agent, pki: Pki, tmp_path: Path) -> None:
    require_tool("nbdinfo", "nbdcopy", "qemu-io")
    served = agent("--nbd-socket", str(tmp_path / "nbd.sock"), "--listen", "0.0.0.0:0",
                   "--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
    assert "WITHOUT TLS" not in served.stderr()
    (uri,) = [u for u in served.uris if u.startswith("nbds://")]
    port = re.search(r":(\d+)/", uri).group(1)
    local = f"nbds://127.0.0.1:{port}/vol?tls-certificates={pki.anon}"
    copy = tmp_path / "copy.img"
    result = run("nbdcopy", local, copy)
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes() == volume
    # Plain NBD on the same port: refused before anything is listed or served.
    plain = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4096", f"nbd://127.0.0.1:{port}/vol")
    assert plain.returncode != 0 or "TLS" in plain.stderr + plain.stdout
    assert "TLS is required" in plain.stderr + plain.stdout
    assert run("nbdinfo", "--list", f"nbd://127.0.0.1:{port}/").returncode != 0
    # A client that does not trust the agent's CA fails.
    assert run("nbdinfo", f"nbds://127.0.0.1:{port}/vol?tls-certificates={pki.wrong_ca}").returncode != 0
    copy.write_bytes(b"")
    assert run("nbdcopy", local, copy).returncode == 0 and copy.read_bytes() == volume  # unchanged
    status = api.status("vol")[0]["agent"]
    assert status["tls"] is True and status["tls_client_certificates"] is False


def test_tls_ca_requires_client_certificates(volume: bytes, agent, pki: Pki, tmp_path: Path) -> None:
    require_tool("nbdinfo", "nbdcopy")
    served = agent("--nbd-socket", "none", "--listen", "127.0.0.1:0", "--tls-cert", str(pki.cert),
                   "--tls-key", str(pki.key), "--tls-ca", str(pki.ca))
    (uri,) = served.uris
    port = re.search(r":(\d+)/", uri).group(1)
    assert run("nbdinfo", f"nbds://127.0.0.1:{port}/vol?tls-certificates={pki.anon}").returncode != 0
    assert run("nbdinfo", f"nbds://127.0.0.1:{port}/vol?tls-certificates={pki.wrong_ca}").returncode != 0
    copy = tmp_path / "copy.img"
    result = run("nbdcopy", f"nbds://127.0.0.1:{port}/vol?tls-certificates={pki.client}", copy)
    assert result.returncode == 0, result.stderr
    assert copy.read_bytes() == volume
    assert api.status("vol")[0]["agent"]["tls_client_certificates"] is True
