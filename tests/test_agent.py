"""The read agent with real NBD clients: qemu-img, nbdcopy, qemu-io, nbdinfo, fio."""

import json
import os
import random
import socket
import struct
import subprocess
import textwrap
import time

import pytest

from drtool import api
from drtool.errors import ExitCode
from tests.conftest import corrupt, make_image, require_tool, run_drtool

pytestmark = pytest.mark.slow

RS = 65536
REGIONS = 256
SIZE = REGIONS * RS


@pytest.fixture
def volume(tmp_path, state_root, replica_server):
    require_tool("qemu-img", "qemu-io", "nbdcopy", "nbdinfo")
    path = tmp_path / "dev.img"
    data = bytearray(make_image(path, SIZE, seed=11, sparse_every=7))
    api.init_volume("vol", str(path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    expected = tmp_path / "expected.img"
    expected.write_bytes(data)
    return path, data, expected


def compare(uri: str, expected) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", uri, str(expected)],
                          capture_output=True, text=True, timeout=120)


def nbdcopy_to(uri: str, target) -> None:
    subprocess.run(["nbdcopy", uri, str(target)], check=True, timeout=120)


def qemu_io(uri: str, *commands: str) -> subprocess.CompletedProcess:
    argv = ["qemu-io", "-f", "raw"]
    for command in commands:
        argv += ["-c", command]
    return subprocess.run([*argv, uri], capture_output=True, text=True, timeout=120)


def test_healthy_volume_reads_exactly(volume, start_agent, tmp_path):
    _, _, expected = volume
    agent = start_agent("vol")
    info = json.loads(subprocess.run(["nbdinfo", "--json", agent.uri()], capture_output=True,
                                     check=True, text=True).stdout)
    export = info["exports"][0]
    assert export["export-size"] == SIZE and export["can_multi_conn"] is True
    assert compare(agent.uri(tcp=True), expected).returncode == 0
    nbdcopy_to(agent.uri(), tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == expected.read_bytes()
    listed = subprocess.run(["nbdinfo", "--list", "--json", agent.uri()], capture_output=True, text=True)
    assert [e["export-name"] for e in json.loads(listed.stdout)["exports"]] == ["vol"]


def test_ten_percent_corrupted_reads_exactly_and_degrades(volume, start_agent, tmp_path, cli):
    path, _, expected = volume
    bad = random.Random(5).sample(range(REGIONS), REGIONS // 10)
    for region in bad:
        corrupt(path, region * RS + 3000, b"\x00\x01\x02")
    agent = start_agent("vol")
    nbdcopy_to(agent.uri(), tmp_path / "copy.img")
    assert (tmp_path / "copy.img").read_bytes() == expected.read_bytes()
    status = cli("status", "vol", "--json").json()
    assert status["mode"] == "degraded" and status["agent"]["running"] is True
    assert sorted(r for a, n in status["bad_regions"] for r in range(a, a + n)) == sorted(bad)
    assert status["recovery"]["fetched_regions"] == len(bad)


def test_device_missing_when_the_agent_starts(volume, start_agent, cli):
    path, _, expected = volume
    os.unlink(path)
    agent = start_agent("vol")
    assert compare(agent.uri(), expected).returncode == 0
    scrub = cli("scrub", "vol", "--json")  # goes through the running agent
    assert scrub.code == ExitCode.FAULTED and scrub.json()["health"] == "FAULTED"


def test_writes_in_degraded_mode_persist_and_reach_the_overlay_replica(volume, start_agent, replica_server, cli):
    path, data, expected = volume
    agent = start_agent("vol")
    assert cli("recover", "vol").code == 0
    before = path.read_bytes()
    result = qemu_io(agent.uri(), "write -P 0x5a 100k 300k", "write -P 0x33 0 4k", "flush")
    assert result.returncode == 0, result.stderr
    data[100 * 1024:400 * 1024] = b"\x5a" * (300 * 1024)
    data[0:4096] = b"\x33" * 4096
    expected.write_bytes(data)
    assert path.read_bytes() == before  # the device is untouched in degraded mode
    assert compare(agent.uri(), expected).returncode == 0
    agent.stop()
    agent = start_agent("vol")
    assert compare(agent.uri(), expected).returncode == 0
    assert cli("replicate", "vol", "--wait").code == 0
    overlay = replica_server.client().read_range("vol", 0, 7 * RS, overlay=True)
    assert overlay[:4096] == b"\x33" * 4096 and overlay[100 * 1024:400 * 1024] == b"\x5a" * (300 * 1024)


def test_lost_region_gives_eio_for_that_range_only(volume, start_agent, state_root):
    path, data, _ = volume
    code = textwrap.dedent(f"""
        from drtool.engine import Engine
        from drtool.replication import Replicator
        engine = Engine.open({str(state_root)!r}, "vol")
        Replicator(engine)
        engine.record.settings["log_limit"] = {RS}
        for region in (40, 41, 42):
            engine.write(region * {RS}, bytes([region]) * {RS})
        engine.close()
    """)
    subprocess.run([os.sys.executable, "-c", code], check=True)
    corrupt(path, 41 * RS + 5)
    api.scrub_volume("vol")
    agent = start_agent("vol")
    lost = qemu_io(agent.uri(), "read 2624k 4k")  # region 41
    assert lost.returncode != 0 or "Input/output error" in lost.stdout + lost.stderr
    assert "Input/output error" in lost.stdout + lost.stderr
    fine = qemu_io(agent.uri(), "read -P 40 2560k 64k", "read -P 42 2688k 64k")
    assert "Input/output error" not in fine.stdout + fine.stderr and "Pattern verification failed" not in fine.stdout


def test_replica_server_down_fails_remote_reads_only(volume, start_agent, replica_server, cli):
    path, data, _ = volume
    for region in (10, 11):
        corrupt(path, region * RS)
    api.scrub_volume("vol")
    agent = start_agent("vol")
    assert cli("recover", "vol").code == 0
    replica_server.stop(kill=True)
    remote = qemu_io(agent.uri(), "read 640k 64k")
    assert "Input/output error" in remote.stdout + remote.stderr
    region = bytes(data[20 * RS:21 * RS])
    healthy = qemu_io(agent.uri(), f"read -P {region[0]} {20 * RS} 1")
    assert "Input/output error" not in healthy.stdout + healthy.stderr
    replica_server.start()
    tail = qemu_io(agent.uri(), f"read -P {data[10 * RS]} {10 * RS} 1")
    assert "Input/output error" not in tail.stdout + tail.stderr and "verification failed" not in tail.stdout


def test_fio_verify_in_degraded_mode(volume, start_agent, cli, tmp_path):
    require_tool("fio")
    path, _, _ = volume
    for region in random.Random(9).sample(range(REGIONS), 25):
        corrupt(path, region * RS + 7)
    agent = start_agent("vol")
    assert cli("recover", "vol").code == 0
    job = ["fio", "--name=mixed", "--ioengine=nbd", f"--uri={agent.uri()}", "--rw=randrw", "--bs=4k",
           "--iodepth=16", f"--size={SIZE}", "--io_size=8m", "--verify=crc32c", "--verify_fatal=1",
           "--do_verify=1", "--randrepeat=0", "--verify_state_save=0", "--output-format=json"]
    result = subprocess.run(job, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["jobs"][0]["error"] == 0


def test_kill_dash_nine_keeps_every_flushed_write(volume, start_agent, tmp_path):
    _, data, expected = volume
    agent = start_agent("vol")
    commands = []
    for index in range(20):
        offset = index * 37 * 4096
        commands += [f"write -P {index + 1} {offset} 12k", "flush"]
        data[offset:offset + 12288] = bytes([index + 1]) * 12288
    assert qemu_io(agent.uri(), *commands).returncode == 0
    agent.stop(kill=True)
    expected.write_bytes(data)
    agent = start_agent("vol")
    assert compare(agent.uri(), expected).returncode == 0


def test_failback_with_the_agent_running(volume, start_agent, cli):
    path, data, expected = volume
    for region in (3, 30, 200):
        corrupt(path, region * RS + 1)
    api.scrub_volume("vol")
    agent = start_agent("vol")
    assert cli("recover", "vol").code == 0
    assert qemu_io(agent.uri(), "write -P 0x77 1m 64k", "flush").returncode == 0
    data[1 << 20:(1 << 20) + RS] = b"\x77" * RS
    result = cli("failback", "vol", "--rate", "500M", "--json")
    assert result.code == 0 and result.json()["regions_copied"] == 4
    assert path.read_bytes() == bytes(data)
    status = cli("status", "vol", "--json").json()
    assert status["health"] == "ONLINE" and status["mode"] == "normal" and status["overlay"]["regions"] == 0
    assert not os.path.exists(os.path.join(status["state_dir"], "overlay.img"))
    assert cli("scrub", "vol").code == 0
    expected.write_bytes(data)
    assert compare(agent.uri(), expected).returncode == 0


def test_cli_commands_do_not_need_the_agent_stopped(volume, start_agent, tmp_path, state_root):
    path, data, _ = volume
    start_agent("vol")  # the commands below must reach it
    env = {"DRTOOL_STATE_ROOT": str(state_root)}
    read = run_drtool("read", "vol", "--offset", "64K", "--length", "4K", env=env)
    assert read.returncode == 0 and read.stdout == bytes(data[RS:RS + 4096])
    assert run_drtool("checkpoint", "vol", env=env).stdout.strip() == b"2"
    busy = run_drtool("init", "vol", "--device", str(path), "--force", env=env)
    assert busy.returncode == ExitCode.BUSY


def test_malformed_nbd_traffic_does_not_hurt_other_clients(volume, start_agent):
    _, _, expected = volume
    agent = start_agent("vol")
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as bad:
        bad.recv(18)  # NBDMAGIC, IHAVEOPT, handshake flags
        bad.sendall(struct.pack(">I", 1) + b"garbage that is not an option request" * 10)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as cut:
        cut.recv(18)
        cut.sendall(struct.pack(">I", 1)[:2])  # a truncated client flags word, then gone
    assert compare(agent.uri(tcp=True), expected).returncode == 0


def test_a_span_returning_eio_is_served_from_the_replica(tmp_path, state_root, replica_server,
                                                         start_agent, faulty_device, cli):
    require_tool("qemu-img")
    image = tmp_path / "disk.img"
    data = make_image(image, SIZE, seed=21)
    device = faulty_device(image)  # no bad span yet
    api.init_volume("vol", str(device.path), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    device.stop()
    device.start([(100 * RS + 4096, 3 * RS)])  # the same path now fails in regions 100-103
    expected = tmp_path / "expected.img"
    expected.write_bytes(data)
    scrub = cli("scrub", "vol", "--json")
    assert scrub.code == ExitCode.BAD_REGIONS
    assert scrub.json()["bad_regions"] == [[100, 4]] and scrub.json()["errors"]["io-error"] == 4
    agent = start_agent("vol")
    assert compare(agent.uri(), expected).returncode == 0
    assert cli("status", "vol", "--json").json()["mode"] == "degraded"


def test_mode_switches_live_without_dropping_a_connected_client(volume, start_agent, cli):
    from tests.nbd.rawclient import RawClient

    path, data, _ = volume
    agent = start_agent("vol")
    with RawClient(str(agent.sock)) as client:
        client.connect("vol")
        assert client.read(0, RS) == (0, bytes(data[:RS]))
        corrupt(path, 50 * RS + 9)
        assert cli("recover", "vol").code == 0  # normal -> degraded under the open connection
        assert client.write(50 * RS + 100, b"over the bad region") == 0
        data[50 * RS + 100:50 * RS + 119] = b"over the bad region"
        assert client.read(50 * RS, RS) == (0, bytes(data[50 * RS:51 * RS]))
        assert cli("failback", "vol").code == 0  # degraded -> resync -> normal, same connection
        assert client.read(50 * RS, RS) == (0, bytes(data[50 * RS:51 * RS]))
        assert client.write(0, b"normal again") == 0
        data[0:12] = b"normal again"
    assert path.read_bytes()[:12] == b"normal again"
    assert path.read_bytes()[50 * RS:51 * RS] == bytes(data[50 * RS:51 * RS])


def test_a_small_read_through_the_agent_checks_its_block_and_heals_from_the_replica(volume, start_agent, cli):
    """Issue 12: a 4 KiB read remembers its region's block digests, the agent's checkpoint
    commits them, and a block damaged later is caught by a 4 KiB read of it alone."""
    from drtool.storage.volume import Volume

    path, _, _ = volume
    agent = start_agent("vol")
    block = 10 * RS + 3 * 4096
    assert "wrote 4096/4096" in qemu_io(agent.uri(), f"write -P 0x5a {block} 4096").stdout
    assert qemu_io(agent.uri(), f"read -P 0x5a {block} 4096").returncode == 0  # small: remembers
    deadline = time.monotonic() + 30
    while True:  # the checkpoint loop commits the block digests (every 2 s)
        with Volume.inspect(os.environ["DRTOOL_STATE_ROOT"], "vol") as look:
            if look.manifest.blocks.known(10):
                break
        assert time.monotonic() < deadline, "the block digests never reached the maps on disk"
        time.sleep(0.1)
    corrupt(path, block + 100)
    read = qemu_io(agent.uri(), f"read -P 0x5a {block} 4096")
    assert read.returncode == 0 and "Pattern verification failed" not in read.stdout
    status = cli("status", "vol", "--json").json()
    assert status["mode"] == "degraded" and status["bad_regions"] == [[10, 1]]
