"""Volumes join and leave a running agent (drtool attach / detach, adopt through the agent)
while the NBD clients of its other volumes keep reading, never disconnected."""

import threading
import time
from pathlib import Path

import pytest

from drtool import api
from drtool.errors import ExitCode
from tests.conftest import ReplicaServer, make_image, run_drtool
from tests.nbd.rawclient import RawClient

RS = 65536
SIZE = 32 * RS


class Reader(threading.Thread):
    """Reads vol-a over one NBD connection, region after region, until stopped; every read is
    compared with the bytes the device holds.  Any error, mismatch or disconnect is kept."""

    def __init__(self, sock: Path, expected: bytes) -> None:
        super().__init__(daemon=True)
        self.client = RawClient(str(sock))
        self.client.connect("vol-a")
        self.expected = expected
        self.reads = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        region = 0
        try:
            while not self.halt.is_set():
                error, data = self.client.read(region * RS, RS)
                if error or data != self.expected[region * RS:(region + 1) * RS]:
                    self.failures.append(f"region {region}: error {error}, bytes equal {data == self.expected}")
                    return
                self.reads += 1
                region = (region + 1) % (SIZE // RS)
        except Exception as exc:  # a disconnect ends the loop: the test fails on it
            self.failures.append(f"{type(exc).__name__}: {exc}")

    def reads_after(self, count: int, timeout: float = 30) -> None:
        """Wait until it read ``count`` more regions (it is alive and served)."""
        target = self.reads + count
        deadline = time.monotonic() + timeout
        while self.reads < target and not self.failures:
            assert time.monotonic() < deadline, "the reader stopped making progress"
            time.sleep(0.01)
        assert not self.failures, self.failures

    def finish(self) -> None:
        self.halt.set()
        self.join(timeout=30)
        self.client.close()
        assert not self.failures, self.failures


@pytest.fixture
def two_volumes(tmp_path, state_root):
    images = {}
    for seed, name in enumerate(("vol-a", "vol-b"), start=5):
        path = tmp_path / f"{name}.img"
        images[name] = make_image(path, SIZE, seed=seed)
        api.init_volume(name, str(path), "64K")
    return images


def test_a_volume_attached_served_and_detached_never_disturbs_another(two_volumes, start_agent, cli):
    agent = start_agent("vol-a")
    reader = Reader(agent.sock, two_volumes["vol-a"])
    reader.start()
    reader.reads_after(20)

    attached = cli("attach", "vol-b", "--json")
    assert attached.code == 0, attached.err
    assert attached.json()["changed"] is True
    assert f"nbd+unix:///vol-b?socket={agent.sock}" in attached.json()["uris"]
    assert api.agent_info()["volumes"] == ["vol-a", "vol-b"]
    with RawClient(str(agent.sock)) as other:
        other.connect("vol-b")
        assert other.read(3 * RS, RS) == (0, two_volumes["vol-b"][3 * RS:4 * RS])
        reader.reads_after(20)
        # A volume with a client connected stays, unless forced.
        refused = cli("detach", "vol-b")
        assert refused.code == ExitCode.BUSY
        assert "vol-b has 1 NBD client connected" in refused.err and "--force" not in refused.err
        assert other.read(0, RS) == (0, two_volumes["vol-b"][:RS])  # still served after the refusal
    detached = cli("detach", "vol-b", "--json")
    assert detached.code == 0, detached.err
    assert detached.json() == {"volume": "vol-b", "changed": True, "disconnected": []}
    assert api.agent_info()["volumes"] == ["vol-a"]
    assert api.status("vol-b")[0]["agent"]["running"] is False  # released: its lock is free
    assert api.read("vol-b", 0, 16) == two_volumes["vol-b"][:16]
    assert cli("detach", "vol-b", "--json").json()["changed"] is False
    reader.reads_after(20)
    reader.finish()


def test_forced_detach_disconnects_only_that_volumes_clients(two_volumes, start_agent):
    agent = start_agent("vol-a", "vol-b")
    reader = Reader(agent.sock, two_volumes["vol-a"])
    reader.start()
    victim = RawClient(str(agent.sock))
    victim.connect("vol-b")
    assert victim.read(0, RS) == (0, two_volumes["vol-b"][:RS])
    result = api.detach("vol-b", force=True)
    assert result["changed"] is True and len(result["disconnected"]) == 1
    assert victim.server_closed()
    victim.close()
    reader.reads_after(20)
    # And it comes back, served again to a new client.
    api.attach("vol-b")
    with RawClient(str(agent.sock)) as again:
        again.connect("vol-b")
        assert again.read(SIZE - RS, RS) == (0, two_volumes["vol-b"][SIZE - RS:])
    reader.finish()


def test_attach_refuses_what_it_cannot_serve_and_keeps_serving(two_volumes, start_agent, state_root, cli):
    agent = start_agent("vol-a")
    reader = Reader(agent.sock, two_volumes["vol-a"])
    reader.start()
    missing = cli("attach", "nosuch")
    assert missing.code == ExitCode.STATE and "volume nosuch is not registered" in missing.err
    twice = cli("attach", "vol-a", "--json")
    assert twice.code == 0 and twice.json()["changed"] is False
    # One agent per state root: a second one is told to attach instead.
    second = run_drtool("agent", "vol-b", "--nbd-socket", str(agent.sock.with_name("second.sock")))
    assert second.returncode == ExitCode.STATE
    assert b"another agent serves this state root" in second.stderr and b"drtool attach" in second.stderr
    reader.reads_after(20)
    reader.finish()


def test_attach_without_an_agent_says_how_to_start_one(two_volumes, state_root, cli):
    result = cli("attach", "vol-a")
    assert result.code == ExitCode.STATE
    assert f"no agent is running for the state root {state_root}" in result.err
    assert api.agent_info() == {"running": False, "volumes": []}


def test_agent_serve_reconciles_the_set_without_restarting(two_volumes, start_agent):
    agent = start_agent("vol-a")
    pid = agent.proc.pid
    planned = api.agent_serve(["vol-b"], check=True)
    assert planned == {"changed": True, "attached": ["vol-b"], "detached": ["vol-a"], "volumes": ["vol-b"]}
    assert api.agent_info()["volumes"] == ["vol-a"]  # check changed nothing
    done = api.agent_serve(["vol-b"])
    assert done == planned
    info = api.agent_info()
    assert info["volumes"] == ["vol-b"] and info["pid"] == pid
    assert api.agent_serve(["vol-b"])["changed"] is False


def test_adopt_through_the_running_agent(tmp_path, state_root, start_agent, cli):
    token = tmp_path / "token"
    token.write_text("shared-token-" + "z" * 20)
    token.chmod(0o600)
    here = ReplicaServer(tmp_path / "here-replicas", token).start()
    peer = ReplicaServer(tmp_path / "peer-replicas", token).start()
    try:
        image = tmp_path / "vol.img"
        expected = make_image(image, SIZE, seed=9)
        make_image(tmp_path / "other.img", SIZE, seed=10)
        api.init_volume("vol", str(image), "64K")
        api.init_volume("other", str(tmp_path / "other.img"), "64K")
        api.protect("vol", peer.url, str(token))
        agent = start_agent("vol", "other")
        with RawClient(str(agent.sock)) as other:
            other.connect("other")
            assert cli("demote", "vol", "--timeout", "30").code == 0
            with RawClient(str(agent.sock)) as reader:
                reader.connect("vol")
                refused = cli("adopt", "vol", "--replica-url", here.url, "--token-file", str(token))
                assert refused.code == ExitCode.BUSY and "vol has 1 NBD client connected" in refused.err
                assert api.status("vol", probe_peer=False)[0]["demoted"].get("adopted") is None  # nothing done
            adopted = cli("adopt", "vol", "--replica-url", here.url, "--token-file", str(token), "--json")
            assert adopted.code == 0, adopted.err
            result = adopted.json()
            assert result["changed"] is True and result["left_agent"] is True
            assert api.agent_info()["volumes"] == ["other"]
            # This host's replica server serves it now, from the same device.
            info = here.client().volume_info("vol")
            assert info["image"] == str(image)
            assert api.status("vol", probe_peer=False)[0]["demoted"]["adopted"]["url"] == here.url
            assert other.read(0, RS) == (0, (tmp_path / "other.img").read_bytes()[:RS])
        assert image.read_bytes() == expected
    finally:
        here.stop(kill=True)
        peer.stop(kill=True)


def test_an_operation_running_on_a_volume_keeps_it_in_the_agent(two_volumes, state_root, tmp_path, monkeypatch):
    """In-process agent: an operation still running on vol-b's control socket (a stand-in that
    waits, for a failback or a verify) makes detach refuse after its wait, naming it; once it
    ended, detach goes through.  vol-a is served throughout."""
    from drtool import control, ops
    from drtool.agent import Agent
    from drtool.errors import ExportBusy

    release = threading.Event()
    monkeypatch.setitem(ops.OPERATIONS, "hold", ops.Operation(lambda e, a, p: release.wait(30) and {"held": e.name}))
    agent = Agent(str(state_root), ["vol-a", "vol-b"], nbd_socket=str(tmp_path / "nbd.sock"))
    agent.start()
    try:
        socket_path = api.agent_socket("vol-b")
        answers = []
        caller = threading.Thread(target=lambda: answers.append(control.call(socket_path, "hold")))
        caller.start()
        deadline = time.monotonic() + 10
        while not agent.served["vol-b"].busy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(ExportBusy, match="volume vol-b is busy: hold runs on it"):
            agent.remove("vol-b", drain=0.2)
        assert agent.names == ["vol-a", "vol-b"]
        assert api.status("vol-b")[0]["agent"]["running"] is True  # still served, answering
        release.set()
        caller.join(timeout=30)
        assert answers == [{"held": "vol-b"}]
        assert agent.remove("vol-b")["changed"] is True and agent.names == ["vol-a"]
        with RawClient(str(tmp_path / "nbd.sock")) as client:
            client.connect("vol-a")
            assert client.read(0, RS) == (0, two_volumes["vol-a"][:RS])
    finally:
        release.set()
        agent.shutdown()
