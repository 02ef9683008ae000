"""drtool verify (issue 11): the replica re-reads and re-hashes its regions, the primary compares.

Each finding is made for real: bytes flipped in the replica's image on disk (replica rot),
a replica restored from an older copy of itself (divergent: acknowledged yet other bytes),
the primary's device changed behind drtool's back and scanned (pending: not shipped yet).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from drtool import api
from drtool import verify as verify_mod
from drtool.engine import Engine
from drtool.errors import ExitCode, PeerUnreachable
from drtool.replication import Replicator
from tests.conftest import corrupt

RS = 65536


@pytest.fixture
def volume(protect_volume, replica_server, tmp_path):
    """A protected volume of 16 regions (region 12 all zeros) and its replica's image on disk."""
    path, data = protect_volume(16 * RS)
    image = Path(replica_server.root) / "vol" / "mirror.img"
    assert image.read_bytes() == data
    return path, data, image


def verify(cli, *args: str):
    result = cli("verify", "vol", "--json", *args)
    return result.code, (result.json() if result.out.strip() else None), result


def test_an_untouched_replica_verifies_equal(volume, cli):
    code, report, _ = verify(cli)
    assert code == ExitCode.OK, report
    assert report["result"] == "equal" and report["in_sync"] and report["differ"] == []
    assert report["regions_total"] == 16 and report["regions_compared"] == 16 == report["regions_equal"]
    assert report["bytes_read"] == 16 * RS and report["source"] == "mirror"


def test_replica_rot_is_reported_for_exactly_that_region_listed_by_the_server_and_repaired(
        volume, cli, replica_server):
    path, data, image = volume
    corrupt(image, 5 * RS + 100, b"rotten")
    code, report, result = verify(cli)
    assert code == ExitCode.BAD_REGIONS, result
    assert report["replica_rot"] == [[5, 1]] and report["divergent"] == [] and report["pending"] == []
    assert report["differ"] == [{"first": 5, "count": 1, "reason": "replica-rot"}]
    assert report["result"] == "differ" and not report["in_sync"]
    with replica_server.client() as client:
        scrub = client.volume_info("vol")["scrub"]
    assert scrub["bad_regions"] == {"mirror": [[5, 1]], "overlay": []} and scrub["bad_count"] == 1

    code, report, result = verify(cli, "--repair")
    assert code == ExitCode.OK, result
    assert report["replica_rot"] == [[5, 1]]  # what it found ...
    assert report["repair"]["relogged"] == [[5, 1]] and report["repair"]["unrepairable"] == []
    assert report["repair"]["after"]["differ"] == [] and report["result"] == "equal"  # ... and fixed
    assert image.read_bytes() == data
    code, report, _ = verify(cli)
    assert code == ExitCode.OK and report["result"] == "equal"
    with replica_server.client() as client:
        assert client.volume_info("vol")["scrub"]["bad_count"] == 0


def test_a_replica_restored_from_an_older_copy_is_divergent_and_repaired(volume, cli, replica_server, tmp_path):
    path, data, image = volume
    replica_dir = image.parent
    saved = tmp_path / "old-replica"
    replica_server.stop()
    shutil.copy2(image, saved.with_suffix(".img"))
    shutil.copytree(replica_dir / "manifest", saved / "manifest")
    replica_server.start()
    new = os.urandom(RS)
    api.write("vol", 7 * RS, new)
    api.replicate("vol", wait=True)
    assert image.read_bytes()[7 * RS:8 * RS] == new
    # The secondary's disk goes back in time (a restore, a lost write cache): image and digests agree.
    replica_server.stop()
    shutil.copy2(saved.with_suffix(".img"), image)
    shutil.rmtree(replica_dir / "manifest")
    shutil.copytree(saved / "manifest", replica_dir / "manifest")
    replica_server.start()

    code, report, result = verify(cli)
    assert code == ExitCode.BAD_REGIONS, result
    assert report["divergent"] == [[7, 1]] and report["replica_rot"] == [] and report["pending"] == []
    assert report["differ"] == [{"first": 7, "count": 1, "reason": "divergent"}]
    with replica_server.client() as client:  # its own digests hold: no rot on the server's side
        assert client.volume_info("vol")["scrub"]["bad_count"] == 0

    code, report, result = verify(cli, "--repair")
    assert code == ExitCode.OK, result
    assert report["repair"]["relogged"] == [[7, 1]] and report["result"] == "equal"
    assert verify(cli)[0] == ExitCode.OK
    data[7 * RS:8 * RS] = new
    assert image.read_bytes() == data


