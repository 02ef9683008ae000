"""A full state directory (issue 11): the initial sync does not need space in proportion to the
volume, protect and replicate carry on once space is freed, and an NBD write that cannot be
logged for lack of space is answered ENOSPC (with the path in the agent's log), not EIO."""

from __future__ import annotations

import os
import subprocess

import pytest

from drtool import api
from drtool.nbd import protocol as p
from tests.conftest import IN_CI, corrupt, make_image, require_root
from tests.nbd.rawclient import RawClient

RS = 65536


@pytest.fixture
def small_state_root(state_root):
    """The state root (the one the cli and start_agent fixtures use) is a 16 MiB tmpfs."""
    require_root()
    state_root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(state_root)],
                          capture_output=True)
    if done.returncode != 0:
        (pytest.fail if IN_CI else pytest.skip)(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield state_root
    subprocess.run(["umount", "-l", str(state_root)], check=False)


def fill(mount) -> None:
    """Fill the filesystem to the last byte."""
    fd = os.open(mount / ".filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 20, 65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\1" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_initial_sync_of_a_volume_larger_than_the_state_disk(small_state_root, tmp_path, replica_server,
                                                             monkeypatch):
    """64 MiB of data through a 16 MiB state directory: shipped records do not pile up in the log
    (1 MiB segments and batches here, so that the room a sync needs, a segment and two batches,
    is well under the volume's size)."""
    from drtool import replication
    from drtool.storage import replog

    monkeypatch.setattr(replog, "SEGMENT_BYTES", 1 << 20)
    monkeypatch.setattr(replication, "BATCH_BYTES", 1 << 20)
    image = tmp_path / "dev.img"
    data = make_image(image, 1024 * RS, seed=8)
    api.init_volume("vol", str(image), "64K")
    result = api.protect("vol", replica_server.url, str(replica_server.token_file))
    assert result["regions_synced"] == 1024
    status = api.status("vol", probe_peer=False)[0]
    assert status["replication"]["initial_sync"] == "done" and status["lag"]["regions"] == 0
    assert replica_server.client().read_range("vol", 0, len(data)) == data


def test_protect_and_replicate_carry_on_once_space_is_freed(small_state_root, tmp_path, replica_server, cli):
    image = tmp_path / "dev.img"
    data = bytearray(make_image(image, 64 * RS, seed=8))
    api.init_volume("vol", str(image), "64K")
    fill(small_state_root)
    result = cli("protect", "vol", "--peer", replica_server.url, "--token-file", str(replica_server.token_file))
    assert result.code == 5, result.err
    assert "no space left" in result.err.lower() and str(small_state_root) in result.err
    os.unlink(small_state_root / ".filler")
    result = cli("protect", "vol", "--peer", replica_server.url, "--token-file", str(replica_server.token_file))
    assert result.code == 0, result.err
    assert api.status("vol", probe_peer=False)[0]["replication"]["initial_sync"] == "done"
    api.write("vol", 3 * RS, b"after" * 10)
    data[3 * RS:3 * RS + 50] = b"after" * 10
    fill(small_state_root)
    with pytest.raises(Exception, match="No space left on device"):
        api.write("vol", 4 * RS, b"no room" * 9000)
    os.unlink(small_state_root / ".filler")
    result = cli("replicate", "vol", "--wait", "--json")
    assert result.code == 0, result.err
    assert result.json()["lag"]["regions"] == 0
    assert replica_server.client().read_range("vol", 0, len(data)) == bytes(data)


def test_degraded_nbd_write_on_a_full_state_disk_is_enospc(small_state_root, tmp_path, replica_server,
                                                         start_agent, cli):
    image = tmp_path / "dev.img"
    data = make_image(image, 64 * RS, seed=8)
    api.init_volume("vol", str(image), "64K")
    api.protect("vol", replica_server.url, str(replica_server.token_file))
    corrupt(image, 2 * RS + 9)
    api.scrub_volume("vol")
    agent = start_agent("vol")
    assert cli("recover", "vol").code == 0
    with RawClient(str(agent.sock)) as client:
        client.connect("vol")
        assert client.write(5 * RS, b"\xab" * RS) == 0
        assert client.command(p.Command.FLUSH) == 0
        fill(small_state_root)
        assert client.write(6 * RS, b"\xcd" * RS) == int(p.NbdErrno.ENOSPC)
        assert client.write(7 * RS + 10, b"\xcd" * 100) == int(p.NbdErrno.ENOSPC)
        os.unlink(small_state_root / ".filler")
        assert client.write(6 * RS, b"\xcd" * RS) == 0
        assert client.command(p.Command.FLUSH) == 0
        error, got = client.read(5 * RS, 2 * RS)
        assert error == 0 and got == b"\xab" * RS + b"\xcd" * RS
        error, got = client.read(2 * RS, RS)
        assert error == 0 and got == data[2 * RS:3 * RS]
    log = agent.log.read_text()
    assert "No space left on device" in log and str(small_state_root) in log
