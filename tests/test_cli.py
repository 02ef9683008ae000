"""Every command through main(argv), and as a real subprocess; bad input gives one clear line."""

import json
import os

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
