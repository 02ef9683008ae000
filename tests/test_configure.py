"""Volume settings: copy-on-read, auto-degrade and the log limit, changed with `drtool configure`."""

import pytest

from drtool import api
from drtool.errors import ExitCode
from tests.conftest import corrupt

RS = 65536
REGIONS = 16
SIZE = REGIONS * RS


@pytest.fixture
def protected(protect_volume):
    return protect_volume(SIZE, seed=5)


def test_configure_shows_changes_and_is_idempotent(protected, cli):
    shown = cli("configure", "vol")
    assert shown.code == 0
    assert shown.out.strip() == ("volume vol: copy-on-read on, auto-degrade on, log limit 1 GiB, "
                                 "fetch timeout 30s")
    changed = cli("configure", "vol", "--copy-on-read", "off", "--log-limit", "64M", "--fetch-timeout", "2.5",
                  "--json").json()
    assert changed == {"volume": "vol", "changed": True,
                       "settings": {"copy_on_read": False, "auto_degrade": True, "log_limit": 64 << 20,
                                    "fetch_timeout": 2.5}}
    assert cli("configure", "vol", "--copy-on-read", "off", "--json").json()["changed"] is False
    assert api.configure("vol")["settings"]["copy_on_read"] is False  # saved: a new process sees it


@pytest.mark.parametrize("argv, message", [
    (["--copy-on-read", "maybe"], "expected on or off, not 'maybe'"),
    (["--log-limit", "4K"], "setting log_limit must be a byte count of at least 1048576, not 4096"),
    (["--log-limit", "lots"], "--log-limit 'lots' is not a size"),
    (["--fetch-timeout", "0"], "setting fetch_timeout must be seconds between 0.1 and 3600, not 0.0"),
    (["--fetch-timeout", "soon"], "argument --fetch-timeout: invalid float value: 'soon'"),
])
def test_bad_settings_are_refused_and_change_nothing(protected, cli, argv, message):
    result = cli("configure", "vol", *argv)
    assert result.code == ExitCode.USAGE and message in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert api.configure("vol")["settings"] == {"copy_on_read": True, "auto_degrade": True, "log_limit": 1 << 30,
                                                "fetch_timeout": 30.0}


def test_unknown_setting_through_the_api_is_refused(protected):
    from drtool.errors import UsageError

    with pytest.raises(UsageError, match="unknown setting 'cache'"):
        api.configure("vol", {"cache": True})


def test_copy_on_read_off_fetches_every_time_and_keeps_nothing(protected):
    path, data = protected
    api.configure("vol", {"copy_on_read": False})
    corrupt(path, 3 * RS + 5, b"\x00\x00\x00")
    api.scrub_volume("vol")
    api.recover("vol")
    for expected_fetches in (1, 2):
        assert api.read("vol", 3 * RS, RS) == data[3 * RS:4 * RS]
        status = api.status("vol")[0]
        assert status["recovery"]["fetched_regions"] == expected_fetches
        assert status["overlay"]["regions"] == 0


def test_settings_change_live_under_a_running_agent(protected, start_agent, cli):
    path, data = protected
    start_agent("vol")
    assert cli("configure", "vol", "--auto-degrade", "off").code == 0
    corrupt(path, 7 * RS, b"\x01")
    # The running agent refuses the bad region instead of degrading by itself.
    result = cli("read", "vol", "--offset", str(7 * RS), "--length", "10")
    assert result.code == ExitCode.DATA_UNAVAILABLE and "not in recovery" in result.err
    assert api.status("vol")[0]["mode"] == "normal"
    assert cli("configure", "vol", "--auto-degrade", "on").code == 0
    assert api.read("vol", 7 * RS, 10) == data[7 * RS:7 * RS + 10]
    assert api.status("vol")[0]["mode"] == "degraded"
