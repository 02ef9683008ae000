"""Every command through main(argv), and as a real subprocess; bad input gives one clear line."""

import json
import os
import re

import pytest

from drtool.errors import ExitCode
from tests.conftest import corrupt, make_image, run_drtool

RS = 65536


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "dev.img"
    make_image(path, 16 * RS + 10)
    return path


def test_init_scrub_status_round_trip(cli, image):
    result = cli("init", "vol", "--device", str(image), "--json")
    assert result.code == 0 and result.json()["regions_total"] == 17
    assert cli("scrub", "vol").code == ExitCode.OK
    corrupt(image, 3 * RS)
    corrupt(image, 16 * RS + 2)
    result = cli("scrub", "vol", "--json")
    assert result.code == ExitCode.BAD_REGIONS
    data = result.json()
    assert data["bad_regions"] == [[3, 1], [16, 1]]
    assert {"volume", "region_size", "regions_total", "bad_regions", "bytes_scanned", "seconds"} <= set(data)
    status = cli("status", "vol", "--json").json()
    assert status["health"] == "DEGRADED" and status["mode"] == "normal"
    assert status["bad_regions"] == [[3, 1], [16, 1]] and status["era"] == 1


def test_human_status_shows_bad_runs_and_map(cli, image):
    cli("init", "vol", "--device", str(image))
    corrupt(image, 5 * RS + 1)
    cli("scrub", "vol")
    out = cli("status", "vol").out
    assert "DEGRADED" in out and "region 5: offset 320 KiB (327680), 64 KiB" in out
    assert "bad on the device" in out  # the legend of the region map
    summary = cli("status").out
    assert "vol" in summary and "DEGRADED" in summary


def test_faulted_exit_code(cli, image):
    cli("init", "vol", "--device", str(image))
    os.unlink(image)
    result = cli("scrub", "vol")
    assert result.code == ExitCode.FAULTED and "FAULTED" in result.out
    assert cli("status", "vol", "--json").json()["health"] == "FAULTED"


def test_checkpoint_prints_new_era(cli, image):
    cli("init", "vol", "--device", str(image))
    assert cli("checkpoint", "vol").out.strip() == "2"
    assert cli("checkpoint", "vol", "--json").json() == {"volume": "vol", "era": 3}


def test_scan_lists_changed_regions(cli, image):
    cli("init", "vol", "--device", str(image))
    corrupt(image, 2 * RS + 4)
    result = cli("scan", "vol", "--json")
    assert result.code == 0 and result.json()["changed_regions"] == [[2, 1]]
    assert cli("scrub", "vol").code == 0


def test_init_refuses_existing_without_force(cli, image):
    cli("init", "vol", "--device", str(image))
    result = cli("init", "vol", "--device", str(image))
    assert result.code == ExitCode.STATE
    assert result.err == f"drtool: volume vol is already registered at {os.environ['DRTOOL_STATE_ROOT']}/vol (use --force to re-register)\n"
    assert cli("init", "vol", "--device", str(image), "--force").code == 0


@pytest.mark.parametrize("argv,code,message", [
    (["scrub", "ghost"], ExitCode.STATE, "volume ghost is not registered"),
    (["init", "bad/name", "--device", "IMAGE"], ExitCode.USAGE, "volume name 'bad/name' is not valid"),
    (["init", "v", "--device", "IMAGE", "--region-size", "3000"], ExitCode.USAGE, "must be a power of two"),
    (["init", "v", "--device", "/nonexistent/dev"], ExitCode.FAULTED, "device /nonexistent/dev does not exist"),
    (["init", "v", "--device", "DIR"], ExitCode.USAGE, "is a directory"),
    (["init", "v"], ExitCode.USAGE, "the following arguments are required: --device"),
    (["frobnicate"], ExitCode.USAGE, "invalid choice"),
])
def test_bad_input_one_clear_line(cli, image, tmp_path, argv, code, message):
    argv = [a.replace("IMAGE", str(image)).replace("DIR", str(tmp_path)) for a in argv]
    result = cli(*argv)
    assert result.code == code
    assert message in result.err
    assert result.err.count("\n") == 1 and result.err.startswith("drtool: ")
    assert "Traceback" not in result.err


def test_json_errors_are_machine_readable(cli):
    result = cli("status", "ghost", "--json")
    assert result.json()["error"]["exit_code"] == ExitCode.STATE


def test_debug_shows_traceback(cli):
    result = cli("scrub", "ghost", "--debug")
    assert "Traceback" in result.err


