"""The systemd units the service roles install (this machine has no systemd to run them):
rendered by Ansible from the roles' templates, they say what they should and systemd accepts them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.ansible.conftest import ROOT, VENV_BIN, ansible_env
from tests.conftest import require_tool

pytestmark = pytest.mark.slow


def test_units_render_and_pass_systemd_analyze_verify(tmp_path):
    require_tool("systemd-analyze")
    (tmp_path / "images").mkdir()
    # As the role derives it: the devices of the host's own volumes, which its replica server
    # adopts after a role swap.
    adopt_devices = yaml.safe_load((ROOT / "roles/drtool_secondary/defaults/main.yml").read_text())[
        "drtool_secondary_adopt_devices"]
    play = [{
        "name": "Render the drtool units", "hosts": "localhost", "gather_facts": False,
        "vars": {
            "ansible_python_interpreter": sys.executable,
            "drtool_primary_python": sys.executable, "drtool_secondary_python": sys.executable,
            "drtool_primary_present": ["vol-b", "vol-a"],
            "drtool_primary_volumes": [{"name": "vol-a", "device": str(tmp_path / "images/a.img")},
                                       {"name": "vol-b", "device": "/dev/vg0/b"}],
            "drtool_primary_state_root": "/var/lib/drtool",
            "drtool_primary_agent_listen": "127.0.0.1:10809",
            "drtool_primary_agent_nbd_socket": "/run/drtool/nbd.sock",
            "drtool_primary_agent_volumes_file": "/etc/drtool/drtool-agent.env",
            "drtool_secondary_root": "/srv/replicas", "drtool_secondary_listen": "192.0.2.20:8470",
            "drtool_secondary_token": "t" * 32, "drtool_secondary_token_file": "/etc/drtool/replica.token",
            "drtool_secondary_tls": True, "drtool_secondary_tls_dir": "/etc/drtool/tls",
            "drtool_secondary_adopt_devices": adopt_devices,
        },
        "tasks": [
            {"name": f"Render {unit}", "ansible.builtin.template": {
                "src": str(ROOT / "roles" / role / "templates" / f"{unit}.j2"), "dest": str(tmp_path / unit),
                "mode": "0644"}}
            for role, unit in (("drtool_primary", "drtool-agent.service"),
                               ("drtool_secondary", "drtool-replica.service"))
        ],
    }]
    # A host that runs no replica server (drtool_secondary_root undefined): the same agent unit
    # without the replica root.
    agent_only_vars = {k: v for k, v in play[0]["vars"].items() if not k.startswith("drtool_secondary_")}
    play.append({
        "name": "Render the agent unit of a host without a replica server", "hosts": "localhost",
        "gather_facts": False, "vars": agent_only_vars,
        "tasks": [{"name": "Render drtool-agent.service", "ansible.builtin.template": {
            "src": str(ROOT / "roles/drtool_primary/templates/drtool-agent.service.j2"),
            "dest": str(tmp_path / "agent-only" / "drtool-agent.service"), "mode": "0644"}}],
    })
    (tmp_path / "agent-only").mkdir()
    (tmp_path / "render.yml").write_text(yaml.safe_dump(play))
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), str(tmp_path / "render.yml")], cwd=ROOT,
                          env=ansible_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    agent = (tmp_path / "drtool-agent.service").read_text()
    # The volumes come from the environment file: a changed set leaves the unit as it is (the role
    # attaches and detaches them on the running agent), so nothing restarts it.
    assert (f"ExecStart={sys.executable} -m drtool agent $DRTOOL_AGENT_VOLUMES --state-root /var/lib/drtool "
            "--listen 127.0.0.1:10809 --nbd-socket /run/drtool/nbd.sock\n") in agent
    assert "EnvironmentFile=/etc/drtool/drtool-agent.env\n" in agent and "vol-a" not in agent
    for unit in (agent, (tmp_path / "drtool-replica.service").read_text()):
        # Ready when it serves (sd_notify), and SIGHUP reopens a log file (systemctl reload).
        assert "Type=notify\n" in unit and "ExecReload=/bin/kill -HUP $MAINPID\n" in unit
    assert "RuntimeDirectory=drtool\n" in agent
    assert f"ReadWritePaths={tmp_path / 'images'}\n" in agent and "ReadWritePaths=/dev" not in agent
    # The host also runs the replica server: after a role swap the agent serves volumes promoted
    # from replicas, whose images live in the replica root ("-": it may not exist yet).
    assert "ReadWritePaths=-/srv/replicas\n" in agent
    agent_only = (tmp_path / "agent-only" / "drtool-agent.service").read_text()
    assert "ReadWritePaths=/var/lib/drtool\n" in agent_only and "/srv/replicas" not in agent_only
    assert f"ReadWritePaths={tmp_path / 'images'}\n" in agent_only
    replica = (tmp_path / "drtool-replica.service").read_text()
    assert (f"ExecStart={sys.executable} -m drtool serve --root /srv/replicas --listen 192.0.2.20:8470 "
            "--token-file /etc/drtool/replica.token --tls-cert /etc/drtool/tls/server.crt "
            "--tls-key /etc/drtool/tls/server.key\n") in replica
    # It may write its root and, for the volumes it adopts after a swap, their devices' directories
    # (those that exist: "-"; /dev is writable anyway).
    assert "ReadWritePaths=/srv/replicas\n" in replica
    assert f"ReadWritePaths=-{tmp_path / 'images'}\n" in replica and "ReadWritePaths=-/dev" not in replica

    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "drtool-agent.service"),
                             str(tmp_path / "drtool-replica.service")], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "agent-only/drtool-agent.service")],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
