"""The operator's report: what `drtool status` draws from the status data."""

import io

from rich.console import Console

from drtool import api, report
from tests.conftest import corrupt, make_image

RS = 65536
REGIONS = 64


def rendered(status, width=120) -> str:
    out = io.StringIO()
    report.render_status(Console(file=out, width=width, highlight=False, color_system=None), status)
    return " ".join(out.getvalue().replace("│", " ").split())  # rows may wrap: compare words


def map_rows(status, width) -> list[str]:
    out = io.StringIO()
    report.render_status(Console(file=out, width=width, highlight=False, color_system=None), status)
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
