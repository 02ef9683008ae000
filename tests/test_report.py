"""The operator's report: what `drtool status` draws from the status data."""

import io
import json

from rich.console import Console

from drtool import api, report
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 64


def rendered(status, width=120) -> str:
    out = io.StringIO()
    report.render_status(Console(file=out, width=width, highlight=False, color_system=None, force_terminal=True), status)
    return " ".join(out.getvalue().replace("│", " ").split())  # rows may wrap: compare words


def map_rows(status, width) -> list[str]:
    out = io.StringIO()
    report.render_status(Console(file=out, width=width, highlight=False, color_system=None, force_terminal=True), status)
    glyphs = set("·█▓▒░")
    return [line.strip("│ ") for line in out.getvalue().splitlines()
            if line.strip("│ ") and set(line.strip("│ ")) <= glyphs]


def test_incident_status_shows_peer_recovery_and_failback(tmp_path, state_root, replica_server):
    path = tmp_path / "dev.img"
    make_image(path, REGIONS * RS, seed=3)
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    for region in (4, 5, 40):
        corrupt(path, region * RS + 3, b"\x00\x01")
    api.scrub_volume("vol")
    api.recover("vol")
    api.read("vol", 0, REGIONS * RS)
    shown = rendered(api.status("vol")[0])
    assert f"peer {replica_server.url} reachable" in shown
    assert "entered by the operator" in shown and "source mirror" in shown
    assert "fetched 3 regions (192 KiB) from the replica" in shown
    assert "regions 4-5: offset 256 KiB (262144), 128 KiB" in shown

    api.failback("vol")
    shown = rendered(api.status("vol")[0])
    assert "failback finished" in shown and f"3 of 3 regions copied (192 KiB) onto {path}" in shown

    replica_server.stop(kill=True)
    shown = rendered(api.status("vol")[0])
    assert f"peer {replica_server.url} UNREACHABLE" in shown


def test_a_running_failback_shows_its_progress():
    status = {"failback": {"started": 0.0, "device": "/dev/sdc", "total_regions": 8, "done_regions": 2,
                           "bytes_copied": 2 * RS, "finished": None}}
    assert report.failback_text(status["failback"]).endswith("2 of 8 regions (25 %), 128 KiB copied onto /dev/sdc")


def test_region_map_cells_show_their_worst_region_and_scale_to_the_terminal(tmp_path, state_root):
    path = tmp_path / "dev.img"
    make_image(path, REGIONS * RS, seed=4)
    api.init_volume("vol", str(path), "64K")
    corrupt(path, 10 * RS)
    api.scrub_volume("vol")
    status = api.status("vol", probe_peer=False)[0]
    # Unreplicated regions rank below bad ones: a cell holding both shows bad.
    status["maps"]["unreplicated"] = [[8, 4], [30, 1]]
    cells = report.region_cells(status, 16)  # 4 regions a cell
    assert cells[2] == "bad" and cells[7] == "unreplicated"
    assert cells.count("ok") == 14
    narrow, wide = map_rows(status, 60), map_rows(status, 200)
    assert sum(len(row) for row in wide) == REGIONS  # wide enough: one cell per region
    assert max(len(row) for row in narrow) < max(len(row) for row in wide)
    assert "".join(wide)[10] == "█" and "".join(wide)[30] == "░"


# -- rendering for the terminal in use (issue 13) ----------------------------------------------

def _status(volume="vol-a", health="ONLINE", protection="PROTECTED", **extra):
    base = {"schema": "drtool.status/1", "volume": volume, "health": health, "mode": "normal", "role": "primary",
            "size": 4 << 30, "region_size": RS, "regions_total": 65536, "bad_count": 0, "bad_bytes": 0,
            "bad_regions": [], "lost_count": 0, "lost_regions": [], "era": 3,
            "device": "/dev/disk/by-id/nvme-Samsung_SSD_980_PRO_2TB_S6B0NL0T123456",
            "maps": {"bad": [], "lost": [], "overlay": [], "unreplicated": [], "resync": []},
            "lag": {"records": 0, "regions": 0, "bytes": 0, "summary": "in sync"},
            "peer": {"url": "https://dr:8470", "reachable": True}, "replication": {"initial_sync": "done"},
            "agent": {"running": True}}
    base.update(extra)
    from drtool.status import finish
    status = finish(base)
    if protection:
        status["protection"] = protection
    return status


