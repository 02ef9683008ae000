"""drtool_replication verify=true (drtool verify as an Ansible task), in-process against the real API."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.ansible.test_docs import argument_spec
from tests.conftest import corrupt, make_image, state_files

RS = 65536
SIZE = 16 * RS


@pytest.fixture
def protected(run_module, tmp_path: Path, replica_server) -> dict:
    make_image(tmp_path / "vol.img", SIZE, seed=9)
    args = {"name": "vol", "device": str(tmp_path / "vol.img"), "peer": replica_server.url,
            "token_file": str(replica_server.token_file), "state_root": str(tmp_path / "state")}
    assert run_module("drtool_volume", args).changed
    return {"name": "vol", "state_root": args["state_root"], "verify": True}


@pytest.fixture
def image(replica_server) -> Path:
    return Path(replica_server.root) / "vol" / "mirror.img"


def test_a_replica_in_sync_verifies_unchanged(run_module, protected):
    result = run_module("drtool_replication", protected)
    assert result.rc == 0 and not result.changed and not result.failed, result.data
    assert result["in_sync"] and result["verify"]["result"] == "equal"
    assert result["verify"]["regions_compared"] == 16


def test_rot_fails_the_task_until_repair_ships_it_again(run_module, protected, image, tmp_path):
    corrupt(image, 5 * RS + 9)
    failed = run_module("drtool_replication", protected)
    assert failed.failed and failed["exit_code"] == 3, failed.data
    assert "replica-rot 5" in failed["msg"] and "repair=true" in failed["msg"]
    assert failed["verify"]["replica_rot"] == [[5, 1]] and not failed["in_sync"]

    files = state_files(tmp_path / "state")
    check = run_module("drtool_replication", dict(protected, repair=True), check=True, diff=True)
    assert check.changed and not check.failed, check.data
    assert check["diff"]["before"] == {"replica": "differ"}
    assert state_files(tmp_path / "state") == files  # check mode: not even the verify's cursor

    repaired = run_module("drtool_replication", dict(protected, repair=True, rate="64M"))
    assert repaired.changed and not repaired.failed, repaired.data
    assert repaired["verify"]["repair"]["relogged"] == [[5, 1]] and repaired["in_sync"]
    again = run_module("drtool_replication", dict(protected, repair=True))
    assert not again.changed and again["in_sync"]


def test_regions_limit_the_verify(run_module, protected, image):
    corrupt(image, 12 * RS)
    result = run_module("drtool_replication", dict(protected, regions=["0-3", "8"]))
    assert not result.failed and result["verify"]["regions_total"] == 5
    failed = run_module("drtool_replication", dict(protected, regions=["10-12"]))
    assert failed.failed and failed["verify"]["replica_rot"] == [[12, 1]]


def test_bad_arguments(run_module, protected):
    no_verify = run_module("drtool_replication", dict(protected, verify=False, repair=True))
    assert no_verify.failed and "verify=true" in no_verify["msg"]
    bad = run_module("drtool_replication", dict(protected, regions=["x"]))
    assert bad.failed and bad["exit_code"] == 2 and "region" in bad["msg"]
    rate = run_module("drtool_replication", dict(protected, rate="fast"))
    assert rate.failed and rate["exit_code"] == 2
    unknown = run_module("drtool_replication", dict(protected, name="nosuch"))
    assert unknown.failed and "not registered" in unknown["msg"]


def test_the_options_are_documented():
    spec = argument_spec("drtool_replication")["argument_spec"]
    assert spec["verify"] == {"type": "bool", "default": False}
    assert spec["repair"] == {"type": "bool", "default": False} and spec["rate"] == {"type": "str"}
