"""Planned failover, swap back, incident recovery, failback and takeover between two SSH hosts.

One story, in order, on a lab of its own (built at the start, torn down at the end): drtool is
installed and the volumes protected by site.yml; a workload writes through the agent over NBD;
planned_failover.yml swaps the roles; while they are swapped (the inventory still names the old
primary in `primaries`) incident_recovery.yml, failback.yml and status.yml follow the roles
registered on the hosts and site.yml leaves the old primary's demoted volumes alone; the swap back;
incident_recovery.yml and failback.yml
serve and then repair corrupted regions from the replica across the lab's network; the primary is
cut off with writes it never shipped, takeover.yml promotes the secondary, and reintegrate.yml
brings the old primary back as the secondary.  Every playbook runs twice: the second run reports
changed=0.  Bytes are checked as an NBD client on the host reads them (per-region digests against
the bytes the test wrote), region counts and lost writes as drtool reports them.

The steps depend on each other: once one fails, the later ones are skipped.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.conftest import require_tool
from tests.lab.drtool_lab import REGION, REPLICA_ROOT, STORAGE, VOLUMES, DrtoolLab, PlaybookRun
from tests.lab.fixtures import require_lab_tools
from tests.lab.lab import running_lab
from tests.lab.test_lab import assert_gone, snapshot_processes

pytestmark = [pytest.mark.lab, pytest.mark.slow]

A, B = "primary", "secondary"  # the lab's host names: A starts as the primary


class Story:
    """The deployed lab, and whether an earlier step failed."""

    def __init__(self, drtool: DrtoolLab) -> None:
        self.d = drtool
        self.failed_step: str | None = None


@pytest.fixture(scope="module")
def story() -> Iterator[Story]:
    require_lab_tools()
    require_tool("qemu-io", "qemu-img", "nbdcopy")
    with running_lab() as lab:
        drtool = DrtoolLab(lab)
        drtool.prepare()
        yield Story(drtool)
        processes = snapshot_processes(lab)
    assert_gone(lab.id, lab.dir, processes)


@pytest.fixture
def d(story: Story, request: pytest.FixtureRequest) -> Iterator[DrtoolLab]:
    if story.failed_step:
        pytest.skip(f"an earlier step failed: {story.failed_step}")
    failed_before = request.session.testsfailed
    yield story.d
    if request.session.testsfailed > failed_before:
        story.failed_step = request.node.name


def run_twice(d: DrtoolLab, playbook: str, *args: str, **extra) -> PlaybookRun:
    """The playbook, then again: the second run must change nothing."""
    first = d.playbook(playbook, *args, **extra)
    assert first.rc == 0, f"{first}"
    again = d.playbook(playbook, *args, **extra)
    assert again.rc == 0, f"{again}"
    assert again.changed == 0, f"second run of {playbook} changed {again.recap}\n{again}"
    return first


def failed_task(run: PlaybookRun) -> str | None:
    """The name of the task that failed first (None when none did)."""
    match = re.search(r"^(fatal|failed): \[", run.output, re.MULTILINE)
    if match is None:
        return None
    return run.output[:match.start()].rsplit("TASK [", 1)[1].split("]", 1)[0]


def failover(d: DrtoolLab, source: str, target: str) -> PlaybookRun:
    return run_twice(d, "planned_failover.yml", drtool_failover_from=source, drtool_failover_to=target,
                     confirm="yes")


def assert_serves_expected(d: DrtoolLab, host: str) -> None:
    for volume in VOLUMES:
        assert d.mismatches(volume, d.nbd_digests(host, volume)) == [], f"{host} serves wrong bytes of {volume}"


def assert_device_expected(d: DrtoolLab, host: str) -> None:
    for volume in VOLUMES:
        device = d.status(host, volume)["device"]
        assert d.mismatches(volume, d.file_digests(host, device)) == [], f"{host}'s {device} differs for {volume}"


def test_site_installs_and_protects(d: DrtoolLab) -> None:
    run_twice(d, "site.yml")
    for volume in VOLUMES:
        status = d.status(A, volume)
        assert status["role"] == "primary" and status["replication"]["initial_sync"] == "done", status
        # Over TLS, verified against the lab's CA: nothing crosses the lab's network in cleartext.
        assert status["peer"]["url"] == d.replica_url(B) and not status["peer"].get("insecure"), status["peer"]
    replicas = d.replica_status(B)
    assert sorted(replicas) == sorted(VOLUMES)
    assert d.replica_status(A) == {}  # A's own replica server runs, idle until A steps down
    # Each host sees only its own storage: A cannot read B's replicas, B cannot read A's devices.
    assert d.lab.check_isolation() == []
    assert d.ssh(A, f"test -e {REPLICA_ROOT}/vol-a").returncode == 1
    assert d.ssh(B, f"test -e {STORAGE}/images/vol-a.img").returncode == 1
    assert_serves_expected(d, A)


_PROBE_SCRIPT = (
    "import ssl, sys, urllib.error, urllib.request\n"
    "def get(url, context=None):\n"
    "    try:\n"
    "        urllib.request.urlopen(url, timeout=5, context=context)\n"
    "        return 'http 200'\n"
    "    except urllib.error.HTTPError as exc:\n"
    "        return f'http {exc.code}'\n"
    "    except Exception as exc:\n"
    "        return type(exc).__name__\n"
    "print(get('https://' + sys.argv[1] + '/v1/health', ssl.create_default_context(cafile=sys.argv[2])))\n"
    "print(get('http://' + sys.argv[1] + '/v1/health'))\n"
)


def test_cleartext_is_refused_beyond_loopback(d: DrtoolLab) -> None:
    # Each replica server answers HTTPS with a certificate the lab's CA signed for its address, and
    # no plain HTTP at all.
    for host in (A, B):
        probe = d.ssh(A, ["python3", "-c", _PROBE_SCRIPT, f"{d.lab.hosts[host]['address']}:8470",
                          f"{STORAGE}/etc/peer-ca.pem"], check=True)
        https, http = probe.stdout.split("\n")[:2]
        assert https.startswith("http ") and not http.startswith("http "), (host, probe.stdout)
    # The primary's role refuses an http:// peer off loopback before it changes anything.
    http_peer = f"http://{d.lab.hosts[B]['address']}:8470"
    run = d.playbook("site.yml", "--limit", A, drtool_primary_peer_url=http_peer)
    check = "drtool.drtool.drtool_primary : Check that the peer is reached over TLS beyond loopback"
    assert run.rc != 0 and failed_task(run) == check, f"{run}"
    assert "drtool_primary_insecure" in run.output and run.changed == 0, f"{run}"
    for volume in VOLUMES:
        assert d.status(A, volume)["peer"]["url"] == d.replica_url(B)


def test_planned_failover_refuses_to_start_until_replication_drains(d: DrtoolLab) -> None:
    # Without a terminal and without -e confirm=yes, nobody answered the prompt: nothing happens.
    unconfirmed = d.playbook("planned_failover.yml", drtool_failover_from=A, drtool_failover_to=B)
    stop = "drtool.drtool.drtool_failover : Stop unless the answer was yes"
    assert unconfirmed.rc != 0 and failed_task(unconfirmed) == stop
    # A cannot reach B's replica server (its route there is refused): the lag cannot drain.
    d.lab.run_in(A, ["ip", "route", "add", "prohibit", d.lab.hosts[B]["address"] + "/32"], check=True)
    try:
        d.write(A, "vol-a", [(5 * REGION, 4096, 0x41), (6 * REGION + 512, 1024, 0x42)])
        run = d.playbook("planned_failover.yml", drtool_failover_from=A, drtool_failover_to=B, confirm="yes",
                         drtool_failover_timeout=3)
        drain = "drtool.drtool.drtool_failover : Drain replication (the lag must reach zero within the timeout)"
        assert run.rc != 0 and failed_task(run) == drain, f"{run}"
        # Nothing changed: A is still the primary and takes writes; B promoted nothing.
        assert all(d.status(A, volume)["role"] == "primary" for volume in VOLUMES)
        assert d.status(A, "vol-a")["lag"]["records"] >= 2
        assert d.drtool(B, "status") == []
        d.write(A, "vol-a", [(7 * REGION, 4096, 0x43)])
    finally:
        d.lab.run_in(A, ["ip", "route", "del", "prohibit", d.lab.hosts[B]["address"] + "/32"], check=True)
    # Check mode reports the swap and changes nothing.
    check = d.playbook("planned_failover.yml", "--check", drtool_failover_from=A, drtool_failover_to=B)
    assert check.rc == 0 and check.changed > 0, f"{check}"
    assert all(d.status(A, volume)["role"] == "primary" for volume in VOLUMES)
    assert d.drtool(B, "status") == []


def test_planned_failover_swaps_the_roles(d: DrtoolLab) -> None:
    run = failover(d, A, B)
    assert "incremental sync to" in run.output
    for volume in VOLUMES:
        new, old = d.status(B, volume), d.status(A, volume)
        assert new["role"] == "primary" and new["last_swap"]["event"] == "promoted", new
        assert old["role"] == "secondary" and old["last_swap"]["event"] == "demoted", old
        assert old["demoted"]["lost"]["records"] == 0
        # Reverse replication to A's own replica server: A kept every region, nothing to copy.
        assert new["direction"] == f"this host -> {d.replica_url(A)}"
        assert (new["replication"]["mode"], new["replication"]["regions"]) == ("incremental", 0), new["replication"]
        assert new["replication"]["initial_sync"] == "done"
    # The new primary serves exactly what A held before the swap, read by an NBD client on B.
    assert_serves_expected(d, B)
    # A's replica server now holds the volumes, in place on A's own devices.
    assert sorted(d.replica_status(A)) == sorted(VOLUMES)


def test_while_swapped_the_playbooks_follow_the_roles(d: DrtoolLab) -> None:
    # A region of the NEW primary's device (its replica image, promoted in place) goes bad.
    device = d.status(B, "vol-b")["device"]
    d.ssh(B, f"dd if=/dev/urandom of={device} bs={REGION} seek=17 count=1 conv=notrunc status=none", check=True)
    run = run_twice(d, "incident_recovery.yml")
    assert "skipping: no hosts matched" not in run.output, run
    status = d.status(B, "vol-b")
    assert status["mode"] == "degraded" and status["bad_regions"] == [[17, 1]], status
    # Served from the replica on the old primary (A's replica server, on A's own device) over the
    # lab's network, verified: the NBD client on B reads exact bytes.
    assert status["direction"] == f"this host -> {d.replica_url(A)}"
    assert status["recovery"]["fetched_regions"] >= 1
    assert_serves_expected(d, B)
    # A's demoted volumes were neither scrubbed nor put in recovery (its replica server writes them).
    assert {d.status(A, volume)["mode"] for volume in VOLUMES} == {"normal"}
    # The swap back below must find B's device clean: fail back once (failback.yml runs twice later).
    failback = d.playbook("failback.yml")
    assert failback.rc == 0 and failback.changed > 0, f"{failback}"
    assert d.status(B, "vol-b")["mode"] == "normal"

    report = d.playbook("status.yml")
    assert report.rc == 0 and report.changed == 0, f"{report}"
    assert "vol-a: primary on secondary; vol-b: primary on secondary" in " ".join(report.output.split()), report

    # site.yml on the old primary: its demoted volumes stay with its replica server, no agent starts.
    site = d.playbook("site.yml", "--limit", A)
    assert site.rc == 0 and site.changed == 0, f"site.yml on the old primary changed {site.recap}\n{site}"
    said = " ".join(site.output.split())
    for volume in VOLUMES:
        assert f"{volume}: secondary here (" in said
        old = d.status(A, volume)
        assert old["role"] == "secondary" and not old["agent"]["running"], old
    assert sorted(d.replica_status(A)) == sorted(VOLUMES)


def assert_plan_shown(run: PlaybookRun, *lines: str) -> None:
    """The fast failback's plan was shown before the copying started (each line, in this order)."""
    said = " ".join(run.output.split())
    positions = [said.find(line) for line in lines]
    assert -1 not in positions and positions == sorted(positions), f"{lines} not shown in order\n{run}"


