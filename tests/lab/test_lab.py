"""The two-host lab itself: reachable over SSH and Ansible, isolated, cuttable, leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_tool
from tests.lab.fixtures import require_lab_tools
from tests.lab.lab import DEFAULT_BASE_DIR, PREFIX, Lab, cleanup_stale, list_netns

pytestmark = pytest.mark.lab

LAB_PY = Path(__file__).with_name("lab.py")


def ansible_executable() -> str:
    beside = Path(sys.executable).with_name("ansible")  # the venv's, matching the hosts' Python
    if beside.exists():
        return str(beside)
    require_tool("ansible")
    return shutil.which("ansible")


def netns_from_ip() -> list[str]:
    """`ip netns list` as the tool itself reports it (not the lab's own view of /run/netns)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def assert_gone(lab_id: str, lab_dir: Path, processes: list[dict]) -> None:
    leftovers = [name for name in netns_from_ip() if name.startswith(f"{PREFIX}{lab_id}")]
    assert leftovers == [], f"namespaces left behind: {leftovers}"
    mounts = [line for line in Path("/proc/mounts").read_text().splitlines()
              if f"{PREFIX}{lab_id}" in line or str(lab_dir) in line]
    assert mounts == [], f"mounts left behind: {mounts}"
    alive = []
    for record in processes:
        try:
            fields = Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        if int(fields[19]) != record["start"]:
            continue  # the PID was reused
        # A zombie orphan waits for the machine's init to reap it; ours we must reap ourselves.
        if fields[0] != "Z" or int(fields[1]) == os.getpid():
            alive.append({**record, "state": fields[0]})
    assert alive == [], f"processes left behind: {alive}"
    assert not lab_dir.exists(), f"lab dir left behind: {lab_dir}"


def snapshot_processes(lab: Lab) -> list[dict]:
    """Recorded processes plus everything currently in the lab's namespaces (e.g. ControlMasters)."""
    records = lab.recorded_processes()
    for pid in lab.namespace_processes():
        stat = Path(f"/proc/{pid}/stat").read_text()
        records.append({"pid": pid, "start": int(stat.rsplit(")", 1)[1].split()[19]), "what": "in netns"})
    return records


def test_lab_is_up(lab: Lab) -> None:
    assert set(lab.netns_names) <= set(netns_from_ip())
    status = lab.status()
    for name in ("primary", "secondary"):
        assert status["hosts"][name]["running"] and status["hosts"][name]["reachable"], status
    inventory = yaml.safe_load(lab.inventory.read_text())
    groups = inventory["all"]["children"]
    assert groups["primaries"]["hosts"]["primary"]["ansible_host"] == lab.hosts["primary"]["address"]
    assert groups["secondaries"]["hosts"]["secondary"]["ansible_host"] == lab.hosts["secondary"]["address"]
    assert inventory["all"]["vars"]["ansible_user"] == "root"
    assert Path(inventory["all"]["vars"]["ansible_python_interpreter"]).exists()


def test_ansible_ping_reaches_both_hosts(lab: Lab) -> None:
    # ansible-core has no JSON callback (that is ansible.posix); the default one prints
    # "host | SUCCESS => {json}" per host.
    result = subprocess.run([ansible_executable(), "all", "-i", str(lab.inventory), "-m", "ansible.builtin.ping"],
                            env={**lab.env, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_CALLBACK_RESULT_FORMAT": "json"},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    pongs = dict(re.findall(r'^(\w+) \| SUCCESS => \{.*?"ping": "(\w+)"', result.stdout, re.M | re.S))
    assert pongs == {"primary": "pong", "secondary": "pong"}, result.stdout


def test_hostnames(lab: Lab) -> None:
    for name in ("primary", "secondary"):
        assert lab.ssh(name, "hostname", check=True).stdout.strip() == name
        assert lab.run_in(name, ["hostname"], check=True).stdout.strip() == name
    assert os.uname().nodename not in ("primary", "secondary")  # the root uts namespace is untouched


def test_hosts_reach_each_other_by_name(lab: Lab) -> None:
    probe = "exec 3<>/dev/tcp/{}/22 && echo open"
    assert lab.ssh("primary", ["bash", "-c", probe.format("secondary")]).stdout.strip() == "open"
    assert lab.ssh("secondary", ["bash", "-c", probe.format("primary")]).stdout.strip() == "open"


def test_isolation_holds_both_ways(lab: Lab) -> None:
    assert lab.check_isolation() == []


def test_isolation_check_catches_a_shared_directory(lab: Lab) -> None:
    # The lab dir is on the shared root filesystem: the check must notice, or it proves nothing.
    shared = lab.dir / "shared-probe"
    shared.mkdir()
    failures = lab.check_isolation(str(shared))
    assert any("primary sees secondary's" in failure for failure in failures), failures
    assert any("secondary sees primary's" in failure for failure in failures), failures
    assert any("root namespace sees" in failure for failure in failures), failures


def test_cut_and_restore(lab: Lab) -> None:
    storage = lab.hosts["primary"]["storage"]
    lab.ssh("primary", f"echo survives > {storage}/cut-probe", check=True)
    with lab.partitioned("primary"):
        started = time.monotonic()
        result = lab.ssh("primary", "true", connect_timeout=1, timeout=15)
        assert result.returncode == 255, result
        assert time.monotonic() - started < 5
        assert not lab.reachable("primary", timeout=0.5)
        assert lab.ssh("secondary", "true").returncode == 0  # only the primary is cut off
        # The host itself lives on, reachable for fault injection without the network.
        assert lab.run_in("primary", ["cat", f"{storage}/cut-probe"], check=True).stdout == "survives\n"
        running = lab.run_in("primary", ["sh", "-c", "cat /proc/[0-9]*/comm"], check=True).stdout.split()
        assert running and "sshd" not in running  # the host runs on, without sshd
    assert lab.reachable("primary")
    assert lab.ssh("primary", f"cat {storage}/cut-probe", check=True).stdout == "survives\n"
    lab.ssh("primary", f"rm {storage}/cut-probe", check=True)


def test_second_lab_coexists_and_teardown_leaves_nothing(lab: Lab) -> None:
    other = Lab.up()
    try:
        assert other.id != lab.id
        assert other.ssh("secondary", "hostname", check=True).stdout.strip() == "secondary"
        processes = snapshot_processes(other)  # now includes the ssh ControlMaster
        assert any(p["what"] == "in netns" for p in processes)
    finally:
        other.down()
    assert_gone(other.id, other.dir, processes)
    other.down()  # idempotent
    assert lab.ssh("primary", "true").returncode == 0  # the session lab is untouched


def test_cleanup_stale_removes_a_crashed_lab(lab: Lab, tmp_path: Path) -> None:
    # The owner dies by SIGKILL right after `up`: no teardown runs at all.
    script = ("import os, sys; sys.path.insert(0, sys.argv[1]); import lab; "
              "l = lab.Lab.up(); print(l.id, l.dir, flush=True); os.kill(os.getpid(), 9)")
    result = subprocess.run([sys.executable, "-c", script, str(LAB_PY.parent)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr
    crashed_id, crashed_dir = result.stdout.split()
    crashed = Lab.load(crashed_dir)
    processes = crashed.recorded_processes()
    assert crashed.is_stale()
    assert any(name.startswith(f"{PREFIX}{crashed_id}") for name in list_netns())

    # Not asserting it is in `removed`: a concurrent pytest's cleanup_stale() may get there first.
    removed = cleanup_stale()
    assert f"lab {lab.id}" not in removed  # a live lab is not a leftover
    assert_gone(crashed_id, Path(crashed_dir), processes)
    assert lab.ssh("primary", "true").returncode == 0


def test_cli_up_status_down() -> None:
    require_lab_tools()
    up = subprocess.run([sys.executable, str(LAB_PY), "up"], capture_output=True, text=True, timeout=60)
    assert up.returncode == 0, up.stderr
    lab_id = up.stdout.split()[1]
    lab_dir = Path(DEFAULT_BASE_DIR) / f"{PREFIX}{lab_id}"
    try:
        status = subprocess.run([sys.executable, str(LAB_PY), "status", "--json"], capture_output=True,
                                text=True, timeout=60, check=True)
        mine = [entry for entry in json.loads(status.stdout)["labs"] if entry["id"] == lab_id]
        assert mine and mine[0]["detached"] and not mine[0]["stale"]
        assert all(host["reachable"] for host in mine[0]["hosts"].values()), mine
        # The CLI's process has exited; the lab must outlive it and work from its env.sh.
        ssh = subprocess.run(["sh", "-c", f". {lab_dir}/env.sh && ssh primary hostname"],
                             capture_output=True, text=True, timeout=60)
        assert ssh.stdout.strip() == "primary", ssh.stderr
        processes = Lab.load(lab_dir).recorded_processes()
    finally:
        down = subprocess.run([sys.executable, str(LAB_PY), "down", lab_id], capture_output=True, text=True,
                              timeout=60)
    assert down.returncode == 0, down.stderr
    assert_gone(lab_id, lab_dir, processes)
    again = subprocess.run([sys.executable, str(LAB_PY), "down", lab_id], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0
