"""A two-volume consistency group swapped between the lab's two hosts over SSH: planned failover, then
a takeover, with a dependent-write workload checked on the side that takes over.

One story on a lab of its own (built at the start, torn down at the end), as tests/lab/test_failover.py
tells the volumes' one: the inventory groups vol-a and vol-b as `app` (`drtool_primary_groups`);
site.yml defines the group and protects it as one; planned_failover.yml moves the whole group (both
members promoted together on the other host, the bytes exact on both); a member named alone is refused
before anything changes; a bad region of one member degrades that member only
(incident_recovery.yml, failback.yml); then a dependent-write workload on the new primary (record n written to vol-a,
and only once that write is acknowledged, to vol-b), the primary cut off with records it never shipped,
and takeover.yml promotes the group on the other host: there, for every n, vol-b holds n only if vol-a
holds n, and what it holds is a prefix of the records; reintegrate.yml brings the old primary back
as the group's secondary and counts what it lost, per member and for the group.  Every playbook runs
twice: the second run reports changed=0.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator

import pytest

from tests.conftest import require_tool
from tests.lab.drtool_lab import REGION, VOLUMES, DrtoolLab
from tests.lab.fixtures import require_lab_tools
from tests.lab.lab import running_lab
from tests.lab.test_failover import Story, assert_plan_shown, assert_serves_expected, failed_task, run_twice
from tests.lab.test_lab import assert_gone, snapshot_processes

pytestmark = [pytest.mark.lab, pytest.mark.slow]

A, B = "primary", "secondary"
GROUP = "app"
RECORD = 4096
FIRST_SLOT = 64  # records live in regions 64.. of both volumes (16 MiB = 256 regions of 64 KiB)
SLOTS_PER_REGION = REGION // RECORD


class GroupStory(Story):
    """The story, and what the takeover lost of each member's writes (counted when B returns)."""

    def __init__(self, drtool: DrtoolLab) -> None:
        super().__init__(drtool)
        self.lost: dict[str, int] = {}


@pytest.fixture(scope="module")
def story() -> Iterator[GroupStory]:
    require_lab_tools()
    require_tool("qemu-io", "qemu-img", "nbdcopy")
    with running_lab() as lab:
        drtool = DrtoolLab(lab, groups={GROUP: list(VOLUMES)})
        drtool.prepare()
        yield GroupStory(drtool)
        processes = snapshot_processes(lab)
    assert_gone(lab.id, lab.dir, processes)


@pytest.fixture
def d(story: GroupStory, request: pytest.FixtureRequest) -> Iterator[DrtoolLab]:
    if story.failed_step:
        pytest.skip(f"an earlier step failed: {story.failed_step}")
    failed_before = request.session.testsfailed
    yield story.d
    if request.session.testsfailed > failed_before:
        story.failed_step = request.node.name


def record_offset(n: int) -> int:
    return FIRST_SLOT * REGION + n * RECORD


def record_byte(n: int) -> int:
    return 1 + n % 255


def write_record(d: DrtoolLab, host: str, n: int, via_ssh: bool = True) -> None:
    """Record n: to vol-a, then (once vol-a's write is acknowledged: qemu-io has returned) to vol-b."""
    for volume in VOLUMES:
        d.write(host, volume, [(record_offset(n), RECORD, record_byte(n))], via_ssh=via_ssh)


def records_held(d: DrtoolLab, host: str, volume: str, count: int) -> list[int]:
    """The record numbers the volume holds, as an NBD client on the host reads them."""
    data = d.nbd_bytes(host, volume, record_offset(0), count * RECORD)
    return [n for n in range(count)
            if data[n * RECORD:(n + 1) * RECORD] == bytes([record_byte(n)]) * RECORD]


def test_site_defines_and_protects_the_group(d: DrtoolLab) -> None:
    run = run_twice(d, "site.yml")
    assert f"{GROUP}: vol-a, vol-b" in run.output, run  # the group's task ran, labelled with its members
    group = d.group_status(A, GROUP)
    assert (group["group"], sorted(group["members"]), group["role"]) == (GROUP, sorted(VOLUMES), "primary"), group
    assert group["peer"] == d.replica_url(B) and group["consistent"] is True, group
    for volume in VOLUMES:
        status = d.status(A, volume)
        assert status["peer"]["url"] == d.replica_url(B) and status["replication"]["initial_sync"] == "done", status
    assert_serves_expected(d, A)


