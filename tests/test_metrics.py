"""Prometheus metrics (drtool/metrics.py): the flags, the hot-path counters, and the endpoints of a
real agent and a real replica server, whose values must be what ``status --json`` says."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from drtool import api, metrics
from drtool.errors import ExitCode, UsageError
from tests.conftest import DRTOOL, corrupt, make_image, require_tool, run_drtool, stop_process

RS = 65536
REGIONS = 32
SIZE = REGIONS * RS


# -- --metrics-listen and its flags --------------------------------------------------------------


def test_off_by_default_and_tls_flags_need_an_address():
    assert metrics.metrics_listen(None) is None
    with pytest.raises(UsageError, match="give --metrics-listen HOST:PORT too"):
        metrics.metrics_listen(None, tls_cert="c.pem")
    with pytest.raises(UsageError, match="--metrics-insecure configure"):
        metrics.metrics_listen(None, insecure=True)


@pytest.mark.parametrize("text", ["9470", "localhost", "127.0.0.1:", "127.0.0.1:70000", ":9470", "::1:9470",
                                  "[::1:9470", "127.0.0.1:port"])
def test_a_bad_address_is_refused(text):
    with pytest.raises(UsageError, match="is not HOST:PORT"):
        metrics.metrics_listen(text)


def test_loopback_is_plain_http_and_beyond_it_needs_tls_or_an_explicit_flag():
    assert metrics.metrics_listen("127.0.0.1:0") == metrics.MetricsListen("127.0.0.1", 0)
    assert metrics.metrics_listen("[::1]:9470") == metrics.MetricsListen("::1", 9470)
    assert metrics.metrics_listen("localhost:9470").insecure is False
    for host in ("0.0.0.0", "192.0.2.7", "[::]"):
        with pytest.raises(UsageError, match="need TLS .*or --metrics-insecure"):
            metrics.metrics_listen(f"{host}:9470")
    chosen = metrics.metrics_listen("0.0.0.0:9470", insecure=True)
    assert chosen.insecure and chosen.tls is None
    with pytest.raises(UsageError, match="need --metrics-tls-cert FILE and --metrics-tls-key FILE"):
        metrics.metrics_listen("0.0.0.0:9470", tls_cert="c.pem")
    with pytest.raises(UsageError, match="contradicts"):
        metrics.metrics_listen("0.0.0.0:9470", tls_cert="c.pem", tls_key="k.pem", insecure=True)


def test_the_cli_refuses_a_bad_metrics_address_before_serving(tmp_path, state_root):
    # Nothing is registered: the refusal must come from the flag, before any volume is opened.
    for command in (["agent", "vol"], ["serve", "--root", str(tmp_path / "rr")]):
        result = run_drtool(*command, "--metrics-listen", "0.0.0.0:9470",
                            env={"DRTOOL_STATE_ROOT": str(state_root)}, timeout=30)
        assert result.returncode == ExitCode.USAGE, result.stderr
        assert b"need TLS" in result.stderr and b"--metrics-insecure" in result.stderr
        result = run_drtool(*command, "--metrics-listen", "nonsense", env={"DRTOOL_STATE_ROOT": str(state_root)},
                            timeout=30)
        assert result.returncode == ExitCode.USAGE and b"'nonsense' is not HOST:PORT" in result.stderr
    assert not (tmp_path / "rr").exists()


def test_a_port_in_use_is_a_clear_error():
    holder = metrics.MetricsServer(metrics.MetricsListen("127.0.0.1", 0), _Fixed())
    try:
        with pytest.raises(UsageError, match=f"--metrics-listen 127.0.0.1:{holder.port}: cannot listen"):
            metrics.MetricsServer(metrics.MetricsListen("127.0.0.1", holder.port), _Fixed())
    finally:
        holder.stop()


class _Fixed:
    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        yield GaugeMetricFamily("drtool_test_value", "a fixed value", value=42)


def test_tls_endpoint_serves_https_only(tmp_path):
    require_tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    key.chmod(0o600)
    chosen = metrics.metrics_listen("127.0.0.1:0", tls_cert=str(cert), tls_key=str(key))
    server = metrics.MetricsServer(chosen, _Fixed()).start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        body = requests.get(server.url, verify=str(cert), timeout=10).text
        assert "drtool_test_value 42.0" in body
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url.replace("https", "http"), timeout=10)
    finally:
        server.stop()
    key.chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        metrics.metrics_listen("0.0.0.0:0", tls_cert=str(cert), tls_key=str(key))


# -- counting without a lock ------------------------------------------------------------------


def test_tally_counts_every_add_of_many_threads_including_ended_ones():
    tally = metrics.Tally(2)

    def add(n: int) -> None:
        for _ in range(n):
            cell = tally.cell()
            cell[0] += 1
            cell[1] += 2

    threads = [threading.Thread(target=add, args=(5000,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tally.totals() == [40000, 80000]
    assert tally.totals() == [40000, 80000]  # the ended threads' cells are folded in once
    assert not tally._cells  # and no longer kept
    add(3)  # this thread still runs: its cell stays
    assert tally.totals() == [40003, 80006]


# -- a real agent and a real replica server ---------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    text = requests.get(url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def state_of(samples: dict, name: str, label: str, volume: str = "vol") -> str | None:
    """The one state whose sample is 1 (health, mode, protection)."""
    on = [dict(k[1])[label] for k, v in samples.items() if k[0] == name and dict(k[1]).get("volume") == volume
          and v == 1]
    assert len(on) <= 1, on
    return on[0] if on else None


def wait_for(predicate, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class MetricsAgent:
    """``drtool agent vol --metrics-listen 127.0.0.1:0`` as a subprocess."""

    def __init__(self, state_root: Path, sock: Path) -> None:
        env = {**os.environ, "DRTOOL_STATE_ROOT": str(state_root)}
        self.sock = sock
        self.log = sock.with_suffix(".log")
        self.proc = subprocess.Popen([*DRTOOL, "agent", "vol", "--nbd-socket", str(sock),
                                      "--metrics-listen", "127.0.0.1:0"],
                                     stdout=subprocess.PIPE, stderr=open(self.log, "ab"), text=True, env=env)
        lines = [self.proc.stdout.readline() for _ in range(3)]
        found = re.search(r"metrics: (http://127\.0\.0\.1:\d+/metrics)", "".join(lines))
        if not found:
            stop_process(self.proc)
            raise RuntimeError(f"agent did not start: {lines!r}; {self.log.read_text()[-2000:]}")
        self.url = found.group(1)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///vol?socket={self.sock}"

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc.stdout.close()


def qemu_io(uri: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-f", "raw", "-c", command, uri], capture_output=True, text=True, timeout=60)


def assert_matches_status(samples: dict, status: dict) -> None:
    """The agent's metrics say what ``drtool status vol --json`` says."""
    assert state_of(samples, "drtool_volume_health", "state") == status["health"]
    assert state_of(samples, "drtool_volume_mode", "mode") == status["mode"]
    assert state_of(samples, "drtool_volume_protection", "state") == status["protection"]
    assert value(samples, "drtool_volume_bad_regions", volume="vol") == status["bad_count"]
    assert value(samples, "drtool_volume_bad_bytes", volume="vol") == status["bad_bytes"]
    assert value(samples, "drtool_volume_lost_regions", volume="vol") == status["lost_count"]
    assert value(samples, "drtool_volume_overlay_regions", volume="vol") == status["overlay"]["regions"]
    lag = status["lag"]
    assert value(samples, "drtool_replication_lag_records", volume="vol") == lag["records"]
    assert value(samples, "drtool_replication_lag_regions", volume="vol") == lag["regions"]
    assert value(samples, "drtool_replication_lag_bytes", volume="vol") == lag["bytes"]
    assert value(samples, "drtool_replication_bitmap_mode", volume="vol") == float(lag["bitmap_mode"])
    assert value(samples, "drtool_volume_size_bytes", volume="vol") == status["size"]


