"""What an operator sees in `drtool status` and `drtool report` (issue 13, status and report):
protection beside health, health that is current, zpool-style status/action lines, -x, output
fit for the terminal in use, and report exit codes by severity."""

from __future__ import annotations

import io
import json
import os

import pytest
from rich.console import Console

from drtool import api, report
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 64


def words(text: str) -> str:
    return " ".join(text.replace("│", " ").split())


def draw(render, *args, width: int = 200, terminal: bool = True) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, highlight=False, color_system=None, force_terminal=terminal)
    render(console, *args)
    return out.getvalue()


@pytest.fixture
def vol(protect_volume):
    path, _data = protect_volume(REGIONS * RS, seed=5)
    return path


# -- 1. protection ------------------------------------------------------------------------------

def test_protection_protected_lagging_unprotected(vol, cli, replica_server):
    status = cli("status", "vol", "--json").json()
    assert (status["health"], status["protection"]) == ("ONLINE", "PROTECTED")
    assert status["status"] is None and status["action"] is None and status["attention"] is False

    # Writes pending, peer reachable: LAGGING (nobody ships them: no agent runs).
    for region in range(5):
        api.write("vol", region * RS, b"new" * 10)
    status = cli("status", "vol", "--json").json()
    assert status["protection"] == "LAGGING" and status["health"] == "ONLINE"
    assert status["status"].startswith("replication lags: 5 regions")
    assert status["action"] == "drtool replicate vol --wait"
    shown = words(draw(report.render_status, status))
    assert "protection LAGGING status replication lags: 5 regions" in shown

    # The replica server is down, 5 regions pending: UNPROTECTED, in the list view too.
    replica_server.stop(kill=True)
    status = cli("status", "vol", "--json").json()
    assert status["protection"] == "UNPROTECTED" and status["health"] == "ONLINE"
    assert f"connection refused to {replica_server.url}" in status["protection_reason"]
    assert status["status"].startswith("the volume is not protected: the replica server is unreachable")
    assert status["action"].startswith(f"start the replica server at {replica_server.url}")
    listing = cli("status")
    assert listing.code == 0
    header, row = listing.out.splitlines()[:2]
    assert header.split()[:4] == ["VOLUME", "HEALTH", "PROTECTION", "MODE"]
    assert row.split()[:4] == ["vol", "ONLINE", "UNPROTECTED", "normal"]


def test_never_protected_and_bitmap_mode_are_unprotected(tmp_path, state_root, cli):
    path = tmp_path / "dev.img"
    make_image(path, REGIONS * RS)
    api.init_volume("solo", str(path), "64K")
    status = cli("status", "solo", "--json").json()
    assert status["protection"] == "UNPROTECTED"
    assert status["protection_reason"] == "no replica peer, never protected"
    assert status["action"] == "drtool protect solo --peer URL --token-file FILE"
    # bitmap mode, read from the lag object engine/lag.py computes
    from drtool.status import protection
    fake = dict(status, peer={"url": "https://dr:8470", "reachable": True}, replication={"initial_sync": "done"},
                lag={"records": 0, "regions": 3, "bitmap_mode": True, "bitmap_regions": 3})
    state, reason = protection(fake)
    assert state == "UNPROTECTED" and reason.startswith("bitmap mode")


# -- 2. health is current -----------------------------------------------------------------------

def test_a_deleted_device_is_faulted_at_once_and_report_exits_4(vol, cli, tmp_path):
    os.unlink(vol)
    status = cli("status", "vol", "--json").json()
    assert status["health"] == "FAULTED"
    assert status["faulted"]["probe"] == "missing"
    assert status["status"].startswith(f"the device {vol} cannot be used (missing: device does not exist)")
    assert status["action"] == "drtool recover vol, then replace the device and drtool failback vol --device NEW"
    plain = cli("status", "vol").out
    assert "health FAULTED" in words(plain)
    assert "█" * REGIONS + "\n" in plain  # the region map: no region is served by the device
    gathered = tmp_path / "fleet.json"
    gathered.write_text(json.dumps({"host-a": [status]}))
    assert cli("report", str(gathered)).code == 4