def draw(render, *args, width=80, terminal=True) -> str:
    out = io.StringIO()
    render(Console(file=out, width=width, highlight=False, color_system=None, force_terminal=terminal), *args)
    return out.getvalue()


def test_list_at_80_columns_drops_optional_columns_before_truncating_health():
    statuses = [_status(), _status("vol-b", "FAULTED", faulted={"reason": "missing"})]
    narrow = draw(report.render_summary, statuses, width=80)
    assert all(len(line) <= 80 for line in narrow.splitlines())
    table = "\n".join(line for line in narrow.splitlines() if line[:1] in "┃│┏┡└")
    assert "FAULTED" in table and "…" not in table  # nothing truncated
    assert "device" not in table and "Samsung" not in table  # the optional column went
    assert "vol-b: the device /dev/disk/by-id/nvme-Samsung_SSD_980_PRO_2TB_S6B0NL0T123456 cannot be used" in " ".join(narrow.split())
    wide = draw(report.render_summary, statuses, width=200)
    assert "/dev/disk/by-id/nvme-Samsung_SSD_980_PRO_2TB_S6B0NL0T123456" in wide


def test_piped_output_is_plain_and_never_wrapped():
    statuses = [_status(), _status("vol-b", "DEGRADED", bad_count=2, bad_regions=[[4, 2]])]
    plain = draw(report.render_summary, statuses, width=40, terminal=False)
    lines = plain.splitlines()
    assert lines[0].split() == ["VOLUME", "HEALTH", "PROTECTION", "MODE", "BAD", "LAG", "SIZE", "LOST", "ROLE",
                                "ERA", "DEVICE"]
    assert lines[1].split()[-1] == "/dev/disk/by-id/nvme-Samsung_SSD_980_PRO_2TB_S6B0NL0T123456"
    assert not any(ch in plain for ch in "┃│━─╭")  # no boxes
    panel = draw(report.render_status, statuses[1], width=40, terminal=False)
    assert "        device  /dev/disk/by-id/nvme-Samsung_SSD_980_PRO_2TB_S6B0NL0T123456\n" in panel
    assert "        status  2 regions are bad on the device\n" in panel
    assert "        action  drtool recover vol-b\n" in panel


def test_one_date_format_and_iec_units():
    status = _status(last_scrub={"started": 0.0, "seconds": 2.0, "bytes": 3 << 30, "bad_count": 0, "errors": {}},
                     lag={"records": 4, "regions": 2, "bytes": 1536 * 1024, "oldest_seconds": 75.0,
                          "summary": "4 records, 2 regions, 1572864 bytes pending, oldest 75.0s"})
    shown = draw(report.render_status, status, width=200, terminal=False)
    import time as _time
    assert f"on {_time.strftime('%Y-%m-%d %H:%M:%S', _time.localtime(0.0))}" in shown
    assert "scrub scanned 3 GiB in 2.0s (1.5 GiB/s)" in shown
    assert "4 records, 2 regions, 1.5 MiB pending, oldest 1m15s" in shown


def test_region_map_shows_overlay_regions_over_bad_ones():
    status = _status(health="DEGRADED", mode="degraded", regions_total=64, bad_count=4, bad_regions=[[0, 4]],
                     maps={"bad": [[0, 4]], "lost": [], "overlay": [[2, 4]], "unreplicated": [], "resync": []})
    cells = report.region_cells(status, 64)
    assert cells[:7] == ["bad", "bad", "overlay", "overlay", "overlay", "overlay", "ok"]
    shown = draw(report.render_status, status, width=200, terminal=False)
    assert "██▒▒▒▒···" in shown and "▒ in the overlay" in shown


# -- drtool report ------------------------------------------------------------------------------

def _fleet(tmp_path, hosts) -> str:
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(hosts))
    return str(path)


