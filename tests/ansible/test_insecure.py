"""Plain HTTP beyond loopback through the modules and the primary's role (issue 11, local security).

drtool refuses an ``http://`` replica server whose host is not loopback unless told ``insecure``:
drtool_volume (protect) and drtool_role (promote, adopt, and the replica server's view in check
mode) pass their ``insecure`` option through; drtool_primary fails before it changes anything on
such a ``drtool_primary_peer_url`` unless ``drtool_primary_insecure``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from drtool import api
from tests.ansible.conftest import run_playbook
from tests.conftest import DRTOOL, make_image

SIZE = 1 << 20  # 16 regions of 64 KiB
TOKEN = "insecure-test-token-0123456789ab"


def _outside_address() -> str | None:
    """An address of this host that is not loopback (the one a route to the outside would use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only a route is looked up
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


class CleartextServer:
    """`drtool serve --insecure` on this host's non-loopback address."""

    def __init__(self, root: Path, token_file: Path, address: str) -> None:
        self.token_file = token_file
        self.proc = subprocess.Popen([*DRTOOL, "serve", "--root", str(root), "--listen", f"{address}:0",
                                      "--token-file", str(token_file), "--insecure"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"replica server did not start: {line!r}")
        self.url = "http://" + line.rsplit(" ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture
def cleartext(tmp_path: Path) -> Iterator[CleartextServer]:
    address = _outside_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    server = CleartextServer(tmp_path / "replicas", token, address)
    yield server
    server.stop()


def test_volume_pairs_over_cleartext_only_when_told(run_module, cleartext, tmp_path):
    make_image(tmp_path / "vol.img", SIZE, seed=3)
    args = {"name": "vol", "device": str(tmp_path / "vol.img"), "peer": cleartext.url,
            "token_file": str(cleartext.token_file), "state_root": str(tmp_path / "state")}
    refused = run_module("drtool_volume", args)
    assert refused.failed and "cleartext" in refused["msg"] and "--insecure" in refused["msg"], refused.data
    assert refused["exit_code"] == 2

    check = run_module("drtool_volume", dict(args, insecure=True), check=True, diff=True)
    assert check.changed and check["actions"] == ["paired"] and check["diff"]["after"]["insecure"] is True
    paired = run_module("drtool_volume", dict(args, insecure=True))
    assert paired.changed and paired["actions"] == ["paired"] and paired["insecure"] is True, paired.data
    assert paired["initial_sync"] == "done"
    peer = api.status("vol", root=str(tmp_path / "state"), probe_peer=False)[0]["peer"]
    assert peer["url"] == cleartext.url and peer["insecure"] is True and "not encrypted" in peer["warning"]
    assert not run_module("drtool_volume", dict(args, insecure=True)).changed
    # Without insecure the pairing would have to change, and drtool refuses the URL.
    again = run_module("drtool_volume", args, check=True)
    assert again.changed and again["actions"] == ["pairing updated"]
    assert run_module("drtool_volume", args).failed
    assert api.status("vol", root=str(tmp_path / "state"), probe_peer=False)[0]["peer"]["insecure"] is True


def test_role_reaches_a_cleartext_replica_server_only_when_told(run_module, cleartext, tmp_path):
    # Host a's volume, protected to the cleartext server (the replica to promote lives there).
    make_image(tmp_path / "a.img", SIZE, seed=4)
    api.init_volume("vol", str(tmp_path / "a.img"), "64K", root=str(tmp_path / "a"))
    api.protect("vol", cleartext.url, str(cleartext.token_file), root=str(tmp_path / "a"), insecure=True)
    args = {"name": "vol", "state": "primary", "force": True, "replica_url": cleartext.url,
            "token_file": str(cleartext.token_file), "state_root": str(tmp_path / "b")}
    for check in (True, False):
        refused = run_module("drtool_role", args, check=check)
        assert refused.failed and "cleartext" in refused["msg"], refused.data
    assert not (tmp_path / "b").exists() or api.status(root=str(tmp_path / "b")) == []
    seen = run_module("drtool_role", dict(args, insecure=True), check=True)
    assert seen.changed and seen["actions"] == ["promoted"] and seen["replica"]["state"] == "replica", seen.data
    promoted = run_module("drtool_role", dict(args, insecure=True))
    assert promoted.changed and promoted["takeover"], promoted.data
    assert api.status("vol", root=str(tmp_path / "b"), probe_peer=False)[0]["role"] == "primary"


@pytest.mark.slow
def test_primary_role_refuses_cleartext_beyond_loopback_before_any_change(tmp_path):
    extra = {"drtool_base": str(tmp_path), "drtool_install_method": "existing", "drtool_install_python": sys.executable,
             "drtool_primary_peer_url": "http://192.0.2.10:8470"}
    run = run_playbook("site.yml", tmp_path, extra, "--limit", "local-primary")
    assert run.rc != 0
    assert "Check that the peer is reached over TLS beyond loopback" in run.output, str(run)
    said = " ".join(run.output.split())
    assert "is plain HTTP to a host that is not loopback" in said and "drtool_primary_insecure" in said, str(run)
    assert not (tmp_path / "primary").exists()
