"""Planned failover, swap back and takeover between two "hosts" on this machine.

Each host is a state root plus its own replica server; the lab tests (tests/lab/) run the
same story over SSH between isolated namespaces.
"""

import json
from pathlib import Path

import pytest

from drtool import api
from drtool.errors import NotPermitted
from tests.conftest import make_image

pytestmark = pytest.mark.slow

RS = 65536
SIZE = 64 * RS


def write(host, offset, data, expected):
    host.call(api.write, "vol", offset, data)
    expected[offset:offset + len(data)] = data


def device_bytes(host):
    status = host.call(api.status, "vol", probe_peer=False)[0]
    return Path(status["device"]).read_bytes()


def test_planned_failover_then_swap_back_moves_only_changed_regions(hosts, tmp_path):
    a, b, token = hosts
    image = tmp_path / "a-disk.img"
    expected = bytearray(make_image(image, SIZE, seed=3))
    a.call(api.init_volume, "vol", str(image), "64K")
    a.call(api.protect, "vol", b.server.url, token)
    write(a, 5 * RS, b"before the swap" * 100, expected)
    a.call(api.replicate, "vol")
    write(a, 6 * RS, b"pending", expected)
    write(a, 7 * RS, b"forced, out of order", expected)
    a.call(api.replicate, "vol", regions="7")  # shipped before region 6's older record

    # A -> B
    demoted = a.call(api.demote, "vol", timeout=30)
    assert demoted["changed"] and demoted["demoted"]["lost"]["records"] == 0
    with pytest.raises(NotPermitted):
        a.call(api.write, "vol", 0, b"refused")
    a.call(api.adopt, "vol", a.server.url, token)
    promoted = b.call(api.promote, "vol", b.server.url, token)
    assert promoted["changed"] and not promoted["promoted"]["takeover"]
    assert b.call(api.read, "vol", 0, SIZE) == bytes(expected)
    # The new primary's log begins after what it applied: no record reads as lost.
    history = [event["event"] for event in json.loads((b.root / "vol" / "volume.json").read_text())["history"]]
    assert "promoted" in history and "log-damage" not in history, history
    plan = b.call(api.protect, "vol", a.server.url, token, plan_only=True)["plan"]
    assert plan == {"mode": "incremental", "regions": 0, "bytes": 0, "divergent": 0, "lost": {"records": 0, "bytes": 0, "regions": 0}}
    b.call(api.protect, "vol", a.server.url, token)
    for region in (1, 2, 40):
        write(b, region * RS + 7, bytes([region]) * 3000, expected)
    b.call(api.replicate, "vol")
    assert image.read_bytes() == bytes(expected)  # A's own device, written by A's replica server

    status_b = b.call(api.status, "vol")[0]
    assert status_b["role"] == "primary" and status_b["direction"] == f"this host -> {a.server.url}"
    assert status_b["last_swap"]["event"] == "promoted"
    status_a = a.call(api.status, "vol", probe_peer=False)[0]
    assert status_a["role"] == "secondary" and status_a["last_swap"]["event"] == "demoted"

    # B -> A: everything B wrote already travelled with replication; re-pairing copies nothing.
    b.call(api.demote, "vol", timeout=30)
    b.call(api.adopt, "vol", b.server.url, token)
    a.call(api.promote, "vol", a.server.url, token)
    plan = a.call(api.protect, "vol", b.server.url, token, plan_only=True)["plan"]
    assert plan["mode"] == "incremental" and plan["regions"] == 0
    result = a.call(api.protect, "vol", b.server.url, token)
    assert result["regions_synced"] == 0
    write(a, 60 * RS, b"home again", expected)
    a.call(api.replicate, "vol")
    assert a.call(api.read, "vol", 0, SIZE) == bytes(expected)
    assert device_bytes(b) == bytes(expected)


def test_takeover_reports_the_loss_and_fast_failback_copies_only_what_differs(hosts, tmp_path):
    a, b, token = hosts
    image = tmp_path / "a-disk.img"
    expected = bytearray(make_image(image, SIZE, seed=4))
    a.call(api.init_volume, "vol", str(image), "64K")
    a.call(api.protect, "vol", b.server.url, token)
    write(a, 3 * RS, b"replicated" * 10, expected)
    a.call(api.replicate, "vol")
    replicated = bytes(expected)
    lost_writes = [(10 * RS, b"lost one" * 50), (11 * RS + 5, b"lost two" * 50), (10 * RS + 9000, b"x" * 10)]
    for offset, data in lost_writes:
        a.call(api.write, "vol", offset, data)  # never shipped: the site is cut off now

    with pytest.raises(NotPermitted, match="still claims"):
        b.call(api.promote, "vol", b.server.url, token)
    promoted = b.call(api.promote, "vol", b.server.url, token, force=True)
    assert promoted["promoted"]["takeover"]
    assert b.call(api.read, "vol", 0, SIZE) == replicated
    new = bytearray(replicated)
    write(b, 20 * RS, b"after the takeover", new)

    # The old primary returns: it counts exactly what it lost, and steps down.
    demoted = a.call(api.demote, "vol", force=True)["demoted"]
    assert demoted["lost"]["records"] == 3 and demoted["lost"]["exact"]
    assert demoted["lost"]["bytes"] == sum(len(d) for _, d in lost_writes)
    assert demoted["divergent"] == [[10, 2]]
    a.call(api.adopt, "vol", a.server.url, token)
    plan = b.call(api.protect, "vol", a.server.url, token, plan_only=True)["plan"]
    assert plan["mode"] == "incremental" and plan["regions"] == 3  # region 20 + divergent 10, 11
    assert plan["lost"]["records"] == 3
    b.call(api.protect, "vol", a.server.url, token)
    assert image.read_bytes() == bytes(new)
    status = b.call(api.status, "vol")[0]
    assert status["last_swap"]["event"] == "takeover" and status["last_swap"]["lost"]["records"] == 3