def changed_regions(before: list[str], after: list[str]) -> list[int]:
    assert len(before) == len(after)
    return [region for region, (old, new) in enumerate(zip(before, after)) if old != new]


def test_swap_back_moves_only_what_changed(d: DrtoolLab) -> None:
    # A's devices as they are now (its replica server writes them as B ships records).
    devices = {volume: d.status(A, volume)["device"] for volume in VOLUMES}
    before = {volume: d.file_digests(A, devices[volume]) for volume in VOLUMES}
    writes = [(1 * REGION + 7 * 512, 3072, 0x61), (2 * REGION, 4096, 0x62), (40 * REGION + 512, 2048, 0x63)]
    d.write(B, "vol-a", writes)
    promoted_at = d.status(B, "vol-a")["promoted"]["applied_seq"]
    # No wait for replication: the swap back drains it (ships what B's background replicator has
    # not shipped yet, as records) before B is demoted.
    run = failover(d, B, A)
    said = " ".join(run.output.split())
    assert "pending writes" in said and "shipped by the drain" in said, run
    for volume in VOLUMES:
        home, away = d.status(A, volume), d.status(B, volume)
        assert home["role"] == "primary" and home["last_swap"]["event"] == "promoted", home
        assert away["role"] == "secondary" and away["demoted"]["lost"]["records"] == 0, away
        # The drain shipped every write before the demotion: the fast failback copies no region at
        # all (a full sync would copy all 256), and the operator saw that before it started.
        assert (home["replication"]["mode"], home["replication"]["regions"]) == ("incremental", 0)
    # What moved: B's 3 writes, as exactly 3 records, which changed exactly the 3 regions they touched
    # on A's device and nothing else; vol-b, not written on B, did not change at all.
    assert d.status(A, "vol-a")["promoted"]["applied_seq"] == promoted_at + len(writes)
    assert d.status(B, "vol-a")["demoted"]["seq"] == promoted_at + len(writes)
    after = {volume: d.file_digests(A, devices[volume]) for volume in VOLUMES}
    assert changed_regions(before["vol-a"], after["vol-a"]) == [1, 2, 40]
    assert changed_regions(before["vol-b"], after["vol-b"]) == []
    assert_device_expected(d, A)
    assert_serves_expected(d, A)
    d.write(A, "vol-b", [(9 * REGION, 4096, 0x71)])
    d.drtool(A, "replicate", "vol-b", "--wait")
    assert_device_expected(d, B)  # B's replica is exact too (its devices are its replica images)
    url = d.replica_url(B)
    for volume in VOLUMES:
        assert_plan_shown(run, f"{volume}: incremental sync to {url}: 0 regions (0 bytes) to copy",
                          f"{volume}: incremental sync to {url} done: 0 regions copied")


