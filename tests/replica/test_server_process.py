"""The replica server as a process: one access-log line per request, a clean stop on SIGTERM."""

import re
import signal
import time

import requests

from tests.replica.conftest import ServerProcess, call


def access_lines(server: ServerProcess) -> list[str]:
    return [line for line in server.log.read_text().splitlines() if re.search(r'"[A-Z]+ /', line)]


def test_every_request_is_logged_once_with_its_status(server: ServerProcess) -> None:
    assert call(server, "GET", "/v1/health").status_code == 200
    assert call(server, "GET", "/v1/volumes/nothing").status_code == 404
    assert call(server, "GET", "/v1/volumes", token=False).status_code == 401
    deadline = time.monotonic() + 10  # each line is written once its answer is out: it may trail it
    while len(lines := access_lines(server)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [re.search(r'"(GET \S+)" (\d+)', line).groups() for line in lines] == [
        ("GET /v1/health", "200"), ("GET /v1/volumes/nothing", "404"), ("GET /v1/volumes", "401")]
    # Each line names the client's address and port and how long the request took.
    assert all(re.match(r"drtool-replica: 127\.0\.0\.1:\d+ .* \d+\.\dms$", line) for line in lines)


def test_sigterm_stops_the_server_cleanly(server: ServerProcess) -> None:
    session = requests.Session()  # a kept-alive connection is open when the signal comes
    assert session.get(f"{server.url}/v1/health", headers={"Authorization": f"Bearer {server.token}"}).ok
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert "Traceback" not in server.log.read_text()
    session.close()
