"""A relative --token-file (or --ca) is stored absolute, so later commands run from another
directory, and an agent started elsewhere, still reach the peer (issue 11)."""

from __future__ import annotations

import os
import shutil

import pytest

from drtool import api
from tests.conftest import make_image

RS = 65536
SIZE = 8 * RS


@pytest.fixture
def volume(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    make_image(path, SIZE, seed=2)
    api.init_volume("vol", str(path), "64K")
    (tmp_path / "conf").mkdir()
    shutil.copy(tmp_path / "token", tmp_path / "conf" / "token")
    (tmp_path / "elsewhere").mkdir()
    return path


def test_relative_token_file_is_stored_absolute(volume, tmp_path, replica_server, cli, monkeypatch):
    monkeypatch.chdir(tmp_path / "conf")
    result = cli("protect", "vol", "--peer", replica_server.url, "--token-file", "token")
    assert result.code == 0, result.err
    stored = cli("status", "vol", "--json").json()["peer"]["token_file"]
    assert stored == str(tmp_path / "conf" / "token")
    monkeypatch.chdir(tmp_path / "elsewhere")
    api.write("vol", 0, b"x" * 100)
    result = cli("replicate", "vol", "--wait", "--json")
    assert result.code == 0, result.err
    assert result.json()["lag"]["regions"] == 0


def test_relative_token_file_through_the_agent(volume, tmp_path, replica_server, start_agent, cli, monkeypatch):
    """The agent runs in another directory than the CLI: the path is the CLI's."""
    start_agent("vol")
    monkeypatch.chdir(tmp_path / "conf")
    result = cli("protect", "vol", "--peer", replica_server.url, "--token-file", "./token")
    assert result.code == 0, result.err
    assert os.getcwd() != str(tmp_path)  # (the agent's directory is the test runner's)
    assert cli("status", "vol", "--json").json()["peer"]["token_file"] == str(tmp_path / "conf" / "token")
    # Pairing again with the token given another way keeps it absolute too.
    monkeypatch.chdir(tmp_path)
    result = cli("protect", "vol", "--peer", replica_server.url, "--token-file", "conf/token")
    assert result.code == 0, result.err
    assert cli("status", "vol", "--json").json()["peer"]["token_file"] == str(tmp_path / "conf" / "token")


def test_relative_failback_device_is_the_callers(volume, tmp_path, replica_server, start_agent, cli, monkeypatch):
    """failback --device NEW names a file in the caller's directory, not the agent's."""
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    start_agent("vol")
    assert cli("recover", "vol").code == 0
    shutil.copy(volume, tmp_path / "elsewhere" / "new.img")
    monkeypatch.chdir(tmp_path / "elsewhere")
    result = cli("failback", "vol", "--device", "new.img", "--json")
    assert result.code == 0, result.err
    assert result.json()["device"] == str(tmp_path / "elsewhere" / "new.img")
    assert cli("status", "vol", "--json").json()["device"] == str(tmp_path / "elsewhere" / "new.img")
