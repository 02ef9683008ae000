"""drtool snapshot create|list|delete (the replica server's snapshot endpoints, docs/api.md),
protect --plan on stdout, and error messages an operator can act on (issue 13)."""

from __future__ import annotations

import pytest

from drtool import api
from drtool.client import ReplicaClient
from drtool.errors import PeerUnreachable
from tests.conftest import make_image

RS = 65536


def test_snapshot_create_list_delete(protect_volume, replica_server, cli):
    protect_volume(16 * RS)
    peer = ["--replica-url", replica_server.url, "--token-file", str(replica_server.token_file)]
    made = cli("snapshot", "create", "vol", "before-upgrade", *peer)
    assert made.code == 0, made.err
    assert made.out == f"snapshot before-upgrade of vol created on {replica_server.url} at sequence 16\n"
    assert cli("snapshot", "create", "vol", "nightly").code == 0  # the volume's own peer by default
    listed = cli("snapshot", "list", "vol", *peer)
    lines = listed.out.splitlines()
    assert lines[0].split() == ["SNAPSHOT", "CREATED", "SEQUENCE", "PRESERVED", "REGIONS"]
    assert [line.split()[0] for line in lines[1:]] == ["before-upgrade", "nightly"]
    as_json = cli("snapshot", "list", "vol", "--json", *peer).json()
    assert [s["name"] for s in as_json["snapshots"]] == ["before-upgrade", "nightly"]
    again = cli("snapshot", "create", "vol", "nightly", *peer)
    assert again.code == 11 and "replica vol already has a snapshot nightly" in again.err
    gone = cli("snapshot", "delete", "vol", "nightly", *peer)
    assert gone.code == 0 and gone.out == f"snapshot nightly of vol deleted on {replica_server.url}\n"
    assert [s["name"] for s in replica_server.client().list_snapshots("vol")] == ["before-upgrade"]
    assert cli("snapshot", "delete", "vol", "../x", *peer).code == 2


def test_snapshot_of_a_volume_without_peer_needs_a_url(tmp_path, state_root, cli):
    make_image(tmp_path / "dev.img", 4 * RS)
    api.init_volume("solo", str(tmp_path / "dev.img"), "64K")
    result = cli("snapshot", "list", "solo")
    assert result.code == 2 and "volume solo has no peer here: give --replica-url" in result.err


def test_protect_plan_prints_its_plan_on_stdout(tmp_path, state_root, replica_server, cli):
    make_image(tmp_path / "dev.img", 16 * RS)
    api.init_volume("vol", str(tmp_path / "dev.img"), "64K")
    result = cli("protect", "vol", "--peer", replica_server.url, "--token-file", str(replica_server.token_file),
                 "--plan")
    assert result.code == 0
    assert result.out == "full sync: 16 regions (1 MiB) to copy\n" and result.err == ""


# -- errors -------------------------------------------------------------------------------------

def test_an_unreachable_peer_is_one_plain_sentence(replica_server, cli):
    url = replica_server.url
    replica_server.stop(kill=True)
    with pytest.raises(PeerUnreachable) as caught:
        ReplicaClient(url, retries=0).health()
    assert str(caught.value) == f"connection refused to {url}"
    result = cli("snapshot", "list", "vol", "--replica-url", url)
    assert result.code == 7 and result.err == f"drtool: connection refused to {url}\n"


def test_a_problem_title_is_not_repeated_in_the_message(protect_volume, replica_server, cli):
    protect_volume(4 * RS)
    peer = ["--replica-url", replica_server.url, "--token-file", str(replica_server.token_file)]
    cli("snapshot", "create", "vol", "s1", *peer)
    result = cli("snapshot", "create", "vol", "s1", *peer)
    message = result.err.strip()
    words = message.split(": ")
    assert len(words) == len(set(words)), message  # no part said twice


def test_a_permission_problem_is_reported_as_one(tmp_path, state_root, cli, monkeypatch):
    make_image(tmp_path / "dev.img", 4 * RS)
    api.init_volume("vol", str(tmp_path / "dev.img"), "64K")
    import os
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) == str(state_root)
                        else real_access(path, mode, **kw))
    result = cli("status")
    assert result.code == 5
    assert result.err.startswith(f"drtool: permission denied on {state_root}: ")
    assert "not registered" not in result.err
    # the root may be listed, but a volume's directory not
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) == str(state_root / "vol")
                        else real_access(path, mode, **kw))
    result = cli("status")
    assert result.code == 5 and result.err.startswith(f"drtool: permission denied on {state_root / 'vol'}: ")

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(state_root / "v2"))

    monkeypatch.setattr(api, "init_volume", denied)
    result = cli("init", "v2", "--device", str(tmp_path / "dev.img"))
    assert result.code == 5 and "internal error" not in result.err
    assert result.err.startswith(f"drtool: permission denied on {state_root / 'v2'}: ")
