"""Off loopback the replica link is TLS on both ends (issue 11, "Local security"): the server
refuses to start without a certificate, the primary's client refuses an http:// peer, unless
the operator says --insecure explicitly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from drtool.client import ReplicaClient, check_peer_url
from drtool.errors import UsageError
from drtool.replica.server import serve
from tests.replica.conftest import _read_line


def _token(tmp_path: Path) -> Path:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    token.chmod(0o600)
    return token


def test_server_refuses_cleartext_beyond_loopback(tmp_path: Path) -> None:
    token = _token(tmp_path)
    for listen in ("0.0.0.0:0", "[::]:0", "192.0.2.10:8470"):
        with pytest.raises(UsageError, match="without TLS.*--tls-cert and --tls-key.*--insecure"):
            serve(str(tmp_path / "r"), listen, token_file=str(token))
    result = subprocess.run([sys.executable, "-m", "drtool", "serve", "--root", str(tmp_path / "r"),
                             "--listen", "0.0.0.0:0", "--token-file", str(token)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    assert "--tls-cert" in result.stderr and "--tls-key" in result.stderr and "cleartext" in result.stderr


def test_insecure_serves_cleartext_with_a_loud_warning(tmp_path: Path) -> None:
    token = _token(tmp_path)
    log = tmp_path / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "drtool", "serve", "--root", str(tmp_path / "r"),
                                 "--listen", "0.0.0.0:0", "--token-file", str(token), "--insecure"],
                                stdout=subprocess.PIPE, stderr=err)
    try:
        line = _read_line(proc, 20)
        assert line.startswith("drtool replica server listening on 0.0.0.0:"), (line, log.read_text())
        port = int(line.rsplit(":", 1)[1])
        # Beyond loopback a client must be told too; on loopback it may use http:// as it is.
        with ReplicaClient(f"http://127.0.0.1:{port}", token="0123456789abcdef0123") as client:
            assert client.health()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text()
    assert "WARNING: --insecure" in text and "cleartext" in text


def test_tls_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not used\n")
    key.write_text("not used\n")
    key.chmod(0o640)
    with pytest.raises(UsageError, match="mode 0640.*chmod 600"):
        serve(str(tmp_path / "r"), "127.0.0.1:0", token_file=str(_token(tmp_path)), tls_cert=str(cert),
              tls_key=str(key))


@pytest.mark.parametrize("url", ["http://192.0.2.10:8470", "http://dr-site:8470", "http://0.0.0.0:8470",
                                 "http://[2001:db8::1]:8470"])
def test_client_refuses_plain_http_beyond_loopback(url: str) -> None:
    with pytest.raises(UsageError, match="cleartext.*https://.*--insecure"):
        ReplicaClient(url, token="t" * 16)
    with ReplicaClient(url, token="t" * 16, insecure=True) as client:  # said explicitly: accepted
        assert client.insecure and client.url == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:8470", "http://127.0.0.2:8470/", "http://localhost:8470",
                                 "http://[::1]:8470", "https://dr-site:8470", "https://192.0.2.10:8470"])
def test_client_accepts_tls_or_loopback(url: str) -> None:
    check_peer_url(url)
    with ReplicaClient(url) as client:
        assert client.url == url.rstrip("/")


@pytest.mark.parametrize("url", ["ftp://dr-site:8470", "dr-site:8470", "http://", "https:///v1"])
def test_client_refuses_what_is_not_a_server_url(url: str) -> None:
    with pytest.raises(UsageError, match="must be https://"):
        ReplicaClient(url, insecure=True)


def _outside_address() -> str | None:
    """An address of this host that is not loopback (the one a route to the outside would use)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only a route is looked up
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_both_ends_over_a_real_non_loopback_address(tmp_path: Path) -> None:
    address = _outside_address()
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    token = _token(tmp_path)
    log = tmp_path / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "drtool", "serve", "--root", str(tmp_path / "r"),
                                 "--listen", f"{address}:0", "--token-file", str(token), "--insecure"],
                                stdout=subprocess.PIPE, stderr=err)
    try:
        line = _read_line(proc, 20)
        assert line.startswith(f"drtool replica server listening on {address}:"), (line, log.read_text())
        url = "http://" + line.rsplit(" ", 1)[1].strip()
        with pytest.raises(UsageError, match="cleartext"):
            ReplicaClient(url, token_file=str(token))
        with ReplicaClient(url, token_file=str(token), insecure=True) as client:
            assert client.list_volumes() == []
    finally:
        proc.terminate()
        proc.wait(15)


def test_status_warns_of_an_insecure_link(tmp_path, state_root, cli):
    from drtool.status import peer_status

    found = peer_status({"url": "http://192.0.2.2:1", "insecure": True, "token_file": None}, probe=False)
    assert found["insecure"] is True and "not encrypted" in found["warning"]
    assert "insecure" not in peer_status({"url": "https://dr:8470"}, probe=False)


def test_insecure_is_kept_only_where_it_matters():
    from drtool.client import needs_insecure

    assert needs_insecure("http://192.0.2.2:8470")
    assert not needs_insecure("https://192.0.2.2:8470")
    assert not needs_insecure("http://127.0.0.1:8470") and not needs_insecure("http://localhost:1")