@pytest.fixture
def metrics_replica_server(tmp_path):
    from tests.conftest import ReplicaServer

    token = tmp_path / "token"
    token.write_text("t0ken-" + "x" * 26 + "\n")
    token.chmod(0o600)
    server = ReplicaServer(tmp_path / "replica-root", token, ["--metrics-listen", "127.0.0.1:0"])

    def start() -> None:
        ReplicaServer.start(server)
        found = re.search(r"metrics: (http://\S+)", server.proc.stdout.readline())
        assert found, "the replica server did not print its metrics URL"
        server.metrics_url = found.group(1)

    server.start = start
    server.start()
    yield server
    server.stop(kill=True)


@pytest.mark.slow
def test_agent_and_replica_metrics_follow_lag_and_degradation(tmp_path, state_root, metrics_replica_server, cli):
    require_tool("qemu-io", "promtool")
    server = metrics_replica_server
    device = tmp_path / "dev.img"
    make_image(device, SIZE, seed=3)
    api.init_volume("vol", str(device), "64K")
    api.protect("vol", server.url, str(server.token_file))
    agent = MetricsAgent(state_root, tmp_path / "nbd.sock")
    try:
        # Healthy and in sync once the replicator spoke to the server.
        samples = wait_for(lambda: (s := scrape(agent.url)) and value(
            s, "drtool_replication_peer_reachable", volume="vol", peer=server.url) == 1 and s, "peer reachable")
        status = cli("status", "vol", "--json").json()
        assert status["health"] == "ONLINE" and status["protection"] == "PROTECTED"
        assert_matches_status(samples, status)
        lint = subprocess.run(["promtool", "check", "metrics"], input=requests.get(agent.url, timeout=10).text,
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr

        # Lag: the replica server is down while a client writes two regions.
        server.stop(kill=True)
        writes_before = value(scrape(agent.url), "drtool_nbd_requests_total", volume="vol", command="write")
        assert qemu_io(agent.uri, f"write -P 0x5a {2 * RS} {2 * RS}").returncode == 0
        samples = wait_for(lambda: (s := scrape(agent.url)) and value(
            s, "drtool_replication_peer_reachable", volume="vol", peer=server.url) == 0 and s, "peer unreachable")
        status = cli("status", "vol", "--json").json()
        assert status["protection"] == "UNPROTECTED" and status["lag"]["regions"] == 2
        assert_matches_status(samples, status)
        oldest = value(samples, "drtool_replication_lag_oldest_seconds", volume="vol")
        assert 0 < oldest <= status["lag"]["oldest_seconds"]  # scraped first
        assert value(samples, "drtool_nbd_requests_total", volume="vol", command="write") >= writes_before + 1

        # The server comes back: the lag drains, the shipped bytes and the last ack show it.
        server.start()
        samples = wait_for(lambda: (s := scrape(agent.url)) and value(
            s, "drtool_replication_lag_records", volume="vol") == 0 and value(
            s, "drtool_replication_peer_reachable", volume="vol", peer=server.url) == 1 and s, "the lag to drain")
        status = cli("status", "vol", "--json").json()
        assert status["protection"] == "PROTECTED"
        assert_matches_status(samples, status)
        assert value(samples, "drtool_replication_shipped_records_total", volume="vol") == 2
        assert value(samples, "drtool_replication_shipped_bytes_total", volume="vol") > 2 * RS
        assert value(samples, "drtool_replication_last_ack_timestamp_seconds", volume="vol") > time.time() - 60

        # Degradation: region 5 rots on the device; a client reads it, the replica serves it.
        corrupt(device, 5 * RS + 77, b"rot")
        before = scrape(agent.url)
        assert qemu_io(agent.uri, f"read {5 * RS} {RS}").returncode == 0
        samples = scrape(agent.url)
        status = cli("status", "vol", "--json").json()
        assert status["health"] == "DEGRADED" and status["mode"] == "degraded" and status["bad_regions"] == [[5, 1]]
        assert_matches_status(samples, status)
        read = ("drtool_nbd_requests_total", (("command", "read"), ("volume", "vol")))
        assert samples[read] >= before[read] + 1
        assert value(samples, "drtool_fetch_requests_total", volume="vol") >= 1
        assert value(samples, "drtool_fetch_regions_total", volume="vol") >= 1
        assert value(samples, "drtool_fetch_bytes_total", volume="vol") == \
            RS * value(samples, "drtool_fetch_regions_total", volume="vol")
        assert value(samples, "drtool_fetch_duration_seconds_count", volume="vol") == \
            value(samples, "drtool_fetch_requests_total", volume="vol")
        assert value(samples, "drtool_fetch_verification_failures_total", volume="vol") == 0

        # The replica's copy of region 9 rots too: the fetch fails verification twice, the read EIO.
        image = Path(server.client().volume_info("vol")["image"])
        corrupt(image, 9 * RS + 5, b"bad")
        corrupt(device, 9 * RS + 5, b"bad")
        assert qemu_io(agent.uri, f"read {9 * RS} {RS}").returncode != 0
        samples = scrape(agent.url)
        assert value(samples, "drtool_fetch_verification_failures_total", volume="vol") >= 2
        assert value(samples, "drtool_fetch_errors_total", volume="vol", reason="verification") >= 1
        assert value(samples, "drtool_nbd_errors_total", volume="vol", command="read") >= 1
        status = cli("status", "vol", "--json").json()
        assert_matches_status(samples, status)

        # The replica server's side: what status --replica-root reads from its disk.
        replica = scrape(server.metrics_url)
        described = {r["name"]: r for r in api.replica_status(str(server.root))}["vol"]
        assert value(replica, "drtool_replica_up", replica="vol") == 1
        assert value(replica, "drtool_replica_applied_seq", replica="vol") == described["applied_seq"]
        assert value(replica, "drtool_replica_applied_seq", replica="vol") == \
            value(samples, "drtool_replication_acked_seq", volume="vol")
        assert value(replica, "drtool_replica_journal_first_seq", replica="vol") == described["journal"]["first_seq"]
        assert value(replica, "drtool_replica_journal_last_seq", replica="vol") == described["journal"]["last_seq"]
        assert value(replica, "drtool_replica_journal_records", replica="vol") == described["journal"]["records"]
        assert value(replica, "drtool_replica_state", replica="vol", state="replica") == 1
        assert value(replica, "drtool_replica_http_requests_total", method="POST", code="200") >= 1
        lint = subprocess.run(["promtool", "check", "metrics"], input=requests.get(server.metrics_url, timeout=10).text,
                              capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr
        documented = documented_metrics()
        scraped = {name for name, _ in samples} | {name for name, _ in replica}
        base = {re.sub(r"_(bucket|count|sum)$", "", n) for n in scraped}
        assert base <= documented, f"undocumented in docs/metrics.md: {sorted(base - documented)}"
    finally:
        agent.stop()


# -- the shipped alert rules and the documentation -------------------------------------------

DOCS = Path(__file__).resolve().parent.parent / "docs"


def documented_metrics() -> set[str]:
    """The metric names docs/metrics.md lists (first column of its tables)."""
    return set(re.findall(r"^\| `(drtool_[a-z_]+)`", (DOCS / "metrics.md").read_text(), re.M))


def test_alert_rules_are_valid_and_use_only_documented_metrics():
    require_tool("promtool")
    rules = DOCS / "prometheus" / "drtool.rules.yml"
    result = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = "\n".join(line for line in rules.read_text().splitlines() if not line.lstrip().startswith("#"))
    used = {re.sub(r"_(bucket|count|sum)$", "", n) for n in re.findall(r"\bdrtool_[a-z_]+", text)}
    assert used and used <= documented_metrics(), sorted(used - documented_metrics())


def test_alert_rules_fire_as_their_unit_tests_say():
    require_tool("promtool")
    result = subprocess.run(["promtool", "test", "rules", str(Path(__file__).parent / "prometheus" /
                                                               "drtool_rules_test.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_docs_list_every_metric_a_collector_can_produce():
    """Every family name in drtool/metrics.py is in docs/metrics.md, and the other way round."""
    source = Path(metrics.__file__).read_text()
    counters = set(re.findall(r'(?:_counter|CounterMetricFamily)\("(drtool_[a-z_]+)"', source))
    names = {n + "_total" if n in counters else n for n in re.findall(r'"(drtool_[a-z_]+)"', source)}
    assert names == documented_metrics(), (sorted(names - documented_metrics()),
                                           sorted(documented_metrics() - names))


def test_one_volume_or_replica_that_cannot_be_read_does_not_hide_the_others(caplog):
    def broken() -> dict:
        raise OSError("state directory gone")

    stats = metrics.VolumeStats()
    stats.nbd.tally.cell()[0] += 3  # three reads counted before its state went away
    agent = metrics.MetricsServer(metrics.MetricsListen("127.0.0.1", 0), metrics.AgentCollector(
        lambda: [metrics.VolumeFacts("gone", broken, None, stats)], started=1.0)).start()
    described = {"name": "ok", "size": 4096, "applied_seq": 7, "state": "replica",
                 "journal": {"enabled": True, "first_seq": 1, "last_seq": 7, "records": 7, "bytes": 100}}
    replica = metrics.MetricsServer(metrics.MetricsListen("127.0.0.1", 0), metrics.ReplicaCollector(
        lambda: ["bad", "ok"], lambda name: described if name == "ok" else broken(), metrics.HttpCounts(),
        started=1.0)).start()
    try:
        samples = scrape(agent.url)
        assert value(samples, "drtool_volume_up", volume="gone") == 0
        assert value(samples, "drtool_nbd_requests_total", volume="gone", command="read") == 3
        assert value(samples, "drtool_volume_health", volume="gone", state="ONLINE") is None
        samples = scrape(replica.url)
        assert value(samples, "drtool_replica_up", replica="bad") == 0
        assert value(samples, "drtool_replica_up", replica="ok") == 1
        assert value(samples, "drtool_replica_applied_seq", replica="ok") == 7
        assert value(samples, "drtool_replica_applied_seq", replica="bad") is None
        assert "state directory gone" in caplog.text
    finally:
        agent.stop()
        replica.stop()