def test_a_member_alone_is_refused_before_anything_changes(d: DrtoolLab) -> None:
    run = d.playbook("planned_failover.yml", drtool_failover_from=A, drtool_failover_to=B, confirm="yes",
                     drtool_failover_volumes=["vol-a"])
    check = "drtool.drtool.drtool_failover : Check that no volume of a group changes roles without the rest of its group"
    assert run.rc != 0 and failed_task(run) == check, f"{run}"
    said = " ".join(run.output.split())
    assert "vol-a is in group app with vol-b" in said and run.changed == 0, run
    assert all(d.status(A, volume)["role"] == "primary" for volume in VOLUMES)
    assert d.drtool(B, "status") == []


def test_planned_failover_moves_the_whole_group(d: DrtoolLab) -> None:
    d.write(A, "vol-a", [(5 * REGION, 4096, 0x41)])
    d.write(A, "vol-b", [(6 * REGION + 512, 1024, 0x42)])
    before = d.group_status(A, GROUP)
    run = run_twice(d, "planned_failover.yml", drtool_failover_from=A, drtool_failover_to=B, confirm="yes")
    # The reverse replication's plan, member by member, was shown before the copying: A's replica server
    # adopted both members in place, so nothing is to copy.
    for volume in VOLUMES:
        assert_plan_shown(run, f"{volume} (group {GROUP}): incremental sync to {d.replica_url(A)}: 0 regions (0 bytes) to copy",
                          f"{volume} (group {GROUP}): incremental sync to {d.replica_url(A)} done: 0 regions copied")
    # Both members changed roles together: promoted on B, demoted (and adopted) on A, nothing lost.
    for volume in VOLUMES:
        new, old = d.status(B, volume), d.status(A, volume)
        assert new["role"] == "primary" and new["last_swap"]["event"] == "promoted", new
        assert old["role"] == "secondary" and old["demoted"]["lost"]["records"] == 0, old
        assert new["direction"] == f"this host -> {d.replica_url(A)}"
    # The group itself moved: defined on B with the same identity, replicating back to A as one group.
    group = d.group_status(B, GROUP)
    assert (sorted(group["members"]), group["group_id"], group["role"]) == (sorted(VOLUMES), before["group_id"],
                                                                           "primary"), group
    assert group["peer"] == d.replica_url(A), group
    # The bytes of both members, as an NBD client on the new primary reads them, and as the old
    # primary's replica server keeps them on its devices.
    assert_serves_expected(d, B)
    for volume in VOLUMES:
        device = d.status(A, volume)["device"]
        assert d.mismatches(volume, d.file_digests(A, device)) == [], f"{A}'s {device} differs for {volume}"
    report = d.playbook("status.yml")
    assert report.rc == 0 and report.changed == 0, f"{report}"
    said = " ".join(report.output.split())
    assert f"group {GROUP} (vol-a, vol-b): primary on {B}" in said, report


def test_recovery_stays_per_volume_in_a_group(d: DrtoolLab) -> None:
    # A region of one member's device on the new primary goes bad: that member alone is degraded and
    # serves it from the replica on A (over the lab's network); the other member is not touched.
    device = d.status(B, "vol-b")["device"]
    d.ssh(B, f"dd if=/dev/urandom of={device} bs={REGION} seek=17 count=1 conv=notrunc status=none", check=True)
    run_twice(d, "incident_recovery.yml")
    status = d.status(B, "vol-b")
    assert status["mode"] == "degraded" and status["bad_regions"] == [[17, 1]], status
    assert d.status(B, "vol-a")["mode"] == "normal"
    assert_serves_expected(d, B)
    run_twice(d, "failback.yml")
    assert {volume: d.status(B, volume)["mode"] for volume in VOLUMES} == {v: "normal" for v in VOLUMES}
    group = d.group_status(B, GROUP)
    assert (group["role"], group["consistent"], group["health"]) == ("primary", True, "ONLINE"), group
    assert_serves_expected(d, B)


def start_writer(d: DrtoolLab, host: str, first: int, total: int) -> None:
    """The dependent-write workload in the background on the host: record n to vol-a, and once that
    write is acknowledged (qemu-io returned 0), to vol-b; each record counted in /tmp/records."""
    steps = []
    for n in range(first, total):
        writes = [shlex.join(["qemu-io", "--format", "raw", "--cmd",
                              f"write -P {record_byte(n)} {record_offset(n)} {RECORD}", d.nbd_uri(volume)])
                  for volume in VOLUMES]
        steps.append(f"{writes[0]} >/dev/null && {writes[1]} >/dev/null && echo {n} >> /tmp/records || exit 1")
    script = "; ".join(steps) + "; touch /tmp/records.done"
    d.lab.run_in(host, ["sh", "-c", f"rm -f /tmp/records /tmp/records.done; setsid sh -c {shlex.quote(script)} "
                                    "</dev/null >/tmp/records.log 2>&1 &"], check=True)