def test_a_region_changed_behind_drtools_back_and_scanned_is_pending_not_divergent(volume, cli):
    path, data, image = volume
    corrupt(path, 3 * RS + 17, b"changed outside drtool")
    assert cli("scan", "vol").code == 0
    code, report, result = verify(cli)
    assert code == ExitCode.OK, result  # the primary knows it has not shipped it: not a divergence
    assert report["pending"] == [[3, 1]] and report["differ"] == [] and report["result"] == "pending"
    assert not report["in_sync"]
    code, report, result = verify(cli, "--repair")  # ships what is pending (replicate --wait), verifies again
    assert code == ExitCode.OK and report["result"] == "equal", result
    assert image.read_bytes() == path.read_bytes()


def test_rot_and_divergence_found_and_repaired_through_a_running_agent(volume, cli, start_agent, tmp_path):
    path, data, image = volume
    start_agent("vol")
    assert api.agent_socket("vol") is not None
    new = os.urandom(RS)
    payload = tmp_path / "payload"
    payload.write_bytes(new)
    assert cli("write", "vol", "--offset", str(9 * RS), "--input", str(payload), "--sync").code == 0
    assert cli("replicate", "vol", "--wait").code == 0
    corrupt(image, 2 * RS, b"\x00rot")
    corrupt(image, 9 * RS + RS - 1, b"\x01")
    code, report, result = verify(cli)
    assert code == ExitCode.BAD_REGIONS, result
    assert report["replica_rot"] == [[2, 1], [9, 1]]
    code, report, result = verify(cli, "--repair", "--rate", "64M")
    assert code == ExitCode.OK and report["repair"]["relogged"] == [[2, 1], [9, 1]], result
    code, report, _ = verify(cli)
    assert code == ExitCode.OK and report["result"] == "equal"
    data[9 * RS:10 * RS] = new
    assert image.read_bytes() == data


def test_regions_limits_the_walk_to_those_regions(volume, cli):
    path, data, image = volume
    corrupt(image, 2 * RS + 5)
    corrupt(image, 11 * RS + 5)
    code, report, _ = verify(cli, "--regions", "0-4")
    assert code == ExitCode.BAD_REGIONS and report["replica_rot"] == [[2, 1]]
    assert report["regions"] == [[0, 5]] and report["regions_total"] == 5 and report["bytes_read"] == 5 * RS
    code, report, _ = verify(cli, "--regions", "5,6,12+2")
    assert code == ExitCode.OK and report["regions_total"] == 4
    code, report, _ = verify(cli, "--regions", "11")
    assert code == ExitCode.BAD_REGIONS and report["replica_rot"] == [[11, 1]]