def test_incident_recovery_and_failback_in_the_lab(d: DrtoolLab) -> None:
    device = d.status(A, "vol-a")["device"]
    # Two regions of A's device go bad behind drtool's back.
    for region in (12, 30):
        d.ssh(A, f"dd if=/dev/urandom of={device} bs={REGION} seek={region} count=1 conv=notrunc status=none",
              check=True)
    run_twice(d, "incident_recovery.yml")
    status = d.status(A, "vol-a")
    assert status["mode"] == "degraded" and status["bad_regions"] == [[12, 1], [30, 1]], status
    # Served from B's replica over the lab's network, verified: the NBD client on A reads exact bytes.
    assert_serves_expected(d, A)
    assert status["recovery"]["fetched_regions"] >= 2
    run_twice(d, "failback.yml")
    status = d.status(A, "vol-a")
    assert (status["mode"], status["health"], status["bad_count"]) == ("normal", "ONLINE", 0), status
    assert_device_expected(d, A)


def test_takeover_then_the_old_primary_returns(d: DrtoolLab) -> None:
    d.write(A, "vol-a", [(3 * REGION, 4096, 0x33)])
    d.drtool(A, "replicate", "vol-a", "--wait")
    replicated = {volume: bytes(data) for volume, data in d.expected.items()}
    lost_writes = [(10 * REGION, 4096, 0x10), (11 * REGION + 512, 1024, 0x11), (10 * REGION + 8192, 512, 0x12)]
    with d.lab.partitioned(A):
        # Cut off: A's link is down and its sshd dead; its workload writes on, and then its agent dies.
        d.write(A, "vol-a", lost_writes, via_ssh=False)
        d.lab.run_in(A, ["sh", "-c", "kill -9 $(cat /run/drtool/agent.pid)"], check=True)
        for volume, data in replicated.items():
            d.expected[volume][:] = data

        # Check mode says what it would take over, and changes nothing on B.
        replicas = {name: (r["state"], r["applied_seq"]) for name, r in d.replica_status(B).items()}
        check = d.playbook("takeover.yml", "--check", drtool_failover_from=A, drtool_failover_to=B)
        assert check.rc == 0 and check.changed > 0, f"{check}"
        assert "vol-a: would be taken over with the writes" in " ".join(check.output.split()), check
        assert {volume: d.status(B, volume)["role"] for volume in VOLUMES} == {v: "secondary" for v in VOLUMES}
        assert {name: (r["state"], r["applied_seq"]) for name, r in d.replica_status(B).items()} == replicas

        run_twice(d, "takeover.yml", drtool_failover_from=A, drtool_failover_to=B, confirm="yes")
        taken = d.status(B, "vol-a")
        assert taken["role"] == "primary" and taken["last_swap"]["event"] == "takeover", taken
        assert taken["promoted"]["takeover"]
        # B serves the last replicated state, exactly.
        assert_serves_expected(d, B)
        d.write(B, "vol-a", [(20 * REGION, 4096, 0x20)])

    # Check mode: A would step down and B pair with it; nothing changes on either host.
    roles = {(host, volume): d.status(host, volume)["role"] for host in (A, B) for volume in VOLUMES}
    check = d.playbook("reintegrate.yml", "--check", drtool_failover_from=A, drtool_failover_to=B)
    assert check.rc == 0 and check.changed > 0, f"{check}"
    assert {(host, volume): d.status(host, volume)["role"] for host in (A, B) for volume in VOLUMES} == roles
    assert d.status(A, "vol-a")["demoted"] is None and d.status(B, "vol-a")["peer"] is None
    assert "what the fast failback copies is known once" in " ".join(check.output.split()), check

    run = run_twice(d, "reintegrate.yml", drtool_failover_from=A, drtool_failover_to=B, confirm="yes")
    lost = d.status(A, "vol-a")["demoted"]["lost"]
    assert (lost["records"], lost["bytes"], lost["regions"], lost["exact"]) == (3, 4096 + 1024 + 512, 2, True)
    said = " ".join(run.output.split())  # the callback wraps long messages
    assert "vol-a: 3 writes (5632 bytes in 2 regions) made here never reached the new primary" in said
    new = d.status(B, "vol-a")
    # The fast failback copied region 20 (written on B) and 10, 11 (A's divergent regions), no more.
    assert (new["replication"]["mode"], new["replication"]["regions"]) == ("incremental", 3), new["replication"]
    assert new["last_swap"]["lost"]["records"] == 3 and new["promoted"]["lost"]["bytes"] == 5632
    assert (d.status(B, "vol-b")["replication"]["regions"]) == 0
    url = d.replica_url(A)
    assert f"vol-a: incremental sync to {url} done: 3 regions copied (196608 bytes planned), 2 divergent" in said
    assert_serves_expected(d, B)
    # A is the secondary again, its devices exact (served by its replica server).
    assert d.status(A, "vol-a")["role"] == "secondary"
    d.drtool(B, "replicate", "vol-a", "--wait")
    assert_device_expected(d, A)
    # The plan was shown before the copying started, then what was copied.
    assert_plan_shown(run, f"vol-a: incremental sync to {url}: 3 regions (196608 bytes) to copy, 2 of them divergent there",
                      f"vol-a: incremental sync to {url} done: 3 regions copied")