def test_real_subprocess_round_trip(image, state_root):
    env = {"DRTOOL_STATE_ROOT": str(state_root)}
    assert run_drtool("init", "vol", "--device", str(image), env=env).returncode == 0
    corrupt(image, 9 * RS)
    done = run_drtool("scrub", "vol", "--json", env=env)
    assert done.returncode == ExitCode.BAD_REGIONS
    assert json.loads(done.stdout)["bad_regions"] == [[9, 1]]
    failed = run_drtool("scrub", "nope", env=env)
    assert failed.returncode == ExitCode.STATE
    assert failed.stderr.decode().strip() == f"drtool: volume nope is not registered under {state_root}"


def test_state_root_flag_overrides_env(cli, image, tmp_path):
    other = tmp_path / "other-root"
    assert cli("init", "vol", "--device", str(image), "--state-root", str(other)).code == 0
    assert (other / "vol" / "volume.json").exists()
    assert cli("status", "--json").json() == []


@pytest.mark.parametrize("argv,code", [
    (["status", "vol", "--json"], 0), (["status"], 0), (["scan", "vol", "--json"], 0),
    (["checkpoint", "vol"], 0), (["read", "vol", "--offset", "0", "--length", "16"], 0),
    (["recover", "vol"], ExitCode.NOT_PERMITTED), (["failback", "vol", "--json"], 0),
    (["replicate", "vol"], ExitCode.USAGE), (["--version"], 0),
])
def test_commands_as_real_subprocesses(image, state_root, argv, code):
    env = {"DRTOOL_STATE_ROOT": str(state_root)}
    assert run_drtool("init", "vol", "--device", str(image), env=env).returncode == 0
    done = run_drtool(*argv, env=env)
    assert done.returncode == code, done.stderr
    if code:
        assert done.stderr.decode().startswith("drtool: ") and done.stderr.count(b"\n") == 1


# -- protect, replicate, write, read ----------------------------------------------------------


def protect_argv(replica_server) -> list[str]:
    return ["protect", "vol", "--peer", replica_server.url, "--token-file", str(replica_server.token_file)]


def test_protect_through_main(cli, image, replica_server):
    assert cli("init", "vol", "--device", str(image)).code == 0
    result = cli(*protect_argv(replica_server))
    assert result.code == 0, result.err
    assert result.err == "full sync: 17 regions (1.1 MiB) to copy\n"
    assert result.out.startswith(f"volume vol protected by {replica_server.url}: 17 regions synced, ")
    assert replica_server.client().read_range("vol", 0, 16 * RS + 10) == image.read_bytes()
    status = cli("status", "vol", "--json").json()
    assert status["peer"]["url"] == replica_server.url and status["peer"]["reachable"] is True
    assert status["replication"]["initial_sync"] == "done" and status["lag"]["regions"] == 0
    again = cli(*protect_argv(replica_server), "--json")  # the same peer again: nothing left to copy
    assert again.code == 0 and again.json()["changed"] is False and again.json()["plan"]["mode"] == "resume"
    assert again.json()["regions_synced"] == 0


def test_protect_plan_copies_nothing(cli, image, replica_server):
    cli("init", "vol", "--device", str(image))
    result = cli(*protect_argv(replica_server), "--plan")
    assert result.code == 0 and result.out == "full sync: 17 regions (1.1 MiB) to copy\n" and result.err == ""
    assert cli("status", "vol", "--json").json()["peer"] is None