def test_report_exit_codes_by_severity_and_summary_sorted_worst_first(tmp_path, cli):
    ok = _status("ok-vol")
    degraded = _status("bad-vol", "DEGRADED", bad_count=3, bad_regions=[[1, 3]])
    faulted = _status("dead-vol", "FAULTED", faulted={"reason": "missing: device does not exist"})
    broken = _status("far-vol", protection=None, peer={"url": "https://dr:8470", "reachable": False,
                                                        "error": "connection refused to https://dr:8470"})
    assert broken["protection"] == "UNPROTECTED"
    assert cli("report", _fleet(tmp_path, {"a": [ok]})).code == 0
    assert cli("report", _fleet(tmp_path, {"a": [ok], "b": [broken]})).code == 7
    assert cli("report", _fleet(tmp_path, {"a": [ok, degraded], "b": [broken]})).code == 3
    shown = cli("report", _fleet(tmp_path, {"a": [ok, degraded], "b": [broken, faulted]}))
    assert shown.code == 4
    lines = shown.out.splitlines()
    assert lines[0] == "drtool fleet status: 4 volumes on 2 hosts: 1 FAULTED, 1 DEGRADED, 2 ONLINE; 1 UNPROTECTED, 3 PROTECTED"
    order = [line.split()[1] for line in lines[2:6]]
    assert order == ["dead-vol", "bad-vol", "far-vol", "ok-vol"]
    assert "b/dead-vol: the device" in shown.out


def test_report_validates_its_input(tmp_path, cli):
    bad = cli("report", _fleet(tmp_path, {"h": [{"volume": "x"}]}))
    assert bad.code == 2
    assert "host 'h', entry 0 is not a drtool status object: no health, mode, bad_count" in bad.err
    assert "internal error" not in bad.err
    assert cli("report", _fleet(tmp_path, {"h": [{**_status(), "health": "FINE"}]})).code == 2
    assert cli("report", _fleet(tmp_path, {"h": "x"})).code == 2
    assert cli("report", _fleet(tmp_path, {"h": [_status()]}), "--json").json()["h"][0]["volume"] == "vol-a"
    assert cli("report", _fleet(tmp_path, {"h": [{"volume": "x"}]}), "--json").json()["error"]["exit_code"] == 2


# -- progress bars ------------------------------------------------------------------------------

def _bar(label, fail=False):
    import re

    out = io.StringIO()
    progress = report.RichProgress(Console(file=out, width=80, force_terminal=True, color_system=None))
    progress.start(1 << 30, label)
    progress.advance(300 << 20)
    progress._progress.refresh()
    try:
        if fail:
            raise OSError("boom")
    except OSError:
        pass
    finally:
        progress.finish()
    raw = out.getvalue()
    return raw, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).replace("\r", "\n")


def test_progress_fits_80_columns_and_clears_itself():
    raw, plain = _bar("fast failback of a-volume-with-a-long-name: 123456 regions (1 GiB)", fail=True)
    drawn = [line for line in plain.splitlines() if line.strip()]
    assert drawn and all(len(line) <= 80 for line in drawn)
    assert "300 MiB/1 GiB done" in plain
    assert raw.endswith("\x1b[2K")  # the last thing it does is erase its line


def test_a_scrub_bar_says_checked_never_a_read_rate():
    _raw, plain = _bar("scrubbing vol")
    assert "300 MiB/1 GiB checked" in plain
    assert "/s" not in plain  # holes count as checked at once: no throughput is claimed


def test_a_sparse_scrub_says_what_it_read():
    result = {"volume": "sp", "health": "ONLINE", "faulted": None, "seconds": 0.004, "errors": {},
              "bytes_scanned": 0, "regions_scanned": 64, "bad_count": 0, "bad_regions": [], "regions_total": 64,
              "region_size": RS, "cleared_regions": [], "skipped_overlay_regions": 0}
    shown = draw(report.render_scrub, result, width=200, terminal=False)
    assert "scrub: 64 regions verified in 4ms (0 B read), 0 bad regions" in shown and "/s" not in shown
    result["bytes_scanned"] = 3 << 20
    shown = draw(report.render_scrub, result, width=200, terminal=False)
    assert "(3 MiB read, 750 MiB/s)" in shown


def test_the_panel_at_80_and_200_columns_keeps_health_whole():
    status = _status("vol-with-a-rather-long-name", "FAULTED",
                     faulted={"reason": "unreadable: every read failed (6 blocks tried; first: EIO)"})
    for width in (80, 200):
        shown = draw(report.render_status, status, width=width)
        assert all(len(line) <= width for line in shown.splitlines())
        assert "health  FAULTED " in shown
        assert " action  drtool recover vol-with-a-rather-long-name" in shown