def records_written(d: DrtoolLab, host: str) -> tuple[int, bool]:
    out = d.lab.run_in(host, ["sh", "-c", "cat /tmp/records 2>/dev/null; test -e /tmp/records.done && echo done"])
    lines = out.stdout.split()
    return len([line for line in lines if line != "done"]), "done" in lines


def wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.1)


def test_takeover_keeps_the_dependent_write_order(d: DrtoolLab, story: GroupStory) -> None:
    shipped, total = 12, 100
    for n in range(shipped):
        write_record(d, B, n)
    d.drtool(B, "replicate", GROUP, "--wait")
    replicated = {volume: bytes(data) for volume, data in d.expected.items()}
    # The workload goes on while the background replicator ships it, and B is cut off in the middle:
    # A has whatever reached it by then.
    start_writer(d, B, shipped, total)
    wait_for(lambda: records_written(d, B)[0] >= 10, "records written by the workload")
    with d.lab.partitioned(B):
        # Cut off: B's workload goes on (none of it can reach A any more), then its agent dies.
        wait_for(lambda: records_written(d, B)[1], "end of the workload")
        assert records_written(d, B)[0] == total - shipped, d.lab.run_in(B, ["cat", "/tmp/records.log"]).stdout
        d.lab.run_in(B, ["sh", "-c", "kill -9 $(cat /run/drtool/agent.pid)"], check=True)

        check = d.playbook("takeover.yml", "--check", drtool_failover_from=B, drtool_failover_to=A)
        assert check.rc == 0 and check.changed > 0, f"{check}"
        assert f"group {GROUP}: would be taken over as one" in " ".join(check.output.split()), check
        assert {volume: d.status(A, volume)["role"] for volume in VOLUMES} == {v: "secondary" for v in VOLUMES}

        run = run_twice(d, "takeover.yml", drtool_failover_from=B, drtool_failover_to=A, confirm="yes")
        assert f"group {GROUP}: taken over as one, 2 volumes at one consistent point" in " ".join(run.output.split())
        for volume in VOLUMES:
            taken = d.status(A, volume)
            assert taken["role"] == "primary" and taken["last_swap"]["event"] == "takeover", taken
        # The dependent-write order across the group: vol-b holds record n only if vol-a holds it.
        held = {volume: records_held(d, A, volume, total) for volume in VOLUMES}
        assert set(held["vol-b"]) <= set(held["vol-a"]), held
        # What A holds is a prefix of the records, at least every one replicated before the workload
        # started, and not the ones written after the cut.
        for volume in VOLUMES:
            assert held[volume] == list(range(len(held[volume]))), (volume, held[volume])
            assert shipped <= len(held[volume]) < total, (volume, held[volume])
        print(f"takeover: A holds records 0..{len(held['vol-a']) - 1} of vol-a, 0..{len(held['vol-b']) - 1} of vol-b "
              f"(of {total} written on B, {shipped} replicated before the workload)")
        # Nothing else differs: A serves what was replicated before the cut, plus the records it holds.
        for volume in VOLUMES:
            d.expected[volume][:] = replicated[volume]
            for n in held[volume]:
                d.expected[volume][record_offset(n):record_offset(n) + RECORD] = bytes([record_byte(n)]) * RECORD
        assert_serves_expected(d, A)
        # B's writes that never reached A, one per record not held, per member.
        story.lost = {volume: total - len(held[volume]) for volume in VOLUMES}


def test_the_old_primary_returns_and_counts_what_the_group_lost(d: DrtoolLab, story: GroupStory) -> None:
    # B, back on the network, steps down for the whole group (forced: A took over); what it wrote that
    # never reached A is counted per member and for the group, and A replicates the group back to it.
    lost = story.lost
    run = run_twice(d, "reintegrate.yml", drtool_failover_from=B, drtool_failover_to=A, confirm="yes")
    said = " ".join(run.output.split())
    for volume in VOLUMES:
        demoted = d.status(B, volume)
        assert demoted["role"] == "secondary", demoted
        assert (demoted["demoted"]["lost"]["records"], demoted["demoted"]["lost"]["bytes"]) == (
            lost[volume], lost[volume] * RECORD), demoted["demoted"]
        assert (f"{volume} (group {GROUP}): {lost[volume]} writes ({lost[volume] * RECORD} bytes" in said), run
    assert f"group {GROUP}: {sum(lost.values())} writes ({sum(lost.values()) * RECORD} bytes" in said, run
    group = d.group_status(A, GROUP)
    assert (group["role"], group["peer"], group["consistent"]) == ("primary", d.replica_url(B), True), group
    # B's devices (its replica server writes them now) catch up with A, both members.
    d.drtool(A, "replicate", GROUP, "--wait")
    for volume in VOLUMES:
        device = d.status(B, volume)["device"]
        assert d.mismatches(volume, d.file_digests(B, device)) == [], f"{B}'s {device} differs for {volume}"