def test_protect_as_a_real_subprocess(image, state_root, replica_server):
    env = {"DRTOOL_STATE_ROOT": str(state_root)}
    assert run_drtool("init", "vol", "--device", str(image), env=env).returncode == 0
    refused = run_drtool("protect", "vol", "--peer", replica_server.url, env=env)  # no token
    assert refused.returncode == ExitCode.PEER
    assert refused.stderr.count(b"\n") == 1 and b"401 Unauthorized" in refused.stderr
    assert refused.stderr.startswith(f"drtool: replica server {replica_server.url}/".encode())
    done = run_drtool(*protect_argv(replica_server), "--json", env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["changed"] is True and result["regions_synced"] == 17 and result["peer"] == replica_server.url
    assert replica_server.client().read_range("vol", 0, 16 * RS + 10) == image.read_bytes()
    status = json.loads(run_drtool("status", "vol", "--json", env=env).stdout)
    assert status["peer"]["url"] == replica_server.url and status["lag"]["regions"] == 0


def test_replicate_regions_forces_exactly_those(cli, image, replica_server, tmp_path):
    cli("init", "vol", "--device", str(image))
    assert cli(*protect_argv(replica_server)).code == 0
    before = image.read_bytes()
    for region in (2, 5, 6):
        chunk = tmp_path / f"chunk{region}"
        chunk.write_bytes(bytes([region]) * 1000)
        assert cli("write", "vol", "--offset", str(region * RS + 10), "--input", str(chunk)).code == 0
    assert cli("status", "vol", "--json").json()["lag"]["regions"] == 3
    result = cli("replicate", "vol", "--regions", "2,6", "--json")
    assert result.code == 0, result.err
    forced = result.json()
    assert forced["forced_regions"] == [[2, 1], [6, 1]] and forced["records_shipped"] == 2
    assert forced["lag"]["regions"] == 1 and forced["lag"]["records"] == 1  # region 5 is still pending
    replica = replica_server.client().read_range("vol", 0, 16 * RS + 10)
    assert replica[2 * RS + 10:2 * RS + 1010] == bytes([2]) * 1000
    assert replica[6 * RS + 10:6 * RS + 1010] == bytes([6]) * 1000
    assert replica[5 * RS:6 * RS] == before[5 * RS:6 * RS]  # not shipped
    assert cli("status", "vol", "--json").json()["maps"]["unreplicated"] == [[5, 1]]
    human = cli("replicate", "vol", "--regions", "5")
    assert human.code == 0
    assert re.fullmatch(r"shipped 1 records \(\d+ bytes\); lag: 0 records, 0 regions\n", human.out), human.out
    assert replica_server.client().read_range("vol", 0, 16 * RS + 10)[5 * RS + 10:5 * RS + 1010] == bytes([5]) * 1000


@pytest.mark.parametrize("runs,message", [
    ("17", "region run 17+1 is outside the volume (regions 0-16)"),
    ("3-99", "region run 3+97 is outside the volume (regions 0-16)"),
    ("x", "'x'"),
])
def test_replicate_bad_regions_one_clear_line(cli, image, replica_server, runs, message):
    cli("init", "vol", "--device", str(image))
    cli(*protect_argv(replica_server))
    result = cli("replicate", "vol", "--regions", runs)
    assert result.code == ExitCode.USAGE
    assert result.err.startswith("drtool: ") and result.err.count("\n") == 1 and message in result.err


def test_write_input_missing_is_a_usage_error(cli, image):
    cli("init", "vol", "--device", str(image))
    result = cli("write", "vol", "--offset", "0", "--input", "/nonexistent")
    assert result.code == ExitCode.USAGE
    assert result.err.startswith("drtool: ") and result.err.count("\n") == 1
    assert "/nonexistent" in result.err and "internal error" not in result.err
    assert cli("read", "vol", "--offset", "0", "--length", "16").out.encode("latin-1") == image.read_bytes()[:16]


def test_read_output_file_has_exact_bytes(cli, image, tmp_path, state_root):
    cli("init", "vol", "--device", str(image))
    data = image.read_bytes()
    target = tmp_path / "out.bin"
    result = cli("read", "vol", "--offset", "64K", "--length", str(3 * RS + 7), "-o", str(target))
    assert result.code == 0 and result.out == "" and result.err == ""
    assert target.read_bytes() == data[RS:4 * RS + 7]
    tail = tmp_path / "tail.bin"  # the partial last region, as a real subprocess
    done = run_drtool("read", "vol", "--offset", str(16 * RS), "--length", "10", "--output", str(tail),
                      env={"DRTOOL_STATE_ROOT": str(state_root)})
    assert done.returncode == 0 and done.stdout == b""
    assert tail.read_bytes() == data[16 * RS:]
    past = cli("read", "vol", "--offset", str(16 * RS), "--length", "11", "-o", str(tmp_path / "never"))
    assert past.code == ExitCode.USAGE and past.err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_initial_sync_of_a_sparse_volume_keeps_the_replica_sparse(cli, tmp_path, replica_server):
    path = tmp_path / "sparse.img"
    size = 512 * RS  # 32 MiB, data in three regions only
    with open(path, "wb") as handle:
        handle.truncate(size)
        for region in (0, 100, 511):
            handle.seek(region * RS)
            handle.write(bytes([region % 251 + 1]) * RS)
    assert cli("init", "vol", "--device", str(path)).code == 0
    assert cli(*protect_argv(replica_server)).code == 0
    mirror = replica_server.root / "vol" / "mirror.img"
    assert mirror.stat().st_size == size
    assert mirror.read_bytes() == path.read_bytes()
    assert mirror.stat().st_blocks * 512 <= 3 * RS + 64 * 1024  # the data regions, not 32 MiB
