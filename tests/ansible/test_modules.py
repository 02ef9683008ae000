"""Unit tests of the drtool modules, in-process against drtool's real API.

Each module: changed, then idempotent; check mode changes nothing; bad
arguments fail with a clear message; drtool's errors become fail_json.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.ansible.conftest import MODULE_UTILS_NAME, free_port, load_module, stop_pid_file
from tests.conftest import corrupt, make_image, state_files

SIZE = 1 << 20  # 16 regions of 64 KiB
TOKEN = "unit-test-token-0123456789abcdef"


@pytest.fixture
def base(tmp_path: Path) -> Path:
    make_image(tmp_path / "vol.img", SIZE, seed=5)
    return tmp_path


@pytest.fixture
def volume_args(base: Path, replica_server) -> dict:
    return {"name": "vol", "device": str(base / "vol.img"), "peer": replica_server.url,
            "token_file": str(replica_server.token_file), "state_root": str(base / "state")}


@pytest.fixture
def protected(run_module, volume_args) -> dict:
    """A registered, paired volume; returns the arguments that made it."""
    assert run_module("drtool_volume", volume_args).changed
    return volume_args


# -- drtool_volume -----------------------------------------------------------------------------


def test_volume_registers_and_pairs_then_is_idempotent(run_module, volume_args):
    first = run_module("drtool_volume", volume_args)
    assert first.rc == 0 and first.changed, first.data
    assert first["actions"] == ["registered", "paired"]
    assert first["initial_sync"] == "done" and first["protect"]["regions_synced"] == 16
    again = run_module("drtool_volume", volume_args)
    assert not again.changed and again["actions"] == []
    assert again["peer"] == volume_args["peer"]


def test_volume_check_mode_changes_nothing_and_shows_a_diff(run_module, volume_args, base):
    result = run_module("drtool_volume", volume_args, check=True, diff=True)
    assert result.changed and result["actions"] == ["registered", "paired"]
    assert result["diff"]["before"] == {"registered": False}
    assert result["diff"]["after"]["registered"] is True
    assert result["diff"]["after"]["peer"] == volume_args["peer"]
    assert not (base / "state").exists()


def test_volume_token_is_written_0600_and_never_returned(run_module, volume_args, base):
    args = dict(volume_args, token_file=str(base / "etc" / "token"), token=TOKEN, peer=None)
    result = run_module("drtool_volume", args)
    assert "token written" in result["actions"]
    path = base / "etc" / "token"
    assert path.read_text() == TOKEN + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert TOKEN not in str(result.data)
    assert not run_module("drtool_volume", args).changed


def test_volume_settings_change_once_check_mode_first(run_module, protected, base):
    args = dict(protected, settings={"copy_on_read": False, "log_limit": "64M", "fetch_timeout": 5})
    files = state_files(base / "state")
    check = run_module("drtool_volume", args, check=True, diff=True)
    assert check.changed and check["actions"] == ["settings changed"]
    assert check["diff"]["before"]["settings"]["copy_on_read"] is True
    assert check["diff"]["after"]["settings"] == {"copy_on_read": False, "auto_degrade": True,
                                                  "log_limit": 64 << 20, "fetch_timeout": 5.0}
    assert state_files(base / "state") == files
    done = run_module("drtool_volume", args)
    assert done.changed and done["settings"] == check["diff"]["after"]["settings"]
    assert not run_module("drtool_volume", args).changed
    # Keys not given keep their values.
    assert not run_module("drtool_volume", dict(protected, settings={"auto_degrade": True})).changed
    assert run_module("drtool_volume", protected)["settings"]["fetch_timeout"] == 5.0


def test_volume_bad_settings_fail_before_anything_changes(run_module, volume_args, base):
    result = run_module("drtool_volume", dict(volume_args, settings={"log_limit": "4K"}))
    assert result.failed and "setting log_limit must be a byte count of at least 1048576" in result["msg"]
    assert not (base / "state").exists()
    typo = run_module("drtool_volume", dict(volume_args, settings={"copy_on_reed": False}))
    assert typo.failed and "copy_on_reed" in typo["msg"]


def test_volume_refuses_another_device_without_force(run_module, protected, base):
    make_image(base / "other.img", SIZE, seed=6)
    result = run_module("drtool_volume", dict(protected, device=str(base / "other.img")))
    assert result.failed
    assert "registered with device" in result["msg"] and "force=true" in result["msg"]


def test_volume_absent_unregisters_once(run_module, protected, base):
    args = {"name": "vol", "state": "absent", "state_root": protected["state_root"]}
    check = run_module("drtool_volume", args, check=True)
    assert check.changed and (base / "state" / "vol").exists()
    assert run_module("drtool_volume", args).changed
    assert not (base / "state" / "vol").exists()
    assert not run_module("drtool_volume", args).changed


def test_volume_bad_arguments_fail_clearly(run_module, base):
    missing = run_module("drtool_volume", {"name": "vol", "state_root": str(base / "state")})
    assert missing.failed and "device" in missing["msg"] and "state is present" in missing["msg"]
    bad_state = run_module("drtool_volume", {"name": "vol", "state": "gone", "device": "/x"})
    assert bad_state.failed and "value of state must be one of: present, absent" in bad_state["msg"]
    token_alone = run_module("drtool_volume", {"name": "vol", "device": "/x", "token": TOKEN})
    assert token_alone.failed and "token_file" in token_alone["msg"]
    assert TOKEN not in str(token_alone.data)


def test_volume_drtool_errors_become_fail_json(run_module, base):
    result = run_module("drtool_volume", {"name": "bad/name", "device": str(base / "vol.img"),
                                          "state_root": str(base / "state")})
    assert result.failed and "is not valid" in result["msg"]
    assert result["exit_code"] == 2 and result["error"] == "UsageError"
    nodev = run_module("drtool_volume", {"name": "vol", "device": str(base / "missing.img"),
                                         "state_root": str(base / "state")})
    assert nodev.failed and "does not exist" in nodev["msg"] and nodev["exit_code"] == 4


def test_missing_drtool_fails_with_missing_required_lib(run_module, monkeypatch):
    load_module("drtool_status_info")  # registers the module_utils
    import sys

    utils = sys.modules[MODULE_UTILS_NAME]
    monkeypatch.setattr(utils, "HAS_DRTOOL", False)
    monkeypatch.setattr(utils, "DRTOOL_IMPORT_ERROR", "ModuleNotFoundError: No module named 'drtool'")
    result = run_module("drtool_status_info", {})
    assert result.failed
    assert "Failed to import the required Python library (drtool)" in result["msg"]
    assert "ansible_python_interpreter" in result["msg"]


# -- drtool_health_info and drtool_status_info ---------------------------------------------


def test_health_info_probe_scrub_and_faulted_device(run_module, protected, base):
    root = protected["state_root"]
    probe = run_module("drtool_health_info", {"state_root": root, "probe_peer": False})
    assert not probe.changed and probe["healthy"] and probe["volumes"][0]["probe"]["ok"]

    corrupt(base / "vol.img", 3 * 65536 + 100)
    before = state_files(base / "state")
    for check in (True, False):
        # An _info module never changes anything, check mode or not: the scrub reports, records nothing.
        scrubbed = run_module("drtool_health_info", {"state_root": root, "mode": "scrub"}, check=check)
        assert not scrubbed.changed and scrubbed["unhealthy"] == ["vol"]
        entry = scrubbed["volumes"][0]
        assert entry["health"] == "DEGRADED" and entry["bad_regions"] == [[3, 1]] and entry["bad_count"] == 1
        assert entry["scrub"]["new_bad_regions"] == [[3, 1]]
        assert entry["lag"]["records"] == 0 and entry["mode"] == "normal"
        assert entry["peer"]["reachable"] is True
    from drtool import api

    assert api.status("vol", root=root, probe_peer=False)[0]["bad_count"] == 0, "the bad map is unchanged"
    assert state_files(base / "state") == before

    os.rename(base / "vol.img", base / "vol.away")
    faulted = run_module("drtool_health_info", {"names": ["vol"], "state_root": root})
    assert faulted["volumes"][0]["health"] == "FAULTED"
    assert "does not exist" in faulted["volumes"][0]["faulted"]


def test_health_info_unknown_volume_fails_clearly(run_module, base):
    result = run_module("drtool_health_info", {"names": ["nope"], "state_root": str(base / "state")})
    assert result.failed and "volume nope is not registered" in result["msg"] and result["exit_code"] == 5


@pytest.mark.parametrize("name", ["drtool_health_info", "drtool_status_info"])
def test_info_modules_bad_arguments_fail_clearly(run_module, protected, name):
    root = protected["state_root"]
    unknown = run_module(name, {"state_root": root, "volume_names": ["vol"]})
    assert unknown.failed and "Unsupported parameters" in unknown["msg"] and "volume_names" in unknown["msg"]
    not_bool = run_module(name, {"state_root": root, "probe_peer": "sometimes"})
    assert not_bool.failed and "probe_peer" in not_bool["msg"] and "bool" in not_bool["msg"], not_bool.data
    not_a_name = run_module(name, {"state_root": root, "names": ["../etc"]})
    assert not_a_name.failed and "is not valid" in not_a_name["msg"] and not_a_name["exit_code"] == 2


def test_health_info_bad_mode_fails_clearly(run_module, protected):
    bad = run_module("drtool_health_info", {"state_root": protected["state_root"], "mode": "deep"})
    assert bad.failed and bad["msg"] == "value of mode must be one of: probe, scrub, got: deep"


def test_status_info_returns_every_volume(run_module, protected, base):
    empty = run_module("drtool_status_info", {"state_root": str(base / "elsewhere")})
    assert empty["volumes"] == [] and empty["healthy"]
    result = run_module("drtool_status_info", {"state_root": protected["state_root"]}, check=True)
    assert not result.changed and result["names"] == ["vol"]
    status = result["volumes"][0]
    assert status["schema"] == "drtool.status/1" and status["health"] == "ONLINE"
    assert status["peer"]["url"] == protected["peer"]


# -- drtool_recovery ---------------------------------------------------------------------------


def test_recovery_enters_degraded_then_fails_back(run_module, protected, base):
    root = protected["state_root"]
    original = (base / "vol.img").read_bytes()
    corrupt(base / "vol.img", 5 * 65536)
    scrub = {"name": "vol", "state": "scrubbed", "state_root": root}
    before = state_files(base / "state")
    would = run_module("drtool_recovery", scrub, check=True, diff=True)
    assert would.changed and would["bad_regions"] == [[5, 1]] and would["health"] == "DEGRADED"
    assert would["diff"] == {"before": {"bad_regions": []}, "after": {"bad_regions": [[5, 1]]},
                             "before_header": "volume vol", "after_header": "volume vol"}
    assert state_files(base / "state") == before, "check mode records nothing"
    recorded = run_module("drtool_recovery", scrub)
    assert recorded.changed and recorded["scrub"]["new_bad_regions"] == [[5, 1]] and recorded["bad_count"] == 1
    assert recorded["mode"] == "normal" and recorded["lost_regions"] == []
    again = run_module("drtool_recovery", scrub)
    assert not again.changed and again["bad_regions"] == [[5, 1]], "the same findings change nothing"

    before = state_files(base / "state")
    check = run_module("drtool_recovery", {"name": "vol", "state": "degraded", "state_root": root},
                       check=True, diff=True)
    assert check.changed and check["diff"]["before"]["mode"] == "normal" and check["diff"]["after"]["mode"] == "degraded"
    assert state_files(base / "state") == before

    entered = run_module("drtool_recovery", {"name": "vol", "state": "degraded", "state_root": root})
    assert entered.changed and entered["mode"] == "degraded" and entered["recover"]["requested_count"] == 1
    assert not run_module("drtool_recovery", {"name": "vol", "state": "degraded", "state_root": root}).changed

    from drtool import api

    assert api.read("vol", 0, SIZE, root=root) == original  # merged, verified

    args = {"name": "vol", "state": "normal", "rate": "100M", "state_root": root}
    assert run_module("drtool_recovery", args, check=True).changed
    back = run_module("drtool_recovery", args)
    assert back.changed and back["mode"] == "normal" and back["failback"]["regions_copied"] >= 1
    assert (base / "vol.img").read_bytes() == original
    assert not run_module("drtool_recovery", args).changed


def test_recovery_onto_a_new_device(run_module, protected, base):
    root = protected["state_root"]
    original = (base / "vol.img").read_bytes()
    os.rename(base / "vol.img", base / "vol.dead")
    scrubbed = run_module("drtool_recovery", {"name": "vol", "state": "scrubbed", "state_root": root})
    assert scrubbed["health"] == "FAULTED" and "does not exist" in scrubbed["faulted"], scrubbed.data
    assert run_module("drtool_recovery", {"name": "vol", "state": "degraded", "state_root": root}).changed
    make_image(base / "new.img", SIZE, seed=99)
    back = run_module("drtool_recovery", {"name": "vol", "state": "normal", "device": str(base / "new.img"),
                                          "state_root": root}, diff=True)
    assert back.changed and back["device"] == str(base / "new.img")
    assert back["diff"]["after"] == {"mode": "normal", "device": str(base / "new.img")}
    assert (base / "new.img").read_bytes() == original
    again = run_module("drtool_recovery", {"name": "vol", "state": "normal", "device": str(base / "new.img"),
                                           "state_root": root})
    assert not again.changed


def test_recovery_bad_arguments_fail_clearly(run_module, protected, base):
    root = protected["state_root"]
    mixed = run_module("drtool_recovery", {"name": "vol", "state": "degraded", "rate": "1M", "state_root": root})
    assert mixed.failed and "state=normal" in mixed["msg"]
    scrub_era = run_module("drtool_recovery", {"name": "vol", "state": "scrubbed", "local_era": 1, "state_root": root})
    assert scrub_era.failed and scrub_era["msg"] == ("source and local_era are for state=degraded (recovery), "
                                                     "not state=scrubbed")
    nowhere = run_module("drtool_recovery", {"name": "vol", "state": "normal", "device": str(base / "x.img"),
                                             "state_root": root})
    assert nowhere.failed and "nothing to fail back onto" in nowhere["msg"]
    unknown = run_module("drtool_recovery", {"name": "nope", "state": "degraded", "state_root": root})
    assert unknown.failed and "volume nope is not registered" in unknown["msg"]
    no_state = run_module("drtool_recovery", {"name": "vol"})
    assert no_state.failed and "missing required arguments: state" in no_state["msg"]
    source = run_module("drtool_recovery", {"name": "vol", "state": "degraded", "source": "tape",
                                            "state_root": root})
    assert source.failed and "tape" in source["msg"] and source["exit_code"] == 2
    # The argument spec's required_if: a journal is read after an era, which local_era names (check mode too).
    journal = run_module("drtool_recovery", {"name": "vol", "state": "degraded", "source": "journal",
                                             "state_root": root}, check=True)
    assert journal.failed and journal["msg"] == "source is journal but all of the following are missing: local_era"
    assert api_mode(root) == "normal"


def api_mode(root: str) -> str:
    from drtool import api

    return api.status("vol", root=root, probe_peer=False)[0]["mode"]


# -- drtool_replication ------------------------------------------------------------------------


def test_replication_waits_for_zero_lag(run_module, protected):
    from drtool import api

    root = protected["state_root"]
    api.write("vol", 65536, b"x" * 65536, root=root)
    check = run_module("drtool_replication", {"name": "vol", "state_root": root}, check=True, diff=True)
    assert check.changed and check["lag"]["records"] == 1 and check["diff"]["before"]["lag"]["records"] == 1
    assert api.status("vol", root=root, probe_peer=False)[0]["lag"]["records"] == 1

    shipped = run_module("drtool_replication", {"name": "vol", "timeout": 30, "state_root": root})
    assert shipped.changed and shipped["records_shipped"] == 1 and shipped["lag"]["records"] == 0
    assert not run_module("drtool_replication", {"name": "vol", "state_root": root}).changed


def test_replication_forces_regions(run_module, protected):
    from drtool import api

    root = protected["state_root"]
    api.write("vol", 2 * 65536, b"y" * 65536, root=root)
    api.write("vol", 9 * 65536, b"z" * 65536, root=root)
    args = {"name": "vol", "regions": ["9"], "state_root": root}
    check = run_module("drtool_replication", args, check=True)
    assert check.changed and check["forced_regions"] == [[9, 1]] and check["records_shipped"] == 0
    assert api.status("vol", root=root, probe_peer=False)[0]["lag"]["records"] == 2
    forced = run_module("drtool_replication", args)
    assert forced.changed and forced["forced_regions"] == [[9, 1]] and forced["records_shipped"] == 1
    assert forced["lag"]["records"] == 1  # region 2 still pending


def test_replication_check_mode_predicts_the_real_run(run_module, protected):
    """Check mode says changed exactly when the same task really run would ship something."""
    from drtool import api

    root = protected["state_root"]

    def predicted_then_real(args):
        check = run_module("drtool_replication", args, check=True)
        real = run_module("drtool_replication", args)
        assert not check.failed and not real.failed, (check.data, real.data)
        assert check["forced_regions"] == real["forced_regions"]
        return check.changed, real.changed

    in_sync = {"name": "vol", "regions": ["3", "10-12"], "state_root": root}
    assert predicted_then_real(in_sync) == (False, False)  # nothing pending: nothing to force
    api.write("vol", 2 * 65536, b"y" * 4096, root=root)
    elsewhere = {"name": "vol", "regions": ["9"], "state_root": root}
    assert predicted_then_real(elsewhere) == (False, False)  # pending in region 2, not in 9
    assert predicted_then_real({"name": "vol", "regions": ["1-2"], "state_root": root}) == (True, True)
    api.write("vol", 5 * 65536, b"w" * 4096, root=root)
    assert predicted_then_real({"name": "vol", "state_root": root}) == (True, True)
    assert predicted_then_real({"name": "vol", "state_root": root}) == (False, False)

    # Where the real run fails, check mode fails the same way.
    outside = {"name": "vol", "regions": ["16"], "state_root": root}
    check, real = run_module("drtool_replication", outside, check=True), run_module("drtool_replication", outside)
    assert check.failed and real.failed and check["msg"] == real["msg"] and "outside the volume" in check["msg"]
    garbled = {"name": "vol", "regions": ["x"], "state_root": root}
    check, real = run_module("drtool_replication", garbled, check=True), run_module("drtool_replication", garbled)
    assert check.failed and real.failed and check["msg"] == real["msg"]


def test_replication_bad_arguments_and_unpaired_volume(run_module, base):
    root = str(base / "state")
    assert run_module("drtool_volume", {"name": "solo", "device": str(base / "vol.img"), "state_root": root}).changed
    zero = run_module("drtool_replication", {"name": "solo", "timeout": 0, "state_root": root})
    assert zero.failed and "timeout must be a positive number" in zero["msg"]
    unpaired = run_module("drtool_replication", {"name": "solo", "state_root": root})
    assert unpaired.failed and "no peer" in unpaired["msg"]
    unpaired_check = run_module("drtool_replication", {"name": "solo", "state_root": root}, check=True)
    assert unpaired_check.failed and unpaired_check["msg"] == unpaired["msg"]
    assert unpaired_check["exit_code"] == unpaired["exit_code"]


# -- drtool_replica and drtool_agent (real daemons) ------------------------------------------


@pytest.fixture
def daemons(base: Path):
    """Pid files to clean up, whatever the test did."""
    pid_files: list[Path] = []
    yield pid_files
    for path in pid_files:
        stop_pid_file(path)


def test_replica_start_idempotent_restart_on_change_and_stop(run_module, base, daemons):
    pid_file = base / "run" / "replica.pid"
    daemons.append(pid_file)
    port = free_port()
    args = {"root": str(base / "replicas"), "listen": f"127.0.0.1:{port}", "token_file": str(base / "rtoken"),
            "token": TOKEN, "pid_file": str(pid_file), "log_file": str(base / "log" / "replica.log")}

    check = run_module("drtool_replica", args, check=True, diff=True)
    assert check.changed and check["action"] == "started" and not pid_file.exists()
    assert not (base / "rtoken").exists()

    started = run_module("drtool_replica", args)
    assert started.changed and started["action"] == "started" and started["pid"]
    assert started["url"] == f"http://127.0.0.1:{port}" and TOKEN not in str(started.data)
    from drtool.client import ReplicaClient

    ReplicaClient(started["url"], token=TOKEN).health()

    again = run_module("drtool_replica", args)
    assert not again.changed and again["pid"] == started["pid"]

    rotated = run_module("drtool_replica", dict(args, token=TOKEN + "-rotated"))
    assert rotated.changed and rotated["action"] == "restarted" and rotated["pid"] != started["pid"]
    assert "changed since it started" in rotated["reason"]

    moved = dict(args, token=TOKEN + "-rotated", listen=f"127.0.0.1:{free_port()}")
    restarted = run_module("drtool_replica", moved, diff=True)
    assert restarted["action"] == "restarted" and "arguments differ" in restarted["reason"]
    assert restarted["diff"]["before"]["args"] != restarted["diff"]["after"]["args"]

    stop = {"state": "stopped", "pid_file": str(pid_file)}
    assert run_module("drtool_replica", stop, check=True).changed
    assert run_module("drtool_replica", stop).changed
    assert not pid_file.exists()
    assert not run_module("drtool_replica", stop).changed


def test_replica_bad_arguments_fail_clearly(run_module, base):
    no_root = run_module("drtool_replica", {"pid_file": str(base / "p"), "log_file": str(base / "l")})
    assert no_root.failed and "state is started but all of the following are missing: root" in no_root["msg"]
    half_tls = run_module("drtool_replica", {"root": str(base), "pid_file": str(base / "p"),
                                             "log_file": str(base / "l"), "tls_cert": str(base / "c")})
    assert half_tls.failed and "tls_cert" in half_tls["msg"] and "tls_key" in half_tls["msg"]
    weak = run_module("drtool_replica", {"root": str(base / "r"), "listen": "127.0.0.1:0", "pid_file": str(base / "p"),
                                         "log_file": str(base / "l"), "token_file": str(base / "t"), "token": "abc123"})
    assert weak.failed and "could not start drtool serve" in weak["msg"] and "too short" in weak["msg"]


def test_agent_serves_volumes_changes_its_set_live_and_stops(run_module, protected, base, daemons):
    root = protected["state_root"]
    make_image(base / "two.img", SIZE, seed=7)
    assert run_module("drtool_volume", dict(protected, name="two", device=str(base / "two.img"))).changed
    pid_file = base / "run" / "agent.pid"
    daemons.append(pid_file)
    socket_path = base / "run" / "nbd.sock"
    args = {"names": ["vol"], "listen": "none", "nbd_socket": str(socket_path), "pid_file": str(pid_file),
            "log_file": str(base / "log" / "agent.log"), "state_root": root,
            "restart_if_changed": [protected["token_file"]]}
    (base / "run").mkdir()

    assert run_module("drtool_agent", args, check=True).changed and not pid_file.exists()
    started = run_module("drtool_agent", args)
    assert started.changed and started["action"] == "started"
    assert started["uris"] == {"vol": [f"nbd+unix:///vol?socket={socket_path}"]}
    from drtool import api

    assert api.agent_socket("vol", root) and not api.agent_socket("two", root)
    assert not run_module("drtool_agent", args).changed

    # Another set of volumes: attached on the running agent, which is not restarted.
    both = dict(args, names=["two", "vol"])
    planned = run_module("drtool_agent", both, check=True)
    assert planned.changed and planned["action"] == "none" and planned["attached"] == ["two"]
    assert not api.agent_socket("two", root)
    grown = run_module("drtool_agent", both)
    assert grown.changed and grown["action"] == "none" and grown["pid"] == started["pid"]
    assert grown["attached"] == ["two"] and set(grown["uris"]) == {"two", "vol"}
    assert api.agent_socket("two", root)
    assert not run_module("drtool_agent", dict(both, names=["vol", "two"])).changed  # order does not matter
    # The unit's way: only the set is managed (a volume with a client connected stays unless forced).
    from tests.nbd.rawclient import RawClient

    with RawClient(str(socket_path)) as client:
        client.connect("vol")
        unit = {"service_manager": "systemd", "names": ["two"], "state_root": root}
        refused = run_module("drtool_agent", unit)
        assert refused.failed and "vol has 1 NBD client connected" in refused["msg"] and refused["exit_code"] == 6
        shrunk = run_module("drtool_agent", dict(unit, force_detach=True))
        assert shrunk.changed and shrunk["detached"] == ["vol"] and shrunk["pid"] == started["pid"]
        assert client.server_closed()
    assert api.agent_info(root)["volumes"] == ["two"]
    # Other arguments still restart it.
    moved = run_module("drtool_agent", dict(args, nbd_socket=str(base / "run" / "other.sock")))
    assert moved["action"] == "restarted" and "arguments differ" in moved["reason"]
    assert api.agent_info(root)["volumes"] == ["vol"]

    stopped = run_module("drtool_agent", {"state": "stopped", "pid_file": str(pid_file)})
    assert stopped.changed and not api.agent_socket("vol", root)
    assert not run_module("drtool_agent", {"state": "stopped", "pid_file": str(pid_file)}).changed
    gone = run_module("drtool_agent", {"service_manager": "systemd", "names": ["vol"], "state_root": root})
    assert gone.failed and "no drtool agent is running" in gone["msg"]


def test_agent_bad_arguments_fail_clearly(run_module, base):
    no_names = run_module("drtool_agent", {"pid_file": str(base / "p"), "log_file": str(base / "l")})
    assert no_names.failed and "names" in no_names["msg"]
    unknown = run_module("drtool_agent", {"names": ["ghost"], "listen": "none", "pid_file": str(base / "p"),
                                          "log_file": str(base / "l"), "state_root": str(base / "state")})
    assert unknown.failed and "could not start drtool agent" in unknown["msg"]
    assert "ghost is not registered" in unknown["msg"]
