"""fetch_timeout bounds a whole fetch, retries included (issue 11: a frozen replica held a client's
read for about 4x fetch_timeout).  The clock is a fake one that moves as the requests time out,
so the test counts attempts, not seconds."""

import pytest
import requests

from drtool import client as client_module
from drtool.client import ReplicaClient
from drtool.errors import PeerUnreachable


class FrozenServer:
    """Every request times out after the read timeout it was given; the fake clock moves by it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timeouts: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def request(self, method, url, timeout, **kwargs):  # noqa: ANN001
        read = timeout[1] if isinstance(timeout, tuple) else timeout
        self.timeouts.append(read)
        self.now += read
        raise requests.Timeout("read timed out")


@pytest.fixture
def frozen(monkeypatch):
    server = FrozenServer()
    monkeypatch.setattr(client_module.time, "monotonic", server.monotonic)
    monkeypatch.setattr(client_module.time, "sleep", server.sleep)
    return server


def test_without_a_time_limit_every_retry_waits_its_whole_timeout(frozen):
    client = ReplicaClient("http://127.0.0.1:9", timeout=(5.0, 5.0), retries=3)
    client.session.request = frozen.request
    with pytest.raises(PeerUnreachable):
        client.health()
    assert frozen.timeouts == [5.0, 5.0, 5.0, 5.0]  # 20 s and the pauses: what the issue saw


def test_a_time_limit_bounds_the_whole_operation(frozen):
    client = ReplicaClient("http://127.0.0.1:9", timeout=(5.0, 5.0), retries=3)
    client.session.request = frozen.request
    start = frozen.now
    with client.time_limit(7.0), pytest.raises(PeerUnreachable):
        client.health()
    assert frozen.timeouts[0] == 5.0 and sum(frozen.timeouts) <= 7.0
    assert frozen.now - start <= 7.0
    # A second request inside the same spent limit is refused at once, with a clear message.
    with client.time_limit(0.0), pytest.raises(PeerUnreachable, match="did not answer in time"):
        client.health()
    assert client.deadline is None  # the limit ends with its block