def test_a_truncated_device_is_faulted(vol, cli):
    with open(vol, "r+b") as handle:
        handle.truncate(RS)
    status = cli("status", "vol", "--json").json()
    assert status["health"] == "FAULTED" and status["faulted"]["probe"] == "wrong-size"


def test_stale_regions_after_a_journal_recovery_are_not_healthy(vol, cli, replica_server):
    api.checkpoint("vol")
    for region in (7, 8, 9):
        api.write("vol", region * RS, b"x" * 100)
    api.replicate("vol", wait=True)
    # The local copy was restored from before era 2: regions 7-9 are stale on it.
    api.recover("vol", local_era=2, source="journal")
    status = cli("status", "vol", "--json").json()
    assert status["health"] == "DEGRADED"
    assert status["bad_count"] == 0 and status["stale_count"] == 3 and status["stale_regions"] == [[7, 3]]
    assert status["status"] == "3 regions are served from the replica (3 stale on the older local copy)"
    assert "stale regions 3" in words(draw(report.render_status, status))


# -- 3. status and action lines, -x ------------------------------------------------------------

def test_status_and_action_lines_through_an_incident(vol, cli):
    for region in (4, 5):
        corrupt(vol, region * RS + 10, b"\x00\x01")
    assert cli("scrub", "vol").code == 3
    status = cli("status", "vol", "--json").json()
    assert status["status"] == "2 regions are bad on the device"
    assert status["action"] == "drtool recover vol"
    assert cli("recover", "vol").code == 0
    status = cli("status", "vol", "--json").json()
    assert status["status"] == "2 regions are served from the replica"
    assert status["action"] == "repair or replace the device, then drtool failback vol (or --device NEW)"
    shown = cli("status", "vol").out
    assert "status  2 regions are served from the replica" in shown
    assert "action  repair or replace the device, then drtool failback vol (or --device NEW)" in shown
    assert cli("failback", "vol").code == 0
    status = cli("status", "vol", "--json").json()
    assert status["status"] is None and status["health"] == "ONLINE"


def test_status_x_shows_only_volumes_needing_attention(vol, cli, tmp_path):
    other = tmp_path / "other.img"
    make_image(other, REGIONS * RS, seed=9)
    api.init_volume("other", str(other), "64K")  # never protected: needs attention
    shown = cli("status", "-x")
    lines = shown.out.splitlines()
    assert any(line.split()[:1] == ["other"] for line in lines)
    assert not any(line.split()[:1] == ["vol"] for line in lines)
    assert cli("status", "-x", "vol").out.strip() == "volume vol is healthy and protected"
    assert cli("status", "-x", "--json").json()[0]["volume"] == "other"


def test_the_region_map_legend_wraps_between_its_entries_at_80_columns():
    """At 80 columns the legend takes two lines: each entry (glyph and meaning) stays whole."""
    from rich.console import Console

    from drtool.report import region_map

    status = {"regions_total": 64, "mode": "degraded", "bad_regions": [[3, 2]], "stale_regions": [],
              "maps": {"bad": [[3, 2]], "overlay": [[7, 1]], "unreplicated": [[9, 4]], "lost": [], "resync": []}}
    console = Console(width=60, record=True, color_system=None)
    console.print(region_map(status, 60))
    text = console.export_text()
    legend = [line.rstrip() for line in text.splitlines() if line.strip() and not set(line.strip()) <= set("█▒░·x")]
    assert all(len(line) <= 56 for line in legend), legend
    for entry in ("█ bad on the device", "░ not yet replicated", "▒ in the overlay", "· healthy"):
        assert any(entry in line for line in legend), (entry, legend)