def test_a_sparse_volume_reads_only_the_replicas_data(tmp_path, state_root, replica_server, cli):
    """15 TiB of holes with three written regions: only those are read, on the replica too."""
    size = 15 << 40
    device = tmp_path / "sparse.img"
    with open(device, "wb") as handle:
        handle.truncate(size)
    written = [0, (7 << 40) // RS + 3, size // RS - 1]
    with open(device, "r+b") as handle:
        for region in written:
            handle.seek(region * RS)
            handle.write(os.urandom(RS))
    api.init_volume("vol", str(device), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    code, report, result = verify(cli)
    assert code == ExitCode.OK, result
    assert report["regions_total"] == size // RS and report["regions_compared"] == 3
    assert report["bytes_read"] == 3 * RS and report["regions_read"] == 3
    image = Path(replica_server.root) / "vol" / "mirror.img"
    corrupt(image, written[1] * RS + 9)
    code, report, _ = verify(cli)
    assert code == ExitCode.BAD_REGIONS and report["replica_rot"] == [[written[1], 1]]


def test_garbage_in_a_hole_of_the_replica_is_rot(volume, cli):
    """A region whose digest says zeros is read when the image holds data there."""
    path, data, image = volume
    api.write("vol", 12 * RS, bytes(RS))  # a whole region of zeros: a hole in the replica's image
    api.replicate("vol", wait=True)
    assert verify(cli)[1]["regions_compared"] == 15
    with open(image, "r+b") as handle:
        handle.seek(12 * RS)
        handle.write(b"garbage")
    code, report, _ = verify(cli)
    assert code == ExitCode.BAD_REGIONS and report["replica_rot"] == [[12, 1]]


def test_an_interrupted_verify_resumes_where_it_stopped(volume, replica_server):
    path, data, image = volume
    corrupt(image, 1 * RS)
    corrupt(image, 14 * RS)

    class Flaky:
        """The real client, which vanishes after two batches."""

        def __init__(self) -> None:
            self.real = replica_server.client()
            self.url = self.real.url
            self.calls = 0

        def verify_regions(self, *args, **kwargs):
            self.calls += 1
            if self.calls > 2:
                raise PeerUnreachable("replica server vanished")
            return self.real.verify_regions(*args, **kwargs)

    flaky = Flaky()
    with Engine.open(None, "vol") as engine:
        with pytest.raises(PeerUnreachable):
            verify_mod.verify(engine, rate=4 * RS, client=flaky)  # batches of one region
        cursor = verify_mod.load_cursor(verify_mod.cursor_path(engine))
        assert cursor["next"] == 2 and not cursor["finished"] and cursor["found"]["rot"] == [[1, 1]]
        advanced = []
        report = verify_mod.verify(engine, client=flaky.real, progress_start=lambda total: advanced.append(-total),
                                   progress=advanced.append)
        assert report["resumed"] and report["replica_rot"] == [[1, 1], [14, 1]]
        assert report["regions_compared"] == 16 and -advanced[0] == sum(advanced[1:]) == 16 * RS
        again = verify_mod.verify(engine, client=flaky.real)
        assert not again["resumed"]  # the last one finished: a new verify starts from the first region
    flaky.real.close()


def test_a_torn_cursor_is_refused_until_restart(volume, cli, state_root):
    (state_root / "vol" / "verify.json").write_text('{"kind": "drtool.verify/1", "next": 3')
    code, report, result = verify(cli)
    assert code == ExitCode.STATE and "--restart" in result.err
    assert verify(cli, "--restart")[0] == ExitCode.OK


def test_bad_input(volume, cli, replica_server, state_root, tmp_path):
    result = cli("verify", "nosuch", "--json")
    assert result.code == ExitCode.STATE and "nosuch" in result.err
    for regions in ("x", "3-1", "16", "0+17", ""):
        result = cli("verify", "vol", "--regions", regions)
        assert result.code == ExitCode.USAGE, (regions, result)
    assert cli("verify", "vol", "--rate", "fast").code == ExitCode.USAGE
    record = json.loads((state_root / "vol" / "volume.json").read_text())
    token_file = Path(record["peer"]["token_file"])
    token_file.write_text("not-the-token\n")
    result = cli("verify", "vol", "--json")
    assert result.code == ExitCode.PEER and "token" in result.err, result
    assert result.json()["error"]["exit_code"] == ExitCode.PEER


def test_a_volume_without_a_peer_is_refused(tmp_path, state_root, cli):
    device = tmp_path / "dev.img"
    device.write_bytes(os.urandom(4 * RS))
    api.init_volume("vol", str(device), "64K")
    result = cli("verify", "vol")
    assert result.code == ExitCode.USAGE and "protect" in result.err


def test_the_rich_report_names_the_regions_and_the_reason(volume, cli):
    path, data, image = volume
    corrupt(image, 4 * RS)
    result = cli("verify", "vol")
    assert result.code == ExitCode.BAD_REGIONS
    assert "DIFFER" in result.out and "replica rot" in result.out and "region 4" in result.out
    assert "--repair" in result.out


def test_repair_without_a_verified_copy_here_says_so(volume, cli):
    """A region rotten on the replica and bad here too cannot be shipped again: unrepairable."""
    path, data, image = volume
    corrupt(image, 6 * RS)
    corrupt(path, 6 * RS)
    assert cli("scrub", "vol").code == ExitCode.BAD_REGIONS
    code, report, result = verify(cli, "--repair")
    assert code == ExitCode.BAD_REGIONS, result
    assert report["repair"]["unrepairable"] == [[6, 1]] and report["repair"]["after"]["replica_rot"] == [[6, 1]]


def test_verify_goes_through_replicator_interfaces_only():
    """verify is one of the engine's helpers: no private engine names, a typed port."""
    import ast

    tree = ast.parse(Path(verify_mod.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine":
            assert not node.attr.startswith("_") and node.attr not in ("meta", "stripes", "device", "overlay")
    assert Replicator  # the shipping goes through engine.replicator (force, wait_caught_up)


def test_in_degraded_mode_the_overlay_replica_is_compared(volume, cli, replica_server):
    """recover: writes go to the overlay and its replica; verify compares the overlay merged over the mirror."""
    path, data, image = volume
    assert cli("recover", "vol").code == 0
    new = os.urandom(RS)
    api.write("vol", 4 * RS, new)
    api.replicate("vol", wait=True)
    code, report, result = verify(cli)
    assert code == ExitCode.OK, result
    assert report["source"] == "overlay" and report["result"] == "equal"
    overlay_image = image.parent / "overlay.img"
    corrupt(overlay_image, 4 * RS + 1)
    code, report, _ = verify(cli)
    assert code == ExitCode.BAD_REGIONS and report["replica_rot"] == [[4, 1]]
    with replica_server.client() as client:
        assert client.volume_info("vol")["scrub"]["bad_regions"] == {"mirror": [], "overlay": [[4, 1]]}
    code, report, result = verify(cli, "--repair")
    assert code == ExitCode.OK and report["repair"]["relogged"] == [[4, 1]], result
    assert overlay_image.read_bytes()[4 * RS:5 * RS] == new
    with replica_server.client() as client:
        assert client.volume_info("vol")["scrub"]["bad_count"] == 0


def test_the_replica_server_scrubs_its_whole_copy_on_request(volume, cli, replica_server):
    path, data, image = volume
    corrupt(image, 13 * RS + 2)
    result = cli("verify", "vol", "--replica-scrub", "--wait", "--json")
    assert result.code == ExitCode.BAD_REGIONS, result
    found = result.json()
    assert found["last"]["state"] == "done" and found["bad_regions"]["mirror"] == [[13, 1]]
    assert found["last"]["bytes_read"] == 16 * RS and found["replica_url"] == replica_server.url
    assert cli("status", "vol").code == 0  # the primary's own health is not the replica's
    assert verify(cli, "--repair")[0] == ExitCode.OK
    result = cli("verify", "vol", "--replica-scrub", "--wait", "--rate", "8M")
    assert result.code == ExitCode.OK and "0 bad regions" in result.out, result
    assert cli("verify", "vol", "--replica-scrub", "--regions", "1").code == ExitCode.USAGE


def test_a_replica_server_without_verify_is_a_peer_error(volume, replica_server):
    """A drtool serve from before verify answers 404 'no such endpoint': the peer cannot be used (exit 7)."""
    from drtool.errors import PeerError

    class OldServer:
        def __init__(self) -> None:
            self.real = replica_server.client()
            self.url = self.real.url

        def verify_regions(self, name, *args, **kwargs):
            return self.real._json("POST", self.real._path(name, "verify-not-here"), json={})

    old = OldServer()
    with Engine.open(None, "vol") as engine, pytest.raises(PeerError, match="upgrade it") as raised:
        verify_mod.verify(engine, client=old)
    assert raised.value.exit_code == ExitCode.PEER
    old.real.close()


def test_writes_racing_a_verify_are_never_called_divergent(volume, cli, start_agent):
    """The agent writes and ships region 3 over and over while verify runs: equal or pending, never differ."""
    import threading

    start_agent("vol")
    stop = threading.Event()
    writes = []

    def writer() -> None:
        while not stop.is_set():
            api.write("vol", 3 * RS, os.urandom(RS))
            writes.append(1)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        for _ in range(8):
            code, report, result = verify(cli, "--restart")
            assert code == ExitCode.OK, result
            assert report["differ"] == [] and set(map(tuple, report["pending"])) <= {(3, 1)}, report
    finally:
        stop.set()
        thread.join(30)
    assert len(writes) > 8
    assert cli("replicate", "vol", "--wait").code == 0
    assert verify(cli)[1]["result"] == "equal"
