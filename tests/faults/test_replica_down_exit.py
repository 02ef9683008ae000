"""A failback whose replica server is down (seen in tests/faults/test_kill9.py: the replica server
killed during `failback --device NEW`, the command exits 8).

README's exit codes: 7 "the replica server could not be used (unreachable, refused, wrong token)",
8 "data unavailable: regions lost or failing verification".  A script (or the Ansible failback
play) that reads 8 believes regions are lost, while nothing is: the failback resumes once the
server is back (the fault loop proves it).  drtool/fetch.py used to turn every PeerError of a fetch
into DataUnavailable; it now keeps the peer error's class (exit 7) and adds the regions to its message."""

from __future__ import annotations

from drtool import api
from drtool.errors import ExitCode

RS = 65536


def test_failback_with_the_replica_server_down_exits_7_and_resumes_later(protect_volume, replica_server, cli,
                                                                         tmp_path):
    path, data = protect_volume(16 * RS, seed=3)
    assert cli("recover", "vol").code == 0
    new = tmp_path / "new.img"
    with open(new, "wb") as handle:
        handle.truncate(16 * RS)  # a blank replacement: every region comes from the replica
    replica_server.stop(kill=True)
    try:
        result = cli("failback", "vol", "--device", str(new))
        assert "connection refused" in result.err, result.err
        assert api.status("vol", probe_peer=False)[0]["mode"] == "resync"  # resumable, nothing lost
        code = result.code
    finally:
        replica_server.start()
    assert cli("failback", "vol").code == 0 and new.read_bytes() == data
    assert code == ExitCode.PEER, result.err
