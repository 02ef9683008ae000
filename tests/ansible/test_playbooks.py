"""The four playbooks end to end against inventory/local, with real ansible-playbook runs.

One site for the whole module, in order: --check on fresh hosts, site, site again,
corruption (vol-a: bad regions; vol-b: its device disappears), incident_recovery
(--check, run, run again), failback (--check, run with a new device for vol-b, run
again), status.  Every path is under a temporary drtool_base and the ports are free
ones, so nothing outside the test's directory is touched.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ansible.conftest import free_port, run_playbook, stop_pid_file
from tests.conftest import corrupt, make_image, require_tool

pytestmark = pytest.mark.slow

SIZE = 4 << 20
REGION = 64 << 10
VOLUMES = ("vol-a", "vol-b")


class Site:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.replica_port = free_port("127.0.0.2")
        self.nbd_port = free_port("127.0.0.3")
        self.images = base / "primary" / "images"
        self.expected: dict[str, bytes] = {}
        self.extra = {
            "drtool_base": str(base),
            "drtool_replica_port": self.replica_port,
            "drtool_nbd_port": self.nbd_port,
            # The fast path: this checkout's venv already imports drtool (the wheel install
            # is exercised by the drtool_install molecule scenario).
            "drtool_install_method": "existing",
            "drtool_install_python": sys.executable,
        }

    @property
    def root(self) -> str:
        return str(self.base / "primary" / "state")

    def play(self, playbook: str, *args: str, extra: dict | None = None):
        return run_playbook(playbook, self.base, {**self.extra, **(extra or {})}, *args)

    def status(self) -> dict[str, dict]:
        from drtool import api

        return {s["volume"]: s for s in api.status(None, root=self.root, probe_peer=False)}

    def pids(self) -> dict[str, str | None]:
        out = {}
        for name, path in (("replica", self.base / "secondary/run/replica.pid"),
                           ("agent", self.base / "primary/run/agent.pid")):
            out[name] = path.read_text().strip() if path.exists() else None
        return out

    def files(self) -> dict[str, str]:
        """Every file under the base and a digest of it (Ansible's own temp dirs and logs aside)."""
        out = {}
        for path in sorted(self.base.rglob("*")):
            rel = str(path.relative_to(self.base))
            if rel.startswith(".ansible") or "/log/" in f"/{rel}" or not path.is_file() or path.name == "lock":
                continue
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        return out

    def nbd_uri(self, name: str, tcp: bool = True) -> str:
        if tcp:
            return f"nbd://127.0.0.3:{self.nbd_port}/{name}"
        return f"nbd+unix:///{name}?socket={self.base / 'primary/run/nbd.sock'}"

    def stop(self) -> None:
        stop_pid_file(self.base / "primary/run/agent.pid")
        stop_pid_file(self.base / "secondary/run/replica.pid")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    require_tool("qemu-img", "qemu-io")
    base = tmp_path_factory.mktemp("site")
    result = Site(base)
    result.images.mkdir(parents=True)
    for seed, name in enumerate(VOLUMES, start=11):
        result.expected[name] = make_image(result.images / f"{name}.img", SIZE, seed=seed)
    yield result
    result.stop()


def assert_ok(run, changed: bool | None = None) -> None:
    assert run.rc == 0, str(run)
    assert run.recap and all(h["failed"] == 0 and h["unreachable"] == 0 for h in run.recap.values()), str(run)
    if changed is True:
        assert run.changed > 0, str(run)
    elif changed is False:
        assert run.changed == 0, f"a second run must report changed=0\n{run}"


def compare_over_nbd(uri: str, expected: Path) -> None:
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", uri, str(expected)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{uri} differs from {expected}: {proc.stdout}{proc.stderr}"


def test_site_check_on_fresh_hosts_changes_nothing(site):
    before = site.files()
    run = site.play("site.yml", "--check")
    assert_ok(run, changed=True)
    assert site.files() == before
    assert site.pids() == {"replica": None, "agent": None}


def test_site_installs_serves_and_protects(site):
    run = site.play("site.yml", "--diff")
    assert_ok(run, changed=True)
    status = site.status()
    assert sorted(status) == list(VOLUMES)
    for name in VOLUMES:
        assert status[name]["health"] == "ONLINE" and status[name]["mode"] == "normal"
        assert status[name]["replication"]["initial_sync"] == "done"
        assert status[name]["peer"]["url"] == f"http://127.0.0.2:{site.replica_port}"
        assert status[name]["agent"]["running"]
    # The inventory's per-volume settings (vol-b's fetch_timeout), the defaults elsewhere.
    assert status["vol-b"]["settings"]["fetch_timeout"] == 10.0 and status["vol-a"]["settings"]["fetch_timeout"] == 30.0
    assert all(site.pids().values())
    token = site.base / "secondary/etc/replica.token"
    assert oct(token.stat().st_mode & 0o777) == "0o600"
    for name in VOLUMES:
        compare_over_nbd(site.nbd_uri(name), site.images / f"{name}.img")


def test_site_second_run_and_check_change_nothing(site):
    pids = site.pids()
    assert_ok(site.play("site.yml"), changed=False)
    before = site.files()
    assert_ok(site.play("site.yml", "--check", "--diff"), changed=False)
    assert site.files() == before
    assert site.pids() == pids


def test_incident_recovery_check_changes_nothing(site):
    # The incident: two bad regions in vol-a, and vol-b's device is gone.
    (site.base / "expected").mkdir()
    for name in VOLUMES:
        (site.base / "expected" / f"{name}.img").write_bytes(site.expected[name])
    corrupt(site.images / "vol-a.img", 3 * REGION + 17, b"\x00\x01\x02\x03")
    corrupt(site.images / "vol-a.img", 40 * REGION, b"garbage")
    os.rename(site.images / "vol-b.img", site.base / "vol-b.lost")

    pids = site.pids()
    run = site.play("incident_recovery.yml", "--check")
    assert_ok(run, changed=True)
    status = site.status()
    assert {s["mode"] for s in status.values()} == {"normal"}
    assert all(s["overlay"]["regions"] == 0 for s in status.values())
    assert site.pids() == pids


def test_incident_recovery_serves_correct_data(site):
    run = site.play("incident_recovery.yml")
    assert_ok(run, changed=True)
    status = site.status()
    assert status["vol-a"]["mode"] == "degraded" and status["vol-a"]["bad_regions"] == [[3, 1], [40, 1]]
    assert status["vol-b"]["mode"] == "degraded" and status["vol-b"]["health"] == "FAULTED"
    assert "vol-a: DEGRADED, mode degraded" in run.output and "vol-b: FAULTED, mode degraded" in run.output
    # A merged read through the agent equals the image as it was before the damage.
    compare_over_nbd(site.nbd_uri("vol-a"), site.base / "expected/vol-a.img")
    compare_over_nbd(site.nbd_uri("vol-b", tcp=False), site.base / "expected/vol-b.img")


def test_incident_recovery_second_run_changes_nothing(site):
    pids = site.pids()
    run = site.play("incident_recovery.yml", extra={"drtool_incident_verify": "nbd"})
    assert_ok(run, changed=False)
    assert "Read each range over NBD with qemu-io" in run.output
    assert site.pids() == pids


def test_failback_check_changes_nothing(site):
    make_image(site.images / "vol-b.new", SIZE, seed=99)  # the replacement disk holds junk
    before = {name: (s["mode"], s["device"]) for name, s in site.status().items()}
    run = site.play("failback.yml", "--check",
                    extra={"drtool_failback_devices": {"vol-b": str(site.images / "vol-b.new")}})
    assert_ok(run, changed=True)
    assert {name: (s["mode"], s["device"]) for name, s in site.status().items()} == before
    assert (site.images / "vol-b.new").read_bytes() != site.expected["vol-b"]


def test_failback_restores_the_volumes_exactly(site):
    extra = {"drtool_failback_devices": {"vol-b": str(site.images / "vol-b.new")}, "drtool_failback_rate": "50M"}
    run = site.play("failback.yml", extra=extra)
    assert_ok(run, changed=True)
    assert "ONLINE, normal mode, scrub clean: vol-a, vol-b" in run.output
    # The volumes themselves are exact: the repaired device and the replacement.
    assert (site.images / "vol-a.img").read_bytes() == site.expected["vol-a"]
    assert (site.images / "vol-b.new").read_bytes() == site.expected["vol-b"]
    status = site.status()
    assert all(s["health"] == "ONLINE" and s["mode"] == "normal" and s["bad_count"] == 0 for s in status.values())
    assert status["vol-b"]["device"] == str(site.images / "vol-b.new")
    assert_ok(site.play("failback.yml", extra=extra), changed=False)


def report_row(output: str, host: str, volume: str) -> bool:
    """The report (piped, as the playbook runs it: plain columns) has a row of ``volume`` on ``host``."""
    return re.search(rf"^\s*{re.escape(host)}\s+{re.escape(volume)}\s", output, re.MULTILINE) is not None


def test_status_renders_one_fleet_report(site):
    run = site.play("status.yml")
    assert_ok(run, changed=False)
    assert "drtool fleet status" in run.output
    for name in VOLUMES:
        assert report_row(run.output, "local-primary", name), run
    assert "no drtool volume on local-secondary" in run.output
    assert "vol-a: primary on local-primary; vol-b: primary on local-primary" in run.output
    # --check: the same report (it is rendered on the controller from the gathered status), nothing
    # changed on either host.
    before, pids = site.files(), site.pids()
    check = site.play("status.yml", "--check")
    assert_ok(check, changed=False)
    assert "drtool fleet status" in check.output and report_row(check.output, "local-primary", "vol-a")
    assert "vol-a: primary on local-primary; vol-b: primary on local-primary" in check.output
    assert site.files() == before and site.pids() == pids
    limited = site.play("status.yml", "--limit", "local-primary,localhost")
    assert_ok(limited, changed=False)
    assert report_row(limited.output, "local-primary", "vol-a"), limited
    assert "no status from local-secondary: they are not in the report" in limited.output


def play_section(run, play: str) -> str:
    """The output of one play of a run (from its PLAY line to the next)."""
    return run.output.split(f"PLAY [{play}]", 1)[1].split("PLAY ", 1)[0]


def test_a_demoted_volume_is_left_alone_and_the_plays_follow_the_roles(site):
    """After a swap the inventory still lists a demoted volume on its old primary (a real swap needs
    two hosts: tests/lab/test_failover.py).  Here vol-b is demoted in place: site.yml stops serving
    it and then leaves it alone; the incident and status plays act on what each host is primary of."""
    from drtool import api

    api.demote("vol-b", timeout=30, root=site.root)  # through the agent: drained, released
    serving = site.pids()["agent"]
    run = site.play("site.yml")
    assert_ok(run, changed=True)  # the agent lets vol-b go (planned_failover.yml does this)
    assert site.pids()["agent"] == serving  # live: not restarted, vol-a's clients stay connected
    assert "vol-b: secondary here (" in " ".join(run.output.split())
    status = site.status()
    assert status["vol-b"]["role"] == "secondary" and not status["vol-b"]["agent"]["running"]
    assert status["vol-a"]["role"] == "primary" and status["vol-a"]["agent"]["running"]
    pids = site.pids()
    assert_ok(site.play("site.yml"), changed=False)
    assert site.pids() == pids

    # The first play groups the hosts that are the primary of a volume now: local-primary (vol-a),
    # not local-secondary (no volume); the recovery play acts on vol-a only.
    run = site.play("incident_recovery.yml")
    assert_ok(run, changed=False)
    recovery = play_section(run, "Recover damaged volumes")
    assert "[local-primary]" in recovery and "local-secondary" not in recovery
    assert "vol-a: ONLINE, mode normal" in recovery and "vol-b" not in recovery
    run = site.play("status.yml")
    assert_ok(run, changed=False)
    assert "vol-a: primary on local-primary" in run.output
    assert "no host in the report is the primary of vol-b" in run.output


def test_bad_variables_fail_early_and_clearly(tmp_path):
    """The roles' argument specs stop a run before it touches anything."""
    extra = {"drtool_base": str(tmp_path), "drtool_install_method": "existing", "drtool_install_python": sys.executable,
             "drtool_primary_volumes": [{"name": "db"}], "drtool_primary_service_manager": "upstart"}
    run = run_playbook("site.yml", tmp_path, extra, "--limit", "local-primary")
    assert run.rc != 0
    assert "Validating arguments against arg spec 'main'" in run.output
    assert "missing required arguments: device found in drtool_primary_volumes" in run.output, str(run)
    assert "drtool_primary_service_manager must be one of: auto, systemd, daemon" in run.output, str(run)
    assert not (tmp_path / "primary").exists()
